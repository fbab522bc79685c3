"""Write real megatron-core checkpoints of tiny Qwen3.5 models for the convert tests.

Used in-process (TP=1) and as a torchrun script (TP=2)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 qwen35_factory.py HF_DIR OUT_DIR

``HF_DIR`` is a tiny model of :func:`tiny_model`. Writes ``OUT/lora`` (the LoRA model, everything)
and ``OUT/adapter`` (adapters only, as Megatron-Bridge saves PEFT runs) with :mod:`ckpt_factory`,
and ``OUT/logits.pt``: the saved model's own forward (at the saving TP) on :data:`INPUT_IDS`, the
reference for what the converted folders compute (for :data:`NO_MEGATRON_FORWARD` types,
transformers' forward of the live merged export at the saving TP); at TP=1 also ``OUT/live_model`` and
``OUT/live_adapter``, the live-model export of the same weights. LoRA covers every projection kind:
attention, Gated DeltaNet, dense and expert MLPs, MTP.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ckpt_factory  # noqa: E402

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj",
           "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")  # (MLA)
LORA_SEED = 5
INPUT_IDS = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_model(kind: str, directory: Path) -> Path:
    from bridge_ext_testing import tiny_models

    makers = {
        "qwen3_5_moe_text": lambda d: tiny_models.tiny_qwen35_moe(d, mtp_layers=1),
        "qwen3_5": lambda d: tiny_models.tiny_qwen35_vl(d, moe=False, mtp_layers=1),
    }
    return makers[kind](directory)


# Megatron cannot run these forward on CPU (Mamba mixers need mamba_ssm's CUDA kernels): their
# reference logits are transformers' forward of the live merged export at the saving TP instead
NO_MEGATRON_FORWARD = ("nemotron_h",)
# LoRA targets left out per model type: Mamba's out_proj (PEFT refuses LoRA there) and in_proj
# (saving its adapter, Megatron-Bridge 0.6.2's adapter_wrapper reads the Transformer Engine
# linear's tp_size, which megatron-core's local ColumnParallelLinear has not)
LEFT_OUT = {"nemotron_h": ("out_proj", "in_proj")}


def _model_type(hf_dir: Path) -> str:
    import json

    return json.loads((Path(hf_dir) / "config.json").read_text())["model_type"]


def build(hf_dir: Path, *, routed_expert_lora: bool = True):
    """The LoRA model with random non-zero adapters (call inside megatron_parallel)."""
    from bridge_ext_testing.build import LoraSettings, build_megatron_model

    refused = LEFT_OUT.get(_model_type(hf_dir), ())
    targets = tuple(target for target in TARGETS if target not in refused)
    with ckpt_factory.cpu_stand_ins():
        built = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=targets))
    randomize_adapters(built.chunks[0], routed_expert_lora)
    return built


def randomize_adapters(chunk: torch.nn.Module, routed_expert_lora: bool) -> None:
    """Random adapters: tensor-parallel shards differ between ranks, replicated ones agree.

    (Equal shards on every rank could hide a rank-order mistake; unequal replicas would make the
    live model disagree with its own checkpoint, which stores one replica.) Without
    ``routed_expert_lora`` the routed experts' ``B`` stay zero: at TP=2 on CPU, Megatron-Bridge's
    forward through routed-expert LoRA disagrees with megatron-core's own reload of the
    checkpoint it saves (see test_convert_qwen35.py), so it cannot serve as the reference there.
    """
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for number, (name, param) in enumerate(chunk.named_parameters()):
            if ".adapter." in name:
                if not routed_expert_lora and ".local_experts." in name and "linear_out" in name:
                    param.zero_()
                    continue
                sharded = getattr(param, "tensor_model_parallel", False)
                generator = torch.Generator().manual_seed(LORA_SEED * 1000 + number + (100000 * rank if sharded else 0))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def save_all(hf_dir: Path, out: Path, *, tensor_parallel: int) -> None:
    """Save ``out/lora``, ``out/adapter`` and ``out/logits.pt``; at TP=1 also the live export."""
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext_testing.forward import megatron_logits

    with megatron_parallel(tensor_parallel=tensor_parallel):
        built = build(hf_dir, routed_expert_lora=tensor_parallel == 1)
        ckpt_factory.save_variant(built, out / "lora")
        ckpt_factory.save_variant(built, out / "adapter", adapter_only=True)
        if _model_type(hf_dir) in NO_MEGATRON_FORWARD:
            from bridge_ext import save_hf_pretrained
            from bridge_ext.verify import hf_logits, load_hf_model

            save_hf_pretrained(built.chunks, out / "reference_merged", merge=True)
            torch.distributed.barrier()
            logits = hf_logits(load_hf_model(out / "reference_merged"), INPUT_IDS)
        else:
            with ckpt_factory.cpu_stand_ins():
                logits = megatron_logits(built.chunks, INPUT_IDS)
        if torch.distributed.get_rank() == 0:
            torch.save(logits, out / "logits.pt")
        if tensor_parallel == 1:
            from bridge_ext import save_hf_pretrained

            save_hf_pretrained(built.chunks, out / "live_model", out / "live_adapter")


if __name__ == "__main__":
    import bridge_ext  # noqa: F401  (makes megatron importable without TE / Triton)

    save_all(Path(sys.argv[1]), Path(sys.argv[2]), tensor_parallel=int(os.environ.get("WORLD_SIZE", "1")))


def assert_converted_logits(result, reference: torch.Tensor, what: str) -> None:
    """The converted model + adapter folders load strictly in transformers + PEFT and give the
    saving Megatron model's logits (``reference``), which the model folder alone does not (the
    adapter is no no-op)."""
    from bridge_ext.verify import Report, compare_logits, hf_logits, load_adapter_strict, load_hf_model

    report = Report()
    model = load_adapter_strict(load_hf_model(result.model_dir), result.adapter_dir, report)
    relative = compare_logits(hf_logits(model, INPUT_IDS), reference, report, what=what, relative_tolerance=2e-5)
    plain = hf_logits(load_hf_model(result.model_dir), INPUT_IDS)
    assert (plain - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)
