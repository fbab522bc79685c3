"""The generic conversion engine: plans tasks from a table, converts one task at a time.

Modules, each with one job:

* :mod:`.tasks` — :class:`Task`, :class:`Mode`, :func:`plan_tasks` (names only);
* :mod:`.rules` — a rule's operations on one tensor's tensor-parallel shards;
* :mod:`.lora` — the LoRA rule (``A`` shared, ``B`` follows row operations, transposes swap);
* :mod:`.merge` — the fp32 merge arithmetic, one weight or a stack of experts;
* :mod:`.converter` — :class:`TaskConverter`, the rule-application core;
* strategies the core delegates to, each giving what the core would give: :mod:`.stacked`
  (fused experts), :mod:`.assembly` (block-wise, optionally into pinned host memory),
  :mod:`.batches` (batched merges of per-expert tasks), :mod:`.meta` (meta runs: shape checks
  and recorded reads).
"""

from bridge_ext.engine.batches import merge_batches
from bridge_ext.engine.converter import ExpertAdapterKeys, TaskConverter, convert_tasks
from bridge_ext.engine.meta import MetaSource
from bridge_ext.engine.rules import apply_ops, run_rule
from bridge_ext.engine.tasks import Mode, Task, plan_tasks
from bridge_ext.errors import ExportError
from bridge_ext.peft_keys import PEFT_PREFIX

__all__ = ["PEFT_PREFIX", "ExpertAdapterKeys", "ExportError", "MetaSource", "Mode", "Task", "TaskConverter",
           "apply_ops", "convert_tasks", "merge_batches", "plan_tasks", "run_rule"]
