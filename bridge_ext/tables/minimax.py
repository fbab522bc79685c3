"""MiniMax-M2 / M2.1 / M2.5 / M2.7 (``minimax_m2``, ``MiniMaxM2ForCausalLM``).

GQA attention with q/k RMSNorms over the whole projection (``self_attn.q_norm.weight``
``[heads * head_dim]``, ``k_norm`` ``[kv_heads * head_dim]``; Megatron-Bridge's
``FullDimQNorm`` / ``FullDimKNorm`` hold each tensor-parallel rank's heads, so the rules are
column-parallel), partial rotary, every layer MoE: a sigmoid router with correction bias and
routed experts, no shared expert.

Names: transformers 5.23 renames ``block_sparse_moe`` to ``mlp`` on load and back on save
(``conversion_mapping.py``: Mixtral's mapping plus ``e_score_correction_bias``), so the
checkpoint (published and ``save_pretrained``) names ``model.layers.{i}.block_sparse_moe.gate``,
``.e_score_correction_bias`` and per-expert ``experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2``
(down); vLLM 0.34's ``MiniMaxM2ForCausalLM`` loads those names and its expert LoRA takes them
too (``experts.{e}.w1.lora_A.weight``: no ``is_3d_moe_weight``); it silently ignores fused expert
weights and PEFT's fused adapter keys (left unloaded, measured in tests/consumers). The fused layout is
``block_sparse_moe.experts.gate_up_proj`` / ``down_proj`` on disk (transformers' loader accepts
it); PEFT sees the model in memory (``mlp.experts``), so the fused adapter keys and targets carry
``mlp.`` (``in_memory_prefixes``, per layer, for the fused names only).

MTP: config.json declares ``use_mtp``, ``num_mtp_modules: 3``, ``mtp_transformer_layers: 1``,
but the published safetensors hold no trained MTP tensor (MiniMax-AI/MiniMax-M2 issue 47,
MiniMax-M2.7 issue 16), Megatron-Bridge 0.6.2 maps none ("MTP modules are not mapped") and vLLM
0.34 has no MiniMax-M2 drafter (its model drops ``model.layers.{num_hidden_layers + i}.``): the
table maps none, and a Megatron model that holds MTP layers is refused (unmapped tensors).
"""

from __future__ import annotations

from bridge_ext.config_compare import ConfigField
from bridge_ext.fp8_rules import fp8_rules
from bridge_ext.table import ExpertFamily, MappingTable, TableBuilder, prefixed, rule
from bridge_ext.tables.blocks import W1_W3_W2, attention, embeddings, post_attention_norm, routed_experts
from bridge_ext.tables.config_fields import standard
from bridge_ext.tables.deepseek import EXPERT_PARAMETERS
from bridge_ext.tables.fp8_blocks import attention_gemms, expert_gemms, per_layer

MODEL_CLASS = "MiniMaxM2ForCausalLM"
DESCRIPTION = "MiniMax-M2: GQA with full-width q/k norms, sigmoid-routed MoE with correction bias"
# MiniMaxM2Experts registers gate_up_proj, then down_proj.
EXPERTS = ExpertFamily("experts", EXPERT_PARAMETERS)
MOE = "block_sparse_moe."


def _layer() -> list:
    return [
        # full-width norms, split over tensor-parallel ranks with the heads (before attention()'s
        # replicated per-head q/k norm rules: the first match wins)
        rule("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
        rule("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
        *attention(),
        *post_attention_norm(),
        rule("mlp.router.weight", MOE + "gate.weight", tp="replicated"),
        rule("mlp.router.expert_bias", MOE + "e_score_correction_bias", tp="replicated"),
        *routed_experts(EXPERTS, hf=MOE + "experts.", per_expert=W1_W3_W2),
    ]


def _fp8():
    """Published MiniMax-M2 FP8 (128 x 128 blocks) keeps ``gate``, ``e_score_correction_bias``
    and ``lm_head`` bf16 (``modules_to_not_convert``); vLLM fuses q/k/v into ``qkv_proj``."""
    gemms, kept = per_layer("model.layers.{layer}.", [*attention_gemms(), *expert_gemms(MOE + "experts.", W1_W3_W2)],
                            [MOE + "gate"])
    return fp8_rules(gemms, ["lm_head", *kept])


def _in_memory(config) -> tuple[tuple[str, str], ...]:
    """Fused expert names (parameters and PEFT's keys of them) as transformers holds them in
    memory, where PEFT matches: ``block_sparse_moe.experts`` -> ``mlp.experts`` (per-expert names,
    vLLM's, keep the checkpoint spelling)."""
    pairs = []
    for layer in range(config.num_hidden_layers):
        saved, loaded = f"model.layers.{layer}.{MOE}experts.", f"model.layers.{layer}.mlp.experts."
        pairs += [(saved + leaf, loaded + leaf) for leaf in (*EXPERT_PARAMETERS, "base_layer.", "lora_")]
    return tuple(pairs)


CONFIG_FIELDS = (
    *standard(),
    ConfigField("mixture of experts", "use_routing_bias", "moe_router_enable_expert_bias"),
)


def build(config) -> MappingTable:
    return MappingTable(
        model_types=("minimax_m2",),
        rules=(*embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"),
               *prefixed(_layer(), "decoder.layers.{layer}.", "model.layers.{layer}.")),
        description=DESCRIPTION,
        model_classes={"minimax_m2": MODEL_CLASS},
        expert_families=(EXPERTS,),
        # vLLM 0.34: MiniMaxM2ForCausalLM has no is_3d_moe_weight (experts.{e}.w1 LoRA), and its
        # loader silently ignores fused expert weights (tests/consumers)
        vllm_expert_adapter_layouts={MODEL_CLASS: "per_expert"},
        vllm_expert_layouts={MODEL_CLASS: "per_expert"},
        in_memory_prefixes=_in_memory(config),
        fp8=_fp8(),
        config_fields=CONFIG_FIELDS,
    )


TABLE = TableBuilder(model_types=("minimax_m2",), build=build, description=DESCRIPTION)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
