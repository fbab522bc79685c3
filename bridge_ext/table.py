"""Mapping tables: which Megatron parameter becomes which Hugging Face tensor(s), and how.

A :class:`Rule` is data: a Megatron name pattern, the Hugging Face pattern(s) it becomes, a
chain of operations (:mod:`bridge_ext.ops`) and how the tensor is split over
tensor-parallel ranks. The same rule converts the base weight, its LoRA factors, and (in
reverse) a Hugging Face tensor back to Megatron. A :class:`MappingTable` is an ordered list
of rules for some Hugging Face ``model_type`` s; the first matching rule wins.

Beside its rules a table states every convention of its architecture that the generic
engine needs: the transformers class per model type, the MoE expert families (their layout
variants and the order PEFT nests their fused parameters in), the Hugging Face tensors that
transformers does not build (MTP layers), and the expert-adapter layout vLLM loads. A table
whose names depend on the config is a :class:`TableBuilder`. docs/adding_an_architecture.md
walks through the fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from bridge_ext.config_compare import ConfigField
from bridge_ext.dims import ModelDims, Sizes, text_config
from bridge_ext.errors import TableError
from bridge_ext.fp8_rules import Fp8Rules
from bridge_ext.ops import Op
from bridge_ext.patterns import NamePattern

TensorParallel = Literal["column", "row", "replicated"]
#: MoE experts as one ``[E, ...]`` tensor per parameter (transformers v5 in memory, PEFT's
#: ``target_parameters``), one tensor per expert (``experts.{e}.gate_proj.weight``), or fused
#: with each expert's matrix stored ``[in, out]`` (published Qwen3-VL-MoE checkpoints; only
#: tables with ``fused_transposed`` rule variants offer it).
ExpertLayout = Literal["fused", "per_expert", "fused_transposed"]
EXPERT_LAYOUTS: tuple[ExpertLayout, ...] = ("fused", "per_expert", "fused_transposed")


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter pattern -> Hugging Face tensor pattern(s).

    Attributes:
        megatron: Megatron name pattern, e.g. ``decoder.layers.{layer}.mlp.linear_fc1.weight``.
        hf: Hugging Face name pattern(s), one per tensor the operations produce.
        ops: Operations, ``per_rank`` ones first (see :mod:`bridge_ext.ops`).
        tp: How Megatron splits the tensor over tensor-parallel ranks: ``column`` (rows; also
            vocabulary-parallel embeddings), ``row`` (columns) or ``replicated``.
        stack: A wildcard absent from ``hf`` whose values are stacked on a new dim 0, in
            ascending order (experts fused into one ``[E, ...]`` tensor).
        shared: A wildcard absent from ``hf`` whose tensors must all be equal and are emitted
            once (a Hugging Face tensor Megatron keeps one copy of per depth, e.g. MTP).
        variant: Rules with a variant apply only when the export asks for it: an expert
            family's layout (:meth:`ExpertFamily.variant`); rules without one always apply.
        lora_parts: Megatron-Bridge CanonicalLoRA's adapter of each ``hf`` output, by part name
            (``("q", "k", "v")``: ``adapter.adapter_q`` adapts the first output); empty where
            CanonicalLoRA keeps one adapter.
        lora_fused: The name pattern (as saved) of the one linear transformers loads the rule's
            outputs into, their rows concatenated in order (MiniMax-M3 loads ``gate_proj`` and
            ``up_proj`` as ``gate_up_proj``): PEFT keys one adapter there, so the rule's LoRA
            goes out as one pair, ``A`` shared, ``B`` the outputs' ``B`` rows concatenated.
    """

    megatron: str
    hf: tuple[str, ...]
    ops: tuple[Op, ...] = ()
    tp: TensorParallel = "column"
    stack: str | None = None
    shared: str | None = None
    variant: str | None = None
    lora_parts: tuple[str, ...] = ()
    lora_fused: str | None = None
    megatron_pattern: NamePattern = field(init=False, repr=False, compare=False)
    hf_patterns: tuple[NamePattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        object.__setattr__(self, "megatron_pattern", NamePattern(self.megatron))
        object.__setattr__(self, "hf_patterns", tuple(NamePattern(text) for text in self.hf))
        self._validate()
        if self.lora_fused is not None and (
                self.stack or self.shared or self.transposes or self.lora_parts or len(self.hf) < 2
                or set(NamePattern(self.lora_fused).wildcards) != set(self.megatron_pattern.wildcards)):
            raise TableError(f"{self.megatron}: lora_fused {self.lora_fused} needs several outputs, the rule's "
                             "wildcards, and no stack, shared, transpose or lora_parts")

    def _validate(self) -> None:
        seen_global = False
        for op in self.ops:
            if op.per_rank and seen_global:
                raise TableError(f"{self.megatron}: per-rank operations must come first")
            seen_global = seen_global or not op.per_rank
        if any(op.transposes for op in self.ops[:-1]):
            raise TableError(f"{self.megatron}: a transpose must be the last operation (LoRA factors swap there)")
        if self.tp == "row" and any(op.per_rank for op in self.ops):
            raise TableError(f"{self.megatron}: row-parallel rules cannot split rows per rank")
        megatron_wildcards = set(self.megatron_pattern.wildcards)
        reduced = {name for name in (self.stack, self.shared) if name}
        for pattern in self.hf_patterns:
            missing = set(pattern.wildcards) - megatron_wildcards
            dropped = megatron_wildcards - set(pattern.wildcards)
            if missing or dropped != reduced:
                raise TableError(
                    f"{self.megatron} -> {pattern.text}: wildcards must agree "
                    f"(only stack/shared ones may be dropped)"
                )

    @property
    def changes_values(self) -> bool:
        return any(op.changes_values for op in self.ops)

    @property
    def transposes(self) -> bool:
        return any(op.transposes for op in self.ops)

    def hf_names(self, values: dict[str, str]) -> list[str]:
        return [pattern.fill(values) for pattern in self.hf_patterns]

    def lora_fused_name(self, values: dict[str, str]) -> str | None:
        """The saved name of the linear that takes the rule's one LoRA pair (:attr:`lora_fused`)."""
        return NamePattern(self.lora_fused).fill(values) if self.lora_fused else None

    def prefixed(self, megatron_prefix: str, hf_prefix: str) -> Rule:
        """The same rule under other name prefixes (a sub-model, an MTP layer)."""
        return replace(
            self,
            megatron=megatron_prefix + self.megatron,
            hf=tuple(hf_prefix + text for text in self.hf),
            lora_fused=hf_prefix + self.lora_fused if self.lora_fused else None,
        )


def rule(
    megatron: str,
    hf: str | Sequence[str],
    *ops: Op,
    tp: TensorParallel = "column",
    stack: str | None = None,
    shared: str | None = None,
    variant: str | None = None,
    lora_parts: tuple[str, ...] = (),
    lora_fused: str | None = None,
) -> Rule:
    """Shorthand for :class:`Rule`: ``rule(megatron, hf, op, op, tp="row")``."""
    hf_tuple = (hf,) if isinstance(hf, str) else tuple(hf)
    return Rule(megatron, hf_tuple, tuple(ops), tp=tp, stack=stack, shared=shared, variant=variant,
                lora_parts=lora_parts, lora_fused=lora_fused)


def prefixed(rules: Iterable[Rule], megatron_prefix: str, hf_prefix: str) -> list[Rule]:
    return [each.prefixed(megatron_prefix, hf_prefix) for each in rules]


@dataclass(frozen=True)
class RuleMatch:
    rule: Rule
    values: dict[str, str]


@dataclass(frozen=True)
class ExpertFamily:
    """MoE experts of one part of the model, exported per expert or fused ``[E, ...]``.

    Attributes:
        name: The family's rules carry ``variant=family.variant(layout)`` for each layout.
        parameters: The fused Hugging Face parameter names of one experts module in the
            order the transformers module registers them (PEFT wraps ``target_parameters``
            in this order, the first innermost: it decides the saved adapter keys).
        extra: Its tensors lie outside transformers' key set (experts of MTP layers).
    """

    name: str
    parameters: tuple[str, ...]
    extra: bool = False

    def variant(self, layout: ExpertLayout) -> str:
        return f"{self.name}:{layout}"


@dataclass(frozen=True)
class ExtraWeights:
    """Hugging Face tensors an architecture's checkpoints hold but transformers neither builds
    nor saves (MTP layers): names under ``prefixes``, checked against source files instead of
    transformers' key set, and exported only when the config's ``count_key`` is positive."""

    prefixes: tuple[str, ...]
    count_key: str

    def holds(self, hf_name: str) -> bool:
        return hf_name.startswith(self.prefixes)

    def count(self, config) -> int:
        """How many such layers ``config`` (or its text config) declares."""
        for holder in (config, text_config(config)):
            value = getattr(holder, self.count_key, None)
            if value:
                return int(value)
        return 0


@dataclass(frozen=True)
class MappingTable:
    """The rules of one architecture family, for the listed Hugging Face model types.

    Attributes:
        model_types: The Hugging Face ``model_type`` s it serves.
        rules: Ordered; the first matching rule wins.
        description: One line for people.
        model_classes: ``model_type`` -> the transformers class whose checkpoint names the
            rules produce (e.g. the causal LM rather than the base model); default: the
            config's ``architectures[0]``, else transformers' causal-LM auto class.
        expert_families: The MoE expert families the rules' variants name.
        extra_weights: Tensors outside transformers' key set (MTP layers), if any.
        vllm_expert_adapter_layouts: Hugging Face architecture class (``config.architectures``)
            -> the expert-adapter layout vLLM loads for a model of that class: what a live
            export (weight sync) writes by default. vLLM decides it by the class it builds
            (``is_3d_moe_weight``), not by ``model_type``: e.g. ``Qwen3_5MoeForCausalLM`` is
            per expert and ``Qwen3_5MoeForConditionalGeneration`` fused.
        vllm_expert_layouts: Architecture class -> the one base expert layout vLLM's loaders
            for that class (and its MTP drafter) take (e.g. ``DeepseekV3ForCausalLM``: per
            expert, its loader raises ``KeyError`` on fused experts); a class not listed loads both. An
            ``adapter_for="vllm"`` export refuses the other layout and defaults to this one.
        in_memory_prefixes: ``(checkpoint prefix, in-memory prefix)`` pairs, first fit wins,
            where transformers renames on load (Qwen2.5-VL: ``model.`` -> ``model.language_model.``,
            ``visual.`` -> ``model.visual.``): the rules name the checkpoint; adapter keys and
            PEFT's targets use the in-memory names.
        in_memory_renames: ``(saved infix, in-memory infix)`` pairs, each replaced in turn
            after ``in_memory_prefixes``, where transformers renames mid-key on load (HY-V3:
            ``.mlp.shared_mlp.`` -> ``.mlp.shared_experts.``): rules and base weights keep the
            saved names; adapter keys and PEFT's targets use the in-memory ones, except in
            ``adapter_for="vllm"`` exports (vLLM's modules carry the saved names, and it maps
            no such rename).
        saved_name_fixes: ``(regex, replacement)`` pairs applied in order to transformers'
            save-time key set where its ``save_pretrained`` writes names the published
            checkpoints do not hold (a conversion whose reverse is wrong: transformers 5.23
            saves Kimi-K2.5's ``language_model.model.layers`` as ``...model.blocks``); the
            fixed set is the reference every export is checked against.
        fp8: Which weights a block-FP8 export quantizes and which linears stay bf16 (None: the
            table offers no FP8 export). See :mod:`bridge_ext.fp8_rules`.
        published_renames: ``(regex, replacement)`` pairs, first match wins, from the names
            transformers' ``save_pretrained`` writes to the published checkpoint's names the rules
            produce, where the two differ (DeepSeek-V4: transformers reverts its renames key by key
            and leaves a mixture); :func:`bridge_ext.hf_keys.hf_checkpoint_keys` applies them.
        adapters_refused: Why no PEFT adapter of this family can be exported (None: they can);
            an export or conversion that asks for adapters is refused with it before the first
            tensor (merged exports are unaffected).
        vllm_adapters_refused: Why vLLM would apply none of this family's adapters (None: it
            applies them); an ``adapter_for="vllm"`` export or folder that carries adapters is
            refused with it before the first tensor (merged weights are what vLLM then takes).
        stored_split_parts: Megatron weights a torch_dist checkpoint stores as several keys
            (``<weight>.<part>``): each split-tensor factory's parts, in the order they join
            (e.g. Gated DeltaNet's ``("query", "key", "value", "z", "beta", "alpha")``).
        stored_stacked_lists: Module lists a torch_dist checkpoint stores on a leading axis
            beyond the decoder's ``layers`` and the experts (Qwen3-VL: ``deepstack_merger_list``).
        hf_auto_class: The transformers Auto class that loads a folder of this table's models
            (``AutoModelForImageTextToText`` for image-text models).
        sizes: Named sizes the rules' operations use beyond the common ones of
            :class:`~bridge_ext.dims.ModelDims` (hidden, heads, groups, vocabulary...), each
            stating where the config keeps them (e.g. :class:`~bridge_ext.tables.sizes.MambaSizes`).
        companion_files: Files of the source folder beyond the tokenizer, template and generation
            files that transformers' class needs to load the model (Qwen2.5-Omni's speaker
            dictionary ``spk_dict.pt``): copied into a model folder like those.
    """

    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    description: str = ""
    model_classes: Mapping[str, str] = field(default_factory=dict, compare=False)
    expert_families: tuple[ExpertFamily, ...] = ()
    extra_weights: ExtraWeights | None = None
    vllm_expert_adapter_layouts: Mapping[str, ExpertLayout] = field(default_factory=dict, compare=False)
    vllm_expert_layouts: Mapping[str, ExpertLayout] = field(default_factory=dict, compare=False)
    in_memory_prefixes: tuple[tuple[str, str], ...] = ()
    in_memory_renames: tuple[tuple[str, str], ...] = ()
    saved_name_fixes: tuple[tuple[str, str], ...] = ()
    fp8: Fp8Rules | None = field(default=None, compare=False)
    published_renames: tuple[tuple[str, str], ...] = ()
    adapters_refused: str | None = field(default=None, compare=False)
    vllm_adapters_refused: str | None = field(default=None, compare=False)
    stored_split_parts: tuple[tuple[str, ...], ...] = ()
    hf_auto_class: str = "AutoModelForCausalLM"
    stored_stacked_lists: tuple[str, ...] = ()
    sizes: tuple[Sizes, ...] = field(default=(), compare=False)
    companion_files: tuple[str, ...] = field(default=(), compare=False)
    #: Registers with transformers what reading this family's config needs (e.g. a config class
    #: for a model type transformers lacks); run by :func:`bridge_ext.tables.register_transformers_configs`
    #: where bridge_ext reads a config, never at import.
    register_hf_config: Callable[[], object] | None = field(default=None, compare=False)
    #: The config fields that change the arithmetic, compared with the Megatron model's settings
    #: before export (:mod:`bridge_ext.config_compare`); None: ``bridge_ext.tables.config_fields.STANDARD``.
    config_fields: tuple[ConfigField, ...] | None = field(default=None, compare=False)
    #: Config fields whose presence means a config this table must not be used with, and why
    #: (a remote-code config transformers reads as defaults): refused by
    #: :func:`bridge_ext.tables.table_for` before anything is planned.
    refused_config_fields: Mapping[str, str] = field(default_factory=dict, compare=False)

    def architecture(self, config) -> str | None:
        """The Hugging Face architecture class vLLM builds for ``config``: its
        ``architectures[0]``, else the table's transformers class for its model type."""
        architectures = getattr(config, "architectures", None)
        return architectures[0] if architectures else self.model_classes.get(config.model_type)

    def dims(self, config) -> ModelDims:
        """The sizes of ``config`` the rules' operations name (the common ones and :attr:`sizes`)."""
        return ModelDims.from_hf_config(config, self.sizes)

    def vllm_expert_adapter_layout(self, config) -> ExpertLayout:
        """The expert-adapter layout vLLM loads for ``config``'s architecture class; PEFT's
        ``fused`` for a class the table does not list."""
        return self.vllm_expert_adapter_layouts.get(self.architecture(config) or "", "fused")

    def vllm_expert_layout(self, config) -> ExpertLayout | None:
        """The only base expert layout vLLM loads for ``config``'s architecture class, or None
        where it loads both."""
        return self.vllm_expert_layouts.get(self.architecture(config) or "")

    @property
    def renames_in_memory(self) -> bool:
        """Whether transformers holds some of the table's names otherwise in memory."""
        return bool(self.in_memory_prefixes or self.in_memory_renames)

    def in_memory_name(self, hf_name: str, *, renames: bool = True) -> str:
        """``hf_name`` as the model in memory spells it (where PEFT matches and keys adapters):
        the first ``(checkpoint prefix, in-memory prefix)`` of ``in_memory_prefixes`` that fits,
        then (``renames``) every ``in_memory_renames`` pair."""
        for saved, loaded in self.in_memory_prefixes:
            if hf_name.startswith(saved):
                hf_name = loaded + hf_name[len(saved):]
                break
        for saved, loaded in self.in_memory_renames if renames else ():
            hf_name = hf_name.replace(saved, loaded)
        return hf_name

    def published_name(self, saved: str) -> str:
        """``saved`` (a name transformers' ``save_pretrained`` writes) as the rules name it."""
        for pattern, replacement in self.published_renames:
            if re.search(pattern, saved):
                return re.sub(pattern, replacement, saved)
        return saved

    def __post_init__(self) -> None:
        known = {family.name for family in self.expert_families}
        for each in self.rules:
            if each.variant is not None and each.variant.partition(":")[0] not in known:
                raise TableError(f"{each.megatron}: variant {each.variant!r} names no expert family of the table")

    def family(self, candidate: Rule) -> ExpertFamily | None:
        """The expert family whose layout variant ``candidate`` belongs to."""
        if candidate.variant is None:
            return None
        name = candidate.variant.partition(":")[0]
        return next(family for family in self.expert_families if family.name == name)

    def match(self, megatron_name: str, variants: frozenset[str] = frozenset()) -> RuleMatch | None:
        for candidate in self.rules:
            if candidate.variant is not None and candidate.variant not in variants:
                continue
            values = candidate.megatron_pattern.match(megatron_name)
            if values is not None:
                return RuleMatch(candidate, values)
        return None

    def match_hf(self, hf_name: str, variants: frozenset[str] = frozenset()) -> tuple[RuleMatch, int] | None:
        """The rule producing ``hf_name`` and which of its outputs it is (reverse direction)."""
        for candidate in self.rules:
            if candidate.variant is not None and candidate.variant not in variants:
                continue
            for index, pattern in enumerate(candidate.hf_patterns):
                values = pattern.match(hf_name)
                if values is not None:
                    return RuleMatch(candidate, values), index
        return None

    def expert_layouts_of(self, hf_names: Iterable[str]) -> dict[str, ExpertLayout]:
        """The layout each expert family has in a list of Hugging Face names (families whose
        experts do not occur are left out): read off the rules, first name decides."""
        variant_rules = [candidate for candidate in self.rules if candidate.variant is not None]
        found: dict[str, ExpertLayout] = {}
        for name in hf_names:
            if len(found) == len(self.expert_families):
                break
            for candidate in variant_rules:
                if any(pattern.match(name) is not None for pattern in candidate.hf_patterns):
                    family, _, layout = candidate.variant.partition(":")
                    found.setdefault(family, layout)
                    break
        return found


@dataclass(frozen=True)
class TableBuilder:
    """A table whose names depend on the config (e.g. MTP layers numbered after the decoder's
    layers: ``model.layers.{depth+61}``); ``build(config)`` makes the table."""

    model_types: tuple[str, ...]
    build: Callable[[object], MappingTable]
    description: str = ""
    #: Registers with transformers what reading this family's config needs (e.g. a config class
    #: for a model type transformers lacks); run by :func:`bridge_ext.tables.register_transformers_configs`
    #: where bridge_ext reads a config, never at import.
    register_hf_config: Callable[[], object] | None = field(default=None, compare=False)
