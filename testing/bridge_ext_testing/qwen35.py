"""Local (non-TE) specs for Megatron-Bridge's Qwen3.5 / Qwen3-Next bridges, so they build on a CPU.

Support for the demo and the tests, not the exporter; every rebinding is scoped to
:func:`cpu_build_context` / :func:`cpu_current_device`. The upstream facts: docs/cpu_models.md.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Optional

import torch

from bridge_ext_testing import fla_torch

# HF config model_type -> Megatron-Bridge bridge handling it.
QWEN35_MODEL_TYPES = {
    "qwen3_5_text": "Qwen35Bridge",
    "qwen3_5_moe_text": "Qwen35MoEBridge",
    "qwen3_5": "Qwen35VLBridge",
    "qwen3_5_moe": "Qwen35VLMoEBridge",
    # Qwen3-Next: the same GDN + gated attention + MoE + MTP modules, so the same local specs.
    "qwen3_next": "Qwen3NextBridge",
}
VL_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")


# --------------------------------------------------------------------------------------------
# torch.cuda.current_device on CPU
# --------------------------------------------------------------------------------------------
@contextmanager
def cpu_current_device() -> Iterator[None]:
    """CPU stand-ins for two ``torch.cuda`` calls megatron code makes unconditionally.

    Inside the block, on machines where CUDA is not available (elsewhere: no-op):

    * ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. megatron-core passes the
      result as a ``device=`` argument or to ``.to(...)`` (GDN parameters, rotary ``inv_freq``,
      the MoE router weight, Qwen3-VL's vision rotary), where the CPU device is what we want;
    * ``torch.cuda.nvtx.range_push`` / ``range_pop`` (profiler markers, which raise on a torch
      built without CUDA; Megatron-Bridge's ``Qwen3VLModel.forward`` calls them) do nothing.

    Both are restored on exit.
    """
    if torch.cuda.is_available():
        yield
        return
    nvtx = torch.cuda.nvtx
    saved = (torch.cuda.current_device, nvtx.range_push, nvtx.range_pop)

    def current_device() -> torch.device:
        return torch.device("cpu")

    def range_push(msg):  # noqa: ARG001 - profiler marker, nothing to record on CPU
        return 0

    def range_pop():
        return 0

    torch.cuda.current_device, nvtx.range_push, nvtx.range_pop = current_device, range_push, range_pop
    try:
        yield
    finally:
        torch.cuda.current_device, nvtx.range_push, nvtx.range_pop = saved


@contextmanager
def _replaced(module_name: str, **names) -> Iterator[None]:
    """Temporarily replace module-level names (each must exist)."""
    module = importlib.import_module(module_name)
    saved = {}
    for name, value in names.items():
        if not hasattr(module, name):
            raise RuntimeError(f"{module_name}.{name} not found: bridge_ext_testing.qwen35 needs review")
        saved[name] = getattr(module, name)
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# --------------------------------------------------------------------------------------------
# Norms and attention
# --------------------------------------------------------------------------------------------
class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm ``y = x / sqrt(mean(x^2) + eps) * (1 + weight)`` (weight initialised to 0).

    Computed in fp32 and cast back, as HF ``Qwen3_5RMSNorm`` and TE's zero-centred RMSNorm do.
    With ``config.layernorm_zero_centered_gamma`` False it is the plain ``* weight`` form
    (weight initialised to 1).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", True))
        self.eps = eps
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        gamma = self.weight.float() + 1.0 if self.zero_centered else self.weight.float()
        return (y * gamma).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered={self.zero_centered}"


class LocalNorm:
    """Norm builder (a class, as megatron's ``build_module`` returns plain functions unbuilt):
    :class:`ZeroCenteredRMSNorm` for RMSNorm configs, megatron's torch LayerNorm otherwise."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if getattr(config, "normalization", "RMSNorm") == "RMSNorm":
            return ZeroCenteredRMSNorm(config, hidden_size, eps)
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        return WrappedTorchNorm(config, hidden_size, eps)


@functools.cache
def _packed_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class PackedDotProductAttention(DotProductAttention):
        """megatron-core's local ``DotProductAttention`` plus packed (``thd``) sequences.

        With ``packed_seq_params`` (``qkv_format="thd"``) the inputs are ``[t, heads, dim]``
        and attention stays inside each ``cu_seqlens`` segment, causal or not as this module's
        ``attn_mask_type`` says (the vision encoder: ``no_mask``). Without it the parent runs.
        """

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if packed_seq_params is None:
                return super().forward(
                    query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                    attention_bias=attention_bias, packed_seq_params=None, **kwargs,
                )
            if packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(f"qkv_format {packed_seq_params.qkv_format!r}")
            if query.dim() == 4:  # [t, 1, heads, dim]
                query, key, value = (t.squeeze(1) for t in (query, key, value))
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
            cu_q = packed_seq_params.cu_seqlens_q_padded
            cu_q = packed_seq_params.cu_seqlens_q if cu_q is None else cu_q
            cu_k = packed_seq_params.cu_seqlens_kv_padded
            cu_k = packed_seq_params.cu_seqlens_kv if cu_k is None else cu_k
            heads = query.shape[1]
            if key.shape[1] != heads:  # grouped query attention
                key = key.repeat_interleave(heads // key.shape[1], dim=1)
                value = value.repeat_interleave(heads // value.shape[1], dim=1)
            outputs = []
            bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
            for i in range(len(bounds_q) - 1):
                q = query[bounds_q[i] : bounds_q[i + 1]].transpose(0, 1).float()  # [h, s, d]
                k = key[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1).float()
                v = value[bounds_k[i] : bounds_k[i + 1]].transpose(0, 1)
                scores = (q @ k.transpose(-1, -2)) * self.softmax_scale
                if causal:
                    sq, sk = scores.shape[-2:]
                    future = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(1 + sk - sq)
                    scores = scores.masked_fill(future, float("-inf"))
                probs = torch.softmax(scores, dim=-1).to(v.dtype)
                outputs.append((probs @ v).transpose(0, 1))  # [s, h, d]
            context = torch.cat(outputs, dim=0)
            return context.reshape(context.shape[0], -1)

    return PackedDotProductAttention


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------
@functools.cache
def _backend():
    from megatron.core.models.backends import LocalSpecProvider

    class CpuSpecProvider(LocalSpecProvider):
        """megatron-core's local backend with :class:`LocalNorm` for every norm."""

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
            return LocalNorm

    return CpuSpecProvider()


def _prepare_config(config) -> None:
    """Settings the local modules need on CPU (asserted by megatron-core otherwise)."""
    if getattr(config, "num_moe_experts", None):
        config.moe_grouped_gemm = False  # SequentialMLP experts
        config.moe_permute_fusion = False  # fused permute kernels are Triton/TE
        config.moe_token_dispatcher_type = "allgather"  # alltoall needs CUDA streams
    config.transformer_impl = "local"
    config.gradient_accumulation_fusion = False
    config.persist_layer_norm = False
    config.memory_efficient_layer_norm = False
    config.apply_rope_fusion = False


# --------------------------------------------------------------------------------------------
# Decoder and MTP specs
# --------------------------------------------------------------------------------------------
def qwen35_layer_specs(config) -> list:
    """One ``TransformerLayer`` spec per decoder layer (all layers, before pipeline slicing)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_linear_attention_pattern,
        get_moe_layer_pattern,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    _prepare_config(config)
    backend = _backend()
    if config.experimental_attention_variant != "gated_delta_net":
        raise ValueError(f"not a Qwen3.5 config: experimental_attention_variant={config.experimental_attention_variant!r}")

    gdn = ModuleSpec(
        module=GatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(
            in_proj=backend.column_parallel_linear(),
            out_norm=LocalNorm,
            out_proj=backend.row_parallel_linear(),
        ),
    )
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=LocalNorm if config.qk_layernorm else IdentityOp,
            k_layernorm=LocalNorm if config.qk_layernorm else IdentityOp,
        ),
    )
    dense = get_mlp_module_spec_for_backend(backend=backend, num_experts=None)
    moe = (
        get_moe_module_spec_for_backend(backend=backend, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
        if config.num_moe_experts
        else None
    )
    linear_pattern = get_linear_attention_pattern(config)
    moe_pattern = get_moe_layer_pattern(config) if config.num_moe_experts else [0] * config.num_layers

    specs = []
    for layer in range(config.num_layers):
        is_gdn, is_moe = linear_pattern[layer] == 1, moe_pattern[layer] == 1
        # Distributed checkpoints of the local spec use the TE names of the fused norms, as
        # megatron-core's own local GPT spec does.
        keys_map = {"input_layernorm.": "self_attention.in_proj.layer_norm_" if is_gdn else "self_attention.linear_qkv.layer_norm_"}
        if not is_moe:
            keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        specs.append(
            ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=LocalNorm,
                    self_attention=gdn if is_gdn else attention,
                    self_attn_bda=get_bias_dropout_add,
                    pre_mlp_layernorm=LocalNorm,
                    mlp=moe if is_moe else dense,
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_map,
                ),
            )
        )
    return specs


def qwen35_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """Local decoder block spec of a Qwen3.5 provider (drop-in for
    ``get_transformer_block_with_experimental_attention_variant_spec``): this pipeline stage's layers."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    specs = qwen35_layer_specs(config)
    if config.pipeline_model_parallel_layout is not None:
        local_ids = config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank
        )
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local_ids = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))
    return TransformerBlockSubmodules(layer_specs=[specs[i] for i in local_ids], layer_norm=LocalNorm)


def qwen35_mtp_block_spec(config, vp_stage: Optional[int] = None):
    """Local MTP block spec (drop-in for Megatron-Bridge's ``gpt_provider.mtp_block_spec``).

    The inner layer of each MTP module is the LAST decoder layer's spec (full attention for
    Qwen3.5), taken from the full layer list, so it does not depend on the pipeline stage.
    """
    if not getattr(config, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend

    last_layer = qwen35_layer_specs(config)[-1]
    return get_gpt_mtp_block_spec_for_backend(config=config, spec=last_layer, backend=_backend(), vp_stage=vp_stage)


def _vl_language_block_spec(provider, vp_stage=None, pp_rank=None):
    return qwen35_block_spec(provider, vp_stage=vp_stage, pp_rank=pp_rank)


# --------------------------------------------------------------------------------------------
# Vision tower (VL)
# --------------------------------------------------------------------------------------------
def local_vit_layer_spec():
    """megatron-core's local ViT layer spec with :class:`PackedDotProductAttention`."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_vit_layer_with_local_spec()
    spec.submodules.input_layernorm = WrappedTorchNorm  # LayerNorm with bias (vision config)
    spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
    spec.submodules.self_attention.submodules.core_attention = _packed_attention_class()
    return spec


def _vision_overrides():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return _replaced(
        "megatron.bridge.models.qwen_vl.modelling_qwen3_vl.model",
        get_vit_layer_with_transformer_engine_spec=local_vit_layer_spec,
        TENorm=WrappedTorchNorm,
        TEColumnParallelLinear=ColumnParallelLinear,
        TERowParallelLinear=RowParallelLinear,
    )


# --------------------------------------------------------------------------------------------
# Provider configuration and build context
# --------------------------------------------------------------------------------------------
def configure_provider(provider) -> None:
    """Point a Qwen3.5 provider at the local specs and CPU settings (before ``finalize()``)."""
    _prepare_config(provider)
    provider.transformer_layer_spec = qwen35_block_spec


def is_vl_provider(provider) -> bool:
    return hasattr(provider, "vision_config") and hasattr(provider, "build_language_spec")


@contextmanager
def cpu_build_context(provider=None) -> Iterator[None]:
    """Scope in which a configured Qwen3.5 provider's ``provide*`` builds the local model.

    Replaces, until exit: the fla functions of megatron's GDN where no fla is installed
    (:func:`bridge_ext_testing.fla_torch.gdn_torch_kernels`); ``torch.cuda.current_device`` (CPU
    machines only, see :func:`cpu_current_device`); Megatron-Bridge's ``gpt_provider.mtp_block_spec`` (TE only) by
    :func:`qwen35_mtp_block_spec`; for VL providers, the block-spec function in
    ``qwen35_vl_provider`` by :func:`qwen35_block_spec` (the VL providers' ``build_language_spec``
    ignores ``transformer_layer_spec``) and the TE classes ``Qwen3VLModel`` builds its vision
    tower from by local ones (:func:`local_vit_layer_spec`, torch LayerNorm, local linears).
    """
    with ExitStack() as stack:
        stack.enter_context(fla_torch.gdn_torch_kernels())  # megatron's GDN refuses to build without fla
        stack.enter_context(cpu_current_device())
        stack.enter_context(_replaced("megatron.bridge.models.gpt_provider", mtp_block_spec=qwen35_mtp_block_spec))
        if provider is None or is_vl_provider(provider):
            stack.enter_context(
                _replaced(
                    "megatron.bridge.models.qwen_vl.qwen35_vl_provider",
                    get_transformer_block_with_experimental_attention_variant_spec=_vl_language_block_spec,
                )
            )
            stack.enter_context(_vision_overrides())
        yield


# --------------------------------------------------------------------------------------------
# Weight mappings for local-spec names
# --------------------------------------------------------------------------------------------
# (TE fused-norm parameter, local-spec parameter): the aliases megatron-bridge's registry adds
# for patterns ending in "*.<TE name>", applied here to every pattern (MTP ones use "mtp.layers.0.").
_NORM_ALIASES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("self_attention.in_proj.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)
_GROUPED_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.linear_fc(?P<n>[12])\.weight\*$")


def local_spec_aliases(mappings) -> list:
    """Mappings under local-spec names for bridge mappings that only name the TE/grouped ones.

    * an ``AutoMapping`` of a TE fused norm (``...self_attention.linear_qkv.layer_norm_weight``,
      ``...mlp.linear_fc1.layer_norm_weight``) -> an ``AutoMapping`` of the separate norm
      (``...input_layernorm.weight``, ``...pre_mlp_layernorm.weight``), same HF name;
    * a grouped-GEMM expert mapping ``<p>.experts.linear_fc{1,2}.weight*`` -> the same mapping
      (same class, HF names, options) for ``<p>.experts.local_experts.*.linear_fc{1,2}.weight``
      (``SequentialMLP``); the two wildcards keep their order (layer, expert).

    Aliases whose name is already mapped are skipped, so the bridge's own mappings win.
    """
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    existing = {m.megatron_param for m in mappings}
    aliases = []
    for mapping in mappings:
        name = mapping.megatron_param
        new = None
        if type(mapping) is AutoMapping:
            for te_name, local_name in _NORM_ALIASES:
                if name.endswith("." + te_name):
                    new = AutoMapping(name[: -len(te_name)] + local_name, mapping.hf_param, mapping.permute_dims)
                    break
        match = _GROUPED_EXPERT.match(name)
        if match:
            new = copy.copy(mapping)
            new.megatron_param = f"{match['prefix']}.experts.local_experts.*.linear_fc{match['n']}.weight"
            new._broadcast_obj_cache, new._tensor_spec_output_cache = {}, {}
            new._validate_patterns()
        if new is not None and new.megatron_param not in existing:
            aliases.append(new)
            existing.add(new.megatron_param)
    return aliases


def add_local_spec_mappings(registry):
    """A ``MegatronMappingRegistry`` with the bridge's mappings plus :func:`local_spec_aliases`."""
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry

    aliases = local_spec_aliases(registry.mappings)
    if not aliases:
        return registry
    extended = MegatronMappingRegistry(*registry.mappings, *aliases)
    if registry._pg_collection is not None:
        extended.set_process_groups_from_pg_collection(registry._pg_collection)
    return extended


def with_local_spec_mappings(model_bridge):
    """Make one Megatron-Bridge model bridge's ``mapping_registry()`` include the local aliases."""
    if getattr(model_bridge, "_bridge_ext_local_spec", False):
        return model_bridge
    original = model_bridge.mapping_registry

    def mapping_registry():
        return add_local_spec_mappings(original())

    model_bridge.mapping_registry = mapping_registry
    model_bridge._bridge_ext_local_spec = True
    return model_bridge


def unmapped_parameters(auto_bridge, chunks) -> list[str]:
    """Megatron parameter names (adapters excluded) that ``auto_bridge``'s mappings do not cover.

    Megatron-Bridge's loader fails on such a name with an ``AttributeError`` deep inside
    ``load_weights_hf_to_megatron``; :func:`bridge_ext_testing.build.build_megatron_model` checks
    this first and raises a readable error instead (e.g. for ``mtp_num_hidden_layers=2``, where
    the Qwen3.5 bridges map only MTP depth 0's ``eh_proj``/norms/``linear_proj``).
    """
    model_bridge = auto_bridge._model_bridge
    registry = model_bridge.mapping_registry()
    missing = []
    for chunk in chunks:
        for name, _ in chunk.named_parameters():
            if "_extra_state" in name or model_bridge._is_adapter_param_name(name):
                continue
            name = model_bridge._get_lora_unwrapped_name(model_bridge._unwrap_name(name))
            if registry.megatron_to_hf_lookup(name) is None:
                missing.append(name)
    return missing


def qwen35_auto_bridge_class():
    """``AutoBridge`` subclass whose model bridges carry :func:`local_spec_aliases`."""
    global _AUTO_BRIDGE
    if _AUTO_BRIDGE is None:
        from megatron.bridge import AutoBridge

        class Qwen35AutoBridge(AutoBridge):
            """AutoBridge for Qwen3.5 models built with this module's local specs.

            ``AutoBridge._model_bridge`` makes a new model bridge on every access; each one gets
            the local-spec mapping aliases (loading, exporting, conversion tasks).
            """

            @property
            def _model_bridge(self):
                return with_local_spec_mappings(super()._model_bridge)

        _AUTO_BRIDGE = Qwen35AutoBridge
    return _AUTO_BRIDGE


_AUTO_BRIDGE = None


def hf_model_type(hf_dir) -> str:
    """``model_type`` of the config.json in ``hf_dir``."""
    import json
    from pathlib import Path

    path = Path(hf_dir) / "config.json"
    return json.loads(path.read_text()).get("model_type", "") if path.is_file() else ""


def is_qwen35(hf_dir) -> bool:
    """Whether ``hf_dir`` is built with this module's local specs (Qwen3.5, and Qwen3-Next)."""
    return hf_model_type(hf_dir) in QWEN35_MODEL_TYPES


def qwen3_next_rotary_percent(hf_dir) -> float | None:
    """The rotary fraction of a ``qwen3_next`` folder (None for other model types).

    Megatron-Bridge 0.6.2's ``Qwen3NextBridge`` reads ``config.partial_rotary_factor``, which
    transformers 5.x moves into ``config.rope_parameters``; the provider then keeps
    ``rotary_percent=1.0`` and the model rotates all 16 of 16 head dims instead of 4 (logits
    differ from Hugging Face's by ~0.1 on the tiny model; weights are unaffected).
    ``Qwen35Bridge`` reads ``rope_parameters`` itself.
    """
    import json
    from pathlib import Path

    if hf_model_type(hf_dir) != "qwen3_next":
        return None
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    return float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25)))
