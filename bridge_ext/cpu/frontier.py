"""Local (non-Transformer-Engine) specs for MiniMax-M2 on CPU, through Megatron-Bridge.

Supports the CPU tests; the exporter does not use it.

Megatron-Bridge 0.6.2's ``minimax_m2_layer_spec`` starts from the Transformer Engine MoE spec and
puts its full-width ``FullDimQNorm`` / ``FullDimKNorm`` (plain torch modules) in the q/k norm
slots. :func:`minimax_m2_block_spec` does the same on megatron-core's local block spec.
"""

from __future__ import annotations

from typing import Optional

MODEL_TYPES = ("minimax_m2",)


def minimax_m2_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """The local block spec with Megatron-Bridge's full-width q/k norms."""
    from megatron.bridge.models.minimax_m2.minimax_m2_provider import FullDimKNorm, FullDimQNorm

    from bridge_ext.cpu.gpt_families import local_block_spec

    block = local_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    for layer in block.layer_specs:
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm, attention.k_layernorm = FullDimQNorm, FullDimKNorm
    return block


def configure_provider(provider, model_type: str) -> None:
    """After :func:`bridge_ext.cpu.gpt_families.configure_provider`: the architecture's own spec."""
    if model_type == "minimax_m2":
        provider.transformer_layer_spec = minimax_m2_block_spec
