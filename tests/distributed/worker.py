"""One parallel layout's exports of a tiny model, for the layout tests (a torchrun script)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 worker.py \
        OUT_DIR HF_DIR [HF_DIR...] --tp 2 [--pp 2 --vpp 2 --ep 2 --etp 1] \
        [--megatron-bridge NAME...] [--forward NAME...] [--peft NAME=TYPE...]

Builds the Megatron model of ``HF_DIR`` with LoRA at the layout, gives every LoRA factor the
values of one global tensor drawn from a seed keyed on its global name (scattered to this
rank's shard the way Megatron lays shards out), and saves what this rank receives from every
export mode and destination (and the bytes it received), with the shapes of its first model
chunk's parameters, to ``OUT_DIR/<model>_<rank>.pt``; for the models ``--megatron-bridge`` names
also Megatron-Bridge's exports, for those ``--forward`` names the Megatron model's logits.
"""

from __future__ import annotations

import argparse
import re
import zlib
from contextlib import ExitStack, contextmanager
from unittest import mock

import bridge_ext  # noqa: F401  (first: makes megatron importable without TE)
import torch

from bridge_ext.distributed import DESTINATIONS

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj", "linear_q_proj",
                "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
# --peft: the Megatron-Bridge PEFT type of every model of the run (DoRA on column-parallel
# linears only: on a row-parallel one at TP > 1 its norm is per rank, which the export refuses)
PEFT_TYPES = {
    "lora": dict(target_modules=LORA_TARGETS),
    "dora": dict(kind="dora", target_modules=("linear_qkv", "linear_fc1")),
    "canonical_lora": dict(kind="canonical_lora", target_modules=()),  # its own default targets
    "normalize_moe_lora": dict(target_modules=LORA_TARGETS, options=(("normalize_moe_lora", True),)),
}
MODES = {  # mode -> export_hf_weights keyword arguments
    "peft": dict(peft=True),
    "merged": dict(peft=False),
    "adapters": dict(adapters_only=True),
    "per_expert": dict(peft=True, expert_adapter_layout="per_expert"),  # base in the source's expert layout
}


@contextmanager
def cpu_parallel_build(sizes: dict[str, int | None]):
    """What building a parallel model on CPU needs that ``build_megatron_model`` does not give.

    * the provider gets the parallel sizes (the layer split per pipeline stage reads them);
    * ``torch.cuda.current_device`` answers (Megatron-Bridge's TP weight loading asks);
    * the duplicate embedding of the MTP / last stage is synchronised with ``.cuda()``
      (language_module.py): on CPU the tensor stays where it is.
    """
    from megatron.bridge import AutoBridge

    from bridge_ext_testing.qwen35 import cpu_current_device

    to_provider = AutoBridge.to_megatron_provider

    def sized_provider(self, *args, **kwargs):
        provider = to_provider(self, *args, **kwargs)
        for key, value in sizes.items():
            setattr(provider, key, value)
        return provider

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(AutoBridge, "to_megatron_provider", sized_provider))
        stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self))
        stack.enter_context(cpu_current_device())
        yield


def shard_of_global(rule, full: torch.Tensor, shards: int, shard: int, dims, *,
                    lora_b: bool, axis: int) -> torch.Tensor:
    """This rank's shard of a global LoRA factor: the inverse of the engine's gather.

    ``lora_B`` rows follow the base weight's per-rank layout (its ``per_rank`` row ops);
    ``lora_A`` is cut plainly along ``axis``.
    """
    per_rank = [op for op in rule.ops if op.per_rank] if lora_b else []
    parts = [full]
    for op in per_rank:
        parts = op.forward(parts, dims)
    parts = [part.chunk(shards, dim=axis)[shard] for part in parts]
    for op in reversed(per_rank):
        parts = op.reverse(parts, dims)
    (tensor,) = parts
    return tensor


CANONICAL_FACTOR = re.compile(r"^(?P<module>.+)\.adapter\.adapter_[a-z]+\.linear_(?P<factor>in|out)\.weight$")


@torch.no_grad()
def set_global_lora(chunks, config, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA factor the values of a global tensor keyed on its global name."""
    from bridge_ext.expert_layouts import ExpertLayouts
    from bridge_ext.live import DORA_MAGNITUDE, LORA_IN, LORA_OUT, is_parallel_job, local_tensors
    from bridge_ext.tables import table_for

    table = table_for(config)
    dims = table.dims(config)
    tensors, _ = local_tensors(chunks, sharded=is_parallel_job())
    for local in tensors:
        canonical = CANONICAL_FACTOR.match(local.name)  # one part's pair: cut plainly, like a whole linear's
        if canonical is not None:
            module, lora_b = canonical["module"], canonical["factor"] == "out"
        else:
            suffix = next((s for s in (LORA_IN, LORA_OUT, DORA_MAGNITUDE) if local.name.endswith(s)), None)
            if suffix is None:
                continue
            module, lora_b = local.name[: -len(suffix)], suffix != LORA_IN  # a magnitude follows B's rows
        rule = table.match(module + ".weight", ExpertLayouts().base_variants(table)).rule
        axis = 1 if not lora_b and rule.tp == "row" else 0
        shape = list(local.tensor.shape)
        shape[axis] *= local.shards
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(local.name.encode()))
        full = torch.randn(shape, generator=generator, dtype=torch.float32).to(local.tensor.dtype) * std
        if local.name.endswith(DORA_MAGNITUDE):  # positive, away from the base rows' norms
            full = (full.abs() / std + 0.5).unsqueeze(1)
            shard = shard_of_global(rule, full, local.shards, local.shard, dims, lora_b=True, axis=0).squeeze(1)
        elif canonical is not None:
            shard = full.chunk(local.shards, dim=axis)[local.shard]
        else:
            shard = shard_of_global(rule, full, local.shards, local.shard, dims, lora_b=lora_b, axis=axis)
        local.tensor.copy_(shard)


def export_all(chunks, moe: bool, dora: bool = False) -> tuple[dict, dict]:
    """What this rank receives from every mode and destination, and the bytes it received."""
    from bridge_ext import export_hf_weights
    from bridge_ext.distributed import ShardExchange

    results, received = {}, {}
    exchanges = set()
    convert_tasks = ShardExchange.convert_tasks

    def recording(self, *args):
        exchanges.add(self)
        return convert_tasks(self, *args)

    def received_so_far() -> int:
        return sum(exchange.received_bytes for exchange in exchanges)

    with mock.patch.object(ShardExchange, "convert_tasks", recording):
        for mode, kwargs in MODES.items():
            if mode == "per_expert" and not moe:
                continue
            for destination in DESTINATIONS:
                before = received_so_far()
                extra = dict(dora_adapters=True) if dora and mode != "merged" else {}  # PEFT loads them
                pairs = export_hf_weights(chunks, destination=destination, **kwargs, **extra)
                results[f"{mode}/{destination}"] = {name: tensor.clone() for name, tensor in pairs}
                received[f"{mode}/{destination}"] = received_so_far() - before
    return results, received


def megatron_bridge_exports(built) -> dict:
    """Megatron-Bridge's merged and adapter exports at this layout (every rank gets all)."""
    from bridge_ext.engine import PEFT_PREFIX

    merged = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    adapters = built.bridge.export_adapter_weights(built.chunks, cpu=True, show_progress=False)
    return {"merged": merged, "adapters": {PEFT_PREFIX + name: tensor for name, tensor in adapters}}


# The routed experts' linear_fc2 LoRA B (Megatron-Bridge 0.6.2's forward of that LoRA at expert-TP > 1
# is not base + scale * B @ A; see test_layouts.py).
EXPERT_FC2_LORA_B = re.compile(r"\.mlp\.experts\..*linear_fc2\.adapter\.linear_out\.weight$")


@torch.no_grad()
def megatron_forward(chunks) -> dict:
    """The Megatron model's own logits at this layout for fixed tokens: with all its LoRA, then
    with the routed experts' linear_fc2 LoRA B zeroed (changes the model: call it last)."""
    from bridge_ext_testing.forward import megatron_logits

    input_ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    result = {"input_ids": input_ids, "all_lora": megatron_logits(chunks, input_ids)}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if EXPERT_FC2_LORA_B.search(name):
                param.zero_()
    result["without_expert_fc2_lora"] = megatron_logits(chunks, input_ids)
    return result


def save_from_every_rank(chunks, folder) -> dict:
    """save_hf_pretrained called by every rank: rank 0 alone writes; it reads the folders back."""
    from safetensors.torch import load_file

    from bridge_ext import save_hf_pretrained

    result = save_hf_pretrained(chunks, folder / "model", folder / "adapter")
    torch.distributed.barrier()
    if torch.distributed.get_rank() != 0:
        return {"written": result.tensors, "exists": folder.exists()}
    tensors = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    tensors.update(load_file(str(folder / "adapter" / "adapter_model.safetensors")))
    return {"written": result.tensors, "tensors": tensors}


def save_checkpoints(built, folder) -> None:
    """The model with its LoRA as a full and as an adapter-only torch_dist checkpoint."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "checkpoint"))
    import ckpt_factory

    with ckpt_factory.cpu_stand_ins():
        ckpt_factory.save_variant(built, folder / "lora")
        ckpt_factory.save_variant(built, folder / "adapter", adapter_only=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="output folder: <model folder name>_<rank>.pt per model")
    parser.add_argument("hf_dirs", nargs="+")
    for flag in ("tp", "pp", "ep"):
        parser.add_argument(f"--{flag}", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--megatron-bridge", nargs="*", default=(), metavar="MODEL",
                        help="also save Megatron-Bridge's exports of these models (HF folder names)")
    parser.add_argument("--forward", nargs="*", default=(), metavar="MODEL",
                        help="also save the Megatron forward's logits of these models (HF folder names)")
    parser.add_argument("--step-bytes", type=int, default=None,
                        help="the shard exchange's step size (small: large-tensor paths on tiny models)")
    parser.add_argument("--peft", nargs="*", default=(), metavar="MODEL=TYPE",
                        help="the PEFT type (PEFT_TYPES) of these models (HF folder names); others: lora")
    parser.add_argument("--checkpoints", action="store_true",
                        help="also save torch_dist checkpoints OUT/<model>_ckpt/{lora,adapter} (for convert)")
    args = parser.parse_args()

    from pathlib import Path

    from transformers import AutoConfig

    from bridge_ext_testing.build import LoraSettings, build_megatron_model
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext.tables import table_for

    torch.set_num_threads(1)
    if args.step_bytes:
        import bridge_ext.distributed

        bridge_ext.distributed.STEP_BYTES = args.step_bytes
    sizes = dict(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                 virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep,
                 expert_tensor_parallel_size=args.etp or args.tp)
    peft_types = dict(item.split("=", 1) for item in args.peft)
    with megatron_parallel(args.tp, args.pp, args.vpp, args.ep, args.etp):
        rank = torch.distributed.get_rank()
        for hf_dir in map(Path, args.hf_dirs):
            with cpu_parallel_build(sizes):
                peft = peft_types.get(hf_dir.name, "lora")
                built = build_megatron_model(hf_dir, lora=LoraSettings(**PEFT_TYPES[peft]))
            config = AutoConfig.from_pretrained(hf_dir)
            set_global_lora(built.chunks, config)
            # the per-expert modes apply where the table has per-expert expert rules (not gpt-oss)
            moe = any((rule.variant or "").endswith(":per_expert") for rule in table_for(config).rules)
            results, received = export_all(built.chunks, moe, dora=peft == "dora")
            saved = {"results": results, "received_bytes": received,
                     "shapes": {name: tuple(p.shape) for name, p in built.chunks[0].named_parameters()},
                     "save": save_from_every_rank(built.chunks, Path(args.out) / f"{hf_dir.name}_saved")}
            if args.checkpoints:
                save_checkpoints(built, Path(args.out) / f"{hf_dir.name}_ckpt")
            if hf_dir.name in args.megatron_bridge:
                with cpu_parallel_build(sizes):
                    saved["megatron_bridge"] = megatron_bridge_exports(built)
            if hf_dir.name in args.forward:
                saved["megatron_forward"] = megatron_forward(built.chunks)
            torch.save(saved, Path(args.out) / f"{hf_dir.name}_{rank}.pt")


if __name__ == "__main__":
    main()
