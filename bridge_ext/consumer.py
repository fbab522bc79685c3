"""What a named consumer (vLLM) loads: the layouts it takes and the adapters it ignores.

The facts come from the tables (``vllm_expert_adapter_layouts``, ``vllm_expert_layouts``);
here they become refusals before the first tensor, shared by live exports and saved folders.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from bridge_ext.errors import ExportError
from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.table import ExpertLayout
from bridge_ext.tables import table_for

if TYPE_CHECKING:
    from bridge_ext.plan import ExportPlan

AdapterConsumer = Literal["peft", "vllm"]
ADAPTER_CONSUMERS: tuple[AdapterConsumer, ...] = ("peft", "vllm")
#: Why MTP adapters are left out for vLLM (its main classes accept them and apply them nowhere).
MTP_ADAPTERS_LEFT_OUT = "vLLM applies no LoRA to its MTP drafter"


def adapter_layout_for(config, adapter_for: str, expert_adapter_layout: ExpertLayout | None) -> ExpertLayout:
    """The expert-adapter layout for ``adapter_for``: ``expert_adapter_layout`` if given (for
    vLLM, refused unless vLLM loads it for the config's class), else PEFT's ``fused`` or the
    layout vLLM loads."""
    if adapter_for not in ADAPTER_CONSUMERS:
        raise ExportError(f"adapter_for must be one of {ADAPTER_CONSUMERS}, not {adapter_for!r}")
    if adapter_for == "peft":
        return expert_adapter_layout or "fused"
    table = table_for(config)
    wanted = table.vllm_expert_adapter_layout(config)
    if expert_adapter_layout is not None and expert_adapter_layout != wanted and table.expert_families:
        raise ExportError(
            f"vLLM does not load {expert_adapter_layout} expert adapters for {table.architecture(config)}: "
            f"it loads {wanted} ones (leave expert_adapter_layout unset for adapter_for='vllm')")
    return wanted


def vllm_base_layout(config, expert_layout: ExpertLayout | None) -> ExpertLayout | None:
    """The base expert layout of an export for vLLM: ``expert_layout``, refused where vLLM's
    loader for the config's class takes only the other one; unset, the one it takes (None
    where it takes both: the source folder's layout then decides)."""
    table = table_for(config)
    wanted = table.vllm_expert_layout(config)
    if expert_layout is not None and wanted is not None and expert_layout != wanted:
        raise ExportError(
            f"vLLM does not load {expert_layout} expert weights for {table.architecture(config)}: "
            f"it loads {wanted} ones (leave expert_layout unset for adapter_for='vllm')")
    return expert_layout or wanted


def is_mtp_adapter(plan: ExportPlan, key: str) -> bool:
    """Whether a PEFT adapter key belongs to an MTP layer (names outside transformers' key set)."""
    module = re.sub(r"\.(base_layer\.)?lora_[AB]\.weight$", "", key.removeprefix(PEFT_PREFIX))
    return plan.is_extra(module + ".weight")
