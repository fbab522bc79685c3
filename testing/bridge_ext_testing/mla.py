"""A core attention for Multi-head Latent Attention (MLA) with megatron-core's local spec.

Supports the CPU demo and tests (building DeepSeek-V3-style models without Transformer
Engine); the exporter does not use it.

megatron-core's ``MLASelfAttention`` builds its core attention with ``k_channels`` (the
query/key head size ``qk_nope + qk_rope``) and ``v_channels`` (``v_head_dim``); the local
``DotProductAttention`` assumes one head size and does not accept them. This one is a plain
causal ``scaled_dot_product_attention`` with MLA's own ``softmax_scale`` (which already holds
the YaRN ``mscale``), returning ``[s, b, heads * v_head_dim]``.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.module import MegatronModule


class MLACoreAttention(MegatronModule):
    """Causal attention over ``[s, b, heads, dim]`` query/key/value with separate k/v sizes."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.hidden_size_per_attention_head_v = v_channels

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("MLACoreAttention runs unpacked causal attention without bias")
        seq, batch = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
