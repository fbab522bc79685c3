"""Public entry points: stream Hugging Face weights and PEFT adapters out of a Megatron model."""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from bridge_ext.dims import ModelDims, text_config
from bridge_ext.engine import ExportError, Mode, Task, TaskConverter, convert_tasks, peft_key, plan_tasks
from bridge_ext.distributed import Destination, all_agree
from bridge_ext.live import LiveModelSource, unwrap_chunks
from bridge_ext.peft_config import FusedExpertKeys, adapted_outputs, lora_config
from bridge_ext.source import TensorSource
from bridge_ext.sync import to_host

ExpertLayout = Literal["fused", "per_expert"]


def resolve_hf_config(model, hf_config=None):
    """The Hugging Face config: ``hf_config`` (a config or a folder), else the model's source.

    Megatron-Bridge keeps the Hugging Face folder or id a model was built from in
    ``model.config.hf_model_id``.
    """
    from transformers import PretrainedConfig

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
    return _load_config(str(hf_config), _mtime(Path(str(hf_config)) / "config.json"))


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.is_file() else 0


@functools.lru_cache(maxsize=8)
def _load_config(name_or_path: str, mtime: int):
    """``AutoConfig.from_pretrained``, once per folder version (exports repeat every step)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path)


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


@dataclass(frozen=True)
class ExpertLayouts:
    """How MoE experts are laid out in an export.

    ``experts`` / ``mtp_experts``: the base weights of the main model's and the MTP layers'
    experts (published Qwen3.5-MoE checkpoints fuse the first and not the second);
    ``adapters``: the expert adapters, ``fused`` being PEFT's ``target_parameters`` layout.
    """

    experts: ExpertLayout = "fused"
    mtp_experts: ExpertLayout = "fused"
    adapters: ExpertLayout = "fused"

    @property
    def base_variants(self) -> frozenset[str]:
        return frozenset({f"experts:{self.experts}", f"mtp_experts:{self.mtp_experts}"})

    @property
    def adapter_variants(self) -> frozenset[str]:
        return frozenset({f"experts:{self.adapters}", f"mtp_experts:{self.adapters}"})


def source_expert_layouts(folder: Path | None) -> dict[str, ExpertLayout]:
    """The expert layouts a Hugging Face folder's safetensors use (empty when unknown)."""
    if folder is None:
        return {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = list(json.loads(index.read_text())["weight_map"])
    elif (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            names = list(handle.keys())
    else:
        return {}
    found: dict[str, ExpertLayout] = {}
    for name in names:
        part = "mtp_experts" if name.startswith("mtp.") else "experts"
        if ".experts.gate_up_proj" in name:
            found.setdefault(part, "fused")
        elif re.search(r"\.experts\.\d+\.", name):
            found.setdefault(part, "per_expert")
    return found


@dataclass
class ExportPlan:
    """Everything about one export that names alone decide, checked before tensors move."""

    config: object
    dims: ModelDims
    base_tasks: list[Task]
    adapter_tasks: list[Task]
    layouts: ExpertLayouts
    hf_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)


def plan_export(source: TensorSource, config, layouts: ExpertLayouts = ExpertLayouts()) -> ExportPlan:
    """Match every Megatron tensor to a rule and every output name to the HF checkpoint's keys."""
    from model_mappings import table_for

    table = table_for(config.model_type)
    base_tasks = plan_tasks(source.base_names(), table, layouts.base_variants)
    adapter_tasks = (
        base_tasks if layouts.adapter_variants == layouts.base_variants
        else plan_tasks(source.base_names(), table, layouts.adapter_variants)
    )
    planned = {name for task in base_tasks for name in task.sources}
    orphans = sorted(module for module in source.adapters() if f"{module}.weight" not in planned)
    if orphans:
        raise ExportError(f"LoRA adapters on {orphans} wrap no weight a rule exports; they would be lost")
    produced = [name for task in base_tasks for name in task.hf_names]
    duplicates = sorted({name for name in produced if produced.count(name) > 1})
    if duplicates:
        raise ExportError(f"several Megatron tensors map to {duplicates}")
    hf_keys = checkpoint_keys(config, layouts.experts)
    mtp_layers = mtp_layer_count(config)
    unexpected = [n for n in produced if n not in hf_keys and not (mtp_layers and n.startswith("mtp."))]
    missing = sorted(set(hf_keys) - set(produced))
    if unexpected or missing:
        raise ExportError(
            f"the export does not match the {config.model_type} checkpoint format: "
            f"unexpected {unexpected or 'none'}; missing {missing or 'none'}"
        )
    return ExportPlan(config, ModelDims.from_hf_config(config), base_tasks, adapter_tasks, layouts, hf_keys)


def mtp_layer_count(config) -> int:
    """Number of MTP layers a Hugging Face config declares (0 when none)."""
    for holder in (config, text_config(config)):
        for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
            value = getattr(holder, key, None)
            if value:
                return int(value)
    return 0


def prepare(model, hf_config=None, expert_layout: ExpertLayout | None = None,
            expert_adapter_layout: ExpertLayout = "fused", destination: Destination = "all",
            ) -> tuple[TensorSource, ExportPlan]:
    """The model as a tensor source, and its checked export plan.

    ``expert_layout=None`` follows the Hugging Face source folder's own layout where it is
    known, else fuses. ``destination``: see :func:`export_hf_weights`.

    Exports repeat every training step, so both are remembered per model while its parameter
    objects (and their shapes and dtypes), its Hugging Face folder's config.json and these
    arguments stay the same (not when ``hf_config`` is a config object: it may have changed).
    """
    chunks = unwrap_chunks(model)
    key = _prepared_key(chunks, hf_config, expert_layout, expert_adapter_layout, destination)
    cached = _PREPARED.get(chunks[0])
    if all_agree(key is not None and cached is not None and cached[0] == key):
        return cached[1], cached[2]
    source = LiveModelSource(model, destination)
    found = source_expert_layouts(hf_source_folder(model, hf_config))
    layouts = ExpertLayouts(
        experts=expert_layout or found.get("experts", "fused"),
        mtp_experts=expert_layout or found.get("mtp_experts", "fused"),
        adapters=expert_adapter_layout,
    )
    plan = plan_export(source, resolve_hf_config(model, hf_config), layouts)
    if key is not None:
        _PREPARED[chunks[0]] = (key, source, plan)
    return source, plan


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared_key(chunks: list[torch.nn.Module], hf_config, *options) -> tuple | None:
    """What a remembered :func:`prepare` result depends on (None: do not remember)."""
    if hf_config is not None and not isinstance(hf_config, (str, Path)):
        return None
    folder = str(hf_config or getattr(chunks[0].config, "hf_model_id", None))
    parameters = tuple((id(p), p.dtype, p.shape) for p in _all_parameters(chunks))
    return (tuple(map(id, chunks)), folder, _mtime(Path(folder) / "config.json"), options, parameters)


def _all_parameters(chunks: list[torch.nn.Module]) -> Iterator[torch.nn.Parameter]:
    """Every parameter of the chunks (shared ones once per holder): a plain walk of the module
    tree, several times faster than ``parameters()`` on MoE models of thousands of modules,
    and this runs at every export."""
    stack = list(reversed(chunks))
    while stack:
        module = stack.pop()
        yield from (param for param in module._parameters.values() if param is not None)
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)


def stream(source: TensorSource, plan: ExportPlan, *, base: Mode | None, adapters: bool,
           dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Base weights (``Mode.BASE`` or ``Mode.MERGED``, or None), then the adapters if asked."""
    found = source.adapters()
    if adapters and not found:
        raise ExportError("adapters were asked for, but the model has no LoRA adapters")
    if base is not None:
        converter = TaskConverter(source, plan.dims, base, dtype)
        yield from convert_tasks(source, converter, plan.base_tasks)
    if adapters:
        expert_keys = FusedExpertKeys(adapted_outputs(plan.adapter_tasks, found))
        converter = TaskConverter(source, plan.dims, Mode.ADAPTERS, dtype, expert_adapters=expert_keys)
        yield from convert_tasks(source, converter, plan.adapter_tasks)


def export_hf_weights(
    model,
    peft: bool = True,
    *,
    adapters_only: bool = False,
    hf_config=None,
    expert_layout: ExpertLayout | None = None,
    expert_adapter_layout: ExpertLayout = "fused",
    dtype: torch.dtype | None = None,
    destination: Destination = "all",
    device: str | torch.device | None = None,
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
        expert_layout: MoE expert base weights as Hugging Face's fused
            ``experts.gate_up_proj`` / ``down_proj`` or per expert (``experts.<e>.gate_proj``);
            by default the layout of the Hugging Face source folder, else fused.
        expert_adapter_layout: Expert adapters in PEFT's ``target_parameters`` layout
            (``fused``: the one PEFT loads onto transformers v5 models) or per expert (vLLM's
            mixed MoE LoRA format).
        dtype: Cast every exported tensor to this dtype (default: keep the model's).
        destination: In a parallel job, the ranks the tensors come out on: ``"all"`` (every
            rank, e.g. colocated inference engines), ``"owner"`` (each tensor on one rank of
            the pipeline stage / expert rank holding it: the union over ranks is the export)
            or ``"rank0"``. Other ranks yield nothing for that tensor and build no full copy
            of it. See docs/distributed.md.
        device: ``"cpu"``: CPU tensors, copied from the GPU into pinned memory while the
            next tensors are gathered (default: where the model is).

    Every rank of a parallel job must iterate the generator to its end together. Nothing is
    silently dropped: a parameter no rule covers, or a Hugging Face name the export would miss
    or invent, raises :class:`ExportError` before the first tensor is produced.
    """
    if adapters_only and not peft:
        raise ValueError("adapters_only=True needs peft=True")
    source, plan = prepare(model, hf_config, expert_layout, expert_adapter_layout, destination)
    base = None if adapters_only else (Mode.BASE if peft else Mode.MERGED)
    pairs = stream(source, plan, base=base, adapters=peft and bool(source.adapters()), dtype=dtype)
    yield from to_host(pairs) if device is not None and torch.device(device).type == "cpu" else pairs


def peft_adapter_config(model, *, hf_config=None, expert_adapter_layout: ExpertLayout = "fused",
                        base_model_name_or_path: str | None = None):
    """PEFT's ``LoraConfig`` for the model's adapters, as :func:`export_hf_weights` names them.

    ``base_model_name_or_path`` defaults to the Hugging Face source of the model.
    """
    source, plan = prepare(model, hf_config, expert_adapter_layout=expert_adapter_layout)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(unwrap_chunks(model)[0].config, "hf_model_id", None)
    return lora_config(plan, source.adapters(), base_model_name_or_path)


@dataclass
class Bucket:
    """Consecutive exported tensors; ``is_last`` marks the final bucket of an export."""

    tensors: list[tuple[str, torch.Tensor]]
    is_last: bool

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self.tensors)


def buckets(pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int,
            groups: dict[str, Hashable] | None = None) -> Iterator[Bucket]:
    """Group a stream into buckets of at most ``bucket_bytes`` (a larger tensor goes alone).

    Exactly one bucket, the last, has ``is_last=True`` (an empty stream gives one empty
    bucket), so a consumer can apply one complete adapter when it sees it.

    ``groups`` (name -> group) lists tensors a consumer loads together: no bucket ends while
    a group has arrived in part (such a bucket may exceed ``bucket_bytes`` by what it takes to
    complete the groups it opened). Every member of a group must be in the stream.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    groups = groups or {}
    missing = Counter(groups.values())  # members of each group not yet in a bucket
    open_groups: set[Hashable] = set()
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > bucket_bytes and not open_groups:
            yield Bucket(current, is_last=False)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
        group = groups.get(name)
        if group is not None:
            missing[group] -= 1
            if missing[group]:
                open_groups.add(group)
            else:
                open_groups.discard(group)
    yield Bucket(current, is_last=True)


def expert_adapter_groups(source: TensorSource, plan: ExportPlan) -> dict[str, str]:
    """PEFT key -> group for per-expert adapters: one group per fused expert module (a layer's
    experts), over the adapters this process receives; empty for other layouts.

    The groups are read off the fused-layout plan of the same model: the per-expert tensors
    one stacked task reads form one group, named by the module of the tensor it writes.
    """
    from model_mappings import table_for

    if plan.layouts.adapters != "per_expert":
        return {}
    fused = plan_tasks(source.base_names(), table_for(plan.config.model_type),
                       ExpertLayouts(experts="fused", mtp_experts="fused", adapters="fused").adapter_variants)
    module_of = {name: task.hf_names[0].rpartition(".")[0] for task in fused if task.rule.stack
                 for name in task.sources}
    found = source.adapters()
    exchange = source.exchange if isinstance(source, LiveModelSource) else None
    groups = {}
    for task in plan.adapter_tasks:
        module = module_of.get(task.sources[0])
        if module is None or task.module not in found:
            continue
        if exchange is not None and exchange.rank not in exchange.receivers(task):
            continue
        for hf_name in task.hf_names:
            for factor in ("lora_A", "lora_B"):
                groups[peft_key(hf_name, factor)] = module
    return groups


def export_hf_buckets(model, bucket_bytes: int = 512 << 20, **kwargs) -> Iterator[Bucket]:
    """:func:`export_hf_weights` grouped into :class:`Bucket` s of at most ``bucket_bytes``.

    With ``expert_adapter_layout="per_expert"`` no bucket splits the adapters of one layer's
    experts (receivers load such a group at once); that bucket may be larger.
    """
    groups = {}
    if kwargs.get("expert_adapter_layout") == "per_expert" and kwargs.get("peft", True):
        source, plan = prepare(model, kwargs.get("hf_config"), kwargs.get("expert_layout"), "per_expert",
                               kwargs.get("destination", "all"))
        groups = expert_adapter_groups(source, plan)
    return buckets(export_hf_weights(model, **kwargs), bucket_bytes, groups)


def hf_source_folder(model, hf_config=None) -> Path | None:
    """The local Hugging Face folder the model came from, if there is one."""
    candidate = hf_config if isinstance(hf_config, (str, Path)) else None
    if candidate is None:
        candidate = getattr(unwrap_chunks(model)[0].config, "hf_model_id", None)
    return Path(candidate) if candidate and Path(candidate).is_dir() else None
