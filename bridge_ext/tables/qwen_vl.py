"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: a Qwen2 / Qwen3 (-MoE) language model beside a vision tower.

Qwen2.5-VL: transformers 5.23 saves the legacy names (``model.layers.*``, ``visual.*``); its
conversion mapping renames them to ``model.language_model.*`` / ``model.visual.*`` in memory,
which is where PEFT matches targets and keys adapters (``in_memory_prefixes``). Megatron-Bridge's
``Qwen25VLModel`` keeps Hugging Face's own vision module (RMSNorms, gated MLPs, window
attention, ``merger.ln_q`` / ``merger.mlp.{0,2}``) under the same ``visual.*`` names, replicated
over tensor-parallel ranks, and the Qwen2 decoder under ``language_model.*``.

Qwen3-VL: Hugging Face names the language model ``model.language_model.*`` (``lm_head`` at top level) and
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

from bridge_ext.table import ExpertFamily, MappingTable, Rule, prefixed, rule
from bridge_ext.tables.blocks import (IMAGE_TEXT_AUTO_CLASS, attention, dense_mlp, embeddings, post_attention_norm,
                                      routed_experts)
from bridge_ext.tables.qwen3_5 import EXPERT_PARAMETERS, VISION_SIZES, vision_tower

# Qwen3VLMoeTextExperts registers gate_up_proj, then down_proj.
EXPERTS = ExpertFamily("experts", EXPERT_PARAMETERS)


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
    mlp = [rule("mlp.router.weight", "mlp.gate.weight", tp="replicated"), *routed_experts(EXPERTS, transposed=True)] if moe else dense_mlp()
    layer = [*attention(), *post_attention_norm(), *mlp]
    return [
        *prefixed(embeddings("model.language_model.embed_tokens.weight", "lm_head.weight",
                             "model.language_model.norm.weight"), "language_model.", ""),
        *prefixed(layer, "language_model.decoder.layers.{layer}.", "model.language_model.layers.{layer}."),
    ]


def qwen2_5_vision_tower() -> list[Rule]:
    """Hugging Face's own module inside Megatron: every name maps to itself, replicated."""
    block = [f"{kind}.{leaf}" for kind in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
             for leaf in ("weight", "bias")] + ["norm1.weight", "norm2.weight"]
    tower = ["patch_embed.proj.weight", "merger.ln_q.weight",
             *(f"merger.mlp.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias"))]
    names = [f"visual.blocks.{{block}}.{name}" for name in block] + [f"visual.{name}" for name in tower]
    return [rule(name, name, tp="replicated") for name in names]


def qwen2_language_model() -> list[Rule]:
    layer = [*attention(qkv_bias=True), *post_attention_norm(), *dense_mlp()]
    return [
        *prefixed(embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"), "language_model.", ""),
        *prefixed(layer, "language_model.decoder.layers.{layer}.", "model.layers.{layer}."),
    ]


# Megatron's Qwen3-VL vision block stacks its deepstack mergers in torch_dist checkpoints too.
DEEPSTACK_STORED = ("deepstack_merger_list",)

QWEN2_5_VL = MappingTable(
    model_types=("qwen2_5_vl",),
    rules=(*qwen2_language_model(), *qwen2_5_vision_tower()),
    description="Qwen2.5-VL image-text model (Qwen2 decoder, vision tower with window attention)",
    model_classes={"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
    hf_auto_class=IMAGE_TEXT_AUTO_CLASS,
    in_memory_prefixes=(("model.", "model.language_model."), ("visual.", "model.visual.")),
)

QWEN3_VL = MappingTable(
    model_types=("qwen3_vl",),
    rules=(*qwen3_language_model(moe=False), *vision_tower(), *deepstack_mergers()),
    description="Qwen3-VL image-text model (vision tower with deepstack mergers)",
    model_classes={"qwen3_vl": "Qwen3VLForConditionalGeneration"},
    hf_auto_class=IMAGE_TEXT_AUTO_CLASS,
    stored_stacked_lists=DEEPSTACK_STORED,
    sizes=(VISION_SIZES,),
)

QWEN3_VL_MOE = MappingTable(
    model_types=("qwen3_vl_moe",),
    rules=(*qwen3_language_model(moe=True), *vision_tower(), *deepstack_mergers()),
    description="Qwen3-VL-MoE image-text model (fused experts, stored transposed when published; deepstack mergers)",
    model_classes={"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"},
    hf_auto_class=IMAGE_TEXT_AUTO_CLASS,
    expert_families=(EXPERTS,),
    vllm_expert_adapter_layouts={"Qwen3VLMoeForConditionalGeneration": "fused"},  # vLLM: is_3d_moe_weight
    # vLLM's experts loader reads the published layout only (is_fused_checkpoint_transposed)
    vllm_expert_layouts={"Qwen3VLMoeForConditionalGeneration": "fused_transposed"},
    stored_stacked_lists=DEEPSTACK_STORED,
    sizes=(VISION_SIZES,),
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (QWEN3_VL, QWEN3_VL_MOE, QWEN2_5_VL)
