"""Local (non-Transformer-Engine) specs for MiniMax-M2 on CPU, through Megatron-Bridge.

Supports the CPU tests; the exporter does not use it.

Megatron-Bridge 0.6.2's ``minimax_m2_layer_spec`` starts from the Transformer Engine MoE spec and
puts its full-width ``FullDimQNorm`` / ``FullDimKNorm`` (plain torch modules) in the q/k norm
slots. :func:`minimax_m2_block_spec` does the same on megatron-core's local block spec. At TP > 1
its weight mapping of those norms broadcasts the Hugging Face tensor on ``cuda``;
:func:`cpu_mappings` (inside the build context) slices each rank's heads on the CPU instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

BRIDGE_MODULE = "megatron.bridge.models.minimax_m2.minimax_m2_bridge"

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
        from megatron.core import parallel_state

        provider.transformer_layer_spec = minimax_m2_block_spec
        # FullDimQNorm / FullDimKNorm size their weights from the config's tensor-parallel size
        # (megatron-core's linears read the parallel state the CPU harness initialised)
        provider.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()


@contextmanager
def cpu_mappings() -> Iterator[None]:
    """Megatron-Bridge's full-width q/k norm mapping loading on the CPU at TP > 1: each rank
    slices its heads' rows of the tensor it read itself (the same rows rank 0's broadcast gives)."""
    from megatron.bridge.models.minimax_m2 import minimax_m2_bridge

    from bridge_ext.cpu.qwen35 import _replaced

    class CpuFullDimQKNormMapping(minimax_m2_bridge._FullDimQKNormMapping):
        def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module: torch.nn.Module) -> torch.Tensor:
            target = megatron_module.weight
            hf_weights = hf_weights.to(device=target.device, dtype=target.dtype)
            if self.tp_size == 1:
                return hf_weights
            size = target.shape[0]
            _, shard = self._get_shard_spec(shard_size=size, megatron_module=megatron_module, global_size_attr="global_dim")
            return hf_weights[shard * size:(shard + 1) * size].clone()

    with _replaced(BRIDGE_MODULE, _FullDimQKNormMapping=CpuFullDimQKNormMapping):
        yield
