"""Rule groups shared by several architectures (the tables compose them).

Megatron names are relative to a decoder layer (``decoder.layers.{layer}.``) or the model;
the tables add the prefixes. Fused norms have two spellings: Transformer Engine specs fuse
them into the next linear (``linear_qkv.layer_norm_weight``), local specs keep a module
(``input_layernorm``); both occur in real checkpoints, so both are listed.
"""

from bridge_ext.ops import GroupRows, SplitGroupedRows, SplitRows, TrimVocab
from bridge_ext.table import Rule, rule

# Megatron linear_qkv rows per query group: [q heads; k; v] (GQA).
QKV_GROUPS = SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim")
# With an output gate: [q heads; gate heads; k; v]; HF q_proj holds [q_h; gate_h] per head.
GATED_QKV_GROUPS = (SplitGroupedRows("q_rows_per_group", "q_rows_per_group", "head_dim", "head_dim"),
                    GroupRows("head_dim", "head_dim"))
QKV_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def embeddings(hf_embed: str, hf_lm_head: str, hf_final_norm: str) -> list[Rule]:
    return [
        rule("embedding.word_embeddings.weight", hf_embed, TrimVocab()),
        rule("decoder.final_layernorm.weight", hf_final_norm, tp="replicated"),
        rule("output_layer.weight", hf_lm_head, TrimVocab()),
    ]


def attention(*, gated: bool = False, qkv_bias: bool = False) -> list[Rule]:
    """Self-attention of a decoder layer: GQA ``linear_qkv``, optional q/k norms and gate."""
    ops = GATED_QKV_GROUPS if gated else (QKV_GROUPS,)
    rules = [
        rule("self_attention.linear_qkv.weight", [f"{n}.weight" for n in QKV_NAMES], *ops),
        rule("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", tp="replicated"),
        rule("input_layernorm.weight", "input_layernorm.weight", tp="replicated"),
        rule("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", tp="replicated"),
        rule("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", tp="replicated"),
        rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", tp="row"),
    ]
    if qkv_bias:
        rules.append(rule("self_attention.linear_qkv.bias", [f"{n}.bias" for n in QKV_NAMES], *ops))
    return rules


def dense_mlp(megatron: str = "mlp.", hf: str = "mlp.") -> list[Rule]:
    """Gated MLP: ``linear_fc1 = [gate; up]`` per tensor-parallel rank."""
    return [
        rule(f"{megatron}linear_fc1.weight", [f"{hf}gate_proj.weight", f"{hf}up_proj.weight"], SplitRows(1, 1)),
        rule(f"{megatron}linear_fc2.weight", f"{hf}down_proj.weight", tp="row"),
    ]


def post_attention_norm() -> list[Rule]:
    return [
        rule("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", tp="replicated"),
        rule("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", tp="replicated"),
    ]
