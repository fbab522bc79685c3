"""The block-FP8 stage alone on a GPU: a Qwen3-MoE-shaped tensor stream, bf16, through bridge_ext.fp8.

Needs only torch (no megatron): the stream is made of random bf16 tensors with the names and
shapes, in the order, that ``export_hf_weights`` yields for Qwen3-30B-A3B widths (hidden 2048,
32/4 heads of 128, 128 experts of 768, per-expert layout) with ``--layers`` layers; embeddings
and lm_head left out. In the same run it times:

* ``clone``: a clone of every tensor (the device's floor for touching every byte);
* ``to host bf16``: the bf16 stream into pinned host memory (``bridge_ext.sync.to_host``);
* ``per-tensor fp8``: ``quantize_blocks`` tensor by tensor (plain torch, launch-bound);
* ``fp8 stream``: ``Fp8Plan.quantize``'s grouping (``quantize_runs``), what the export runs;
* ``fp8 stream to host``: the same, then into pinned host memory;

and checks the GPU's FP8 bytes and scales against the CPU's for a few tensors, bit for bit.

    python benchmarks/fp8_quantize_bench.py --layers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from bridge_ext.fp8 import quantize_blocks, quantize_runs
from bridge_ext.fp8_export import scale_name
from bridge_ext.sync import to_host

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MOE_INTER = 2048, 32, 4, 128, 768


def tensor_set(layers: int, experts: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, quantized) in export order."""
    out = []
    for layer in range(layers):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (HIDDEN,), False),
                (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), True),
                (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), True),
                (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), True),
                (p + "self_attn.q_norm.weight", (HEAD_DIM,), False),
                (p + "self_attn.k_norm.weight", (HEAD_DIM,), False),
                (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), True),
                (p + "post_attention_layernorm.weight", (HIDDEN,), False),
                (p + "mlp.gate.weight", (experts, HIDDEN), False)]
        for e in range(experts):
            out += [(p + f"mlp.experts.{e}.gate_proj.weight", (MOE_INTER, HIDDEN), True),
                    (p + f"mlp.experts.{e}.up_proj.weight", (MOE_INTER, HIDDEN), True)]
        out += [(p + f"mlp.experts.{e}.down_proj.weight", (HIDDEN, MOE_INTER), True) for e in range(experts)]
    return out


def timed(run: Callable[[], Iterable], repeats: int, cuda: bool) -> dict:
    def once() -> tuple[float, int, int, int]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        count = nbytes = 0
        for _, tensor in run():
            count += 1
            nbytes += tensor.numel() * tensor.element_size()
            del tensor
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, count, nbytes, (torch.cuda.max_memory_allocated() - base) if cuda else 0

    once()
    runs = [once() for _ in range(repeats)]
    seconds = statistics.median(r[0] for r in runs)
    return dict(seconds=seconds, tensors=runs[0][1], bytes=runs[0][2], peak_gpu=max(r[3] for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of the script")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = tensor_set(args.layers, args.experts)
    cuda = args.device == "cuda"
    tensors = [(name, torch.randn(shape, device=args.device, dtype=torch.bfloat16) * 0.02) for name, shape, _ in spec]
    quantized = {name for name, _, q in spec if q}
    parts = {name: 1 for name in quantized}
    stream = lambda: iter(tensors)  # noqa: E731
    cases = {
        "clone": lambda: ((n, t.clone()) for n, t in stream()),
        "to host bf16": lambda: to_host(stream()),
        "per-tensor fp8": lambda: (pair for n, t in stream() for pair in (
            [(n, t)] if n not in quantized else zip((n, scale_name(n)), quantize_blocks(t)))),
        "fp8 stream": lambda: quantize_runs(stream(), parts.get, scale_name),
        "fp8 stream to host": lambda: to_host(quantize_runs(stream(), parts.get, scale_name)),
    }
    results = {name: timed(run, args.repeats, cuda) for name, run in cases.items()}
    checks = []
    for name, tensor in tensors[:8] + tensors[-2:]:
        if name in quantized:
            gpu_q, gpu_s = quantize_blocks(tensor)
            cpu_q, cpu_s = quantize_blocks(tensor.cpu())
            checks.append(torch.equal(gpu_q.cpu().view(torch.uint8), cpu_q.view(torch.uint8))
                          and torch.equal(gpu_s.cpu(), cpu_s))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    lines = [f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}: {len(tensors)} tensors "
             f"({len(quantized)} quantized), {total / 1e9:.2f} GB bf16, {args.layers} layers of Qwen3-30B-A3B widths, "
             f"{args.experts} experts",
             f"{'mode':22} {'ms':>9} {'GB/s out':>9} {'x clone':>8} {'peak GPU MiB':>13} {'tensors':>8}"]
    clone = results["clone"]["seconds"]
    for name, r in results.items():
        lines.append(f"{name:22} {r['seconds'] * 1e3:9.1f} {r['bytes'] / r['seconds'] / 1e9:9.1f} "
                     f"{r['seconds'] / clone:8.2f} {r['peak_gpu'] / 2**20:13.0f} {r['tensors']:8d}")
    ratio = results["to host bf16"]["seconds"] / results["fp8 stream to host"]["seconds"]
    lines.append(f"fp8 to host: {ratio:.2f}x the parameters per second of bf16 to host; "
                 f"GPU FP8 bit-exact with the CPU's on {sum(checks)}/{len(checks)} tensors")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(dict(lines=lines, results=results, checks=checks), indent=1))


if __name__ == "__main__":
    main()
