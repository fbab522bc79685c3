"""A whole weight sync, as an RL step does it: trainer export -> shared buffer -> inference model.

The trainer (a Megatron model with LoRA on the first GPU) exports in buckets; each bucket is
packed into one pre-allocated ``uint8`` buffer on the receiving device (the second GPU), with
metadata ``{name: (shape, dtype, offset)}`` — the transport RL frameworks use between a
trainer and an inference engine (there through CUDA IPC, here the second GPU of the same
process). The receiver, a transformers model wrapped by PEFT standing in for the inference
engine, applies each bucket's base weights at once and the adapter whole at the last bucket.
Weights of the MTP layer (transformers has none) go to a dict standing in for the engine's
draft model.

Timed from the first byte exported to the last weight applied (both devices synchronised):

* ours: ``export_hf_buckets`` -> buffer -> :class:`bridge_ext.sync.BucketReceiver`; the
  names arrive final, the receiver renames nothing;
* baseline: Megatron-Bridge's ``export_hf_weights(merge_adapter_weights=False)`` followed by
  ``export_adapter_weights``, the same buckets and buffer, then the receiver-side renaming RL
  frameworks carry today (:class:`BaselineRenamer`: strip ``.base_layer``, add PEFT's prefix,
  regroup per-expert base weights and adapters into the fused experts transformers and PEFT
  hold).

For a full sync (base + adapter) and an adapter-only sync (after the trainer's adapter
changed). After each checked sync, every synced tensor of the receiving model is compared
with the export (bit-exact) and the receiving model's logits with the Megatron model's.

    python benchmarks/sync_bench.py --device cpu --preset qwen35-moe-tiny        # smoke test
    python benchmarks/sync_bench.py --device cuda --preset qwen35-moe            # 2 GPUs
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import signal
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import bridge_ext  # noqa: F401  (first: makes megatron importable without Transformer Engine)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import PRESETS, build, hf_dir_for, init_parallel, write_hf_folder  # noqa: E402

from bridge_ext import export_hf_buckets, peft_adapter_config  # noqa: E402
from bridge_ext.engine import PEFT_PREFIX  # noqa: E402
from bridge_ext.export import Bucket, buckets  # noqa: E402
from bridge_ext.sync import BucketReceiver, load_into_module, load_into_peft  # noqa: E402

ALIGN = 256
DRAFT_PREFIX = "mtp."


# -- transport ---------------------------------------------------------------------------------
class SharedBuffer:
    """One pre-allocated byte buffer on the receiving device; a bucket is copied in, then read
    back as views by the metadata ``[(name, shape, dtype, offset)]``."""

    def __init__(self, capacity: int, device: torch.device):
        self.buffer = torch.empty(capacity, dtype=torch.uint8, device=device)

    def send(self, pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Size, torch.dtype, int]]:
        meta, offset = [], 0
        for name, tensor in pairs:
            meta.append((name, tensor.shape, tensor.dtype, offset))
            offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        if offset > self.buffer.numel():  # sized once (during the untimed first sync)
            self.buffer = torch.empty(offset, dtype=torch.uint8, device=self.buffer.device)
        for (_, tensor), (_, shape, dtype, start) in zip(pairs, meta):
            self._view(shape, dtype, start).copy_(tensor, non_blocking=True)
        return meta

    def receive(self, meta) -> list[tuple[str, torch.Tensor]]:
        return [(name, self._view(shape, dtype, offset)) for name, shape, dtype, offset in meta]

    def _view(self, shape, dtype: torch.dtype, offset: int) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)


# -- the receiving side ----------------------------------------------------------------------
class Receiver:
    """The inference stand-in: a transformers model wrapped by PEFT, and a draft-model dict."""

    def __init__(self, hf_dir: Path, chunks, device: torch.device, dtype: torch.dtype):
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(hf_dir))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.peft = get_peft_model(model.eval(), peft_adapter_config(chunks, base_model_name_or_path=str(hf_dir)))
        self.device = device
        self.draft: dict[str, torch.Tensor] = {}
        self._load_module = load_into_module(self.peft.get_base_model())
        self._load_adapter = load_into_peft(self.peft)

    def load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        main = [(name, tensor) for name, tensor in pairs if not name.startswith(DRAFT_PREFIX)]
        for name, tensor in pairs:
            if name.startswith(DRAFT_PREFIX):
                self.draft[name] = tensor.clone()
        self._load_module(main)

    def load_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        draft = PEFT_PREFIX + DRAFT_PREFIX
        self.draft.update({name: tensor for name, tensor in tensors.items() if name.startswith(draft)})
        self._load_adapter({name: tensor for name, tensor in tensors.items() if not name.startswith(draft)})


# -- the baseline's receiver-side renaming -------------------------------------------------------
_EXPERT = re.compile(r"^(?P<module>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
                     r"(?P<kind>weight|lora_A\.weight|lora_B\.weight)$")


class BaselineRenamer:
    """BASELINE (what RL frameworks write today on the receiving side of Megatron-Bridge's
    stream): strip ``.base_layer``, prefix adapter keys with PEFT's ``base_model.model.``, and
    regroup per-expert tensors into the fused experts of transformers (``gate_up_proj`` /
    ``down_proj`` ``[E, ...]``) and PEFT's 3-D expert LoRA (``lora_A`` expert-major, ``lora_B``
    rank-major), holding each layer's experts until all of them arrived. Experts of the draft
    (MTP) layers stay per expert, as the published checkpoints keep them."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._pending: dict[str, dict] = defaultdict(dict)

    def __call__(self, pairs: Iterable[tuple[str, torch.Tensor]], adapter: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in pairs:
            name = name.replace(".base_layer.", ".")
            found = _EXPERT.match(name)
            if found is None or name.startswith(DRAFT_PREFIX):
                yield (PEFT_PREFIX + name if adapter else name), (tensor.clone() if adapter else tensor)
                continue
            group = self._pending[found["module"] + found["kind"]]
            group[(int(found["e"]), found["proj"])] = tensor.clone()
            if len(group) == 3 * self.num_experts:
                del self._pending[found["module"] + found["kind"]]
                yield from self._fuse(found["module"], found["kind"], group)

    def _fuse(self, module: str, kind: str, group: dict) -> Iterator[tuple[str, torch.Tensor]]:
        experts = range(self.num_experts)
        if kind == "weight":
            yield f"{module}.gate_up_proj", torch.stack(
                [torch.cat([group[(e, "gate_proj")], group[(e, "up_proj")]]) for e in experts])
            yield f"{module}.down_proj", torch.stack([group[(e, "down_proj")] for e in experts])
            return
        # PEFT ParamWrapper: gate_up_proj is the inner wrapper (.base_layer.), down_proj the outer
        for infix, projs in ((".base_layer", ("gate_proj", "up_proj")), ("", ("down_proj",))):
            if kind == "lora_A.weight":  # gate and up share Megatron's one linear_fc1 A
                packed = torch.cat([group[(e, projs[0])] for e in experts])
            else:
                per_expert = [torch.cat([group[(e, proj)] for proj in projs]) for e in experts]
                packed = torch.stack(per_expert, dim=-1).flatten(1)
            yield f"{PEFT_PREFIX}{module}{infix}.{kind}", packed


def baseline_stream(bridge, chunks, renamer: BaselineRenamer, adapters_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    if not adapters_only:
        base = bridge.export_hf_weights(chunks, cpu=False, show_progress=False, merge_adapter_weights=False)
        yield from renamer(base, adapter=False)
    yield from renamer(bridge.export_adapter_weights(chunks, cpu=False, show_progress=False), adapter=True)


# -- one sync --------------------------------------------------------------------------------
def sync(stream: Iterable[Bucket], transport: SharedBuffer, receiver: Receiver) -> int:
    """Move every bucket through the buffer into the receiver; bytes moved."""
    apply = BucketReceiver(receiver.load_weights, receiver.load_adapter)
    moved = 0
    for bucket in stream:
        meta = transport.send(bucket.tensors)
        moved += bucket.nbytes
        apply(Bucket(transport.receive(meta), bucket.is_last))
    return moved


def synchronize(*devices: torch.device) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed(run: Callable[[], int], devices, repeats: int) -> dict:
    seconds = []
    for attempt in range(repeats + 1):
        gc.collect()  # no full collection of the models' many objects inside a timed run
        synchronize(*devices)
        start = time.perf_counter()
        moved = run()
        synchronize(*devices)
        if attempt:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return dict(seconds=median, runs=seconds, bytes=moved, gbps=moved / median / 1e9)


# -- checks ---------------------------------------------------------------------------------
def _held(receiver: Receiver) -> dict[str, torch.Tensor]:
    """The receiver's tensors under exported names: base weights without PEFT's ``.base_layer``
    wrappers, adapter factors without the adapter name."""
    held = {}
    for name, param in receiver.peft.named_parameters():
        name = name.removeprefix(PEFT_PREFIX)
        held[name.replace(".default", "") if ".lora_" in name else name.replace(".base_layer", "")] = param
    return held


@torch.no_grad()
def poison(receiver: Receiver, adapters_only: bool) -> None:
    """NaN into every tensor the next sync must write (so that the check sees it wrote them)."""
    receiver.draft.clear()
    for name, param in receiver.peft.named_parameters():
        if not adapters_only or ".lora_" in name:
            param.fill_(float("nan"))


@torch.no_grad()
def check_receiver(receiver: Receiver, chunks, input_ids: torch.Tensor, adapters_only: bool) -> str:
    """Every exported tensor equals the receiver's; the receiver's logits vs Megatron's."""
    from bridge_ext import export_hf_weights
    from bridge_ext_testing.forward import megatron_logits

    held = _held(receiver)
    equal = total = draft = 0
    for name, tensor in export_hf_weights(chunks, adapters_only=adapters_only):
        key = name.removeprefix(PEFT_PREFIX)
        if key.startswith(DRAFT_PREFIX):
            draft += 1
            continue
        mine = held.get(key)
        total += 1
        equal += mine is not None and torch.equal(mine, tensor.to(mine.device))
    unwritten = sum(int(param.isnan().any()) for param in receiver.peft.parameters())
    tensor_dtype = str(next(receiver.peft.parameters()).dtype).removeprefix("torch.")
    theirs = megatron_logits(chunks, input_ids).cpu()
    ours = receiver.peft(input_ids=input_ids.to(receiver.device)).logits.float().cpu()
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return (f"{equal}/{total} exported tensors bit-identical in the receiver, {unwritten} receiver tensors "
            f"left unwritten, {len(receiver.draft)} MTP tensors at the draft stand-in; logits vs Megatron "
            f"({tensor_dtype}): relative error {relative:.2e}, argmax agreement {agree:.3f}")


@torch.no_grad()
def training_step(chunks, seed: int) -> None:
    """Stand-in for an optimizer step: every LoRA factor changes."""
    generator = torch.Generator().manual_seed(seed)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".adapter." in name:
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.add_(noise, alpha=0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen35-moe-tiny")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--bucket-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="float32: the logits check then compares without bf16 rounding")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: where is it?
    if os.environ.get("BENCH_WATCHDOG_S"):  # a hung collective: print every stack, then exit
        faulthandler.dump_traceback_later(float(os.environ["BENCH_WATCHDOG_S"]), exit=True)

    trainer = torch.device("cuda:0") if args.device == "cuda" else torch.device("cpu")
    inference = torch.device("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0") if args.device == "cuda" \
        else torch.device("cpu")
    torch.manual_seed(0)
    with init_parallel(args.device):
        hf_dir = hf_dir_for(args.preset, True, args.hf_dir)
        if not (hf_dir / "config.json").is_file():
            write_hf_folder(hf_dir, args.preset)
        sizes = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                     virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1)
        dtype = getattr(torch, args.dtype)
        chunks, bridge = build(hf_dir, args.preset, args.device, sizes, args.lora_rank, dtype)
        receiver = Receiver(hf_dir, chunks, inference, dtype)
        config = receiver.peft.get_base_model().config
        renamer = BaselineRenamer(getattr(config, "num_experts", 0) or 0)
        bucket_bytes = args.bucket_mib << 20
        transport = SharedBuffer(bucket_bytes, inference)
        input_ids = torch.randint(0, min(config.vocab_size, 1000), (1, 24), generator=torch.Generator().manual_seed(1))
        devices = {trainer, inference}

        def ours(adapters_only: bool) -> Callable[[], int]:
            kwargs = dict(adapters_only=True) if adapters_only else {}
            return lambda: sync(export_hf_buckets(chunks, bucket_bytes, **kwargs), transport, receiver)

        def baseline(adapters_only: bool) -> Callable[[], int]:
            return lambda: sync(buckets(baseline_stream(bridge, chunks, renamer, adapters_only), bucket_bytes),
                                transport, receiver)

        lines, results = [], {}
        for what, adapters_only in (("full sync", False), ("adapter-only sync", True)):
            results[what] = (timed(ours(adapters_only), devices, args.repeats),
                             timed(baseline(adapters_only), devices, args.repeats))
            print(what, {label: round(result["seconds"], 4) for label, result in zip(("ours", "baseline"),
                                                                                   results[what])}, flush=True)
            for label, run in (("ours", ours(adapters_only)), ("baseline", baseline(adapters_only))):
                training_step(chunks, seed=len(lines))  # the trainer's adapter moved on
                poison(receiver, adapters_only)
                run()
                lines.append(f"check {what}, {label}: {check_receiver(receiver, chunks, input_ids, adapters_only)}")
        header = (f"weight sync: preset={args.preset} {args.dtype} LoRA r{args.lora_rank}, trainer {trainer} -> shared buffer "
                  f"on {inference} -> transformers + PEFT; {args.bucket_mib} MiB buckets; from first byte "
                  "exported to last weight applied, median of {} runs".format(args.repeats))
        table = [header, f"{'sync':22} {'baseline s':>11} {'GB/s':>7} {'ours s':>8} {'GB/s':>7} {'speedup':>8}"]
        for what, (mine, theirs) in results.items():
            table.append(f"{what:22} {theirs['seconds']:11.3f} {theirs['gbps']:7.2f} {mine['seconds']:8.3f} "
                         f"{mine['gbps']:7.2f} {theirs['seconds'] / mine['seconds']:7.1f}x")
        print(*table, *lines, sep="\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps(dict(header=header, results=results, checks=lines), indent=1))


if __name__ == "__main__":
    main()
