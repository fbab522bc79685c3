"""PEFT's view of the exported adapters: ``adapter_config.json`` and target-parameter keys.

Module adapters are listed in ``target_modules`` by their Hugging Face leaf names (never
``all-linear``, which would also wrap e.g. a vision tower); where a leaf name would also catch
a module that has no adapter, the adapted modules are listed by full name instead. Fused MoE
experts go to ``target_parameters`` (PEFT's ParamWrapper; see :mod:`bridge_ext.peft_experts`).
Ranks and alphas that differ from the most common one go to ``rank_pattern`` /
``alpha_pattern``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from bridge_ext.engine import ExportError, Task
from bridge_ext.peft_experts import peft_param_key_infixes
from bridge_ext.peft_keys import LORA_A, LORA_B, peft_parameter_key, weight_module
from bridge_ext.source import Adapter
from bridge_ext.table import ExpertFamily, MappingTable

_LAYER_NUMBER = re.compile(r"^.*?\.\d+\.")


@dataclass(frozen=True)
class AdaptedOutput:
    """One Hugging Face weight (module) or fused parameter that receives a LoRA pair."""

    hf_name: str
    adapter: Adapter
    family: ExpertFamily | None = None  # the expert family of a fused parameter

    @property
    def is_parameter(self) -> bool:
        """Fused expert parameters (``...experts.gate_up_proj``) are targeted as parameters."""
        return not self.hf_name.endswith(".weight")

    @property
    def target(self) -> str:
        """Module path (``model.layers.0.self_attn.q_proj``) or parameter path."""
        return weight_module(self.hf_name) or self.hf_name


def adapted_outputs(tasks: list[Task], adapters: dict[str, Adapter], table: MappingTable | None = None
                    ) -> list[AdaptedOutput]:
    """Every Hugging Face output of the tasks that carries a LoRA pair (``table``: to know the
    expert family of fused parameters)."""
    outputs = []
    for task in tasks:
        for source in task.sources[:1] if not task.rule.stack else task.sources:
            module = weight_module(source)
            adapter = adapters.get(module) if module else None
            if adapter is None:
                continue
            family = table.family(task.rule) if table is not None else None
            if adapter.parts and task.rule.stack:  # CanonicalLoRA gate and up: one block-diagonal pair
                outputs.extend(AdaptedOutput(hf_name, replace(adapter, rank=sum(p.rank for _, p in adapter.parts),
                                                              alpha=sum(p.alpha for _, p in adapter.parts)), family)
                               for hf_name in task.hf_names)
                break
            if adapter.parts:  # CanonicalLoRA: each output its own part's adapter, if it has one
                outputs.extend(AdaptedOutput(hf_name, adapter.part(part), family)
                               for hf_name, part in zip(task.hf_names, task.rule.lora_parts) if adapter.part(part))
                continue
            if task.rule.lora_fused:  # one pair on the linear transformers loads the outputs into
                outputs.append(AdaptedOutput(task.rule.lora_fused_name(task.values), adapter, family))
                continue
            outputs.extend(AdaptedOutput(hf_name, adapter, family) for hf_name in task.hf_names)
            if task.rule.stack:
                break  # one entry per fused parameter
    return outputs


class FusedExpertKeys:
    """Names and packs fused-expert adapters the way PEFT's nested ParamWrappers save them."""

    def __init__(self, outputs: list[AdaptedOutput]):
        self._targeted: dict[str, list[str]] = defaultdict(list)
        self._order: dict[str, tuple[str, ...]] = {}
        for output in outputs:
            if output.is_parameter:
                module, parameter = output.hf_name.rsplit(".", 1)
                self._targeted[module].append(parameter)
                if output.family is None:
                    raise ExportError(f"{output.hf_name}: a fused expert parameter of no expert family of the table")
                self._order[module] = output.family.parameters

    def __call__(self, hf_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Keys for one fused parameter's LoRA, given packed as PEFT's ParamWrapper holds it
        (``lora_A [E*r, in]``, ``lora_B [out, r*E]``: see :func:`fuse_expert_lora`)."""
        module, parameter = hf_name.rsplit(".", 1)
        order = self._order.get(module, ())
        if parameter not in order:
            raise ExportError(f"{hf_name}: the table's expert family lists the parameters {order}, not {parameter!r}")
        infix = peft_param_key_infixes(self._targeted[module], order)[parameter]
        yield peft_parameter_key(module, infix, LORA_A), lora_a
        yield peft_parameter_key(module, infix, LORA_B), lora_b


def _leaf_or_full_names(module_targets: list[str], module_names: set[str]) -> list[str]:
    """Leaf names, unless a leaf name also matches a module of the HF model without adapter.

    (PEFT would wrap that module too, e.g. ``proj`` would catch the vision patch embedding.)
    """
    adapted = set(module_targets)
    by_leaf: dict[str, list[str]] = defaultdict(list)
    for target in module_targets:
        by_leaf[target.rsplit(".", 1)[-1]].append(target)
    names: list[str] = []
    for leaf, targets in sorted(by_leaf.items()):
        others = {m for m in module_names if m.rsplit(".", 1)[-1] == leaf} - adapted
        names.extend([leaf] if not others else sorted(targets))
    return names


def peft_rewritten_leaves(model_type: str) -> set[str]:
    """Module leaf names PEFT rewrites into fused expert parameters for ``model_type``.

    With transformers v5, PEFT (0.21, ``transformers_weight_conversion._convert_peft_config_moe``)
    reads ``target_modules`` of MoE types converted like ``qwen2_moe`` (e.g. ``deepseek_v3``,
    ``glm4_moe``) as written for transformers v4: ``gate_proj`` / ``up_proj`` / ``down_proj``
    become the experts' ``gate_up_proj`` (rank and alpha doubled) / ``down_proj`` and are
    dropped from ``target_modules``, so dense MLPs and shared experts would lose their adapters.
    Such module weights are therefore listed in ``target_parameters`` (PEFT wraps a 2-D weight
    with the same ``lora_A`` / ``lora_B`` keys and shapes).
    """
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # a PEFT without the rewrite
        return set()
    mapping = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type)) or {}
    return {old for old, new in mapping.items() if new != f"{old}.weight"}


def _parameter_suffix(target: str) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``."""
    return _LAYER_NUMBER.sub("", target, count=1)


def lora_config(plan, adapters: dict[str, Adapter], base_model_name_or_path: str | None = None):
    """The ``peft.LoraConfig`` describing the exported adapters (``save_pretrained`` writes it)."""
    from peft import LoraConfig

    from bridge_ext.hf_keys import hf_checkpoint_keys

    # PEFT matches targets against the model in memory, where transformers v5 fuses experts.
    in_memory = map(plan.table.in_memory_name, hf_checkpoint_keys(plan.config, expert_layout="fused"))
    # every module PEFT could match a target against: the weights' modules and their containers
    # (a target leaf "0", nn.Sequential's first linear, also names a ModuleList's first child)
    module_names = {".".join(parts[:end]) for parts in (key.split(".") for key in in_memory)
                    for end in range(1, len(parts))}
    module_names |= {weight_module(plan.table.in_memory_name(task.rule.lora_fused_name(task.values)))
                     for task in plan.adapter_tasks if task.rule.lora_fused}  # linears joined on load

    outputs = [replace(o, hf_name=plan.table.in_memory_name(o.hf_name))
               for o in adapted_outputs(plan.adapter_tasks, adapters, plan.table)]
    if not outputs:
        raise ExportError("the model has no LoRA adapters")
    rewritten = peft_rewritten_leaves(plan.config.model_type)
    as_parameters = [o.target for o in outputs if not o.is_parameter and o.target.rsplit(".", 1)[-1] in rewritten]
    module_targets = [o.target for o in outputs if not o.is_parameter and o.target not in as_parameters]
    parameter_targets = sorted({_parameter_suffix(o.target) for o in outputs if o.is_parameter})
    parameter_targets += [f"{name}.weight" for name in _leaf_or_full_names(as_parameters, module_names)]
    for adapter in {o.adapter.module: o.adapter for o in outputs}.values():
        _check_lora_numbers(adapter)
    ranks = Counter(o.adapter.rank for o in outputs)
    alphas = Counter(o.adapter.alpha for o in outputs)
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern = {o.target: o.adapter.rank for o in outputs if o.adapter.rank != rank}
    alpha_pattern = {o.target: o.adapter.alpha for o in outputs if o.adapter.alpha != alpha}
    dora = {o.adapter.magnitude is not None for o in outputs}
    if len(dora) > 1:
        raise ExportError("some adapters are DoRA and some plain LoRA; one PEFT config cannot say so "
                          f"(DoRA on {next(o.target for o in outputs if o.adapter.magnitude)}, plain LoRA on "
                          f"{next(o.target for o in outputs if not o.adapter.magnitude)})")
    dropouts = {o.adapter.dropout for o in outputs}
    # PEFT's ParamWrapper (fused experts) refuses dropout; it does not change exported weights.
    dropout = 0.0 if parameter_targets else max(dropouts)
    alpha_value = int(alpha) if float(alpha).is_integer() else alpha
    return LoraConfig(
        r=rank,
        lora_alpha=alpha_value,
        target_modules=_leaf_or_full_names(module_targets, module_names) or None,
        target_parameters=parameter_targets or None,
        lora_dropout=dropout,
        bias="none",
        use_rslora=False,
        use_dora=dora.pop(),
        task_type="CAUSAL_LM",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=base_model_name_or_path,
    )


def _check_lora_numbers(adapter: Adapter) -> None:
    """Numbers PEFT accepts: it refuses a dropout outside [0, 1], and a NaN or infinite alpha
    (written as non-standard JSON) makes every logit NaN."""
    problems = []
    if type(adapter.rank) is not int or adapter.rank < 1:
        problems.append(f"rank {adapter.rank!r} (must be an integer of at least 1)")
    if not math.isfinite(adapter.alpha) or adapter.alpha <= 0:
        problems.append(f"alpha {adapter.alpha!r} (must be a finite number above 0)")
    if not 0 <= adapter.dropout <= 1:
        problems.append(f"dropout {adapter.dropout!r} (must be a probability from 0 to 1)")
    if problems:
        raise ExportError(f"LoRA adapter of {adapter.module}: " + ", ".join(problems) + "; PEFT cannot load it")
