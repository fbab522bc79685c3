"""Tiny Hugging Face MiniMax-M2 models (fp32), cut down from the published config.json, for CPU tests.

Supports the CPU tests; the exporter does not use it.

``tiny_minimax_m2``: ``MiniMaxM2ForCausalLM`` (``model_type: minimax_m2``) as MiniMaxAI/MiniMax-M2's
config.json describes it, with the widths cut down and every structural feature kept: GQA with
full-width q/k RMSNorms (``qk_norm_type: per_layer``, weights ``[heads * head_dim]``), partial
rotary through the legacy ``rotary_dim`` (half the head dim), every layer MoE with a sigmoid
router and its correction bias (``use_routing_bias``, ``scoring_func: sigmoid``), no shared
expert, untied output layer, and the published MTP keys (``use_mtp``, ``num_mtp_modules: 3``,
``mtp_transformer_layers: 1``) but no MTP tensors: the published safetensors hold none that is
trained (MiniMax-AI/MiniMax-M2 issue 47, MiniMax-M2.7 issue 16), Megatron-Bridge 0.6.2 maps none
and vLLM 0.34's ``MiniMaxM2Model`` drops ``model.layers.{num_hidden_layers + i}`` on load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge_ext_testing.tiny_gpt_families import INIT_STD, _perturb, _save

VOCAB = 128
HIDDEN = 64

# MiniMaxAI/MiniMax-M2 config.json keys that transformers' MiniMaxM2Config does not declare,
# kept as published: vLLM reads scoring_func / use_routing_bias / num_mtp_modules.
MINIMAX_M2_PUBLISHED = {
    "scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True, "qk_norm_type": "per_layer",
    "use_mtp": True, "num_mtp_modules": 3, "mtp_transformer_layers": 1, "shared_intermediate_size": 0,
}


def tiny_minimax_m2(directory: str | Path, *, seed: int = 0) -> Path:
    """A ``MiniMaxM2ForCausalLM``: 2 MoE layers (4 experts, top 2), 4 query / 2 KV heads of 16,
    rotary on 8 of 16 dims, full-width q/k norms."""
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    torch.manual_seed(seed)
    config = MiniMaxM2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=INIT_STD,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
    )
    model = MiniMaxM2ForCausalLM(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    return _save(model, Path(directory), {**MINIMAX_M2_PUBLISHED, "rotary_dim": 8})


def tiny_kimi_k25(directory: str | Path, *, seed: int = 0) -> Path:
    """A ``KimiK25ForConditionalGeneration`` (transformers' ``Kimi_K25ForConditionalGeneration``):
    the tiny DeepSeek-V3 text model of :func:`bridge_ext_testing.tiny_gpt_families.tiny_deepseek_v3`
    (MLA, 1 dense + 2 MoE layers, a shared expert, no MTP as published) and a one-block vision
    tower of width 32, saved in the published naming (``saved_name_fixes`` of
    :mod:`bridge_ext.tables.kimi_k25` applied to what transformers writes)."""
    import re

    from safetensors.torch import load_file, save_file
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    from bridge_ext_testing.tiny_gpt_families import _deepseek_kwargs
    from bridge_ext_testing.tiny_models import update_saved_config
    from bridge_ext.tables.kimi_k25 import MODEL_CLASS, SAVED_NAME_FIXES

    torch.manual_seed(seed)
    text = {**_deepseek_kwargs(24), "num_nextn_predict_layers": 0, "model_type": "deepseek_v3"}
    vision = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=48,
                  pos_emb_height=4, pos_emb_width=4, pos_emb_time=2)
    config = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=32,
                            tie_word_embeddings=False, image_token_id=120, video_token_id=121,
                            vision_start_token_id=122, vision_end_token_id=123)
    model = Kimi_K25ForConditionalGeneration(config).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    out = _save(model, Path(directory), {"architectures": [MODEL_CLASS]})
    saved = load_file(str(out / "model.safetensors"))
    for pattern, replacement in SAVED_NAME_FIXES:
        saved = {re.sub(pattern, replacement, name): tensor for name, tensor in saved.items()}
    save_file(saved, str(out / "model.safetensors"), metadata={"format": "pt"})
    # as published: transformers reads kimi_k2 as DeepSeek-V3; vLLM builds the router's
    # e_score_correction_bias only with noaux_tc
    update_saved_config(out, {"model_type": "kimi_k2", "topk_method": "noaux_tc"}, nested=True)
    return out


def tiny_nemotron_h(directory: str | Path, *, seed: int = 0) -> Path:
    """A ``NemotronHForCausalLM`` with every layer kind once (``hybrid_override_pattern`` ``ME*-``:
    Mamba-2, MoE with a shared expert, attention, squared-ReLU MLP), as Nemotron-H / Nemotron-3
    configs lay them out; 8 Mamba heads of 8 in 2 groups of state 16 (so ``in_proj`` parts differ:
    z, x 64 rows, B, C 32, dt 8), 4 query / 2 KV heads of 16, 4 experts top 2. The published
    ``chunk_size`` (128) is kept: Megatron-Bridge copies the spec for any other."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, hybrid_override_pattern="ME*-", num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
        ssm_state_size=16, conv_kernel=4, expand=1, chunk_size=128, n_routed_experts=4, n_shared_experts=1,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, num_experts_per_tok=2,
        num_nextn_predict_layers=0, tie_word_embeddings=False, max_position_embeddings=256,
        initializer_range=INIT_STD, use_mamba_kernels=False,
    )
    model = NemotronHForCausalLM(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    _perturb(model, generator)
    with torch.no_grad():  # Mamba's per-head parameters off their initial values too
        for name, param in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias")):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return _save(model, Path(directory), {})
