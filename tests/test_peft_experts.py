"""PEFT ``target_parameters`` (fused 3-D experts) adapter layout, checked against real PEFT loads.

Tiny transformers Qwen3.5-MoE (qwen3_5_moe_text) and Qwen3-MoE (qwen3_moe) models get random
per-expert LoRA factors (Megatron convention: fc1 ``A_e [r, H]``, ``B_e [2I, r]``; fc2
``A_e [r, I]``, ``B_e [H, r]``; delta = alpha/r * B_e @ A_e), written with
``bridge_ext.peft_experts`` and loaded with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import expert_helpers as eh
from bridge_ext import peft_experts as pe

torch.manual_seed(0)

H, I_MOE, E, VOCAB = 64, 24, 4, 96  # 2I = 48 != H, so any out/in swap shows up as a shape error


def _tiny_model(model_type: str):
    from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig, Qwen3MoeConfig

    if model_type == "qwen3_5_moe_text":
        cfg = Qwen3_5MoeTextConfig(
            vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, moe_intermediate_size=I_MOE, shared_expert_intermediate_size=32,
            num_experts=E, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
        )
    else:
        cfg = Qwen3MoeConfig(
            vocab_size=VOCAB, hidden_size=H, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=I_MOE, num_experts=E, num_experts_per_tok=2,
        )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config.model_type == model_type
    return model


def _megatron_lora(num_layers: int, r_fc1: int, r_fc2: int, seed: int):
    """Per layer: {"fc1": (A_list, B_list), "fc2": (A_list, B_list)} in Megatron's per-expert convention."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    out = []
    for _ in range(num_layers):
        out.append(
            {
                "fc1": ([rnd(r_fc1, H) for _ in range(E)], [rnd(2 * I_MOE, r_fc1) for _ in range(E)]),
                "fc2": ([rnd(r_fc2, I_MOE) for _ in range(E)], [rnd(H, r_fc2) for _ in range(E)]),
            }
        )
    return out


def _write_adapter(path, model_type, lora, r, alpha, down_r=None, down_alpha=None, config_order=None,
                   mangle=None):
    tensors = {}
    for i, layer in enumerate(lora):
        keys = eh.expert_adapter_keys(f"model.layers.{i}.mlp.experts")
        for param, fc in ((eh.GATE_UP, "fc1"), (eh.DOWN, "fc2")):
            a, b = pe.fuse_expert_lora(*layer[fc])
            tensors[keys[param][0]] = a
            tensors[keys[param][1]] = b
    if mangle is not None:
        tensors = mangle(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "target_modules": [],
        "modules_to_save": None,
        "inference_mode": True,
        **eh.expert_adapter_config_fields(r, alpha, down_r=down_r, down_alpha=down_alpha),
    }
    if config_order is not None:
        cfg["target_parameters"] = list(config_order)
    eh.check_target_modules(model_type, cfg["target_modules"])
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _manual_merge(model, lora, scale_fc1, scale_fc2):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(lora):
            experts = merged.model.layers[i].mlp.experts
            for e in range(E):
                a1, b1 = layer["fc1"][0][e], layer["fc1"][1][e]
                a2, b2 = layer["fc2"][0][e], layer["fc2"][1][e]
                experts.gate_up_proj[e] += scale_fc1 * b1 @ a1
                experts.down_proj[e] += scale_fc2 * b2 @ a2
    return merged


def _load(base, path):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(path))
    peft_warnings = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    # load_adapter returns PEFT's load result (from_pretrained only warns about missing keys):
    res = pm.load_adapter(str(path), adapter_name="probe")
    pm.set_adapter("default")
    pm.delete_adapter("probe")
    return pm, peft_warnings, list(res.missing_keys), list(res.unexpected_keys)


# ------------------------------------------------------------------------------------------------ pure


def test_fuse_split_roundtrip_and_packing_order():
    g = torch.Generator().manual_seed(3)
    r, d_in, d_out = 3, 5, 7
    a_list = [torch.randn(r, d_in, generator=g) for _ in range(E)]
    b_list = [torch.randn(d_out, r, generator=g) for _ in range(E)]
    lora_a, lora_b = pe.fuse_expert_lora(a_list, b_list)
    assert lora_a.shape == (r * E, d_in) and lora_b.shape == (d_out, r * E)
    # A expert-major, B rank-major / expert-minor:
    for e in range(E):
        for k in range(r):
            assert torch.equal(lora_a[e * r + k], a_list[e][k])
            assert torch.equal(lora_b[:, k * E + e], b_list[e][:, k])
    a2, b2 = eh.split_expert_lora(lora_a, lora_b, E)
    assert all(torch.equal(x, y) for x, y in zip(a2, a_list)) and all(torch.equal(x, y) for x, y in zip(b2, b_list))
    delta = eh.expert_delta(lora_a, lora_b, E, 0.5)
    for e in range(E):
        torch.testing.assert_close(delta[e], 0.5 * b_list[e] @ a_list[e], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        pe.fuse_expert_lora(a_list[:-1] + [torch.randn(r + 1, d_in)], b_list[:-1] + [torch.randn(d_out, r + 1)])
    with pytest.raises(ValueError):
        eh.split_expert_lora(lora_a, lora_b, E + 1)


def test_matches_peft_param_wrapper_directly():
    """fuse_expert_lora + PEFT's own ParamWrapper.get_delta_weight give scale * B_e @ A_e."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_model("qwen3_moe")
    pm = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=[],
                                          target_parameters=list(eh.TARGET_PARAMETERS)))
    outer = pm.base_model.model.model.layers[0].mlp.experts  # down_proj wrapper
    inner = outer.base_layer  # gate_up_proj wrapper
    assert outer.parameter_name == eh.DOWN and inner.parameter_name == eh.GATE_UP
    lora = _megatron_lora(1, 3, 3, seed=5)[0]
    for wrapper, fc in ((inner, "fc1"), (outer, "fc2")):
        a, b = pe.fuse_expert_lora(*lora[fc])
        assert wrapper.lora_A["default"].weight.shape == a.shape
        assert wrapper.lora_B["default"].weight.shape == b.shape
        with torch.no_grad():
            wrapper.lora_A["default"].weight.copy_(a)
            wrapper.lora_B["default"].weight.copy_(b)
        assert wrapper.scaling["default"] == eh.lora_scaling(3, 6) == 2.0
        delta = wrapper.get_delta_weight("default")
        for e in range(E):
            torch.testing.assert_close(delta[e], 2.0 * lora[fc][1][e] @ lora[fc][0][e], rtol=0, atol=1e-6)


def test_key_infixes():
    order = eh.EXPERT_PARAMETERS
    assert pe.peft_param_key_infixes(order, order) == {"gate_up_proj": "base_layer.", "down_proj": ""}
    assert pe.peft_param_key_infixes(["down_proj", "gate_up_proj"], order) == {"gate_up_proj": "base_layer.", "down_proj": ""}
    assert pe.peft_param_key_infixes(["down_proj"], order) == {"down_proj": ""}
    keys = eh.expert_adapter_keys("model.language_model.layers.3.mlp.experts")
    assert keys["gate_up_proj"] == (
        "base_model.model.model.language_model.layers.3.mlp.experts.base_layer.lora_A.weight",
        "base_model.model.model.language_model.layers.3.mlp.experts.base_layer.lora_B.weight",
    )
    assert keys["down_proj"][0] == "base_model.model.model.language_model.layers.3.mlp.experts.lora_A.weight"


@pytest.mark.parametrize("model_type", ["qwen3_5_moe_text", "qwen3_moe"])
def test_saved_keys_from_peft_itself(model_type):
    """PEFT's own get_peft_model_state_dict, with either target_parameters order, gives our keys/shapes."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    for order in (list(eh.TARGET_PARAMETERS), list(reversed(eh.TARGET_PARAMETERS))):
        pm = get_peft_model(_tiny_model(model_type),
                            LoraConfig(r=3, lora_alpha=6, target_modules=[], target_parameters=order))
        sd = get_peft_model_state_dict(pm)
        expected = {}
        for i in range(2):
            keys = eh.expert_adapter_keys(f"model.layers.{i}.mlp.experts")
            expected[keys["gate_up_proj"][0]] = (3 * E, H)
            expected[keys["gate_up_proj"][1]] = (2 * I_MOE, 3 * E)
            expected[keys["down_proj"][0]] = (3 * E, I_MOE)
            expected[keys["down_proj"][1]] = (H, 3 * E)
        assert {k: tuple(v.shape) for k, v in sd.items()} == expected


# ---------------------------------------------------------------------------------------- real loads


@pytest.mark.parametrize(
    "model_type,r_fc1,r_fc2,alpha_fc1,alpha_fc2,config_order",
    [
        ("qwen3_5_moe_text", 3, 3, 6.0, 6.0, None),
        ("qwen3_5_moe_text", 4, 2, 8.0, 3.0, list(reversed(eh.TARGET_PARAMETERS))),
        ("qwen3_moe", 3, 3, 6.0, 6.0, None),
        ("qwen3_moe", 2, 5, 4.0, 1.0, None),
    ],
)
def test_load_merge_and_logits(tmp_path, model_type, r_fc1, r_fc2, alpha_fc1, alpha_fc2, config_order):
    base = _tiny_model(model_type)
    lora = _megatron_lora(2, r_fc1, r_fc2, seed=11)
    s1, s2 = alpha_fc1 / r_fc1, alpha_fc2 / r_fc2
    reference = _manual_merge(base, lora, s1, s2)
    base_gu = [base.model.layers[i].mlp.experts.gate_up_proj.detach().clone() for i in range(2)]
    base_dn = [base.model.layers[i].mlp.experts.down_proj.detach().clone() for i in range(2)]
    _write_adapter(tmp_path, model_type, lora, r_fc1, alpha_fc1, r_fc2, alpha_fc2, config_order)

    pm, peft_warnings, missing, unexpected = _load(base, tmp_path)
    # (a) no missing, no unexpected keys
    assert peft_warnings == []
    assert missing == [] and unexpected == []
    for i in range(2):  # scaling as PEFT computes it = Megatron's alpha/r with the per-expert r
        outer = pm.base_model.model.model.layers[i].mlp.experts
        assert outer.scaling["default"] == pytest.approx(s2) and outer.base_layer.scaling["default"] == pytest.approx(s1)
        # different fc1/fc2 ranks go through rank_pattern; PEFT applies it to ParamWrappers (its
        # "rank_pattern keys did not match any targeted module" warning only looks at target_modules)
        assert outer.r["default"] == r_fc2 and outer.base_layer.r["default"] == r_fc1

    # (c) logits of the (unmerged) PEFT model == base model with the manual per-expert merge
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = pm(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # sanity: the adapter changes the output, so the comparison is not vacuous
    with torch.no_grad(), pm.disable_adapter():
        off = pm(input_ids=ids).logits
    assert (off - want).abs().max() > 1e-3

    # (b) merge_and_unload: every expert == base + scale * B_e @ A_e
    merged = pm.merge_and_unload()
    for i, layer in enumerate(lora):
        experts = merged.model.layers[i].mlp.experts
        for e in range(E):
            want_gu = base_gu[i][e] + s1 * layer["fc1"][1][e] @ layer["fc1"][0][e]
            want_dn = base_dn[i][e] + s2 * layer["fc2"][1][e] @ layer["fc2"][0][e]
            torch.testing.assert_close(experts.gate_up_proj[e].detach(), want_gu, rtol=0, atol=1e-6)
            torch.testing.assert_close(experts.down_proj[e].detach(), want_dn, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the checks above can fail


def test_wrong_packing_is_caught(tmp_path):
    """Packing lora_B expert-major (like lora_A) loads without key errors but merges wrongly."""
    base = _tiny_model("qwen3_5_moe_text")
    lora = _megatron_lora(2, 3, 3, seed=4)

    def expert_major_b(tensors):
        out = {}
        for k, v in tensors.items():
            if k.endswith("lora_B.weight"):  # rebuild as cat over experts: column e*r + k
                a_list, b_list = eh.split_expert_lora(torch.zeros(v.shape[1], 1), v, E)
                v = torch.cat(b_list, dim=1)
            out[k] = v
        return out

    _write_adapter(tmp_path, "qwen3_5_moe_text", lora, 3, 6.0, mangle=expert_major_b)
    base_gu = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    pm, _, missing, unexpected = _load(base, tmp_path)
    assert missing == [] and unexpected == []
    merged = pm.merge_and_unload()
    want = base_gu[1] + 2.0 * lora[0]["fc1"][1][1] @ lora[0]["fc1"][0][1]
    assert (merged.model.layers[0].mlp.experts.gate_up_proj[1].detach() - want).abs().max() > 1e-3


def test_wrong_nesting_is_caught(tmp_path):
    """gate_up_proj's pair saved without base_layer (and down_proj's with it) -> PEFT reports keys."""
    base = _tiny_model("qwen3_moe")
    lora = _megatron_lora(2, 3, 3, seed=4)

    def swap_nesting(tensors):
        out = {}
        for k, v in tensors.items():
            if ".experts.base_layer." in k:
                out[k.replace(".experts.base_layer.", ".experts.")] = v
            else:
                out[k.replace(".experts.", ".experts.base_layer.")] = v
        return out

    _write_adapter(tmp_path, "qwen3_moe", lora, 3, 6.0, mangle=swap_nesting)
    with pytest.raises(RuntimeError, match="size mismatch"):  # shapes differ, so PEFT refuses outright
        _load(base, tmp_path)

    def drop_down(tensors):
        return {k: v for k, v in tensors.items() if ".experts.base_layer." in k}

    _write_adapter(tmp_path, "qwen3_moe", lora, 3, 6.0, mangle=drop_down)
    _, peft_warnings, missing, unexpected = _load(_tiny_model("qwen3_moe"), tmp_path)
    assert len(missing) == 4 and all(".experts.lora_" in k for k in missing) and peft_warnings


def test_config_fields_and_target_module_trap():
    f = eh.expert_adapter_config_fields(8, 16, down_r=4, down_alpha=8)
    assert f["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert f["lora_dropout"] == 0.0 and f["rank_pattern"] == {"mlp.experts.down_proj": 4}
    assert f["alpha_pattern"] == {"mlp.experts.down_proj": 8}
    assert eh.expert_adapter_config_fields(8, 16)["rank_pattern"] == {}

    eh.check_target_modules("qwen3_5_moe_text", ["q_proj", "gate_proj", "up_proj", "down_proj"])
    eh.check_target_modules("qwen3_5_moe", ["down_proj"])
    eh.check_target_modules("qwen3_moe", ["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="down_proj"):
        eh.check_target_modules("qwen3_moe", ["q_proj", "down_proj"])

    # the premise: PEFT really rewrites such a config for qwen3_moe, and leaves qwen3_5_moe_text alone
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    for model_type, rewritten in (("qwen3_moe", True), ("qwen3_5_moe_text", False)):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj"],
                         target_parameters=list(eh.TARGET_PARAMETERS))
        convert_peft_config_for_transformers(cfg, _tiny_model(model_type), None)
        assert (set(cfg.target_modules) == {"q_proj"}) is rewritten
        assert (cfg.rank_pattern.get(r".*\.gate_up_proj") == 8) is rewritten


def test_peft_refuses_dropout(tmp_path):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(_tiny_model("qwen3_moe"),
                       LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=[],
                                  target_parameters=list(eh.TARGET_PARAMETERS)))


def test_conditional_generation_prefix_with_attention_lora(tmp_path):
    """Qwen3.5-MoE ConditionalGeneration (vision tower present): experts under
    ``model.language_model.`` load exactly, alongside an ordinary target_modules LoRA."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, moe_intermediate_size=I_MOE, shared_expert_intermediate_size=32,
                num_experts=E, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=H,
                  num_position_embeddings=16, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    torch.manual_seed(1)
    base = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision)).eval()
    lora = _megatron_lora(2, 3, 3, seed=8)
    tensors = {}
    for i, layer in enumerate(lora):
        keys = eh.expert_adapter_keys(f"model.language_model.layers.{i}.mlp.experts")
        for param, fc in ((eh.GATE_UP, "fc1"), (eh.DOWN, "fc2")):
            tensors[keys[param][0]], tensors[keys[param][1]] = pe.fuse_expert_lora(*layer[fc])
    q = "base_model.model.model.language_model.layers.1.self_attn.q_proj"
    tensors[f"{q}.lora_A.weight"] = torch.randn(3, H) * 0.1
    tensors[f"{q}.lora_B.weight"] = torch.randn(2 * 4 * 16, 3) * 0.1
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "target_modules": ["q_proj"],
           **eh.expert_adapter_config_fields(3, 6.0)}
    eh.check_target_modules("qwen3_5_moe", cfg["target_modules"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base_gu = base.model.language_model.layers[1].mlp.experts.gate_up_proj.detach().clone()

    pm, peft_warnings, missing, unexpected = _load(base, tmp_path)
    assert peft_warnings == [] and missing == [] and unexpected == []
    sd = pm.state_dict()
    for k, v in tensors.items():
        loaded = sd[k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")]
        assert torch.equal(loaded, v), k
    assert not any("visual" in k and "lora_" in k for k in sd)  # explicit target_modules: vision untouched
    merged = pm.merge_and_unload()
    for e in range(E):
        want = base_gu[e] + 2.0 * lora[1]["fc1"][1][e] @ lora[1]["fc1"][0][e]
        torch.testing.assert_close(merged.model.language_model.layers[1].mlp.experts.gate_up_proj[e].detach(), want,
                                   rtol=0, atol=1e-6)
