"""OlmoeForCausalLM (olmoe): generated from Megatron-Bridge 0.6.2's
megatron.bridge.models.olmoe.olmoe_bridge.OlMoEBridge.mapping_registry() by `bridge-ext tables generate olmoe`.

Do not edit: regenerate (a Megatron-Bridge upgrade shows as a diff). A hand-written table of the
same model type wins over this one. Left out: MTP layers and vision / audio towers.

Mappings of weights the tiny model lacks (their parallel kind cannot be read off a module),
left out so that such a weight is refused as unmapped:
    decoder.layers.*.mlp.linear_fc2.weight
"""

from bridge_ext.ops import AddOne, Concat, SplitGroupedRows, SplitRows, TrimVocab  # noqa: F401
from bridge_ext.table import ExpertFamily, MappingTable, rule

MEGATRON_BRIDGE_VERSION = "0.6.2"
EXPERTS = ExpertFamily("experts", ("gate_up_proj", "down_proj",))

TABLE = MappingTable(
    model_types=("olmoe",),
    rules=(
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", TrimVocab()),
        rule("output_layer.weight", "lm_head.weight", TrimVocab()),
        rule("decoder.final_layernorm.weight", "model.norm.weight", tp="replicated"),
        rule(
            "decoder.layers.{layer}.input_layernorm.weight",
            "model.layers.{layer}.input_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_proj.weight",
            "model.layers.{layer}.self_attn.o_proj.weight", tp="row",
        ),
        rule(
            "decoder.layers.{layer}.pre_mlp_layernorm.weight",
            "model.layers.{layer}.post_attention_layernorm.weight", tp="replicated",
        ),
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
            "decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
            "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", tp="row", variant=EXPERTS.variant("per_expert"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
            "model.layers.{layer}.mlp.experts.down_proj", tp="row", stack="expert", variant=EXPERTS.variant("fused"),
        ),
        rule("decoder.layers.{layer}.mlp.router.weight", "model.layers.{layer}.mlp.gate.weight", tp="replicated"),
        rule(
            "decoder.layers.{layer}.self_attention.linear_qkv.weight",
            ["model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight", "model.layers.{layer}.self_attn.v_proj.weight"], SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim"), lora_parts=("q", "k", "v"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.linear_fc1.weight",
            ["model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"], SplitRows(1, 1), lora_parts=("gate", "up"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.linear_fc1.weight{expert}",
            ["model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"], SplitRows(1, 1), variant=EXPERTS.variant("per_expert"), lora_parts=("gate", "up"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.linear_fc1.weight{expert}",
            "model.layers.{layer}.mlp.experts.gate_up_proj", SplitRows(1, 1), Concat((1, 1)), stack="expert", variant=EXPERTS.variant("fused"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight",
            "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", tp="row", variant=EXPERTS.variant("per_expert"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight",
            "model.layers.{layer}.mlp.experts.down_proj", tp="row", stack="expert", variant=EXPERTS.variant("fused"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
            ["model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"], SplitRows(1, 1), variant=EXPERTS.variant("per_expert"), lora_parts=("gate", "up"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
            "model.layers.{layer}.mlp.experts.gate_up_proj", SplitRows(1, 1), Concat((1, 1)), stack="expert", variant=EXPERTS.variant("fused"),
        ),
    ),
    description="OlmoeForCausalLM (generated from Megatron-Bridge 0.6.2)",
    model_classes={"olmoe": "OlmoeForCausalLM"},
    expert_families=(EXPERTS,),
)
