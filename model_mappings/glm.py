"""GLM-4.5 / GLM-4.6 / GLM-4.5-Air MoE (``glm4_moe``) and GLM-4.7-Flash (``glm4_moe_lite``).

``glm4_moe``: GQA with q/k/v biases (and optional q/k norms), partial rotary, first
``first_k_dense_replace`` layers dense, then MoE with shared experts (``mlp.shared_experts``,
plural) and a sigmoid router with correction bias; MTP layers the DeepSeek way
(``model.layers.{num_hidden_layers + i}`` with ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, ``shared_head.head``, ``embed_tokens``), as vLLM's ``glm4_moe_mtp.py``
loads them. Rotary fraction and norms change no weight name or layout. GLM-4.5-Air's
config.json declares this class too.

``glm4_moe_lite`` (``Glm4MoeLiteForCausalLM``): DeepSeek-V3's Multi-head Latent Attention
(transformers' ``Glm4MoeLiteAttention`` is ``DeepseekV3Attention``) in GLM-4.5's decoder, MoE
and MTP layout: every name is DeepSeek-V3's (Megatron-Bridge's ``GLM47FlashBridge`` uses the
DeepSeek mapping list; vLLM's ``glm4_moe_lite_mtp.py`` reads the same MTP names).
transformers picks dense or MoE per layer from ``mlp_layer_types``, Megatron-Bridge from
``first_k_dense_replace``; the published config.json holds both (a disagreement changes the
tensor names, so planning refuses it against transformers' key set).
"""

from __future__ import annotations

from bridge_ext.table import ExpertFamily, MappingTable, Rule, TableBuilder
from model_mappings import deepseek
from model_mappings.blocks import attention, dense_mlp, post_attention_norm
from model_mappings.deepseek import deepseek_style_table, moe

DESCRIPTION = "GLM-4.5 / GLM-4.6 / GLM-4.5-Air MoE: GQA with biases, MoE with shared experts, MTP"
LITE_DESCRIPTION = "GLM-4.7-Flash (glm4_moe_lite): MLA, MoE with shared experts, MTP"


def decoder_layer(family: ExpertFamily) -> list[Rule]:
    return [*attention(qkv_bias=True), *post_attention_norm(), *dense_mlp(), *moe(family)]


def build(config) -> MappingTable:
    return deepseek_style_table(config, model_class="Glm4MoeForCausalLM", decoder=decoder_layer,
                                description=DESCRIPTION, main_loads_fused=True)


def build_lite(config) -> MappingTable:
    # vLLM 0.34's Glm4MoeLiteForCausalLM fuses MLA and block-FP8 weights as DeepseekV3ForCausalLM
    # does (fused_qkv_a_proj, gate_up_proj) and, like it, loads per-expert weights only
    # (tests/consumers: fused ones raise KeyError in its loader and its MTP drafter's).
    return deepseek_style_table(config, model_class="Glm4MoeLiteForCausalLM", decoder=deepseek.decoder_layer,
                                description=LITE_DESCRIPTION, fp8=deepseek.deepseek_fp8())


TABLE = TableBuilder(model_types=("glm4_moe",), build=build, description=DESCRIPTION)
LITE = TableBuilder(model_types=("glm4_moe_lite",), build=build_lite, description=LITE_DESCRIPTION)
