"""Tiny Qwen3-MoE, Qwen2-MoE, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE models (fp32), for CPU tests.

Text shapes: 2 layers, hidden 64, 4 query heads / 2 KV heads of dim 16, vocab 128; MoE with 4
experts of width 32, top 2 (Qwen2-MoE: a shared expert of width 48 behind its sigmoid gate).
Each model is saved with ``save_pretrained``, i.e. in transformers' own save-time layout.
Norm weights get a random offset (a norm mapped to the wrong place shows in the logits) and
routers a larger std (top-k choices far from ties), as in :mod:`bridge_ext_testing.tiny_models`.
Supports the CPU demo and tests; the exporter does not use it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge_ext_testing.tiny_models import _perturb

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _save(model, directory: str | Path, seed: int) -> Path:
    _perturb(model, torch.Generator().manual_seed(seed))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def tiny_qwen3_moe(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen3_moe`` model (``Qwen3MoeForCausalLM``), experts per expert on disk."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**TEXT, **MOE, intermediate_size=96, norm_topk_prob=True)
    return _save(Qwen3MoeForCausalLM(config).float().eval(), directory, seed)


def tiny_qwen2_moe(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen2_moe`` model (``Qwen2MoeForCausalLM``): qkv bias, gated shared expert.

    ``norm_topk_prob=False`` as in the published Qwen1.5/Qwen2-MoE configs (softmax over all
    experts, top-k weights not renormalised).
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(**TEXT, **MOE, intermediate_size=96, shared_expert_intermediate_size=48,
                            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen2MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # transformers initialises biases to zero; a wrong bias mapping must show
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.05)
    return _save(model, directory, seed)


def _vision(deepstack: bool) -> dict:
    """Vision tower: 2 blocks of width 32 (2 heads), patch 4, temporal patch 2, spatial merge 2."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"])
    if deepstack:  # Qwen3-VL: a deepstack merger after block 0 feeds the first decoder layer
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")
    return vision


def _vl_tokens() -> dict:
    from bridge_ext_testing.tiny_models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID

    return dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
                vision_start_token_id=VISION_START_TOKEN_ID, vision_end_token_id=VISION_END_TOKEN_ID)


def tiny_qwen3_vl(directory: str | Path, *, moe: bool = False, seed: int = 0) -> Path:
    """Save a tiny ``qwen3_vl`` (or ``qwen3_vl_moe``) image-text model.

    Interleaved MRoPE over the 8 rotary frequencies of a 16-wide head (sections 4/2/2); the
    MoE type's experts are written fused and transposed (``gate_up_proj [E, H, 2I]``), as
    transformers saves them. Use :func:`bridge_ext_testing.tiny_models.tiny_vl_inputs` for a prompt.
    """
    if moe:
        from transformers import Qwen3VLMoeConfig as Config
        from transformers import Qwen3VLMoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

    torch.manual_seed(seed)
    text = dict(TEXT, intermediate_size=96, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    if moe:
        # moe width 48: with 2 * 32 == hidden, transformers cannot tell [E, H, 2I] from [E, 2I, H] on load
        text.update(MOE, moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    config = Config(text_config=text, vision_config=_vision(deepstack=True), tie_word_embeddings=False, **_vl_tokens())
    return _save(Model(config).float().eval(), directory, seed)


def tiny_qwen2_5_vl(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny ``qwen2_5_vl`` image-text model: a Qwen2 decoder (qkv bias, MRoPE sections
    4/2/2 over 8 frequencies) and a vision tower of RMSNorms and gated MLPs with window
    attention in block 0 (8-pixel windows: one merged 2x2 patch group each, four windows in a
    16x16 image) and full attention in block 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, intermediate_size=96, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [4, 2, 2]})
    vision = dict(_vision(deepstack=False), hidden_act="silu", window_size=8, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_vl_tokens())
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # a wrong qkv bias mapping must show
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.05)
    return _save(model, directory, seed)
