"""The Hugging Face on-disk key set of an architecture: what ``save_pretrained`` writes.

:func:`hf_checkpoint_keys` builds the transformers model for a config on the ``meta`` device (no
real weights are allocated) and pushes its ``state_dict()`` through the same steps that
``PreTrainedModel.save_pretrained`` (transformers 5.23, ``modeling_utils.py``) applies before
writing safetensors:

1. drop ``_keys_to_ignore_on_save``;
2. ``remove_tied_weights_from_state_dict``: of tied parameters only the source is kept, so with
   tied embeddings ``lm_head.weight`` is absent (``tie_word_embeddings`` of the top-level config
   for ConditionalGeneration, of the text config for CausalLM);
3. ``core_model_loading.revert_weight_conversion``: the reverse of the model's
   ``conversion_mapping`` entries. For a model that was *not* loaded with ``from_pretrained``
   transformers uses the registered mapping minus every ``PrefixChange``; for a loaded model it
   uses only the conversions that matched the loaded checkpoint (``model._weight_conversions``).
   What gets written therefore depends on where the model came from, which is what the two
   keyword arguments below select.

Facts per model type (transformers 5.23.0, checked by ``tests/test_hf_keys.py`` against real
``save_pretrained`` output):

* ``llama``, ``qwen3``: ``model.embed_tokens``, ``model.layers.{i}.*``, ``model.norm``,
  ``lm_head`` (absent when tied). No conversion mapping.
* ``qwen3_moe`` (conversion pattern ``qwen2_moe``): in memory ``mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` / ``mlp.experts.down_proj`` ``[E, H, I]``; a fresh model saves them **per
  expert** (``mlp.experts.{e}.gate_proj.weight`` ``[I, H]``, ``up_proj`` ``[I, H]``,
  ``down_proj`` ``[H, I]``, reverse of ``MergeModulelist`` + ``Concatenate``). A model loaded from a
  fused checkpoint re-saves fused (the converters were not used on load); the loader accepts both.
* ``qwen3_5_text`` / ``qwen3_5_moe_text`` (Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM):
  prefix ``model.`` (``model.layers.{i}.*``, ``model.embed_tokens``, ``model.norm``) plus
  ``lm_head``. Their mapping has ``PrefixChange(language_model -> model)``: a CausalLM loaded from
  a ``model.language_model.*`` checkpoint (e.g. a published ConditionalGeneration one) re-saves
  with ``model.language_model.``; ``language_model_prefix=True`` gives that set. The MoE variant
  saves experts per expert like qwen3_moe (its mapping is ``qwen3_5_text`` + ``qwen2_moe``).
* ``qwen3_5`` / ``qwen3_5_moe`` (ConditionalGeneration): ``model.language_model.*`` (text),
  ``model.visual.*`` (vision tower, whole), ``lm_head.weight`` (absent when the top-level
  ``tie_word_embeddings`` is set). Experts per expert under
  ``model.language_model.layers.{i}.mlp.experts.{e}.*`` (the text sub-model's scoped mapping).
* ``mtp.*`` is never in the set: transformers builds no MTP module (``_keys_to_ignore_on_load_
  unexpected = [r"^mtp.*"]``), so save_pretrained never writes it, whatever
  ``mtp_num_hidden_layers`` says. MTP weights (SPEC §2.3) must be checked separately.
* Non-persistent buffers (rotary ``inv_freq``) are not written.
* ``deepseek_v4``: transformers reverts its renames key by key and writes a mixture
  (``model.layers.{i}.attn.*``, ``model.embed_tokens``, ``model.hc_head.hc_fn``, the attention's
  ``kv_norm`` as ``attn.norm``, ``head.weight``); the table's ``published_renames`` turn it into
  the published names (``layers.{i}.attn.kv_norm``, ``embed.weight``, ``hc_head_fn``), which is
  what transformers' loader, Megatron-Bridge and vLLM read. The key set returned is those names.
* ``hy_v3``: in memory ``mlp.gate``, ``mlp.e_score_correction_bias``, ``mlp.shared_experts``;
  saved (its ``WeightRenaming`` s reverted) ``mlp.router.gate``, ``mlp.expert_bias``,
  ``mlp.shared_mlp``: the published names, Megatron-Bridge's and vLLM's. The key set is the saved
  one; the table's ``in_memory_renames`` give PEFT's names.
* ``kimi_k25``: 5.23's reverse conversion writes ``language_model.model.blocks.{i}`` for the
  published ``language_model.model.layers.{i}``, ``vision_tower.encoder.patch_embed`` for
  ``vision_tower.patch_embed`` and ``model.mm_projector.pre_norm`` for ``mm_projector.pre_norm``;
  the table's ``saved_name_fixes`` give the published names (applied here).

``expert_layout``:
  ``"per_expert"`` (default) -- what ``save_pretrained`` of a freshly built model writes;
  ``"fused"`` -- the tensors transformers holds in memory, none of the model's
  ``WeightConverter`` s reverted (for Qwen3(.5)-MoE ``<...>.mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` and ``.down_proj`` ``[E, H, I]``, no ``.weight`` suffix): what a model loaded
  from such a checkpoint re-saves, and the other layout transformers' loader accepts.

``"fused_transposed"`` -- the same names, each expert's matrix stored ``[in, out]``
  (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``): the published Qwen3-VL-MoE
  checkpoints. transformers' ``qwen3_vl_moe`` conversion (``Transpose(1, 2, check_dims=True)``)
  transposes on load only when the shape differs from the parameter's (so not when
  ``hidden_size == 2 * moe_intermediate_size``), and its reverse on save is then a no-op:
  ``save_pretrained`` writes the in-memory ``[E, 2I, H]``.

``prefix_change=True`` keeps the mapping's ``PrefixChange`` entries: what a model loaded from
a checkpoint that carried the prefix re-saves (Qwen3.5 CausalLM: ``model.language_model.``).

The transformers class comes from the architecture's mapping table (``model_classes``).
"""

from __future__ import annotations

import copy

import torch

from bridge_ext.errors import TableError
from bridge_ext.table import EXPERT_LAYOUTS, ExpertLayout
from bridge_ext.tables import known_model_types, register_transformers_configs, table_for


def model_class_for(config):
    """The transformers model class whose checkpoint names ``config``'s table produces: the
    table's ``model_classes`` entry, else ``config.architectures[0]``, else the causal-LM
    auto class. A class transformers lacks (remote code) is the one registered with the causal-LM
    auto class for the config (a table's ``register_hf_config`` registers it), if its name agrees."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    name = None
    if config.model_type in known_model_types():
        name = table_for(config).model_classes.get(config.model_type)
    if name is None and getattr(config, "architectures", None):
        name = config.architectures[0]
    if name is None:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if hasattr(transformers, name):
        return getattr(transformers, name)
    registered = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)] if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else None
    if registered is None or registered.__name__ != name:
        raise TableError(f"transformers has no class {name} and none of that name is registered for "
                         f"{type(config).__name__}: no key set to compare with")
    return registered


def build_meta_model(config, model_class=None):
    """Instantiate the model for ``config`` on the meta device (no weight memory)."""
    register_transformers_configs(config.model_type)  # e.g. Kimi-K2's checkpoint conversion (fused experts in memory)
    cls = model_class or model_class_for(config)
    config = copy.deepcopy(config)
    with torch.device("meta"):
        model = cls(config)
    return model.eval()


def _save_conversions(model, *, fused: bool, prefix_change: bool) -> list:
    """The conversions ``save_pretrained`` reverts, as for a model loaded from a checkpoint in
    the chosen layout (``model._weight_conversions`` holds what matched on load)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter

    conversions = get_model_conversion_mapping(model, add_legacy=False)
    if prefix_change and not any(isinstance(each, PrefixChange) for each in conversions):
        raise ValueError(f"{type(model).__name__} has no PrefixChange in its conversion mapping")
    return [each for each in conversions
            if not (fused and _is_expert_converter(each, WeightConverter))
            and (prefix_change or not isinstance(each, PrefixChange))]


def _is_expert_converter(conversion, converter_class) -> bool:
    """A ``WeightConverter`` of routed experts (the fused layout keeps its tensors as held in
    memory); others, such as Kimi-K2.5's vision ``wqkv`` split, stay reverted in every layout."""
    patterns = [*conversion.source_patterns, *conversion.target_patterns] if isinstance(conversion, converter_class) else []
    return any("experts" in pattern for pattern in patterns)


def hf_checkpoint_keys(
    config,
    *,
    expert_layout: ExpertLayout = "per_expert",
    prefix_change: bool = False,
    model_class=None,
) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the safetensors ``save_pretrained`` writes for ``config``'s architecture.

    Computed on the meta device with transformers' own save-time functions
    (``remove_tied_weights_from_state_dict``, ``revert_weight_conversion``); see the module
    docstring for what is covered. ``expert_layout`` selects per-expert (default, a fresh model's
    save) or fused (in-memory) expert tensors; ``prefix_change=True`` gives the names a model
    loaded from a checkpoint that carried its mapping's ``PrefixChange`` prefix re-saves.
    Tensors transformers builds no module for (MTP layers) are never included.
    """
    from transformers.core_model_loading import revert_weight_conversion

    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")

    model = build_meta_model(config, model_class)
    state_dict = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state_dict.pop(key, None)
    state_dict = _without_tied_weights(state_dict, model)
    model._weight_conversions = _save_conversions(model, fused=expert_layout != "per_expert", prefix_change=prefix_change)
    state_dict = revert_weight_conversion(model, state_dict)
    published = _published_name(config)
    keys = _fixed({published(name): tuple(t.shape) for name, t in state_dict.items()}, config)
    if expert_layout == "fused_transposed":
        keys = {name: (*shape[:-2], shape[-1], shape[-2]) if _is_fused_expert(config, name, shape) else shape
                for name, shape in keys.items()}
    return dict(sorted(keys.items()))


def _published_name(config):
    """The table's renames to the published names (identity for tables without them)."""
    from bridge_ext.tables import known_model_types, table_for

    if config.model_type not in known_model_types():
        return lambda name: name
    return table_for(config).published_name


def _fixed(keys: dict[str, tuple[int, ...]], config) -> dict[str, tuple[int, ...]]:
    """The table's ``saved_name_fixes``: names transformers' save gets wrong, as published."""
    import re

    from bridge_ext.tables import known_model_types, table_for

    if config.model_type not in known_model_types():
        return keys
    for pattern, replacement in table_for(config).saved_name_fixes:
        keys = {re.sub(pattern, replacement, name): shape for name, shape in keys.items()}
    return keys


def _without_tied_weights(state_dict: dict, model) -> dict:
    """``remove_tied_weights_from_state_dict`` on the parameters, persistent buffers kept as
    they are (only parameters are tied). transformers before 5.14 looks meta tensors up with
    ``get_parameter``, which refuses a buffer (DeepSeek-V3's ``e_score_correction_bias``)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    kept = remove_tied_weights_from_state_dict(
        {name: tensor for name, tensor in state_dict.items() if name in parameters}, model)
    return {name: tensor for name, tensor in state_dict.items() if name in kept or name not in parameters}


def _is_fused_expert(config, name: str, shape: tuple[int, ...]) -> bool:
    """A 3-D ``[E, out, in]`` parameter of one of the table's expert families."""
    parameters = {p for family in table_for(config).expert_families for p in family.parameters}
    return len(shape) == 3 and name.rsplit(".", 1)[-1] in parameters
