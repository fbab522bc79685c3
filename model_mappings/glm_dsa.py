"""GLM-5 (``glm_moe_dsa``, ``GlmMoeDsaForCausalLM``): DeepSeek-V3's MLA with DeepSeek Sparse
Attention's indexer, GLM's MoE (dense first ``first_k_dense_replace`` layers) and MTP layers the
DeepSeek way (``model.layers.{num_hidden_layers + i}``).

The indexer (transformers' ``self_attn.indexer``: ``wq_b`` reads the normed query latent, ``wk``
and ``weights_proj`` the hidden states, ``k_norm`` a LayerNorm with bias) is megatron-core's
``DSAIndexer`` under the DSA core attention (``self_attention.core_attention.indexer.linear_wq_b``,
``linear_wk``, ``k_norm``, ``linear_weights_proj``: plain linears, replicated across tensor
parallelism), as Megatron-Bridge 0.6.2's ``GLM5Bridge`` maps it. Layers whose ``indexer_types``
entry is ``"shared"`` reuse an earlier layer's top-k and hold no indexer on either side.

Megatron-Bridge's provider builds no MTP layer (``mtp_num_layers = None``) although the published
config says ``num_nextn_predict_layers: 1``: the config comparison names that difference before
an export; a model built with ``mtp_num_layers`` set exports its MTP layers under these names.
"""

from __future__ import annotations

from bridge_ext.fp8_rules import Fp8Gemm, Fp8Rules, fp8_rules
from bridge_ext.table import ExpertFamily, MappingTable, Rule, TableBuilder, rule
from model_mappings.blocks import dense_mlp, post_attention_norm
from model_mappings.deepseek import deepseek_style_table, mla_attention, mla_gemms, moe
from model_mappings.fp8_blocks import ROUTER, expert_gemms, mlp_gemms, per_layer

DESCRIPTION = "GLM-5 (glm_moe_dsa): MLA with the DSA indexer, MoE with shared experts, MTP"
INDEXER = "self_attention.core_attention.indexer."


def indexer() -> list[Rule]:
    return [
        rule(INDEXER + "linear_wq_b.weight", "self_attn.indexer.wq_b.weight", tp="replicated"),
        rule(INDEXER + "linear_wk.weight", "self_attn.indexer.wk.weight", tp="replicated"),
        rule(INDEXER + "k_norm.weight", "self_attn.indexer.k_norm.weight", tp="replicated"),
        rule(INDEXER + "k_norm.bias", "self_attn.indexer.k_norm.bias", tp="replicated"),
        rule(INDEXER + "linear_weights_proj.weight", "self_attn.indexer.weights_proj.weight", tp="replicated"),
    ]


def decoder_layer(family: ExpertFamily) -> list[Rule]:
    return [*mla_attention(), *indexer(), *post_attention_norm(), *dense_mlp(), *moe(family)]


def glm_dsa_fp8() -> Fp8Rules:
    """DeepSeek-V3's rules plus the indexer as vLLM 0.34's DeepSeek-V3.2 indexer builds it
    (vllm/models/deepseek_v32/attention.py): ``wq_b`` a replicated linear with the quantization
    config, ``wk`` + ``weights_proj`` one unquantized ``wk_weights_proj``."""
    gemms, kept = per_layer("model.layers.{layer}.",
                            [*mla_gemms(), Fp8Gemm(("self_attn.indexer.wq_b.weight",), "replicated"),
                             *mlp_gemms(), *mlp_gemms("mlp.shared_experts."), *expert_gemms()],
                            [ROUTER, "self_attn.indexer.wk", "self_attn.indexer.weights_proj", "eh_proj",
                             "shared_head.head"])
    return fp8_rules(gemms, ["lm_head", *kept])


def build(config) -> MappingTable:
    # vLLM 0.34 serves this class with DeepSeek-V3.2's model (vllm/models/deepseek_v32), whose
    # loader is DeepSeek-V3's (per-expert experts, fused_qkv_a_proj).
    return deepseek_style_table(config, model_class="GlmMoeDsaForCausalLM", decoder=decoder_layer,
                                description=DESCRIPTION, fp8=glm_dsa_fp8())


TABLE = TableBuilder(model_types=("glm_moe_dsa",), build=build, description=DESCRIPTION)
