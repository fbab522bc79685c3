"""MiniMax-M2 and Kimi-K2.5 built on CPU through Megatron-Bridge (local, non-Transformer-Engine specs).

Supports the CPU tests; the exporter does not use it.

Kimi-K2.5: Megatron-Bridge 0.6.2's ``KimiK25VLModel`` builds its vision tower and projector
from the checkpoint's own remote code (``modeling_kimi_k25.MoonViT3dPretrainedModel``,
``trust_remote_code``), which a tiny model made with transformers does not carry.
:func:`kimi_k25_build_context` puts a stand-in (``KimiK25TextStandIn``) in its place: the same
``language_model`` (Megatron-Bridge's provider builds it), and the vision tower and projector as
parameters under the checkpoint's own names (what the remote modules hold: Megatron-Bridge
maps ``vision_tower.**`` to ``vision_tower.**``), loaded by Megatron-Bridge's loader. Its forward
is the language model's (text only): the vision tower's forward is not run.

Nemotron-H: megatron-core's Mamba mixer refuses to build without ``mamba_ssm`` (its scan and
gated-norm kernels, CUDA only) and the hybrid stack's local spec uses Transformer Engine norms.
:func:`nemotron_h_stack_spec` swaps those norms for torch ones and
:func:`nemotron_h_build_context` lets the mixer build with a torch gated norm holding the same
weight: the model builds and loads on CPU, but its Mamba layers cannot run forward.

MiniMax-M2:
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

MODEL_TYPES = ("minimax_m2", "kimi_k25", "nemotron_h")
KIMI_MODEL_MODULE = "megatron.bridge.models.kimi_vl.modeling_kimi_k25_vl"


def minimax_m2_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """The local block spec with Megatron-Bridge's full-width q/k norms."""
    from megatron.bridge.models.minimax_m2.minimax_m2_provider import FullDimKNorm, FullDimQNorm

    from bridge_ext_testing.gpt_families import local_block_spec

    block = local_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    for layer in block.layer_specs:
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm, attention.k_layernorm = FullDimQNorm, FullDimKNorm
    return block


def configure_provider(provider, model_type: str) -> None:
    """After :func:`bridge_ext_testing.gpt_families.configure_provider`: the architecture's own spec."""
    if model_type == "nemotron_h":
        provider.hybrid_stack_spec = nemotron_h_stack_spec()
        provider.first_last_layers_bf16 = False
        # its provider asks for flash attention, whose Transformer Engine switches contradict the
        # ones an earlier model of the process set; the spec's core attention is local anyway
        from megatron.core.transformer.enums import AttnBackend

        provider.attention_backend = AttnBackend.auto
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

    from bridge_ext_testing.qwen35 import _replaced

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


def _parameter_tree(shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """Modules holding an empty parameter at each dotted name of ``shapes``."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def _checkpoint_shapes(hf_dir: str, prefix: str) -> dict[str, tuple[int, ...]]:
    from bridge_ext.hf_files import list_safetensors

    return {name[len(prefix):]: stored.shape for name, stored in list_safetensors(hf_dir).items()
            if name.startswith(prefix)}


def _stand_in_class():
    from megatron.core.transformer.module import MegatronModule

    class KimiK25TextStandIn(MegatronModule):
        """``KimiK25VLModel`` without remote code: its language model, and its vision tower and
        projector as parameters under the checkpoint's names (checkpointed as the real model's
        Hugging Face modules are: replicated)."""

        def __init__(self, config, pre_process=True, post_process=True, vp_stage=None) -> None:
            super().__init__(config=config)
            _build_stand_in(self, config, pre_process, post_process, vp_stage)

        def set_input_tensor(self, input_tensor) -> None:
            self.language_model.set_input_tensor(input_tensor)

        def forward(self, input_ids, position_ids=None, attention_mask=None, **kwargs):
            return self.language_model(input_ids=input_ids, position_ids=position_ids,
                                       attention_mask=attention_mask, **kwargs)

    return KimiK25TextStandIn


def _build_stand_in(self, config, pre_process, post_process, vp_stage) -> None:
    self.pre_process, self.post_process = pre_process, post_process
    if pre_process:
        self.vision_tower = _parameter_tree(_checkpoint_shapes(config.hf_model_path, "vision_tower."))
        self.mm_projector = _parameter_tree(_checkpoint_shapes(config.hf_model_path, "mm_projector."))
    self.language_model = config.provide_language_model(pre_process=pre_process, post_process=post_process,
                                                        vp_stage=vp_stage)
    self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
    self.shared_embedding_or_output_weight = self.language_model.shared_embedding_or_output_weight


@contextmanager
def kimi_k25_build_context() -> Iterator[None]:
    from bridge_ext_testing.qwen35 import _replaced

    with _replaced(KIMI_MODEL_MODULE, KimiK25VLModel=_stand_in_class()):
        yield


def nemotron_h_stack_spec():
    """megatron-core's local hybrid stack spec (the ModelOpt one, with Transformer Engine checkpoint
    names for the fused norms) with torch norms in place of its Transformer Engine ``Norm``."""
    import dataclasses

    from megatron.core.post_training.modelopt.hybrid.model_specs import get_hybrid_stack_modelopt_spec
    from megatron.core.post_training.modelopt.layers import Norm
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def swap(node, seen: set[int]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, ModuleSpec):
            swap(node.submodules, seen)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for each in dataclasses.fields(node):
                value = getattr(node, each.name)
                if value is Norm:
                    setattr(node, each.name, WrappedTorchNorm)
                else:
                    swap(value, seen)

    spec = get_hybrid_stack_modelopt_spec(local_core_attention=True, remap_te_layernorm=True)
    swap(spec, set())
    return spec


class GatedRMSNormWeight(torch.nn.Module):
    """Stands in for ``mamba_ssm``'s gated RMSNorm at build time: the same ``weight`` (one per
    inner channel, split over tensor-parallel ranks with the heads). No forward."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size=None, norm_before_gate=False,
                 device=None, dtype=None, **unused) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, *args, **kwargs):
        raise NotImplementedError("the Mamba mixer's gated norm needs mamba_ssm (CUDA); not available on CPU")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets)


@contextmanager
def nemotron_h_build_context() -> Iterator[None]:
    """Without ``mamba_ssm``: the mixer builds with :class:`GatedRMSNormWeight` (no forward);
    with it (a GPU machine) only the final norm is swapped."""
    from megatron.core.ssm import mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from bridge_ext_testing.qwen35 import _replaced

    if mamba_mixer.HAVE_MAMBA_SSM:
        with _replaced("megatron.core.models.hybrid.hybrid_block", TENorm=WrappedTorchNorm):
            yield
        return
    with (_replaced("megatron.core.ssm.mamba_mixer", HAVE_MAMBA_SSM=True, ExtendedRMSNorm=GatedRMSNormWeight),
          _replaced("megatron.core.models.hybrid.hybrid_block", TENorm=WrappedTorchNorm)):
        yield
