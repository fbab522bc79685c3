"""Rule application: a rule's operations on one Megatron tensor, given as tensor-parallel shards."""

from __future__ import annotations

import torch

from bridge_ext.dims import ModelDims
from bridge_ext.errors import RuleError
from bridge_ext.ops import Op
from bridge_ext.table import Rule

__all__ = ["RuleRunner", "apply_ops", "run_rule"]


def apply_ops(rule: Rule, ops: list[Op], tensors: list[torch.Tensor], dims: ModelDims, *, reverse: bool = False,
              what: str | None = None) -> list[torch.Tensor]:
    """``ops`` (forward, or reversed in reverse) on ``tensors``; an operation that cannot
    convert them raises :class:`RuleError` naming the rule, ``what`` (the tensors concerned)
    and the shapes."""
    for op in reversed(ops) if reverse else ops:
        try:
            tensors = op.reverse(tensors, dims) if reverse else op.forward(tensors, dims)
        except (ValueError, RuntimeError, KeyError) as error:
            detail = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise RuleError(
                f"{what or rule.megatron}: {type(op).__name__}{'.reverse' if reverse else ''} of the rule "
                f"{rule.megatron} -> {list(rule.hf)} cannot convert shapes {[tuple(t.shape) for t in tensors]}: {detail}"
            ) from None
    return tensors


def run_rule(rule: Rule, shards: list[torch.Tensor], dims: ModelDims, *, axis: int | None = None,
             rows_only: bool = False, what: str | None = None) -> list[torch.Tensor]:
    """Convert one Megatron tensor, given as tensor-parallel shards, with the rule's ops.

    ``axis`` overrides the concatenation axis of the shards (LoRA factors are split over
    ranks differently from their base weight); ``rows_only`` skips value-changing ops and a
    final transpose, and is how a ``lora_B`` goes through its base weight's rule. ``what``
    names the tensors in errors (e.g. ``"decoder.layers.3.x.weight -> ['model.layers.3.y']"``).
    """
    per_rank = [op for op in rule.ops if op.per_rank]
    global_ops = [op for op in rule.ops
                  if not op.per_rank and not (rows_only and (op.changes_values or op.transposes))]
    if rule.tp == "replicated" and axis is None:
        shards = shards[:1]
    parts_by_rank = [apply_ops(rule, per_rank, [shard], dims, what=what) for shard in shards]
    if len(parts_by_rank) == 1:
        parts = parts_by_rank[0]
    else:
        cat_axis = axis if axis is not None else (1 if rule.tp == "row" else 0)
        try:
            parts = [torch.cat(same_part, dim=cat_axis) for same_part in zip(*parts_by_rank)]
        except RuntimeError as error:
            raise RuleError(f"{what or rule.megatron}: its tensor-parallel shards "
                            f"{[tuple(shard.shape) for shard in shards]} do not join: {error}") from None
    return apply_ops(rule, global_ops, parts, dims, what=what)


class RuleRunner:
    """:func:`run_rule` for one model's sizes; on meta tensors once per rule, shard shapes and
    options (the experts of a stacked task share them, and a check of a large MoE runs thousands)."""

    def __init__(self, dims: ModelDims):
        self.dims = dims
        self._on_meta: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, rule: Rule, shards: list[torch.Tensor], *, what: str | None = None,
                 axis: int | None = None, rows_only: bool = False) -> list[torch.Tensor]:
        if not shards[0].is_meta:
            return run_rule(rule, shards, self.dims, axis=axis, rows_only=rows_only, what=what)
        key = (rule, tuple(tuple(shard.shape) for shard in shards), axis, rows_only)
        if key not in self._on_meta:
            self._on_meta[key] = run_rule(rule, shards, self.dims, axis=axis, rows_only=rows_only, what=what)
        return self._on_meta[key]
