"""``bridge-ext convert`` vs Megatron-Bridge's checkpoint export: seconds, throughput, peak memory.

One command::

    python benchmarks/checkpoint_convert.py [--layers 20] [--max-shard-size 200MB] [--workdir DIR]

1. writes a Qwen3-shaped Hugging Face folder with random bf16 weights (default about 0.64 GB),
   builds the Megatron-Core model from it through Megatron-Bridge and saves it with
   megatron-core's ``dist_checkpointing.save`` as a full checkpoint, then wraps it with
   Megatron-Bridge LoRA (random A and B) and saves the adapters as an adapter-only checkpoint
   (the layouts Megatron-Bridge training writes);
2. measures, each in a fresh process (peak RSS = ``ru_maxrss`` of that process):

   * ``full``: checkpoint -> Hugging Face folder. Ours: :func:`bridge_ext.convert.convert_checkpoint`
     (no model built). Megatron-Bridge: what ``AutoBridge.export_ckpt`` does - build the model
     through the provider, ``dist_checkpointing.load`` its sharded state dict, then
     ``AutoBridge.save_hf_pretrained``;
   * ``adapter``: adapter-only checkpoint -> PEFT folder. Ours: ``convert_checkpoint`` with the
     base folder. Megatron-Bridge: what ``AutoBridge.export_adapter_ckpt`` does - build the model
     with the base weights loaded and LoRA in fp32, load the adapters, ``save_hf_adapter``;

3. prints one table: seconds, throughput (MB written per second), peak RSS, and the peak above
   the process's footprint after imports (the conversion's own memory), with the ratios.

Megatron-Bridge's ``export_ckpt`` / ``export_adapter_ckpt`` themselves cannot run on this CPU
install: they import ``megatron.bridge.training``, which needs nvidia-modelopt and the training
data stack (``datasets``...). The steps above are theirs (auto_bridge.py and
training/model_load_save.py, megatron-bridge 0.6.2) minus those imports; the only stand-in is
``modelopt.torch.quantization.utils.is_quantized`` (returns False: nothing is quantized here).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
             head_dim=64, vocab_size=32768)
LORA = dict(target_modules=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), dim=16, alpha=32)
STAGES = ("ours-full", "bridge-full", "ours-adapter", "bridge-adapter")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# -- preparation ------------------------------------------------------------------------------
def write_hf_folder(directory: Path, layers: int) -> Path:
    """Random bf16 Qwen3 weights under transformers' own names and shapes, plus config.json."""
    import torch
    from transformers import Qwen3Config

    from bridge_ext.hf_folder import ShardedSafetensorsWriter
    from bridge_ext.hf_keys import hf_checkpoint_keys

    config = Qwen3Config(**SHAPE, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["Qwen3ForCausalLM"])
    directory.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(directory, 2 * 10**9)
    generator = torch.Generator().manual_seed(0)
    for name, shape in hf_checkpoint_keys(config).items():
        std = 0.1 if len(shape) == 1 else 0.02
        tensor = torch.randn(shape, generator=generator) * std + (1.0 if len(shape) == 1 else 0.0)
        writer.add(name, tensor.to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    return directory


def prepare(work: Path, layers: int) -> None:
    import torch

    from bridge_ext.checkpoint.writer import save_megatron_checkpoint
    from bridge_ext.cpu.build import build_megatron_model, randomize_lora
    from bridge_ext.cpu.distributed import megatron_parallel
    from megatron.bridge.peft.lora import LoRA

    hf_dir = write_hf_folder(work / "hf", layers)
    with megatron_parallel():
        built = build_megatron_model(hf_dir, dtype=torch.bfloat16)
        save_megatron_checkpoint(built.chunks, built.provider, work / "ckpt-full")
        lora = LoRA(target_modules=list(LORA["target_modules"]), dim=LORA["dim"], alpha=LORA["alpha"])
        chunks = lora(built.chunks, training=True)
        randomize_lora(chunks)
        save_megatron_checkpoint(chunks, built.provider, work / "ckpt-adapter", lora=lora, adapter_only=True)


# -- the measured stages (each in its own process) ------------------------------------------
def ours(work: Path, adapter: bool, max_shard_size: str) -> Path:
    from bridge_ext.convert import convert_checkpoint

    out = work / ("ours-adapter" if adapter else "ours-full")
    if adapter:
        convert_checkpoint(work / "ckpt-adapter", adapter_dir=out, hf_base=work / "hf")
    else:
        convert_checkpoint(work / "ckpt-full", model_dir=out, hf_base=work / "hf", max_shard_size=max_shard_size)
    return out


def stand_in_modelopt() -> None:
    """``modelopt.torch.quantization.utils.is_quantized``: the one ModelOpt call on the export path."""
    for name in ("modelopt", "modelopt.torch", "modelopt.torch.quantization", "modelopt.torch.quantization.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["modelopt.torch.quantization.utils"].is_quantized = lambda model: False


def megatron_bridge(work: Path, adapter: bool) -> Path:
    import torch
    from megatron.bridge import AutoBridge
    from megatron.core import dist_checkpointing

    from bridge_ext.checkpoint.writer import SHARDED_SD_METADATA, cpu_stand_ins
    from bridge_ext.cpu.build import LoraSettings, build_megatron_model
    from bridge_ext.cpu.distributed import megatron_parallel

    stand_in_modelopt()
    out = work / ("bridge-adapter" if adapter else "bridge-full")
    bridge = AutoBridge.from_hf_pretrained(str(work / "hf"))
    with megatron_parallel():  # export_ckpt: temporary_distributed_context(backend="gloo")
        if adapter:  # export_adapter_ckpt: base weights loaded, LoRA, params in fp32
            built = build_megatron_model(work / "hf", lora=LoraSettings(**LORA), dtype=torch.float32)
        else:  # load_megatron_model: the provider builds the model, then the checkpoint is loaded into it
            built = build_megatron_model(work / "hf", load_weights=False, dtype=torch.bfloat16)
        chunk = built.chunks[0]
        sharded = chunk.sharded_state_dict(metadata=dict(SHARDED_SD_METADATA))
        sharded = {k: v for k, v in sharded.items() if "_extra_state" not in k and (".adapter." in k or not adapter)}
        folder = work / ("ckpt-adapter" if adapter else "ckpt-full") / "iter_0000001"
        with cpu_stand_ins():
            loaded = dist_checkpointing.load(sharded, str(folder))
        chunk.load_state_dict(loaded, strict=False)
        del loaded
        if adapter:
            bridge.save_hf_adapter(built.chunks, path=out, peft_config=built.lora,
                                   base_model_name_or_path=str(work / "hf"), show_progress=False)
        else:
            bridge.save_hf_pretrained(built.chunks, out, show_progress=False)
    return out


def measure(stage: str, work: Path, max_shard_size: str) -> dict:
    import bridge_ext  # noqa: F401  (imports megatron without Transformer Engine)
    import megatron.bridge  # noqa: F401  (both sides pay the same imports before the clock starts)
    import transformers  # noqa: F401

    baseline = peak_rss_mib()
    started = time.perf_counter()
    adapter = stage.endswith("adapter")
    out = ours(work, adapter, max_shard_size) if stage.startswith("ours") else megatron_bridge(work, adapter)
    seconds = time.perf_counter() - started
    written = folder_bytes(out) if not adapter else (out / "adapter_model.safetensors").stat().st_size
    return {"stage": stage, "seconds": seconds, "bytes": written, "peak_mib": peak_rss_mib(), "baseline_mib": baseline}


# -- driver ---------------------------------------------------------------------------------
def run_stage(stage: str, work: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--stage", stage, "--workdir", str(work),
               "--layers", str(args.layers), "--max-shard-size", args.max_shard_size]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], checkpoint_bytes: int, max_shard_size: str) -> None:
    print(f"\ncheckpoint: {checkpoint_bytes / 1e9:.2f} GB of bf16 weights (Qwen3-shaped); our --max-shard-size "
          f"{max_shard_size}; each measurement in a fresh process")
    columns = f"{'case':<30}{'tool':<24}{'seconds':>8}{'MB/s':>8}{'peak RSS MiB':>14}{'above imports':>15}"
    print(columns)
    print("-" * len(columns))
    for kind, label in (("full", "full ckpt -> HF folder"), ("adapter", "adapter-only -> PEFT folder")):
        for who, tool in (("ours", "bridge-ext convert"), ("bridge", "Megatron-Bridge export")):
            r = results[f"{who}-{kind}"]
            print(f"{label:<30}{tool:<24}{r['seconds']:>8.1f}{r['bytes'] / 1e6 / r['seconds']:>8.1f}"
                  f"{r['peak_mib']:>14.0f}{r['peak_mib'] - r['baseline_mib']:>15.0f}")
        ours, theirs = results[f"ours-{kind}"], results[f"bridge-{kind}"]
        extra = (theirs["peak_mib"] - theirs["baseline_mib"]) / max(ours["peak_mib"] - ours["baseline_mib"], 1)
        print(f"{label:<30}{'ratio MB / ours':<24}{theirs['seconds'] / ours['seconds']:>7.1f}x{'':>8}"
              f"{theirs['peak_mib'] / ours['peak_mib']:>13.1f}x{extra:>14.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20: about 0.64 GB in bf16)")
    parser.add_argument("--max-shard-size", default="200MB", help="our shard size (bounds our memory)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, checkpoints and outputs here")
    parser.add_argument("--stage", choices=("prepare", *STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "prepare":
        import bridge_ext  # noqa: F401

        prepare(args.workdir, args.layers)
        return
    if args.stage is not None:
        print(json.dumps(measure(args.stage, args.workdir, args.max_shard_size)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        print(f"preparing the model and checkpoints in {work} ...", flush=True)
        started = time.perf_counter()
        command = [sys.executable, __file__, "--stage", "prepare", "--workdir", str(work), "--layers", str(args.layers)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"preparation failed:\n{result.stderr[-4000:]}")
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
        results = {}
        for stage in STAGES:
            print(f"measuring {stage} ...", flush=True)
            results[stage] = run_stage(stage, work, args)
        from_folder = sum(f.stat().st_size for f in (work / "ckpt-full" / "iter_0000001").glob("*.distcp"))
        report(results, from_folder, args.max_shard_size)


if __name__ == "__main__":
    main()
