"""Local (no Transformer Engine) versions of the layer specs Megatron-Bridge's providers name.

Supports the CPU builds of the architectures whose tables are generated; the exporter does not
use it. Several providers (Gemma 2, EXAONE 4, OLMoE, ...) hand megatron-core a layer spec of
their own, written with Transformer Engine modules. :func:`localize` rewrites such a spec with
megatron-core's local modules, module for module, keeping the provider's own classes
(attention variants, embeddings) and parameter names:

* ``TELayerNormColumnParallelLinear`` -> a separate norm (the layer's ``input_layernorm`` /
  ``pre_mlp_layernorm``) and ``ColumnParallelLinear``;
* ``TEColumnParallelLinear`` / ``TERowParallelLinear`` -> ``ColumnParallelLinear`` /
  ``RowParallelLinear``; ``TERowParallelLinearLayerNorm`` -> :class:`RowParallelLinearLayerNorm`;
* ``TENorm`` and megatron's torch norms -> :class:`CpuNorm` (zero-centred gamma supported);
* ``TEDotProductAttention`` -> ``DotProductAttention``; Gemma 2's FlexAttention (a Triton
  kernel) -> its unfused parent ``Gemma2DotProductAttention``, the path it falls back to itself;
  Gemma 3's ``Gemma3TEDotProductAttention`` -> :func:`gemma3_dot_product_attention` (Gemma 3 VL's
  attention bias applied as a mask);
* module-level Transformer Engine names of the vision-language models' own modules
  (:data:`MODULE_TE_NAMES`, e.g. Gemma 3 VL's projector norm) -> their local versions, inside
  :func:`local_modules`;
* a self-attention without q/k norm modules in a ``qk_layernorm`` config gets :class:`CpuNorm`
  ones (Transformer Engine's attention builds ``TENorm`` there itself);
* a provider spec that extends Transformer Engine's default spec (OLMoE's, MiMo-V2-Flash's,
  Ministral-3's) starts from the local block spec instead, with the provider's own modules swapped
  in (:data:`SPEC_EXTENSIONS`).

A Transformer Engine class it has no local version of raises, naming it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """LayerNorm ``y = norm(x) * (1 + weight) + bias`` (Nemotron's LayerNorm1p), fp32 inside."""

    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype):
        super().__init__(hidden_size, eps=eps, dtype=params_dtype)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float() + 1,
                                              self.bias.float(), self.eps).to(x.dtype)


class CpuNorm:
    """Norm builder: RMSNorm with or without zero-centred gamma (``qwen35.ZeroCenteredRMSNorm``),
    LayerNorm with zero-centred gamma (:class:`ZeroCenteredLayerNorm`), else megatron's torch norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        from bridge_ext_testing.qwen35 import LocalNorm

        if getattr(config, "normalization", "RMSNorm") == "LayerNorm" and config.layernorm_zero_centered_gamma:
            return ZeroCenteredLayerNorm(hidden_size, eps, config.params_dtype)
        return LocalNorm(config, hidden_size, eps)


@functools.cache
def row_parallel_linear_layer_norm():
    """``RowParallelLinear`` followed by a norm of its output (Megatron-Bridge's
    ``TERowParallelLinearLayerNorm``, same ``post_layernorm`` parameter names). Registered with
    Megatron-Bridge's ``AutoMapping`` as row-parallel, as the Gemma 2 / 3 and EXAONE bridges
    register Transformer Engine's class (its name would otherwise read as a norm: replicated)."""
    from megatron.bridge.models.conversion.param_mapping import AutoMapping
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    class RowParallelLinearLayerNorm(RowParallelLinear):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = CpuNorm(config, output_size, config.layernorm_epsilon)

        def forward(self, x):
            output, bias = super().forward(x)
            if bias is not None:
                raise ValueError("RowParallelLinearLayerNorm assumes add_bias_linear=False")
            return self.post_layernorm(output), bias

    AutoMapping.register_module_type(RowParallelLinearLayerNorm.__name__, "row")
    return RowParallelLinearLayerNorm


@functools.cache
def _te_names() -> dict[int, str]:
    """Transformer Engine's classes by identity: without Transformer Engine installed they are
    nameless placeholders (megatron's and Megatron-Bridge's import guards), told apart this way."""
    import importlib

    found: dict[int, set[str]] = {}
    for module_name in ("megatron.core.extensions.transformer_engine", "megatron.bridge.models.common.te_layers",
                        "megatron.bridge.models.gemma.gemma3_provider"):
        for name, value in vars(importlib.import_module(module_name)).items():
            if "TE" in name and value is not None:
                found.setdefault(id(value), set()).add(name)
    return {key: names.pop() for key, names in found.items() if len(names) == 1}  # shared placeholders: unknown


@functools.cache
def gemma3_dot_product_attention():
    """megatron-core's local ``DotProductAttention`` with Megatron-Bridge's
    ``Gemma3TEDotProductAttention`` window choice: sliding (``window_size - 1``, 0) on the
    provider's local layers, full on the global ones (text models only)."""
    import copy

    from megatron.bridge.models.gemma.gemma3_provider import _is_local_attn_layer
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class Gemma3DotProductAttention(DotProductAttention):
        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, **kwargs):
            config = copy.deepcopy(config)
            local = _is_local_attn_layer(layer_number, config.interleaved_attn_pattern)
            # vision-language: Gemma3VLModel passes the window and image blocks as a bias instead
            config.window_size = (config.window_size - 1, 0) if local and not config.is_vision_language else None
            super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                             attention_type=attention_type, **kwargs)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, **kwargs):
            if attention_bias is not None:  # Gemma3VLModel's additive bias: 0 allowed, dtype min masked
                attention_mask = (attention_bias < 0).expand(query.shape[1], 1, -1, -1)
            return super().forward(query, key, value, attention_mask, attn_mask_type, None, **kwargs)

    return Gemma3DotProductAttention


@functools.cache
def mimo_v2_flash_dot_product_attention():
    """megatron-core's local ``DotProductAttention`` doing what Megatron-Bridge's
    ``MiMoV2FlashTEDotProductAttention`` asks of Transformer Engine: on the provider's sliding
    layers a window of (``window_size - 1``, 0) and a learnable softmax offset (attention sink),
    on full layers neither; values times ``attention_value_scale``; value heads of
    ``v_head_dim`` (the local module assumes ``kv_channels``). Registered with Megatron-Bridge's
    ``AutoMapping`` as column-parallel, as Megatron-Bridge registers its own class."""
    import copy

    from megatron.bridge.models.conversion.param_mapping import AutoMapping
    from megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash import _is_local_attn_layer
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MiMoV2FlashDotProductAttention(DotProductAttention):
        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, **kwargs):
            config = copy.deepcopy(config)
            local = _is_local_attn_layer(layer_number, config.hybrid_attention_pattern)
            config.window_size = (config.window_size - 1, 0) if local else None
            config.softmax_type = "learnable" if local else "vanilla"
            super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                             attention_type=attention_type, **kwargs)
            self.value_scale = config.attention_value_scale
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * config.v_head_dim

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
            if self.value_scale is not None:
                value = value * self.value_scale
            return super().forward(query, key, value, attention_mask, attn_mask_type, **kwargs)

    AutoMapping.register_module_type(MiMoV2FlashDotProductAttention.__name__, "column")
    return MiMoV2FlashDotProductAttention


@functools.cache
def ministral_dot_product_attention():
    """megatron-core's local ``DotProductAttention`` with Megatron-Bridge's
    ``MinistralTEDotProductAttention`` query scaling (Llama 4's, by position)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MinistralDotProductAttention(DotProductAttention):
        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, **kwargs):
            super().__init__(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                             attention_type=attention_type, **kwargs)
            rope = config.hf_config.text_config.rope_parameters if config.hf_config is not None else None
            self.beta = rope["llama_4_scaling_beta"] if rope else 0
            self.max_position_embeddings = rope["original_max_position_embeddings"] if rope else config.seq_length

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
            positions = torch.arange(query.shape[0], device=query.device)  # query [s, b, heads, dim]
            scale = 1 + self.beta * torch.log(1 + torch.floor(positions / self.max_position_embeddings))
            query = query * scale.view(-1, *[1] * (query.dim() - 1)).to(query.dtype)
            return super().forward(query, key, value, attention_mask, attn_mask_type, **kwargs)

    return MinistralDotProductAttention


def _local_by_name(name: str):
    """The local class standing for Transformer Engine's class ``name`` (None: no such)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return {
        "TEColumnParallelLinear": ColumnParallelLinear,
        "TELayerNormColumnParallelLinear": ColumnParallelLinear,
        "TERowParallelLinear": RowParallelLinear,
        "TERowParallelLinearLayerNorm": row_parallel_linear_layer_norm(),
        "TEDotProductAttention": DotProductAttention,
        "TENorm": CpuNorm,
    }.get(name)


def _local(module, where: str):
    """The local class for a module class of a spec (itself when it is not Transformer Engine's)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    name = _te_names().get(id(module)) or getattr(module, "__name__", "")
    if name == "Gemma2FlexDotProductAttention":
        return module.__mro__[1]
    if name == "Gemma3TEDotProductAttention":
        return gemma3_dot_product_attention()
    local = _local_by_name(name)
    if local is not None:
        return local
    if module is WrappedTorchNorm:
        return CpuNorm
    if "TE" in name or getattr(module, "__module__", "").startswith("megatron.core.extensions"):
        raise NotImplementedError(f"{where}: no local version of Transformer Engine's {name} for a CPU build")
    return module


#: Modules of Megatron-Bridge's vision-language models that build Transformer Engine classes by
#: module-level name (read in Megatron-Bridge 0.6.2's source): module -> those names.
MODULE_TE_NAMES = {
    "megatron.bridge.models.gemma_vl.modeling_gemma3_vl": ("TENorm",),
    "megatron.bridge.models.falcon_h1.modeling_falconh1.falconh1_block": ("TENorm",),  # its final norm
    # Exaone45Model: its vision patch merger (patch_norm, linear_fc1, linear_fc2)
    "megatron.bridge.models.exaone.exaone45.modelling_exaone45.model": (
        "TENorm", "TEColumnParallelLinear", "TERowParallelLinear"),
}
#: Modules that build their vision tower from megatron-core's Transformer Engine ViT layer spec by
#: module-level name (``get_vit_layer_with_transformer_engine_spec``): :func:`vit_layer_spec` stands for it.
MODULE_VIT_SPECS = ("megatron.bridge.models.exaone.exaone45.modelling_exaone45.model",)


def vit_layer_spec():
    """megatron-core's local ViT layer spec (``get_vit_layer_with_local_spec``) standing for its
    Transformer Engine one (``get_vit_layer_with_transformer_engine_spec``), with :class:`CpuNorm`
    norms (the config's RMSNorm / LayerNorm) and a core attention that keeps to packed
    (``thd``) segments, as Transformer Engine's does for the towers' window attention.

    The two specs build the same parameters (read in megatron-core 0.19.2's vit_layer_specs.py:
    same SelfAttention / MLP classes and linear sizes) except the two pre-norms: Transformer
    Engine's fused ``TELayerNormColumnParallelLinear`` keeps them inside the next linear
    (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``, with
    ``input_layernorm`` / ``pre_mlp_layernorm`` IdentityOps), the local spec as modules of their own
    (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``; ``.bias`` with LayerNorm). Same
    values, same shapes ``[hidden]``; Megatron-Bridge's mapping registry maps both spellings to the
    same Hugging Face name (``MegatronMappingRegistry._SEPARATE_LAYERNORM_REWRITES``), so a generated
    table carries a rule for each: the CPU build proves the local one, the Transformer Engine one
    is the same replicated copy under the fused name."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    from bridge_ext_testing.qwen35 import _packed_attention_class

    spec = get_vit_layer_with_local_spec()
    spec.submodules.input_layernorm = CpuNorm
    spec.submodules.pre_mlp_layernorm = CpuNorm
    spec.submodules.self_attention.submodules.core_attention = _packed_attention_class()
    return spec


def local_modules():
    """Scope for ``provide*``: :data:`MODULE_TE_NAMES` replaced by their local versions, the ViT
    spec function of :data:`MODULE_VIT_SPECS` by :func:`vit_layer_spec`."""
    from contextlib import ExitStack

    from bridge_ext_testing.qwen35 import _replaced

    stack = ExitStack()
    for module_name, names in MODULE_TE_NAMES.items():
        stack.enter_context(_replaced(module_name, **{name: _local_by_name(name) for name in names}))
    for module_name in MODULE_VIT_SPECS:
        stack.enter_context(_replaced(module_name, get_vit_layer_with_transformer_engine_spec=vit_layer_spec))
    return stack


def localize(spec, config, where: str = "layer"):
    """``spec`` (a layer ``ModuleSpec``, a block's submodules, or a class) with local modules."""
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        fused = _fused_norm_slots(spec)
        submodules = localize(spec.submodules, config, where) if spec.submodules is not None else None
        if fused:
            submodules = dataclasses.replace(submodules, **{norm: CpuNorm for norm in fused})
        return dataclasses.replace(spec, module=_local(spec.module, where), submodules=submodules)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {field.name: localize(getattr(spec, field.name), config, f"{where}.{field.name}")
                   for field in dataclasses.fields(spec)}
        if isinstance(spec, SelfAttentionSubmodules) and config.qk_layernorm:
            changes.update({norm: CpuNorm for norm in ("q_layernorm", "k_layernorm") if changes[norm] is None})
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, list):
        return [localize(each, config, f"{where}[{index}]") for index, each in enumerate(spec)]
    if isinstance(spec, type) or id(spec) in _te_names():
        return _local(spec, where)
    return spec


def _fused_norm_slots(layer) -> list[str]:
    """The norm slots (``input_layernorm`` / ``pre_mlp_layernorm``) of a transformer layer spec
    whose next linear is Transformer Engine's fused norm + linear: the local layer needs the norm
    as its own module there."""
    submodules = layer.submodules
    if not (dataclasses.is_dataclass(submodules) and hasattr(submodules, "pre_mlp_layernorm")):
        return []
    slots = []
    for norm, block, linear in (("input_layernorm", "self_attention", "linear_qkv"),
                                ("pre_mlp_layernorm", "mlp", "linear_fc1")):
        inner = getattr(getattr(getattr(submodules, block, None), "submodules", None), linear, None)
        if (_te_names().get(id(inner)) or getattr(inner, "__name__", "")) == "TELayerNormColumnParallelLinear":
            slots.append(norm)
    return slots


def configure_provider(provider, original_spec) -> None:
    """After :func:`bridge_ext_testing.gpt_families.configure_provider`: the provider's own layer spec
    (``original_spec``, where it has one) made local, else megatron-core's local block spec with
    :class:`CpuNorm` norms; the attention modules are the spec's (local), whatever the backend."""
    import inspect

    from megatron.core.transformer.enums import AttnBackend

    from bridge_ext_testing.gpt_families import local_block_spec

    extension = _spec_extension(original_spec)
    if extension is not None:
        def spec(config, vp_stage=None, pp_rank=None):
            block = local_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
            for layer in block.layer_specs:
                attention = layer.submodules.self_attention
                attention.module = extension[0]
                if extension[1] is not None:
                    attention.submodules.core_attention = extension[1]
            return localize(block, config)
    elif _is_family_spec(original_spec):
        takes_stage = "vp_stage" in inspect.signature(original_spec).parameters

        def spec(config, vp_stage=None):
            built = localize(original_spec(config, vp_stage=vp_stage) if takes_stage else original_spec(config), config)
            return _as_block(built, config)
    else:
        def spec(config, vp_stage=None, pp_rank=None):
            return localize(local_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank), config)
    provider.transformer_layer_spec = spec
    if hasattr(provider, "falconh1_stack_spec"):  # Falcon-H1 builds its own stack, not a layer spec
        provider.falconh1_stack_spec = falcon_h1_stack_spec(provider)
    # auto, as the other CPU builds: megatron keeps the backend choice in process-wide NVTE_* variables
    provider.attention_backend = AttnBackend.auto



def _as_block(spec, config):
    """A layer spec as a block spec whose final norm is :class:`CpuNorm` (megatron-core gives a
    bare layer spec Transformer Engine's norm, else torch's, which has no zero-centred gamma).
    One pipeline stage: every layer."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if not isinstance(spec, ModuleSpec):
        return spec
    if config.pipeline_model_parallel_size != 1:
        raise NotImplementedError("a provider's own layer spec is built locally for one pipeline stage only")
    return TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers, layer_norm=CpuNorm)


#: Modules of the generic providers' spec functions (GPT, MLA): gpt_families' local block spec
#: stands for them.
GENERIC_SPEC_MODULES = ("megatron.bridge.models.gpt_provider", "megatron.bridge.models.mla_provider")
#: Family spec functions that only call megatron-core's Transformer Engine decoder block spec
#: (read in Megatron-Bridge 0.6.2's source): the local block spec stands for them too.
GENERIC_SPEC_FUNCTIONS = ("megatron.bridge.models.ernie.ernie_45_bridge._ernie45_decoder_block_spec",)

#: Provider spec functions that are Transformer Engine's default spec with its attention modules
#: swapped (read in Megatron-Bridge 0.6.2's source): function path -> the self-attention class
#: they use and the local stand-in of their core attention (None: the default spec's). Without
#: Transformer Engine, MiMo-V2-Flash's ``MiMoV2FlashTEDotProductAttention`` subclasses a placeholder
#: that no spec rewrite can recognise, so its stand-in is named here.
SPEC_EXTENSIONS = {
    "megatron.bridge.models.olmoe.olmoe_provider.olmoe_layer_spec":
        ("megatron.bridge.models.olmoe.olmoe_provider.OLMoESelfAttention", None),
    "megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.mimo_v2_flash_layer_spec":
        ("megatron.bridge.models.mimo_v2_flash.modeling_mimo_v2_flash.MiMoV2FlashSelfAttention",
         mimo_v2_flash_dot_product_attention),
    # its MinistralTEDotProductAttention subclasses a placeholder too: the local stand-in
    "megatron.bridge.models.ministral3.ministral3_provider.ministral_layer_spec":
        ("megatron.core.transformer.attention.SelfAttention", ministral_dot_product_attention),
}


def _is_family_spec(original_spec) -> bool:
    """A spec function of one model family's provider (not megatron-core's or the generic providers')."""
    function = getattr(original_spec, "func", original_spec)
    module = getattr(function, "__module__", "") or ""
    return (callable(original_spec) and module.startswith("megatron.bridge.models.")
            and module not in GENERIC_SPEC_MODULES
            and f"{module}.{getattr(function, '__qualname__', '')}" not in GENERIC_SPEC_FUNCTIONS)


def _spec_extension(original_spec):
    import importlib

    paths = SPEC_EXTENSIONS.get(f"{getattr(original_spec, '__module__', '')}.{getattr(original_spec, '__name__', '')}")
    if paths is None:
        return None

    def load(path):
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    attention, core = paths
    return load(attention), core() if core is not None else None


@functools.cache
def layer_norm_column_parallel_linear():
    """``ColumnParallelLinear`` after an RMSNorm of its input whose weight it holds as
    ``layer_norm_weight`` (Transformer Engine's ``TELayerNormColumnParallelLinear`` names), for a
    layer with no norm slot of its own before that linear (Falcon-H1's MLP)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            if config.normalization != "RMSNorm":
                raise NotImplementedError("LayerNormColumnParallelLinear: RMSNorm only")
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            self.layer_norm_eps = config.layernorm_epsilon

        def forward(self, x, *args, **kwargs):
            normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), self.layer_norm_weight.float(),
                                                  self.layer_norm_eps)
            return super().forward(normed.to(x.dtype), *args, **kwargs)

    return LayerNormColumnParallelLinear


def falcon_h1_stack_spec(config):
    """Megatron-Bridge's Falcon-H1 stack spec made local; its MLP's fused norm + linear keeps the
    norm inside the linear (``mlp.linear_fc1.layer_norm_weight``: FalconH1Layer has no pre-MLP
    norm slot)."""
    from megatron.bridge.models.falcon_h1.modeling_falconh1.falconh1_layer_specs import falconh1_stack_spec

    spec = localize(falconh1_stack_spec, config, "falconh1_stack")
    fused = layer_norm_column_parallel_linear()
    for layer in ("falconh1_layer", "mlp_layer"):
        mlp = getattr(spec.submodules, layer).submodules.mlp
        mlp.submodules = dataclasses.replace(mlp.submodules, linear_fc1=fused)
    return spec
