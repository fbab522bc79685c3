"""The generic conversion engine: plans tasks from a table, converts one task at a time.

A task is one instance of a rule: the Megatron tensor(s) it reads (several when experts are
stacked or a shared tensor has copies) and the Hugging Face tensors it writes. Planning uses
names only, so every unmapped parameter and every missing or unexpected name is reported
before any tensor moves; converting holds one task's tensors at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch

from bridge_ext.dims import ModelDims
from bridge_ext.dora import dora_merge
from bridge_ext.errors import ExportError, RuleError
from bridge_ext.ops import Op
from bridge_ext.peft_experts import fuse_expert_lora
from bridge_ext.peft_keys import LORA_A, LORA_B, PEFT_PREFIX, peft_key, peft_magnitude_key, weight_module
from bridge_ext.source import Adapter, TensorSource
from bridge_ext.table import MappingTable, Rule

__all__ = ["PEFT_PREFIX", "ExportError", "Mode", "Task", "TaskConverter", "convert_tasks", "plan_tasks", "run_rule"]


@dataclass(frozen=True)
class Task:
    rule: Rule
    values: dict[str, str]
    sources: tuple[str, ...]
    hf_names: tuple[str, ...]

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The task by value (its Megatron and Hugging Face names), for memos that outlive a call."""
        return self.sources, self.hf_names

    @property
    def module(self) -> str | None:
        """The Megatron module a LoRA adapter of this task would wrap."""
        return weight_module(self.sources[0])


def describe(task: Task, source: str | None = None) -> str:
    """``megatron name -> [hf names]`` of a task, for error messages."""
    return f"{source or task.sources[0]} -> {list(task.hf_names)}"


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
            f"{len(unmapped)} Megatron parameter(s) or persistent buffer(s) have no rule in the "
            f"{table.model_types} table: "
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


# -- the LoRA rule, in one place: how a base weight's rule applies to its adapter ----------------
# Megatron-Bridge shards ``B`` over rows for every base, and ``A`` over rows (the rank dimension)
# for column-parallel bases, over columns for row-parallel ones. ``B`` takes the base's row
# operations (and so does anything with B's rows, e.g. a DoRA magnitude); ``A`` is shared by every
# output. A final transpose swaps the factors' roles for module weights (``A' = B^T``,
# ``B' = A^T``); a stacked (fused parameter) output keeps the untransposed factors, as PEFT does
# (see :mod:`bridge_ext.ops`).


def lora_a_axis(rule: Rule) -> int:
    """The axis over which a LoRA ``A`` of ``rule``'s base is sharded across tensor-parallel ranks."""
    return 1 if rule.tp == "row" else 0


def joined_lora_a(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """A LoRA ``A`` from its tensor-parallel shards: shared by every output of the rule."""
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=lora_a_axis(rule))


def lora_b_rows(rule: Rule, shards: list[torch.Tensor], dims: ModelDims, what: str,
                run=run_rule) -> list[torch.Tensor]:
    """Each Hugging Face output's rows of a ``B``-like tensor (shards joined along rows): the
    base's row operations, none that changes values or transposes."""
    return run(rule, shards, dims, axis=0, rows_only=True, what=what)


def output_factors(rule: Rule, lora_a: torch.Tensor,
                   lora_bs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) per output: ``A`` shared; a transposing rule swaps the factors' roles."""
    if rule.transposes and not rule.stack:
        return [(lora_b.t().contiguous(), lora_a.t().contiguous()) for lora_b in lora_bs]
    return [(lora_a, lora_b) for lora_b in lora_bs]


def _lora_factors(rule: Rule, adapter: Adapter, source: TensorSource, dims: ModelDims,
                  what: str | None = None, run=run_rule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) for each Hugging Face output of ``rule`` (the LoRA rule above)."""
    if rule.changes_values:
        raise ExportError(f"{adapter.module} has a LoRA adapter but its rule changes values ({rule.megatron})")
    lora_a = joined_lora_a(rule, source.shards(adapter.lora_a))
    lora_bs = lora_b_rows(rule, source.shards(adapter.lora_b), dims,
                          f"{adapter.lora_b} (LoRA B of {what or adapter.module})", run)
    return output_factors(rule, lora_a, lora_bs)


MERGE_BLOCK_BYTES = 1 << 20
MERGE_EXPERT_BYTES = 64 << 20  # fp32 products of a batched expert merge
STACK_BLOCK_BYTES = 64 << 20  # experts' shards converted side by side at once
MERGE_BATCH_ELEMENTS = 32 << 20  # base elements of consecutive per-expert tasks merged together


def _merge(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
           transposed: bool = False) -> torch.Tensor:
    """``W + scale * B @ A`` (``W + scale * (B @ A)^T`` when ``transposed``) in fp32, cast
    back to the base dtype.

    The same roundings as ``base.float() + scale * (B @ A)``, computed in place on the
    product; on CPU a block of rows at a time, so that the fp32 rows stay in cache.
    """
    if transposed:
        return _merge(base.t(), lora_a, lora_b, scale).t()
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
    """``converter`` over ``tasks``, driven by the source (a parallel one moves shards first)."""
    yield from source.convert_tasks(converter, tasks)


def merge_batches(converter: TaskConverter, tasks: list[Task],
                  same: Callable[[Task], Hashable] = lambda task: None) -> Iterator[list[Task]]:
    """``tasks`` as batches that :meth:`TaskConverter.convert_batch` merges together.

    A run of consecutive tasks that can merge batched (per-expert tasks, whose rules
    interleave: an expert's ``linear_fc1`` then its ``linear_fc2``), at most
    :data:`MERGE_BATCH_ELEMENTS` of base elements, is split by rule, shard and LoRA shapes and
    scale (and ``same``) into batches, in order of first appearance; every other task is a
    batch of its own. Within a run the order therefore changes (all ``gate``/``up`` of the run,
    then all ``down``); every task is in exactly one batch.
    """
    run: dict[tuple, list[Task]] = {}
    elements = 0
    for task in tasks:
        key = converter.batch_key(task)
        size = sum(math.prod(shape) for shape in converter.source.shard_shapes(task.sources[0])) if key else 0
        if run and (key is None or elements + size > MERGE_BATCH_ELEMENTS):
            yield from run.values()
            run, elements = {}, 0
        if key is None:
            yield [task]
            continue
        run.setdefault((key, same(task)), []).append(task)
        elements += size
    yield from run.values()


class MetaSource:
    """A source's tensors as meta tensors of their shard shapes (nothing is read), recording
    every name read, in order: a conversion run on it checks every shape and split and
    records exactly what the real run will read."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.read: list[str] = []

    def base_names(self) -> list[str]:
        return self.source.base_names()

    def adapters(self) -> dict[str, Adapter]:
        return self.source.adapters()

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        return self.source.shard_shapes(name)

    def shards(self, name: str) -> list[torch.Tensor]:
        self.read.append(name)
        return [torch.empty(shape, device="meta") for shape in self.source.shard_shapes(name)]

    def convert_tasks(self, converter: TaskConverter, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        for task in tasks:
            yield from converter(task)


def _pack_nothing(hf_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Iterator:
    return iter(())


class TaskConverter:
    """Converts planned tasks of one model; yields ``(name, tensor)`` pairs."""

    def __init__(self, source: TensorSource, dims: ModelDims, mode: Mode, dtype: torch.dtype | None = None,
                 expert_adapters=None, recorded: dict[tuple, list[str]] | None = None, stacks_on_host: bool = False):
        self.source = source
        self.dims = dims
        self.mode = mode
        self.dtype = dtype
        # an export to the CPU: fused experts (an MoE export's largest tensors) are assembled
        # block by block straight into pinned host memory, so the GPU never holds a whole one
        # and the host copies run while the next blocks are gathered (see _stacked_bases)
        self.stacks_on_host = stacks_on_host
        self.adapters = source.adapters()
        self.expert_adapters = expert_adapters
        self._recorded = recorded if recorded is not None else {}  # task.key -> reads
        self._on_meta: dict[tuple, list[torch.Tensor]] = {}

    def _run(self, rule: Rule, shards: list[torch.Tensor], dims: ModelDims, *, what: str | None = None,
             **options) -> list[torch.Tensor]:
        """:func:`run_rule`; on meta tensors once per rule and shard shapes (the experts of a
        stacked task share them, and a check of a large MoE runs thousands)."""
        if not shards[0].is_meta:
            return run_rule(rule, shards, dims, what=what, **options)
        key = (id(rule), tuple(tuple(shard.shape) for shard in shards), tuple(sorted(options.items())))
        if key not in self._on_meta:
            self._on_meta[key] = run_rule(rule, shards, dims, what=what, **options)
        return self._on_meta[key]

    def adapter_of(self, task: Task, source_name: str) -> Adapter | None:
        module = weight_module(source_name)
        return self.adapters.get(module) if module else None

    def __call__(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        if task.rule.shared:
            self._check_copies_equal(task)
        if task.rule.stack:
            yield from self._stacked(task)
            return
        name = task.sources[0]
        adapter = self.adapter_of(task, name)
        if adapter is not None and adapter.parts:
            yield from self._canonical(task, adapter)
            return
        factors = self._factors(task, adapter)
        magnitudes = self._magnitudes(task, adapter) if factors and adapter.magnitude else None
        if self.mode is not Mode.ADAPTERS:
            shards = self.source.shards(name)
            if self.mode is Mode.MERGED and adapter is None and name.endswith(".bias"):
                shards = self._dora_scaled_bias(name, shards)
            bases = self._run(task.rule, shards, self.dims, what=describe(task))
            for index, (hf_name, base) in enumerate(zip(task.hf_names, bases, strict=True)):
                if self.mode is Mode.MERGED and magnitudes:
                    base = dora_merge(base, *factors[index], adapter.scale, magnitudes[index])
                elif self.mode is Mode.MERGED and factors:
                    base = _merge(base, *factors[index], adapter.scale)
                yield hf_name, self._cast(base)
        if factors and self.mode is Mode.ADAPTERS:
            for index, (hf_name, (lora_a, lora_b)) in enumerate(zip(task.hf_names, factors, strict=True)):
                yield peft_key(hf_name, LORA_A), self._cast(lora_a)
                yield peft_key(hf_name, LORA_B), self._cast(lora_b)
                if magnitudes:
                    yield peft_magnitude_key(hf_name), self._cast(magnitudes[index])

    def joins_rows(self, task: Task) -> tuple[str, ...]:
        """The source names of ``task`` whose tensor-parallel shards this conversion joins
        along rows exactly as they are (column-parallel, no per-shard operation, not stacked):
        a source may deliver such a tensor whole, as one shard, and save the join."""
        rule = task.rule
        if self.mode is Mode.ADAPTERS or rule.tp != "column" or rule.stack or any(op.per_rank for op in rule.ops):
            return ()
        return task.sources

    def batch_key(self, task: Task) -> tuple | None:
        """What a merged per-expert task must share with the others of its batch (None: it
        converts alone). Batching pays for merges only: one batched product for a run of
        experts instead of half a dozen kernel launches per expert tensor."""
        rule = task.rule
        if (self.mode is not Mode.MERGED or rule.variant is None or rule.stack or rule.shared
                or rule.transposes or rule.changes_values or len(task.sources) != 1):
            return None
        adapter = self.adapter_of(task, task.sources[0])
        if adapter is None or adapter.magnitude or adapter.parts:
            return None
        shapes = tuple(tuple(shape) for shape in self.source.shard_shapes(task.sources[0]))
        return id(rule), shapes, adapter.rank, adapter.scale

    def convert_batch(self, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        """Tasks of one :func:`merge_batches` run, yielding what each would yield, in order:
        the experts' bases stacked a block at a time, their LoRA packed, merged with one
        batched product (the same roundings as :func:`_merge`); each output is a view of its
        batch's stacked tensor."""
        if len(tasks) == 1:
            yield from self(tasks[0])
            return
        batch = Task(tasks[0].rule, tasks[0].values, tuple(task.sources[0] for task in tasks), tasks[0].hf_names)
        adapters = [self.adapter_of(task, task.sources[0]) for task in tasks]
        packed = self._packed_factors(batch, adapters)
        outputs = self._stacked_bases(batch, None)
        for output, factors in zip(outputs, packed, strict=True):
            _merge_experts(output, *factors, adapters[0].scale)
        for expert, task in enumerate(tasks):
            for output, hf_name in zip(outputs, task.hf_names, strict=True):
                yield hf_name, self._cast(output[expert])

    def dry_run(self, task: Task) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
        """Convert ``task`` on meta tensors: the names it reads, in order (repeats kept), and
        the ``(name, shape)`` it yields. Raises what the real conversion would raise on shapes."""
        meta = MetaSource(self.source)
        # without an expert-adapter layout the real run reads every expert, then refuses
        expert_adapters = self.expert_adapters or _pack_nothing
        converter = TaskConverter(meta, self.dims, self.mode, self.dtype, expert_adapters)
        outputs = [(name, tuple(tensor.shape)) for name, tensor in converter(task)]
        self._recorded[task.key] = meta.read
        return meta.read, outputs

    def reads(self, task: Task) -> list[str]:
        """The source names ``self(task)`` reads, in the order it reads them (repeats kept),
        recorded from a run on meta tensors (see :meth:`dry_run`), so the two cannot drift.

        Lets a source that moves tensors between processes schedule them ahead.
        """
        if task.key not in self._recorded:
            self.dry_run(task)
        return self._recorded[task.key]

    def _factors(self, task: Task, adapter: Adapter | None):
        if adapter is None or self.mode is Mode.BASE:
            return None
        return _lora_factors(task.rule, adapter, self.source, self.dims, describe(task), self._run)

    def _canonical(self, task: Task, adapter: Adapter) -> Iterator[tuple[str, torch.Tensor]]:
        """A CanonicalLoRA module: each Hugging Face output takes its own part's pair (the rule's
        ``lora_parts``), whose ``B`` rows already are that output's rows (tensor-parallel shards
        joined as they are); an output without a part's adapter has none."""
        rule = task.rule
        names = sorted(name for name, _ in adapter.parts)
        if (len(rule.lora_parts) != len(task.hf_names) or rule.stack or rule.transposes or rule.changes_values
                or not set(names) <= set(rule.lora_parts)):
            raise ExportError(f"{describe(task)}: CanonicalLoRA adapters {names} on a weight whose rule names the "
                              f"parts {list(rule.lora_parts)}: not supported")
        parts = [adapter.part(part) for part in rule.lora_parts]
        factors = [None if part is None or self.mode is Mode.BASE else self._part_factors(rule, part)
                   for part in parts]
        if self.mode is not Mode.ADAPTERS:
            bases = self._run(rule, self.source.shards(task.sources[0]), self.dims, what=describe(task))
            for hf_name, base, part, pair in zip(task.hf_names, bases, parts, factors, strict=True):
                if self.mode is Mode.MERGED and pair is not None:
                    base = _merge(base, *pair, part.scale)
                yield hf_name, self._cast(base)
            return
        for hf_name, pair in zip(task.hf_names, factors, strict=True):
            if pair is not None:
                yield peft_key(hf_name, LORA_A), self._cast(pair[0])
                yield peft_key(hf_name, LORA_B), self._cast(pair[1])

    def _part_factors(self, rule: Rule, part: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
        b_shards = self.source.shards(part.lora_b)  # a part's B rows already are its output's rows
        lora_b = b_shards[0] if len(b_shards) == 1 else torch.cat(b_shards)
        return joined_lora_a(rule, self.source.shards(part.lora_a)), lora_b

    def _dora_scaled_bias(self, name: str, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """A bias that its DoRA linear adds inside the scaled product, times the same factor
        ``m / ||W + s B A||_row`` (per tensor-parallel shard of rows, as Megatron computes it);
        other biases as they are."""
        adapter = self.adapters.get(name.removesuffix(".bias"))
        if adapter is None or not adapter.bias_inside:
            return shards
        weights, lora_bs = self.source.shards(adapter.module + ".weight"), self.source.shards(adapter.lora_b)
        magnitudes, a_shards = self.source.shards(adapter.magnitude), self.source.shards(adapter.lora_a)
        lora_a = a_shards[0] if len(a_shards) == 1 else torch.cat(a_shards)
        if not len(weights) == len(lora_bs) == len(magnitudes) or weights[0].shape[1] != lora_a.shape[1]:
            raise ExportError(f"{name}: DoRA's bias scale of a row-parallel or unevenly sharded linear is not supported")
        factors = []
        for weight, lora_b, magnitude in zip(weights, lora_bs, magnitudes):
            row = (lora_b.float() @ lora_a.float()).mul_(adapter.scale).add_(weight)
            factors.append(magnitude.float() / torch.linalg.norm(row, dim=1))
        if len(shards) == 1 and len(factors) > 1:  # delivered whole (see joins_rows)
            factors = [torch.cat(factors)]
        if len(shards) != len(factors):
            raise ExportError(f"{name}: its shards do not match its DoRA linear's")
        return [(bias.float() * factor).to(bias.dtype) for bias, factor in zip(shards, factors)]

    def _magnitudes(self, task: Task, adapter: Adapter) -> list[torch.Tensor]:
        """A DoRA magnitude ``[out]`` per Hugging Face output, its rows rearranged like ``lora_B``'s
        (run through the rule as a one-column matrix)."""
        if task.rule.transposes or task.rule.stack:
            raise ExportError(f"{describe(task)}: DoRA on a weight Hugging Face stores transposed or fused "
                              "takes its norm over another axis; not supported")
        columns = [shard.unsqueeze(1) for shard in self.source.shards(adapter.magnitude)]
        rows = lora_b_rows(task.rule, columns, self.dims, f"{adapter.magnitude} (DoRA magnitude of {describe(task)})",
                           self._run)
        return [row.squeeze(1) for row in rows]

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        # integer buffers (DeepSeek-V4's hash-routing table) keep their dtype
        return tensor if self.dtype is None or not tensor.is_floating_point() else tensor.to(self.dtype)

    def _check_copies_equal(self, task: Task) -> None:
        first = self.source.shards(task.sources[0])
        for other_name in task.sources[1:]:
            other = self.source.shards(other_name)
            if len(first) != len(other):  # one copy delivered whole (see joins_rows): compare joined
                first, other = [torch.cat(first)], [torch.cat(other)]
            if [tuple(a.shape) for a in first] != [tuple(b.shape) for b in other]:
                raise ExportError(f"{task.hf_names}: Megatron's copies {task.sources[0]} and {other_name} differ in shape")
            if not first[0].is_meta and any(not torch.equal(a, b) for a, b in zip(first, other, strict=True)):
                raise ExportError(
                    f"{task.hf_names} has one tensor in Hugging Face's format, but Megatron's "
                    f"{task.sources[0]} and {other_name} differ; refusing to drop either"
                )
            if self.adapter_of(task, other_name) is not None:
                raise ExportError(f"{other_name} has a LoRA adapter; shared tensors cannot take one")

    def _stacked(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        """Experts fused into ``[E, ...]``: bases filled a block of experts at a time, every
        expert's LoRA packed at once and merged batched over experts.

        A rule that transposes or changes values is not a row operation on the experts side
        by side, and adapters on some experts only (or of different scales) cannot be packed:
        those convert expert by expert (:meth:`_stacked_each_expert`).
        """
        adapters = [self.adapter_of(task, name) for name in task.sources]
        adapted = self.mode is not Mode.BASE and any(adapter is not None for adapter in adapters)
        if adapted and any(adapter is not None and (adapter.magnitude or adapter.parts) for adapter in adapters):
            if any(adapter is not None and adapter.magnitude for adapter in adapters):
                raise ExportError(f"{describe(task)}: DoRA on fused experts is not supported")
            yield from self._stacked_canonical(task, adapters)
            return
        packable = not adapted or (all(adapter is not None for adapter in adapters)
                                   and len({adapter.scale for adapter in adapters}) == 1)
        if task.rule.transposes or task.rule.changes_values or not packable:
            yield from self._stacked_each_expert(task)
            return
        packed = self._packed_factors(task, adapters) if adapted else None
        if self.mode is not Mode.ADAPTERS:
            # merged in the base dtype (as one expert's merge), cast once after
            outputs = self._stacked_bases(task, None if self.mode is Mode.MERGED else self.dtype,
                                          on_host=self.stacks_on_host and self.mode is not Mode.MERGED)
            for index, (hf_name, output) in enumerate(zip(task.hf_names, outputs, strict=True)):
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

    def _stacked_canonical(self, task: Task, adapters: list[Adapter | None]) -> Iterator[tuple[str, torch.Tensor]]:
        """Fused experts whose ``linear_fc1`` carries CanonicalLoRA's separate gate and up
        adapters: each expert's pair becomes one block-diagonal pair of rank ``2r``
        (:func:`block_diagonal_parts`), merged expert by expert or packed as PEFT's 3-D adapter."""
        rule = task.rule
        scales = {part.scale for adapter in adapters if adapter is not None for _, part in adapter.parts}
        if (rule.transposes or rule.changes_values or len(task.hf_names) != 1 or len(scales) != 1
                or any(adapter is None or adapter.part("gate") is None or adapter.part("up") is None
                       or len(adapter.parts) != 2 for adapter in adapters)):
            raise ExportError(f"{describe(task)}: CanonicalLoRA on these fused experts (every expert needs its "
                              "gate and up adapters, of one scale) is not supported; export them per expert "
                              "(expert_layout='per_expert', expert_adapter_layout='per_expert')")
        pairs = [self._block_diagonal(task, adapter) for adapter in adapters]
        (hf_name,), (scale,) = task.hf_names, scales
        if self.mode is Mode.MERGED:
            output = None
            for expert, (name, (lora_a, lora_b)) in enumerate(zip(task.sources, pairs)):
                (base,) = self._run(rule, self.source.shards(name), self.dims, what=describe(task, name))
                base = _merge(base, lora_a, lora_b, scale)
                if output is None:
                    output = _empty_output((len(task.sources), *base.shape), self.dtype or base.dtype, base.device,
                                           False)
                output[expert].copy_(base)
            yield hf_name, output
            return
        if self.expert_adapters is None:
            raise ExportError(f"{task.hf_names}: fused experts need an expert adapter layout")
        lora_a, lora_b = fuse_expert_lora([a for a, _ in pairs], [b for _, b in pairs])
        for key, tensor in self.expert_adapters(hf_name, lora_a, lora_b):
            yield key, self._cast(tensor)

    def _block_diagonal(self, task: Task, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = [A_gate; A_up]`` ``[2r, in]`` and, per tensor-parallel shard of rows ``[gate_s; up_s]``,
        ``B_s = [[B_gate_s, 0], [0, B_up_s]]``, through the rule's row operations:
        ``B A = [B_gate A_gate; B_up A_up]``, the two adapters' deltas on their own rows."""
        gate, up = adapter.part("gate"), adapter.part("up")
        lora_a = torch.cat([self._part_factors(task.rule, part)[0] for part in (gate, up)])
        blocks = [torch.block_diag(g, u) for g, u in zip(self.source.shards(gate.lora_b), self.source.shards(up.lora_b),
                                                        strict=True)]
        (lora_b,) = lora_b_rows(task.rule, blocks, self.dims, f"CanonicalLoRA gate and up B of {describe(task)}",
                                self._run)
        return lora_a, lora_b

    def _stacked_each_expert(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        """Experts fused into ``[E, ...]``, each output filled expert by expert (rules that
        transpose or change values; with ``stacks_on_host`` in pinned host memory, as
        :meth:`_stacked_bases`); adapters packed as :meth:`_packed_factors` packs them."""
        outputs: list[torch.Tensor] | None = None
        expert_factors = []
        for expert, name in enumerate(task.sources):
            adapter = self.adapter_of(task, name)
            factors = self._factors(task, adapter)
            expert_factors.append((adapter, factors))
            if self.mode is Mode.ADAPTERS:
                continue
            bases = self._run(task.rule, self.source.shards(name), self.dims, what=describe(task, name))
            if self.mode is Mode.MERGED and factors:
                bases = [_merge(base, *pair, adapter.scale, transposed=task.rule.transposes)
                         for base, pair in zip(bases, factors)]
            if outputs is None:
                outputs = [_empty_output((len(task.sources), *base.shape), self.dtype or base.dtype, base.device,
                                         self.stacks_on_host) for base in bases]
            for output, base in zip(outputs, bases, strict=True):
                output[expert].copy_(base, non_blocking=True)
        if outputs is not None:
            yield from zip(task.hf_names, outputs)
        if self.mode is not Mode.ADAPTERS or all(adapter is None for adapter, _ in expert_factors):
            return
        if any(adapter is None for adapter, _ in expert_factors):
            missing = [name for name, (adapter, _) in zip(task.sources, expert_factors) if adapter is None]
            raise ExportError(f"experts {missing} have no LoRA adapter while their siblings do")
        if self.expert_adapters is None:
            raise ExportError(f"{task.hf_names}: fused experts need an expert adapter layout")
        for output_index, hf_name in enumerate(task.hf_names):
            lora_a, lora_b = fuse_expert_lora([factors[output_index][0] for _, factors in expert_factors],
                                              [factors[output_index][1] for _, factors in expert_factors])
            for key, tensor in self.expert_adapters(hf_name, lora_a, lora_b):
                yield key, self._cast(tensor)

    def _stacked_bases(self, task: Task, dtype: torch.dtype | None, on_host: bool = False) -> list[torch.Tensor]:
        """Each output ``[E, out, in]`` (in ``dtype``, else the converted dtype), filled a block
        of experts at a time; with ``on_host`` (and shards on a GPU) in pinned host memory, each
        block copied there as soon as it is converted, without waiting for the copy: the
        consumer must wait for the device's current stream before reading (``to_host`` does).

        The rule's row operations run once per block on the block's experts side by side
        (``[out, experts * in]`` per tensor-parallel shard: row operations ignore columns);
        one expert at a time where the experts' shards are not split by rows, or by the
        columns of a matrix. A block holds at most :data:`STACK_BLOCK_BYTES` of shards.
        """
        outputs: list[torch.Tensor] = []
        names = task.sources
        start = 0
        while start < len(names):
            block = [self.source.shards(names[start])]
            if len(block[0]) == 1 or task.rule.tp == "column" or (task.rule.tp == "row" and block[0][0].dim() == 2):
                step = max(1, STACK_BLOCK_BYTES // sum(_nbytes(shard) for shard in block[0]))
                for name in names[start + 1:start + step]:
                    shards = self.source.shards(name)
                    if [shard.shape for shard in shards] != [shard.shape for shard in block[0]]:
                        raise ExportError(f"{describe(task, name)}: the experts differ in shape or sharding "
                                          f"({[tuple(s.shape) for s in shards]} against "
                                          f"{[tuple(s.shape) for s in block[0]]} of {names[start]})")
                    block.append(shards)
                joined, trailing = _side_by_side(block, join_columns=task.rule.tp == "row")
                what = describe(task, names[start] if len(block) == 1 else
                                f"{names[start]} .. {names[start + len(block) - 1]} side by side")
                parts = [part.reshape(part.shape[0], len(block), *trailing).transpose(0, 1)
                         for part in self._run(task.rule, joined, self.dims, what=what)]
            else:
                parts = [part.unsqueeze(0)
                         for part in self._run(task.rule, block[0], self.dims, what=describe(task, names[start]))]
            if not outputs:
                outputs = [_empty_output((len(names), *part.shape[1:]), dtype or part.dtype, part.device, on_host)
                           for part in parts]
            for output, part in zip(outputs, parts, strict=True):
                output[start:start + len(block)].copy_(part, non_blocking=True)
            start += len(block)
        return outputs

    def _packed_factors(self, task: Task, adapters: list[Adapter]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per output, every expert's LoRA in PEFT's 3-D packing: ``lora_A [E*r, in]``
        (expert-major), ``lora_B [out, r*E]`` (rank-major, expert-minor), as
        :func:`~bridge_ext.peft_experts.fuse_expert_lora` packs them.

        ``B``'s rule operations rearrange rows only, so they run once on all experts' ``B``
        side by side instead of once per expert; ``A`` is shared by every output.
        """
        a_shards, b_shards = [], []
        for adapter in adapters:
            a_shards.append(self.source.shards(adapter.lora_a))
            b_shards.append(self.source.shards(adapter.lora_b))
        shapes = {(tuple(tuple(shard.shape) for shard in a), tuple(b[0].shape)) for a, b in zip(a_shards, b_shards)}
        if len(shapes) != 1:
            raise ExportError(f"{task.hf_names}: the experts' LoRA factors differ in shape {sorted(shapes)}; "
                              "fused experts need one rank and one shape for all of them")
        if len(a_shards[0]) == 1:
            lora_a = torch.cat([shards[0] for shards in a_shards])
        else:  # each expert's A joined from its shards: all experts at once, one stack per shard
            per_shard = [torch.stack([shards[s] for shards in a_shards]) for s in range(len(a_shards[0]))]
            lora_a = torch.cat(per_shard, dim=1 + lora_a_axis(task.rule)).flatten(0, 1)  # after the expert axis
        side_by_side = [torch.stack([shards[s] for shards in b_shards], dim=-1).flatten(1)
                        for s in range(len(b_shards[0]))]
        lora_bs = lora_b_rows(task.rule, side_by_side, self.dims,
                              f"LoRA B of {describe(task)} (every expert side by side)", self._run)
        return [(lora_a, lora_b) for lora_b in lora_bs]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, on_host: bool) -> torch.Tensor:
    if on_host and device.type == "cuda":
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.empty(shape, dtype=dtype, device=device)


def _side_by_side(block: list[list[torch.Tensor]], join_columns: bool) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """Experts' shards ``block[e][s]`` ``[rows_s, *rest]`` -> per shard ``[rows_s, E * prod(rest)]``
    (expert ``e``'s ``rest`` flattened into its own run of columns; a bias is one column),
    and one expert's ``rest``. With ``join_columns`` the 2-D shards of each expert are first
    joined along columns (row-parallel tensors), giving one tensor."""
    stacked = [torch.stack([shards[s] for shards in block], dim=1) for s in range(len(block[0]))]
    if join_columns and len(stacked) > 1:
        stacked = [torch.cat(stacked, dim=2)]
    return [tensor.reshape(tensor.shape[0], -1) for tensor in stacked], tuple(stacked[0].shape[2:])


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
