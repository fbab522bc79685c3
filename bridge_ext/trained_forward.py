"""LoRA adapters whose trained Megatron forward no exported LoRA reproduces, told before export.

Megatron-Bridge 0.6.2 (and earlier) computes a routed expert's row-parallel LoRA
(``linear_fc2``) wrongly at expert-tensor parallelism > 1: megatron-core drops the expert
linear's own all-reduce there (``explicit_expert_comm``) and leaves the sum to the MoE token
dispatcher, but the adapter's ``linear_out`` all-gathers its unsummed partials, which the
dispatcher then sums again. The model computes ``W + ETP * scale * blockdiag(B_r A_r)``, which
no rank-r LoRA expresses (NVIDIA-NeMo/Megatron-Bridge#5634). An export writes the LoRA factors,
which is what the model computes at expert-tensor parallelism 1; the user is warned once, before
the first tensor, so that a difference in the inference engine's outputs is not a surprise.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from typing import TYPE_CHECKING

from bridge_ext.peft_keys import weight_module

if TYPE_CHECKING:
    from bridge_ext.plan import ExportPlan
    from bridge_ext.source import Adapter

LAST_AFFECTED_MEGATRON_BRIDGE = (0, 6, 2)


class TrainedForwardWarning(UserWarning):
    """The exported weights are not exactly what the live Megatron model computes."""


def warn_if_expert_lora_differs(plan: ExportPlan, adapters: dict[str, Adapter], expert_tensor_parallel: int) -> None:
    """Warn when ``adapters`` hold routed-expert row-parallel LoRA trained at
    ``expert_tensor_parallel`` > 1 with an affected Megatron-Bridge."""
    if expert_tensor_parallel <= 1 or not _affected_megatron_bridge():
        return
    modules = sorted({weight_module(source)
                      for task in plan.adapter_tasks
                      if task.rule.tp == "row" and plan.table.family(task.rule) is not None
                      for source in task.sources if weight_module(source) in adapters})
    if modules:
        warnings.warn(
            f"{len(modules)} routed-expert row-parallel LoRA adapters (e.g. {modules[0]}) run at "
            f"expert-tensor parallelism {expert_tensor_parallel}, where Megatron-Bridge "
            f"{'.'.join(map(str, LAST_AFFECTED_MEGATRON_BRIDGE))} and earlier compute them as "
            f"W + {expert_tensor_parallel}·scale·blockdiag(B_r·A_r), not W + scale·B·A "
            "(NVIDIA-NeMo/Megatron-Bridge#5634): the exported LoRA is what the model computes at "
            "expert-tensor parallelism 1. Train expert LoRA with expert_tensor_parallel_size=1.",
            TrainedForwardWarning, stacklevel=2)


def _affected_megatron_bridge() -> bool:
    try:
        version = importlib.metadata.version("megatron-bridge")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    return numbers <= LAST_AFFECTED_MEGATRON_BRIDGE
