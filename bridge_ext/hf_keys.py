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

``expert_layout``:
  ``"per_expert"`` (default) -- what ``save_pretrained`` of a freshly built model writes;
  ``"fused"`` -- ``<...>.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``.down_proj``
  ``[E, H, I]`` (no ``.weight`` suffix): what a model loaded from a fused checkpoint re-saves, and
  the other layout transformers' loader accepts;
  ``"fused_transposed"`` -- the same names, each expert's matrix stored ``[in, out]``
  (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``): the published Qwen3-VL-MoE checkpoints.
  transformers' qwen3_vl_moe conversion transposes them on load (``Transpose(1, 2,
  check_dims=True)``: only when the shape differs from the parameter's, so a model with
  ``hidden_size == 2 * moe_intermediate_size`` would load them untransposed); its reverse on
  save is then a no-op, so ``save_pretrained`` writes ``"fused"``.
"""

from __future__ import annotations

import copy
import re
from typing import Literal

import torch

ExpertLayout = Literal["per_expert", "fused", "fused_transposed"]

#: model_type -> the transformers class whose checkpoint names are meant.
MODEL_CLASSES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}

#: text-only model types whose conversion mapping carries PrefixChange(language_model -> model).
LANGUAGE_MODEL_PREFIX_TYPES = ("qwen3_5_text", "qwen3_5_moe_text")

_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<mod>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def model_class_for(config):
    """The transformers model class for ``config`` (see :data:`MODEL_CLASSES`; otherwise
    ``config.architectures[0]``, otherwise the AutoModelForCausalLM class)."""
    import transformers

    name = MODEL_CLASSES.get(config.model_type)
    if name is None and getattr(config, "architectures", None):
        name = config.architectures[0]
    if name is not None:
        return getattr(transformers, name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def build_meta_model(config, model_class=None):
    """Instantiate the model for ``config`` on the meta device (no weight memory)."""
    cls = model_class or model_class_for(config)
    config = copy.deepcopy(config)
    with torch.device("meta"):
        model = cls(config)
    return model.eval()


def _fuse_experts(keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    groups: dict[str, dict[str, dict[int, tuple[int, ...]]]] = {}
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in keys.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = shape
            continue
        groups.setdefault(m["mod"], {}).setdefault(m["proj"], {})[int(m["e"])] = shape
    for mod, projs in groups.items():
        if set(projs) != {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(f"{mod}: expected gate_proj/up_proj/down_proj per expert, found {sorted(projs)}")
        experts = sorted(projs["gate_proj"])
        if any(sorted(p) != experts for p in projs.values()) or experts != list(range(len(experts))):
            raise ValueError(f"{mod}: expert indices differ between projections or are not 0..E-1")
        (inter, hidden), = {projs["gate_proj"][e] for e in experts}
        if {projs["up_proj"][e] for e in experts} != {(inter, hidden)} or {
            projs["down_proj"][e] for e in experts
        } != {(hidden, inter)}:
            raise ValueError(f"{mod}: inconsistent per-expert shapes")
        out[f"{mod}.gate_up_proj"] = (len(experts), 2 * inter, hidden)
        out[f"{mod}.down_proj"] = (len(experts), hidden, inter)
    return out


def hf_checkpoint_keys(
    config,
    *,
    expert_layout: ExpertLayout = "per_expert",
    language_model_prefix: bool = False,
    model_class=None,
) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the safetensors ``save_pretrained`` writes for ``config``'s architecture.

    Computed on the meta device with transformers' own save-time functions
    (``remove_tied_weights_from_state_dict``, ``revert_weight_conversion``); see the module
    docstring for what is covered. ``expert_layout`` selects per-expert (default, a fresh model's
    save) or fused 3-D expert names for MoE types; ``language_model_prefix=True`` (only
    qwen3_5_text / qwen3_5_moe_text) gives the ``model.language_model.`` names a CausalLM loaded
    from such a checkpoint re-saves. ``mtp.*`` names are never included.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if expert_layout not in ("per_expert", "fused", "fused_transposed"):
        raise ValueError(f"expert_layout must be 'per_expert', 'fused' or 'fused_transposed', got {expert_layout!r}")
    if language_model_prefix and config.model_type not in LANGUAGE_MODEL_PREFIX_TYPES:
        raise ValueError(
            f"language_model_prefix applies to {LANGUAGE_MODEL_PREFIX_TYPES} only, not {config.model_type!r}"
        )

    model = build_meta_model(config, model_class)
    state_dict = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state_dict.pop(key, None)
    state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    state_dict = revert_weight_conversion(model, state_dict)
    keys = {name: tuple(t.shape) for name, t in state_dict.items()}

    if expert_layout != "per_expert":
        keys = _fuse_experts(keys)
    if expert_layout == "fused_transposed":
        keys = {name: (*shape[:-2], shape[-1], shape[-2]) if _FUSED.search(name) else shape for name, shape in keys.items()}
    if language_model_prefix:
        keys = {
            (f"model.language_model.{k[len('model.'):]}" if k.startswith("model.") else k): v
            for k, v in keys.items()
        }
    return dict(sorted(keys.items()))
