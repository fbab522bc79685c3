"""PEFT's view of the exported adapters: ``adapter_config.json`` and target-parameter keys.

Module adapters are listed in ``target_modules`` by their Hugging Face leaf names (never
``all-linear``, which would also wrap e.g. a vision tower); where a leaf name would also catch
a module that has no adapter, the adapted modules are listed by full name instead. Fused MoE
experts go to ``target_parameters`` (PEFT's ParamWrapper; see :mod:`bridge_ext.peft_experts`).
Ranks and alphas that differ from the most common one go to ``rank_pattern`` /
``alpha_pattern``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bridge_ext.engine import ExportError, Task
from bridge_ext.peft_experts import EXPERT_PARAM_ORDER, peft_param_key_infixes
from bridge_ext.source import Adapter

_LAYER_NUMBER = re.compile(r"^.*?\.\d+\.")


@dataclass(frozen=True)
class AdaptedOutput:
    """One Hugging Face weight (module) or fused parameter that receives a LoRA pair."""

    hf_name: str
    adapter: Adapter

    @property
    def is_parameter(self) -> bool:
        """Fused expert parameters (``...experts.gate_up_proj``) are targeted as parameters."""
        return not self.hf_name.endswith(".weight")

    @property
    def target(self) -> str:
        """Module path (``model.layers.0.self_attn.q_proj``) or parameter path."""
        return self.hf_name[: -len(".weight")] if not self.is_parameter else self.hf_name


def adapted_outputs(tasks: list[Task], adapters: dict[str, Adapter]) -> list[AdaptedOutput]:
    """Every Hugging Face output of the tasks that carries a LoRA pair."""
    outputs = []
    for task in tasks:
        for source in task.sources[:1] if not task.rule.stack else task.sources:
            module = source[: -len(".weight")] if source.endswith(".weight") else None
            adapter = adapters.get(module) if module else None
            if adapter is None:
                continue
            outputs.extend(AdaptedOutput(hf_name, adapter) for hf_name in task.hf_names)
            if task.rule.stack:
                break  # one entry per fused parameter
    return outputs


class FusedExpertKeys:
    """Names and packs fused-expert adapters the way PEFT's nested ParamWrappers save them."""

    def __init__(self, outputs: list[AdaptedOutput]):
        self._targeted: dict[str, list[str]] = defaultdict(list)
        for output in outputs:
            if output.is_parameter:
                module, parameter = output.hf_name.rsplit(".", 1)
                self._targeted[module].append(parameter)

    def __call__(self, hf_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Keys for one fused parameter's LoRA, given packed as PEFT's ParamWrapper holds it
        (``lora_A [E*r, in]``, ``lora_B [out, r*E]``: see :func:`fuse_expert_lora`)."""
        module, parameter = hf_name.rsplit(".", 1)
        if parameter not in EXPERT_PARAM_ORDER:
            raise ExportError(f"{hf_name}: PEFT's parameter targets are known for {EXPERT_PARAM_ORDER} only")
        infix = peft_param_key_infixes(self._targeted[module])[parameter]
        yield f"base_model.model.{module}.{infix}lora_A.weight", lora_a
        yield f"base_model.model.{module}.{infix}lora_B.weight", lora_b


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


def _parameter_suffix(target: str) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``."""
    return _LAYER_NUMBER.sub("", target, count=1)


def lora_config(plan, adapters: dict[str, Adapter], base_model_name_or_path: str | None = None):
    """The ``peft.LoraConfig`` describing the exported adapters (``save_pretrained`` writes it)."""
    from peft import LoraConfig

    from bridge_ext.hf_keys import hf_checkpoint_keys

    # PEFT matches targets against the model in memory, where transformers v5 fuses experts.
    in_memory = hf_checkpoint_keys(plan.config, expert_layout="fused")
    module_names = {key.rsplit(".", 1)[0] for key in in_memory if key.endswith(".weight")}

    outputs = adapted_outputs(plan.adapter_tasks, adapters)
    if not outputs:
        raise ExportError("the model has no LoRA adapters")
    module_targets = [o.target for o in outputs if not o.is_parameter]
    parameter_targets = sorted({_parameter_suffix(o.target) for o in outputs if o.is_parameter})
    ranks = Counter(o.adapter.rank for o in outputs)
    alphas = Counter(o.adapter.alpha for o in outputs)
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern = {o.target: o.adapter.rank for o in outputs if o.adapter.rank != rank}
    alpha_pattern = {o.target: o.adapter.alpha for o in outputs if o.adapter.alpha != alpha}
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
        task_type="CAUSAL_LM",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=base_model_name_or_path,
    )
