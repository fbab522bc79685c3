"""Write a Megatron-Bridge-style torch_dist checkpoint of a live model with megatron-core's own saver.

For examples and benchmarks: the same files a Megatron-Bridge training run leaves (a root with
``latest_checkpointed_iteration.txt``, ``iter_XXXXXXX/`` with the ``.distcp`` files, ``.metadata``,
``metadata.json`` and ``run_config.yaml``), full or LoRA adapter-only. Every rank of the model's
process group calls it. On CPU, megatron-core's saver needs two CUDA calls stood in for
(``torch.cuda.synchronize`` in filesystem_async.py, ``torch.cuda.current_device`` in
state_dict_saver.py), and the calling script a ``__main__`` guard (the saver starts a
multiprocessing manager).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from bridge_ext.checkpoint.layout import RUN_CONFIG_FILE, TRACKER_FILE, iteration_dir_name

# What Megatron-Bridge passes as sharded-state-dict metadata (no distributed optimizer).
SHARDED_SD_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


@contextmanager
def cpu_stand_ins():
    """``torch.cuda.synchronize`` / ``current_device`` as no-ops on CPU (``None`` is the CPU index)."""
    with (
        mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None),
        mock.patch.object(torch.cuda, "current_device", lambda: None),
    ):
        yield


def save_megatron_checkpoint(chunks: list[torch.nn.Module], provider, root: str | Path, *, lora=None,
                             iteration: int = 1, adapter_only: bool = False) -> Path:
    """Save ``chunks`` (one pipeline stage's model) under ``root``; returns the iteration folder.

    ``provider`` (and ``lora``, Megatron-Bridge's LoRA transform) become run_config.yaml's
    ``model`` (and ``peft``) sections. ``adapter_only`` keeps only the adapter weights, as
    Megatron-Bridge saves PEFT runs (``apply_peft_adapter_filter_to_state_dict``).
    """
    import yaml
    from megatron.core import dist_checkpointing
    from megatron.training.config.container import ConfigContainerBase
    from megatron.training.config.yaml_utils import safe_yaml_representers

    root = Path(root)
    folder = root / iteration_dir_name(iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    model = {}
    for chunk in chunks:
        model.update(chunk.sharded_state_dict(metadata=dict(SHARDED_SD_METADATA)))
    if adapter_only:
        model = {k: v for k, v in model.items() if ".adapter." in k and "_extra_state" not in k}
    state = {"checkpoint_version": 3.0, "iteration": iteration, "model": model}
    with cpu_stand_ins():
        dist_checkpointing.save(state, str(folder), content_metadata=dict(SHARDED_SD_METADATA))
    if rank == 0:
        convert = ConfigContainerBase._convert_value_to_dict
        config = {
            "model": convert(provider),
            "peft": convert(lora) if lora is not None else None,
            "checkpoint": {"ckpt_format": "torch_dist", "save": str(root), "save_optim": False, "save_rng": False},
        }
        with safe_yaml_representers():
            (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config, default_flow_style=False))
        (root / TRACKER_FILE).write_text(str(iteration))
    torch.distributed.barrier()
    return folder
