"""Rule groups shared by several architectures (the tables compose them).

Megatron names are relative to a decoder layer (``decoder.layers.{layer}.``) or the model;
the tables add the prefixes. Fused norms have two spellings: Transformer Engine specs fuse
them into the next linear (``linear_qkv.layer_norm_weight``), local specs keep a module
(``input_layernorm``); both occur in real checkpoints, so both are listed.
"""

from bridge_ext.ops import Concat, GroupRows, SplitGroupedRows, SplitRows, Transpose, TrimVocab
from bridge_ext.table import ExpertFamily, Rule, rule

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
        # CanonicalLoRA's adapter_q covers the query heads only, not the output gate's rows
        rule("self_attention.linear_qkv.weight", [f"{n}.weight" for n in QKV_NAMES], *ops,
             lora_parts=() if gated else ("q", "k", "v")),
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
        rule(f"{megatron}linear_fc1.weight", [f"{hf}gate_proj.weight", f"{hf}up_proj.weight"], SplitRows(1, 1),
             lora_parts=("gate", "up")),
        rule(f"{megatron}linear_fc2.weight", f"{hf}down_proj.weight", tp="row"),
    ]


def post_attention_norm() -> list[Rule]:
    return [
        rule("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", tp="replicated"),
        rule("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", tp="replicated"),
    ]


# Megatron's routed experts: sequential (``local_experts.{expert}.linear_fc1``) and Transformer
# Engine grouped (``linear_fc1.weight{expert}``); both occur in checkpoints.
# MappingTable.hf_auto_class of image-text models
IMAGE_TEXT_AUTO_CLASS = "AutoModelForImageTextToText"

# How torch_dist checkpoints store Megatron's split tensors (MappingTable.stored_split_parts): each
# factory's parts in the order they join (megatron/core/ssm/gated_delta_net.py, mamba_mixer.py).
GATED_DELTANET_STORED_PARTS = (("query", "key", "value", "z", "beta", "alpha"), ("query", "key", "value"))
MAMBA_STORED_PARTS = (("z", "x", "B", "C", "dt"), ("x", "B", "C"))  # in_proj, conv1d
# A Mamba-2 mixer's in_proj (z, x, B, C, dt) and conv1d (x, B, C) row splits, by the sizes
# tables.sizes.MambaSizes gives: Megatron holds them per tensor-parallel rank, Hugging Face whole.
MAMBA_IN_PROJ_PARTS = ("mamba_inner", "mamba_inner", "mamba_bc", "mamba_bc", "mamba_heads")
MAMBA_CONV_PARTS = ("mamba_inner", "mamba_bc", "mamba_bc")

MEGATRON_EXPERT_NAMES = (
    ("mlp.experts.local_experts.{expert}.linear_fc1.weight", "mlp.experts.local_experts.{expert}.linear_fc2.weight"),
    ("mlp.experts.linear_fc1.weight{expert}", "mlp.experts.linear_fc2.weight{expert}"),
)


# Per-expert Hugging Face module names (gate, up, down): transformers' and Mixtral's checkpoints.
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
W1_W3_W2 = ("w1", "w3", "w2")


def routed_experts(family: ExpertFamily, *, transposed: bool = False, hf: str = "mlp.experts.",
                   per_expert: tuple[str, str, str] = GATE_UP_DOWN) -> list[Rule]:
    """Routed experts in the family's layout variants: per expert (``{hf}{expert}.{gate|up|down}``
    with the ``per_expert`` module names), fused ``[E, 2I, H]`` / ``[E, H, I]`` (transformers'
    in-memory layout) and, with ``transposed``, fused ``[E, H, 2I]`` / ``[E, I, H]``
    (``fused_transposed``: how some published checkpoints store them)."""
    gate, up, down = (f"{hf}{{expert}}.{name}.weight" for name in per_expert)
    rules = []
    for fc1, fc2 in MEGATRON_EXPERT_NAMES:
        rules += [
            rule(fc1, [gate, up], SplitRows(1, 1), variant=family.variant("per_expert"), lora_parts=("gate", "up")),
            rule(fc2, down, tp="row", variant=family.variant("per_expert")),
            # Hugging Face's gate_up_proj[e] is [gate; up]: Megatron's fc1 with ranks rejoined.
            rule(fc1, f"{hf}gate_up_proj", SplitRows(1, 1), Concat((1, 1)), stack="expert",
                 variant=family.variant("fused")),
            rule(fc2, f"{hf}down_proj", tp="row", stack="expert", variant=family.variant("fused")),
        ]
        if transposed:
            rules += [
                rule(fc1, f"{hf}gate_up_proj", SplitRows(1, 1), Concat((1, 1)), Transpose(), stack="expert",
                     variant=family.variant("fused_transposed")),
                rule(fc2, f"{hf}down_proj", Transpose(), tp="row", stack="expert",
                     variant=family.variant("fused_transposed")),
            ]
    return rules
