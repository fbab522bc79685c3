"""Qwen3.5 export check on a GPU with the real flash-linear-attention kernels.

On the CPU the Megatron model's Gated DeltaNet runs bridge_ext's pure-torch stand-in for
``fla``; here it runs fla's Triton kernels. For each tiny Qwen3.5 model type: build the
Megatron model with random LoRA, move it to the GPU, export it (Hugging Face folder + PEFT
adapter folder) from GPU tensors, and compare the logits of transformers + PEFT on the CPU
(transformers' own torch gated-delta-rule, an independent reference) with the Megatron
model's forward on the GPU.

Run from the repository root: ``python scripts/gpu/check_qwen35_with_fla.py [OUT_DIR]``, with
bridge_ext and its test-support package importable (scripts/install.sh, or
``PYTHONPATH=$PWD:$PWD/testing``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if "--reference" in sys.argv:
    sys.modules["fla"] = None  # makes `import fla` fail: transformers then takes its torch path

import bridge_ext  # noqa: E402,F401  (first: megatron without Transformer Engine)
import torch  # noqa: E402

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


def check_model_type(model_type: str, workdir: Path) -> dict:
    from bridge_ext import save_hf_pretrained
    from bridge_ext_testing import fla_torch, tiny_models
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext_testing.forward import megatron_logits

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
    gpu_inputs = {k: v.cuda() for k, v in vision.items()}
    megatron = megatron_logits(chunks, input_ids.cuda(), **gpu_inputs).cpu()
    with fla_torch.torch_kernels_in_megatron():
        megatron_torch = megatron_logits(chunks, input_ids.cuda(), **gpu_inputs).cpu()
    out = workdir / model_type
    save_hf_pretrained(chunks, out / "model", out / "adapter")
    torch.save({"input_ids": input_ids, "inputs": inputs, "vision": vision, "megatron": megatron,
                "megatron_torch": megatron_torch, "hf_dir": str(hf_dir),
                "state": {k: v.detach().cpu() for k, v in chunks[0].named_parameters()}}, out / "megatron_logits.pt")
    # The reference process sees no GPU and no fla: everything there is torch on the CPU.
    environment = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    environment["CUDA_VISIBLE_DEVICES"] = ""
    answer = subprocess.run([sys.executable, __file__, "--reference", str(out)], capture_output=True, text=True,
                            env=environment)
    if answer.returncode:
        raise RuntimeError(f"reference process failed:\n{answer.stderr[-4000:]}")
    return json.loads(answer.stdout.strip().splitlines()[-1])


def reference(out: Path) -> dict:
    """On the CPU: transformers + PEFT from the exported folders, and the same Megatron model
    (its GPU state loaded back), against the logits computed on the GPU."""
    from bridge_ext_testing.build import LoraSettings, build_megatron_model
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext_testing.forward import megatron_logits
    from bridge_ext.verify import Report, check_model_folder, hf_logits, load_adapter_strict, load_hf_model

    saved = torch.load(out / "megatron_logits.pt")
    with megatron_parallel():
        built = build_megatron_model(saved["hf_dir"], lora=LoraSettings(target_modules=TARGETS))
        parameters = dict(built.chunks[0].named_parameters())
        assert sorted(parameters) == sorted(saved["state"])
        with torch.no_grad():
            for name, value in saved["state"].items():
                parameters[name].copy_(value)
        if saved["vision"]:
            built.chunks[0].vision_model.merger.activation_func = torch.nn.functional.gelu
        megatron_cpu = megatron_logits(built.chunks, saved["input_ids"], **saved["vision"])
    report = Report()
    check_model_folder(out / "model", report)
    peft_model = load_adapter_strict(load_hf_model(out / "model"), out / "adapter", report)
    expected = hf_logits(peft_model, saved["input_ids"], **saved["inputs"])

    def relative(logits: torch.Tensor, reference: torch.Tensor) -> float:
        return ((logits - reference).abs().max() / reference.abs().max()).item()

    return {
        "model_type": out.name,
        "relative_logit_difference": relative(saved["megatron"], expected),
        "torch_kernels_relative_difference": relative(saved["megatron_torch"], expected),
        "fla_vs_torch_kernels": relative(saved["megatron"], saved["megatron_torch"]),
        "megatron_cpu_relative_difference": relative(megatron_cpu, expected),
        "megatron_gpu_vs_cpu": relative(saved["megatron_torch"], megatron_cpu),
        "checks": report.lines,
    }


def main() -> int:
    from bridge_ext_testing.distributed import megatron_parallel

    if sys.argv[1:2] == ["--reference"]:
        print(json.dumps(reference(Path(sys.argv[2]))))
        return 0
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
            ok = result["megatron_cpu_relative_difference"] <= 1e-4 and result["relative_logit_difference"] <= 2e-2
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {model_type}: max |diff| / max |logit| against transformers + PEFT "
                  f"on the exported folders (CPU): the Megatron model on the CPU "
                  f"{result['megatron_cpu_relative_difference']:.2e}; on the GPU with fla's kernels "
                  f"{result['relative_logit_difference']:.2e}, with torch gated-delta-rule "
                  f"{result['torch_kernels_relative_difference']:.2e}. Megatron GPU vs CPU "
                  f"{result['megatron_gpu_vs_cpu']:.2e}; fla vs torch kernels {result['fla_vs_torch_kernels']:.2e}")
            for line in result["checks"]:
                print(f"     {line}")
    print(f"{4 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
