"""DeepseekV2ForCausalLM (deepseek_v2): generated from Megatron-Bridge 0.6.2's
megatron.bridge.models.deepseek.deepseek_v2_bridge.DeepSeekV2Bridge.mapping_registry() by `bridge-ext tables generate deepseek_v2`.

Do not edit: regenerate (a Megatron-Bridge upgrade shows as a diff). A hand-written table of the
same model type wins over this one. Left out: MTP layers and vision / audio towers.

Mappings of weights the tiny model lacks (their parallel kind cannot be read off a module),
left out so that such a weight is refused as unmapped:
    decoder.layers.*.mlp.router.expert_bias
    decoder.layers.*.self_attention.linear_q_proj.weight
"""

from bridge_ext.ops import AddOne, Concat, SplitGroupedRows, SplitRows, TrimVocab  # noqa: F401
from bridge_ext.table import ExpertFamily, MappingTable, rule

MEGATRON_BRIDGE_VERSION = "0.6.2"
EXPERTS = ExpertFamily("experts", ("gate_up_proj", "down_proj",))

TABLE = MappingTable(
    model_types=("deepseek_v2",),
    rules=(
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", TrimVocab()),
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
            "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
            "model.layers.{layer}.post_attention_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_kv_down_proj.weight",
            "model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_kv_up_proj.weight",
            "model.layers.{layer}.self_attn.kv_b_proj.weight",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_kv_up_proj.layer_norm_weight",
            "model.layers.{layer}.self_attn.kv_a_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.kv_layernorm.weight",
            "model.layers.{layer}.self_attn.kv_a_layernorm.weight", tp="replicated",
        ),
        rule("decoder.layers.{layer}.mlp.linear_fc2.weight", "model.layers.{layer}.mlp.down_proj.weight", tp="row"),
        rule("decoder.layers.{layer}.mlp.router.weight", "model.layers.{layer}.mlp.gate.weight", tp="replicated"),
        rule(
            "decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
            "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", tp="row", variant=EXPERTS.variant("per_expert"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
            "model.layers.{layer}.mlp.experts.down_proj", tp="row", stack="expert", variant=EXPERTS.variant("fused"),
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
            "decoder.layers.{layer}.mlp.shared_experts.linear_fc2.weight",
            "model.layers.{layer}.mlp.shared_experts.down_proj.weight", tp="row",
        ),
        rule("decoder.final_layernorm.weight", "model.norm.weight", tp="replicated"),
        rule("output_layer.weight", "lm_head.weight", TrimVocab()),
        rule(
            "decoder.layers.{layer}.self_attention.linear_q_down_proj.weight",
            "model.layers.{layer}.self_attn.q_a_proj.weight",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_q_up_proj.weight",
            "model.layers.{layer}.self_attn.q_b_proj.weight",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.linear_q_up_proj.layer_norm_weight",
            "model.layers.{layer}.self_attn.q_a_layernorm.weight", tp="replicated",
        ),
        rule(
            "decoder.layers.{layer}.self_attention.q_layernorm.weight",
            "model.layers.{layer}.self_attn.q_a_layernorm.weight", tp="replicated",
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
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
            ["model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"], SplitRows(1, 1), variant=EXPERTS.variant("per_expert"), lora_parts=("gate", "up"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
            "model.layers.{layer}.mlp.experts.gate_up_proj", SplitRows(1, 1), Concat((1, 1)), stack="expert", variant=EXPERTS.variant("fused"),
        ),
        rule(
            "decoder.layers.{layer}.mlp.shared_experts.linear_fc1.weight",
            ["model.layers.{layer}.mlp.shared_experts.gate_proj.weight", "model.layers.{layer}.mlp.shared_experts.up_proj.weight"], SplitRows(1, 1), lora_parts=("gate", "up"),
        ),
    ),
    description="DeepseekV2ForCausalLM (generated from Megatron-Bridge 0.6.2)",
    model_classes={"deepseek_v2": "DeepseekV2ForCausalLM"},
    expert_families=(EXPERTS,),
)
