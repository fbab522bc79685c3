"""Llama, Qwen2 and Qwen3 (dense): GQA attention (Qwen3: q/k norms; Qwen2: qkv bias)."""

from bridge_ext.fp8_rules import fp8_rules
from bridge_ext.table import MappingTable, prefixed
from bridge_ext.tables.blocks import attention, dense_mlp, embeddings, post_attention_norm
from bridge_ext.tables.fp8_blocks import attention_gemms, mlp_gemms, per_layer

FP8_GEMMS, FP8_KEPT = per_layer("model.layers.{layer}.", [*attention_gemms(), *mlp_gemms()], [])

DECODER_LAYER = prefixed(
    [*attention(qkv_bias=True), *post_attention_norm(), *dense_mlp()],
    "decoder.layers.{layer}.",
    "model.layers.{layer}.",
)

TABLE = MappingTable(
    model_types=("llama", "qwen2", "qwen3"),
    rules=(*embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"), *DECODER_LAYER),
    description="Llama / Qwen2 / Qwen3 dense decoder",
    model_classes={"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"},
    fp8=fp8_rules(FP8_GEMMS, ["lm_head"]),
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
