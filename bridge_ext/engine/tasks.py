"""Tasks: one rule instance each, planned from Megatron names alone; what a conversion pass yields.

A task is one instance of a rule: the Megatron tensor(s) it reads (several when experts are
stacked or a shared tensor has copies) and the Hugging Face tensors it writes. Planning uses
names only, so every unmapped parameter and every missing or unexpected name is reported
before any tensor moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from bridge_ext.errors import ExportError
from bridge_ext.peft_keys import weight_module
from bridge_ext.table import MappingTable, Rule

__all__ = ["Mode", "Task", "describe", "plan_tasks"]


@dataclass(frozen=True)
class Task:
    """One rule instance: the Megatron names it reads (in stack or copy order), the Hugging Face
    names it writes, and the wildcard values that name them."""

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

