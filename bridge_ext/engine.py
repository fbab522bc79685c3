"""The generic conversion engine: plans tasks from a table, converts one task at a time.

A task is one instance of a rule: the Megatron tensor(s) it reads (several when experts are
stacked or a shared tensor has copies) and the Hugging Face tensors it writes. Planning uses
names only, so every unmapped parameter and every missing or unexpected name is reported
before any tensor moves; converting holds one task's tensors at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch

from bridge_ext.dims import ModelDims
from bridge_ext.errors import ExportError
from bridge_ext.ops import Op
from bridge_ext.source import Adapter, TensorSource
from bridge_ext.table import MappingTable, Rule

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Task:
    rule: Rule
    values: dict[str, str]
    sources: tuple[str, ...]
    hf_names: tuple[str, ...]

    @property
    def module(self) -> str | None:
        """The Megatron module a LoRA adapter of this task would wrap."""
        first = self.sources[0]
        return first[: -len(".weight")] if first.endswith(".weight") else None


class Mode(Enum):
    """What a conversion pass yields."""

    BASE = "base"  # base weights under clean names, adapters left out
    MERGED = "merged"  # base weights with LoRA merged in
    ADAPTERS = "adapters"  # adapters only, in PEFT's key format


def plan_tasks(names: list[str], table: MappingTable, variants: frozenset[str] = frozenset()) -> list[Task]:
    """Group Megatron names into tasks, in order of first appearance.

    Raises ExportError naming every parameter no rule covers.
    """
    groups: dict[tuple, list[tuple[int, str]]] = {}
    group_rules: dict[tuple, tuple[Rule, dict[str, str]]] = {}
    unmapped = []
    for name in names:
        found = table.match(name, variants)
        if found is None:
            unmapped.append(name)
            continue
        reduced = found.rule.stack or found.rule.shared
        kept = {key: value for key, value in found.values.items() if key != reduced}
        key = (id(found.rule), tuple(sorted(kept.items())))
        order = int(found.values[reduced]) if reduced else 0
        groups.setdefault(key, []).append((order, name))
        group_rules[key] = (found.rule, kept)
    if unmapped:
        raise ExportError(
            f"{len(unmapped)} Megatron parameter(s) have no rule in the {table.model_types} table: "
            + ", ".join(unmapped)
        )
    tasks = []
    for key, members in groups.items():
        rule, kept = group_rules[key]
        members.sort()
        if rule.stack and [order for order, _ in members] != list(range(len(members))):
            raise ExportError(
                f"cannot stack {rule.stack} tensors {[name for _, name in members]}: "
                f"numbers are not 0..{len(members) - 1}"
            )
        sources = tuple(name for _, name in members)
        tasks.append(Task(rule, kept, sources, tuple(rule.hf_names(kept))))
    return tasks


def _apply(ops: list[Op], tensors: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
    for op in ops:
        tensors = op.forward(tensors, dims)
    return tensors


def run_rule(rule: Rule, shards: list[torch.Tensor], dims: ModelDims, *, axis: int | None = None,
             rows_only: bool = False) -> list[torch.Tensor]:
    """Convert one Megatron tensor, given as tensor-parallel shards, with the rule's ops.

    ``axis`` overrides the concatenation axis of the shards (LoRA factors are split over
    ranks differently from their base weight); ``rows_only`` skips value-changing ops and is
    how a ``lora_B`` goes through its base weight's rule.
    """
    per_rank = [op for op in rule.ops if op.per_rank]
    global_ops = [op for op in rule.ops if not op.per_rank and not (rows_only and op.changes_values)]
    if rule.tp == "replicated" and axis is None:
        shards = shards[:1]
    parts_by_rank = [_apply(per_rank, [shard], dims) for shard in shards]
    if len(parts_by_rank) == 1:
        parts = parts_by_rank[0]
    else:
        cat_axis = axis if axis is not None else (1 if rule.tp == "row" else 0)
        parts = [torch.cat(same_part, dim=cat_axis) for same_part in zip(*parts_by_rank)]
    return _apply(global_ops, parts, dims)


def _lora_factors(rule: Rule, adapter: Adapter, source: TensorSource, dims: ModelDims) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) for each Hugging Face output of ``rule``.

    Megatron-Bridge shards ``B`` over rows for every base, and ``A`` over rows (the rank
    dimension) for column-parallel bases, over columns for row-parallel ones. ``B`` takes the
    base's row operations; ``A`` is shared by every output.
    """
    if rule.changes_values:
        raise ExportError(f"{adapter.module} has a LoRA adapter but its rule changes values ({rule.megatron})")
    a_shards = source.shards(adapter.lora_a)
    lora_a = a_shards[0] if len(a_shards) == 1 else torch.cat(a_shards, dim=1 if rule.tp == "row" else 0)
    lora_bs = run_rule(rule, source.shards(adapter.lora_b), dims, axis=0, rows_only=True)
    return [(lora_a, lora_b) for lora_b in lora_bs]


MERGE_BLOCK_BYTES = 1 << 20


def _merge(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B @ A`` in fp32, cast back to the base dtype.

    The same roundings as ``base.float() + scale * (B @ A)``, computed in place on the
    product; on CPU a block of rows at a time, so that the fp32 rows stay in cache.
    """
    lora_a, lora_b = lora_a.float(), lora_b.float()
    rows = max(1, MERGE_BLOCK_BYTES // (4 * base.shape[1])) if base.device.type == "cpu" else base.shape[0]
    if rows >= base.shape[0]:
        return (lora_b @ lora_a).mul_(scale).add_(base).to(base.dtype)
    merged = torch.empty_like(base)
    block = torch.empty(rows, base.shape[1], device=base.device)
    for start in range(0, base.shape[0], rows):
        stop = min(start + rows, base.shape[0])
        product = torch.matmul(lora_b[start:stop], lora_a, out=block[: stop - start])
        merged[start:stop] = product.mul_(scale).add_(base[start:stop])
    return merged


def convert_tasks(source: TensorSource, converter: TaskConverter,
                  tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
    """``converter`` over ``tasks``; a source that spans processes (``convert_tasks``) drives it."""
    drive = getattr(source, "convert_tasks", None)
    if drive is not None:
        yield from drive(converter, tasks)
        return
    for task in tasks:
        yield from converter(task)


def peft_key(hf_name: str, factor: str) -> str:
    """PEFT's saved key of ``lora_A``/``lora_B`` for the Hugging Face weight ``hf_name``."""
    if not hf_name.endswith(".weight"):
        raise ExportError(f"{hf_name} is not a module weight; PEFT keys it as a target parameter")
    return f"{PEFT_PREFIX}{hf_name[: -len('.weight')]}.{factor}.weight"


class TaskConverter:
    """Converts planned tasks of one model; yields ``(name, tensor)`` pairs."""

    def __init__(self, source: TensorSource, dims: ModelDims, mode: Mode, dtype: torch.dtype | None = None,
                 expert_adapters=None):
        self.source = source
        self.dims = dims
        self.mode = mode
        self.dtype = dtype
        self.adapters = source.adapters()
        self.expert_adapters = expert_adapters

    def adapter_of(self, task: Task, source_name: str) -> Adapter | None:
        module = source_name[: -len(".weight")] if source_name.endswith(".weight") else None
        return self.adapters.get(module) if module else None

    def __call__(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        if task.rule.shared:
            self._check_copies_equal(task)
        if task.rule.stack:
            yield from self._stacked(task)
            return
        name = task.sources[0]
        adapter = self.adapter_of(task, name)
        factors = self._factors(task, adapter)
        if self.mode is not Mode.ADAPTERS:
            bases = run_rule(task.rule, self.source.shards(name), self.dims)
            for index, (hf_name, base) in enumerate(zip(task.hf_names, bases, strict=True)):
                if self.mode is Mode.MERGED and factors:
                    base = _merge(base, *factors[index], adapter.scale)
                yield hf_name, self._cast(base)
        if factors and self.mode is Mode.ADAPTERS:
            for hf_name, (lora_a, lora_b) in zip(task.hf_names, factors, strict=True):
                yield peft_key(hf_name, "lora_A"), self._cast(lora_a)
                yield peft_key(hf_name, "lora_B"), self._cast(lora_b)

    def reads(self, task: Task) -> list[str]:
        """The source names ``self(task)`` reads, in the order it reads them (repeats kept).

        Lets a source that moves tensors between processes schedule them ahead.
        """
        names = list(task.sources) if task.rule.shared else []  # _check_copies_equal
        if task.rule.stack:  # _stacked: every expert's adapter, then every expert's base
            if self.mode is not Mode.BASE:
                adapters = [self.adapter_of(task, name) for name in task.sources]
                names += [factor for adapter in adapters if adapter is not None
                          for factor in (adapter.lora_a, adapter.lora_b)]
            return names + (list(task.sources) if self.mode is not Mode.ADAPTERS else [])
        for name in task.sources[:1]:
            adapter = self.adapter_of(task, name)
            if adapter is not None and self.mode is not Mode.BASE:
                names += [adapter.lora_a, adapter.lora_b]
            if self.mode is not Mode.ADAPTERS:
                names.append(name)
        return names

    def _factors(self, task: Task, adapter: Adapter | None):
        if adapter is None or self.mode is Mode.BASE:
            return None
        return _lora_factors(task.rule, adapter, self.source, self.dims)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def _check_copies_equal(self, task: Task) -> None:
        first = self.source.shards(task.sources[0])
        for other_name in task.sources[1:]:
            other = self.source.shards(other_name)
            if any(not torch.equal(a, b) for a, b in zip(first, other, strict=True)):
                raise ExportError(
                    f"{task.hf_names} has one tensor in Hugging Face's format, but Megatron's "
                    f"{task.sources[0]} and {other_name} differ; refusing to drop either"
                )
            if self.adapter_of(task, other_name) is not None:
                raise ExportError(f"{other_name} has a LoRA adapter; shared tensors cannot take one")

    def _stacked(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        """Experts fused into ``[E, ...]``: bases filled expert by expert (one expert's shards
        held at a time), merges and adapters computed for all experts at once."""
        adapters = [self.adapter_of(task, name) for name in task.sources]
        adapted = self.mode is not Mode.BASE and any(adapter is not None for adapter in adapters)
        if adapted and any(adapter is None for adapter in adapters):
            missing = [name for name, adapter in zip(task.sources, adapters) if adapter is None]
            raise ExportError(f"experts {missing} have no LoRA adapter while their siblings do")
        packed = self._packed_factors(task, adapters) if adapted else None
        if self.mode is not Mode.ADAPTERS:
            outputs = self._stacked_bases(task)
            for index, (hf_name, output) in enumerate(zip(task.hf_names, outputs or [], strict=True)):
                if self.mode is Mode.MERGED and packed:
                    _merge_experts(output, *packed[index], adapters[0].scale)
                yield hf_name, self._cast(output)
            return
        if not adapted:
            return
        if self.expert_adapters is None:
            raise ExportError(f"{task.hf_names}: fused experts need an expert adapter layout")
        for hf_name, (lora_a, lora_b) in zip(task.hf_names, packed, strict=True):
            for key, tensor in self.expert_adapters(hf_name, lora_a, lora_b):
                yield key, self._cast(tensor)

    def _stacked_bases(self, task: Task) -> list[torch.Tensor]:
        """Each output ``[E, out, in]``, filled a block of experts at a time.

        The rule's row operations run once per block on the block's experts side by side
        (``[out, experts * in]`` per tensor-parallel shard: row operations ignore columns);
        one expert at a time where the rule changes values or the experts' shards are not
        split by rows or columns. A block holds at most :data:`STACK_BLOCK_BYTES` of shards.
        """
        outputs: list[torch.Tensor] = []
        names = task.sources
        start = 0
        while start < len(names):
            block = [self.source.shards(names[start])]
            side_by_side = not task.rule.changes_values and (len(block[0]) == 1 or task.rule.tp in ("column", "row"))
            if side_by_side:
                step = max(1, STACK_BLOCK_BYTES // sum(_nbytes(shard) for shard in block[0]))
                for name in names[start + 1:start + step]:
                    shards = self.source.shards(name)
                    if [shard.shape for shard in shards] != [shard.shape for shard in block[0]]:
                        raise ExportError(f"{name}: experts of {task.hf_names} differ in shape or sharding")
                    block.append(shards)
                joined = _side_by_side(block, join_columns=task.rule.tp == "row")
                columns = joined[0].shape[1] // len(block)
                parts = [part.view(part.shape[0], len(block), columns).transpose(0, 1)
                         for part in run_rule(task.rule, joined, self.dims)]
            else:
                parts = [part.unsqueeze(0) for part in run_rule(task.rule, block[0], self.dims)]
            if not outputs:
                outputs = [torch.empty((len(names), *part.shape[1:]), dtype=part.dtype, device=part.device)
                           for part in parts]
            for output, part in zip(outputs, parts, strict=True):
                output[start:start + len(block)].copy_(part)
            start += len(block)
        return outputs

    def _packed_factors(self, task: Task, adapters: list[Adapter]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per output, every expert's LoRA in PEFT's 3-D packing: ``lora_A [E*r, in]``
        (expert-major), ``lora_B [out, r*E]`` (rank-major, expert-minor).

        ``B``'s rule operations rearrange rows only, so they run once on all experts' ``B``
        side by side instead of once per expert; ``A`` is shared by every output.
        """
        if task.rule.changes_values:
            raise ExportError(f"{task.sources[0]} has a LoRA adapter but its rule changes values ({task.rule.megatron})")
        a_parts, b_shards = [], []
        for adapter in adapters:
            a_shards = self.source.shards(adapter.lora_a)
            a_parts.append(a_shards[0] if len(a_shards) == 1 else
                           torch.cat(a_shards, dim=1 if task.rule.tp == "row" else 0))
            b_shards.append(self.source.shards(adapter.lora_b))
        shapes = {(tuple(a.shape), tuple(b[0].shape)) for a, b in zip(a_parts, b_shards)}
        if len(shapes) != 1:
            raise ExportError(f"{task.hf_names}: the experts' LoRA factors differ in shape {sorted(shapes)}; "
                              "fused experts need one rank and one shape for all of them")
        lora_a = torch.cat(a_parts)
        side_by_side = [torch.stack([shards[s] for shards in b_shards], dim=-1).flatten(1)
                        for s in range(len(b_shards[0]))]
        lora_bs = run_rule(task.rule, side_by_side, self.dims, axis=0, rows_only=True)
        return [(lora_a, lora_b) for lora_b in lora_bs]


MERGE_EXPERT_BYTES = 64 << 20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _side_by_side(block: list[list[torch.Tensor]], join_columns: bool) -> list[torch.Tensor]:
    """Experts' shards ``block[e][s]`` ``[rows_s, cols_s]`` -> per shard ``[rows_s, E * cols_s]``
    (expert ``e`` in columns ``e*cols_s : (e+1)*cols_s``); with ``join_columns`` the shards of
    each expert are first joined along columns (row-parallel tensors), giving one tensor."""
    stacked = [torch.stack([shards[s] for shards in block], dim=1) for s in range(len(block[0]))]
    if join_columns and len(stacked) > 1:
        stacked = [torch.cat(stacked, dim=2)]
    return [tensor.view(tensor.shape[0], -1) for tensor in stacked]
STACK_BLOCK_BYTES = 64 << 20


def _merge_experts(stacked: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
    """``W_e += scale * B_e @ A_e`` for every expert, in place, computed like :func:`_merge`
    (fp32, cast back), a few experts at a time so that the fp32 block stays small."""
    experts, out_features, in_features = stacked.shape
    rank = lora_a.shape[0] // experts
    a = lora_a.view(experts, rank, in_features)
    b = lora_b.view(out_features, rank, experts).permute(2, 0, 1)
    step = max(1, MERGE_EXPERT_BYTES // (4 * out_features * in_features))
    for start in range(0, experts, step):
        stop = min(start + step, experts)
        product = torch.bmm(b[start:stop].float(), a[start:stop].float())
        stacked[start:stop] = product.mul_(scale).add_(stacked[start:stop]).to(stacked.dtype)
