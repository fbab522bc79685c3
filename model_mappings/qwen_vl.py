"""Qwen3-VL and Qwen3-VL-MoE: a Qwen3 (-MoE) language model beside a vision tower.

Hugging Face names the language model ``model.language_model.*`` (``lm_head`` at top level) and
the vision tower ``model.visual.*``; Megatron-Bridge's ``Qwen3VLModel`` names them
``language_model.*`` and ``vision_model.*``. Qwen3-VL's vision tower adds deepstack mergers
(``deepstack_merger_list.{i}``: the features after some vision blocks, merged like the final
patch merger and added to the first decoder layers' hidden states).

Qwen3-VL-MoE experts, fused in every layout: transformers 5.23 holds ``gate_up_proj [E, 2I, H]`` /
``down_proj [E, H, I]`` in memory and ``save_pretrained`` writes them so (``fused``); the
published checkpoints store each expert transposed, ``gate_up_proj [E, H, 2I]`` / ``down_proj
[E, I, H]`` (``fused_transposed``), the layout vLLM loads (``is_fused_checkpoint_transposed``);
transformers' loader transposes when the shape differs from its parameter. An export follows
the source folder's layout. The transposed rules end with :class:`~bridge_ext.ops.Transpose`
(merging follows it; fused adapters keep the in-memory layout PEFT adapts). There is no
per-expert checkpoint layout (transformers would not load it); the per-expert variant serves
per-expert adapters only.
"""

from bridge_ext.ops import Concat, SplitRows, Transpose
from bridge_ext.table import ExpertFamily, MappingTable, Rule, prefixed, rule
from model_mappings.blocks import attention, dense_mlp, embeddings, post_attention_norm
from model_mappings.qwen3_5 import EXPERT_PARAMETERS, vision_tower

# Qwen3VLMoeTextExperts registers gate_up_proj, then down_proj.
EXPERTS = ExpertFamily("experts", EXPERT_PARAMETERS)


def transposed_fused_experts(family: ExpertFamily = EXPERTS) -> list[Rule]:
    """Sequential and grouped Megatron experts -> fused ``[E, in, out]`` (or per expert)."""
    rules = []
    for fc1, fc2 in (("mlp.experts.local_experts.{expert}.linear_fc1.weight", "mlp.experts.local_experts.{expert}.linear_fc2.weight"),
                     ("mlp.experts.linear_fc1.weight{expert}", "mlp.experts.linear_fc2.weight{expert}")):
        rules += [
            rule(fc1, ["mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight"],
                 SplitRows(1, 1), variant=family.variant("per_expert")),
            rule(fc2, "mlp.experts.{expert}.down_proj.weight", tp="row", variant=family.variant("per_expert")),
            rule(fc1, "mlp.experts.gate_up_proj", SplitRows(1, 1), Concat((1, 1)), stack="expert",
                 variant=family.variant("fused")),
            rule(fc2, "mlp.experts.down_proj", tp="row", stack="expert", variant=family.variant("fused")),
            rule(fc1, "mlp.experts.gate_up_proj", SplitRows(1, 1), Concat((1, 1)), Transpose(), stack="expert",
                 variant=family.variant("fused_transposed")),
            rule(fc2, "mlp.experts.down_proj", Transpose(), tp="row", stack="expert",
                 variant=family.variant("fused_transposed")),
        ]
    return rules


def deepstack_mergers() -> list[Rule]:
    merger = [
        rule("patch_norm.weight", "norm.weight", tp="replicated"),
        rule("patch_norm.bias", "norm.bias", tp="replicated"),
        rule("linear_fc1.weight", "linear_fc1.weight"),
        rule("linear_fc1.bias", "linear_fc1.bias"),
        rule("linear_fc2.weight", "linear_fc2.weight", tp="row"),
        rule("linear_fc2.bias", "linear_fc2.bias", tp="replicated"),
    ]
    return prefixed(merger, "vision_model.decoder.deepstack_merger_list.{merger}.",
                    "model.visual.deepstack_merger_list.{merger}.")


def qwen3_language_model(*, moe: bool) -> list[Rule]:
    mlp = [rule("mlp.router.weight", "mlp.gate.weight", tp="replicated"), *transposed_fused_experts()] if moe else dense_mlp()
    layer = [*attention(), *post_attention_norm(), *mlp]
    return [
        *prefixed(embeddings("model.language_model.embed_tokens.weight", "lm_head.weight",
                             "model.language_model.norm.weight"), "language_model.", ""),
        *prefixed(layer, "language_model.decoder.layers.{layer}.", "model.language_model.layers.{layer}."),
    ]


QWEN3_VL = MappingTable(
    model_types=("qwen3_vl",),
    rules=(*qwen3_language_model(moe=False), *vision_tower(), *deepstack_mergers()),
    description="Qwen3-VL image-text model (vision tower with deepstack mergers)",
    model_classes={"qwen3_vl": "Qwen3VLForConditionalGeneration"},
)

QWEN3_VL_MOE = MappingTable(
    model_types=("qwen3_vl_moe",),
    rules=(*qwen3_language_model(moe=True), *vision_tower(), *deepstack_mergers()),
    description="Qwen3-VL-MoE image-text model (fused experts, stored transposed when published; deepstack mergers)",
    model_classes={"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"},
    expert_families=(EXPERTS,),
    vllm_expert_adapter_layout="fused",  # vLLM's Qwen3VLMoeForConditionalGeneration: is_3d_moe_weight
)
