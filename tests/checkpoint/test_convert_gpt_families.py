"""``convert_checkpoint`` on TP=2 megatron-core checkpoints of a tiny GLM-4.5 MoE model and a tiny
GLM-4.7-Flash (``glm4_moe_lite``: DeepSeek-V3's MLA in GLM's MoE) with one MTP layer each
(``model.layers.{N}``: shared experts, the router's ``expert_bias`` buffer, MTP copies of the
embedding and output layer; GQA with biases in the first, MLA's column-parallel linears and
replicated latent norms in the second).

Saved by a 2-process gloo torchrun of ``qwen35_factory.py`` (LoRA on every projection; routed
experts' B kept zero at TP=2, see that file), converted full and adapter-only; judged against
the Hugging Face originals (base and MTP, bit for bit) and the saving model's own forward at TP=2
(transformers + PEFT on the converted folders).
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
from bridge_ext.convert import convert_checkpoint
from bridge_ext_testing import tiny_frontier, tiny_gpt_families

HERE = Path(__file__).parent
MODELS = {"glm4_moe": tiny_gpt_families.tiny_glm4_moe, "glm4_moe_lite": tiny_gpt_families.tiny_glm4_moe_lite,
          "minimax_m2": tiny_frontier.tiny_minimax_m2,
          "kimi_k25": tiny_frontier.tiny_kimi_k25, "nemotron_h": tiny_frontier.tiny_nemotron_h}
# Names each converted model must hold besides matching the source: GLM-4.5's and GLM-4.7-Flash's
# MTP layer and router bias buffer; MiniMax-M2's router bias buffer and full-width q/k norms (split over TP ranks).
EXPECTED = {
    "glm4_moe": {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.3.mlp.gate.e_score_correction_bias"},
    "glm4_moe_lite": {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
                      "model.layers.3.mlp.gate.e_score_correction_bias"},
    "minimax_m2": {"model.layers.1.block_sparse_moe.e_score_correction_bias", "model.layers.1.self_attn.q_norm.weight"},
    "kimi_k25": {"language_model.model.layers.2.mlp.gate.e_score_correction_bias", "mm_projector.proj.2.weight",
                 "vision_tower.encoder.blocks.0.wqkv.weight"},
    # Mamba's in_proj / conv1d: regrouped from per-rank [z; x; B; C; dt] / [x; B; C]
    "nemotron_h": {"backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.conv1d.weight",
                   "backbone.layers.0.mixer.norm.weight"},
}


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"{request.param}_tp2")
    MODELS[request.param](out / "hf")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "qwen35_factory.py"), str(out / "hf"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.parametrize("variant", ["lora", "adapter"])
def test_converted_tp2_checkpoint_is_bit_exact_and_gives_the_saving_models_logits(saved, variant, tmp_path):
    result = convert_checkpoint(saved / variant, model_dir=tmp_path / "model", adapter_dir=tmp_path / "adapter",
                                hf_base=saved / "hf")
    original = load_file(str(saved / "hf" / "model.safetensors"))
    written = {k: v for f in sorted(result.model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(written) == sorted(original)
    assert EXPECTED[saved.name.rsplit("_tp2", 1)[0]] <= set(written)
    assert [name for name in original if not torch.equal(written[name], original[name])] == []
    qwen35_factory.assert_converted_logits(result, torch.load(saved / "logits.pt"), f"{saved.name} {variant}")
