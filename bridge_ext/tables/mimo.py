"""Xiaomi MiMo (``model_type: mimo``): a Qwen2 decoder plus MTP layers ``model.mtp_layers.{i}``.

MiMo is a remote-code architecture (``MiMoForCausalLM``, Xiaomi's ``modeling_mimo.py``): its
main model is transformers' Qwen2 (the key set is ``Qwen2ForCausalLM``'s); its MTP layers
(``MiMoMTPLayers``) hold ``token_layernorm``, ``hidden_layernorm``, ``input_proj``,
``final_layernorm`` around a Qwen2 decoder layer's own names (``input_layernorm``,
``self_attn.{q,k,v,o}_proj`` with q/k/v biases, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``). vLLM's ``mimo_mtp.py`` loads exactly these names. Megatron's
MTP keeps the same pieces: ``enorm`` (token), ``hnorm`` (hidden), ``eh_proj``,
``final_layernorm`` and ``mtp_model_layer``.

``input_proj`` reads ``cat([hidden, embedding])``, Megatron's ``eh_proj`` ``cat([embedding,
hidden])``: the two column halves are swapped (Megatron-Bridge's MiMo bridge does the same).

:func:`register_config` registers a ``MiMoConfig`` for ``AutoConfig`` (Qwen2's config plus
``num_nextn_predict_layers``, as Xiaomi's ``configuration_mimo.py``), so MiMo folders are read
without running their remote code (``bridge_ext.tables.register_transformers_configs`` calls it
before a config is loaded; importing does not touch transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bridge_ext.ops import Op
from bridge_ext.table import ExtraWeights, MappingTable, Rule, prefixed, rule
from bridge_ext.tables.blocks import attention, dense_mlp, embeddings, post_attention_norm


@dataclass(frozen=True)
class SwapColumnHalves(Op):
    """``[A | B]`` -> ``[B | A]`` along the input dimension (its own inverse)."""

    changes_values: ClassVar[bool] = True  # a column permutation: a lora_B cannot take it

    def forward(self, tensors, dims):
        return [torch.cat(tensor.chunk(2, dim=1)[::-1], dim=1) for tensor in tensors]

    def reverse(self, tensors, dims):
        return self.forward(tensors, dims)


MTP = ExtraWeights(prefixes=("model.mtp_layers.",), count_key="num_nextn_predict_layers")


def decoder_layer() -> list[Rule]:
    return [*attention(qkv_bias=True), *post_attention_norm(), *dense_mlp()]


def mtp_layers() -> list[Rule]:
    """One MTP layer per depth; each depth has its own norms and ``input_proj``."""
    per_depth = [
        rule("mtp.layers.{depth}.enorm.weight", "model.mtp_layers.{depth}.token_layernorm.weight", tp="replicated"),
        rule("mtp.layers.{depth}.hnorm.weight", "model.mtp_layers.{depth}.hidden_layernorm.weight", tp="replicated"),
        rule("mtp.layers.{depth}.eh_proj.weight", "model.mtp_layers.{depth}.input_proj.weight", SwapColumnHalves()),
        rule("mtp.layers.{depth}.final_layernorm.weight", "model.mtp_layers.{depth}.final_layernorm.weight",
             tp="replicated"),
    ]
    inner = prefixed(decoder_layer(), "mtp.layers.{depth}.mtp_model_layer.", "model.mtp_layers.{depth}.")
    return per_depth + inner


def register_config() -> type:
    """``MiMoConfig`` registered for ``AutoConfig`` under ``mimo`` (once)."""
    from transformers import AutoConfig, Qwen2Config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "mimo" in CONFIG_MAPPING:
        return CONFIG_MAPPING["mimo"]

    class MiMoConfig(Qwen2Config):
        model_type = "mimo"

        def __init__(self, num_nextn_predict_layers: int = 0, **kwargs):
            self.num_nextn_predict_layers = num_nextn_predict_layers
            super().__init__(**kwargs)

    AutoConfig.register("mimo", MiMoConfig)
    return MiMoConfig


TABLE = MappingTable(
    model_types=("mimo",),
    rules=(
        *embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"),
        *mtp_layers(),
        *prefixed(decoder_layer(), "decoder.layers.{layer}.", "model.layers.{layer}."),
    ),
    description="Xiaomi MiMo: Qwen2 decoder with MTP layers (model.mtp_layers.{i})",
    model_classes={"mimo": "Qwen2ForCausalLM"},
    extra_weights=MTP,
    register_hf_config=register_config,
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
