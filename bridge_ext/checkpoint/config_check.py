"""The Hugging Face config a checkpoint is converted with: read it safely, and check it is the model trained.

Two jobs, both before anything is written:

* :func:`load_hf_config` reads ``config.json`` (size-capped, parsed by us first) and refuses
  sizes the tables and :mod:`bridge_ext.dims` divide by or loop over (zero heads, a negative
  vocabulary, ``"abc"`` as a width, a billion layers), naming the file and the field.
* :func:`check_config_matches_run_config` compares that config with the model ``run_config.yaml``
  records, field by field, through Megatron-Bridge's own field mapping (``CONFIG_MAPPING``, the
  one its ``provider_bridge`` builds training models with). Any field that changes the
  arithmetic and differs is named with both values. Shapes alone cannot see all of them: 8 heads
  of 8 and 4 heads of 16 have the same q/k/v widths, and split them differently.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge_ext.checkpoint.control_files import SMALL_JSON_LIMIT, read_json_file
from bridge_ext.checkpoint.run_config import RunConfig
from bridge_ext.dims import text_config
from bridge_ext.errors import CompatibilityError, ConvertError, first_line

# Upper bounds far above any published model, low enough that loops over them end.
MAX_LAYERS = 10_000
MAX_EXPERTS = 65_536
MAX_WIDTH = 1 << 20
MAX_VOCAB = 1 << 26

# Integer fields of a (text or vision) config the tables and dims use: name -> (least value, bound).
_INTEGER_FIELDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, MAX_WIDTH), "intermediate_size": (1, MAX_WIDTH), "head_dim": (1, MAX_WIDTH),
    "num_attention_heads": (1, MAX_WIDTH), "num_key_value_heads": (1, MAX_WIDTH), "num_heads": (1, MAX_WIDTH),
    "vocab_size": (1, MAX_VOCAB), "num_hidden_layers": (1, MAX_LAYERS), "depth": (1, MAX_LAYERS),
    "mtp_num_hidden_layers": (0, MAX_LAYERS), "num_nextn_predict_layers": (0, MAX_LAYERS),
    "num_experts": (0, MAX_EXPERTS), "num_local_experts": (0, MAX_EXPERTS), "n_routed_experts": (0, MAX_EXPERTS),
    "num_experts_per_tok": (0, MAX_EXPERTS), "moe_intermediate_size": (1, MAX_WIDTH),
    "shared_expert_intermediate_size": (0, MAX_WIDTH), "linear_num_key_heads": (1, MAX_WIDTH),
    "linear_num_value_heads": (1, MAX_WIDTH), "linear_key_head_dim": (1, MAX_WIDTH),
    "linear_value_head_dim": (1, MAX_WIDTH), "linear_conv_kernel_dim": (1, MAX_WIDTH),
    "out_hidden_size": (1, MAX_WIDTH), "patch_size": (1, MAX_WIDTH), "spatial_merge_size": (1, MAX_WIDTH),
    "temporal_patch_size": (1, MAX_WIDTH), "in_channels": (1, MAX_WIDTH),
}  # fmt: skip
_POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
_NESTED = ("text_config", "vision_config")


class ConfigFieldError(ConvertError):
    """A Hugging Face config holds a value no model can have (the message names file and field)."""


class ConfigMismatchError(ConvertError):
    """The Hugging Face config and the checkpoint's run_config.yaml describe different models."""


# ---------------------------------------------------------------------------- reading config.json
def load_hf_config(folder_or_file: Path):
    """``(config, folder)`` for a config.json or its folder, its sizes checked before transformers sees it."""
    from transformers import CONFIG_MAPPING, AutoConfig

    from model_mappings import register_transformers_configs

    register_transformers_configs()
    path = folder_or_file.parent if folder_or_file.name == "config.json" else folder_or_file
    file = path / "config.json"
    if not file.exists():
        raise ConvertError(f"{folder_or_file}: no config.json there")
    settings = read_json_file(file, SMALL_JSON_LIMIT, lambda message, _: ConfigFieldError(message))
    if not isinstance(settings, dict):
        raise ConfigFieldError(f"{file}: expected a JSON object, found {type(settings).__name__}")
    check_config_fields(settings, file)
    model_type = settings.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        raise ConvertError(f"{file}: unknown architecture: transformers has no model type {_shown(model_type)}")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as error:  # noqa: BLE001 - a third-party parser of an untrusted file: any failure is the file's
        cause = error
        while cause.__cause__ is not None:  # a validation wrapper's first line only names the validator
            cause = cause.__cause__
        raise ConvertError(
            f"{file}: transformers cannot read it: {type(cause).__name__}: {first_line(cause)}") from error
    check_config_fields(config, file)
    return config, path


def check_config_fields(config: Any, where: Path | str) -> None:
    """Refuse sizes that are not integers in range, epsilons that are not positive, heads that do not divide.

    ``config`` is a transformers config or the dict of a config.json (nested text and vision
    configs are checked too).
    """
    for prefix, part in _parts(config):
        for name, (least, bound) in _INTEGER_FIELDS.items():
            value = _get(part, name)
            if value is None:
                continue
            if type(value) is not int or not least <= value <= bound:
                raise ConfigFieldError(
                    f"{where}: {prefix}{name} is {_shown(value)}; it must be an integer from {least} to {bound}")
        for name in _POSITIVE_FLOATS:
            value = _get(part, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigFieldError(f"{where}: {prefix}{name} is {_shown(value)}; it must be a positive number")
        fraction = _get(part, "partial_rotary_factor")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise ConfigFieldError(f"{where}: {prefix}partial_rotary_factor is {_shown(fraction)}; it must be in (0, 1]")
        _check_divides(part, prefix, where, "num_attention_heads", "num_key_value_heads")
        _check_divides(part, prefix, where, "linear_num_value_heads", "linear_num_key_heads")
        if _get(part, "head_dim") is None:
            _check_divides(part, prefix, where, "hidden_size", "num_attention_heads")
        if _get(part, "num_heads") is not None:
            _check_divides(part, prefix, where, "hidden_size", "num_heads")


def _parts(config: Any) -> list[tuple[str, Any]]:
    """The config, its nested text and vision configs, and their ``rope_parameters`` (transformers v5)."""
    parts = [("", config)]
    for name in _NESTED:
        nested = _get(config, name)
        if nested is not None:
            parts.append((f"{name}.", nested))
    for prefix, part in list(parts):
        rope = _get(part, "rope_parameters")
        if isinstance(rope, Mapping):
            parts.append((f"{prefix}rope_parameters.", rope))
    return parts


def _get(part: Any, name: str) -> Any:
    return part.get(name) if isinstance(part, Mapping) else getattr(part, name, None)


def _check_divides(part: Any, prefix: str, where: Path | str, total: str, divisor: str) -> None:
    whole, parts = _get(part, total), _get(part, divisor)
    if type(whole) is int and type(parts) is int and parts > 0 and whole % parts:
        raise ConfigFieldError(f"{where}: {prefix}{total} ({whole}) is not a multiple of {prefix}{divisor} ({parts})")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- the cross-check
# Megatron fields that change what the model computes, by family (for the message and the tests).
# Initialisation, dropout, parallelism, precision and sequence length are left out on purpose.
ARITHMETIC_FIELDS: dict[str, tuple[str, ...]] = {
    "layers and widths": ("num_layers", "hidden_size", "ffn_hidden_size", "add_bias_linear"),
    "attention": ("num_attention_heads", "num_query_groups", "kv_channels", "qk_layernorm", "add_qkv_bias",
                  "attention_output_gate", "softmax_scale", "experimental_attention_variant"),
    "mixture of experts": ("num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
                           "moe_shared_expert_intermediate_size", "moe_router_score_function",
                           "moe_router_pre_softmax", "moe_router_topk_scaling_factor", "moe_router_num_groups",
                           "moe_router_group_topk", "moe_layer_freq"),
    "rotary embedding": ("position_embedding_type", "rotary_base", "rotary_percent", "rotary_interleaved",
                         "mrope_section", "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings",
                         "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim"),
    "normalization": ("normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma"),
    "vocabulary and tied embeddings": ("vocab_size", "share_embeddings_and_output_weights"),
    "multi-token prediction": ("mtp_num_layers",),
    "latent attention": ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"),
    "linear attention": ("linear_attention_freq", "linear_num_key_heads", "linear_num_value_heads",
                         "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim"),
}


# Sizes Megatron-Bridge maps per architecture (qwen35_bridge.py: Gated DeltaNet) under the same
# name on both sides, and the shared expert, which its Qwen MoE bridges map by hand.
_SAME_NAME_FIELDS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim")
_EXTRA_PAIRS = (("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),)
_ROPE_FIELDS = ("rope_theta", "partial_rotary_factor")  # inside rope_parameters in transformers v5


@functools.cache
def field_pairs() -> tuple[tuple[str, str], ...]:
    """``(Hugging Face name, Megatron name)`` pairs: Megatron-Bridge's own ``CONFIG_MAPPING``.

    Read from the installed megatron-bridge's source (``models/conversion/model_bridge.py``)
    rather than imported: importing any of megatron.bridge imports every model it supports,
    seconds a conversion does not otherwise spend. A layout it cannot read raises
    :class:`~bridge_ext.errors.CompatibilityError`.
    """
    try:
        spec = importlib.util.find_spec("megatron.bridge")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CompatibilityError("megatron-bridge is not installed: the configuration cross-check reads its "
                                 "CONFIG_MAPPING (pip install megatron-bridge)")
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "conversion" / "model_bridge.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        found = next(
            node.value for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name == "MegatronModelBridge"
            for node in cls.body if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "CONFIG_MAPPING" for t in node.targets))
        pairs = tuple((str(hf), str(megatron)) for hf, megatron in ast.literal_eval(found))
    except (OSError, SyntaxError, ValueError, StopIteration) as error:
        raise CompatibilityError(f"{source}: cannot read Megatron-Bridge's CONFIG_MAPPING ({error}); the "
                                 "configuration cross-check needs it") from None
    return pairs + _EXTRA_PAIRS + tuple((name, name) for name in _SAME_NAME_FIELDS)


def hf_value(config, hf_name: str) -> Any:
    """A field of the language model's config (tied embeddings: the top-level config's, as Megatron-Bridge reads it)."""
    if hf_name == "tie_word_embeddings":
        return getattr(config, hf_name, None)
    text = text_config(config)
    value = getattr(text, hf_name, None)
    if value is None and hf_name in _ROPE_FIELDS:
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        value = rope.get(hf_name) if isinstance(rope, Mapping) else None
    return value


def check_config_matches_run_config(config, run_config: RunConfig, config_source: str) -> None:
    """Refuse a config describing another model than the one run_config.yaml records.

    Every Megatron field of :data:`ARITHMETIC_FIELDS` that Megatron-Bridge maps from a Hugging Face
    field (:func:`field_pairs`) and that both sides set is compared; each difference is named with
    both names and both values.
    """
    recorded = run_config.model
    arithmetic = {name: family for family, fields in ARITHMETIC_FIELDS.items() for name in fields}
    differences, compared = [], set()
    for hf_name, name in field_pairs():
        if name not in arithmetic or name in compared or name not in recorded:
            continue
        ours = hf_value(config, hf_name)
        if ours is None:
            continue
        compared.add(name)
        theirs = _normalised(name, recorded)
        if not _same(ours, theirs):
            differences.append(f"{arithmetic[name]}: config.json has {hf_name} = {_shown(ours)}, "
                               f"run_config.yaml has {name} = {_shown(theirs)}")
    if differences:
        raise ConfigMismatchError(
            f"{config_source} describes another model than the checkpoint's {run_config.path} "
            "(converting would silently compute something else): " + "; ".join(differences)
            + ". Use the Hugging Face config of the model that was trained.")


def _normalised(name: str, settings: Mapping[str, Any]) -> Any:
    """A field's effective value: Megatron's own defaults for unset sizes, functions by name."""
    value = settings.get(name)
    if value is None and name == "kv_channels":
        hidden, heads = settings.get("hidden_size"), settings.get("num_attention_heads")
        value = hidden // heads if type(hidden) is int and type(heads) is int and heads else None
    elif value is None and name == "num_query_groups":
        value = settings.get("num_attention_heads")
    elif value is None and name == "ffn_hidden_size" and type(settings.get("hidden_size")) is int:
        value = 4 * settings["hidden_size"]
    elif value is None and name == "moe_ffn_hidden_size" and settings.get("num_moe_experts"):
        value = _normalised("ffn_hidden_size", settings)
    if isinstance(value, tuple):
        value = list(value)
    return value


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs or (ours in (None, False) and theirs in (None, False))
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=0.0)
    return ours == theirs
