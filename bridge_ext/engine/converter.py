"""The rule-application core: converts planned tasks of one model, one task at a time.

:class:`TaskConverter` applies a task's rule to its base tensor and the LoRA rule
(:mod:`bridge_ext.engine.lora`) to its adapter, in one of three modes. What is only faster
lives in strategies beside it, each giving what the core would give: stacked experts
(:mod:`.stacked`, filled by :mod:`.assembly`), batched merges of per-expert tasks
(:mod:`.batches`), and meta runs that check shapes and record reads (:mod:`.meta`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from bridge_ext.dims import ModelDims
from bridge_ext.dora import dora_merge, dora_scaled_bias
from bridge_ext.engine.batches import BatchedMerges
from bridge_ext.engine.lora import Factors, lora_factors, magnitude_rows, merge_output, part_factors
from bridge_ext.engine.merge import merge
from bridge_ext.engine.meta import MetaSource, pack_nothing
from bridge_ext.engine.rules import RuleRunner
from bridge_ext.engine.stacked import StackedExperts
from bridge_ext.engine.tasks import Mode, Task, describe
from bridge_ext.errors import ExportError
from bridge_ext.peft_keys import LORA_A, LORA_B, peft_key, peft_magnitude_key, weight_module
from bridge_ext.source import Adapter, TensorSource

__all__ = ["ExpertAdapterKeys", "TaskConverter", "convert_tasks"]

#: A fused output's packed LoRA -> its saved keys and tensors (an expert-adapter layout)
ExpertAdapterKeys = Callable[[str, torch.Tensor, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


class TaskConverter:
    """Converts planned tasks of one model; yields ``(name, tensor)`` pairs.

    ``stacks_on_host``: an export to the CPU, where fused experts (an MoE export's largest
    tensors) are assembled block by block straight into pinned host memory, so the GPU never
    holds a whole one (:mod:`bridge_ext.engine.assembly`). ``recorded``: where :meth:`reads`
    keeps what each task reads (by :attr:`Task.key`), shared by the converters of one plan.
    """

    def __init__(self, source: TensorSource, dims: ModelDims, mode: Mode, dtype: torch.dtype | None = None,
                 expert_adapters: ExpertAdapterKeys | None = None, recorded: dict[tuple, list[str]] | None = None,
                 stacks_on_host: bool = False):
        self.source = source
        self.dims = dims
        self.mode = mode
        self.dtype = dtype
        self.stacks_on_host = stacks_on_host
        self.adapters = source.adapters()
        self.expert_adapters = expert_adapters
        self.run = RuleRunner(dims)
        self._recorded = recorded if recorded is not None else {}  # task.key -> reads
        self._stacked = StackedExperts(self)
        self._batched = BatchedMerges(self)

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
        factors = self.factors(task, adapter)
        magnitudes = (magnitude_rows(task.rule, adapter, self.source, self.run, describe(task))
                      if factors and adapter.magnitude else None)
        if self.mode is not Mode.ADAPTERS:
            shards = self.source.shards(name)
            if self.mode is Mode.MERGED and adapter is None and name.endswith(".bias"):
                shards = dora_scaled_bias(name, shards, self.adapters, self.source)
            bases = self.run(task.rule, shards, what=describe(task))
            for index, (hf_name, base) in enumerate(zip(task.hf_names, bases, strict=True)):
                if self.mode is Mode.MERGED and magnitudes:
                    base = dora_merge(base, *factors[index], adapter.scale, magnitudes[index])
                elif self.mode is Mode.MERGED and factors:
                    base = merge_output(task.rule, base, factors[index], adapter.scale)
                yield hf_name, self.cast(base)
        if factors and self.mode is Mode.ADAPTERS and task.rule.lora_fused:
            # transformers holds the outputs as one linear, their rows joined in order: A is shared
            fused = task.rule.lora_fused_name(task.values)
            yield peft_key(fused, LORA_A), self.cast(factors[0][0])
            yield peft_key(fused, LORA_B), self.cast(torch.cat([lora_b for _, lora_b in factors]))
            if magnitudes:
                yield peft_magnitude_key(fused), self.cast(torch.cat(magnitudes))
        elif factors and self.mode is Mode.ADAPTERS:
            for index, (hf_name, (lora_a, lora_b)) in enumerate(zip(task.hf_names, factors, strict=True)):
                yield peft_key(hf_name, LORA_A), self.cast(lora_a)
                yield peft_key(hf_name, LORA_B), self.cast(lora_b)
                if magnitudes:
                    yield peft_magnitude_key(hf_name), self.cast(magnitudes[index])

    def factors(self, task: Task, adapter: Adapter | None) -> list[Factors] | None:
        """(lora_A, lora_B) per output of ``task`` (None: no adapter, or a base export)."""
        if adapter is None or self.mode is Mode.BASE:
            return None
        return lora_factors(task.rule, adapter, self.source, self.run, describe(task))

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the export's dtype; integer buffers (DeepSeek-V4's hash-routing table) keep theirs."""
        return tensor if self.dtype is None or not tensor.is_floating_point() else tensor.to(self.dtype)

    # -- scheduling: what sources and batches need to know ahead ---------------------------------
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
        converts alone); see :mod:`bridge_ext.engine.batches`."""
        return self._batched.key(task)

    def convert_batch(self, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        """Tasks of one :func:`~bridge_ext.engine.batches.merge_batches` batch, yielding what
        each would yield, in order."""
        return self._batched(tasks)

    def dry_run(self, task: Task) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
        """Convert ``task`` on meta tensors: the names it reads, in order (repeats kept), and
        the ``(name, shape)`` it yields. Raises what the real conversion would raise on shapes."""
        meta = MetaSource(self.source)
        # without an expert-adapter layout the real run reads every expert, then refuses
        converter = TaskConverter(meta, self.dims, self.mode, self.dtype, self.expert_adapters or pack_nothing)
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

    # -- the core's special cases --------------------------------------------------------------
    def _canonical(self, task: Task, adapter: Adapter) -> Iterator[tuple[str, torch.Tensor]]:
        """A CanonicalLoRA module: each Hugging Face output takes its own part's pair (the rule's
        ``lora_parts``); an output without a part's adapter has none."""
        rule = task.rule
        names = sorted(name for name, _ in adapter.parts)
        if rule.lora_fused:
            raise ExportError(f"{describe(task)}: CanonicalLoRA adapters {names} on outputs transformers loads as one "
                              f"linear ({rule.lora_fused_name(task.values)}), where PEFT keys one adapter: not supported")
        if (len(rule.lora_parts) != len(task.hf_names) or rule.stack or rule.transposes or rule.changes_values
                or not set(names) <= set(rule.lora_parts)):
            raise ExportError(f"{describe(task)}: CanonicalLoRA adapters {names} on a weight whose rule names the "
                              f"parts {list(rule.lora_parts)}: not supported")
        parts = [adapter.part(part) for part in rule.lora_parts]
        factors = [None if part is None or self.mode is Mode.BASE else part_factors(rule, part, self.source)
                   for part in parts]
        if self.mode is not Mode.ADAPTERS:
            bases = self.run(rule, self.source.shards(task.sources[0]), what=describe(task))
            for hf_name, base, part, pair in zip(task.hf_names, bases, parts, factors, strict=True):
                if self.mode is Mode.MERGED and pair is not None:
                    base = merge(base, *pair, part.scale)
                yield hf_name, self.cast(base)
            return
        for hf_name, pair in zip(task.hf_names, factors, strict=True):
            if pair is not None:
                yield peft_key(hf_name, LORA_A), self.cast(pair[0])
                yield peft_key(hf_name, LORA_B), self.cast(pair[1])

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


def convert_tasks(source: TensorSource, converter: TaskConverter,
                  tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
    """``converter`` over ``tasks``, driven by the source (a parallel one moves shards first)."""
    yield from source.convert_tasks(converter, tasks)
