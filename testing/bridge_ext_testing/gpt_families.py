"""Build DeepSeek-V3, GLM-4.5 MoE, gpt-oss and MiMo models on CPU through Megatron-Bridge.

Supports the CPU demo and tests; the exporter does not use it.

Megatron-Bridge's bridges for these models (HF model types ``deepseek_v3``, ``kimi_k2``,
``glm4_moe``, ``gpt_oss``, ``mimo``) give the provider its settings and weight mappings; the
providers ask for Transformer Engine specs (and Megatron-Bridge's ``gpt_provider.mtp_block_spec``
hard-codes them). :func:`configure_provider` points the provider at megatron-core's local block
spec (dense and MoE layers after ``moe_layer_freq``), with :class:`bridge_ext_testing.mla.MLACoreAttention`
in the core-attention slot of MLA layers, and sets what local modules need on CPU.
:func:`cpu_build_context` must surround ``provide*`` calls: it makes MTP blocks local too.
:func:`cpu_forward_context` must surround a forward of a model with sliding-window layers
(gpt-oss): megatron-core builds the sliding-window mask on ``cuda``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional

import torch

from bridge_ext.tables import register_transformers_configs

MODEL_TYPES = ("deepseek_v3", "kimi_k2", "glm4_moe", "glm4_moe_lite", "gpt_oss", "mimo", "minimax_m2", "kimi_k25",
               "nemotron_h")


def hf_model_type(hf_dir: str | Path) -> str | None:
    register_transformers_configs()  # Megatron-Bridge reads MiMo / Kimi-K2 folders with AutoConfig
    config = Path(hf_dir) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def is_gpt_family(hf_dir: str | Path) -> bool:
    """A type of :data:`MODEL_TYPES`, or one whose table is generated (:mod:`bridge_ext_testing.tiny_generated`)."""
    from bridge_ext_testing.tiny_generated import TINY

    return hf_model_type(hf_dir) in (*MODEL_TYPES, *TINY)


def local_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """megatron-core's local decoder block spec, with the MLA core attention where needed."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                       vp_stage=vp_stage, pp_rank=pp_rank)
    for layer in block.layer_specs:
        _local_mla(config, layer)
    return block


def _local_mla(config, layer_spec) -> None:
    """MLA layers get the MLA core attention.

    (megatron-core 0.19.2 builds MLA without ``q_lora_rank`` and with ``qk_layernorm`` only
    with a fused norm+linear ``linear_q_proj``, i.e. Transformer Engine: not on CPU.)
    """
    if config.multi_latent_attention:
        from bridge_ext_testing.mla import MLACoreAttention

        layer_spec.submodules.self_attention.submodules.core_attention = MLACoreAttention


def local_mtp_block_spec(config, vp_stage: Optional[int] = None):
    """Drop-in for Megatron-Bridge's ``gpt_provider.mtp_block_spec`` with local modules.

    The inner layer of each MTP module is the last decoder layer's spec (MoE where the model
    has MoE layers), taken from the whole model so it does not depend on the pipeline stage.
    """
    if not getattr(config, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs, get_gpt_mtp_block_spec

    last = get_gpt_decoder_layer_specs(config, use_transformer_engine=False, normalization=config.normalization)[-1]
    _local_mla(config, last)
    return get_gpt_mtp_block_spec(config, last, use_transformer_engine=False, vp_stage=vp_stage)


def partial_rotary_factor(hf_dir: str | Path) -> float | None:
    """The rotary fraction a config.json declares, at top level or in ``rope_parameters``.

    transformers 5.x moves ``partial_rotary_factor`` into ``rope_parameters``; Megatron-Bridge
    0.6.2 reads only the top-level attribute, so a GLM-4.5 provider keeps ``rotary_percent=1.0``
    and rotates every head dim instead of half (logits then differ from Hugging Face's).
    """
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    value = (config.get("rope_parameters") or {}).get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return None if value is None else float(value)


def restore_rotary_fraction(bridge, model_type: str | None) -> None:
    """What a GLM-4.5V user does before ``to_megatron_provider`` (``architecture_notes.NOTES``).

    Megatron-Bridge 0.6.2's ``GLM45VBridge`` reads ``text_config.partial_rotary_factor``, which
    transformers 5.23 moves into ``text_config.rope_parameters`` (5.9 keeps both): the attribute
    is set back from there, the value transformers itself rotates by.
    """
    if model_type != "glm4v_moe":
        return
    text = bridge.hf_pretrained.config.text_config
    if not hasattr(text, "partial_rotary_factor"):
        text.partial_rotary_factor = text.rope_parameters["partial_rotary_factor"]


def configure_provider(provider, hf_dir: str | Path) -> None:
    """Local specs and CPU settings for a provider of one of :data:`MODEL_TYPES` (before ``finalize``)."""
    rotary = partial_rotary_factor(hf_dir)
    if rotary is not None:
        provider.rotary_percent = rotary
    if getattr(provider, "num_moe_experts", None):
        provider.moe_grouped_gemm = False  # SequentialMLP experts
        provider.moe_permute_fusion = False  # Triton / TE kernels
        provider.moe_token_dispatcher_type = "allgather"  # alltoall needs CUDA streams
        provider.moe_shared_expert_overlap = False  # only with the alltoall dispatcher
        provider.moe_router_fusion = False
    provider.transformer_impl = "local"
    provider.gradient_accumulation_fusion = False
    provider.bias_activation_fusion = False
    provider.bias_dropout_fusion = False
    provider.masked_softmax_fusion = False
    provider.persist_layer_norm = False
    provider.apply_rope_fusion = False
    provider.cross_entropy_loss_fusion = False  # the fused loss (MTP heads in eval) is TE's
    provider.transformer_layer_spec = local_block_spec
    from bridge_ext_testing import frontier

    frontier.configure_provider(provider, hf_model_type(hf_dir))


@contextmanager
def cpu_build_context(provider=None) -> Iterator[None]:
    """Scope for ``provide*``: local MTP blocks, ``torch.cuda.current_device`` on CPU."""
    from bridge_ext_testing.qwen35 import _replaced, cpu_current_device

    from bridge_ext_testing.frontier import cpu_mappings, kimi_k25_build_context, nemotron_h_build_context
    from bridge_ext_testing.local_specs import local_modules

    with ExitStack() as stack:
        stack.enter_context(cpu_current_device())
        stack.enter_context(cpu_mappings())
        stack.enter_context(kimi_k25_build_context())
        stack.enter_context(nemotron_h_build_context())
        stack.enter_context(local_modules())
        stack.enter_context(_replaced("megatron.bridge.models.gpt_provider", mtp_block_spec=local_mtp_block_spec))
        yield


def sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron-core's ``get_sliding_window_causal_mask`` (True = masked), on the CPU.

    Position ``i`` sees ``j`` with ``i - window_size[0] <= j <= i + window_size[1]``.
    """
    allowed = torch.ones(sq, skv, dtype=torch.bool)
    allowed = torch.triu(allowed, diagonal=skv - sq - window_size[0])
    return ~torch.tril(allowed, diagonal=skv - sq + window_size[1])


@contextmanager
def cpu_forward_context() -> Iterator[None]:
    """Scope for a forward on CPU: the sliding-window mask is built on the CPU device."""
    from bridge_ext_testing.qwen35 import _replaced

    with ExitStack() as stack:
        stack.enter_context(_replaced("megatron.core.fusions.fused_softmax",
                                      get_sliding_window_causal_mask=sliding_window_causal_mask))
        # Gemma 2's attention builds the same mask on cuda with a function of its own
        stack.enter_context(_replaced("megatron.bridge.models.gemma.gemma2_provider", get_swa=sliding_window_causal_mask))
        yield
