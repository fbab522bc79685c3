"""The LoRA rule, in one place: how a base weight's rule applies to its adapter.

Megatron-Bridge shards ``B`` over rows for every base, and ``A`` over rows (the rank dimension)
for column-parallel bases, over columns for row-parallel ones. ``B`` takes the base's row
operations (and so does anything with B's rows, e.g. a DoRA magnitude); ``A`` is shared by every
output. A final transpose swaps the factors' roles for module weights (``A' = B^T``,
``B' = A^T``); a stacked (fused parameter) output keeps the untransposed factors, as PEFT does
(see :mod:`bridge_ext.ops`), and merges its delta transposed.

Every function here takes the tensors from a :class:`~bridge_ext.source.TensorSource` and runs
rules through a :class:`~bridge_ext.engine.rules.RuleRunner`.
"""

from __future__ import annotations

import torch

from bridge_ext.engine.merge import merge
from bridge_ext.engine.rules import RuleRunner
from bridge_ext.engine.tasks import Task, describe
from bridge_ext.errors import ExportError
from bridge_ext.source import Adapter, TensorSource
from bridge_ext.table import Rule

__all__ = ["Factors", "block_diagonal_factors", "joined_lora_a", "lora_a_axis", "lora_b_rows", "lora_factors",
           "magnitude_rows", "merge_output", "packed_expert_factors", "part_factors"]

#: ``(lora_A, lora_B)`` of one Hugging Face output
Factors = tuple[torch.Tensor, torch.Tensor]


def lora_a_axis(rule: Rule) -> int:
    """The axis over which a LoRA ``A`` of ``rule``'s base is sharded across tensor-parallel ranks."""
    return 1 if rule.tp == "row" else 0


def joined_lora_a(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """A LoRA ``A`` from its tensor-parallel shards: shared by every output of the rule."""
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=lora_a_axis(rule))


def lora_b_rows(rule: Rule, shards: list[torch.Tensor], run: RuleRunner, what: str) -> list[torch.Tensor]:
    """Each Hugging Face output's rows of a ``B``-like tensor (shards joined along rows): the
    base's row operations, none that changes values or transposes."""
    return run(rule, shards, axis=0, rows_only=True, what=what)


def output_factors(rule: Rule, lora_a: torch.Tensor, lora_bs: list[torch.Tensor]) -> list[Factors]:
    """(lora_A, lora_B) per output: ``A`` shared; a transposing rule swaps the factors' roles."""
    if rule.transposes and not rule.stack:
        return [(lora_b.t().contiguous(), lora_a.t().contiguous()) for lora_b in lora_bs]
    return [(lora_a, lora_b) for lora_b in lora_bs]


def merge_output(rule: Rule, base: torch.Tensor, factors: Factors, scale: float) -> torch.Tensor:
    """``base`` (one converted output of ``rule``) with its factors' delta merged in: the swapped
    factors of a transposing rule already give the transposed delta, a stacked output's
    untransposed ones are merged transposed."""
    return merge(base, *factors, scale, transposed=rule.transposes and bool(rule.stack))


def lora_factors(rule: Rule, adapter: Adapter, source: TensorSource, run: RuleRunner,
                 what: str | None = None) -> list[Factors]:
    """(lora_A, lora_B) for each Hugging Face output of ``rule``."""
    if rule.changes_values:
        raise ExportError(f"{adapter.module} has a LoRA adapter but its rule changes values ({rule.megatron})")
    lora_a = joined_lora_a(rule, source.shards(adapter.lora_a))
    lora_bs = lora_b_rows(rule, source.shards(adapter.lora_b), run,
                          f"{adapter.lora_b} (LoRA B of {what or adapter.module})")
    return output_factors(rule, lora_a, lora_bs)


def part_factors(rule: Rule, part: Adapter, source: TensorSource) -> Factors:
    """A CanonicalLoRA part's pair: its ``B`` rows already are its output's rows (shards joined
    as they are), its ``A`` joined as any ``A``."""
    b_shards = source.shards(part.lora_b)
    lora_b = b_shards[0] if len(b_shards) == 1 else torch.cat(b_shards)
    return joined_lora_a(rule, source.shards(part.lora_a)), lora_b


def block_diagonal_factors(rule: Rule, adapter: Adapter, source: TensorSource, run: RuleRunner,
                           what: str) -> Factors:
    """CanonicalLoRA's gate and up adapters of a ``linear_fc1`` as one pair of rank ``2r``:
    ``A = [A_gate; A_up]`` ``[2r, in]`` and, per tensor-parallel shard of rows ``[gate_s; up_s]``,
    ``B_s = [[B_gate_s, 0], [0, B_up_s]]``, through the rule's row operations:
    ``B A = [B_gate A_gate; B_up A_up]``, the two adapters' deltas on their own rows."""
    gate, up = adapter.part("gate"), adapter.part("up")
    lora_a = torch.cat([part_factors(rule, part, source)[0] for part in (gate, up)])
    blocks = [torch.block_diag(g, u) for g, u in zip(source.shards(gate.lora_b), source.shards(up.lora_b),
                                                    strict=True)]
    (lora_b,) = lora_b_rows(rule, blocks, run, f"CanonicalLoRA gate and up B of {what}")
    return lora_a, lora_b


def magnitude_rows(rule: Rule, adapter: Adapter, source: TensorSource, run: RuleRunner,
                   what: str) -> list[torch.Tensor]:
    """A DoRA magnitude ``[out]`` per Hugging Face output, its rows rearranged like ``lora_B``'s
    (run through the rule as a one-column matrix)."""
    if rule.transposes or rule.stack:
        raise ExportError(f"{what}: DoRA on a weight Hugging Face stores transposed or fused "
                          "takes its norm over another axis; not supported")
    columns = [shard.unsqueeze(1) for shard in source.shards(adapter.magnitude)]
    rows = lora_b_rows(rule, columns, run, f"{adapter.magnitude} (DoRA magnitude of {what})")
    return [row.squeeze(1) for row in rows]


def packed_expert_factors(task: Task, adapters: list[Adapter], source: TensorSource,
                          run: RuleRunner) -> list[Factors]:
    """Per output, every expert's LoRA in PEFT's 3-D packing: ``lora_A [E*r, in]``
    (expert-major), ``lora_B [out, r*E]`` (rank-major, expert-minor), as
    :func:`~bridge_ext.peft_experts.fuse_expert_lora` packs them.

    ``B``'s rule operations rearrange rows only, so they run once on all experts' ``B``
    side by side instead of once per expert; ``A`` is shared by every output.
    """
    rule = task.rule
    a_shards = [source.shards(adapter.lora_a) for adapter in adapters]
    b_shards = [source.shards(adapter.lora_b) for adapter in adapters]
    shapes = {(tuple(tuple(shard.shape) for shard in a), tuple(b[0].shape)) for a, b in zip(a_shards, b_shards)}
    if len(shapes) != 1:
        raise ExportError(f"{task.hf_names}: the experts' LoRA factors differ in shape {sorted(shapes)}; "
                          "fused experts need one rank and one shape for all of them")
    if len(a_shards[0]) == 1:
        lora_a = torch.cat([shards[0] for shards in a_shards])
    else:  # each expert's A joined from its shards: all experts at once, one stack per shard
        per_shard = [torch.stack([shards[s] for shards in a_shards]) for s in range(len(a_shards[0]))]
        lora_a = torch.cat(per_shard, dim=1 + lora_a_axis(rule)).flatten(0, 1)  # after the expert axis
    side_by_side = [torch.stack([shards[s] for shards in b_shards], dim=-1).flatten(1)
                    for s in range(len(b_shards[0]))]
    lora_bs = lora_b_rows(rule, side_by_side, run, f"LoRA B of {describe(task)} (every expert side by side)")
    return [(lora_a, lora_b) for lora_b in lora_bs]
