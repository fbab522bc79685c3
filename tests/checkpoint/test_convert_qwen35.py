"""``convert_checkpoint`` on real megatron-core checkpoints of tiny Qwen3.5 models.

Qwen3.5-MoE (Gated DeltaNet with split-stored ``in_proj`` / ``conv1d``, gated attention, routed
and shared experts, one MTP layer keyed ``transformer_layer``) at TP=1 and TP=2, and the
image-text Qwen3.5 (vision tower) at TP=1; LoRA on every projection kind, full and adapter-only.

References: the Hugging Face originals (base weights, bit for bit, MTP included), the saving
model's own forward at its own TP (logits of transformers + PEFT on the converted folders), and
at TP=1 the live-model export of the same weights (adapters, bit for bit).

Found on the way (pinned by ``test_megatron_reload_of_tp2_gdn_lora_is_rank_ordered``): a Gated
DeltaNet ``in_proj`` LoRA ``linear_out`` is saved as a plain column-parallel tensor, i.e. the
TP ranks' ``[q_r; k_r; v_r; z_r; b_r; a_r]`` blocks one after the other; megatron-core's reload
at another TP reads it as if it were in global order. The converter reorders it (the rule's
per-rank split) and matches the TP=2 model that saved it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen35_factory
from bridge_ext.checkpoint import CheckpointReader
from bridge_ext.checkpoint.source import CheckpointSource
from bridge_ext.convert import convert_checkpoint
from bridge_ext.tables import table_for

HERE = Path(__file__).parent
CASES = [("qwen3_5_moe_text", 1), ("qwen3_5_moe_text", 2), ("qwen3_5", 1)]


def all_tensors(folder: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob(f"{prefix}*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Checkpoints per case: TP=1 in this process, TP=2 by a 2-process gloo torchrun."""
    folders = {}
    for kind, tp in CASES:
        out = tmp_path_factory.mktemp(f"{kind}_tp{tp}")
        qwen35_factory.tiny_model(kind, out / "hf")
        if tp == 1:
            qwen35_factory.save_all(out / "hf", out, tensor_parallel=1)
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
                       str(HERE / "qwen35_factory.py"), str(out / "hf"), str(out)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=400,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        folders[kind, tp] = out
    return folders


@pytest.fixture(scope="module", params=[(k, tp, v) for k, tp in CASES for v in ("lora", "adapter")],
                ids=[f"{k}-tp{tp}-{v}" for k, tp in CASES for v in ("lora", "adapter")])
def converted(request, saved, tmp_path_factory):
    kind, tp, variant = request.param
    folder = saved[kind, tp]
    out = tmp_path_factory.mktemp(f"out_{kind}_tp{tp}_{variant}")
    result = convert_checkpoint(folder / variant, model_dir=out / "model", adapter_dir=out / "adapter",
                                hf_base=folder / "hf")
    return kind, tp, folder, result


def test_base_and_mtp_are_bit_exact(converted):
    _, _, folder, result = converted
    original = all_tensors(folder / "hf")
    written = all_tensors(result.model_dir)
    assert sorted(written) == sorted(original) and any(name.startswith("mtp.") for name in written)
    assert [name for name in original if not torch.equal(written[name], original[name])] == []


def test_peft_strict_and_logits_equal_the_saving_model(converted):
    kind, tp, folder, result = converted
    qwen35_factory.assert_converted_logits(result, torch.load(folder / "logits.pt"), f"{kind} TP={tp}")


# The live export reference is written by the TP=1 saves.
@pytest.mark.parametrize("converted", [(k, tp, v) for k, tp in CASES if tp == 1 for v in ("lora", "adapter")],
                         indirect=True, ids=lambda case: "-".join(map(str, case)))
def test_adapters_equal_the_live_export(converted):
    kind, tp, folder, result = converted
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    live = load_file(str(folder / "live_adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(live)
    assert [name for name in ours if not torch.equal(ours[name], live[name])] == []
    names = " ".join(ours)
    assert "linear_attn.in_proj_qkv.lora_B" in names and "mtp.layers.0." in names
    if "moe" in kind:  # fused routed experts: PEFT target_parameters
        assert ".experts.base_layer.lora_A" in names
    assert "model.visual." in names if kind == "qwen3_5" else "model.visual." not in names


def test_checkpoint_keys_are_what_the_source_normalises(saved):
    """Split GDN keys, per-layer expert stacks and MTP's transformer_layer, as stored at TP=2."""
    reader = CheckpointReader(saved["qwen3_5_moe_text", 2] / "lora")
    keys = set(reader.tensors)
    assert {f"decoder.layers.0.self_attention.in_proj.weight.{p}" for p in ("query", "key", "value", "z", "beta", "alpha")} <= keys
    assert "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight" in keys
    lora_out = reader.tensors["decoder.layers.0.self_attention.in_proj.adapter.linear_out.weight"]
    assert sorted(c.offsets for c in lora_out.chunks) == [(0, 0), (100, 0)]  # one block per TP rank
    source = CheckpointSource(reader, reader.run_config.peft, table_for("qwen3_5_moe_text"))
    names = source.base_names()
    assert "decoder.layers.0.self_attention.in_proj.weight" in names
    assert "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.3.linear_fc2.weight" in names
    assert [s[0] for s in source.shard_shapes("decoder.layers.0.self_attention.in_proj.adapter.linear_out.weight")] == [100, 100]


def test_megatron_reload_of_tp2_gdn_lora_is_rank_ordered(saved):
    """The stored TP=2 GDN lora_B is [rank0 block; rank1 block], not the global [q; k; v; z; b; a]."""
    reader = CheckpointReader(saved["qwen3_5_moe_text", 2] / "lora")
    source = CheckpointSource(reader, reader.run_config.peft, table_for("qwen3_5_moe_text"))
    name = "decoder.layers.0.self_attention.in_proj.adapter.linear_out.weight"
    stored = reader.read_tensor(name)
    rank0, rank1 = source.shards(name)
    sizes = [16, 16, 32, 32, 2, 2]  # q, k, v, z, beta, alpha rows per rank (global 32, 32, 64, 64, 4, 4)
    parts = [torch.cat(pair) for pair in zip(rank0.split(sizes), rank1.split(sizes))]
    assert torch.equal(torch.cat([rank0, rank1]), stored)
    assert not torch.equal(torch.cat(parts), stored)


def test_adapter_for_vllm_writes_vllms_layout_without_mtp_adapters(saved, tmp_path):
    from click.testing import CliRunner

    from bridge_ext.cli import main

    folder = saved["qwen3_5_moe_text", 1]
    args = ["convert", str(folder / "lora"), "--hf-base", str(folder / "hf"), "--adapter-for", "vllm"]
    result = CliRunner().invoke(main, [*args, "--adapter-out", str(tmp_path / "vllm")])
    assert result.exit_code == 0, result.output
    names = " ".join(load_file(str(tmp_path / "vllm" / "adapter_model.safetensors")))
    # Qwen3_5MoeForCausalLM: vLLM loads per-expert adapters and applies none on its MTP drafter
    assert ".experts.0.gate_proj.lora_A" in names and ".experts.base_layer." not in names
    assert "mtp." not in names and "MTP adapter tensors not written" in result.output
    refused = CliRunner().invoke(main, [*args, "--expert-adapter-layout", "fused", "--adapter-out",
                                        str(tmp_path / "refused")])
    assert refused.exit_code == 4 and "vLLM does not load fused expert adapters" in refused.output
    assert not (tmp_path / "refused").exists()
