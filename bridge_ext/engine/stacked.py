"""Stacked experts: a task whose rule fuses experts into ``[E, ...]``.

Three ways, the first that applies: every expert's base filled a block of experts at a time
(:mod:`bridge_ext.engine.assembly`), their LoRA packed at once and merged batched over experts;
CanonicalLoRA's separate gate and up adapters as one block-diagonal pair per expert; and expert by
expert where neither fits (a rule that transposes or changes values is not a row operation on the
experts side by side; adapters on some experts only, or of different scales, cannot be packed).
All three give what converting each expert alone and stacking the results gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from bridge_ext.engine.assembly import empty_output, stacked_bases
from bridge_ext.engine.lora import Factors, block_diagonal_factors, merge_output, packed_expert_factors
from bridge_ext.engine.merge import merge, merge_experts
from bridge_ext.engine.tasks import Mode, Task, describe
from bridge_ext.errors import ExportError
from bridge_ext.peft_experts import fuse_expert_lora
from bridge_ext.source import Adapter

if TYPE_CHECKING:
    from bridge_ext.engine.converter import TaskConverter

__all__ = ["StackedExperts"]


class StackedExperts:
    """The stacked-experts strategy of a :class:`~bridge_ext.engine.converter.TaskConverter`."""

    def __init__(self, core: TaskConverter):
        self.core = core

    def __call__(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        core = self.core
        adapters = [core.adapter_of(task, name) for name in task.sources]
        adapted = core.mode is not Mode.BASE and any(adapter is not None for adapter in adapters)
        if adapted and any(adapter is not None and (adapter.magnitude or adapter.parts) for adapter in adapters):
            if any(adapter is not None and adapter.magnitude for adapter in adapters):
                raise ExportError(f"{describe(task)}: DoRA on fused experts is not supported")
            yield from self._canonical(task, adapters)
            return
        packable = not adapted or (all(adapter is not None for adapter in adapters)
                                   and len({adapter.scale for adapter in adapters}) == 1)
        if task.rule.transposes or task.rule.changes_values or not packable:
            yield from self.each_expert(task)
            return
        packed = packed_expert_factors(task, adapters, core.source, core.run) if adapted else None
        if core.mode is not Mode.ADAPTERS:
            # merged in the base dtype (as one expert's merge), cast once after
            outputs = stacked_bases(task, core.source, core.run, None if core.mode is Mode.MERGED else core.dtype,
                                    on_host=core.stacks_on_host and core.mode is not Mode.MERGED)
            for index, (hf_name, output) in enumerate(zip(task.hf_names, outputs, strict=True)):
                if core.mode is Mode.MERGED and packed:
                    merge_experts(output, *packed[index], adapters[0].scale)
                yield hf_name, core.cast(output)
            return
        if not adapted:
            return
        for hf_name, (lora_a, lora_b) in zip(task.hf_names, packed, strict=True):
            yield from self._adapter_keys(task, hf_name, lora_a, lora_b)

    def _canonical(self, task: Task, adapters: list[Adapter | None]) -> Iterator[tuple[str, torch.Tensor]]:
        """Fused experts whose ``linear_fc1`` carries CanonicalLoRA's separate gate and up
        adapters: each expert's pair becomes one block-diagonal pair of rank ``2r``
        (:func:`~bridge_ext.engine.lora.block_diagonal_factors`), merged expert by expert or
        packed as PEFT's 3-D adapter."""
        core, rule = self.core, task.rule
        scales = {part.scale for adapter in adapters if adapter is not None for _, part in adapter.parts}
        if (rule.transposes or rule.changes_values or len(task.hf_names) != 1 or len(scales) != 1
                or any(adapter is None or adapter.part("gate") is None or adapter.part("up") is None
                       or len(adapter.parts) != 2 for adapter in adapters)):
            raise ExportError(f"{describe(task)}: CanonicalLoRA on these fused experts (every expert needs its "
                              "gate and up adapters, of one scale) is not supported; export them per expert "
                              "(expert_layout='per_expert', expert_adapter_layout='per_expert')")
        pairs = [block_diagonal_factors(rule, adapter, core.source, core.run, describe(task)) for adapter in adapters]
        (hf_name,), (scale,) = task.hf_names, scales
        if core.mode is Mode.MERGED:
            output = None
            for expert, (name, (lora_a, lora_b)) in enumerate(zip(task.sources, pairs)):
                (base,) = core.run(rule, core.source.shards(name), what=describe(task, name))
                base = merge(base, lora_a, lora_b, scale)
                if output is None:
                    output = empty_output((len(task.sources), *base.shape), core.dtype or base.dtype, base.device,
                                          False)
                output[expert].copy_(base)
            yield hf_name, output
            return
        lora_a, lora_b = fuse_expert_lora([a for a, _ in pairs], [b for _, b in pairs])
        yield from self._adapter_keys(task, hf_name, lora_a, lora_b)

    def each_expert(self, task: Task) -> Iterator[tuple[str, torch.Tensor]]:
        """Each output filled expert by expert: the reference the faster ways must equal, and the
        way for rules that transpose or change values (with
        ``stacks_on_host`` in pinned host memory, as :func:`~bridge_ext.engine.assembly.stacked_bases`),
        adapters packed as :func:`~bridge_ext.engine.lora.packed_expert_factors` packs them."""
        core = self.core
        outputs: list[torch.Tensor] | None = None
        expert_factors: list[tuple[Adapter | None, list[Factors] | None]] = []
        for expert, name in enumerate(task.sources):
            adapter = core.adapter_of(task, name)
            factors = core.factors(task, adapter)
            expert_factors.append((adapter, factors))
            if core.mode is Mode.ADAPTERS:
                continue
            bases = core.run(task.rule, core.source.shards(name), what=describe(task, name))
            if core.mode is Mode.MERGED and factors:
                bases = [merge_output(task.rule, base, pair, adapter.scale) for base, pair in zip(bases, factors)]
            if outputs is None:
                outputs = [empty_output((len(task.sources), *base.shape), core.dtype or base.dtype, base.device,
                                        core.stacks_on_host) for base in bases]
            for output, base in zip(outputs, bases, strict=True):
                output[expert].copy_(base, non_blocking=True)
        if outputs is not None:
            yield from zip(task.hf_names, outputs)
        if core.mode is not Mode.ADAPTERS or all(adapter is None for adapter, _ in expert_factors):
            return
        if any(adapter is None for adapter, _ in expert_factors):
            missing = [name for name, (adapter, _) in zip(task.sources, expert_factors) if adapter is None]
            raise ExportError(f"experts {missing} have no LoRA adapter while their siblings do")
        for output_index, hf_name in enumerate(task.hf_names):
            lora_a, lora_b = fuse_expert_lora([factors[output_index][0] for _, factors in expert_factors],
                                              [factors[output_index][1] for _, factors in expert_factors])
            yield from self._adapter_keys(task, hf_name, lora_a, lora_b)

    def _adapter_keys(self, task: Task, hf_name: str, lora_a: torch.Tensor,
                      lora_b: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """One fused output's packed LoRA under the keys of the export's expert-adapter layout."""
        expert_adapters = self.core.expert_adapters
        if expert_adapters is None:
            raise ExportError(f"{task.hf_names}: fused experts need an expert adapter layout")
        for key, tensor in expert_adapters(hf_name, lora_a, lora_b):
            yield key, self.core.cast(tensor)
