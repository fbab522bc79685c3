"""Tiny Hugging Face DeepSeek-V3, GLM-4.5 MoE, gpt-oss and MiMo models (fp32), for CPU tests.

Supports the CPU demo and tests; the exporter does not use it.

=====================  ===============  =========================  ==========================
function               model_type       class written              MTP tensors added
=====================  ===============  =========================  ==========================
tiny_deepseek_v3       ``deepseek_v3``  ``DeepseekV3ForCausalLM``  ``model.layers.{N+i}.*``
tiny_deepseek_v3(...,  ``kimi_k2``      same (Kimi-K2 declares     same
  model_type="kimi_k2")                 ``kimi_k2`` over V3)
tiny_glm4_moe          ``glm4_moe``     ``Glm4MoeForCausalLM``     ``model.layers.{N+i}.*``
tiny_glm4_moe_lite     ``glm4_moe_lite``  ``Glm4MoeLiteForCausalLM``  ``model.layers.{N+i}.*``
tiny_gpt_oss           ``gpt_oss``      ``GptOssForCausalLM``      none (no MTP)
tiny_mimo              ``mimo``         ``Qwen2ForCausalLM``       ``model.mtp_layers.{i}.*``
=====================  ===============  =========================  ==========================

transformers models no MTP layer and writes none, whatever ``num_nextn_predict_layers`` says;
these functions add random MTP tensors to the saved safetensors in the layout of the published
checkpoints (DeepSeek-V3 / GLM-4.5: a whole decoder layer at index ``num_hidden_layers + i``
with ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head`` and its own
``embed_tokens``; MiMo: ``model.mtp_layers.{i}`` with ``token_layernorm``, ``hidden_layernorm``,
``input_proj``, ``final_layernorm`` around a Qwen2 decoder layer). MTP ``embed_tokens`` and
``shared_head.head`` are copies of the main model's embedding and output layer (Megatron
shares them), so the file is what a trained checkpoint holds.

MiMo is Xiaomi's remote-code architecture (``MiMoForCausalLM``: Qwen2 plus ``mtp_layers``);
its main model is transformers' Qwen2 (``Qwen2ForCausalLM``); :mod:`model_mappings.mimo`
registers its config for ``AutoConfig``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge_ext.cpu.tiny_models import add_saved_tensors, update_saved_config

VOCAB = 128
HIDDEN = 64
INIT_STD = 0.02
NORM_NOISE = 0.1
ROUTER_STD = 0.5


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norms around 1 (not exactly 1), routers well separated, biases non-zero."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("e_score_correction_bias"):
                param.add_(torch.randn(param.shape, generator=generator) * NORM_NOISE)
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.copy_(torch.randn(param.shape, generator=generator) * ROUTER_STD)
            elif name.endswith(("bias", "sinks")):
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * NORM_NOISE)


def _save(model, out: Path, config_updates: dict, make_extra=None) -> Path:
    """``save_pretrained``, then ``make_extra(saved tensors)`` added to the file, config updated."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    extra = make_extra(load_file(str(out / "model.safetensors"))) if make_extra else {}
    if extra:
        add_saved_tensors(out, extra)
    update_saved_config(out, config_updates)
    return out


def _mtp_decoder_layer(saved: dict[str, torch.Tensor], layer: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped like saved decoder layer ``layer`` (on-disk layout)."""
    prefix = f"model.layers.{layer}."
    out = {}
    for name, tensor in sorted(saved.items()):
        if name.startswith(prefix):
            is_norm = name.endswith("norm.weight")
            std = NORM_NOISE if is_norm or "bias" in name else INIT_STD
            out[name[len(prefix):]] = torch.randn(tensor.shape, generator=generator) * std + (1 if is_norm else 0)
    return out


def _deepseek_style_mtp(state: dict[str, torch.Tensor], num_layers: int, mtp_layers: int,
                        seed: int) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 / GLM-4.5 MTP layers: ``model.layers.{num_layers + i}``."""
    generator = torch.Generator().manual_seed(seed + 1000)
    tensors = {}
    for depth in range(mtp_layers):
        p = f"model.layers.{num_layers + depth}."
        inner = _mtp_decoder_layer(state, num_layers - 1, generator)
        tensors.update({p + name: value for name, value in inner.items()})
        tensors.update({
            p + "enorm.weight": 1 + torch.randn(HIDDEN, generator=generator) * NORM_NOISE,
            p + "hnorm.weight": 1 + torch.randn(HIDDEN, generator=generator) * NORM_NOISE,
            p + "eh_proj.weight": torch.randn(HIDDEN, 2 * HIDDEN, generator=generator) * INIT_STD,
            p + "shared_head.norm.weight": 1 + torch.randn(HIDDEN, generator=generator) * NORM_NOISE,
            p + "shared_head.head.weight": state["lm_head.weight"].clone(),
            p + "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
        })
    return tensors


def _deepseek_kwargs(q_lora_rank: int | None) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=32, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )


def tiny_deepseek_v3(directory: str | Path, mtp_layers: int = 1, *, model_type: str = "deepseek_v3",
                     q_lora_rank: int | None = 24, seed: int = 0) -> Path:
    """A ``DeepseekV3ForCausalLM``: MLA, 1 dense + 2 MoE layers (4 experts, 1 shared), MTP.

    ``q_lora_rank=None`` gives plain ``q_proj`` (Moonlight; megatron-core 0.19.2's local spec
    cannot build that MLA, see :func:`bridge_ext.cpu.gpt_families._local_mla`);
    ``model_type="kimi_k2"`` writes the model type Kimi-K2's config.json declares over the same
    architecture.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**_deepseek_kwargs(q_lora_rank))
    model = DeepseekV3ForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    updates = {"num_nextn_predict_layers": mtp_layers, "model_type": model_type}
    return _save(model, Path(directory), updates,
                 lambda saved: _deepseek_style_mtp(saved, config.num_hidden_layers, mtp_layers, seed))


def tiny_glm4_moe(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """A ``Glm4MoeForCausalLM``: partial rotary, qkv bias, q/k norms, 1 dense + 2 MoE layers, MTP."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    config = Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True, use_qk_norm=True,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=INIT_STD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    model = Glm4MoeForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _save(model, Path(directory), {"num_nextn_predict_layers": mtp_layers},
                 lambda saved: _deepseek_style_mtp(saved, config.num_hidden_layers, mtp_layers, seed))


# transformers' MLA builds q_a_layernorm / kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says;
# Megatron (and vLLM) use rms_norm_eps. Published GLM-4.7-Flash says 1e-5, where transformers'
# forward differs from both by that eps (6% of the largest logit on this tiny model after a routing
# flip); the tiny model takes 1e-6 so that transformers' forward can judge the table's names.
LATENT_NORM_EPS = 1e-6


def tiny_glm4_moe_lite(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """A ``Glm4MoeLiteForCausalLM`` cut down from GLM-4.7-Flash's config.json: MLA with a query
    rank, as many KV heads as query heads, ``qk_nope_head_dim + qk_rope_head_dim == v_head_dim``
    with ``v_head_dim != qk_nope_head_dim`` (192 + 64 = 256 there), 1 dense + 2 MoE layers
    (``mlp_layer_types`` and ``first_k_dense_replace``, both as published), 4 experts top-2,
    1 shared, MTP. ``kv_b_proj`` has 128 rows, one FP8 block, as the published 8960 rows are 70
    (transformers 5.23's CPU dequantization of a partial second row
    block is off; the format's own definition is checked in tests/test_fp8_export.py)."""
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    torch.manual_seed(seed)
    config = Glm4MoeLiteConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"], num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True, kv_lora_rank=32, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        initializer_range=INIT_STD, rms_norm_eps=LATENT_NORM_EPS,
    )
    model = Glm4MoeLiteForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    updates = {"num_nextn_predict_layers": mtp_layers, "first_k_dense_replace": 1, "topk_method": "noaux_tc"}
    return _save(model, Path(directory), updates,
                 lambda saved: _deepseek_style_mtp(saved, config.num_hidden_layers, mtp_layers, seed))


def tiny_glm_moe_dsa(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """A ``GlmMoeDsaForCausalLM`` (GLM-5) cut down from its config.json: MLA as GLM-4.7-Flash's,
    the DSA indexer (2 heads of 16, top-4), 1 dense + 2 MoE layers, MTP; indexer top-k shared
    every second layer (``index_topk_freq: 2``, ``index_skip_topk_offset: 1``), so layer 1 holds
    no indexer, as GLM-5's shared layers; ``indexer_rope_interleave`` as Megatron-Bridge reads it."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    config = GlmMoeDsaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=32, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20, index_topk=4, index_head_dim=16,
        index_n_heads=2, index_topk_freq=2, index_skip_topk_offset=1, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        initializer_range=INIT_STD, rms_norm_eps=LATENT_NORM_EPS,
    )
    model = GlmMoeDsaForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    updates = {"num_nextn_predict_layers": mtp_layers, "indexer_rope_interleave": True, "index_topk_freq": 2,
               "index_skip_topk_offset": 1, "topk_method": "noaux_tc"}
    return _save(model, Path(directory), updates,
                 lambda saved: _deepseek_style_mtp(saved, config.num_hidden_layers, mtp_layers, seed))


def tiny_gpt_oss(directory: str | Path, *, seed: int = 0, rope_parameters: dict | None = None) -> Path:
    """A ``GptOssForCausalLM``: 2 layers (sliding, full), 4 experts top-2, sinks, biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=INIT_STD,
        rope_parameters=rope_parameters or {
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": False,
        },
    )
    model = GptOssForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _save(model, Path(directory), {})


def tiny_mimo(directory: str | Path, mtp_layers: int = 1, *, seed: int = 0) -> Path:
    """A MiMo model: a Qwen2 decoder (qkv bias) saved with ``model_type: mimo`` plus MTP layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model_mappings import register_transformers_configs

    register_transformers_configs()  # MiMoConfig for AutoConfig

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=INIT_STD)
    model = Qwen2ForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))

    def mtp(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + 1000)
        extra = {}
        for depth in range(mtp_layers):
            p = f"model.mtp_layers.{depth}."
            extra.update({p + name: value for name, value in _mtp_decoder_layer(saved, 1, generator).items()})
            for norm in ("token_layernorm", "hidden_layernorm", "final_layernorm"):
                extra[p + f"{norm}.weight"] = 1 + torch.randn(HIDDEN, generator=generator) * NORM_NOISE
            extra[p + "input_proj.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=generator) * INIT_STD
        return extra

    updates = {"model_type": "mimo", "architectures": ["MiMoForCausalLM"], "num_nextn_predict_layers": mtp_layers}
    return _save(model, Path(directory), updates, mtp)
