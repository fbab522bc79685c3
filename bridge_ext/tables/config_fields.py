"""Which Hugging Face config field is which Megatron model setting: the fields that change the arithmetic.

Compared before the first tensor of every export (live and ``bridge-ext convert``) by
:func:`bridge_ext.config_compare.compare`. The pairs are Megatron-Bridge's own
(``MegatronModelBridge.CONFIG_MAPPING``, ``YARN_ROPE_SCALING_MAPPING`` and
``mcore_to_hf_window_size`` in ``models/conversion/``, 0.6.2), restricted to what changes what
the model computes: initialisation, dropout, parallelism, precision and sequence length are
left out on purpose. A table whose architecture reads a field otherwise passes its own tuple
(see :func:`standard`), marking what it cannot compare with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from bridge_ext.config_compare import ConfigField

# transformers' activation name -> the function Megatron-Bridge runs for it
# (megatron/bridge/utils/activation_map.py, ACTIVATION_FUNC_MAP).
ACTIVATIONS: dict[str, str] = {
    "silu": "torch.nn.functional.silu",
    "swish": "torch.nn.functional.silu",
    "gelu": "torch.nn.functional.gelu",
    "relu": "torch.nn.functional.relu",
    "sigmoid": "torch.nn.functional.sigmoid",
    "tanh": "torch.tanh",
    "relu2": "megatron.core.activations.squared_relu",
    "gelu_pytorch_tanh": "megatron.core.activations.fast_gelu",
    "quick_gelu": "megatron.core.fusions.fused_bias_geglu.quick_gelu",
}


def _fields(family: str, *pairs: tuple[str, str]) -> tuple[ConfigField, ...]:
    return tuple(ConfigField(family, hf, megatron) for hf, megatron in pairs)


STANDARD: tuple[ConfigField, ...] = (
    *_fields("layers and widths", ("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"),
             ("intermediate_size", "ffn_hidden_size"), ("mlp_bias", "add_bias_linear")),
    ConfigField("activation", "hidden_act", "activation_func", read="activation", hf_values=ACTIVATIONS),
    *_fields("attention", ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
             ("head_dim", "kv_channels"), ("attention_bias", "add_qkv_bias"), ("use_qk_norm", "qk_layernorm")),
    ConfigField("sliding window", "sliding_window", "window_size", read="sliding_window"),
    ConfigField("sliding window", "layer_types", "window_attn_skip_freq", read="layer_types"),
    *_fields("normalization", ("rms_norm_eps", "layernorm_epsilon"), ("layer_norm_eps", "layernorm_epsilon")),
    *_fields("rotary embedding", ("rope_theta", "rotary_base"), ("partial_rotary_factor", "rotary_percent")),
    ConfigField("rotary embedding", "rope_parameters.rope_type", "position_embedding_type", read="rope_type"),
    ConfigField("rotary embedding", "rope_parameters.factor", "rotary scaling factor", read="rope_factor"),
    *_fields("rotary embedding", ("original_max_position_embeddings", "yarn_original_max_position_embeddings"),
             ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")),
    *_fields("mixture of experts", ("num_experts", "num_moe_experts"), ("num_local_experts", "num_moe_experts"),
             ("n_routed_experts", "num_moe_experts"), ("num_experts_per_tok", "moe_router_topk"),
             ("moe_intermediate_size", "moe_ffn_hidden_size"),
             ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
             ("scoring_func", "moe_router_score_function"), ("n_group", "moe_router_num_groups"),
             ("topk_group", "moe_router_group_topk"), ("routed_scaling_factor", "moe_router_topk_scaling_factor")),
    ConfigField("mixture of experts", "norm_topk_prob", "moe_router_pre_softmax", read="topk_normalised"),
    *_fields("vocabulary and tied embeddings", ("vocab_size", "vocab_size"),
             ("tie_word_embeddings", "share_embeddings_and_output_weights")),
    # megatron-core's mtp_num_layers None is no MTP layers (Kimi-K2's config.json says 0)
    ConfigField("multi-token prediction", "num_nextn_predict_layers", "mtp_num_layers", read="count"),
    ConfigField("multi-token prediction", "mtp_num_hidden_layers", "mtp_num_layers", read="count"),
    *_fields("latent attention", ("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"),
             ("qk_nope_head_dim", "qk_head_dim"), ("qk_rope_head_dim", "qk_pos_emb_head_dim"),
             ("v_head_dim", "v_head_dim")),
    # Gated DeltaNet sizes: the same names on both sides (Megatron-Bridge's qwen35_bridge.py)
    *_fields("linear attention", *((name, name) for name in (
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim"))),
)


def standard(uncompared: Mapping[str, str] | None = None,
             defaults: Mapping[str, object] | None = None) -> tuple[ConfigField, ...]:
    """:data:`STANDARD`, with the Hugging Face fields of ``uncompared`` (name -> why) left
    uncompared, and those of ``defaults`` (name -> value) compared with the value transformers'
    model takes where the config does not set them (``ConfigField.hf_default``)."""
    uncompared, defaults = dict(uncompared or {}), dict(defaults or {})
    known = {spec.hf for spec in STANDARD}
    for what, names in (("leave uncompared", uncompared), ("default", defaults)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"no such config fields to {what}: {unknown}")
    return tuple(ConfigField(spec.family, spec.hf, spec.megatron, spec.read, spec.hf_values, uncompared.get(spec.hf),
                             defaults.get(spec.hf)) for spec in STANDARD)
