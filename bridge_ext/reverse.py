"""The reverse direction, Hugging Face -> Megatron (one rank), driven by the same tables.

Used to round-trip every table (HF -> Megatron -> HF must be bit-exact) and to build
Megatron tensors from Hugging Face ones where no model is at hand.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bridge_ext.dims import ModelDims
from bridge_ext.engine import ExportError, apply_ops, plan_tasks
from bridge_ext.table import MappingTable, Rule


def reverse_rule(rule: Rule, hf_tensors: list[torch.Tensor], dims: ModelDims, what: str | None = None) -> torch.Tensor:
    """Undo ``rule``'s operations on its Hugging Face outputs: the whole Megatron tensor
    (copies written under several names must be equal)."""
    (tensor,) = apply_ops(rule, list(rule.ops), list(hf_tensors), dims, reverse=True, what=what)
    return tensor


def hf_to_megatron(
    hf_tensors: Mapping[str, torch.Tensor],
    megatron_names: list[str],
    table: MappingTable,
    dims: ModelDims,
    variants: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Megatron tensors (unsharded, by normalised name) made from Hugging Face tensors."""
    out: dict[str, torch.Tensor] = {}
    for task in plan_tasks(megatron_names, table, variants):
        missing = [name for name in task.hf_names if name not in hf_tensors]
        if missing:
            raise ExportError(f"{task.sources[0]} needs Hugging Face tensors {missing}")
        outputs = [hf_tensors[name] for name in task.hf_names]
        if task.rule.stack:
            for expert, source in enumerate(task.sources):
                out[source] = reverse_rule(task.rule, [output[expert] for output in outputs], dims,
                                           f"{list(task.hf_names)}[{expert}] -> {source}")
        else:
            tensor = reverse_rule(task.rule, outputs, dims, f"{list(task.hf_names)} -> {task.sources[0]}")
            out.update(dict.fromkeys(task.sources, tensor))
    return out
