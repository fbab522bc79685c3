"""Batched merges: a run of merged per-expert tasks converted together.

Batching pays for merges only: one batched product for a run of experts instead of half a dozen
kernel launches per expert tensor. A batch's experts are stacked a block at a time
(:mod:`bridge_ext.engine.assembly`), their LoRA packed and merged with one batched product (the
same roundings as a merge of each); what each task yields is a view of its batch's stacked tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING

import torch

from bridge_ext.engine.assembly import stacked_bases
from bridge_ext.engine.lora import packed_expert_factors
from bridge_ext.engine.merge import merge_experts
from bridge_ext.engine.tasks import Mode, Task

if TYPE_CHECKING:
    from bridge_ext.engine.converter import TaskConverter

__all__ = ["MERGE_BATCH_ELEMENTS", "BatchedMerges", "merge_batches"]

MERGE_BATCH_ELEMENTS = 32 << 20  # base elements of consecutive per-expert tasks merged together


class BatchedMerges:
    """The batched-merge strategy of a :class:`~bridge_ext.engine.converter.TaskConverter`."""

    def __init__(self, core: TaskConverter):
        self.core = core

    def key(self, task: Task) -> tuple | None:
        """What a merged per-expert task must share with the others of its batch (None: it
        converts alone)."""
        core, rule = self.core, task.rule
        if (core.mode is not Mode.MERGED or rule.variant is None or rule.stack or rule.shared
                or rule.transposes or rule.changes_values or len(task.sources) != 1):
            return None
        adapter = core.adapter_of(task, task.sources[0])
        if adapter is None or adapter.magnitude or adapter.parts:
            return None
        shapes = tuple(tuple(shape) for shape in core.source.shard_shapes(task.sources[0]))
        return rule, shapes, adapter.rank, adapter.scale

    def __call__(self, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        """Tasks of one :func:`merge_batches` batch, yielding what each would yield, in order."""
        core = self.core
        if len(tasks) == 1:
            yield from core(tasks[0])
            return
        batch = Task(tasks[0].rule, tasks[0].values, tuple(task.sources[0] for task in tasks), tasks[0].hf_names)
        adapters = [core.adapter_of(task, task.sources[0]) for task in tasks]
        packed = packed_expert_factors(batch, adapters, core.source, core.run)
        outputs = stacked_bases(batch, core.source, core.run, None)
        for output, factors in zip(outputs, packed, strict=True):
            merge_experts(output, *factors, adapters[0].scale)
        for expert, task in enumerate(tasks):
            for output, hf_name in zip(outputs, task.hf_names, strict=True):
                yield hf_name, core.cast(output[expert])


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
