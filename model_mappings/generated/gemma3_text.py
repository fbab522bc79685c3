"""Gemma3ForCausalLM (gemma3_text): generated from Megatron-Bridge 0.6.2's
megatron.bridge.models.gemma.gemma3_bridge.Gemma3ModelBridge.mapping_registry() by `bridge-ext tables generate gemma3_text`.

Do not edit: regenerate (a Megatron-Bridge upgrade shows as a diff). A hand-written table of the
same model type wins over this one. Left out: MTP layers and vision / audio towers.
"""

from bridge_ext.ops import AddOne, Concat, SplitGroupedRows, SplitRows, TrimVocab  # noqa: F401
from bridge_ext.table import ExpertFamily, MappingTable, rule
from model_mappings.config_fields import standard

MEGATRON_BRIDGE_VERSION = "0.6.2"

TABLE = MappingTable(
    model_types=("gemma3_text",),
    rules=(
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", TrimVocab()),
        rule(
            "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
            "model.layers.{layer}.input_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.q_layernorm.weight",
            "model.layers.{layer}.self_attn.q_norm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.k_layernorm.weight",
            "model.layers.{layer}.self_attn.k_norm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_proj.weight",
            "model.layers.{layer}.self_attn.o_proj.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_proj.post_layernorm.weight",
            "model.layers.{layer}.post_attention_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
            "model.layers.{layer}.pre_feedforward_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc2.weight",
            "model.layers.{layer}.mlp.down_proj.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc2.post_layernorm.weight",
            "model.layers.{layer}.post_feedforward_layernorm.weight", tp="replicated",
        ),
        rule("decoder.final_layernorm.weight", "model.norm.weight", tp="replicated"),
        rule(
            "decoder.layers.{layer}.self_attention.linear_qkv.weight",
            ["model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight", "model.layers.{layer}.self_attn.v_proj.weight"], SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim"), lora_parts=("q", "k", "v"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc1.weight",
            ["model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"], SplitRows(1, 1), lora_parts=("gate", "up"),
        ),
        rule(
            "decoder.layers.{layer}.input_layernorm.weight",
            "model.layers.{layer}.input_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.pre_mlp_layernorm.weight",
            "model.layers.{layer}.pre_feedforward_layernorm.weight", tp="replicated",
        ),
    ),
    description="Gemma3ForCausalLM (generated from Megatron-Bridge 0.6.2)",
    model_classes={"gemma3_text": "Gemma3ForCausalLM"},
    expert_families=(),
    config_fields=standard({
        "layer_types": "Megatron-Bridge's Gemma 3 attention picks sliding or global per layer from interleaved_attn_pattern (five sliding, one global, as HF's default layer_types), not from window_attn_skip_freq",
    }),
)
