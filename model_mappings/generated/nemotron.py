"""NemotronForCausalLM (nemotron): generated from Megatron-Bridge 0.6.2's
megatron.bridge.models.nemotron.nemotron_bridge.NemotronBridge.mapping_registry() by `bridge-ext tables generate nemotron`.

Do not edit: regenerate (a Megatron-Bridge upgrade shows as a diff). A hand-written table of the
same model type wins over this one. Left out: MTP layers and vision / audio towers.
"""

from bridge_ext.ops import AddOne, Concat, SplitGroupedRows, SplitRows, TrimVocab  # noqa: F401
from bridge_ext.table import ExpertFamily, MappingTable, rule

MEGATRON_BRIDGE_VERSION = "0.6.2"

TABLE = MappingTable(
    model_types=("nemotron",),
    rules=(
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", TrimVocab()),
        rule("output_layer.weight", "lm_head.weight", TrimVocab()),
        rule("decoder.final_layernorm.weight", "model.norm.weight", tp="replicated"),
        rule("decoder.final_layernorm.bias", "model.norm.bias", tp="replicated"),
        rule(
            "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
            "model.layers.{layer}.input_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_bias",
            "model.layers.{layer}.input_layernorm.bias", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
            "model.layers.{layer}.post_attention_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_bias",
            "model.layers.{layer}.post_attention_layernorm.bias", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_proj.weight",
            "model.layers.{layer}.self_attn.o_proj.weight", tp="row",
        ),
        rule("decoder.layers.{layer}.mlp.linear_fc1.weight", "model.layers.{layer}.mlp.up_proj.weight"),
        rule("decoder.layers.{layer}.mlp.linear_fc2.weight", "model.layers.{layer}.mlp.down_proj.weight", tp="row"),
        rule(
            "decoder.layers.{layer}.self_attention.linear_qkv.weight",
            ["model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight", "model.layers.{layer}.self_attn.v_proj.weight"], SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim"), lora_parts=("q", "k", "v"),
        ),
        rule(
            "decoder.layers.{layer}.input_layernorm.weight",
            "model.layers.{layer}.input_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.input_layernorm.bias",
            "model.layers.{layer}.input_layernorm.bias", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.pre_mlp_layernorm.weight",
            "model.layers.{layer}.post_attention_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.pre_mlp_layernorm.bias",
            "model.layers.{layer}.post_attention_layernorm.bias", tp="replicated",
        ),
    ),
    description="NemotronForCausalLM (generated from Megatron-Bridge 0.6.2)",
    model_classes={"nemotron": "NemotronForCausalLM"},
    expert_families=(),
)
