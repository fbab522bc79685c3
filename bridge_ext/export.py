"""Public entry points: stream Hugging Face weights and PEFT adapters out of a Megatron model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from bridge_ext.dims import ModelDims, text_config
from bridge_ext.engine import ExportError, Mode, Task, TaskConverter, plan_tasks
from bridge_ext.live import LiveModelSource, unwrap_chunks
from bridge_ext.peft_config import FusedExpertKeys, adapted_outputs, lora_config
from bridge_ext.source import TensorSource

ExpertLayout = Literal["fused", "per_expert"]


def resolve_hf_config(model, hf_config=None):
    """The Hugging Face config: ``hf_config`` (a config or a folder), else the model's source.

    Megatron-Bridge keeps the Hugging Face folder or id a model was built from in
    ``model.config.hf_model_id``.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(hf_config, PretrainedConfig):
        return hf_config
    if hf_config is None:
        chunks = unwrap_chunks(model)
        hf_config = getattr(chunks[0].config, "hf_model_id", None)
        if not hf_config:
            raise ExportError(
                "cannot tell the model's Hugging Face architecture: pass hf_config= "
                "(a transformers config or a folder holding config.json)"
            )
    return AutoConfig.from_pretrained(str(hf_config))


@dataclass
class ExportPlan:
    """Everything about one export that names alone decide, checked before tensors move."""

    config: object
    dims: ModelDims
    tasks: list[Task]
    variants: frozenset[str]
    expert_layout: ExpertLayout
    hf_names: list[str] = field(default_factory=list)
    hf_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)


def plan_export(source: TensorSource, config, *, expert_layout: ExpertLayout = "fused") -> ExportPlan:
    """Match every Megatron tensor to a rule and every output name to the HF checkpoint's keys."""
    from bridge_ext.hf_keys import hf_checkpoint_keys
    from model_mappings import table_for

    table = table_for(config.model_type)
    variants = frozenset({f"experts:{expert_layout}"})
    tasks = plan_tasks(source.base_names(), table, variants)
    produced = [name for task in tasks for name in task.hf_names]
    duplicates = sorted({name for name in produced if produced.count(name) > 1})
    if duplicates:
        raise ExportError(f"several Megatron tensors map to {duplicates}")
    hf_keys = hf_checkpoint_keys(config, expert_layout=expert_layout)
    expected = set(hf_keys)
    mtp_layers = mtp_layer_count(config)
    unexpected = [n for n in produced if n not in expected and not (mtp_layers and n.startswith("mtp."))]
    missing = sorted(expected - set(produced))
    if unexpected or missing:
        raise ExportError(
            f"the export does not match the {config.model_type} checkpoint format: "
            f"unexpected {unexpected or 'none'}; missing {missing or 'none'}"
        )
    return ExportPlan(config, ModelDims.from_hf_config(config), tasks, variants, expert_layout, produced, hf_keys)


def mtp_layer_count(config) -> int:
    """Number of MTP layers a Hugging Face config declares (0 when none)."""
    for holder in (config, text_config(config)):
        for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
            value = getattr(holder, key, None)
            if value:
                return int(value)
    return 0


def prepare(model, hf_config=None, expert_layout: ExpertLayout = "fused") -> tuple[TensorSource, ExportPlan]:
    """The model as a tensor source, and its checked export plan."""
    source = LiveModelSource(model)
    return source, plan_export(source, resolve_hf_config(model, hf_config), expert_layout=expert_layout)


def _mode(peft: bool, adapters_only: bool) -> Mode:
    if adapters_only:
        if not peft:
            raise ValueError("adapters_only=True needs peft=True")
        return Mode.ADAPTERS
    return Mode.PEFT if peft else Mode.MERGED


def stream(source: TensorSource, plan: ExportPlan, mode: Mode, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Convert the planned tasks one by one."""
    adapters = source.adapters()
    if mode is Mode.ADAPTERS and not adapters:
        raise ExportError("adapters_only=True, but the model has no LoRA adapters")
    expert_keys = FusedExpertKeys(adapted_outputs(plan, adapters))
    converter = TaskConverter(source, plan.dims, mode, dtype, expert_adapters=expert_keys)
    for task in plan.tasks:
        yield from converter(task)


def export_hf_weights(
    model,
    peft: bool = True,
    *,
    adapters_only: bool = False,
    hf_config=None,
    expert_layout: ExpertLayout = "fused",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_name, tensor)`` pairs out of a Megatron model.

    Args:
        model: A Megatron-Core model or list of virtual-pipeline chunks, possibly wrapped by
            Megatron-Bridge LoRA.
        peft: True: base weights under their Hugging Face names (never ``.base_layer``) and
            LoRA adapters under PEFT's saved keys (``base_model.model.<module>.lora_A.weight``).
            False: LoRA merged into the base weights (``W + alpha/r * B @ A`` in fp32), no
            adapter keys.
        adapters_only: Only the adapters (per-step weight sync); needs ``peft=True``.
        hf_config: A transformers config or a folder with config.json; by default the
            Hugging Face source Megatron-Bridge recorded in ``model.config.hf_model_id``.
        expert_layout: MoE experts as Hugging Face's fused ``experts.gate_up_proj``
            (adapters in PEFT's ``target_parameters`` layout) or per expert.
        dtype: Cast every exported tensor to this dtype (default: keep the model's).

    Every rank of a parallel job must iterate the generator together. Nothing is silently
    dropped: a parameter no rule covers, or a Hugging Face name the export would miss or
    invent, raises :class:`ExportError` before the first tensor is produced.
    """
    mode = _mode(peft, adapters_only)
    source, plan = prepare(model, hf_config, expert_layout)
    yield from stream(source, plan, mode, dtype)


def peft_adapter_config(model, *, hf_config=None, expert_layout: ExpertLayout = "fused",
                        base_model_name_or_path: str | None = None):
    """PEFT's ``LoraConfig`` for the model's adapters, as :func:`export_hf_weights` names them.

    ``base_model_name_or_path`` defaults to the Hugging Face source of the model.
    """
    source, plan = prepare(model, hf_config, expert_layout)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(unwrap_chunks(model)[0].config, "hf_model_id", None)
    return lora_config(plan, source.adapters(), plan.hf_keys, base_model_name_or_path)


@dataclass
class Bucket:
    """Consecutive exported tensors; ``is_last`` marks the final bucket of an export."""

    tensors: list[tuple[str, torch.Tensor]]
    is_last: bool

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self.tensors)


def buckets(pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group a stream into buckets of at most ``bucket_bytes`` (a larger tensor goes alone).

    Exactly one bucket, the last, has ``is_last=True`` (an empty stream gives one empty
    bucket), so a consumer can apply one complete adapter when it sees it.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > bucket_bytes:
            yield Bucket(current, is_last=False)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    yield Bucket(current, is_last=True)


def export_hf_buckets(model, bucket_bytes: int = 512 << 20, **kwargs) -> Iterator[Bucket]:
    """:func:`export_hf_weights` grouped into :class:`Bucket` s of at most ``bucket_bytes``."""
    return buckets(export_hf_weights(model, **kwargs), bucket_bytes)


def hf_source_folder(model, hf_config=None) -> Path | None:
    """The local Hugging Face folder the model came from, if there is one."""
    candidate = hf_config if isinstance(hf_config, (str, Path)) else None
    if candidate is None:
        candidate = getattr(unwrap_chunks(model)[0].config, "hf_model_id", None)
    return Path(candidate) if candidate and Path(candidate).is_dir() else None
