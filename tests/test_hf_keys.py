"""hf_checkpoint_keys(config) == the {name: shape} set a real ``save_pretrained`` writes."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bridge_ext.hf_keys import build_meta_model, hf_checkpoint_keys, model_class_for

H, VOCAB, E = 64, 96, 4

_DENSE = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
_Q35 = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, mtp_num_hidden_layers=1)  # default layer_types: layer 3 full attention
_Q35_DENSE = dict(_Q35, intermediate_size=80)
_Q35_MOE = dict(_Q35, moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=E,
                num_experts_per_tok=2)
_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=H,
               num_position_embeddings=16, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)


def _config(case: str):
    import transformers as T

    return {
        "qwen3": lambda: T.Qwen3Config(**_DENSE, tie_word_embeddings=False),
        "qwen3_tied": lambda: T.Qwen3Config(**_DENSE, tie_word_embeddings=True),
        "llama": lambda: T.LlamaConfig(**_DENSE),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**_DENSE, moe_intermediate_size=24, num_experts=E,
                                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1]),
        "qwen3_5_text": lambda: T.Qwen3_5TextConfig(**_Q35_DENSE),
        "qwen3_5": lambda: T.Qwen3_5Config(text_config=_Q35_DENSE, vision_config=_VISION),
        "qwen3_5_tied": lambda: T.Qwen3_5Config(text_config=_Q35_DENSE, vision_config=_VISION,
                                                tie_word_embeddings=True),
        "qwen3_5_moe_text": lambda: T.Qwen3_5MoeTextConfig(**_Q35_MOE),
        "qwen3_5_moe": lambda: T.Qwen3_5MoeConfig(text_config=_Q35_MOE, vision_config=_VISION),
    }[case]()


CASES = ["qwen3", "qwen3_tied", "llama", "qwen3_moe", "qwen3_5_text", "qwen3_5", "qwen3_5_tied",
         "qwen3_5_moe_text", "qwen3_5_moe"]


def _disk_keys(path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as fh:
                for k in fh.keys():
                    assert k not in out
                    out[k] = tuple(fh.get_slice(k).get_shape())
    assert out, f"no safetensors in {path}"
    return out


def _real_model(config):
    torch.manual_seed(0)
    return model_class_for(config)(config)


@pytest.mark.parametrize("case", CASES)
def test_matches_save_pretrained(tmp_path, case):
    config = _config(case)
    expected = hf_checkpoint_keys(config)
    _real_model(config).save_pretrained(tmp_path)
    assert expected == _disk_keys(tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_naming_facts(case):
    keys = hf_checkpoint_keys(_config(case))
    assert not any(k.startswith("mtp.") or ".mtp." in k for k in keys)  # transformers never writes MTP
    assert not any(".base_layer." in k for k in keys)
    vl = case.startswith("qwen3_5") and "_text" not in case
    text = "model.language_model." if vl else "model."
    assert f"{text}embed_tokens.weight" in keys and f"{text}norm.weight" in keys
    assert all(k.startswith((text, "lm_head.")) or (vl and k.startswith("model.visual.")) for k in keys)
    assert ("lm_head.weight" in keys) is (not case.endswith("_tied"))
    if vl:
        assert "model.visual.blocks.1.attn.qkv.weight" in keys and "model.visual.merger.linear_fc2.weight" in keys
    if "moe" in case:
        e_mod = f"{text}layers.0.mlp.experts"
        assert keys[f"{e_mod}.3.gate_proj.weight"] == (24, H) and keys[f"{e_mod}.3.down_proj.weight"] == (H, 24)
        assert f"{e_mod}.gate_up_proj" not in keys
        fused = hf_checkpoint_keys(_config(case), expert_layout="fused")
        assert fused[f"{e_mod}.gate_up_proj"] == (E, 48, H) and fused[f"{e_mod}.down_proj"] == (E, H, 24)
        assert not any(".experts.0." in k for k in fused)
    if case == "qwen3_moe":  # mlp_only_layers=[1]: a dense MLP in layer 1
        assert "model.layers.1.mlp.gate_proj.weight" in keys
    if case.startswith("qwen3_5"):
        assert f"{text}layers.0.linear_attn.in_proj_qkv.weight" in keys
        assert f"{text}layers.3.self_attn.q_proj.weight" in keys


def test_meta_model_allocates_nothing():
    model = build_meta_model(_config("qwen3_5_moe"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def _write_checkpoint(path, config, tensors):
    config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen3_5_moe_text", "qwen3_5_moe"])
def test_fused_layout_is_what_a_fused_checkpoint_resaves(tmp_path, case):
    """A checkpoint with fused 3-D experts loads without missing keys and re-saves fused."""
    config = _config(case)
    model = _real_model(config)
    fused = {k: v for k, v in model.state_dict().items()}  # in-memory names = fused layout (no tying here)
    _write_checkpoint(tmp_path / "in", config, fused)
    loaded, info = type(model).from_pretrained(tmp_path / "in", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.save_pretrained(tmp_path / "out")
    assert hf_checkpoint_keys(config, expert_layout="fused") == _disk_keys(tmp_path / "out")
    assert hf_checkpoint_keys(config, expert_layout="fused") != hf_checkpoint_keys(config)


@pytest.mark.parametrize("case,layout", [("qwen3_5_text", "per_expert"), ("qwen3_5_moe_text", "per_expert"),
                                         ("qwen3_5_moe_text", "fused")])
def test_prefix_change_is_what_a_prefixed_checkpoint_resaves(tmp_path, case, layout):
    config = _config(case)
    model = _real_model(config)
    model.save_pretrained(tmp_path / "fresh")
    if layout == "fused":
        tensors = dict(model.state_dict())
    else:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(tmp_path / "fresh", "model.safetensors"))
    prefixed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                for k, v in tensors.items()}
    _write_checkpoint(tmp_path / "in", config, prefixed)
    loaded, info = type(model).from_pretrained(tmp_path / "in", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.save_pretrained(tmp_path / "out")
    expected = hf_checkpoint_keys(config, expert_layout=layout, prefix_change=True)
    assert expected == _disk_keys(tmp_path / "out")
    assert all(k.startswith("model.language_model.") or k == "lm_head.weight" for k in expected)


def test_bad_arguments():
    with pytest.raises(ValueError):
        hf_checkpoint_keys(_config("qwen3"), expert_layout="stacked")
    with pytest.raises(ValueError):
        hf_checkpoint_keys(_config("qwen3"), prefix_change=True)
