"""Save a Megatron model as a Hugging Face folder and a PEFT adapter folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from bridge_ext.engine import ExportError, Mode
from bridge_ext.export import ExportPlan, hf_source_folder, prepare, stream
from bridge_ext.hf_folder import ShardedSafetensorsWriter, atomic_directory, parse_size
from bridge_ext.peft_config import lora_config
from bridge_ext.peft_keys import PEFT_PREFIX
from bridge_ext.source import TensorSource
from bridge_ext.table import ExpertLayout

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


def write_config(plan: ExportPlan, directory: Path, source_folder: Path | None, dtype: torch.dtype | None) -> None:
    """config.json (the source's own when known: it names the exact architecture) + companions."""
    if source_folder is not None and (source_folder / "config.json").is_file():
        config = json.loads((source_folder / "config.json").read_text())
        for name in COMPANION_FILES:
            if (source_folder / name).is_file():
                shutil.copy2(source_folder / name, directory / name)
    else:
        config = plan.config.to_dict()
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    extra = plan.table.extra_weights
    layers = extra.count(plan.config) if extra is not None else 0
    holder = config.get("text_config", config) if "text_config" in config else config
    if layers and extra.count_key not in holder and extra.count_key not in config:
        holder[extra.count_key] = layers  # transformers' to_dict can drop it
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
) -> SaveResult:
    """Stream ``plan`` out of ``source`` into a Hugging Face folder and/or a PEFT adapter folder.

    The one writer of both the live-model and the checkpoint paths. Holds at most one shard of
    base weights (``max_shard_size``) plus the tensor being converted, and the adapters (small).
    Each folder is built beside its target and renamed into place only when complete.
    ``config_dtype`` is the dtype config.json records (default: ``dtype``); ``on_tensor`` is
    called with each written tensor's name and size (progress). ``write=False``: take part in
    a parallel export (its collectives) without writing anything.
    """
    if model_dir is None and adapter_dir is None:
        raise ValueError("give model_dir, adapter_dir or both")
    adapters = source.adapters()
    if merge and adapter_dir is not None:
        raise ValueError("merge=True writes no adapter folder")
    if adapters and model_dir is not None and adapter_dir is None and not merge:
        raise ExportError("the model has LoRA adapters: pass adapter_dir=, or merge=True to merge them")
    if adapter_dir is not None and not adapters:
        raise ExportError("adapter_dir given, but the model has no LoRA adapters")
    base_mode = None if model_dir is None else (Mode.MERGED if merge else Mode.BASE)
    if not write:
        for _ in stream(source, plan, base=base_mode, adapters=adapter_dir is not None, dtype=dtype):
            pass
        return SaveResult(None, None, 0, 0)
    with ExitStack() as stack:
        base_writer = adapter_tensors = None
        if model_dir is not None:
            staged_model = stack.enter_context(atomic_directory(model_dir, overwrite=overwrite))
            base_writer = ShardedSafetensorsWriter(staged_model, parse_size(max_shard_size))
        if adapter_dir is not None:
            staged_adapter = stack.enter_context(atomic_directory(adapter_dir, overwrite=overwrite))
            adapter_tensors = {}
        count = total = 0
        for name, tensor in stream(source, plan, base=base_mode, adapters=adapter_dir is not None, dtype=dtype):
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
            write_config(plan, staged_model, source_folder, config_dtype or dtype)
        if adapter_tensors is not None:
            if model_dir is not None:
                base_model_name = str(Path(model_dir).resolve())
            save_file(adapter_tensors, str(staged_adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
            lora_config(plan, adapters, base_model_name).save_pretrained(str(staged_adapter))
    return SaveResult(
        Path(model_dir) if model_dir is not None else None,
        Path(adapter_dir) if adapter_dir is not None else None,
        count,
        total,
    )


def save_hf_pretrained(
    model,
    model_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    *,
    merge: bool = False,
    hf_config=None,
    expert_layout: ExpertLayout | None = None,
    expert_adapter_layout: ExpertLayout = "fused",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> SaveResult:
    """Write the base model to ``model_dir`` and/or the LoRA adapters to ``adapter_dir``.

    ``model_dir`` gets sharded safetensors, their index and config.json (plus tokenizer and
    generation files of the Hugging Face source folder, when it is local); ``adapter_dir``
    gets ``adapter_model.safetensors`` and PEFT's ``adapter_config.json``. With ``merge=True``
    the adapters are merged into the base weights instead. Each folder appears only when
    complete. Refuses to write a base without its adapters unless ``merge`` says so.

    In a parallel job every rank calls it; tensors are gathered to global rank 0 only, which
    writes the folders.
    """
    if model_dir is None and adapter_dir is None:
        raise ValueError("give model_dir, adapter_dir or both")
    parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    source, plan = prepare(model, hf_config, expert_layout, expert_adapter_layout,
                           destination="rank0" if parallel else "all")
    folder = hf_source_folder(model, hf_config)
    return write_export(
        source, plan, model_dir, adapter_dir,
        merge=merge, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
        source_folder=folder,
        base_model_name=str(folder) if folder else getattr(plan.config, "_name_or_path", None),
        write=not parallel or dist.get_rank() == 0,
    )
