"""Tiny Qwen3-MoE, Qwen2-MoE, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE models (fp32), for CPU tests.

Text shapes: 2 layers, hidden 64, 4 query heads / 2 KV heads of dim 16, vocab 128; MoE with 4
experts of width 32, top 2 (Qwen2-MoE: a shared expert of width 48 behind its sigmoid gate).
Each model is saved with ``save_pretrained``, i.e. in transformers' own save-time layout.
Norm weights get a random offset (a norm mapped to the wrong place shows in the logits) and
routers a larger std (top-k choices far from ties), as in :mod:`bridge_ext.cpu.tiny_models`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge_ext.cpu.tiny_models import _perturb

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
