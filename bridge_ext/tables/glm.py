"""GLM-4.5 / GLM-4.6 MoE (``glm4_moe``): GQA with q/k/v biases (and optional q/k norms),
partial rotary, first ``first_k_dense_replace`` layers dense, then MoE with shared experts
(``mlp.shared_experts``, plural) and a sigmoid router with correction bias; MTP layers the
DeepSeek way (``model.layers.{num_hidden_layers + i}`` with ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, ``shared_head.head``, ``embed_tokens``), as vLLM's ``glm4_moe_mtp.py``
loads them. Rotary fraction and norms change no weight name or layout.
"""

from __future__ import annotations

from bridge_ext.table import ExpertFamily, MappingTable, Rule, TableBuilder
from bridge_ext.tables.blocks import attention, dense_mlp, post_attention_norm
from bridge_ext.tables.deepseek import deepseek_style_table, moe

DESCRIPTION = "GLM-4.5 / GLM-4.6 MoE: GQA with biases, MoE with shared experts, MTP"


def decoder_layer(family: ExpertFamily) -> list[Rule]:
    return [*attention(qkv_bias=True), *post_attention_norm(), *dense_mlp(), *moe(family)]


def build(config) -> MappingTable:
    return deepseek_style_table(config, model_class="Glm4MoeForCausalLM", decoder=decoder_layer,
                                description=DESCRIPTION, main_loads_fused=True)


TABLE = TableBuilder(model_types=("glm4_moe",), build=build, description=DESCRIPTION)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
