"""Public entry points: stream Hugging Face weights and PEFT adapters out of a Megatron model."""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from bridge_ext import model_changes
from bridge_ext.consumer import MTP_ADAPTERS_LEFT_OUT, adapter_layout_for, is_mtp_adapter, vllm_base_layout
from bridge_ext.aliasing import model_storages, without_aliases
from bridge_ext.engine import ExportError, Mode, convert_tasks, plan_tasks
from bridge_ext.errors import first_line
from bridge_ext.expert_layouts import ExpertLayouts, expert_layouts, source_expert_layouts, weight_files_present
from bridge_ext.fp8_export import check_quantize, plan_fp8
from bridge_ext.live_checks import check_device, check_dtype, check_model, overflows
from bridge_ext.peft_config import lora_config
from bridge_ext.peft_keys import LORA_A, LORA_B, PEFT_PREFIX, peft_key
from bridge_ext.plan import (
    ExportPlan, check_shapes, checkpoint_keys, conversion_passes, fp8_plan, plan_export, refuse_adapters_for_vllm,
)
from bridge_ext.source import TensorSource
from bridge_ext.table import ExpertLayout
from bridge_ext.tables import config_fields_for, register_transformers_configs, registered_table, table_for
from bridge_ext.value_check import ValueCheck

if TYPE_CHECKING:  # the live and parallel modules load only where a live model is exported
    from bridge_ext.distributed import Destination


def resolve_hf_config(model, hf_config=None):
    """The Hugging Face config: ``hf_config`` (a config or a folder), else the model's source.

    Megatron-Bridge keeps the Hugging Face folder or id a model was built from in
    ``model.config.hf_model_id``.
    """
    from transformers import PretrainedConfig

    from bridge_ext.live import unwrap_chunks

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

    register_transformers_configs()
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # noqa: BLE001 - transformers' errors (OSError, ValueError...) about the folder or id
        raise ExportError(f"hf_config {name_or_path!r}: transformers cannot read a config there: "
                          f"{type(error).__name__}: {first_line(error)}") from None


def prepare(model, hf_config=None, expert_layout: ExpertLayout | None = None,
            expert_adapter_layout: ExpertLayout | None = None, destination: Destination = "all",
            ) -> tuple[TensorSource, ExportPlan]:
    """The model as a tensor source, and its checked export plan.

    ``expert_layout=None`` follows the Hugging Face source folder's own layout where it is
    known, else fuses; ``expert_adapter_layout=None`` is the layout vLLM loads for the
    architecture class (the table's ``vllm_expert_adapter_layouts``). ``destination``: see
    :func:`export_hf_weights`.

    Exports repeat every training step, so both are remembered per model while its modules,
    parameters and persistent buffers (and their shapes and dtypes), its Hugging Face folder's
    config.json and these arguments stay the same (not when ``hf_config`` is a config object:
    it may have changed). See :mod:`bridge_ext.model_changes`.
    """
    from bridge_ext.distributed import all_agree
    from bridge_ext.live import LiveModelSource, unwrap_chunks
    from bridge_ext.trained_forward import warn_if_expert_lora_differs

    check_model(model)
    chunks = unwrap_chunks(model)

    config = resolve_hf_config(model, hf_config)
    # the table registered for the model type (register_table may replace it between exports):
    # held with the result and compared by identity (an id() could be reused by a new table;
    # tables compare equal whatever their consumer layouts)
    entry = registered_table(config.model_type)
    key = _prepared_key(chunks, hf_config, expert_layout, expert_adapter_layout, destination)
    cached = _PREPARED.get(chunks[0])
    if all_agree(key is not None and cached is not None and cached[0] == key and cached[4] is entry
                 and cached[1].layout() == cached[3]):
        return cached[1], cached[2]
    table = table_for(config)
    source = LiveModelSource(model, destination)
    folder = hf_source_folder(model, hf_config)
    found = source_expert_layouts(folder, table)
    adapter_layout = expert_adapter_layout or table.vllm_expert_adapter_layout(config)
    layouts = expert_layouts(table, found, expert_layout, adapter_layout)
    plan = plan_export(source, config, layouts)
    warn_if_expert_lora_differs(plan, source.adapters(), _expert_tensor_parallel_size())
    if folder is not None and table.extra_weights is not None:
        from bridge_ext.verify import folder_tensor_names

        shapes = folder_tensor_names(folder) if weight_files_present(folder) else {}
        plan = plan.with_extra_shapes({name: shape for name, shape in shapes.items() if plan.is_extra(name)})
    if key is not None:
        model_changes.watch(chunks)
        _PREPARED[chunks[0]] = (key, source, plan, source.layout(), entry)
    return source, plan


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_model_config(source: TensorSource, plan: ExportPlan) -> None:
    """A live model's Hugging Face config is the model's: compared with its own TransformerConfig,
    field by field, once per plan (after the shapes, which name the tensor that does not fit)."""
    from bridge_ext.config_compare import check_live_config
    live = sys.modules.get("bridge_ext.live")  # not loaded: the source is no live model (a checkpoint)
    is_live = live is not None and isinstance(source, live.LiveModelSource)
    model_config = getattr(source.chunks[0], "config", None) if is_live else None
    if model_config is not None and "config" not in plan.cache.checked:
        check_live_config(model_config, plan.config, config_fields_for(plan.table), "the Hugging Face config")
        plan.cache.checked.add("config")


def _expert_tensor_parallel_size() -> int:
    from bridge_ext.distributed import is_parallel_job

    if not is_parallel_job():
        return 1
    from megatron.core import parallel_state

    return parallel_state.get_expert_tensor_parallel_world_size()


def _prepared_key(chunks: list[torch.nn.Module], hf_config, *options) -> tuple | None:
    """What a remembered :func:`prepare` result depends on, besides its source's
    :meth:`~bridge_ext.live.LiveModelSource.layout` (None: do not remember)."""
    if hf_config is not None and not isinstance(hf_config, (str, Path)):
        return None
    folder = str(hf_config or getattr(chunks[0].config, "hf_model_id", None))
    # weak references compare as their chunks do while those live (an id() may be reused)
    return (tuple(weakref.ref(chunk) for chunk in chunks), folder, _mtime(Path(folder) / "config.json"), options, model_changes.count())


def stream(source: TensorSource, plan: ExportPlan, *, base: Mode | None, adapters: bool,
           dtype: torch.dtype | None = None, stacks_on_host: bool = False,
           vllm_names: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Base weights (``Mode.BASE`` or ``Mode.MERGED``, or None), then the adapters if asked,
    keyed by the in-memory names (without the table's ``in_memory_renames`` when ``vllm_names``).

    Every task is first run on meta tensors (:func:`check_shapes`): nothing is yielded unless
    the whole export can be converted.
    """
    passes = conversion_passes(source, plan, base=base, adapters=adapters, dtype=dtype, stacks_on_host=stacks_on_host)
    check_shapes(source, plan, passes)
    _check_model_config(source, plan)
    for converter, tasks in passes:
        pairs = convert_tasks(source, converter, tasks)
        if converter.mode is Mode.ADAPTERS and plan.table.renames_in_memory:
            pairs = ((_in_memory_adapter_key(plan, name, vllm_names), tensor) for name, tensor in pairs)
        yield from pairs


def _in_memory_adapter_key(plan: ExportPlan, key: str, vllm_names: bool = False) -> str:
    """A saved PEFT key as the in-memory model names it (the table's ``in_memory_prefixes``, and
    its ``in_memory_renames`` unless for vLLM)."""
    return PEFT_PREFIX + plan.table.in_memory_name(key.removeprefix(PEFT_PREFIX), renames=not vllm_names)


def export_hf_weights(
    model,
    peft: bool = True,
    *,
    adapters_only: bool = False,
    base_only: bool = False,
    hf_config=None,
    expert_layout: ExpertLayout | None = None,
    expert_adapter_layout: ExpertLayout | None = None,
    dtype: torch.dtype | None = None,
    destination: Destination = "all",
    device: str | torch.device | None = None,
    allow_overflow: bool = False,
    dora_adapters: bool = False,
    quantize: str | None = None,
    engine_tp_size: int | None = 1,
    adapter_for: Literal["vllm"] | None = None,
    zero_copy: bool = False,
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
        base_only: Only the unmerged base weights, under their Hugging Face names, without
            adapter tensors (the counterpart of ``adapters_only``: sync the frozen base once,
            the adapters every step); needs ``peft=True``.
        hf_config: A transformers config or a folder with config.json; by default the
            Hugging Face source Megatron-Bridge recorded in ``model.config.hf_model_id``.
        expert_layout: MoE expert base weights as Hugging Face's fused
            ``experts.gate_up_proj`` / ``down_proj`` or per expert (``experts.<e>.gate_proj``);
            by default the layout of the Hugging Face source folder, else fused.
        expert_adapter_layout: Expert adapters in PEFT's ``target_parameters`` layout
            (``fused``: the one PEFT loads onto transformers v5 models) or per expert
            (``experts.<e>.gate_proj``); by default the layout vLLM loads for the
            config's architecture class (its table's ``vllm_expert_adapter_layouts``), since a live export
            feeds an inference engine. Files for PEFT (:func:`save_hf_pretrained`,
            ``bridge-ext convert``) default to ``fused``.
        dtype: Cast every exported tensor to this floating-point dtype (default: keep the
            model's). A cast that turns finite values into infinities (float16 ends at 65504)
            raises, naming the tensor, unless ``allow_overflow``; for such dtypes the check is
            one ``isfinite`` pass per tensor, after the conversion.
        destination: In a parallel job, the ranks the tensors come out on: ``"all"`` (every
            rank, e.g. colocated inference engines), ``"owner"`` (each tensor on one rank of
            the pipeline stage / expert rank holding it: the union over ranks is the export)
            or ``"rank0"``. Other ranks yield nothing for that tensor and build no full copy
            of it. See docs/distributed.md.
        device: ``"cpu"``: CPU tensors, copied from the GPU into pinned memory while the
            next tensors are gathered (default: where the model is); any other device is refused.
        allow_overflow: Yield the infinities a cast to ``dtype`` makes instead of refusing.
        dora_adapters: Stream DoRA adapters (with their ``lora_magnitude_vector``) for a
            consumer that loads DoRA, e.g. PEFT's ``set_peft_model_state_dict``. Without it an
            export that would carry DoRA adapters is refused: vLLM loads none (sync such a
            model merged, ``peft=False``, or its base with ``base_only=True``).
        quantize: ``"fp8"``: every weight the table's FP8 rules name comes out as a
            ``float8_e4m3fn`` tensor followed by its float32 ``<name>_scale_inv`` (128x128
            blocks), quantized where the tensor is (the GPU); the rest as without it. LoRA
            adapters (``peft=True``) are never quantized. See docs/fp8.md and
            :func:`quantization_config`.
        engine_tp_size: With ``quantize``, the inference engine's tensor-parallel size: a weight
            whose per-rank part vLLM's block check would refuse is refused before the first
            tensor (None: no check).
        adapter_for: ``"vllm"``: the receiver is vLLM. Refused before the first tensor: an
            ``expert_adapter_layout`` or ``expert_layout`` its loader for the config's class
            does not load (the table's ``vllm_expert_adapter_layouts`` / ``vllm_expert_layouts``;
            unset, they default to what it loads); MTP adapters are left out (vLLM applies no
            LoRA to its drafters), with one warning per plan; DoRA adapters are refused, even
            with ``dora_adapters=True``; adapter keys keep the saved names where the table's
            ``in_memory_renames`` give PEFT other ones (vLLM's modules carry the saved names).
            None (default): no such checks, PEFT's keys.
        zero_copy: False (default): no yielded tensor shares memory with the model's
            parameters or buffers; a tensor that would (a pass-through weight or LoRA factor, a
            view of a fused one) is copied (consecutive ones in batches of at most 16 MiB, see
            :mod:`bridge_ext.aliasing`), and a tensor made anew is not. True:
            such tensors are the model's own memory, saving the copy; the caller must never
            write to them (see :mod:`bridge_ext.aliasing`).

    Every rank of a parallel job must iterate the generator to its end together. Nothing is
    silently dropped: a parameter no rule covers, or a Hugging Face name the export would miss
    or invent, raises :class:`ExportError` before the first tensor is produced.
    """
    _, _, pairs = _prepared_export(model, peft, adapters_only, hf_config, expert_layout, expert_adapter_layout,
                                   dtype, destination, device, quantize, engine_tp_size, base_only, dora_adapters,
                                   allow_overflow, adapter_for, zero_copy)
    yield from pairs


def _prepared_export(model, peft: bool = True, adapters_only: bool = False, hf_config=None,
                     expert_layout: ExpertLayout | None = None, expert_adapter_layout: ExpertLayout | None = None,
                     dtype: torch.dtype | None = None, destination: Destination = "all",
                     device: str | torch.device | None = None, quantize: str | None = None,
                     engine_tp_size: int | None = 1, base_only: bool = False, dora_adapters: bool = False,
                     allow_overflow: bool = False, adapter_for: Literal["vllm"] | None = None,
                     zero_copy: bool = False,
                     ) -> tuple[TensorSource, ExportPlan, Iterator[tuple[str, torch.Tensor]]]:
    """The source, the plan and the (lazy) stream of :func:`export_hf_weights`."""
    if adapters_only and not peft:
        raise ExportError("adapters_only=True needs peft=True")
    if base_only and not peft:
        raise ExportError("base_only=True needs peft=True (peft=False merges the adapters into the base)")
    if base_only and adapters_only:
        raise ExportError("base_only=True and adapters_only=True exclude each other: pass one")
    check_dtype(dtype)
    check_device(device)
    check_quantize(quantize, engine_tp_size)
    if adapter_for is not None:
        if adapter_for != "vllm":
            raise ExportError(f"adapter_for must be None or 'vllm' for a live export, not {adapter_for!r}")
        config = resolve_hf_config(model, hf_config)
        expert_layout = vllm_base_layout(config, expert_layout)
        expert_adapter_layout = adapter_layout_for(config, adapter_for, expert_adapter_layout)
    source, plan = prepare(model, hf_config, expert_layout, expert_adapter_layout, destination)
    if adapters_only and not source.adapters():
        raise ExportError("adapters_only=True, but the model has no LoRA adapters: nothing would be exported")
    base = None if adapters_only else (Mode.BASE if peft else Mode.MERGED)
    adapters = peft and not base_only and bool(source.adapters())
    if adapters and adapter_for == "vllm":
        refuse_adapters_for_vllm(source, plan)
    if adapters and not dora_adapters and plan.dora_adapters(source):
        raise ExportError(f"the adapters are DoRA ({plan.cache.dora[0].module}, ...), which vLLM cannot load: sync merged "
                          "weights (peft=False), or pass dora_adapters=True for a consumer that loads DoRA (PEFT)")
    fp8 = fp8_plan(source, plan, base, quantize, engine_tp_size)
    to_cpu = device is not None and torch.device(device).type == "cpu"
    # the CLI's rule: a cast that makes infinities of finite values is refused (checked after the
    # conversion, which then keeps the model's dtype; other casts happen inside it, as before)
    checked = overflows(dtype)
    # FP8 quantizes fused expert stacks where they are built: on the GPU, not in host memory
    pairs = stream(source, plan, base=base, adapters=adapters, dtype=None if checked else dtype,
                   stacks_on_host=to_cpu and fp8 is None, vllm_names=adapter_for == "vllm")
    if checked:
        check = ValueCheck(dtype, allow_overflow, allow_with="allow_overflow=True")
        pairs = ((name, check(name, tensor)) for name, tensor in pairs)
    if fp8 is not None:
        pairs = fp8.quantize(pairs)
    if adapter_for == "vllm":
        pairs = _without_mtp_adapters(plan, pairs)
    if to_cpu:
        from bridge_ext.sync import to_host

        pairs = to_host(pairs)
    if zero_copy:
        return source, plan, pairs
    from bridge_ext.live import unwrap_chunks

    return source, plan, without_aliases(pairs, model_storages(unwrap_chunks(model)))


def _without_mtp_adapters(plan: ExportPlan, pairs: Iterator[tuple[str, torch.Tensor]],
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs`` without MTP adapters, warned once per plan (a saved folder says it in its notes)."""
    for name, tensor in pairs:
        if name.startswith(PEFT_PREFIX) and is_mtp_adapter(plan, name):
            if not plan.cache.mtp_adapters_warned:
                plan.cache.mtp_adapters_warned = True
                warnings.warn(f"MTP adapters left out of the export for vLLM: {MTP_ADAPTERS_LEFT_OUT} "
                              "(peft=False keeps their effect in the drafter's weights)", stacklevel=2)
            continue
        yield name, tensor


def peft_adapter_config(model, *, hf_config=None, expert_adapter_layout: ExpertLayout | None = None,
                        base_model_name_or_path: str | None = None):
    """PEFT's ``LoraConfig`` for the model's adapters, as :func:`export_hf_weights` names them
    (the same ``expert_adapter_layout`` default: the table's vLLM layout).

    ``base_model_name_or_path`` defaults to the Hugging Face source of the model.
    """
    source, plan = prepare(model, hf_config, expert_adapter_layout=expert_adapter_layout)
    if base_model_name_or_path is None:
        from bridge_ext.live import unwrap_chunks

        base_model_name_or_path = getattr(unwrap_chunks(model)[0].config, "hf_model_id", None)
    return lora_config(plan, source.adapters(), base_model_name_or_path)


def quantization_config(model_or_config, quantize: str = "fp8", *, hf_config=None,
                        expert_layout: ExpertLayout | None = None, engine_tp_size: int | None = 1) -> dict:
    """The ``quantization_config`` block of config.json that describes what
    ``export_hf_weights(..., quantize=quantize)`` sends (a receiver that builds its engine
    before the first weight sync needs it): ``quant_method``, ``weight_block_size``, and the
    full names of the linear modules left bf16 under ``ignored_layers`` (what vLLM reads) and
    ``modules_to_not_convert`` (what transformers reads).

    ``model_or_config``: the Megatron model (exact for its export), or a transformers config
    (for an architecture without MTP layers, whose names lie outside transformers' key set).
    """
    from transformers import PretrainedConfig

    check_quantize(quantize, engine_tp_size)
    if quantize is None:
        raise ExportError("quantization_config needs a quantization, e.g. quantize='fp8'")
    if not isinstance(model_or_config, PretrainedConfig):
        source, plan = prepare(model_or_config, hf_config, expert_layout)
        return fp8_plan(source, plan, Mode.BASE, quantize, engine_tp_size).config()
    register_transformers_configs(model_or_config.model_type)
    table = table_for(model_or_config)
    extra = table.extra_weights
    if extra is not None and extra.count(model_or_config) > 0:
        raise ExportError(f"the {model_or_config.model_type} config declares MTP layers, whose names transformers "
                          f"does not know: pass the model itself to quantization_config")
    shapes = checkpoint_keys(model_or_config, expert_layout or "fused")
    return plan_fp8(table, shapes, engine_tp_size).config()


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


def expert_adapter_groups(source: TensorSource, plan: ExportPlan, vllm_names: bool = False) -> dict[str, str]:
    """Adapter key (as :func:`stream` yields it, with ``vllm_names``) -> group for per-expert
    adapters: one group per fused expert module (a layer's experts), over the adapters this
    process receives; empty for other layouts. Remembered in the plan (exports repeat every
    training step).

    The groups are read off the fused-layout plan of the same model: the per-expert tensors
    one stacked task reads form one group, named by the module of the tensor it writes.
    """
    if plan.layouts.adapters != "per_expert":
        return {}
    cached = plan.cache.expert_adapter_groups
    if vllm_names not in cached:
        groups = _expert_adapter_groups(source, plan)
        if plan.table.renames_in_memory:
            groups = {_in_memory_adapter_key(plan, key, vllm_names): group for key, group in groups.items()}
        cached[vllm_names] = groups
    return cached[vllm_names]


def _expert_adapter_groups(source: TensorSource, plan: ExportPlan) -> dict[str, str]:
    fused = plan_tasks(source.base_names(), plan.table, ExpertLayouts(adapters="fused").adapter_variants(plan.table))
    module_of = {name: task.hf_names[0].rpartition(".")[0] for task in fused if task.rule.stack
                 for name in task.sources}
    found = source.adapters()
    exchange = getattr(source, "exchange", None)  # a live model's (bridge_ext.live.LiveModelSource)
    groups = {}
    for task in plan.adapter_tasks:
        module = module_of.get(task.sources[0])
        if module is None or task.module not in found:
            continue
        if exchange is not None and exchange.rank not in exchange.receivers(task):
            continue
        for hf_name in task.hf_names:
            for factor in (LORA_A, LORA_B):
                groups[peft_key(hf_name, factor)] = module
    return groups


def export_hf_buckets(model, bucket_bytes: int = 512 << 20, **kwargs) -> Iterator[Bucket]:
    """:func:`export_hf_weights` grouped into :class:`Bucket` s of at most ``bucket_bytes``.

    With per-expert expert adapters (``expert_adapter_layout="per_expert"``, or the table's
    vLLM layout by default) no bucket splits the adapters of one layer's experts (receivers
    load such a group at once); that bucket may be larger.
    """
    source, plan, pairs = _prepared_export(model, **kwargs)
    adapters = kwargs.get("peft", True) and not kwargs.get("base_only", False)
    groups = expert_adapter_groups(source, plan, kwargs.get("adapter_for") == "vllm") if adapters else {}
    if kwargs.get("adapter_for") == "vllm":  # MTP adapters are left out of the stream
        groups = {key: group for key, group in groups.items() if not is_mtp_adapter(plan, key)}
    yield from buckets(pairs, bucket_bytes, groups)


def hf_source_folder(model, hf_config=None) -> Path | None:
    """The local Hugging Face folder the model came from, if there is one."""
    candidate = hf_config if isinstance(hf_config, (str, Path)) else None
    if candidate is None:
        from bridge_ext.live import unwrap_chunks

        candidate = getattr(unwrap_chunks(model)[0].config, "hf_model_id", None)
    return Path(candidate) if candidate and Path(candidate).is_dir() else None
