"""Block-FP8 exports of real tiny Megatron models (Qwen3, Qwen3-MoE, DeepSeek-V3 and GLM-4.7-Flash MLA,
Qwen3.5-MoE).

What must be FP8 is written here from the engine's side (vLLM quantizes every linear it builds
with the quantization config except the ones it keeps unquantized), not read off the tables.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from bridge_ext import export_hf_weights, quantization_config, save_hf_pretrained
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.tiny_dense import tiny_dense
from bridge_ext_testing.tiny_frontier import tiny_minimax_m2
from bridge_ext_testing.tiny_gpt_families import tiny_deepseek_v3, tiny_glm4_moe_lite
from bridge_ext_testing.tiny_models import tiny_qwen35_moe
from bridge_ext_testing.tiny_qwen_moe_vl import tiny_qwen3_moe
from bridge_ext.engine import PEFT_PREFIX, ExportError
from bridge_ext.export import export_hf_buckets
from bridge_ext.fp8_export import check_engine_blocks, plan_fp8
from bridge_ext.tables import table_for

MAKERS = {
    "qwen3": lambda d: tiny_dense(d, "qwen3"),
    "qwen3_moe": tiny_qwen3_moe,
    "deepseek_v3": tiny_deepseek_v3,
    "glm4_moe_lite": tiny_glm4_moe_lite,
    "qwen3_5_moe_text": tiny_qwen35_moe,
    "minimax_m2": tiny_minimax_m2,
}
# Linear leaves the engine runs in FP8 (fused experts: their parameters); everything under
# ``mtp.`` (Qwen3.5's MTP block) stays bf16, DeepSeek's MTP decoder layer is FP8 like the others.
FP8_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj", "q_b_proj",
              "kv_a_proj_with_mqa", "kv_b_proj", "in_proj_qkv", "in_proj_z", "out_proj",
              "w1", "w2", "w3"}  # MiniMax-M2's per-expert gate / down / up
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
E4M3_HALF_ULP_AT_MAX = 16.0  # e4m3 spacing is 32 in [256, 448]: rounding moves a value by at most 16 * scale


def engine_quantizes(name: str) -> bool:
    if name.startswith("mtp."):
        return False
    module, _, leaf = name.rpartition(".")
    return (leaf == "weight" and module.rpartition(".")[2] in FP8_LEAVES) or name.endswith(FUSED_EXPERTS)


@pytest.fixture(scope="module", params=list(MAKERS))
def built(request, megatron_cpu, tmp_path_factory):
    hf_dir = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    model = build_megatron_model(hf_dir)
    model.model_type = request.param
    model.bf16 = dict(export_hf_weights(model.chunks, peft=False))
    model.fp8 = dict(export_hf_weights(model.chunks, peft=False, quantize="fp8", engine_tp_size=None))
    return model


def dequantize(quantized: torch.Tensor, scale: torch.Tensor, parts: int) -> torch.Tensor:
    """Written from the format: each of ``parts`` row parts has its own 128x128 blocks."""
    *lead, rows, cols = quantized.shape
    pieces = quantized.to(torch.float32).reshape(*lead, parts, rows // parts, cols)
    grid = scale.reshape(*lead, parts, -1, scale.shape[-1])
    expanded = grid.repeat_interleave(128, -2)[..., :rows // parts, :].repeat_interleave(128, -1)[..., :cols]
    return (pieces * expanded).reshape(quantized.shape), expanded.reshape(quantized.shape)


def test_every_engine_fp8_weight_is_quantized_and_dequantizes_within_e4m3(built):
    bf16, fp8 = built.bf16, built.fp8
    quantized = sorted(name for name in bf16 if engine_quantizes(name))
    assert quantized, "nothing to quantize"
    assert sorted(fp8) == sorted([*bf16, *(name + "_scale_inv" for name in quantized)])
    worst = 0.0
    for name, reference in bf16.items():
        if name not in quantized:
            assert fp8[name].dtype == reference.dtype and torch.equal(fp8[name], reference), name
            continue
        q, scale = fp8[name], fp8[name + "_scale_inv"]
        parts = 2 if name.endswith("gate_up_proj") else 1
        *lead, rows, cols = reference.shape
        assert q.dtype == torch.float8_e4m3fn and q.shape == reference.shape, name
        assert scale.dtype == torch.float32, name
        assert tuple(scale.shape) == (*lead, parts * math.ceil(rows / parts / 128), math.ceil(cols / 128)), name
        values, expanded = dequantize(q, scale, parts)
        error = (values - reference.float()).abs()
        assert (error <= E4M3_HALF_ULP_AT_MAX * expanded).all(), name
        worst = max(worst, float((error / (expanded * 448)).max()))
    print(f"{built.model_type}: {len(quantized)} FP8 tensors, max error relative to the block's amax {worst:.4f}")
    assert worst <= E4M3_HALF_ULP_AT_MAX / 448


def test_not_converted_list_is_exact(built):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = quantization_config(built.chunks, engine_tp_size=None)
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    kept, ignored = config["modules_to_not_convert"], config["ignored_layers"]
    quantized_modules = {name.removesuffix("_scale_inv").rpartition(".")[0] for name in built.fp8
                         if name.endswith("_scale_inv")}
    exported_modules = {name.rpartition(".")[0] for name in built.bf16}
    assert len(set(kept)) == len(kept) and set(kept) <= exported_modules
    assert not [(entry, module) for entry in ignored for module in quantized_modules if entry in module]
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(built.hf_dir)))
    linears = {name for name, module in hf_model.named_modules() if isinstance(module, torch.nn.Linear)}
    modules = dict(hf_model.named_modules())
    # every linear transformers builds is FP8 or listed, never both; the others listed are routers
    # (transformers v5 gives them their own class; MiniMax-M2's checkpoint spells mlp.gate
    # block_sparse_moe.gate) or MTP modules transformers does not build
    assert linears <= quantized_modules | set(kept) and not linears & quantized_modules & set(kept)
    mtp = f"model.layers.{hf_model.config.num_hidden_layers}."
    others = set(kept) - linears
    in_memory = {m: m.replace(".block_sparse_moe.", ".mlp.") for m in others}
    assert all(m.startswith(("mtp.", mtp)) or (in_memory[m].endswith(".mlp.gate") and in_memory[m] in modules)
               for m in others), others
    if built.model_type == "qwen3_5_moe_text":
        assert "model.layers.0.linear_attn.in_proj_ba" in ignored and "model.layers.0.linear_attn.in_proj_b" in kept
        assert "model.layers.0.linear_attn.in_proj_ba" not in kept
    if built.model_type in ("qwen3_moe", "deepseek_v3", "glm4_moe_lite", "qwen3_5_moe_text"):
        assert any(m.endswith(".mlp.gate") and m.startswith("model.layers.") for m in kept)
    if built.model_type == "minimax_m2":  # as the published FP8 checkpoint's modules_to_not_convert
        assert "model.layers.0.block_sparse_moe.gate" in kept


def test_transformers_loads_the_saved_fp8_folder_with_close_logits(built, tmp_path):
    from transformers import AutoModelForCausalLM

    save_hf_pretrained(built.chunks, tmp_path / "fp8", quantize="fp8", engine_tp_size=None)
    saved = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert saved["quantization_config"] == quantization_config(built.chunks, engine_tp_size=None)
    fp8_model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32,
                                                           output_loading_info=True)
    mtp = f"model.layers.{fp8_model.config.num_hidden_layers}."  # DeepSeek's MTP layer: transformers builds none
    unexpected = [key for key in info["unexpected_keys"] if not key.startswith(mtp)]
    assert not info["missing_keys"] and not unexpected and not info["mismatched_keys"]
    # the same tensors dequantized by the format's definition, as a plain folder
    dequantized = {name: dequantize(built.fp8[name], built.fp8[name + "_scale_inv"],
                                    2 if name.endswith("gate_up_proj") else 1)[0]
                   if name + "_scale_inv" in built.fp8 else tensor for name, tensor in built.bf16.items()}
    (tmp_path / "dq").mkdir()
    save_file({name: tensor.clone() for name, tensor in dequantized.items()}, str(tmp_path / "dq" / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(built.hf_dir / "config.json", tmp_path / "dq" / "config.json")
    input_ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = fp8_model(input_ids=input_ids).logits
        exact = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dq"), dtype=torch.float32)(input_ids=input_ids).logits
        bf16 = AutoModelForCausalLM.from_pretrained(str(built.hf_dir), dtype=torch.float32)(input_ids=input_ids).logits
    assert torch.allclose(ours, exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    relative = float((ours - bf16).abs().max() / bf16.abs().max())
    print(f"{built.model_type}: FP8 folder logits vs bf16, max difference relative to the largest logit {relative:.4f}")
    assert 0 < relative < 0.15  # e4m3 moves each weight by up to 3.6% of its block's amax


@pytest.mark.parametrize("built", ["qwen3_moe"], indirect=True)
def test_buckets_carry_the_same_fp8_tensors(built):
    pairs = [pair for bucket in export_hf_buckets(built.chunks, 1 << 14, peft=False, quantize="fp8",
                                                  engine_tp_size=None) for pair in bucket.tensors]
    assert [name for name, _ in pairs] == list(built.fp8)
    assert all(torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           built.fp8[n].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else built.fp8[n])
               for n, t in pairs)


@pytest.mark.parametrize("built", ["qwen3"], indirect=True)
def test_validation_before_the_first_tensor(built):
    with pytest.raises(ExportError, match="quantize must be None or one of"):
        next(export_hf_weights(built.chunks, peft=False, quantize="int4"))
    # tiny widths: q_proj's 64 rows are the first part of vLLM's merged qkv_proj at TP 1
    with pytest.raises(ExportError, match=r"engine tensor-parallel size 1: model\.layers\.0\.self_attn\.q_proj\.weight"):
        next(export_hf_weights(built.chunks, peft=False, quantize="fp8"))
    with pytest.raises(ExportError, match="engine_tp_size must be"):
        next(export_hf_weights(built.chunks, peft=False, quantize="fp8", engine_tp_size=0))
    table = table_for(_config(built.hf_dir))
    with pytest.raises(ExportError, match="has no FP8 rules"):
        plan_fp8(replace(table, fp8=None), {}, 1)


def test_quantization_config_of_a_config(built):
    config = _config(built.hf_dir)
    if built.model_type in ("deepseek_v3", "glm4_moe_lite", "qwen3_5_moe_text"):  # MTP layers: names outside transformers' key set
        with pytest.raises(ExportError, match="pass the model itself"):
            quantization_config(config, engine_tp_size=None)
    else:
        assert quantization_config(config, engine_tp_size=None) == quantization_config(built.chunks, engine_tp_size=None)


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def test_adapters_stay_bf16_beside_an_fp8_base(megatron_cpu, tmp_path):
    model = build_megatron_model(tiny_dense(tmp_path / "hf", "qwen3"), lora=LoraSettings())
    randomize_lora(model.chunks, seed=1)
    plain = dict(export_hf_weights(model.chunks))
    fp8 = dict(export_hf_weights(model.chunks, quantize="fp8", engine_tp_size=None))
    adapters = {name for name in plain if name.startswith(PEFT_PREFIX)}
    assert adapters and all(torch.equal(fp8[name], plain[name]) for name in adapters)
    assert fp8["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert not any(name.startswith(PEFT_PREFIX) and name.endswith("_scale_inv") for name in fp8)


def test_gpt_oss_fp8_is_refused_with_the_reason():
    from transformers import GptOssConfig

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4)
    with pytest.raises(ExportError, match="gpt-oss loader does not load block-FP8 expert scales"):
        quantization_config(config)


def test_engine_block_check_follows_vllm_at_its_tensor_parallel_size():
    # Qwen3-30B-A3B widths: hidden 2048, 32 query / 4 KV heads of 128, experts' intermediate 768.
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (4096, 2048),
        "model.layers.0.self_attn.k_proj.weight": (512, 2048),
        "model.layers.0.self_attn.v_proj.weight": (512, 2048),
        "model.layers.0.self_attn.o_proj.weight": (2048, 4096),
        "model.layers.0.mlp.experts.0.gate_proj.weight": (768, 2048),
        "model.layers.0.mlp.experts.0.up_proj.weight": (768, 2048),
        "model.layers.0.mlp.experts.0.down_proj.weight": (2048, 768),
    }
    gemms = table_for(_qwen3_moe_config()).fp8.gemms
    for tp in (1, 2):
        check_engine_blocks(gemms, shapes, tp)
    # 768 / 4 = 192 rows per rank: vLLM refuses Qwen3-30B-A3B block FP8 at TP 4
    with pytest.raises(ExportError, match=r"size 4: model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        check_engine_blocks(gemms, shapes, 4)
    with pytest.raises(ExportError, match=r"size 8: model\.layers\.0\.self_attn\.k_proj\.weight"):
        check_engine_blocks(gemms, shapes, 8)  # 4 KV heads over 8 ranks: 64 rows each


def _qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(num_hidden_layers=1)
