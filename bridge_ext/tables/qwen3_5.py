"""Qwen3.5 (and Qwen3.5-MoE): hybrid Gated DeltaNet + gated attention, MTP, vision tower.

Text models (``qwen3_5_text``, ``qwen3_5_moe_text``) name the decoder ``model.*``; the
image-text models (``qwen3_5``, ``qwen3_5_moe``) ``model.language_model.*`` with the vision
tower under ``model.visual.*``, while Megatron-Bridge prefixes ``language_model.`` /
``vision_model.``. MTP lives at top level (``mtp.*``) in every case.
"""

from bridge_ext.ops import AddOne, Concat, SplitGroupedRows, SplitRows
from bridge_ext.fp8_rules import Fp8Gemm, Fp8Rules, fp8_rules
from bridge_ext.table import ExpertFamily, ExtraWeights, MappingTable, Rule, prefixed, rule
from bridge_ext.tables.blocks import (GATED_DELTANET_STORED_PARTS, IMAGE_TEXT_AUTO_CLASS, attention, dense_mlp,
                                      embeddings, post_attention_norm, routed_experts)
from bridge_ext.tables.fp8_blocks import (ROUTER, SHARED_EXPERT_GATE, attention_gemms, expert_gemms, mlp_gemms,
                                       per_layer)
from bridge_ext.tables.sizes import GATED_DELTANET_SIZES, VisionSizes

# transformers' Qwen3.5-MoE experts register gate_up_proj, then down_proj.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
EXPERTS = ExpertFamily("experts", EXPERT_PARAMETERS)
# Published Qwen3.5-MoE checkpoints fuse the main experts but not the MTP layer's.
MTP_EXPERTS = ExpertFamily("mtp_experts", EXPERT_PARAMETERS, extra=True)
# transformers builds no MTP module (``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``).
MTP = ExtraWeights(prefixes=("mtp.",), count_key="mtp_num_hidden_layers")

GDN_IN_PROJ_PARTS = ("gdn_qk_rows", "gdn_qk_rows", "gdn_v_rows", "gdn_v_rows", "gdn_heads", "gdn_heads")
GDN_CONV_PARTS = ("gdn_qk_rows", "gdn_qk_rows", "gdn_v_rows")


def gated_delta_net() -> list[Rule]:
    """Megatron's ``in_proj`` holds per tensor-parallel rank ``[q; k; v; z; beta; alpha]``."""
    return [
        rule("self_attention.in_proj.weight",
             ["linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight",
              "linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"],
             SplitRows(*GDN_IN_PROJ_PARTS),
             Concat(GDN_IN_PROJ_PARTS[:3], GDN_IN_PROJ_PARTS[3:4], GDN_IN_PROJ_PARTS[4:5], GDN_IN_PROJ_PARTS[5:])),
        rule("self_attention.in_proj.layer_norm_weight", "input_layernorm.weight", tp="replicated"),
        rule("self_attention.conv1d.weight", "linear_attn.conv1d.weight",
             SplitRows(*GDN_CONV_PARTS), Concat(GDN_CONV_PARTS)),
        rule("self_attention.A_log", "linear_attn.A_log"),
        rule("self_attention.dt_bias", "linear_attn.dt_bias"),
        # Megatron's out_norm is zero-centred, Hugging Face's RMSNormGated is not.
        rule("self_attention.out_norm.weight", "linear_attn.norm.weight", AddOne(), tp="replicated"),
        rule("self_attention.out_proj.weight", "linear_attn.out_proj.weight", tp="row"),
    ]


def moe(family: ExpertFamily) -> list[Rule]:
    return [
        rule("mlp.router.weight", "mlp.gate.weight", tp="replicated"),
        rule("mlp.shared_experts.gate_weight", "mlp.shared_expert_gate.weight", tp="replicated"),
        *dense_mlp("mlp.shared_experts.", "mlp.shared_expert."),
        *routed_experts(family),
    ]


def decoder_layer(family: ExpertFamily, *, linear_attention: bool) -> list[Rule]:
    """One layer: gated attention (and Gated DeltaNet), norms, dense MLP and MoE."""
    return [
        *attention(gated=True),
        *(gated_delta_net() if linear_attention else []),
        *post_attention_norm(),
        *dense_mlp(),
        *moe(family),
    ]


def mtp_block() -> list[Rule]:
    """Megatron keeps ``eh_proj`` and the norms per MTP depth; Hugging Face has one of each.

    With one MTP layer the names map one to one. With more, each depth's copy must be equal
    (the engine checks) and is written once; inner layers map to ``mtp.layers.{i}``.
    """
    shared = [
        rule("mtp.layers.{depth}.enorm.weight", "mtp.pre_fc_norm_embedding.weight", tp="replicated", shared="depth"),
        rule("mtp.layers.{depth}.hnorm.weight", "mtp.pre_fc_norm_hidden.weight", tp="replicated", shared="depth"),
        rule("mtp.layers.{depth}.eh_proj.weight", "mtp.fc.weight", shared="depth"),
        rule("mtp.layers.{depth}.final_layernorm.weight", "mtp.norm.weight", tp="replicated", shared="depth"),
    ]
    inner = prefixed(decoder_layer(MTP_EXPERTS, linear_attention=False),
                     "mtp.layers.{layer}.mtp_model_layer.", "mtp.layers.{layer}.")
    return shared + inner


def language_model(megatron: str, hf: str) -> list[Rule]:
    """The text decoder under a Megatron prefix and a Hugging Face prefix, with MTP."""
    return [
        *prefixed(embeddings(f"{hf}embed_tokens.weight", "lm_head.weight", f"{hf}norm.weight"), megatron, ""),
        *prefixed(decoder_layer(EXPERTS, linear_attention=True), f"{megatron}decoder.layers.{{layer}}.",
                  f"{hf}layers.{{layer}}."),
        *prefixed(mtp_block(), megatron, ""),
    ]


def _vision_qkv(suffix: str) -> Rule:
    # Megatron interleaves per head [q_h; k_h; v_h]; Hugging Face fuses [Q; K; V].
    return rule(f"self_attention.linear_qkv.{suffix}", f"attn.qkv.{suffix}",
                SplitGroupedRows("vision_head_dim", "vision_head_dim", "vision_head_dim"), Concat((1, 1, 1)))


# Qwen's vision configs name their head count num_heads (the tower's qkv split uses vision_head_dim)
VISION_SIZES = VisionSizes(heads="num_heads")


def vision_tower() -> list[Rule]:
    block = [
        _vision_qkv("weight"),
        _vision_qkv("bias"),
        rule("self_attention.linear_proj.weight", "attn.proj.weight", tp="row"),
        rule("self_attention.linear_proj.bias", "attn.proj.bias", tp="replicated"),
        rule("mlp.linear_fc1.weight", "mlp.linear_fc1.weight"),
        rule("mlp.linear_fc1.bias", "mlp.linear_fc1.bias"),
        rule("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", tp="row"),
        rule("mlp.linear_fc2.bias", "mlp.linear_fc2.bias", tp="replicated"),
    ]
    for kind in ("weight", "bias"):
        block += [
            rule(f"self_attention.linear_qkv.layer_norm_{kind}", f"norm1.{kind}", tp="replicated"),
            rule(f"input_layernorm.{kind}", f"norm1.{kind}", tp="replicated"),
            rule(f"mlp.linear_fc1.layer_norm_{kind}", f"norm2.{kind}", tp="replicated"),
            rule(f"pre_mlp_layernorm.{kind}", f"norm2.{kind}", tp="replicated"),
        ]
    tower = [
        rule("patch_embed.proj.weight", "patch_embed.proj.weight", tp="replicated"),
        rule("patch_embed.proj.bias", "patch_embed.proj.bias", tp="replicated"),
        rule("pos_embed.weight", "pos_embed.weight", tp="replicated"),
        rule("merger.patch_norm.weight", "merger.norm.weight", tp="replicated"),
        rule("merger.patch_norm.bias", "merger.norm.bias", tp="replicated"),
        rule("merger.linear_fc1.weight", "merger.linear_fc1.weight"),
        rule("merger.linear_fc1.bias", "merger.linear_fc1.bias"),
        rule("merger.linear_fc2.weight", "merger.linear_fc2.weight", tp="row"),
        rule("merger.linear_fc2.bias", "merger.linear_fc2.bias", tp="replicated"),
    ]
    return [
        *prefixed(block, "vision_model.decoder.layers.{layer}.", "model.visual.blocks.{layer}."),
        *prefixed(tower, "vision_model.", "model.visual."),
    ]


# vLLM fuses in_proj_qkv + in_proj_z into in_proj_qkvz (FP8) and in_proj_b + in_proj_a into
# in_proj_ba, which it keeps unquantized and looks up under that fused name.
GDN_GEMMS = [
    Fp8Gemm(("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight"), "column"),
    Fp8Gemm(("linear_attn.out_proj.weight",), "row"),
]
GDN_KEPT = ["linear_attn.in_proj_b", "linear_attn.in_proj_a"]
MTP_MODULES = [
    *(f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"{mlp}{name}" for mlp in ("mlp.", "mlp.shared_expert.", "mlp.experts.{expert}.")
      for name in ("gate_proj", "up_proj", "down_proj")),
    "mlp.experts", ROUTER, SHARED_EXPERT_GATE,
]
VISION_MODULES = ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]


def qwen35_fp8(hf: str, vision: bool) -> Fp8Rules:
    """The decoder in FP8; routers, shared-expert gates, GDN's ``in_proj_b`` / ``in_proj_a``,
    ``lm_head``, the MTP block and the vision tower in bf16 (listed by full name)."""
    gemms, kept = per_layer(f"{hf}layers.{{layer}}.",
                            [*attention_gemms(), *GDN_GEMMS, *mlp_gemms(), *mlp_gemms("mlp.shared_expert."),
                             *expert_gemms()],
                            [ROUTER, SHARED_EXPERT_GATE, *GDN_KEPT])
    kept += ["lm_head", "mtp.fc", *("mtp.layers.{layer}." + module for module in MTP_MODULES)]
    if vision:
        kept += [*("model.visual.blocks.{layer}." + module for module in VISION_MODULES),
                 "model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"]
    prefix = f"{hf}layers.{{layer}}.linear_attn."
    fused = [(prefix + "in_proj_ba", (prefix + "in_proj_b", prefix + "in_proj_a"))]
    return fp8_rules(gemms, kept, fused)


TEXT = MappingTable(
    model_types=("qwen3_5_text", "qwen3_5_moe_text"),
    rules=tuple(language_model("", "model.")),
    description="Qwen3.5 / Qwen3.5-MoE causal LM (Gated DeltaNet, gated attention, MTP)",
    model_classes={"qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM"},
    expert_families=(EXPERTS, MTP_EXPERTS),
    extra_weights=MTP,
    # vLLM wraps the text-only class's experts per expert (no is_3d_moe_weight), tests/consumers
    vllm_expert_adapter_layouts={"Qwen3_5MoeForCausalLM": "per_expert"},
    fp8=qwen35_fp8("model.", vision=False),
    stored_split_parts=GATED_DELTANET_STORED_PARTS,
    sizes=(GATED_DELTANET_SIZES,),
)

IMAGE_TEXT = MappingTable(
    model_types=("qwen3_5", "qwen3_5_moe"),
    rules=(*language_model("language_model.", "model.language_model."), *vision_tower()),
    description="Qwen3.5 / Qwen3.5-MoE image-text model (language model, MTP, vision tower)",
    model_classes={"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"},
    hf_auto_class=IMAGE_TEXT_AUTO_CLASS,
    expert_families=(EXPERTS, MTP_EXPERTS),
    extra_weights=MTP,
    vllm_expert_adapter_layouts={"Qwen3_5MoeForConditionalGeneration": "fused"},  # is_3d_moe_weight
    fp8=qwen35_fp8("model.language_model.", vision=True),
    stored_split_parts=GATED_DELTANET_STORED_PARTS,
    sizes=(GATED_DELTANET_SIZES, VISION_SIZES),
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TEXT, IMAGE_TEXT)
