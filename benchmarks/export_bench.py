"""bridge_ext vs Megatron-Bridge: export time, throughput and peak memory on one model.

One command builds one model with LoRA (a preset of :mod:`bench_models`: dense Qwen3 shapes,
Qwen3.5-MoE shapes with Gated DeltaNet, 256 experts and MTP, or Qwen3-MoE shapes with 128
experts) and times, in the same run and on the same model:

* ``merged``: ``export_hf_weights`` with LoRA merged (MB: ``merge_adapter_weights=True``);
* ``unmerged+adapters``: base weights and adapters (MB: ``export_hf_weights(
  merge_adapter_weights=False)`` then ``export_adapter_weights``; ours: one ``peft=True`` stream);
* ``adapters``: adapters only (the per-step sync; MB: ``export_adapter_weights``; ours in the
  expert-adapter layout vLLM loads for the model, the table's default: 3-D for Qwen3.5-MoE,
  per expert for Qwen3-MoE);
* ``..., zero_copy``: ours with ``zero_copy=True``: what copying the tensors that would share
  memory with the model (the default) costs;
* ``to-cpu``: base + adapters into CPU memory (GPU only; MB ``cpu=True``, ours ``device="cpu"``);
* ours with ``destination="rank0"`` / ``"owner"`` in parallel runs (MB has no such choice);
* ``merged fp8`` (and on GPU ``to-cpu merged`` / ``to-cpu merged fp8``): ours with
  ``quantize="fp8"`` (MB quantizes no bf16 model); the ratios to our bf16 rows are printed;
  ``to-cpu base`` / ``to-cpu base fp8``: the unmerged base alone (``base_only=True``, the
  sync-once case), where no merge work hides the link;

Each is run once to warm up, then ``--repeats`` times; the median is reported with the
throughput (GB/s of exported tensors received by rank 0), the peak extra process memory (RSS
above what the process held before) and on GPU the peak extra GPU memory. The consumer drops
each tensor after counting it. The machine's copy bandwidth (a large tensor clone; on GPU also
a device-to-pinned-host copy) is printed as the physical ceiling.

    python benchmarks/export_bench.py                                   # CPU, one process
    torchrun --nproc-per-node 2 benchmarks/export_bench.py --tp 2       # CPU, gloo
    torchrun --nproc-per-node 2 benchmarks/export_bench.py --device cuda --pp 2 --preset qwen3-1.7b
    torchrun --nproc-per-node 2 benchmarks/export_bench.py --device cuda --ep 2 --preset qwen35-moe
    torchrun --nproc-per-node 2 benchmarks/export_bench.py --device cuda --ep 2 --preset qwen3-moe
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import signal
import os
import re
import sys
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import bridge_ext  # noqa: F401  (first: makes megatron importable without Transformer Engine)
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import PRESETS, build, family, hf_dir_for, init_parallel, write_hf_folder  # noqa: E402


# -- measuring ----------------------------------------------------------------------------
class PeakRss:
    """Peak resident memory of this process above its level at start, sampled every 2 ms."""

    def __init__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def over_ranks(value: float, device: str, op=dist.ReduceOp.MAX) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def consume(streams: Iterable[Iterable[tuple[str, torch.Tensor]]]) -> tuple[int, int, int]:
    """Iterate every stream to its end, dropping tensors; (tensors, bytes, largest tensor's bytes)."""
    count = nbytes = largest = 0
    for pairs in streams:
        for _, tensor in pairs:
            count += 1
            size = tensor.numel() * tensor.element_size()
            nbytes += size
            largest = max(largest, size)
            del tensor  # done with it (a consumer keeps nothing it does not need)
    return count, nbytes, largest


def measure(name: str, run: Callable[[], Iterable], device: str, repeats: int) -> dict:
    """Median seconds (slowest rank), exported bytes, peak extra RSS / GPU memory (this rank)."""
    seconds, rss, gpu = [], [], []
    for attempt in range(repeats + 1):
        gc.collect()  # no full collection of the models' many objects inside a timed run (0.4-0.5 s outliers)
        if dist.is_initialized():
            dist.barrier()
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            gpu_base = torch.cuda.memory_allocated()
        with PeakRss() as peak:
            start = time.perf_counter()
            count, nbytes, largest = consume(run())
            synchronize(device)
            elapsed = time.perf_counter() - start
        if attempt:  # the first run warms up
            seconds.append(over_ranks(elapsed, device))
            rss.append(peak.extra)
            gpu.append(torch.cuda.max_memory_allocated() - gpu_base if device == "cuda" else 0)
    median = statistics.median(seconds)
    # bytes of the export: what one rank got, or with destination "owner" what all ranks got
    nbytes = over_ranks(nbytes, device, dist.ReduceOp.SUM if "owner" in name else dist.ReduceOp.MAX)
    return dict(seconds=median, runs=seconds, tensors=count, bytes=nbytes, gbps=nbytes / median / 1e9,
                peak_rss=max(rss), peak_gpu=max(gpu), largest=largest)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> dict:
    """GB/s of cloning a large tensor and, on GPU, of copying it to pinned host memory: by rank
    0 alone and, in a parallel job, by every rank at once (the limit of ``destination="all"``
    to the CPU, where each rank copies the whole model over links that may share the host)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    result = {"clone": _copy_rate(lambda: source.clone(), nbytes, device, alone=True)}
    if device == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        to_host = lambda: host.copy_(source, non_blocking=True)  # noqa: E731
        result["to_pinned_host"] = _copy_rate(to_host, nbytes, device, alone=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            result["to_pinned_host every rank at once"] = _copy_rate(to_host, nbytes, device, alone=False)
    return result


def _copy_rate(copy: Callable, nbytes: int, device: str, alone: bool) -> float:
    """Best of three rounds of three copies (rank 0 only if ``alone``), GB/s on the slowest rank."""
    active = not alone or not dist.is_initialized() or dist.get_rank() == 0
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        if active:
            for _ in range(3):
                copy()
            synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 3 * nbytes / over_ranks(best if active else 0.0, device) / 1e9


# -- the comparisons ------------------------------------------------------------------------
def cases(chunks, bridge, device: str, parallel: bool, mb_merges: bool = True) -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (ours, Megatron-Bridge's) stream factories (each returns a list of streams)."""
    from bridge_ext import export_hf_buckets, export_hf_weights

    def mb_unmerged(cpu: bool):
        return lambda: [bridge.export_hf_weights(chunks, cpu=cpu, show_progress=False, merge_adapter_weights=False),
                        bridge.export_adapter_weights(chunks, cpu=cpu, show_progress=False)]

    table = {
        "merged": (lambda: [export_hf_weights(chunks, peft=False)],
                   (lambda: [bridge.export_hf_weights(chunks, cpu=False, show_progress=False)]) if mb_merges else None),
        "unmerged+adapters": (lambda: [export_hf_weights(chunks)], mb_unmerged(False)),
        "adapters": (lambda: [export_hf_weights(chunks, adapters_only=True)],
                     lambda: [bridge.export_adapter_weights(chunks, cpu=False, show_progress=False)]),
    }
    # The rows above copy what would share memory with the model (the default); these skip it.
    table["unmerged+adapters, zero_copy"] = (lambda: [export_hf_weights(chunks, zero_copy=True)], None)
    table["adapters, zero_copy"] = (lambda: [export_hf_weights(chunks, adapters_only=True, zero_copy=True)], None)
    if device == "cuda":
        table["to-cpu unmerged+adapters"] = (lambda: [export_hf_weights(chunks, device="cpu")], mb_unmerged(True))
    table["merged, 256 MiB buckets"] = (
        lambda: [(pair for bucket in export_hf_buckets(chunks, 256 << 20, peft=False) for pair in bucket.tensors)],
        None)
    # block FP8 (the engine's block-shape check is the tests' business: timing only, any width)
    fp8 = dict(peft=False, quantize="fp8", engine_tp_size=None)
    table["merged fp8"] = (lambda: [export_hf_weights(chunks, **fp8)], None)
    if device == "cuda":
        table["to-cpu merged"] = (lambda: [export_hf_weights(chunks, peft=False, device="cpu")], None)
        table["to-cpu merged fp8"] = (lambda: [export_hf_weights(chunks, device="cpu", **fp8)], None)
        # the unmerged base (sync once): no merge work, so bf16 to the host is bound by the link
        base_fp8 = dict(base_only=True, quantize="fp8", engine_tp_size=None)
        table["to-cpu base"] = (lambda: [export_hf_weights(chunks, base_only=True, device="cpu")], None)
        table["to-cpu base fp8"] = (lambda: [export_hf_weights(chunks, device="cpu", **base_fp8)], None)
    if parallel:
        for destination in ("rank0", "owner"):
            for mode, kwargs in (("merged", dict(peft=False)), ("adapters", dict(adapters_only=True))):
                table[f"{mode}, destination={destination}"] = (
                    lambda kwargs=kwargs, destination=destination: [
                        export_hf_weights(chunks, destination=destination, **kwargs)],
                    None)
    return table


def _collect(pairs: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in pairs}


# Known causes of tensors where Megatron-Bridge 0.6.2's export differs from ours (README,
# "differs from Megatron-Bridge"; pinned by tests/distributed/test_layouts.py,
# tests/distributed/megatron_bridge_expert_parallel.py and tests/test_megatron_bridge_bf16_merge.py).
# Anything else is printed as unexplained.
KNOWN_DIFFERENCES = {
    "its routed-expert gate/up LoRA B split ignores expert-tensor parallelism":
        (re.compile(r"\.experts\.(\d+\.)?(gate|up)_proj(\.lora_B)?\.weight$|\.experts\.gate_up_proj$"),
         lambda: _expert_tensor_parallel() > 1),
    "it rounds the Gated DeltaNet in_proj LoRA delta to bf16 before adding it":
        (re.compile(r"\.linear_attn\.in_proj_(qkv|z|b|a)\.weight$"), lambda: True),
    "its merged export gives other expert ranks' experts EP rank 0's LoRA of the same local index":
        (re.compile(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$"), lambda: _expert_parallel() > 1),
}


def _expert_tensor_parallel() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_tensor_parallel_world_size() if dist.is_initialized() else 1


def _expert_parallel() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size() if dist.is_initialized() else 1


def _explain(names: list[str]) -> str:
    """How many differing tensors each known cause accounts for, and how many are unexplained."""
    counts, unexplained = {}, []
    for name in names:
        cause = next((cause for cause, (pattern, applies) in KNOWN_DIFFERENCES.items()
                      if pattern.search(name) and applies()), None)
        if cause is None:
            unexplained.append(name)
        else:
            counts[cause] = counts.get(cause, 0) + 1
    parts = [f"{count} where {cause}" for cause, count in counts.items()]
    parts.append(f"{len(unexplained)} UNEXPLAINED{' (e.g. ' + unexplained[0] + ')' if unexplained else ''}")
    return "; Megatron-Bridge differs: " + ", ".join(parts)


def _compare(ours: dict[str, torch.Tensor], theirs: Iterable[tuple[str, torch.Tensor]],
             rename: Callable[[str], str] = lambda name: name) -> tuple[str, int]:
    """Compare a stream with collected tensors as it arrives (nothing of it is kept)."""
    seen, extra, identical, worst, differing = set(), 0, 0, 0.0, []
    for name, tensor in theirs:
        name = rename(name)
        mine = ours.get(name)
        if mine is None:
            extra += 1
            continue
        seen.add(name)
        other = tensor.to(mine.device)
        if mine.shape == other.shape and torch.equal(mine, other):
            identical += 1
            continue
        differing.append(name)
        if mine.shape != other.shape:
            worst = float("inf")
        else:
            worst = max(worst, (mine.float() - other.float()).abs().max().item())
    missing = len(set(ours) - seen)
    names = "equal" if not missing and not extra else f"DIFFER (only ours {missing}, only theirs {extra})"
    result = f"names {names}, {identical}/{len(ours)} bit-identical, max |diff| {worst:.3g}"
    return result + (_explain(differing) if differing else ""), len(seen) + extra


def _recording(pairs: Iterable[tuple[str, torch.Tensor]], names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs`` unchanged, each name added to ``names`` as it passes."""
    for name, tensor in pairs:
        names.add(name)
        yield name, tensor


def _files(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


# Megatron-Bridge 0.6.2's merged export of an expert-parallel Qwen3.5-MoE model: its ranks call
# different all_gathers (rank 0 finds its experts' adapters under their global names, the other
# ranks do not; gloo: "Received data size doesn't match expected size. 2048 vs 1024"; NCCL would
# hang), so it is left out at EP > 1. Its Qwen3-MoE merged export at EP 2 runs, with the same
# cause giving other ranks' experts rank 0's LoRA (tests/distributed/megatron_bridge_expert_parallel.py).
MB_MERGED_FAILS = "Megatron-Bridge's merged export fails at expert parallelism > 1 (mismatched all_gather)"


def mb_merges(preset: str, ep: int) -> bool:
    """Whether Megatron-Bridge's merged export runs for this preset at this expert parallelism."""
    return ep == 1 or family(preset) != "qwen35_moe"


def check(chunks, bridge, hf_dir: Path, moe: bool, mb_merges: bool = True) -> list[str]:
    """Correctness at this layout (rank 0 reports): base weights vs the Hugging Face files (or,
    without weight files, vs Megatron-Bridge's unmerged export with ``.base_layer`` removed),
    merged and adapters vs Megatron-Bridge (MoE experts compared in Megatron-Bridge's per-expert
    layout), destinations ``rank0`` / ``owner`` vs ``all``, and how many adapter tensors each
    rank receives from Megatron-Bridge's ``export_adapter_weights``."""
    from bridge_ext import export_hf_weights
    from bridge_ext.engine import PEFT_PREFIX

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_expert = dict(expert_layout="per_expert", expert_adapter_layout="per_expert") if moe else {}
    lines = []
    if any(hf_dir.glob("*.safetensors")):
        base = {n: t for n, t in _collect(export_hf_weights(chunks)).items() if not n.startswith(PEFT_PREFIX)}
        lines.append(f"check base vs Hugging Face files: {_compare(base, _files(hf_dir))[0]}")
    else:
        base = {n: t for n, t in _collect(export_hf_weights(chunks)).items() if not n.startswith(PEFT_PREFIX)}
        theirs = bridge.export_hf_weights(chunks, cpu=False, show_progress=False, merge_adapter_weights=False)
        result, _ = _compare(base, theirs, lambda name: name.replace(".base_layer.", "."))
        lines.append(f"check base vs Megatron-Bridge unmerged (.base_layer removed): {result}")
    del base
    merged = _collect(export_hf_weights(chunks, peft=False))
    if mb_merges:
        lines.append("check merged vs Megatron-Bridge: "
                     + _compare(merged, bridge.export_hf_weights(chunks, cpu=False, show_progress=False))[0])
    else:
        lines.append(f"check merged vs Megatron-Bridge: not run ({MB_MERGED_FAILS})")
    rank0 = export_hf_weights(chunks, peft=False, destination="rank0")
    result, _ = _compare(merged, rank0)  # every rank iterates (other ranks receive nothing)
    lines.append(f"check destination=rank0 vs all: {result}")
    del merged
    if torch.cuda.is_available() and next(chunks[0].parameters()).is_cuda:
        on_device = _collect(export_hf_weights(chunks))
        result, _ = _compare(on_device, ((name, tensor) for name, tensor in export_hf_weights(chunks, device="cpu")))
        lines.append(f"check to-cpu vs on the GPU: {result}")
        del on_device
    owned = [name for name, _ in export_hf_weights(chunks, peft=False, destination="owner")]
    all_names = [name for name, _ in export_hf_weights(chunks, peft=False)]
    gathered = [None] * world if dist.is_initialized() else [owned]
    if dist.is_initialized():
        dist.all_gather_object(gathered, owned)
    union = [name for names in gathered for name in names]
    lines.append(f"check destination=owner: {len(union)} tensors over the ranks, {len(set(union))} distinct, "
                 f"{'the same names as all' if set(union) == set(all_names) else 'NAMES DIFFER FROM all'}")
    adapters = {name.removeprefix(PEFT_PREFIX): tensor
                for name, tensor in _collect(export_hf_weights(chunks, adapters_only=True, **per_expert)).items()}
    received_names: set[str] = set()
    theirs = _recording(bridge.export_adapter_weights(chunks, cpu=False, show_progress=False), received_names)
    result, received = _compare(adapters, theirs)
    lines.append(f"check adapters{' (per-expert)' if moe else ''} vs Megatron-Bridge: {result}")
    counts = [None] * world if dist.is_initialized() else [received]
    if dist.is_initialized():
        dist.all_gather_object(counts, received)
    missing = len(set(adapters) - received_names)
    lines.append(f"check Megatron-Bridge export_adapter_weights tensors received per rank: {counts} "
                 f"(the adapter has {len(adapters)}; ours gives each rank all of them with destination=all); "
                 + (f"rank 0 MISSES {missing} of them" if missing else "rank 0 has all of them"))
    return lines


def profile(chunks, device: str, directory: Path, modes: list[str], table: dict) -> None:
    """One run of each mode under torch.profiler; the tables (this rank) go to ``directory``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rank = dist.get_rank() if dist.is_initialized() else 0
    directory.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for mode in modes:
        if mode not in table:
            continue
        with torch_profile(activities=activities) as prof:
            consume(table[mode][0]())
            synchronize(device)
        slug = mode.replace(" ", "_").replace("+", "_").replace(",", "").replace("=", "_")
        text = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35)]
        if device == "cuda":
            text.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
        (directory / f"profile-{slug}-rank{rank}.txt").write_text("\n\n".join(text))
    if device == "cuda":  # the copy to host alone, on tensors already exported
        from bridge_ext import export_hf_weights
        from bridge_ext.sync import to_host

        ready = _collect(export_hf_weights(chunks))
        for attempt in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            count, nbytes, _ = consume([to_host(iter(ready.items()))])
            elapsed = time.perf_counter() - start
        del ready
        whole = []  # the whole to-CPU export again, with neither profiler nor memory sampling
        for attempt in range(3):
            if dist.is_initialized():
                dist.barrier()
            torch.cuda.synchronize()
            started = time.perf_counter()
            consume([export_hf_weights(chunks, device="cpu")])
            whole.append(over_ranks(time.perf_counter() - started, device))
        with (directory / f"profile-to_host-rank{rank}.txt").open("w") as out:
            print(f"to_host over {count} exported tensors already on the GPU: {nbytes / 1e9:.2f} GB in "
                  f"{elapsed:.3f} s = {nbytes / elapsed / 1e9:.1f} GB/s", file=out)
            print(f"unmerged+adapters to CPU without profiler or memory sampling: {[round(t, 3) for t in whole]} s "
                  f"= {nbytes / min(whole) / 1e9:.1f} GB/s at best", file=out)


def report(results: dict, header: str) -> str:
    mib = 1 << 20
    lines = [header, "seconds: median over runs, slowest rank; memory: peak above the level before, MiB; "
             "n: tensors rank 0 received",
             f"{'mode':34} {'MB s':>8} {'MB GB/s':>8} {'MB RSS':>8} {'MB GPU':>8} {'MB n':>7} "
             f"{'ours s':>8} {'GB/s':>8} {'RSS':>8} {'GPU':>8} {'n':>7} {'speedup':>8}"]
    for name, (ours, theirs) in results.items():
        mb = (f"{theirs['seconds']:8.3f} {theirs['gbps']:8.2f} {theirs['peak_rss'] / mib:8.0f} "
              f"{theirs['peak_gpu'] / mib:8.0f} {theirs['tensors']:7d}") if theirs else " " * 43
        speedup = f"{theirs['seconds'] / ours['seconds']:7.1f}x" if theirs else ""
        lines.append(f"{name:34} {mb} {ours['seconds']:8.3f} {ours['gbps']:8.2f} {ours['peak_rss'] / mib:8.0f} "
                     f"{ours['peak_gpu'] / mib:8.0f} {ours['tensors']:7d} {speedup:>8}")
    for fp8, bf16 in (("merged fp8", "merged"), ("to-cpu merged fp8", "to-cpu merged"),
                      ("to-cpu base fp8", "to-cpu base")):
        if fp8 in results and bf16 in results:  # same parameters, so time ratios are rate ratios
            ratio = results[fp8][0]["seconds"] / results[bf16][0]["seconds"]
            lines.append(f"{fp8}: {ratio:.2f}x the time of ours {bf16} ({1 / ratio:.2f}x its parameters per second); "
                         f"peak extra GPU {results[fp8][0]['peak_gpu'] / mib:.0f} MiB vs "
                         f"{results[bf16][0]['peak_gpu'] / mib:.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE presets)")
    parser.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, as Qwen3-1.7B)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-dir", type=Path, help="the Hugging Face folder (made once, then reused; "
                        "default: <tmp>/bridge_ext_bench_<preset>)")
    parser.add_argument("--only", nargs="*", help="run only these modes")
    parser.add_argument("--mb-modes", nargs="*", help="time Megatron-Bridge in these modes only (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here (rank 0)")
    parser.add_argument("--check", action="store_true", help="also check correctness at this layout")
    parser.add_argument("--profile", type=Path, help="also profile one run of some modes into this folder")
    parser.add_argument("--profile-modes", nargs="*", default=["to-cpu unmerged+adapters", "adapters", "merged"],
                        help="the modes --profile runs")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where is it?
    if os.environ.get("BENCH_WATCHDOG_S"):  # a hung collective: print every stack, then exit
        faulthandler.dump_traceback_later(float(os.environ["BENCH_WATCHDOG_S"]), exit=True)

    sizes = dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                 virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep)
    torch.manual_seed(0)
    moe = family(args.preset) != "qwen3"
    with init_parallel(args.device, args.tp, args.pp, args.vpp, args.ep):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        hf_dir = hf_dir_for(args.preset, not args.untied, args.hf_dir)
        if rank == 0 and not (hf_dir / "config.json").is_file():
            write_hf_folder(hf_dir, args.preset, tied=not args.untied)
        if dist.is_initialized():
            dist.barrier()
        started = time.perf_counter()
        chunks, bridge = build(hf_dir, args.preset, args.device, sizes, args.lora_rank)
        built_in = time.perf_counter() - started
        mb_merged = mb_merges(args.preset, args.ep)
        checks = check(chunks, bridge, hf_dir, moe, mb_merges=mb_merged) if args.check else []
        bandwidth = copy_bandwidth(args.device)
        results = {}
        table = cases(chunks, bridge, args.device, world > 1, mb_merges=mb_merged)
        for name, (ours, theirs) in table.items():
            if args.only and name not in args.only:
                continue
            timed_theirs = theirs and (args.mb_modes is None or name in args.mb_modes)
            results[name] = (measure(name, ours, args.device, args.repeats),
                             measure(name, theirs, args.device, args.repeats) if timed_theirs else None)
        if args.profile:
            profile(chunks, args.device, args.profile, args.profile_modes, table)
        if rank == 0:
            params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
            largest = max((ours["largest"] for ours, _ in results.values()), default=0)
            header = (f"device={args.device} world={world} tp={args.tp} pp={args.pp} vpp={args.vpp} ep={args.ep} "
                      f"preset={args.preset} LoRA r{args.lora_rank}; rank 0 holds {params / 1e6:.0f}M parameters "
                      f"(built in {built_in:.0f} s); largest exported tensor {largest / 2**20:.0f} MiB; "
                      f"copy bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items()))
            print(report(results, header), *checks, sep="\n", flush=True)
            if args.json:
                args.json.write_text(json.dumps(dict(header=header, bandwidth=bandwidth, results=results,
                                                     checks=checks), indent=1))


if __name__ == "__main__":
    main()
