"""``convert`` of GLM-5 and DeepSeek-V4 checkpoints that no Megatron model here can write.

megatron-core 0.19.2 builds GLM-5's DSA layers only with Transformer Engine (its spec asks the
backend for ``linear()``) and has no DeepSeek-V4 modules at all, but the disk path never builds a
model: :mod:`synthetic_factory` writes the torch_dist checkpoint a Megatron-Bridge run would leave
(Megatron-Bridge's own names and provider, megatron-core's own saver and key layout, the table's
reverse for the tensors). Converted, the folder must be the tiny model's own safetensors bit for
bit (every tensor: MTP, indexer, compressors, hash table, hyper-connections), its names
transformers' key set plus the MTP layer, and it must load in transformers (``verify``) and give
the original folder's logits.

What this cannot prove: that a real Megatron model of these classes holds these values under
these names (no such model can be built here; tests/gpu/test_glm5_dsa.py builds GLM-5's with
Transformer Engine; nothing in megatron-core 0.19.2 builds DeepSeek-V4's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import synthetic_factory
from bridge_ext.checkpoint.reader import CheckpointReader
from bridge_ext.convert import convert_checkpoint
from bridge_ext_testing.tiny_deepseek_v4 import tiny_deepseek_v4
from bridge_ext_testing.tiny_gpt_families import tiny_glm_moe_dsa
from bridge_ext.hf_keys import hf_checkpoint_keys

# GLM-5: Megatron-Bridge's provider builds no MTP layer; a run that trains it sets mtp_num_layers
MODELS = {"glm_moe_dsa": (tiny_glm_moe_dsa, 1), "deepseek_v4": (tiny_deepseek_v4, None)}
# what each checkpoint must hold in Megatron's layout (layers under their numbers: moe_layer_freq is a list)
STORED = {
    "glm_moe_dsa": {"decoder.layers.0.self_attention.core_attention.indexer.linear_wq_b.weight": (32, 24),
                    "decoder.layers.1.mlp.experts.experts.linear_fc1.weight": (4, 64, 64),
                    "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc2.weight": (4, 64, 32),
                    "embedding.word_embeddings.weight": (1280, 64)},
    "deepseek_v4": {"decoder.layers.0.mlp.router.tid2eid": (128, 2),
                    "decoder.layers.2.self_attention_hyper_connection.alpha_post": (1,),
                    "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight": (4, 64, 64),
                    "mtp.layers.0.hc_head_fn": (2, 128),
                    "embedding.word_embeddings.weight": (1280, 64)},
}


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    make, mtp_layers = MODELS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    hf_dir = make(out / "hf")
    return request.param, hf_dir, synthetic_factory.synthetic_checkpoint(hf_dir, out / "ckpt", mtp_layers=mtp_layers)


def test_the_checkpoint_is_in_megatrons_layout(saved):
    model_type, _, root = saved
    shapes = {key: shape for key, (shape, _) in CheckpointReader(root).tensor_shapes().items()}
    assert {key: shapes.get(key) for key in STORED[model_type]} == STORED[model_type]


def test_convert_is_bit_exact_with_the_source_files_and_gives_their_logits(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type, hf_dir, root = saved
    result = convert_checkpoint(root, model_dir=tmp_path / "model", hf_base=hf_dir, verify=True)
    original = load_file(str(hf_dir / "model.safetensors"))
    written = {k: v for f in sorted(result.model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(written) == sorted(original)
    assert [name for name in original if written[name].dtype != original[name].dtype
            or not torch.equal(written[name], original[name])] == []
    extra = [name for name in written if name.startswith(("mtp.", "model.layers.3."))]
    assert extra and sorted(set(written) - set(extra)) == sorted(hf_checkpoint_keys(result.config))
    assert any("nothing missing or unexpected" in line for line in result.report.lines)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    logits = [AutoModelForCausalLM.from_pretrained(str(folder)).eval()(ids).logits for folder in (hf_dir, result.model_dir)]
    assert torch.equal(*logits), model_type


def test_glm5_adapter_only_checkpoint_loads_strictly_in_peft_and_matches_the_merged_folder(tmp_path):
    """Megatron-Bridge's LoRA on MLA's four projections, ``linear_proj``, the dense, shared and
    routed experts' ``linear_fc1`` / ``linear_fc2`` (adapter-only, as Megatron-Bridge saves PEFT
    runs): the adapter folder loads in PEFT with no missing and no unexpected key (``verify``),
    and PEFT's logits on the base equal the merged folder's (``convert --merge`` of the same checkpoint)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_glm_moe_dsa(tmp_path / "hf")
    root = synthetic_factory.adapter_checkpoint(hf_dir, tmp_path / "ckpt", mtp_layers=1)
    adapters = convert_checkpoint(root, adapter_dir=tmp_path / "adapter", hf_base=hf_dir, verify=True)
    assert any("no missing, no unexpected key" in line for line in adapters.report.lines)
    merged = convert_checkpoint(root, model_dir=tmp_path / "merged", hf_base=hf_dir, merge=True)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        before = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(adapters.adapter_dir)).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(str(merged.model_dir)).eval()(ids).logits
    assert not torch.allclose(peft_logits, before, atol=1e-3)  # the adapters change the model
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-5)
