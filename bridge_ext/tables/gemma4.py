"""Which Gemma 4 text configs the generated ``gemma4_text`` table is proven for (reviewed by hand
against Megatron-Bridge 0.6.2's ``Gemma4Bridge._build_dense_provider`` and transformers 5.23).

transformers 5.15 and later keep each layer's head dim and KV heads in ``per_layer_config`` only;
Megatron-Bridge reads ``config.head_dim`` (allowed by ``allow_global_per_layer_attribute_access``:
the sliding layers') and gives every global layer its defaults, 512 wide and
``num_key_value_heads`` KV heads: right for E2B / E4B, wrong for any other global layer. Its MoE
provider (26B-A4B) needs Transformer Engine and K=V global layers (31B) take fewer KV heads: neither
is built, so neither is proven.
"""

from __future__ import annotations

from bridge_ext.dims import text_config
from bridge_ext.errors import TableError

#: Megatron-Bridge 0.6.2's global-layer head dim (``global_kv_channels``' default)
GLOBAL_HEAD_DIM = 512
FLAG = "allow_global_per_layer_attribute_access"


def check_text_config(config) -> None:
    """Refuse a Gemma 4 text config whose layers Megatron-Bridge 0.6.2 builds otherwise than transformers."""
    text = text_config(config)
    if getattr(text, "enable_moe_block", False):
        raise TableError("gemma4_text with enable_moe_block: Megatron-Bridge 0.6.2's MoE provider needs "
                         "Transformer Engine; only the dense (E2B / E4B-shaped) table is proven")
    if getattr(text, "attention_k_eq_v", False):
        raise TableError("gemma4_text with attention_k_eq_v: Megatron-Bridge 0.6.2 gives K=V global layers "
                         "num_key_value_heads KV heads, not the config's; not proven")
    layers, kinds = getattr(text, "per_layer_config", None), getattr(text, "layer_types", None)
    if not layers or not kinds or len({len(layers), len(kinds), text.num_hidden_layers}) != 1:
        raise TableError("gemma4_text without per_layer_config / layer_types for every layer: the table reads "
                         "each layer's head dim there (transformers 5.15 and later)")
    try:
        head_dim = text.head_dim
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        raise TableError(f"gemma4_text: transformers reads head_dim per layer; Megatron-Bridge 0.6.2 needs {FLAG}"
                         f"=True (pass it to AutoBridge.from_hf_pretrained, or set it in config.json)") from None
    widths = {"sliding_attention": head_dim, "full_attention": GLOBAL_HEAD_DIM}
    for index, (layer, kind) in enumerate(zip(layers, kinds)):
        wanted = (widths.get(kind), text.num_key_value_heads)
        if (layer.head_dim, layer.num_key_value_heads) != wanted:
            raise TableError(f"gemma4_text layer {index} ({kind}): head dim {layer.head_dim} and "
                             f"{layer.num_key_value_heads} KV heads, where Megatron-Bridge 0.6.2 builds {wanted[0]} "
                             f"and {wanted[1]} (its global layers are {GLOBAL_HEAD_DIM} wide with "
                             "num_key_value_heads KV heads: E2B / E4B); not proven")
