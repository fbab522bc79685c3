"""Mapping tables generated from Megatron-Bridge's bridges (``bridge-ext tables generate``).

A Megatron-Bridge bridge lists its weight mappings (``mapping_registry()``: ``AutoMapping``,
``QKVMapping``, ``GatedMLPMapping``, ...) with ``*`` wildcards. Each mapping becomes a rule of
the project's vocabulary (:mod:`bridge_ext.table`, :mod:`bridge_ext.ops`); what the registry
leaves to run time is resolved on a tiny Megatron model of the architecture built on the CPU
(an ``AutoMapping``'s tensor-parallel kind is that of the module holding the weight, found by
Megatron-Bridge's own detection) and on transformers' tiny model (the fused experts module's
parameter order). A mapping this module does not know is refused, naming its class and
parameter: a table is never guessed. MTP is left out, and so are vision / audio towers except
for the model types whose conformance entry proves them
(:data:`~bridge_ext.tables.architecture_notes.TOWERS_GENERATED`).

A ``**`` mapping (a subtree: Megatron-Bridge keeps Hugging Face's tower as a module and maps
``vision_tower.**`` to ``vision_tower.**``) is expanded structurally on the tiny models: the
Megatron parameters under its prefix and the Hugging Face tensors under its own must correspond
one to one (else the mapping is refused, naming it); the index of an ``nn.ModuleList``'s
repeated children becomes a wildcard named after the list (``encoder.layers.{layers}``), an
``nn.Sequential``'s index stays literal; each name becomes an ordinary rule, replicated for a
``ReplicatedMapping``, of the module's parallel kind for an ``AutoMapping``.

Expert mappings name Hugging Face's per-expert tensors (``experts.{e}.gate_proj.weight``); the
table also offers the fused layout transformers keeps in memory (``experts.gate_up_proj``
``[E, 2I, H]``, ``[gate; up]`` per expert), as the hand-written MoE tables do; the
conformance tests prove both.

The mapping kinds of ``architecture_notes.SIZED_SPLIT_KINDS`` (Mamba-2's in_proj / conv1d) become
row splits by the mixer's sizes; the table's sizes entry names the Hugging Face fields the bridge's
``CONFIG_MAPPING`` maps to megatron-core's.

A ``ConcatenatedQKVMapping`` (Hugging Face's one fused ``qkv`` ``[Q; K; V]``, Megatron's
``linear_qkv`` per query group ``[q heads; k; v]``) becomes ``SplitGroupedRows`` then ``Concat``
by the attention's sizes: the text model's, or under a tower prefix the tower's
(``VisionSizes`` with the fields :data:`~bridge_ext.tables.architecture_notes.VISION_SIZE_FIELDS`
names); the tiny Megatron module's own head count, query groups and head width must equal the
sizes the table reads from the tiny config, else it is refused.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass

from bridge_ext.errors import TableError
from bridge_ext.tables.architecture_notes import (
    CONFIG_CHECKS,
    EQUIVALENT_KINDS,
    EXPERT_OFFSET_KINDS,
    FUSED_EXPERT_NAMES,
    HEAD_GROUP_QKV_KINDS,
    HEAD_WIDTH_QKV_KINDS,
    HF_NAME_RENAMES,
    IN_MEMORY_FUSED_GATE_UP,
    IN_MEMORY_RENAMES,
    KINDS_WITH_OPS,
    LAST_LAYERS_WITHOUT,
    LEFT_OUT_PREFIXES,
    MTP_PREFIXES,
    PUBLISHED_PREFIXES,
    REFUSED_CONFIG_FIELDS,
    SIZED_SPLIT_KINDS,
    STACKED_KINDS,
    TOWERS_GENERATED,
    SizedSplitKind,
    VISION_SIZE_FIELDS,
    VLLM_ADAPTERS_REFUSED,
    VLLM_PER_EXPERT_ADAPTERS,
)

WILDCARDS = ("layer", "expert")
_FUSED_NORMS = ("layer_norm_weight", "layer_norm_bias")
_GROUPED_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.linear_fc(?P<n>[12])\.weight\*$")


@dataclass(frozen=True)
class RegisteredBridge:
    """One Hugging Face class Megatron-Bridge registers a bridge for."""

    source: str  # the Hugging Face class name
    model_type: str | None  # its config's model_type (None: transformers lacks the class)
    bridge_class: type


def megatron_bridge_version() -> str:
    from importlib.metadata import version

    return version("megatron-bridge")


def registered_bridges() -> list[RegisteredBridge]:
    """Every Hugging Face class with a Megatron-Bridge bridge, by class name."""
    import transformers

    import megatron.bridge.models  # noqa: F401  (imports every bridge, which registers it)
    from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge

    found: dict[str, RegisteredBridge] = {}
    stack = list(MegatronModelBridge.__subclasses__())
    while stack:
        bridge_class = stack.pop()
        stack.extend(bridge_class.__subclasses__())
        source = getattr(bridge_class, "SOURCE_NAME", None)
        if not source or not bridge_class.__module__.startswith("megatron.bridge.models."):
            continue
        hf_class = getattr(transformers, source, None)
        config_class = getattr(hf_class, "config_class", None)
        # a remote-code class (no transformers class): the model_type the bridge declares, if any
        model_type = getattr(config_class, "model_type", None) or getattr(bridge_class, "MODEL_TYPE", None)
        found[source] = RegisteredBridge(source, model_type, bridge_class)
    return sorted(found.values(), key=lambda entry: entry.source)


def bridge_for(model_type: str) -> RegisteredBridge:
    matches = [entry for entry in registered_bridges() if entry.model_type == model_type]
    if len(matches) != 1:
        found = "no bridge" if not matches else f"{len(matches)} bridges"
        raise TableError(f"Megatron-Bridge {megatron_bridge_version()} registers {found} for model_type {model_type!r}")
    return matches[0]


@dataclass(frozen=True)
class GeneratedRule:
    """One rule as source text, and the Megatron pattern it came from (for the header); where
    some layers drop outputs (:data:`LAST_LAYERS_WITHOUT`), its parts to rebuild it with fewer."""

    megatron: str
    text: str
    #: its Hugging Face names carry a named offset (``{expert+field}``): such rules go first, so
    #: the reverse direction reads ``experts.5`` as the offset pool's before ``experts.{expert}``
    offset: bool = False
    hf: tuple[str, ...] = ()
    ops: str = ""
    options: tuple[tuple[str, str], ...] = ()


def _pattern(mb_pattern: str, what: str, mapping) -> str:
    """Megatron-Bridge's ``*`` (digits) wildcards -> ``{layer}``, ``{expert}``."""
    if "**" in mb_pattern:
        raise TableError(f"{type(mapping).__name__} of {mapping.megatron_param}: '**' wildcards ({what} {mb_pattern}) "
                         "are not supported")
    pieces = mb_pattern.split("*")
    if len(pieces) - 1 > len(WILDCARDS):
        raise TableError(f"{type(mapping).__name__} of {mapping.megatron_param}: too many wildcards in {mb_pattern}")
    out = pieces[0]
    for index, piece in enumerate(pieces[1:]):
        out += "{" + WILDCARDS[index] + "}" + piece
    return out


def _regex(mb_pattern: str) -> re.Pattern:
    return re.compile("".join(r"\d+" if piece == "*" else re.escape(piece)
                              for piece in re.split(r"(\*)", mb_pattern)) + r"\Z")


class Resolver:
    """Tensor-parallel kind of a Megatron weight, read off the tiny model's module by
    Megatron-Bridge's own ``AutoMapping`` detection."""

    def __init__(self, chunk) -> None:
        self.chunk = chunk
        self.shapes = {name: tuple(tensor.shape) for name, tensor in [*chunk.named_parameters(),
                                                                      *chunk.named_buffers()]}
        self.names = list(self.shapes)

    def parameters_under(self, prefix: str) -> list[str]:
        """The tiny model's parameter names under ``prefix``, in registration order."""
        return [name for name, _ in self.chunk.named_parameters() if name.startswith(prefix)]

    def is_module_list(self, path: str) -> bool:
        import torch

        return isinstance(self.chunk.get_submodule(path), torch.nn.ModuleList)

    def module_kind(self, mapping, name: str) -> str:
        """The parallel kind of weight ``name`` as Megatron-Bridge converts it: its module's kind, but
        replicated for a 1-D tensor of a row-parallel module (its bias: ``RowParallelMapping``
        keeps 1-D tensors whole on every rank)."""
        kind = mapping._detect_parallelism_type(self.chunk.get_submodule(name.rpartition(".")[0]))
        return "replicated" if kind == "row" and len(self.shapes[name]) == 1 else kind

    def attention_sizes(self, mb_pattern: str) -> set[tuple[int, int, int]]:
        """(heads, query groups, head width) of the configs of the modules holding ``mb_pattern``'s weights."""
        sizes = set()
        for name in self.present(mb_pattern):
            config = self.chunk.get_submodule(name.rpartition(".")[0]).config
            heads = config.num_attention_heads
            sizes.add((heads, config.num_query_groups or heads, config.kv_channels or config.hidden_size // heads))
        return sizes

    def present(self, mb_pattern: str) -> list[str]:
        regex = _regex(mb_pattern)
        return [name for name in self.names if regex.match(name)]

    def kind(self, mapping) -> str | None:
        """"column" / "row" / "replicated", or None when the tiny model lacks the weight."""
        names = self.present(mapping.megatron_param)
        grouped = _GROUPED_EXPERT.match(mapping.megatron_param)
        if not names and grouped:  # grouped-GEMM experts: the same weights as SequentialMLP's
            names = self.present(f"{grouped['prefix']}.experts.local_experts.*.linear_fc{grouped['n']}.weight")
        if not names:
            if mapping.megatron_param.endswith(_FUSED_NORMS):
                return "replicated"  # a Transformer Engine norm fused into the next linear
            return None
        kinds = {self.module_kind(mapping, name) for name in names}
        if len(kinds) != 1:
            raise TableError(f"{mapping.megatron_param}: modules of several parallel kinds {sorted(kinds)}")
        return kinds.pop()


def _subtree_prefix(pattern: str, what: str, mapping) -> str:
    """The prefix of a ``prefix.**`` pattern; any other use of ``**`` or ``*`` beside it is refused."""
    prefix = pattern[:-3]
    if not pattern.endswith(".**") or "*" in prefix:
        raise TableError(f"{type(mapping).__name__} of {mapping.megatron_param}: '**' wildcards ({what} {pattern}) "
                         "are supported only as a whole subtree 'prefix.**'")
    return prefix


def _wildcarded(name: str, resolver: Resolver) -> str:
    """``name`` with the index of each ``nn.ModuleList`` child as a wildcard named after the list
    (``layers``; ``layers2`` for a second list of that name)."""
    original = name.split(".")
    parts = list(original)
    used: list[str] = []
    for index in range(1, len(parts)):
        if parts[index].isdigit() and resolver.is_module_list(".".join(original[:index])):
            base = parts[index - 1] if re.fullmatch(r"[A-Za-z_]\w*", parts[index - 1]) else "index"
            used.append(base)
            parts[index] = "{" + base + (str(used.count(base)) if used.count(base) > 1 else "") + "}"
    return ".".join(parts)


def renamed(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """``name`` (Megatron-Bridge's spelling) with the first fitting ``(bridge's prefix, saved
    prefix)`` pair applied (:data:`~bridge_ext.tables.architecture_notes.HF_NAME_RENAMES`)."""
    for bridge_prefix, saved_prefix in renames:
        if name.startswith(bridge_prefix):
            return saved_prefix + name[len(bridge_prefix):]
    return name


def bridge_spelling(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """A saved name as Megatron-Bridge spells it (the inverse of :func:`renamed`)."""
    for bridge_prefix, saved_prefix in renames:
        if name.startswith(saved_prefix):
            return bridge_prefix + name[len(saved_prefix):]
    return name


def expand_subtree(mapping, resolver: Resolver, hf_names: list[str] | None,
                   renames: tuple[tuple[str, str], ...] = ()) -> list[GeneratedRule]:
    """Rules for a ``prefix.**`` mapping, one per parameter of the tiny models' subtree (the
    saved names read in the bridge's spelling where ``renames`` differ, the rules writing the saved ones)."""
    from megatron.bridge.models.conversion import param_mapping as pm

    label = f"{type(mapping).__name__} of {mapping.megatron_param} -> {mapping.hf_param}"
    kind = _kind(mapping)
    if kind not in (pm.ReplicatedMapping, pm.AutoMapping) or not isinstance(mapping.hf_param, str):
        raise TableError(f"{label}: '**' subtrees are expanded for ReplicatedMapping / AutoMapping only")
    if getattr(mapping, "permute_dims", None):
        raise TableError(f"{label}: permute_dims {mapping.permute_dims} is not supported")
    if hf_names is None:
        raise TableError(f"{label}: no Hugging Face names to expand the subtree against")
    megatron_prefix = _subtree_prefix(mapping.megatron_param, "Megatron", mapping) + "."
    hf_prefix = _subtree_prefix(mapping.hf_param, "Hugging Face", mapping) + "."
    megatron_names = resolver.parameters_under(megatron_prefix)
    megatron_rest = [name[len(megatron_prefix):] for name in megatron_names]
    bridge_names = [bridge_spelling(name, renames) for name in hf_names]
    hf_rest = sorted(name[len(hf_prefix):] for name in bridge_names if name.startswith(hf_prefix))
    if not megatron_rest:
        raise TableError(f"{label}: the tiny Megatron model has no parameter under {megatron_prefix}")
    if sorted(megatron_rest) != hf_rest:
        only_megatron = sorted(set(megatron_rest) - set(hf_rest))[:3]
        only_hf = sorted(set(hf_rest) - set(megatron_rest))[:3]
        raise TableError(f"{label}: the subtrees do not correspond one to one (only in Megatron: {only_megatron}, "
                         f"only in Hugging Face: {only_hf})")
    rules: dict[str, GeneratedRule] = {}
    for name, rest in zip(megatron_names, megatron_rest):
        tp = "replicated" if kind is pm.ReplicatedMapping else resolver.module_kind(mapping, name)
        pattern = _wildcarded(name, resolver)
        hf = renamed(hf_prefix + pattern[len(megatron_prefix):], renames)
        text = _rule(pattern, hf, tp=_quoted(tp) if tp != "column" else "")
        if rules.setdefault(pattern, GeneratedRule(pattern, text)).text != text:
            raise TableError(f"{label}: {pattern} has children of several parallel kinds")
    return list(rules.values())


def _vocab_ops(megatron: str) -> str:
    """Vocabulary-padded weights, of the model or of a sub-model holding its language model, are trimmed."""
    vocab = ("embedding.word_embeddings.weight", "output_layer.weight")
    return ", TrimVocab()" if megatron in vocab or megatron.endswith(tuple("." + name for name in vocab)) else ""


def _quoted(text: str) -> str:
    return json.dumps(text)


def _rule(megatron: str, hf: str | list[str], ops: str = "", **options: str) -> str:
    """One rule's source: one line, or one argument a line when long."""
    hf_text = _quoted(hf) if isinstance(hf, str) else "[" + ", ".join(_quoted(name) for name in hf) + "]"
    extra = "".join(f", {key}={value}" for key, value in options.items() if value)
    one_line = f"rule({_quoted(megatron)}, {hf_text}{ops}{extra})"
    if len(one_line) <= 108:
        return one_line
    pad = " " * 12
    if len(pad + hf_text) > 118:
        hf_text = "[\n" + "".join(f"{pad}    {_quoted(name)},\n" for name in hf) + pad + "]"
    op_texts = [ops.removeprefix(", ")] if ops else []
    if ops and len(pad + op_texts[0]) > 118:  # one operation a line
        op_texts = _top_level_parts(op_texts[0])
    arguments = [_quoted(megatron), hf_text, *op_texts, *(f"{key}={value}" for key, value in options.items() if value)]
    return "rule(\n" + "".join(f"{pad}{argument},\n" for argument in arguments) + " " * 8 + ")"


def _top_level_parts(text: str) -> list[str]:
    """``text`` cut at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    return [*parts, text[start:].strip()]


def _fused_expert_name(per_expert: str, parameter: str) -> str:
    head = re.split(r"\.experts\.\{expert[^}]*\}\.", per_expert)[0]
    return f"{head}.experts.{parameter}"


@dataclass
class _Translation:
    rules: list[GeneratedRule]
    absent: list[str]
    expert_parameters: tuple[str, ...] | None
    sized_splits: tuple[SizedSplitKind, ...] = ()
    vision_sizes: object | None = None  # the table's VisionSizes, where its rules name them
    config_offsets: tuple[str, ...] = ()
    wide_layer_type: str | None = None  # HEAD_WIDTH_QKV_KINDS: the layer type of global_head_dim


def _config_value(config, name: str):
    text = getattr(config, "text_config", None)
    return next((getattr(holder, name) for holder in (config, text) if getattr(holder, name, None) is not None), None)


def _offset_field(mapping, config) -> str | None:
    """The config field an :data:`EXPERT_OFFSET_KINDS` mapping's expert offset equals (checked on
    the tiny config), or None for any other mapping."""
    note = EXPERT_OFFSET_KINDS.get(_path(type(mapping)))
    if note is None:
        return None
    _, attribute, field = note
    offset = getattr(mapping, attribute, None)
    if config is None or offset is None or offset != _config_value(config, field):
        raise TableError(f"{type(mapping).__name__} of {mapping.megatron_param}: its expert offset {offset!r} is not "
                         f"the tiny config's {field} ({_config_value(config, field) if config else 'no config'!r})")
    return field


def _stacked_rule(group: list, resolver: Resolver, renames: tuple[tuple[str, str], ...] = ()) -> GeneratedRule:
    """One rule stacking a :data:`STACKED_KINDS` group's Megatron tensors (in the note's slice
    order) on a new dim 0 of their one Hugging Face tensor: the Megatron patterns' one differing
    part becomes a word wildcard ``{part=a|b}`` with ``stack="part"``."""
    _, attribute, order = STACKED_KINDS[_path(type(group[0]))]
    by_slice = {getattr(mapping, attribute): mapping for mapping in group}
    label = f"{type(group[0]).__name__} of {group[0].hf_param}"
    if sorted(by_slice) != sorted(order) or len(group) != len(order):
        raise TableError(f"{label}: slices {sorted(getattr(m, attribute) for m in group)}, expected {list(order)}")
    mappings = [by_slice[name] for name in order]
    patterns = [_pattern(mapping.megatron_param, "Megatron", mapping).split(".") for mapping in mappings]
    same_length = len({len(p) for p in patterns}) == 1
    differing = [index for index in range(len(patterns[0])) if len({p[index] for p in patterns}) > 1] \
        if same_length else []
    if len(differing) != 1:
        raise TableError(f"{label}: the Megatron names must differ in one part to stack")
    parts = [p[differing[0]] for p in patterns]
    megatron = ".".join([*patterns[0][:differing[0]], "{part=" + "|".join(parts) + "}",
                         *patterns[0][differing[0] + 1:]])
    kinds = {resolver.kind(mapping) for mapping in mappings}
    if len(kinds) != 1 or None in kinds:
        raise TableError(f"{label}: parallel kinds {sorted(map(str, kinds))} of the stacked tensors")
    tp = kinds.pop()
    hf = renamed(_pattern(mappings[0].hf_param, "Hugging Face", mappings[0]), renames)
    return GeneratedRule(megatron, _rule(megatron, hf, stack='"part"', tp=_quoted(tp) if tp != "column" else ""))


def translate(mappings, resolver: Resolver, expert_parameters: tuple[str, ...] | None, *,
              model_type: str | None = None, hf_names: list[str] | None = None, hf_config=None,
              experts_in_modules: bool = False, fused_name=None) -> _Translation:
    """Rules for Megatron-Bridge ``mappings``; refuses a mapping kind it does not know.

    ``hf_names``: the tiny Hugging Face checkpoint's tensor names (``**`` subtrees are expanded
    against them); towers are translated only for a model type of ``TOWERS_GENERATED``. Hugging
    Face names are written as transformers saves them (``HF_NAME_RENAMES``);
    ``hf_config``: the tiny model's config (a fused ``qkv``'s sizes and an expert offset are
    checked against it). ``fused_name(per_expert_patterns, parameter)``: the fused experts
    parameter holding those per-expert tensors (read off transformers' tiny model); default: the
    per-expert names' ``experts.`` module's ``parameter``.
    ``experts_in_modules``: transformers' model holds its routed experts one module each (no
    fused experts module: remote code), so they are written per expert only, without a family."""
    from megatron.bridge.models.conversion import param_mapping as pm

    renames = HF_NAME_RENAMES.get(model_type, ())

    def hf_pattern(mb_pattern: str, mapping) -> str:
        return renamed(_pattern(mb_pattern, "Hugging Face", mapping), renames)

    rules: list[GeneratedRule] = []
    absent: list[str] = []
    uses_experts = False
    sized_splits: list[SizedSplitKind] = []
    vision_sizes = None
    fused_parameters: list[tuple[str, str]] = []  # (fused parameter named, mapping)
    stacked: dict[str, list] = {}  # STACKED_KINDS mappings by their Hugging Face pattern
    offsets: list[str] = []
    offset = None  # the config field of the current mapping's expert offset

    def add(megatron: str, text: str) -> None:
        rules.append(GeneratedRule(megatron, text, offset is not None))

    def fused(per_expert: list[str], parameter: str) -> str:
        if fused_name is not None:
            return fused_name(per_expert, parameter)
        return _fused_expert_name(per_expert[0], parameter)

    def shifted(hf: str) -> str:  # the Hugging Face expert index of an offset pool
        return hf.replace("{expert}", "{expert+" + offset + "}") if offset else hf

    def add_parts(megatron: str, hf: str | list[str], ops: str = "", **options: str) -> None:
        hf_tuple = (hf,) if isinstance(hf, str) else tuple(hf)
        rules.append(GeneratedRule(megatron, _rule(megatron, hf, ops, **options), offset is not None, hf_tuple, ops,
                                   tuple(options.items())))

    wide_layer_type = None

    for mapping in mappings:
        name = mapping.megatron_param
        if name.startswith(MTP_PREFIXES) or (name.startswith(LEFT_OUT_PREFIXES) and model_type not in TOWERS_GENERATED):
            continue
        if isinstance(mapping.hf_param, str) and name.endswith("**"):
            rules.extend(expand_subtree(mapping, resolver, hf_names, renames))
            continue
        kind = _kind(mapping)
        if _path(type(mapping)) in STACKED_KINDS:
            group = stacked.setdefault(mapping.hf_param, [])
            group.append(mapping)
            if len(group) == len(STACKED_KINDS[_path(type(mapping))][2]):
                rules.append(_stacked_rule(group, resolver, renames))
            continue
        megatron = _pattern(name, "Megatron", mapping)
        is_expert = "{expert}" in megatron
        offset = _offset_field(mapping, hf_config)
        if offset and not is_expert:
            raise TableError(f"{type(mapping).__name__} of {name}: an expert offset on a weight without an "
                             "expert index")
        if offset and offset not in offsets:
            offsets.append(offset)
        if _path(type(mapping)) in HEAD_WIDTH_QKV_KINDS:
            wide_layer_type = HEAD_WIDTH_QKV_KINDS[_path(type(mapping))]
            hf = [hf_pattern(mapping.hf_param[part], mapping) for part in ("q", "k", "v")]
            add_parts(megatron, hf, ', SplitQKVHeadDims("num_attention_heads", "num_query_groups", "head_dim", '
                                    '"global_head_dim")', lora_parts='("q", "k", "v")' if name.endswith(".weight") else "")
        elif _path(type(mapping)) in HEAD_GROUP_QKV_KINDS:
            hf = [hf_pattern(mapping.hf_param[part], mapping) for part in ("q", "k", "v")]
            add(megatron, _rule(megatron, hf, ', SplitHeadGroups("num_attention_heads", "head_dim", "v_head_dim")',
                                lora_parts='("q", "k", "v")' if name.endswith(".weight") else ""))
        elif kind in (pm.AutoMapping, pm.ColumnParallelMapping, pm.RowParallelMapping, pm.ReplicatedMapping,
                    pm.RMSNorm2ZeroCenteredRMSNormMapping):
            permute = tuple(getattr(mapping, "permute_dims", None) or ())
            if permute not in ((), (1, 0)):
                raise TableError(f"{kind.__name__} of {name}: permute_dims {mapping.permute_dims} is not supported")
            explicit = {pm.ColumnParallelMapping: "column", pm.RowParallelMapping: "row",
                        pm.ReplicatedMapping: "replicated"}.get(kind)
            tp = explicit or resolver.kind(mapping)
            if tp is None:
                absent.append(name)
                continue
            hf = hf_pattern(mapping.hf_param, mapping)
            ops = _vocab_ops(megatron) + (", AddOne()" if kind is pm.RMSNorm2ZeroCenteredRMSNormMapping else "")
            ops += ", Transpose()" if permute else ""  # a matrix Hugging Face stores [in, out]
            ops += "".join(f", {op}" for op in _extra_ops(mapping))
            if is_expert and experts_in_modules:
                add(megatron, _rule(megatron, hf, ops, tp=_quoted(tp)))
            elif is_expert:
                uses_experts = True
                hf = shifted(hf)
                add(megatron, _rule(megatron, hf, ops, tp=_quoted(tp), variant='EXPERTS.variant("per_expert")'))
                parameter = hf.rsplit(".", 2)[-2]
                parameter = FUSED_EXPERT_NAMES.get(model_type, {}).get(parameter, parameter)
                fused_parameters.append((parameter, name))
                add(megatron, _rule(megatron, fused([hf], parameter), ops, tp=_quoted(tp),
                                    stack='"expert"', variant='EXPERTS.variant("fused")'))
            else:
                add_parts(megatron, hf, ops, tp=_quoted(tp) if tp != "column" else "")
        elif kind is pm.QKVMapping:
            hf = [hf_pattern(mapping.hf_param[part], mapping) for part in ("q", "k", "v")]
            parts = '("q", "k", "v")' if name.endswith(".weight") else ""
            add(megatron, _rule(megatron, hf, ', SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim")',
                                lora_parts=parts))
        elif _path(kind) in SIZED_SPLIT_KINDS:
            sized = SIZED_SPLIT_KINDS[_path(kind)]
            hf = hf_pattern(mapping.hf_param, mapping)
            add(megatron, _rule(megatron, hf, f", SplitRows(*{sized.parts}), Concat({sized.parts})"))
            sized_splits += [] if sized in sized_splits else [sized]
        elif kind is pm.ConcatenatedQKVMapping:
            tower = name.startswith(LEFT_OUT_PREFIXES)
            if tower:
                vision_sizes = _vision_sizes(model_type, mapping)
            sizes = _fused_qkv_sizes(mapping, resolver, hf_config, vision_sizes if tower else None)
            if resolver.kind(mapping._tp_mapping) != "column":  # the split is per rank: whole query groups
                raise TableError(f"ConcatenatedQKVMapping of {name}: its linear is not column-parallel")
            hf = hf_pattern(mapping.hf_param, mapping)
            add(megatron, _rule(megatron, hf, f", SplitGroupedRows({sizes}), Concat(({sizes}))"))
        elif kind is pm.GatedMLPMapping:
            gate, up = (shifted(hf_pattern(mapping.hf_param[part], mapping)) for part in ("gate", "up"))
            if is_expert and not experts_in_modules:
                uses_experts = True
                add(megatron, _rule(megatron, [gate, up], ", SplitRows(1, 1)", variant='EXPERTS.variant("per_expert")',
                                    lora_parts='("gate", "up")'))
                fused_parameters.append(("gate_up_proj", name))
                add(megatron, _rule(megatron, fused([gate, up], "gate_up_proj"), ", SplitRows(1, 1), Concat((1, 1))",
                                    stack='"expert"', variant='EXPERTS.variant("fused")'))
            elif model_type in IN_MEMORY_FUSED_GATE_UP:  # one linear in memory: one adapter on it
                linear = _fused_gate_up(gate, up, IN_MEMORY_FUSED_GATE_UP[model_type])
                add(megatron, _rule(megatron, [gate, up], ", SplitRows(1, 1)", lora_fused=_quoted(linear)))
            else:
                add(megatron, _rule(megatron, [gate, up], ", SplitRows(1, 1)", lora_parts='("gate", "up")'))
        else:
            raise TableError(f"unknown Megatron-Bridge mapping kind {type(mapping).__name__} for parameter {name}: "
                             "no rule is generated for it")
    if stacked and any(len(group) != len(STACKED_KINDS[_path(type(group[0]))][2]) for group in stacked.values()):
        group = next(group for group in stacked.values() if len(group) != len(STACKED_KINDS[_path(type(group[0]))][2]))
        raise TableError(f"{type(group[0]).__name__} of {group[0].hf_param}: {len(group)} of the stacked slices "
                         f"{list(STACKED_KINDS[_path(type(group[0]))][2])} mapped")
    if uses_experts and expert_parameters is None:
        raise TableError("the bridge maps routed experts but transformers' model has no fused experts module")
    for parameter, name in fused_parameters:  # per-expert names (w1 / w3 / w2) that are not the fused ones
        if parameter not in (expert_parameters or ()):
            raise TableError(f"{name}: the fused experts parameter {parameter} is not one of transformers' experts "
                             f"module parameters {list(expert_parameters or ())}")
    rules = [each for each in rules if each.offset] + [each for each in rules if not each.offset]
    return _Translation(rules, absent, expert_parameters if uses_experts else None, tuple(sized_splits),
                        vision_sizes, tuple(offsets), wide_layer_type)


def _vision_sizes(model_type: str | None, mapping):
    """The table's ``VisionSizes``, from the reviewed :data:`VISION_SIZE_FIELDS`."""
    from bridge_ext.tables.sizes import VisionSizes

    fields = VISION_SIZE_FIELDS.get(model_type)
    if fields is None:
        raise TableError(f"ConcatenatedQKVMapping of {mapping.megatron_param}: architecture_notes.VISION_SIZE_FIELDS "
                         f"names no vision_config fields of {model_type}'s tower heads")
    return VisionSizes(*fields)


def _vision_sizes_source(sizes) -> str:
    fields = f"heads={_quoted(sizes.heads)}"
    return f"VisionSizes({fields}" + (f", key_value_heads={_quoted(sizes.key_value_heads)})"
                                      if sizes.key_value_heads else ")")


def _fused_qkv_sizes(mapping, resolver: Resolver, hf_config, vision_sizes) -> str:
    """The named sizes (source text) of one query group's ``[q heads; k; v]`` rows, after checking
    that the tiny Megatron module's attention has the sizes the table reads from the tiny config."""
    from bridge_ext.dims import ModelDims

    label = f"ConcatenatedQKVMapping of {mapping.megatron_param}"
    if hf_config is None:
        raise TableError(f"{label}: no Hugging Face config to check its sizes against")
    if vision_sizes is None:
        names, keys = ("q_rows_per_group", "head_dim"), ("num_attention_heads", "num_query_groups", "head_dim")
        extra = ()
    else:
        names, keys = ("vision_q_rows_per_group", "vision_head_dim"), ("vision_heads", "vision_query_groups",
                                                                        "vision_head_dim")
        extra = (vision_sizes,)
    dims = ModelDims.from_hf_config(hf_config, extra)
    expected = tuple(dims[key] for key in keys)
    found = resolver.attention_sizes(mapping.megatron_param)
    if found != {expected}:
        raise TableError(f"{label}: the tiny Megatron attention has (heads, query groups, head width) "
                         f"{sorted(found)}, the table would read {expected} from the config")
    return ", ".join(_quoted(name) for name in (names[0], names[1], names[1]))


def _fused_gate_up(gate: str, up: str, suffixes: tuple[str, str, str]) -> str:
    """The fused linear's name of a gate / up pair (:data:`IN_MEMORY_FUSED_GATE_UP`); a pair
    the note does not describe is refused."""
    gate_suffix, up_suffix, fused_suffix = suffixes
    stem = gate.removesuffix(gate_suffix)
    if not gate.endswith(gate_suffix) or up != stem + up_suffix:
        raise TableError(f"{gate} / {up}: not the gate / up pair {gate_suffix} / {up_suffix} transformers fuses")
    return stem + fused_suffix


def _kind(mapping) -> type:
    """The mapping's class, or the base class an :data:`EQUIVALENT_KINDS`, :data:`KINDS_WITH_OPS`,
    :data:`EXPERT_OFFSET_KINDS` or :data:`STACKED_KINDS` subclass converts like."""
    from megatron.bridge.models.conversion import param_mapping as pm

    kind = type(mapping)
    base = (EQUIVALENT_KINDS.get(_path(kind)) or KINDS_WITH_OPS.get(_path(kind), (None,))[0]
            or EXPERT_OFFSET_KINDS.get(_path(kind), (None,))[0] or STACKED_KINDS.get(_path(kind), (None,))[0])
    return getattr(pm, base) if base else kind


def _path(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _extra_ops(mapping) -> tuple[str, ...]:
    """The operations a :data:`KINDS_WITH_OPS` subclass applies after its base kind."""
    ops = KINDS_WITH_OPS.get(_path(type(mapping)))
    return (ops[1],) if ops else ()


def experts_in_modules(hf_model) -> bool:
    """Whether transformers' model holds its routed experts as a list of modules, one per expert
    (remote code such as Ling 2.0's), rather than a fused experts module."""
    from torch import nn

    return any(name.endswith(".experts") and isinstance(module, nn.ModuleList)
               for name, module in hf_model.named_modules())


def expert_parameters_of(hf_model) -> tuple[str, ...] | None:
    """The parameter names of transformers' fused experts module, in registration order."""
    for name, module in hf_model.named_modules():
        if name.endswith(".experts"):
            direct = tuple(param for param, _ in module.named_parameters(recurse=False))
            if direct:
                return direct
    return None


def in_memory_prefixes_of(pairs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``(checkpoint prefix, in-memory prefix)`` pairs that turn each ``(saved, in-memory)`` name
    pair into its in-memory name (first fit wins, longest saved prefix first): the prefixes
    before the names' longest common dotted suffix. A rename inside a numbered module (a router
    bias moved into the gate) is no prefix rename and is left to the conformance test's strict
    PEFT load; prefixes renamed two ways are refused. A prefix that would also catch a name
    transformers keeps (Qwen3-Omni's ``thinker.`` beside ``thinker.lm_head``) is narrowed by one
    part of the common suffix (``thinker.audio_tower.``)."""
    prefix_renamed = []
    for saved, loaded in pairs:
        saved_prefix, _ = _renamed_prefixes(saved, loaded, 0)
        if saved != loaded and not any(part.isdigit() for part in saved_prefix.split(".")):
            prefix_renamed.append((saved, loaded))
    kept = [saved for saved, loaded in pairs if saved == loaded]
    wide = {pair: _renamed_prefixes(*pair, 0) for pair in prefix_renamed}
    too_wide = {prefix for prefix, _ in wide.values() if any(name.startswith(prefix) for name in kept)}
    found: dict[str, str] = {}
    for pair, (saved_prefix, loaded_prefix) in wide.items():
        if saved_prefix in too_wide:
            saved_prefix, loaded_prefix = _renamed_prefixes(*pair, 1)
        if found.setdefault(saved_prefix, loaded_prefix) != loaded_prefix:
            raise TableError(f"transformers renames the prefix {saved_prefix} two ways "
                             f"({found[saved_prefix]}, {loaded_prefix})")
    ordered = tuple(sorted(found.items(), key=lambda pair: (-len(pair[0]), pair[0])))
    for saved, loaded in [*prefix_renamed, *((name, name) for name in kept)]:
        fit = next(((saved_prefix, loaded_prefix) for saved_prefix, loaded_prefix in ordered
                    if saved.startswith(saved_prefix)), ("", ""))
        if fit[1] + saved[len(fit[0]):] != loaded:
            raise TableError(f"transformers renames {saved} to {loaded}: no prefix rename gives it")
    return ordered


def _split_sizes(bridge, sized: SizedSplitKind) -> str:
    """The table's sizes entry (source text) of a :class:`SizedSplitKind`: the Hugging Face fields
    the bridge's ``CONFIG_MAPPING`` maps to its megatron-core fields."""
    hf_of = {megatron: hf for hf, megatron in bridge.CONFIG_MAPPING if isinstance(hf, str)}
    missing = [megatron for _, megatron in sized.size_fields if megatron not in hf_of]
    if missing:
        raise TableError(f"{bridge.__name__} maps mixers split by {sized.sizes_class} but its CONFIG_MAPPING names "
                         f"no Hugging Face field for {', '.join(missing)}")
    fields = ", ".join(f"{field}={_quoted(hf_of[megatron])}" for field, megatron in sized.size_fields)
    return f"{sized.sizes_class}({fields})"


def _is_image_text(model_type: str) -> bool:
    """Whether transformers' own registry loads ``model_type`` as an image-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _renamed_prefixes(saved: str, loaded: str, narrowed: int) -> tuple[str, str]:
    """The two names' prefixes before their longest common dotted suffix (a part of each name
    left at least), ``narrowed`` parts of that suffix kept with them."""
    saved_parts, loaded_parts = saved.split("."), loaded.split(".")
    common = 0
    while common < min(len(saved_parts), len(loaded_parts)) - 1 and \
            saved_parts[-1 - common] == loaded_parts[-1 - common]:
        common += 1
    common = max(common - narrowed, 0)
    return (".".join(saved_parts[:len(saved_parts) - common]) + ".",
            ".".join(loaded_parts[:len(loaded_parts) - common]) + ".")


def _without_outputs(each: GeneratedRule, dropped: tuple[str, ...]) -> str | None:
    """``each`` keeping only the outputs that no ``dropped`` infix names (``KeepParts``), or None
    where it keeps them all."""
    import ast

    if not each.hf:
        if any(infix in each.text for infix in dropped):
            raise TableError(f"{each.megatron}: outputs to drop on some layers, in a rule of a kind that cannot drop them")
        return None
    kept = [index for index, name in enumerate(each.hf) if not any(infix in name for infix in dropped)]
    if len(kept) == len(each.hf):
        return None
    options = dict(each.options)
    if options.get("lora_parts"):
        parts = [ast.literal_eval(options["lora_parts"])[index] for index in kept]
        options["lora_parts"] = "(" + ", ".join(_quoted(part) for part in parts) + ("," if len(parts) == 1 else "") + ")"
        options["lora_parts"] = options["lora_parts"] if parts else ""
    ops = each.ops + f", KeepParts({', '.join(str(index) for index in kept)})"
    return _rule(each.megatron, [each.hf[index] for index in kept], ops, **options)


def _checked_builder(model_type: str, translation: _Translation) -> list[str]:
    """The source of a ``TableBuilder`` over ``_TABLE``: the reviewed config check of
    :data:`CONFIG_CHECKS` and, for :data:`LAST_LAYERS_WITHOUT`, the last layers' rules."""
    check = CONFIG_CHECKS[model_type].partition(":")[2]
    lines = ["", "TABLE = TableBuilder(", f"    model_types=({_quoted(model_type)},),", f"    build=CheckedTable(_TABLE, {check}"]
    if model_type in LAST_LAYERS_WITHOUT:
        count_key, dropped = LAST_LAYERS_WITHOUT[model_type]
        reduced = [text for text in (_without_outputs(each, dropped) for each in translation.rules) if text]
        if not reduced:
            raise TableError(f"{model_type}: no rule has outputs {list(dropped)} to drop on the last layers")
        lines[-1] += f", LastLayersRules({_quoted(count_key)}, ("
        lines += [f"        {text}," for text in reduced]
        lines.append("    ))),")
    else:
        lines[-1] += "),"
    lines += ["    description=_TABLE.description,", ")", ""]
    return lines


def _sizes_imports(translation: _Translation) -> list[str]:
    blocks = sorted({name for sized in translation.sized_splits for name in (sized.parts, sized.stored_parts)})
    sizes = sorted({sized.sizes_class for sized in translation.sized_splits}
                   | ({"VisionSizes"} if translation.vision_sizes else set())
                   | ({"LayerTypeSizes"} if translation.wide_layer_type else set()))
    return [*([f"from bridge_ext.tables.blocks import {', '.join(blocks)}"] if blocks else []),
            *([f"from bridge_ext.tables.sizes import {', '.join(sizes)}"] if sizes else [])]


def render(model_type: str, entry: RegisteredBridge, translation: _Translation,
           in_memory_prefixes: tuple[tuple[str, str], ...] = ()) -> str:
    from bridge_ext.tables.architecture_notes import (
        COMPANION_FILES,
        EXTRA_CONFIG_FIELDS,
        HF_DEFAULTS,
        HF_LOAD_REPAIRS,
        LEFT_OUT_NOTES,
        SHIPPED_REMOTE_CODE,
        UNCOMPARED,
    )

    bridge = entry.bridge_class
    uncompared = UNCOMPARED.get(model_type, {})
    extra_fields = EXTRA_CONFIG_FIELDS.get(model_type, ())
    defaults = HF_DEFAULTS.get(model_type, {})
    lines = [
        f'"""{entry.source} ({model_type}): generated by `bridge-ext tables generate {model_type}` from',
        f"Megatron-Bridge {megatron_bridge_version()}'s {bridge.__name__}.mapping_registry()",
        f"({bridge.__module__}).",
        "",
        "Do not edit: regenerate (a Megatron-Bridge upgrade shows as a diff). A hand-written table of the",
        "same model type wins over this one. Left out: MTP layers and vision / audio towers."
        if model_type not in TOWERS_GENERATED else
        "same model type wins over this one. Left out: MTP layers. The tower's rules are Megatron-Bridge's",
        *(["'**' subtrees expanded on the tiny models (proven by the conformance entry of this model type)."]
          if model_type in TOWERS_GENERATED else []),
    ]
    if model_type in HF_NAME_RENAMES:  # reviewed by hand: bridge_ext.tables.architecture_notes.HF_NAME_RENAMES
        pairs = "; ".join(f"{bridge} -> {saved}" for bridge, saved in HF_NAME_RENAMES[model_type])
        lines += ["", *textwrap.wrap("The bridge's Hugging Face names are written as transformers saves them "
                                     "(architecture_notes.HF_NAME_RENAMES): " + pairs, 96)]
    if model_type in LEFT_OUT_NOTES:  # reviewed by hand: bridge_ext.tables.architecture_notes.LEFT_OUT_NOTES
        lines += ["", *textwrap.wrap("Also left out: " + LEFT_OUT_NOTES[model_type], 96)]
    if translation.absent:
        lines += ["", "Mappings of weights the tiny model lacks (their parallel kind cannot be read off a module),",
                  "left out so that such a weight is refused as unmapped:"]
        lines += [f"    {name}" for name in translation.absent]
    ops = ["AddOne", "Concat", "SplitGroupedRows", "SplitRows", "TrimVocab"]
    ops += [op for op in ("SplitHeadGroups", "SplitQKVHeadDims", "Transpose")
            if any(f"{op}(" in each.text for each in translation.rules)]
    ops += ["KeepParts"] if model_type in LAST_LAYERS_WITHOUT else []
    ops += [re.match(r"\w+", op)[0] for each in KINDS_WITH_OPS.values() for op in each[1:]
            if any(op in rule.text for rule in translation.rules)]
    ops += ["Transpose"] if any("Transpose()" in each.text for each in translation.rules) else []
    ops_import = f"from bridge_ext.ops import {', '.join(sorted(set(ops)))}  # noqa: F401"
    checked = model_type in CONFIG_CHECKS
    check_module, _, check = CONFIG_CHECKS.get(model_type, "").partition(":")
    shipped = SHIPPED_REMOTE_CODE.get(model_type)
    if shipped:  # reviewed by hand: bridge_ext.tables.architecture_notes.SHIPPED_REMOTE_CODE
        lines += ["", *textwrap.wrap(f"transformers has no {entry.source}: the key set is that of Megatron-Bridge's "
                                     f"shipped copy of the published remote code, registered with transformers' auto "
                                     f"classes by importing {shipped} (register_hf_config).", 96)]
    lines += ['"""', "", *(["from functools import partial", "from importlib import import_module", ""] if shipped else []),
              ops_import,
              ("from bridge_ext.table import ExpertFamily, MappingTable, TableBuilder, rule" if checked else
               "from bridge_ext.table import ExpertFamily, MappingTable, rule"),
              *([f"from {check_module} import {check}", "from bridge_ext.tables.layer_rules import CheckedTable, "
                 "LastLayersRules"] if checked else []),
              *([f"from bridge_ext.tables.remote_code import {HF_LOAD_REPAIRS[model_type]}"]
                if model_type in HF_LOAD_REPAIRS else []),
              *_sizes_imports(translation),
              *(["from bridge_ext.config_compare import ConfigField"] if extra_fields else []),
              *(["from bridge_ext.tables.config_fields import standard"] if uncompared or extra_fields or defaults
                else []), "",
              f'MEGATRON_BRIDGE_VERSION = "{megatron_bridge_version()}"']
    families = "()"
    if translation.expert_parameters:
        parameters = ", ".join(_quoted(name) for name in translation.expert_parameters)
        parameters += "," if len(translation.expert_parameters) == 1 else ""
        lines.append(f'EXPERTS = ExpertFamily("experts", ({parameters}))')
        families = "(EXPERTS,)"
    lines += ["", f"{'_TABLE' if checked else 'TABLE'} = MappingTable(", f"    model_types=({_quoted(model_type)},),",
              "    rules=("]
    lines += [f"        {each.text}," for each in translation.rules]
    description = f"{entry.source} (generated from Megatron-Bridge {megatron_bridge_version()})"
    lines += ["    ),", f'    description="{description}",',
              f"    model_classes={{{_quoted(model_type)}: {_quoted(entry.source)}}},"]
    if _is_image_text(model_type):  # the Auto class that loads its folders (MappingTable.hf_auto_class)
        lines.append('    hf_auto_class="AutoModelForImageTextToText",')
    lines.append(f"    expert_families={families},")
    if translation.config_offsets:  # expert indices offset by these config fields (an expert pool after another)
        lines.append(f"    config_offsets=({', '.join(_quoted(name) for name in translation.config_offsets)},),")
    sizes = [*sorted({_split_sizes(bridge, sized) for sized in translation.sized_splits}),
             *([_vision_sizes_source(translation.vision_sizes)] if translation.vision_sizes else []),
             # SplitQKVHeadDims' global_head_dim: that layer type's, per layer
             *([f'LayerTypeSizes({_quoted(translation.wide_layer_type)}, (("global_head_dim", "head_dim"),))']
               if translation.wide_layer_type else [])]
    if sizes:  # the rules' operations name these sizes
        lines += ["    sizes=(", *(f"        {each}," for each in sizes), "    ),"]
    if translation.sized_splits:  # torch_dist stores the mixer's parts apart
        stored = sorted({sized.stored_parts for sized in translation.sized_splits})
        lines.append(f"    stored_split_parts={' + '.join(stored)},")
    if shipped:
        lines.append(f"    register_hf_config=partial(import_module, {_quoted(shipped)}),")
    if model_type in HF_LOAD_REPAIRS:  # reviewed by hand: bridge_ext.tables.architecture_notes.HF_LOAD_REPAIRS
        lines.append(f"    repair_hf_model={HF_LOAD_REPAIRS[model_type]},")
    if model_type in COMPANION_FILES:  # reviewed by hand: bridge_ext.tables.architecture_notes.COMPANION_FILES
        lines.append(f"    companion_files=({', '.join(_quoted(name) for name in COMPANION_FILES[model_type])},),")
    published = PUBLISHED_PREFIXES.get(model_type, ())
    if published:  # transformers saves these prefixes otherwise than the published checkpoints
        lines.append("    saved_name_fixes=(")
        lines += [f"        ({_quoted('^' + re.escape(saved) + '(?!' + re.escape(public[len(saved):]) + ')')}, "
                  f"{_quoted(public)}),"
                  for saved, public in published]
        lines.append("    ),")
    if in_memory_prefixes:  # transformers renames these on load: adapters use the in-memory names
        lines.append("    in_memory_prefixes=(")
        lines += [f"        ({_quoted(saved)}, {_quoted(loaded)})," for saved, loaded in in_memory_prefixes]
        lines.append("    ),")
    if translation.expert_parameters and entry.source in VLLM_PER_EXPERT_ADAPTERS:
        lines.append(f'    vllm_expert_adapter_layouts={{{_quoted(entry.source)}: "per_expert"}},')
    unapplied = VLLM_ADAPTERS_REFUSED.get(entry.source)
    if unapplied:  # reviewed by hand: bridge_ext.tables.architecture_notes.VLLM_ADAPTERS_REFUSED
        lines.append("    vllm_adapters_refused=(")
        lines += [f"        {_quoted(piece)}" for piece in textwrap.wrap(unapplied, 88, drop_whitespace=False)]
        lines.append("    ),")
    renames = IN_MEMORY_RENAMES.get(model_type)
    if renames:  # reviewed by hand: bridge_ext.tables.architecture_notes.IN_MEMORY_RENAMES
        lines.append("    in_memory_renames=(")
        lines += [f"        ({_quoted(saved)}, {_quoted(loaded)})," for saved, loaded in renames]
        lines.append("    ),")
    refused = REFUSED_CONFIG_FIELDS.get(model_type)
    if refused:  # reviewed by hand: bridge_ext.tables.architecture_notes.REFUSED_CONFIG_FIELDS
        lines.append("    refused_config_fields={")
        for name, why in refused.items():
            lines.append(f"        {_quoted(name)}: (")
            lines += [f"            {_quoted(piece)}" for piece in textwrap.wrap(why, 80, drop_whitespace=False)]
            lines.append("        ),")
        lines.append("    },")
    if uncompared or extra_fields or defaults:  # reviewed: architecture_notes.UNCOMPARED / EXTRA_CONFIG_FIELDS / HF_DEFAULTS
        pad = "        " if extra_fields else "    "
        call = "*standard(" if extra_fields else "config_fields=standard("
        standard_lines = [f"{pad}{call}),"]
        if uncompared or defaults:
            standard_lines = [f"{pad}{call}{{"]
            for name, why in uncompared.items():
                pieces = textwrap.wrap(why, 80, drop_whitespace=False)
                standard_lines.append(f"{pad}    {_quoted(name)}: (")
                standard_lines += [f"{pad}        {_quoted(piece)}" for piece in pieces]
                standard_lines.append(f"{pad}    ),")
            shown = ", ".join(f"{_quoted(name)}: {value!r}" for name, value in defaults.items())
            standard_lines.append(f"{pad}}}, defaults={{{shown}}})," if defaults else f"{pad}}}),")
        if extra_fields:
            lines.append("    config_fields=(")
        lines += standard_lines
        if extra_fields:
            lines += [f"        ConfigField({', '.join(_quoted(part) for part in field)})," for field in extra_fields]
            lines.append("    ),")
    lines += [")", ""]
    if checked:
        lines += _checked_builder(model_type, translation)[1:]
    return "\n".join(lines)
