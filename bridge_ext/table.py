"""Mapping tables: which Megatron parameter becomes which Hugging Face tensor(s), and how.

A :class:`Rule` is data: a Megatron name pattern, the Hugging Face pattern(s) it becomes, a
chain of operations (:mod:`bridge_ext.ops`) and how the tensor is split over
tensor-parallel ranks. The same rule converts the base weight, its LoRA factors, and (in
reverse) a Hugging Face tensor back to Megatron. A :class:`MappingTable` is an ordered list
of rules for some Hugging Face ``model_type`` s; the first matching rule wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from bridge_ext.ops import Op
from bridge_ext.patterns import NamePattern

TensorParallel = Literal["column", "row", "replicated"]


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
        variant: Rules with a variant apply only when the export asks for it (e.g.
            ``"experts:fused"``); rules without one always apply.
    """

    megatron: str
    hf: tuple[str, ...]
    ops: tuple[Op, ...] = ()
    tp: TensorParallel = "column"
    stack: str | None = None
    shared: str | None = None
    variant: str | None = None
    megatron_pattern: NamePattern = field(init=False, repr=False, compare=False)
    hf_patterns: tuple[NamePattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        object.__setattr__(self, "megatron_pattern", NamePattern(self.megatron))
        object.__setattr__(self, "hf_patterns", tuple(NamePattern(text) for text in self.hf))
        self._validate()

    def _validate(self) -> None:
        seen_global = seen_after_merge = False
        for op in self.ops:
            if op.per_rank and seen_global:
                raise ValueError(f"{self.megatron}: per-rank operations must come first")
            if seen_after_merge and not op.after_merge:
                raise ValueError(f"{self.megatron}: operations that run after merging must come last")
            seen_global = seen_global or not op.per_rank
            seen_after_merge = seen_after_merge or op.after_merge
        if self.tp == "row" and any(op.per_rank for op in self.ops):
            raise ValueError(f"{self.megatron}: row-parallel rules cannot split rows per rank")
        megatron_wildcards = set(self.megatron_pattern.wildcards)
        reduced = {name for name in (self.stack, self.shared) if name}
        for pattern in self.hf_patterns:
            missing = set(pattern.wildcards) - megatron_wildcards
            dropped = megatron_wildcards - set(pattern.wildcards)
            if missing or dropped != reduced:
                raise ValueError(
                    f"{self.megatron} -> {pattern.text}: wildcards must agree "
                    f"(only stack/shared ones may be dropped)"
                )

    @property
    def changes_values(self) -> bool:
        return any(op.changes_values for op in self.ops)

    def hf_names(self, values: dict[str, str]) -> list[str]:
        return [pattern.fill(values) for pattern in self.hf_patterns]

    def prefixed(self, megatron_prefix: str, hf_prefix: str) -> Rule:
        """The same rule under other name prefixes (a sub-model, an MTP layer)."""
        return replace(
            self,
            megatron=megatron_prefix + self.megatron,
            hf=tuple(hf_prefix + text for text in self.hf),
        )


def rule(
    megatron: str,
    hf: str | Sequence[str],
    *ops: Op,
    tp: TensorParallel = "column",
    stack: str | None = None,
    shared: str | None = None,
    variant: str | None = None,
) -> Rule:
    """Shorthand for :class:`Rule`: ``rule(megatron, hf, op, op, tp="row")``."""
    hf_tuple = (hf,) if isinstance(hf, str) else tuple(hf)
    return Rule(megatron, hf_tuple, tuple(ops), tp=tp, stack=stack, shared=shared, variant=variant)


def prefixed(rules: Iterable[Rule], megatron_prefix: str, hf_prefix: str) -> list[Rule]:
    return [each.prefixed(megatron_prefix, hf_prefix) for each in rules]


@dataclass(frozen=True)
class RuleMatch:
    rule: Rule
    values: dict[str, str]


@dataclass(frozen=True)
class MappingTable:
    """The rules of one architecture family, for the listed Hugging Face model types."""

    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    description: str = ""

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
