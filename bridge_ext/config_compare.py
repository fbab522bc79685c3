"""One comparison of a Hugging Face config with the Megatron model's own settings, field by field.

The Megatron side is ``run_config.yaml``'s model section (``bridge-ext convert``) or the live
model's ``TransformerConfig`` (:func:`bridge_ext.export_hf_weights` and the functions built on
it): the same attribute names, Megatron-Bridge's model provider's. Shapes alone cannot see a
config that lies: 8 heads of 8 and 4 heads of 16 have the same q/k/v widths and split them
differently; an activation, a rope scaling or a sliding window changes no shape at all.

Which Hugging Face field corresponds to which Megatron attribute is the tables' knowledge (a
table's ``config_fields``, by default :data:`bridge_ext.tables.config_fields.STANDARD`); this
module only knows how Megatron and transformers spell a value (Megatron's defaults for unset
sizes, an activation as a function or its import path, a window as ``(left, right)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge_ext.dims import text_config

# How a field is read on both sides (see _READERS):
#   value: the field itself; activation: a function name; rope_type / rope_factor: the rotary
#   scaling kind and factor; sliding_window: the window in tokens (None: no sliding layer);
#   layer_types: which layers slide; topk_normalised: whether the top-k routing weights sum to one.
READS = ("value", "activation", "rope_type", "rope_factor", "sliding_window", "layer_types", "topk_normalised",
         "count")


@dataclass(frozen=True)
class ConfigField:
    """A field that changes the arithmetic: its Hugging Face and Megatron names and how to read them.

    ``hf_values`` translates Hugging Face values into Megatron's (activation names into the
    import path of the function Megatron runs). ``uncompared``: why this table cannot compare
    the field (it is then listed as such, never skipped silently). ``hf_default``: the value
    transformers' model computes with where the config does not set the field (None: such a
    config leaves it uncompared).
    """

    family: str
    hf: str
    megatron: str
    read: str = "value"
    hf_values: Mapping[str, str] = field(default_factory=dict, compare=False)
    uncompared: str | None = None
    hf_default: Any = None

    def __post_init__(self) -> None:
        if self.read not in READS:
            raise ValueError(f"{self.hf}: read must be one of {READS}, not {self.read!r}")


@dataclass
class Comparison:
    """What :func:`compare` found: ``differences`` (one line each, both names and values),
    ``compared`` (Megatron names), ``uncompared`` (fields the table cannot compare: why),
    ``not_compared`` (fields one side does not set: which)."""

    differences: list[str] = field(default_factory=list)
    compared: list[str] = field(default_factory=list)
    uncompared: dict[str, str] = field(default_factory=dict)
    not_compared: dict[str, str] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """One line per field the table declares it cannot compare (said to the user)."""
        return [f"config field {name} not compared with the Megatron model's: {why}"
                for name, why in self.uncompared.items()]


class Attributes(Mapping):
    """An object's attributes as a read-only mapping (a live ``TransformerConfig``)."""

    def __init__(self, owner: object) -> None:
        self._owner = owner

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self._owner, name)
        except AttributeError:
            raise KeyError(name) from None

    def __iter__(self):
        return iter(vars(self._owner))

    def __len__(self) -> int:
        return len(vars(self._owner))


_MISSING = object()


@dataclass(frozen=True)
class _Read:
    """A value compared as ``value`` and shown as ``text`` (what the file says, then what it means)."""

    value: Any
    text: str


def compare(config, megatron: Mapping[str, Any], fields: tuple[ConfigField, ...], *,
            hf_label: str = "config.json", megatron_label: str = "run_config.yaml") -> Comparison:
    """Compare every field of ``fields`` that both sides set.

    A field the Hugging Face config does not set, or the Megatron settings do not record, is
    listed in ``not_compared``; the first of several Hugging Face names of one Megatron field
    that the config sets is the one compared.
    """
    result = Comparison()
    for spec in fields:
        if spec.megatron in result.compared:
            continue
        if spec.uncompared is not None:
            result.uncompared.setdefault(spec.hf, spec.uncompared)
            continue
        ours = _READERS[spec.read][0](config, spec)
        theirs = _READERS[spec.read][1](megatron, spec)
        if ours is _MISSING or theirs is _MISSING:
            why = f"{hf_label} does not set it" if ours is _MISSING else f"{megatron_label} does not record {spec.megatron}"
            result.not_compared.setdefault(spec.hf, why)
            continue
        result.compared.append(spec.megatron)
        if not _same(_value(ours), _value(theirs)):
            result.differences.append(f"{spec.family}: {hf_label} has {spec.hf} = {_shown(ours)}, "
                                      f"{megatron_label} has {spec.megatron} = {_shown(theirs)}")
    # another Hugging Face name of a compared field (num_local_experts beside num_experts) is no gap
    alternatives = {spec.hf for spec in fields if spec.megatron in result.compared and spec.uncompared is None}
    result.not_compared = {name: why for name, why in result.not_compared.items() if name not in alternatives}
    return result


# ---------------------------------------------------------------------------- the Hugging Face side
_ROPE_DICTS = ("rope_parameters", "rope_scaling")  # transformers v5, v4


def _rope(config) -> Mapping[str, Any]:
    text = text_config(config)
    for name in _ROPE_DICTS:
        value = getattr(text, name, None)
        if isinstance(value, Mapping) and value:
            return value
    return {}


def _hf_value(config, spec: ConfigField) -> Any:
    """The field of the language model's config (tied embeddings: the top-level config's, as
    Megatron-Bridge reads it); rope fields also inside ``rope_parameters``."""
    if spec.hf == "tie_word_embeddings":
        value = getattr(config, spec.hf, None)
    else:
        value = getattr(text_config(config), spec.hf, None)
        if value is None:
            value = _rope(config).get(spec.hf, spec.hf_default)
    return _MISSING if value is None else spec.hf_values.get(value, value) if isinstance(value, str) else value


def _hf_activation(config, spec: ConfigField) -> Any:
    text = text_config(config)
    name = getattr(text, spec.hf, None) or getattr(text, "hidden_activation", None)
    if not isinstance(name, str):
        return _MISSING
    function = spec.hf_values.get(name)
    return _Read(function or name, f"{name!r} ({function})" if function else f"{name!r} (no function Megatron runs)")


def _hf_rope_type(config, spec: ConfigField) -> Any:
    rope = _rope(config)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    return _plain_rope(kind, rope.get("factor"))


def _hf_rope_factor(config, spec: ConfigField) -> Any:
    rope = _rope(config)
    kind = _hf_rope_type(config, spec)
    return rope.get("factor") if kind != "default" else _MISSING


def _hf_layer_types(config) -> list[str] | None:
    """``"sliding"`` / ``"full"`` per layer, or None when no layer slides."""
    text = text_config(config)
    layers = getattr(text, "num_hidden_layers", None)
    kinds = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if isinstance(kinds, list):
        slides = ["sliding" if kind == "sliding_attention" else "full" for kind in kinds]
    elif window is not None and getattr(text, "use_sliding_window", True) and type(layers) is int:
        slides = ["sliding"] * layers  # e.g. Mistral: every layer slides
    else:
        return None
    return slides if "sliding" in slides else None


def _hf_sliding_window(config, spec: ConfigField) -> Any:
    return getattr(text_config(config), "sliding_window", None) if _hf_layer_types(config) else None


def _hf_layer_kinds(config, spec: ConfigField) -> Any:
    kinds = _hf_layer_types(config)
    return kinds if kinds is not None else _MISSING


# ---------------------------------------------------------------------------- the Megatron side
def _megatron_value(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    if spec.megatron not in settings:
        return _MISSING
    return _normalised(spec.megatron, settings)


def _megatron_count(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    """A number of layers or modules, where Megatron's ``None`` means none."""
    if spec.megatron not in settings:
        return _MISSING
    return _normalised(spec.megatron, settings) or 0


def _normalised(name: str, settings: Mapping[str, Any]) -> Any:
    """A field's effective value: Megatron's own defaults for unset sizes (TransformerConfig)."""
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
    elif value is None and name in ("moe_router_num_groups", "moe_router_group_topk") and settings.get("num_moe_experts"):
        # no group limit: the top k of all experts, as one group of them (moe_utils.py, _compute_topk)
        return _Read(1, "None (no group limit: one group)")
    elif name == "add_qkv_bias":  # linear_qkv has a bias with either (megatron-core attention.py)
        value = bool(value or settings.get("add_bias_linear"))
    if isinstance(value, tuple):
        value = list(value)
    return value


def _megatron_activation(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    if spec.megatron not in settings:
        return _MISSING
    function = settings[spec.megatron]
    if callable(function):  # live: the function; run_config.yaml: its import path
        return f"{getattr(function, '__module__', '')}.{getattr(function, '__name__', repr(function))}"
    return function


def _megatron_rope(settings: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(kind, factor) of Megatron's rotary embedding, in transformers' names."""
    if settings.get("multi_latent_attention"):  # MLATransformerConfig: rope_type and rotary_scaling_factor
        if "rope_type" not in settings:
            return None
        kind, factor = settings["rope_type"], settings.get("rotary_scaling_factor")
        kind = "default" if kind == "rope" else kind
    elif "position_embedding_type" not in settings:
        return None
    else:
        embedding = settings["position_embedding_type"]
        if embedding == "yarn":
            kind, factor = "yarn", settings.get("yarn_rotary_scaling_factor")
        elif embedding in ("rope", "mrope"):
            scaled = bool(settings.get("rope_scaling"))
            kind, factor = ("llama3", settings.get("rope_scaling_factor")) if scaled else ("default", None)
        else:
            kind, factor = str(embedding), None
    kind = _plain_rope(kind, factor)
    return kind, (factor if kind != "default" else None)


def _megatron_rope_type(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    rope = _megatron_rope(settings)
    if rope is None:
        return _MISSING
    recorded = ", ".join(f"{name} = {settings[name]!r}" for name in _ROPE_SETTINGS if settings.get(name) is not None)
    return _Read(rope[0], f"{rope[0]!r} ({recorded})")


def _megatron_rope_factor(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    rope = _megatron_rope(settings)
    return _MISSING if rope is None or rope[0] == "default" else rope[1]


_ROPE_SETTINGS = ("position_embedding_type", "rope_type", "rope_scaling")


def _megatron_layer_types(settings: Mapping[str, Any], layers: Any) -> list[str] | None:
    """Megatron's ``is_layer_window_attention`` for every layer (None: no window)."""
    window, skip = settings.get("window_size"), settings.get("window_attn_skip_freq")
    if not window or type(layers) is not int:
        return None
    if skip is None:
        return ["sliding"] * layers
    if isinstance(skip, int):
        return ["full" if (number + 1) % skip == 0 else "sliding" for number in range(layers)]
    return ["sliding" if flag else "full" for flag in list(skip)[:layers]]


def _megatron_sliding_window(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    if "window_size" not in settings:
        return _MISSING
    window = settings["window_size"]
    if isinstance(window, (list, tuple)) and len(window) == 2 and type(window[0]) is int:
        # Megatron's (left, right) leaves the token itself out; transformers' window counts it
        return _Read(window[0] + 1, f"{tuple(window)!r} ({window[0] + 1} tokens)")
    return window


def _megatron_layer_kinds(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    if "window_size" not in settings:
        return _MISSING
    kinds = _megatron_layer_types(settings, settings.get("num_layers"))
    return kinds if kinds is not None else _MISSING


def _hf_topk_normalised(config, spec: ConfigField) -> Any:
    value = getattr(text_config(config), spec.hf, None)
    return _MISSING if value is None else _Read(bool(value), f"{value!r} ({_sums(bool(value))})")


def _sums(normalised: bool) -> str:
    return "top-k weights summing to one" if normalised else "top-k weights not summing to one"


def _megatron_topk_normalised(settings: Mapping[str, Any], spec: ConfigField) -> Any:
    """megatron-core's ``topk_routing_with_score_function``: softmax after the top-k sums to one,
    softmax before it does not; sigmoid scores are divided by their top-k sum."""
    score = settings.get("moe_router_score_function")
    if not settings.get("num_moe_experts") or score is None:
        return _MISSING
    pre = bool(settings.get("moe_router_pre_softmax"))
    normalised = not pre if score == "softmax" else True
    return _Read(normalised, f"{pre} with moe_router_score_function = {score!r} ({_sums(normalised)})")


def _plain_rope(kind: Any, factor: Any) -> Any:
    """YaRN with a factor of 1 is the plain rotary embedding (Megatron-Bridge writes MLA models so)."""
    return "default" if kind == "yarn" and factor in (None, 1, 1.0) else kind


_READERS: dict[str, tuple[Callable[[Any, ConfigField], Any], Callable[[Mapping[str, Any], ConfigField], Any]]] = {
    "value": (_hf_value, _megatron_value),
    "activation": (_hf_activation, _megatron_activation),
    "rope_type": (_hf_rope_type, _megatron_rope_type),
    "rope_factor": (_hf_rope_factor, _megatron_rope_factor),
    "sliding_window": (_hf_sliding_window, _megatron_sliding_window),
    "layer_types": (_hf_layer_kinds, _megatron_layer_kinds),
    "topk_normalised": (_hf_topk_normalised, _megatron_topk_normalised),
    "count": (_hf_value, _megatron_count),
}


def _value(read: Any) -> Any:
    return read.value if isinstance(read, _Read) else read


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs or (ours in (None, False) and theirs in (None, False))
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs))
    return ours == theirs


def _shown(value: Any) -> str:
    if isinstance(value, _Read):
        return value.text
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_live_config(model_config: object, config, fields: tuple[ConfigField, ...], config_source: str) -> Comparison:
    """Refuse a Hugging Face config describing another model than the live model's own
    ``TransformerConfig`` (``model_config``), naming every field that differs with both values."""
    from bridge_ext.engine import ExportError

    comparison = compare(config, Attributes(model_config), fields, hf_label="the Hugging Face config",
                         megatron_label="the model's TransformerConfig")
    if comparison.differences:
        raise ExportError(
            f"{config_source} describes another model than the Megatron model's own TransformerConfig (exporting "
            "would silently compute something else): " + "; ".join(comparison.differences)
            + ". Pass the hf_config of the model that was trained.")
    for note in comparison.notes():  # once per export plan: said, not skipped silently
        warnings.warn(note, UserWarning, stacklevel=3)
    return comparison
