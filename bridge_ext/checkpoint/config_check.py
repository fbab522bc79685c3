"""The Hugging Face config a checkpoint is converted with: read it safely, and check it is the model trained.

Two jobs, both before anything is written:

* :func:`load_hf_config` reads ``config.json`` (size-capped, parsed by us first) and refuses
  sizes the tables and :mod:`bridge_ext.dims` divide by or loop over (zero heads, a negative
  vocabulary, ``"abc"`` as a width, a billion layers), naming the file and the field.
* :func:`check_config_matches_run_config` compares that config with the model ``run_config.yaml``
  records, field by field (:mod:`bridge_ext.config_compare`, the comparison a live export makes
  with the model's own ``TransformerConfig``). Any field that changes the arithmetic and differs
  is named with both values. Shapes alone cannot see all of them: 8 heads of 8 and 4 heads of 16
  have the same q/k/v widths, and split them differently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge_ext.checkpoint.control_files import SMALL_JSON_LIMIT, read_json_file
from bridge_ext.checkpoint.run_config import RunConfig
from bridge_ext.config_compare import Comparison, compare
from bridge_ext.errors import ConvertError, VerificationError, first_line
from bridge_ext.tables import config_fields_for, register_transformers_configs, table_for

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

    path = folder_or_file.parent if folder_or_file.name == "config.json" else folder_or_file
    file = path / "config.json"
    if not file.exists():
        raise ConvertError(f"{folder_or_file}: no config.json there")
    settings = read_json_file(file, SMALL_JSON_LIMIT, lambda message, _: ConfigFieldError(message))
    if not isinstance(settings, dict):
        raise ConfigFieldError(f"{file}: expected a JSON object, found {type(settings).__name__}")
    check_config_fields(settings, file)
    model_type = settings.get("model_type")
    register_transformers_configs(model_type if isinstance(model_type, str) else "")
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
def check_config_matches_run_config(config, run_config: RunConfig, config_source: str) -> Comparison:
    """Refuse a config describing another model than the one run_config.yaml records.

    Every field of the table's ``config_fields`` (:mod:`bridge_ext.tables.config_fields`) that both
    sides set is compared (:func:`bridge_ext.config_compare.compare`); each difference is named
    with both names and both values. Returns the comparison (what was and was not compared).
    """
    comparison = compare(config, run_config.model, config_fields_for(table_for(config)))
    if comparison.differences:
        raise ConfigMismatchError(
            f"{config_source} describes another model than the checkpoint's {run_config.path} "
            "(converting would silently compute something else): " + "; ".join(comparison.differences)
            + ". Use the Hugging Face config of the model that was trained.")
    return comparison


def config_matches_run_config(model_dir: Path, run_config: RunConfig) -> str:
    """``--verify``: the config.json written to ``model_dir`` against run_config.yaml (the
    Megatron side); a report line, or VerificationError naming every field that differs."""
    written, _ = load_hf_config(model_dir)
    try:
        comparison = check_config_matches_run_config(written, run_config, str(model_dir / "config.json"))
    except ConfigMismatchError as error:
        raise VerificationError(str(error)) from None
    return (f"{model_dir / 'config.json'} matches {run_config.path.name} in all {len(comparison.compared)} "
            "fields both set")
