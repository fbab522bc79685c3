"""Qwen3.5 export check on a GPU with the real flash-linear-attention kernels.

On the CPU the Megatron model's Gated DeltaNet runs bridge_ext's pure-torch stand-in for
``fla``; here it runs fla's Triton kernels. For each tiny Qwen3.5 model type: build the
Megatron model with random LoRA, move it to the GPU, export it (Hugging Face folder + PEFT
adapter folder) from GPU tensors, and compare the logits of transformers + PEFT on the CPU
(transformers' own torch gated-delta-rule, an independent reference) with the Megatron
model's forward on the GPU.

Run from the repository root: ``python scripts/gpu/check_qwen35_with_fla.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import bridge_ext  # noqa: F401  (first: megatron without Transformer Engine)
import torch

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


def check_model_type(model_type: str, workdir: Path) -> dict:
    from bridge_ext import save_hf_pretrained
    from bridge_ext.cpu import fla_torch, tiny_models
    from bridge_ext.cpu.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext.cpu.forward import megatron_logits
    from bridge_ext.verify import Report, check_model_folder, hf_logits, load_adapter_strict, load_hf_model

    makers = {
        "qwen3_5_text": lambda d: tiny_models.tiny_qwen35_dense(d),
        "qwen3_5_moe_text": lambda d: tiny_models.tiny_qwen35_moe(d),
        "qwen3_5": lambda d: tiny_models.tiny_qwen35_vl(d),
        "qwen3_5_moe": lambda d: tiny_models.tiny_qwen35_vl(d, moe=True),
    }
    hf_dir = makers[model_type](workdir / model_type / "hf")
    built = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=TARGETS))
    randomize_lora(built.chunks, seed=3, std=0.1)
    chunks = [chunk.cuda() for chunk in built.chunks]
    assert not fla_torch.using_stand_in(), "the real fla kernels must be in use"
    if model_type in ("qwen3_5", "qwen3_5_moe"):
        inputs = tiny_models.tiny_vl_inputs(batch=2)
        input_ids = inputs.pop("input_ids")
        vision = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        merger = chunks[0].vision_model.merger  # same activation as HF (see tests)
        merger.activation_func = torch.nn.functional.gelu
    else:
        inputs, vision = {}, {}
        input_ids = torch.randint(0, 120, (2, 70), generator=torch.Generator().manual_seed(1))
    megatron = megatron_logits(chunks, input_ids.cuda(), **{k: v.cuda() for k, v in vision.items()}).cpu()
    out = workdir / model_type
    save_hf_pretrained(chunks, out / "model", out / "adapter")
    report = Report()
    check_model_folder(out / "model", report)
    peft_model = load_adapter_strict(load_hf_model(out / "model"), out / "adapter", report)
    reference = hf_logits(peft_model, input_ids, **inputs)
    relative = ((megatron - reference).abs().max() / reference.abs().max()).item()
    return {"model_type": model_type, "relative_logit_difference": relative, "checks": report.lines}


def main() -> int:
    from bridge_ext.cpu.distributed import megatron_parallel

    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    failures = 0
    with megatron_parallel():
        for model_type in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe"):
            result = check_model_type(model_type, workdir)
            ok = result["relative_logit_difference"] <= 1e-3
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {model_type}: Megatron (GPU, fla kernels) vs transformers + PEFT "
                  f"(CPU): max |diff| / max |logit| = {result['relative_logit_difference']:.2e}")
            for line in result["checks"]:
                print(f"     {line}")
    print(f"{4 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
