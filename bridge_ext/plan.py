"""The export plan: every Megatron tensor matched to a rule and every output to transformers'
key set, checked on meta tensors before a tensor moves. Built once per model (live) or
checkpoint and never changed; what exports of it work out once lives in its :class:`PlanCache`.

Shared by the live front end (:mod:`bridge_ext.export`) and the checkpoint one
(:mod:`bridge_ext.convert`); it imports neither, nor the live or parallel modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch

from bridge_ext.dims import ModelDims
from bridge_ext.dora import check_dora, refuse_for_vllm
from bridge_ext.engine import ExportError, Mode, Task, TaskConverter, plan_tasks
from bridge_ext.errors import RuleError
from bridge_ext.expert_layouts import ExpertLayouts
from bridge_ext.fp8_export import Fp8Plan, check_quantize, fp8_rules_of, plan_fp8
from bridge_ext.peft_config import FusedExpertKeys, adapted_outputs
from bridge_ext.peft_keys import weight_module
from bridge_ext.source import TensorSource
from bridge_ext.table import ExpertLayout, MappingTable
from bridge_ext.tables import table_for

_KEY_SETS: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}


def checkpoint_keys(config, expert_layout: ExpertLayout) -> dict[str, tuple[int, ...]]:
    """``hf_checkpoint_keys``, remembered per config and layout (it builds a meta model)."""
    from bridge_ext.hf_keys import hf_checkpoint_keys

    key = (config.to_json_string(), expert_layout)
    if key not in _KEY_SETS:
        if len(_KEY_SETS) >= 8:
            _KEY_SETS.clear()
        _KEY_SETS[key] = hf_checkpoint_keys(config, expert_layout=expert_layout)
    return _KEY_SETS[key]


@dataclass
class PlanCache:
    """What exports of one plan work out once and reuse (they repeat every training step); the
    plan itself never changes. One per plan: a new plan starts with an empty one."""

    #: per conversion mode, the reads recorded for each task (by ``Task.key``; see TaskConverter.reads)
    recorded: dict[Mode, dict[tuple, list[str]]] = field(default_factory=dict)
    #: the conversion modes whose shapes were checked, and "config" once the live config was
    checked: set = field(default_factory=set)
    #: per ``vllm_names``, see :func:`bridge_ext.export.expert_adapter_groups`
    expert_adapter_groups: dict[bool, dict[str, str]] = field(default_factory=dict)
    #: how fused-expert adapters are named and packed (the plan's adapters decide it)
    expert_keys: FusedExpertKeys | None = None
    #: block-FP8 plans per (base mode, engine tensor-parallel size), see :func:`fp8_plan`
    fp8_plans: dict = field(default_factory=dict)
    #: the DoRA adapters (see :mod:`bridge_ext.dora`), listed once
    dora: list | None = None
    #: whether an ``adapter_for="vllm"`` export has warned that it leaves MTP adapters out
    mtp_adapters_warned: bool = False


@dataclass(frozen=True)
class ExportPlan:
    """Everything about one export that names alone decide, checked before tensors move; built
    once by :func:`plan_export` (:meth:`with_extra_shapes` makes a new one), never changed."""

    config: object
    table: MappingTable
    dims: ModelDims
    base_tasks: tuple[Task, ...]
    adapter_tasks: tuple[Task, ...]
    layouts: ExpertLayouts
    hf_keys: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    #: shapes of names outside transformers' key set, from the source folder when known
    extra_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    #: what exports of this plan remember (a new plan, a new cache)
    cache: PlanCache = field(default_factory=PlanCache, init=False, repr=False, compare=False)

    def with_extra_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> ExportPlan:
        """This plan with the source folder's ``shapes`` of names outside transformers' key set."""
        return replace(self, extra_shapes=MappingProxyType(dict(shapes)))

    def dora_adapters(self, source: TensorSource) -> list:
        """The source's DoRA adapters (remembered: exports repeat every training step)."""
        if self.cache.dora is None:
            self.cache.dora = [adapter for adapter in source.adapters().values() if adapter.magnitude]
        return self.cache.dora

    def is_extra(self, hf_name: str) -> bool:
        """A name outside transformers' key set that the table and the config allow (MTP)."""
        extra = self.table.extra_weights
        return extra is not None and extra.count(self.config) > 0 and extra.holds(hf_name)


def plan_export(source: TensorSource, config, layouts: ExpertLayouts | None = None) -> ExportPlan:
    """Match every Megatron tensor to a rule and every output name to the HF checkpoint's keys."""
    table = table_for(config)
    layouts = layouts or ExpertLayouts()
    base_variants, adapter_variants = layouts.base_variants(table), layouts.adapter_variants(table)
    base_tasks = plan_tasks(source.base_names(), table, base_variants)
    # without adapters there is nothing to lay out (a table may offer one expert layout only)
    adapter_tasks = (
        base_tasks if adapter_variants == base_variants or not source.adapters()
        else plan_tasks(source.base_names(), table, adapter_variants)
    )
    planned = {name for task in base_tasks for name in task.sources}
    orphans = sorted(module for module in source.adapters() if f"{module}.weight" not in planned)
    shared = [module for module in orphans if f"{module}.weight0" in planned]
    if shared:  # one adapter on a Transformer Engine grouped linear: every local expert's weight
        raise ExportError(f"LoRA adapters on {shared} are shared by all the grouped experts of their module "
                          "(Megatron-Bridge's LoRA(share_expert_adapters=True) on grouped experts), which is not "
                          "supported; train expert LoRA on sequential experts (moe_grouped_gemm=False)")
    if orphans:
        raise ExportError(f"LoRA adapters on {orphans} wrap no weight a rule exports; they would be lost")
    produced = [name for task in base_tasks for name in task.hf_names]
    duplicates = sorted({name for name in produced if produced.count(name) > 1})
    if duplicates:
        raise ExportError(f"several Megatron tensors map to {duplicates}")
    hf_keys = checkpoint_keys(config, layouts.transformers_layout(table))
    plan = ExportPlan(config, table, table.dims(config), tuple(base_tasks), tuple(adapter_tasks), layouts,
                      MappingProxyType(hf_keys))
    unexpected = [name for name in produced if name not in hf_keys and not plan.is_extra(name)]
    missing = sorted(set(hf_keys) - set(produced))
    if unexpected or missing:
        raise ExportError(
            f"the export does not match the {config.model_type} checkpoint format: "
            f"unexpected {unexpected or 'none'}; missing {missing or 'none'}"
        )
    return plan


def refuse_adapters_for_vllm(source: TensorSource, plan: ExportPlan) -> None:
    """Adapters vLLM would refuse (DoRA) or apply nowhere (the table's ``vllm_adapters_refused``),
    refused before the first tensor of an ``adapter_for="vllm"`` export."""
    if plan.table.vllm_adapters_refused:
        raise ExportError(f"LoRA adapters of {', '.join(plan.table.model_types)} for vLLM: "
                          f"{plan.table.vllm_adapters_refused}; give vLLM merged weights (peft=False)")
    refuse_for_vllm(plan.dora_adapters(source))


def conversion_passes(source: TensorSource, plan: ExportPlan, *, base: Mode | None, adapters: bool,
                      dtype: torch.dtype | None = None, stacks_on_host: bool = False,
                      ) -> list[tuple[TaskConverter, tuple[Task, ...]]]:
    """The converters :func:`stream` runs, each with the tasks it converts, in order
    (``stacks_on_host``: see :class:`~bridge_ext.engine.TaskConverter`)."""
    found = source.adapters()
    if adapters and not found:
        raise ExportError("adapters were asked for, but the model has no LoRA adapters")
    if adapters and plan.table.adapters_refused:
        raise ExportError(f"LoRA adapters of {', '.join(plan.table.model_types)} cannot be exported: "
                          f"{plan.table.adapters_refused}; export merged weights (peft=False) instead")
    if plan.dora_adapters(source):
        check_dora(plan.cache.dora, merged=base is Mode.MERGED, adapters_out=adapters)
    passes = []
    if base is not None:
        passes.append((TaskConverter(source, plan.dims, base, dtype, recorded=plan.cache.recorded.setdefault(base, {}),
                                     stacks_on_host=stacks_on_host), plan.base_tasks))
    if adapters:
        if plan.cache.expert_keys is None:
            plan.cache.expert_keys = FusedExpertKeys(adapted_outputs(plan.adapter_tasks, found, plan.table))
        passes.append((TaskConverter(source, plan.dims, Mode.ADAPTERS, dtype, expert_adapters=plan.cache.expert_keys,
                                     recorded=plan.cache.recorded.setdefault(Mode.ADAPTERS, {})), plan.adapter_tasks))
    return passes


def check_shapes(source: TensorSource, plan: ExportPlan, passes: list[tuple[TaskConverter, tuple[Task, ...]]], *,
                 exported: str = "the model") -> None:
    """Run every task of ``passes`` on meta tensors of the source's shard shapes (splits,
    tensor-parallel joins, LoRA factor shapes, merges) and compare every output with the
    Hugging Face shapes (``plan.hf_keys``, ``plan.extra_shapes``). Raises ExportError at the
    first tensor that does not fit, naming the Megatron tensor, the Hugging Face tensor(s) and
    both shapes; ``exported`` names the source in that message. Checked once per plan and mode."""
    expected = {**plan.hf_keys, **plan.extra_shapes}
    # an adapter task's merge check runs the adapter layout's rules (``fused``: the in-memory
    # layout PEFT adapts, also beside a ``fused_transposed`` base of the same names), so its
    # outputs have that layout's shapes
    merged_expected = expected
    if plan.table.expert_families and plan.layouts.adapters != plan.layouts.transformers_layout(plan.table):
        merged_expected = {**checkpoint_keys(plan.config, plan.layouts.adapters), **plan.extra_shapes}
    for converter, tasks in passes:
        if converter.mode in plan.cache.checked:
            continue
        merged = TaskConverter(source, plan.dims, Mode.MERGED)  # adapters must also merge into their bases
        for task in tasks:
            first = task.sources[0]
            for run in (converter, merged) if converter.mode is Mode.ADAPTERS else (converter,):
                try:
                    _, outputs = run.dry_run(task)
                except (ValueError, RuntimeError) as error:
                    if isinstance(error, ExportError) and not isinstance(error, RuleError):
                        raise  # not about shapes (e.g. a tensor the source lacks)
                    wanted = {hf: expected.get(hf) for hf in task.hf_names}
                    adapter = source.adapters().get(weight_module(first)) if run.mode is not Mode.BASE else None
                    lora = (f" with LoRA {adapter.lora_a} {_shapes_text(source, adapter.lora_a)} and {adapter.lora_b} "
                            f"{_shapes_text(source, adapter.lora_b)}" if adapter is not None else "")
                    raise ExportError(f"{exported} and the Hugging Face config disagree: {first} has shape "
                                      f"{_shapes_text(source, first)}{lora}, which cannot become {wanted} "
                                      f"({error})") from None
                wanted = merged_expected if run is merged else expected
                for name, shape in outputs:
                    if name in wanted and tuple(wanted[name]) != shape:
                        raise ExportError(
                            f"{exported} and the Hugging Face config disagree on {name}: {first} "
                            f"{_shapes_text(source, first)} gives {shape}, the config implies {tuple(wanted[name])}")
        plan.cache.checked.add(converter.mode)


def fp8_plan(source: TensorSource, plan: ExportPlan, mode: Mode | None, quantize: str | None,
             engine_tp_size: int | None = 1) -> Fp8Plan | None:
    """The block-FP8 plan of the base weights ``mode`` exports (None without ``quantize``), made
    from the shapes of a meta run of every task: refuses an unknown quantization, a table without
    FP8 rules and a weight the engine's block check refuses at ``engine_tp_size``."""
    check_quantize(quantize, engine_tp_size)
    if quantize is None:
        return None
    if mode is None:  # adapters only: nothing to quantize, but the table must allow FP8
        fp8_rules_of(plan.table)
        return None
    key = (mode, engine_tp_size)
    if key not in plan.cache.fp8_plans:
        passes = conversion_passes(source, plan, base=mode, adapters=False)
        check_shapes(source, plan, passes)
        converter, tasks = passes[0]
        shapes = {name: shape for task in tasks for name, shape in converter.dry_run(task)[1]}
        plan.cache.fp8_plans[key] = plan_fp8(plan.table, shapes, engine_tp_size)
    return plan.cache.fp8_plans[key]


def _shapes_text(source: TensorSource, name: str) -> str:
    shapes = [tuple(shape) for shape in source.shard_shapes(name)]
    return str(shapes[0]) if len(shapes) == 1 else f"{shapes} (tensor-parallel shards)"
