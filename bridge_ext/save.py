"""Save a Megatron model as a Hugging Face folder and a PEFT adapter folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from bridge_ext.consumer import MTP_ADAPTERS_LEFT_OUT, AdapterConsumer, adapter_layout_for, is_mtp_adapter
from bridge_ext.dora import refuse_for_vllm
from bridge_ext.engine import ExportError, Mode
from bridge_ext.export import ExportPlan, fp8_plan, hf_source_folder, prepare, resolve_hf_config, stream
from bridge_ext.fp8_export import Fp8Plan, check_quantize
from bridge_ext.hf_folder import ShardedSafetensorsWriter, TensorSpec, parse_size
from bridge_ext.live_checks import check_dtype, overflows
from bridge_ext.output_folder import FoundTarget, require_an_output, staged_folders
from bridge_ext.peft_config import lora_config
from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.source import TensorSource
from bridge_ext.table import ExpertLayout
from bridge_ext.value_check import ValueCheck

# Files of a Hugging Face folder that describe the model but hold no weights.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
)


@dataclass
class SaveResult:
    model_dir: Path | None
    adapter_dir: Path | None
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)  # for the user: files not copied, folders kept or removed


def companion_refusal(path: Path, folder: Path) -> str | None:
    """Why ``path`` (a file of ``folder``) must not be copied into an output, or None.

    Only regular files inside the folder are copied: outputs are often published, and a link
    to a file elsewhere (a key, another user's data) must not travel with them. A Hugging Face
    cache snapshot is the one exception: its files are links into the ``blobs`` folder of the
    same cached repository.
    """
    if path.is_symlink():
        real, inside = path.resolve(), folder.resolve()
        cache_blobs = inside.parent.parent / "blobs" if inside.parent.name == "snapshots" else None
        if not (real.is_relative_to(inside) or (cache_blobs is not None and real.is_relative_to(cache_blobs))):
            return f"a symbolic link to {real}, outside {folder}"
    elif not path.resolve().is_relative_to(folder.resolve()):
        return f"outside {folder}"
    if not stat.S_ISREG(os.stat(path).st_mode):
        return "not a regular file"
    return None


def copy_companion_files(folder: Path, directory: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy the tokenizer, template and generation files of ``folder`` (and the table's ``extra``
    companion files); name those refused."""
    refused = []
    for name in (*COMPANION_FILES, *extra):
        path = folder / name
        if not os.path.lexists(path):
            continue
        reason = companion_refusal(path, folder)
        if reason is None and not _copy_regular_file(path.resolve() if path.is_symlink() else path, directory / name):
            reason = "not a regular file"  # replaced since it was looked at
        if reason is not None:
            refused.append(f"not copied from {folder}: {name} ({reason})")
    return refused


def _copy_regular_file(source: Path, destination: Path) -> bool:
    """Copy ``source`` if it is still a regular file and not a link (checked on the open file)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            return False
        with open(destination, "wb") as writer:  # a new file: its mode follows the umask, like the weights
            shutil.copyfileobj(reader, writer)
    return True


def write_config(plan: ExportPlan, directory: Path, source_folder: Path | None, dtype: torch.dtype | None,
                 quantization: dict | None = None) -> list[str]:
    """config.json (the source's own when known: it names the exact architecture) + companions.

    ``quantization``: the ``quantization_config`` of the weights written (none: the weights are
    not quantized, and a source config's own block is dropped).

    Returns a note per file of ``source_folder`` that was not copied (see :func:`companion_refusal`).
    """
    notes, config = [], None
    if source_folder is not None and (source_folder / "config.json").is_file():
        notes.extend(copy_companion_files(source_folder, directory, plan.table.companion_files))
        reason = companion_refusal(source_folder / "config.json", source_folder)
        if reason is None:
            config = json.loads((source_folder / "config.json").read_text())
        else:
            config, left_out = _defined_fields(plan.config)
            extra = f" ({len(left_out)} other keys of it left out, e.g. {left_out[0]})" if left_out else ""
            notes.append(f"not copied from {source_folder}: config.json ({reason}); written from the fields "
                         f"transformers' {type(plan.config).__name__} defines{extra}")
    if config is None:
        config = plan.config.to_dict()
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    extra = plan.table.extra_weights
    layers = extra.count(plan.config) if extra is not None else 0
    holder = config.get("text_config", config) if "text_config" in config else config
    if layers and extra.count_key not in holder and extra.count_key not in config:
        holder[extra.count_key] = layers  # transformers' to_dict can drop it
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    try:
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except ValueError:  # NaN or infinity: not JSON, and no model computes with it
        raise ExportError(f"the Hugging Face config holds a non-finite number ({_non_finite(config)}); "
                          "config.json would not be standard JSON") from None
    (directory / "config.json").write_text(text + "\n")
    return notes


def write_export(
    source: TensorSource,
    plan: ExportPlan,
    model_dir: str | Path | None,
    adapter_dir: str | Path | None,
    *,
    merge: bool = False,
    dtype: torch.dtype | None = None,
    config_dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    source_folder: Path | None = None,
    base_model_name: str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    write: bool = True,
    found: dict[Path, FoundTarget] | None = None,
    before_install: Callable[[Path | None, Path | None], None] | None = None,
    notes: list[str] | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    layout: list[TensorSpec] | None = None,
    write_base: Callable[[ShardedSafetensorsWriter], None] | None = None,
    fp8: Fp8Plan | None = None,
    omit_adapter: Callable[[str], bool] | None = None,
    vllm_names: bool = False,
) -> SaveResult:
    """Stream ``plan`` out of ``source`` into a Hugging Face folder and/or a PEFT adapter folder.

    The one writer of both the live-model and the checkpoint paths. Holds at most one shard of
    base weights (``max_shard_size``) plus the tensor being converted, and the adapters (small).
    Each folder is built beside its target and renamed into place only when both are complete
    (:func:`bridge_ext.output_folder.staged_folders`; ``found``: what the caller saw at each
    target when it checked it). ``before_install`` is called with the complete staging folders
    (model, adapter) before they are installed: an exception there installs nothing.
    ``config_dtype`` is the dtype config.json records (default: ``dtype``); ``on_tensor`` is
    called with each written tensor's name and size (progress); ``notes`` collects what the user
    should hear about (files not copied, stale staging folders removed, a replaced folder kept).
    ``write=False``: take part in a parallel export (its collectives) without writing anything.
    ``transform`` is applied to each produced tensor before it is written.
    ``layout``: the base tensors the export will produce, in order, when known (then each is
    written to its shard at once). ``write_base``: writes every base tensor into the writer
    itself (e.g. in worker processes, :mod:`bridge_ext.checkpoint.parallel_write`); the stream
    then yields the adapters only. ``fp8``: quantize the base weights it names after
    ``transform`` (``layout`` already lists what it writes), and record it in config.json.
    ``omit_adapter``: adapter keys left out of the adapter folder (their count goes to ``notes``).
    ``vllm_names``: adapter keys without the table's ``in_memory_renames`` (a folder for vLLM).
    """
    require_an_output(model_dir, adapter_dir)
    adapters = source.adapters()
    if merge and adapter_dir is not None:
        raise ValueError("merge=True writes no adapter folder")
    if adapters and model_dir is not None and adapter_dir is None and not merge:
        raise ExportError("the model has LoRA adapters: pass adapter_dir=, or merge=True to merge them")
    if adapter_dir is not None and not adapters:
        raise ExportError("adapter_dir given, but the model has no LoRA adapters")
    base_mode = None if model_dir is None else (Mode.MERGED if merge else Mode.BASE)
    if not write:
        for _ in stream(source, plan, base=base_mode, adapters=adapter_dir is not None, dtype=dtype,
                        vllm_names=vllm_names):
            pass
        return SaveResult(None, None, 0, 0)
    notes = notes if notes is not None else []
    targets = [Path(folder) for folder in (model_dir, adapter_dir) if folder is not None]
    with staged_folders(targets, overwrite=overwrite, found=found, notes=notes) as staged:
        staged_model = staged[0] if model_dir is not None else None
        staged_adapter = staged[-1] if adapter_dir is not None else None
        base_writer = adapter_tensors = None
        if model_dir is not None:
            base_writer = ShardedSafetensorsWriter(staged_model, parse_size(max_shard_size), layout=layout)
        if adapter_dir is not None:
            adapter_tensors = {}
        count = total = omitted = 0
        streamed_base = base_mode
        if write_base is not None and base_writer is not None:
            write_base(base_writer)
            streamed_base = None
            count, total = base_writer.tensor_count, base_writer.total_bytes
        pairs = iter(()) if streamed_base is None and adapter_dir is None else \
            stream(source, plan, base=streamed_base, adapters=adapter_dir is not None, dtype=dtype,
                   vllm_names=vllm_names)
        if transform is not None:  # e.g. a cast that checks the values (bridge_ext.value_check)
            pairs = ((name, transform(name, tensor)) for name, tensor in pairs)
        if fp8 is not None:
            pairs = fp8.quantize(pairs)
        for name, tensor in pairs:
            if name.startswith(PEFT_PREFIX) and omit_adapter is not None and omit_adapter(name):
                omitted += 1
                continue
            nbytes = tensor.numel() * tensor.element_size()
            count += 1
            total += nbytes
            if name.startswith(PEFT_PREFIX):
                # lora_A of a fused projection is one tensor shared by its HF modules: copy
                adapter_tensors[name] = tensor.detach().to("cpu").clone()
            else:
                base_writer.add(name, tensor)
            del tensor  # the writer holds what it needs; nothing else keeps a converted tensor alive
            if on_tensor is not None:
                on_tensor(name, nbytes)
        if base_writer is not None:
            base_writer.close()
            notes.extend(write_config(plan, staged_model, source_folder, config_dtype or dtype,
                                      fp8.config() if fp8 is not None else None))
        if omitted:
            notes.append(f"{omitted} MTP adapter tensors not written: {MTP_ADAPTERS_LEFT_OUT} "
                         "(merge=True keeps their effect in the drafter's weights)")
        if adapter_tensors is not None:
            if model_dir is not None:
                base_model_name = str(Path(model_dir).resolve())
            save_file(adapter_tensors, str(staged_adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
            lora_config(plan, adapters, base_model_name).save_pretrained(str(staged_adapter))
        if before_install is not None:
            before_install(staged_model, staged_adapter)
    return SaveResult(
        Path(model_dir) if model_dir is not None else None,
        Path(adapter_dir) if adapter_dir is not None else None,
        count,
        total,
        notes,
    )


def save_hf_pretrained(
    model,
    model_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    *,
    merge: bool = False,
    hf_config=None,
    expert_layout: ExpertLayout | None = None,
    expert_adapter_layout: ExpertLayout | None = None,
    adapter_for: AdapterConsumer = "peft",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool | str = False,
    allow_overflow: bool = False,
    quantize: str | None = None,
    engine_tp_size: int | None = 1,
) -> SaveResult:
    """Write the base model to ``model_dir`` and/or the LoRA adapters to ``adapter_dir``.

    ``model_dir`` gets sharded safetensors, their index and config.json (plus tokenizer and
    generation files of the Hugging Face source folder, when it is local); ``adapter_dir``
    gets ``adapter_model.safetensors`` and PEFT's ``adapter_config.json``. With ``merge=True``
    the adapters are merged into the base weights instead. Each folder appears only when
    complete. Refuses to write a base without its adapters unless ``merge`` says so. ``dtype``
    (floating point) casts every tensor; a cast that turns finite values into infinities is
    refused unless ``allow_overflow``. ``overwrite`` replaces a folder holding an earlier output
    only; ``"any"``: whatever it holds (:func:`bridge_ext.output_folder.check_output_target`).
    ``quantize="fp8"`` writes the base weights block-FP8 with config.json's ``quantization_config``
    (``engine_tp_size``: see :func:`~bridge_ext.export.export_hf_weights`; adapters stay as they are).

    ``adapter_for``: the consumer the adapter folder is for. ``"peft"`` (default): expert
    adapters in PEFT's fused ``target_parameters`` layout, the one PEFT loads onto
    transformers v5 models. ``"vllm"``: the layout vLLM loads for the config's architecture
    class (per expert for e.g. ``Qwen3MoeForCausalLM``, which rejects the fused folder), keys
    under the saved names where the table's ``in_memory_renames`` give PEFT other ones (HY-V3). One
    folder cannot serve both for such classes (docs/consumers.md). ``expert_adapter_layout``
    overrides the layout; with ``adapter_for="vllm"`` one vLLM does not load is refused, and
    MTP adapters are left out (vLLM applies none: its drafters have no LoRA), said in the
    result's ``notes``.

    In a parallel job every rank calls it; tensors are gathered to global rank 0 only, which
    writes the folders.
    """
    require_an_output(model_dir, adapter_dir)
    check_dtype(dtype)
    check_quantize(quantize, engine_tp_size)
    parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    expert_adapter_layout = adapter_layout_for(resolve_hf_config(model, hf_config), adapter_for, expert_adapter_layout)
    source, plan = prepare(model, hf_config, expert_layout, expert_adapter_layout,
                           destination="rank0" if parallel else "all")
    if adapter_dir is not None and adapter_for == "vllm":
        refuse_for_vllm(plan.dora_adapters(source))
    base_mode = None if model_dir is None else (Mode.MERGED if merge else Mode.BASE)
    fp8 = fp8_plan(source, plan, base_mode, quantize, engine_tp_size)
    folder = hf_source_folder(model, hf_config)
    return write_export(
        source, plan, model_dir, adapter_dir,
        merge=merge, dtype=None if overflows(dtype) else dtype, config_dtype=dtype, max_shard_size=max_shard_size,
        overwrite=overwrite,
        transform=ValueCheck(dtype, allow_overflow, allow_with="allow_overflow=True") if overflows(dtype) else None,
        source_folder=folder,
        base_model_name=str(folder) if folder else getattr(plan.config, "_name_or_path", None),
        write=not parallel or dist.get_rank() == 0, fp8=fp8,
        omit_adapter=(lambda key: is_mtp_adapter(plan, key)) if adapter_for == "vllm" else None,
        vllm_names=adapter_for == "vllm",
    )


def _non_finite(value: object, where: str = "") -> str | None:
    """The dotted name of the first NaN or infinite number in a JSON-like value."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _defined_fields(config) -> tuple[dict, list[str]]:
    """The config's fields its transformers class defines (a default instance has them), and the
    other keys, left out: a file linked from elsewhere must not carry its own keys into an output."""
    values = config.to_dict()
    try:
        defined = set(type(config)().to_dict()) | {"architectures", "model_type", "dtype", "torch_dtype"}
    except Exception:  # noqa: BLE001 - a config class without defaults: keep what transformers parsed
        return values, []
    return {key: value for key, value in values.items() if key in defined}, sorted(set(values) - defined)

