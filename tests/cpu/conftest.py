"""Every test here leaves megatron and torch as it found them (bridge_ext_testing scopes its patches)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest

GDN_NAMES = ("causal_conv1d", "l2norm", "chunk_gated_delta_rule", "HAVE_FLA")
# Module -> the names bridge_ext_testing rebinds inside its blocks (a name a module lacks is skipped).
REBOUND = {
    "torch.cuda": ("current_device",),
    "torch.cuda.nvtx": ("range_push", "range_pop"),
    "megatron.core.ssm.gated_delta_net": GDN_NAMES,
    "megatron.core.ssm.gated_delta_net.common": GDN_NAMES,
    "megatron.core.ssm.gated_delta_net.gdn": GDN_NAMES,
    "megatron.bridge.models.gpt_provider": ("mtp_block_spec",),
    "megatron.bridge.models.qwen_vl.qwen35_vl_provider": (
        "get_transformer_block_with_experimental_attention_variant_spec",),
    "megatron.bridge.models.qwen_vl.qwen3_vl_provider": ("get_gpt_layer_with_transformer_engine_spec",),
    "megatron.bridge.models.qwen3_asr.qwen3_asr_provider": ("get_gpt_layer_with_transformer_engine_spec",),
    "megatron.core.fusions.fused_softmax": ("get_sliding_window_causal_mask",),
    "megatron.bridge.models.gemma.gemma2_provider": ("get_swa",),
    "megatron.bridge.models.minimax_m2.minimax_m2_bridge": ("_FullDimQKNormMapping",),
    "megatron.bridge.models.kimi_vl.modeling_kimi_k25_vl": ("KimiK25VLModel",),
    "megatron.core.ssm.mamba_mixer": ("HAVE_MAMBA_SSM", "ExtendedRMSNorm"),
    "megatron.core.models.hybrid.hybrid_block": ("TENorm",),
    "megatron.bridge.models.qwen_vl.modelling_qwen3_vl.model": (
        "get_vit_layer_with_transformer_engine_spec", "TENorm", "TEColumnParallelLinear", "TERowParallelLinear"),
    "megatron.bridge.models.exaone.exaone45.modelling_exaone45.model": (
        "get_vit_layer_with_transformer_engine_spec", "TENorm", "TEColumnParallelLinear", "TERowParallelLinear"),
}


def current_bindings() -> dict[str, object]:
    """``"module.name" -> object`` for every name of :data:`REBOUND`."""
    values = {}
    for module_name, names in REBOUND.items():
        module = importlib.import_module(module_name)
        values.update({f"{module_name}.{name}": getattr(module, name) for name in names if hasattr(module, name)})
    return values


@pytest.fixture
def bindings() -> Callable[[], dict[str, object]]:
    return current_bindings


@pytest.fixture(autouse=True)
def megatron_left_as_found():
    before = current_bindings()
    yield
    after = current_bindings()
    assert [name for name in before if after[name] is not before[name]] == [], "left rebound by the test"
