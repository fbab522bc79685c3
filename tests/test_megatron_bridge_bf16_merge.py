"""Merged bf16 weights vs Megatron-Bridge 0.6.2: only the Gated DeltaNet ``in_proj`` differs, by rounding.

Megatron-Bridge merges most LoRA in float32 and rounds once (peft_bridge.py,
``_merge_single_adapter_weight``). Its Gated DeltaNet ``in_proj`` branch of
``_merge_lora_adapter_weights`` instead computes the delta with ``LoRAMerge().merge`` on a zero
base in the model's dtype (a bf16 ``B @ A``, rounded), splits it into ``in_proj_qkv`` / ``z`` /
``b`` / ``a`` and adds it to the bf16 base: two roundings. Ours rounds ``base + scale * B @ A``
once, from float32. These are the only merged tensors that differ at expert-TP 1 (single process
here), by the rounding error of that bf16 delta; at expert-TP > 1 the routed experts' gate / up
differ as well (tests/distributed/test_layouts.py).
"""

from __future__ import annotations

import re

import pytest
import torch

from bridge_ext import export_hf_weights
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.tiny_models import tiny_qwen35_moe
from bridge_ext.engine import PEFT_PREFIX

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")
SCALE = 8 / 4  # LoraSettings' default alpha / rank
IN_PROJ = re.compile(r"\.linear_attn\.in_proj_(qkv|z|b|a)\.weight$")


@pytest.fixture(scope="module")
def exports(megatron_cpu, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    built = build_megatron_model(tiny_qwen35_moe(tmp_path_factory.mktemp("qwen35_moe")),
                                 lora=LoraSettings(target_modules=TARGETS), dtype=torch.bfloat16)
    randomize_lora(built.chunks, seed=3, std=0.1)
    return {"peft": dict(export_hf_weights(built.chunks)),
            "ours": dict(export_hf_weights(built.chunks, peft=False)),
            "theirs": dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))}


def test_only_the_gated_deltanet_in_proj_differs(exports):
    ours, theirs = exports["ours"], exports["theirs"]
    assert sorted(ours) == sorted(theirs)
    assert next(iter(ours.values())).dtype == torch.bfloat16
    different = sorted(name for name in ours if not torch.equal(ours[name], theirs[name]))
    expected = sorted(name for name in ours if IN_PROJ.search(name))
    assert len(expected) == 4 * 3  # qkv, z, b, a in each of the three linear-attention layers
    assert different == expected


def test_ours_rounds_once_and_megatron_bridge_twice(exports):
    peft, ours, theirs = exports["peft"], exports["ours"], exports["theirs"]
    for name in (name for name in ours if IN_PROJ.search(name)):
        module = PEFT_PREFIX + name.removesuffix(".weight")
        lora_a, lora_b, base = peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"], peft[name]
        rounded_once = (base.float() + SCALE * (lora_b.float() @ lora_a.float())).to(torch.bfloat16)
        assert torch.equal(ours[name], rounded_once), name
        assert torch.equal(theirs[name], base + SCALE * (lora_b @ lora_a)), name  # bf16 delta, bf16 sum
        exact = base.double() + SCALE * (lora_b.double() @ lora_a.double())
        ours_error, their_error = (ours[name] - exact).abs(), (theirs[name] - exact).abs()
        assert ours_error.mean() < their_error.mean(), name

