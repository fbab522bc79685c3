"""Nemotron-H's Megatron forward against transformers + PEFT on the exported folders (GPU only).

On CPU the tiny Nemotron-H builds and loads in Megatron (tests/test_conformance_frontier.py:
bit-exact base, names, Megatron-Bridge's export, PEFT strict load against the merged export),
but megatron-core's Mamba mixer runs only with mamba_ssm's and causal_conv1d's CUDA kernels, so
the Megatron forward itself is checked here: the LoRA model's logits (every Megatron-Bridge LoRA
target except Mamba's out_proj, which PEFT refuses) against transformers' forward of the saved
base + PEFT adapter, and of the merged folder.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

KERNELS = all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS),
    reason="needs a CUDA GPU with mamba_ssm and causal_conv1d (megatron-core's Mamba mixer has no CPU path)",
)

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj")


def test_megatron_forward_matches_transformers_with_peft_and_merged(megatron_cpu, tmp_path):
    from bridge_ext import save_hf_pretrained
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext_testing.forward import megatron_logits
    from bridge_ext_testing.tiny_frontier import tiny_nemotron_h
    from bridge_ext.verify import Report, compare_logits, hf_logits, load_adapter_strict

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conformance.support import hf_base_model, input_ids

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_megatron_model(tiny_nemotron_h(tmp_path / "hf"), lora=LoraSettings(target_modules=TARGETS),
                                 on_gpu=True)
    randomize_lora(model.chunks, seed=3, std=0.1)
    reference = megatron_logits(model.chunks, input_ids().cuda()).cpu()
    save_hf_pretrained(model.chunks, tmp_path / "model", tmp_path / "adapter")
    save_hf_pretrained(model.chunks, tmp_path / "merged", merge=True)
    report = Report()
    peft_model = load_adapter_strict(hf_base_model(tmp_path / "model"), tmp_path / "adapter", report)
    # the GPU scan kernels against transformers' CPU torch path: their rounding apart
    compare_logits(hf_logits(peft_model, input_ids()), reference, report, what="nemotron_h + PEFT",
                   relative_tolerance=2e-2)
    compare_logits(hf_logits(hf_base_model(tmp_path / "merged"), input_ids()), reference, report,
                   what="nemotron_h merged", relative_tolerance=2e-2)
