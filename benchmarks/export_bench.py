"""bridge_ext vs Megatron-Bridge: export time, throughput and peak memory on one model.

One command builds one Qwen3-shaped model with LoRA (random weights written as a Hugging Face
folder, loaded by Megatron-Bridge) and times, in the same run and on the same model:

* ``merged``: ``export_hf_weights`` with LoRA merged (MB: ``merge_adapter_weights=True``);
* ``unmerged+adapters``: base weights and adapters (MB: ``export_hf_weights(
  merge_adapter_weights=False)`` then ``export_adapter_weights``; ours: one ``peft=True`` stream);
* ``adapters``: adapters only (the per-step sync; MB: ``export_adapter_weights``);
* ``to-cpu``: base + adapters into CPU memory (GPU only; MB ``cpu=True``, ours ``device="cpu"``);
* ours with ``destination="rank0"`` / ``"owner"`` in parallel runs (MB has no such choice).

Each is run once to warm up, then ``--repeats`` times; the median is reported with the
throughput (GB/s of exported tensors received by rank 0), the peak extra process memory (RSS
above what the process held before) and on GPU the peak extra GPU memory. The consumer drops
each tensor after counting it. The machine's copy bandwidth (a large tensor clone; on GPU also
a device-to-pinned-host copy) is printed as the physical ceiling.

    python benchmarks/export_bench.py                                   # CPU, one process
    torchrun --nproc-per-node 2 benchmarks/export_bench.py --tp 2       # CPU, gloo
    torchrun --nproc-per-node 2 benchmarks/export_bench.py --device cuda --pp 2 --preset qwen3-1.7b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import bridge_ext  # noqa: F401  (first: makes megatron importable without Transformer Engine)
import torch
import torch.distributed as dist

PRESETS = {  # Qwen3 shapes: hidden, intermediate, layers, heads, kv heads, head dim, vocab
    "small": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64, vocab_size=32768),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
}


# -- model ------------------------------------------------------------------------------
def write_random_hf_folder(directory: Path, preset: str, tied: bool) -> Path:
    """A Qwen3 Hugging Face folder with random bf16 weights (names and shapes from transformers)."""
    from transformers import Qwen3Config

    from bridge_ext.hf_folder import ShardedSafetensorsWriter
    from bridge_ext.hf_keys import hf_checkpoint_keys

    config = Qwen3Config(**PRESETS[preset], tie_word_embeddings=tied, dtype="bfloat16",
                         architectures=["Qwen3ForCausalLM"])
    generator = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(directory, 2 << 30)
    for name, shape in hf_checkpoint_keys(config).items():
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    return directory


def build(hf_dir: Path, device: str, sizes: dict, lora_rank: int) -> tuple[list, object]:
    """The Megatron model (local layer spec, bf16, on ``device``) with Megatron-Bridge LoRA."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.peft.lora import LoRA
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from bridge_ext.cpu.qwen35 import cpu_current_device

    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.transformer_layer_spec = get_gpt_layer_local_spec(qk_layernorm=True)
    provider.apply_rope_fusion = provider.persist_layer_norm = provider.gradient_accumulation_fusion = False
    provider.params_dtype, provider.bf16 = torch.bfloat16, True
    for key, value in sizes.items():
        setattr(provider, key, value)
    lora = LoRA(dim=lora_rank, alpha=2 * lora_rank)
    provider.register_pre_wrap_hook(lambda chunks: lora(chunks, training=True))
    provider.finalize()
    # On CPU: Megatron-Bridge's TP loading asks torch.cuda.current_device(); the last pipeline
    # stage's copy of tied embeddings is synchronised through .cuda().
    on_cpu = mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self) if device == "cpu" else nullcontext()
    with cpu_current_device(), on_cpu:
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=device == "cpu")
        bridge.load_hf_weights(chunks)
    with torch.no_grad():  # LoRA B starts at zero: make merges real
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if name.endswith("linear_out.weight"):
                    param.normal_(std=0.01)
    return list(chunks), bridge


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


def consume(streams: Iterable[Iterable[tuple[str, torch.Tensor]]]) -> tuple[int, int]:
    """Iterate every stream to its end, dropping tensors; (tensors, bytes) received."""
    count = nbytes = 0
    for pairs in streams:
        for _, tensor in pairs:
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
    return count, nbytes


def measure(name: str, run: Callable[[], Iterable], device: str, repeats: int) -> dict:
    """Median seconds (slowest rank), exported bytes, peak extra RSS / GPU memory (this rank)."""
    seconds, rss, gpu = [], [], []
    for attempt in range(repeats + 1):
        if dist.is_initialized():
            dist.barrier()
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            gpu_base = torch.cuda.memory_allocated()
        with PeakRss() as peak:
            start = time.perf_counter()
            count, nbytes = consume(run())
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
                peak_rss=max(rss), peak_gpu=max(gpu))


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> dict:
    """GB/s of cloning a large tensor (and on GPU, of copying it to pinned host memory)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    result = {}
    targets = {"clone": lambda: source.clone()}
    if device == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        targets["to_pinned_host"] = lambda: host.copy_(source, non_blocking=True)
    for what, copy in targets.items():
        copy()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            copy()
        synchronize(device)
        result[what] = 3 * nbytes / (time.perf_counter() - start) / 1e9
    return result


# -- the comparisons ------------------------------------------------------------------------
def cases(chunks, bridge, device: str, parallel: bool) -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (ours, Megatron-Bridge's) stream factories (each returns a list of streams)."""
    from bridge_ext import export_hf_buckets, export_hf_weights

    def mb_unmerged(cpu: bool):
        return lambda: [bridge.export_hf_weights(chunks, cpu=cpu, show_progress=False, merge_adapter_weights=False),
                        bridge.export_adapter_weights(chunks, cpu=cpu, show_progress=False)]

    table = {
        "merged": (lambda: [export_hf_weights(chunks, peft=False)],
                   lambda: [bridge.export_hf_weights(chunks, cpu=False, show_progress=False)]),
        "unmerged+adapters": (lambda: [export_hf_weights(chunks)], mb_unmerged(False)),
        "adapters": (lambda: [export_hf_weights(chunks, adapters_only=True)],
                     lambda: [bridge.export_adapter_weights(chunks, cpu=False, show_progress=False)]),
    }
    if device == "cuda":
        table["to-cpu unmerged+adapters"] = (lambda: [export_hf_weights(chunks, device="cpu")], mb_unmerged(True))
    table["merged, 256 MiB buckets"] = (
        lambda: [(pair for bucket in export_hf_buckets(chunks, 256 << 20, peft=False) for pair in bucket.tensors)],
        None)
    if parallel:
        for destination in ("rank0", "owner"):
            for mode, kwargs in (("merged", dict(peft=False)), ("adapters", dict(adapters_only=True))):
                table[f"{mode}, destination={destination}"] = (
                    lambda kwargs=kwargs, destination=destination: [
                        export_hf_weights(chunks, destination=destination, **kwargs)],
                    None)
    return table


def _on_cpu(pairs: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in pairs}


def _compare(ours: dict, theirs: dict) -> str:
    shared = [name for name in ours if name in theirs]
    identical = sum(torch.equal(ours[name], theirs[name]) for name in shared)
    worst = max(((ours[n].float() - theirs[n].float()).abs().max().item() for n in shared), default=0.0)
    names = "equal" if sorted(ours) == sorted(theirs) else f"DIFFER ({len(set(ours) ^ set(theirs))})"
    return f"names {names}, {identical}/{len(ours)} bit-identical, max |diff| {worst:.3g}"


def check(chunks, bridge, hf_dir: Path) -> list[str]:
    """Correctness at this layout (rank 0 reports): base weights vs the Hugging Face files,
    merged and adapters vs Megatron-Bridge, destinations ``rank0`` / ``owner`` vs ``all``."""
    from safetensors.torch import load_file

    from bridge_ext import export_hf_weights
    from bridge_ext.engine import PEFT_PREFIX

    rank = dist.get_rank() if dist.is_initialized() else 0
    files = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        files.update(load_file(str(path)))
    base = {n: t for n, t in _on_cpu(export_hf_weights(chunks)).items() if not n.startswith(PEFT_PREFIX)}
    merged = _on_cpu(export_hf_weights(chunks, peft=False))
    mb_merged = _on_cpu(bridge.export_hf_weights(chunks, cpu=True, show_progress=False))
    adapters = {name.removeprefix(PEFT_PREFIX): tensor
                for name, tensor in _on_cpu(export_hf_weights(chunks, adapters_only=True)).items()}
    mb_adapters = _on_cpu(bridge.export_adapter_weights(chunks, cpu=True, show_progress=False))
    rank0 = _on_cpu(export_hf_weights(chunks, peft=False, destination="rank0"))
    owned = [name for name, _ in export_hf_weights(chunks, peft=False, destination="owner")]
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [owned]
    if dist.is_initialized():
        dist.all_gather_object(gathered, owned)
    union = [name for names in gathered for name in names]
    lines = [f"check base vs Hugging Face files: {_compare(base, files)}",
             f"check merged vs Megatron-Bridge: {_compare(merged, mb_merged)}",
             f"check adapters vs Megatron-Bridge: {_compare(adapters, mb_adapters)}",
             f"check destination=rank0 vs all: {_compare(rank0, merged) if rank == 0 else ''}",
             f"check destination=owner: {len(union)} tensors over the ranks, {len(set(union))} distinct, "
             f"{'the same names as all' if set(union) == set(merged) else 'NAMES DIFFER FROM all'}"]
    return lines


def init_parallel(device: str, sizes: dict):
    """torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's parallel state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    from bridge_ext.cpu.distributed import megatron_parallel

    parallel = dict(tensor_parallel=sizes["tensor_model_parallel_size"],
                    pipeline_parallel=sizes["pipeline_model_parallel_size"],
                    virtual_pipeline=sizes["virtual_pipeline_model_parallel_size"],
                    expert_parallel=1, expert_tensor_parallel=None)
    if device == "cpu":
        return megatron_parallel(**parallel)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=int(os.environ.get("RANK", "0")),
                            world_size=int(os.environ.get("WORLD_SIZE", "1")))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel["tensor_parallel"],
        pipeline_model_parallel_size=parallel["pipeline_parallel"],
        virtual_pipeline_model_parallel_size=parallel["virtual_pipeline"])
    megatron_random.model_parallel_cuda_manual_seed(0)
    return nullcontext()


def report(results: dict, header: str) -> str:
    mib = 1 << 20
    lines = [header, "seconds: median over runs, slowest rank; memory: peak above the level before, MiB",
             f"{'mode':34} {'MB s':>8} {'MB GB/s':>8} {'MB RSS':>8} {'MB GPU':>8} "
             f"{'ours s':>8} {'GB/s':>8} {'RSS':>8} {'GPU':>8} {'speedup':>8}"]
    for name, (ours, theirs) in results.items():
        mb = (f"{theirs['seconds']:8.3f} {theirs['gbps']:8.2f} {theirs['peak_rss'] / mib:8.0f} "
              f"{theirs['peak_gpu'] / mib:8.0f}") if theirs else " " * 35
        speedup = f"{theirs['seconds'] / ours['seconds']:7.1f}x" if theirs else ""
        lines.append(f"{name:34} {mb} {ours['seconds']:8.3f} {ours['gbps']:8.2f} {ours['peak_rss'] / mib:8.0f} "
                     f"{ours['peak_gpu'] / mib:8.0f} {speedup:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, as Qwen3-1.7B)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-dir", type=Path, help="the random Hugging Face folder (made once, then reused; "
                        "default: <tmp>/bridge_ext_bench_<preset>)")
    parser.add_argument("--only", nargs="*", help="run only these modes")
    parser.add_argument("--json", type=Path, help="also write the results here (rank 0)")
    parser.add_argument("--check", action="store_true", help="also check correctness at this layout")
    args = parser.parse_args()

    sizes = dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                 virtual_pipeline_model_parallel_size=args.vpp)
    torch.manual_seed(0)
    with init_parallel(args.device, sizes):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        hf_dir = args.hf_dir or Path(tempfile.gettempdir()) / f"bridge_ext_bench_{args.preset}{'_untied' * args.untied}"
        if rank == 0 and not (hf_dir / "config.json").is_file():
            write_random_hf_folder(hf_dir, args.preset, tied=not args.untied)
        if dist.is_initialized():
            dist.barrier()
        chunks, bridge = build(hf_dir, args.device, sizes, args.lora_rank)
        checks = check(chunks, bridge, hf_dir) if args.check else []
        bandwidth = copy_bandwidth(args.device)
        results = {}
        for name, (ours, theirs) in cases(chunks, bridge, args.device, world > 1).items():
            if args.only and name not in args.only:
                continue
            results[name] = (measure(name, ours, args.device, args.repeats),
                             measure(name, theirs, args.device, args.repeats) if theirs else None)
        if rank == 0:
            params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
            header = (f"device={args.device} world={world} tp={args.tp} pp={args.pp} vpp={args.vpp} "
                      f"preset={args.preset} LoRA r{args.lora_rank}; rank 0 holds {params / 1e6:.0f}M parameters; "
                      f"copy bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items()))
            print(report(results, header), *checks, sep="\n", flush=True)
            if args.json:
                args.json.write_text(json.dumps(dict(header=header, bandwidth=bandwidth, results=results,
                                                     checks=checks), indent=1))


if __name__ == "__main__":
    main()
