"""Write real Megatron torch_dist checkpoints of a tiny Qwen3 for the reader tests.

Used in-process (TP=1) and as a torchrun script (TP=2)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 ckpt_factory.py HF_DIR OUT_DIR

For each variant it writes a Megatron-Bridge-style root ``OUT/<variant>/`` with
``latest_checkpointed_iteration.txt`` and ``iter_0000010/`` (torch_dist files from megatron-core's
own ``dist_checkpointing.save`` plus ``run_config.yaml``), and ``OUT/params_<variant>_rank<r>.pt``
with that rank's live parameters and their TP attributes (for the expected global tensors):

* ``dense``: the model without LoRA;
* ``lora``: the LoRA-wrapped model (adapters randomised), everything saved;
* ``adapter``: the same LoRA model saved the way Megatron-Bridge saves PEFT runs: only the
  ``*.adapter.*`` entries of the model section, without ``_extra_state``
  (``apply_peft_adapter_filter_to_state_dict``, training/checkpointing.py), plus common state;
* ``dora_adapter`` / ``dora_row_adapter``: DoRA adapter-only checkpoints (random A, B and
  magnitudes) on the column-parallel ``linear_qkv`` and ``linear_fc1``, and on the row-parallel
  ``linear_proj``;
* ``canonical_adapter``: a CanonicalLoRA adapter-only checkpoint on its default targets.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import yaml

ITERATION = 10
VARIANTS = ("dense", "lora", "adapter", "dora_adapter", "dora_row_adapter", "canonical_adapter")
DORA_TARGETS = {"dora_adapter": ("linear_qkv", "linear_fc1"), "dora_row_adapter": ("linear_proj",)}


def tiny_qwen3(hf_dir: Path) -> Path:
    """Save the tiny HF Qwen3 (fixed seed) to ``hf_dir``."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(hf_dir)
    return hf_dir


@contextmanager
def cpu_stand_ins():
    """CPU stand-ins for the CUDA calls met on the way, used only around a save and a TP>1 build.

    megatron-core's save calls torch.cuda.synchronize (filesystem_async.py) and builds a tensor on
    torch.cuda.current_device() (state_dict_saver.py); at TP>1 Megatron-Bridge's replicated-weight
    mapping compares the weight's device index with torch.cuda.current_device() (param_mapping.py).
    ``None`` is both the index of a CPU device and a valid ``device=`` argument.
    """
    with (
        mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None),
        mock.patch.object(torch.cuda, "current_device", lambda: None),
    ):
        yield


def run_config(built, *, adapter_only: bool, root: Path, base_root: Path | None) -> dict:
    """model / peft / checkpoint sections serialised the way Megatron-Bridge's ConfigContainer.to_yaml does."""
    from megatron.training.config.container import ConfigContainerBase

    convert = ConfigContainerBase._convert_value_to_dict
    return {
        "model": convert(built.provider),
        "peft": convert(built.lora) if built.lora is not None else None,
        "checkpoint": {
            "_target_": "megatron.bridge.training.config.CheckpointConfig",
            "ckpt_format": "torch_dist",
            "save": str(root),
            "load": None,
            "pretrained_checkpoint": str(base_root) if adapter_only and base_root else None,
            "save_optim": False,
            "save_rng": False,
        },
    }


def save_variant(built, root: Path, *, adapter_only: bool = False, base_root: Path | None = None) -> None:
    """Save ``built`` (a BuiltModel) as ``root/iter_0000010`` + tracker + run_config.yaml (all ranks call).

    The project's own writer saves; run_config.yaml is then rewritten with the checkpoint section
    a Megatron-Bridge PEFT run records (``pretrained_checkpoint``).
    """
    from megatron.training.config.yaml_utils import safe_yaml_representers

    from bridge_ext_testing.writer import save_megatron_checkpoint

    folder = save_megatron_checkpoint(built.chunks, built.provider, root, lora=built.lora, iteration=ITERATION,
                                      adapter_only=adapter_only)
    if torch.distributed.get_rank() == 0:
        config = run_config(built, adapter_only=adapter_only, root=root, base_root=base_root)
        with safe_yaml_representers():
            (folder / "run_config.yaml").write_text(yaml.safe_dump(config, default_flow_style=False))
    torch.distributed.barrier()


def dump_params(built, path: Path) -> None:
    """This rank's parameters with (tensor_model_parallel, partition_dim), for building expectations."""
    params = {}
    for name, param in built.chunks[0].named_parameters():
        params[name] = (
            param.detach().clone(),
            bool(getattr(param, "tensor_model_parallel", False)),
            int(getattr(param, "partition_dim", -1)),
        )
    torch.save(params, path)


def save_all(hf_dir: Path, out: Path, *, tensor_parallel: int) -> None:
    """Build the dense and LoRA models at ``tensor_parallel`` and save the three variants to ``out``."""
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext_testing.distributed import megatron_parallel

    with megatron_parallel(tensor_parallel=tensor_parallel):
        rank = torch.distributed.get_rank()
        build = build_megatron_model
        if tensor_parallel > 1:

            def build(*args, **kwargs):
                with cpu_stand_ins():
                    return build_megatron_model(*args, **kwargs)

        dense = build(hf_dir)
        save_variant(dense, out / "dense")
        dump_params(dense, out / f"params_dense_rank{rank}.pt")
        del dense
        lora = build(hf_dir, lora=LoraSettings())
        randomize_lora(lora.chunks, seed=1)
        save_variant(lora, out / "lora")
        save_variant(lora, out / "adapter", adapter_only=True, base_root=out / "dense")
        dump_params(lora, out / f"params_lora_rank{rank}.pt")
        for variant, targets in DORA_TARGETS.items():
            dora = build(hf_dir, lora=LoraSettings(kind="dora", target_modules=targets))
            randomize_lora(dora.chunks, seed=2)
            save_variant(dora, out / variant, adapter_only=True, base_root=out / "dense")
            dump_params(dora, out / f"params_{variant}_rank{rank}.pt")
        canonical = build(hf_dir, lora=LoraSettings(kind="canonical_lora"))
        randomize_lora(canonical.chunks, seed=3)
        save_variant(canonical, out / "canonical_adapter", adapter_only=True, base_root=out / "dense")


if __name__ == "__main__":
    import bridge_ext  # noqa: F401  (makes megatron importable without TE / Triton)

    save_all(Path(sys.argv[1]), Path(sys.argv[2]), tensor_parallel=int(os.environ.get("WORLD_SIZE", "1")))
