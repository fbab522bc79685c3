"""The CPU builders' patches hold inside their blocks only (the autouse fixture checks every test after)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bridge_ext_testing import fla_torch, gpt_families, qwen3_vl, qwen35

# Each block -> what it rebinds (names of tests/cpu/conftest.py's REBOUND).
TORCH_CUDA = ("torch.cuda.current_device", "torch.cuda.nvtx.range_push", "torch.cuda.nvtx.range_pop")
GDN_PACKAGE = "megatron.core.ssm.gated_delta_net"
GDN = tuple(f"{module}.{name}" for module in (GDN_PACKAGE, f"{GDN_PACKAGE}.common")
            for name in ("causal_conv1d", "l2norm", "chunk_gated_delta_rule", "HAVE_FLA")) + (
    f"{GDN_PACKAGE}.gdn.causal_conv1d", f"{GDN_PACKAGE}.gdn.chunk_gated_delta_rule")
VISION = tuple(f"megatron.bridge.models.qwen_vl.modelling_qwen3_vl.model.{name}" for name in (
    "get_vit_layer_with_transformer_engine_spec", "TENorm", "TEColumnParallelLinear", "TERowParallelLinear"))
# bridge_ext_testing.local_specs.local_modules: EXAONE 4.5's vision tower and patch merger
EXAONE45_VISION = tuple(f"megatron.bridge.models.exaone.exaone45.modelling_exaone45.model.{name}" for name in (
    "get_vit_layer_with_transformer_engine_spec", "TENorm", "TEColumnParallelLinear", "TERowParallelLinear"))
MTP = ("megatron.bridge.models.gpt_provider.mtp_block_spec",)
# bridge_ext_testing.frontier: MiniMax-M2's q/k norm mapping, Kimi-K2.5's model, Nemotron-H's stack
FRONTIER = ("megatron.bridge.models.minimax_m2.minimax_m2_bridge._FullDimQKNormMapping",
            "megatron.bridge.models.kimi_vl.modeling_kimi_k25_vl.KimiK25VLModel",
            "megatron.core.models.hybrid.hybrid_block.TENorm")
MAMBA = ("megatron.core.ssm.mamba_mixer.HAVE_MAMBA_SSM", "megatron.core.ssm.mamba_mixer.ExtendedRMSNorm")
BLOCKS = {
    # no provider: the vision-language replacements are made too
    "qwen35.cpu_build_context": (qwen35.cpu_build_context, TORCH_CUDA + GDN + MTP + VISION + (
        "megatron.bridge.models.qwen_vl.qwen35_vl_provider."
        "get_transformer_block_with_experimental_attention_variant_spec",)),
    "qwen3_vl.cpu_build_context": (qwen3_vl.cpu_build_context, TORCH_CUDA + VISION + (
        "megatron.bridge.models.qwen_vl.qwen3_vl_provider.get_gpt_layer_with_transformer_engine_spec",)),
    "gpt_families.cpu_build_context": (gpt_families.cpu_build_context, TORCH_CUDA + MTP + FRONTIER + MAMBA +
                                          EXAONE45_VISION),
    "gpt_families.cpu_forward_context": (gpt_families.cpu_forward_context, (
        "megatron.core.fusions.fused_softmax.get_sliding_window_causal_mask",
        "megatron.bridge.models.gemma.gemma2_provider.get_swa")),
}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_block_rebinds_then_restores(bindings, block):
    enter, rebound = BLOCKS[block]
    before = bindings()
    assert len(before) == 32  # every name of REBOUND exists in the installed versions
    with enter():
        inside = bindings()
    expected = {name for name in rebound
                if not (torch.cuda.is_available() and name.startswith("torch.cuda."))
                and not (fla_torch.real_fla_available() and ".gated_delta_net" in name)
                and not (importlib.util.find_spec("mamba_ssm") is not None and name in MAMBA)}
    assert {name for name in before if inside[name] is not before[name]} == expected
    after = bindings()
    assert {name for name in before if after[name] is not before[name]} == set()
