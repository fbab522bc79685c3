"""``bridge-ext convert`` vs Megatron-Bridge's checkpoint export: seconds, throughput, peak memory.

One command::

    python benchmarks/checkpoint_convert.py [--layers 20] [--max-shard-size 200MB] [--workdir DIR]
                                            [--repeat 3] [--no-megatron-bridge] [--workers 1,2,4]

1. writes a Qwen3-shaped Hugging Face folder with random bf16 weights (default about 0.64 GB),
   builds the Megatron-Core model from it through Megatron-Bridge and saves it with
   megatron-core's ``dist_checkpointing.save`` as a full checkpoint, then wraps it with
   Megatron-Bridge LoRA (random A and B) and saves the adapters as an adapter-only checkpoint
   (the layouts Megatron-Bridge training writes);
2. measures, each in a fresh process (peak RSS = ``ru_maxrss`` of that process):

   * ``copy``: ``cp -r`` of the checkpoint's iteration folder, then ``sync`` of the copied files
     (the speed of the disk and page cache for the same bytes: the bound for any conversion);

   * ``full``: checkpoint -> Hugging Face folder. Ours: :func:`bridge_ext.convert.convert_checkpoint`
     (no model built). Megatron-Bridge: what ``AutoBridge.export_ckpt`` does - build the model
     through the provider, ``dist_checkpointing.load`` its sharded state dict, then
     ``AutoBridge.save_hf_pretrained``;
   * ``adapter``: adapter-only checkpoint -> PEFT folder. Ours: ``convert_checkpoint`` with the
     base folder. Megatron-Bridge: what ``AutoBridge.export_adapter_ckpt`` does - build the model
     with the base weights loaded and LoRA in fp32, load the adapters, ``save_hf_adapter``;

   * ``ours-full`` again for each ``--workers`` count (the sweep; peak RSS is then the largest
     of the parent and its workers, each worker's own peak shown beside it);
   * ``startup``: a fresh ``bridge-ext convert`` process, nothing imported before: seconds from
     just before it is started to its first read of a tensor's bytes (imports and every check);

3. prints one table: seconds, throughput (MB written per second), peak RSS, and the peak above
   the process's footprint after imports (the conversion's own memory), with the ratios. Ours is
   timed twice: the conversion alone, and the conversion plus ``fsync`` of every file written
   (what the copy's ``sync`` does), which is the figure compared with the copy. ``--repeat``
   measures the copy and ours that many times (the median is shown, every run listed). ``CPU s``
   is the user + system time of the measured process (all threads; for the copy, ``cp`` and
   ``sync``): on a shared machine it is what the wall-clock time is made of.

The copy and the conversions read the same checkpoint, from the page cache when it is warm
(as after the preparation step); the load average is printed with the results.

Megatron-Bridge's ``export_ckpt`` / ``export_adapter_ckpt`` themselves cannot run on this CPU
install: they import ``megatron.bridge.training``, which needs nvidia-modelopt and the training
data stack (``datasets``...). The steps above are theirs (auto_bridge.py and
training/model_load_save.py, megatron-bridge 0.6.2) minus those imports; the only stand-in is
``modelopt.torch.quantization.utils.is_quantized`` (returns False: nothing is quantized here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
REPEATED = ("copy", "ours-full", "ours-adapter")
# A fresh CLI process that reports the seconds (since --started) of its first read of tensor bytes.
FIRST_READ = """
import os, sys, time
started = float(sys.argv.pop(1))
from bridge_ext.checkpoint import record
read_into = record.RecordFile.read_into
def first(self, offset, buffer):
    if not getattr(first, "done", False):
        first.done = True
        print(f"FIRST_READ {time.time() - started:.3f}", file=sys.stderr, flush=True)
    return read_into(self, offset, buffer)
record.RecordFile.read_into = first
from bridge_ext.cli import main
main()
"""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def fsync_files(folder: Path) -> None:
    """What ``sync FILE...`` does for every file under ``folder``."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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

    from bridge_ext_testing.writer import save_megatron_checkpoint
    from bridge_ext_testing.build import build_megatron_model, randomize_lora
    from bridge_ext_testing.distributed import megatron_parallel
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
def ours(work: Path, adapter: bool, max_shard_size: str, workers: int | None = None) -> Path:
    from bridge_ext.convert import convert_checkpoint

    out = work / ("ours-adapter" if adapter else "ours-full")
    if adapter:
        convert_checkpoint(work / "ckpt-adapter", adapter_dir=out, hf_base=work / "hf")
    else:
        convert_checkpoint(work / "ckpt-full", model_dir=out, hf_base=work / "hf", max_shard_size=max_shard_size,
                           workers=workers)
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

    from bridge_ext_testing.writer import SHARDED_SD_METADATA, cpu_stand_ins
    from bridge_ext_testing.build import LoraSettings, build_megatron_model
    from bridge_ext_testing.distributed import megatron_parallel

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


def measure(stage: str, work: Path, max_shard_size: str, workers: int | None = None) -> dict:
    import bridge_ext  # noqa: F401  (imports megatron without Transformer Engine)
    import megatron.bridge  # noqa: F401  (both sides pay the same imports before the clock starts)
    import transformers  # noqa: F401

    baseline = peak_rss_mib()
    started, cpu_started = time.perf_counter(), cpu_seconds(os.times(), children=False)
    adapter = stage.endswith("adapter")
    out = ours(work, adapter, max_shard_size, workers) if stage.startswith("ours") else megatron_bridge(work, adapter)
    seconds = time.perf_counter() - started
    fsync_files(out)
    synced = time.perf_counter() - started
    cpu = cpu_seconds(os.times(), children=False) - cpu_started
    written = folder_bytes(out) if not adapter else (out / "adapter_model.safetensors").stat().st_size
    shutil.rmtree(out)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, if any
    cpu += children.ru_utime + children.ru_stime
    return {"stage": stage, "seconds": seconds, "synced_seconds": synced, "bytes": written, "cpu_seconds": cpu,
            "peak_mib": peak_rss_mib(), "baseline_mib": baseline, "worker_peak_mib": children.ru_maxrss / 1024}


def measure_startup(work: Path) -> dict:
    """Seconds from just before a fresh ``bridge-ext convert`` starts to its first read of tensor bytes."""
    out = work / "ours-startup"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", FIRST_READ, f"{time.time():.6f}", "convert", str(work / "ckpt-full"),
               "--hf-base", str(work / "hf"), "--model-out", str(out), "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"startup stage failed:\n{result.stderr[-4000:]}")
    first = float(result.stderr.split("FIRST_READ ", 1)[1].split()[0])
    return {"stage": "startup", "seconds": first, "synced_seconds": first, "bytes": 0, "cpu_seconds": 0.0}


def cpu_seconds(times: os.times_result, children: bool) -> float:
    """User + system CPU time of this process (all its threads) or of its finished children."""
    return times.children_user + times.children_system if children else times.user + times.system


def measure_copy(work: Path) -> dict:
    """``cp -r`` of the full checkpoint's iteration folder, then ``sync`` of the copied files."""
    source, target = work / "ckpt-full" / "iter_0000001", work / "copy"
    shutil.rmtree(target, ignore_errors=True)
    started, cpu_started = time.perf_counter(), cpu_seconds(os.times(), children=True)
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    copied = time.perf_counter() - started
    subprocess.run(["sync", *map(str, sorted(target.iterdir()))], check=True)
    synced = time.perf_counter() - started
    cpu = cpu_seconds(os.times(), children=True) - cpu_started
    written = sum(f.stat().st_size for f in target.iterdir())
    shutil.rmtree(target)
    return {"stage": "copy", "seconds": copied, "synced_seconds": synced, "bytes": written, "cpu_seconds": cpu}


# -- driver ---------------------------------------------------------------------------------
def run_stage(stage: str, work: Path, args: argparse.Namespace) -> dict:
    """One measurement, with the 1-minute load average just after it (the machine may be shared)."""
    result = _run_stage(stage, work, args)
    result["load"] = os.getloadavg()[0]
    return result


def _run_stage(stage: str, work: Path, args: argparse.Namespace) -> dict:
    if stage == "copy":
        return measure_copy(work)
    if stage == "startup":
        return measure_startup(work)
    stage, _, workers = stage.partition("@")  # ours-full@N: with N workers
    shutil.rmtree(work / stage, ignore_errors=True)  # the stage's output folder, left by an interrupted run
    command = [sys.executable, __file__, "--stage", stage, "--workdir", str(work),
               "--layers", str(args.layers), "--max-shard-size", args.max_shard_size,
               *(["--stage-workers", workers] if workers else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run of median ``synced_seconds`` (a real run, so its numbers belong together)."""
    ordered = sorted(runs, key=lambda r: r["synced_seconds"])
    return ordered[(len(ordered) - 1) // 2]


def report(results: dict[str, list[dict]], checkpoint_bytes: int, args: argparse.Namespace) -> None:
    print(f"\ncheckpoint: {checkpoint_bytes / 1e9:.2f} GB of bf16 weights (Qwen3-shaped, {args.layers} layers); our "
          f"--max-shard-size {args.max_shard_size}; each measurement in a fresh process; {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")
    copy = median_run(results["copy"])
    copy_rate = copy["bytes"] / copy["synced_seconds"]
    columns = (f"{'case':<30}{'tool':<28}{'seconds':>8}{'+sync s':>8}{'MB/s':>8}{'of copy':>8}{'CPU s':>7}"
               f"{'peak RSS MiB':>13}{'above imports':>14}")
    print(columns)
    print("-" * len(columns))
    print(f"{'copy the checkpoint folder':<30}{'cp -r + sync':<28}{copy['seconds']:>8.2f}{copy['synced_seconds']:>8.2f}"
          f"{copy_rate / 1e6:>8.0f}{'100%':>8}{copy['cpu_seconds']:>7.2f}")
    for kind, label in (("full", "full ckpt -> HF folder"), ("adapter", "adapter-only -> PEFT folder")):
        for who, tool in (("ours", "bridge-ext convert"), ("bridge", "Megatron-Bridge export")):
            if f"{who}-{kind}" not in results:
                continue
            r = median_run(results[f"{who}-{kind}"])
            rate = r["bytes"] / r["synced_seconds"]
            share = f"{rate / copy_rate:.0%}" if kind == "full" else ""
            print(f"{label:<30}{tool:<28}{r['seconds']:>8.2f}{r['synced_seconds']:>8.2f}{rate / 1e6:>8.0f}{share:>8}"
                  f"{r['cpu_seconds']:>7.2f}{r['peak_mib']:>13.0f}{r['peak_mib'] - r['baseline_mib']:>14.0f}")
        if f"bridge-{kind}" in results:
            ours, theirs = median_run(results[f"ours-{kind}"]), median_run(results[f"bridge-{kind}"])
            extra = (theirs["peak_mib"] - theirs["baseline_mib"]) / max(ours["peak_mib"] - ours["baseline_mib"], 1)
            print(f"{label:<30}{'ratio Megatron-Bridge / ours':<28}{theirs['synced_seconds'] / ours['synced_seconds']:>15.1f}x"
                  f"{'':>16}{theirs['cpu_seconds'] / ours['cpu_seconds']:>6.1f}x"
                  f"{theirs['peak_mib'] / ours['peak_mib']:>12.1f}x{extra:>13.1f}x")
    sweep = [stage for stage in results if stage.startswith("ours-full@")]
    if sweep:
        print(f"--workers sweep, full ckpt -> HF folder ({os.cpu_count()} CPUs; 'of copy': of the copy's MB/s above)")
        print(f"{'workers':>8}{'seconds':>9}{'+sync s':>9}{'MB/s':>8}{'of copy':>9}{'CPU s':>8}{'peak RSS MiB':>14}"
              f"{'worker peak MiB':>17}")
        for stage in sweep:
            r = median_run(results[stage])
            rate = r["bytes"] / r["synced_seconds"]
            print(f"{stage.partition('@')[2]:>8}{r['seconds']:>9.2f}{r['synced_seconds']:>9.2f}{rate / 1e6:>8.0f}"
                  f"{rate / copy_rate:>9.0%}{r['cpu_seconds']:>8.2f}{r['peak_mib']:>14.0f}{r['worker_peak_mib']:>17.0f}")
    if "startup" in results:
        print("start-up, process start -> first tensor byte read (fresh `bridge-ext convert`, nothing imported "
              "before): " + ", ".join(f"{r['seconds']:.2f} s" for r in results["startup"]))
    if args.repeat > 1:
        print("every run (seconds / +sync seconds / CPU seconds, load average after it):")
        for stage in [*REPEATED, *sweep]:
            runs = results.get(stage, [])
            print(f"  {stage:<14}" + "  ".join(
                f"{r['seconds']:.2f}/{r['synced_seconds']:.2f}/{r['cpu_seconds']:.2f} (load {r['load']:.1f})"
                for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20: about 0.64 GB in bf16)")
    parser.add_argument("--max-shard-size", default="200MB", help="our shard size (bounds our memory)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, checkpoints and outputs here")
    parser.add_argument("--repeat", type=int, default=1, help="measure the copy and ours this many times")
    parser.add_argument("--no-megatron-bridge", action="store_true",
                        help="skip Megatron-Bridge's path (it holds the whole model in memory)")
    parser.add_argument("--workers", default="",
                        help="also measure the full conversion with each of these worker counts, e.g. 1,2,4")
    parser.add_argument("--stage", choices=("prepare", *STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--stage-workers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "prepare":
        import bridge_ext  # noqa: F401

        prepare(args.workdir, args.layers)
        return
    if args.stage is not None:
        print(json.dumps(measure(args.stage, args.workdir, args.max_shard_size, args.stage_workers)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        config = work / "hf" / "config.json"
        if (work / "ckpt-adapter").is_dir() and config.is_file() and \
                json.loads(config.read_text())["num_hidden_layers"] == args.layers:
            print(f"reusing the model and checkpoints in {work}", flush=True)
        else:
            print(f"preparing the model and checkpoints in {work} ...", flush=True)
            started = time.perf_counter()
            command = [sys.executable, __file__, "--stage", "prepare", "--workdir", str(work),
                       "--layers", str(args.layers)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"preparation failed:\n{result.stderr[-4000:]}")
            print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
        results: dict[str, list[dict]] = {}
        stages = [s for s in ("copy", *STAGES) if not (args.no_megatron_bridge and s.startswith("bridge"))]
        stages += [f"ours-full@{n}" for n in args.workers.split(",") if n] + ["startup"]
        for round_number in range(args.repeat):
            for stage in stages:
                if round_number and stage not in REPEATED and "@" not in stage:
                    continue
                print(f"measuring {stage} ...", flush=True)
                results.setdefault(stage, []).append(run_stage(stage, work, args))
        from_folder = sum(f.stat().st_size for f in (work / "ckpt-full" / "iter_0000001").glob("*.distcp"))
        report(results, from_folder, args)


if __name__ == "__main__":
    main()
