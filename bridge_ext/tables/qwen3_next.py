"""Qwen3-Next (``qwen3_next``): Qwen3.5's cousin with another Gated DeltaNet projection layout.

Everything but the GDN input projection is Qwen3.5's (gated attention, zero-centred norms,
MoE with a gated shared expert, experts per expert on disk, MTP), so those rules are imported.

Megatron's ``in_proj`` is the same in both models: per tensor-parallel rank
``[q_r; k_r; v_r; z_r; b_r; a_r]``. Hugging Face's Qwen3-Next fuses it into two tensors grouped
per KEY head g (``Qwen3NextGatedDeltaNet.fix_query_key_value_ordering``)::

    in_proj_qkvz = [q_g (Dk); k_g (Dk); v_g (Nv/Nk * Dv); z_g (Nv/Nk * Dv)]  for g in key heads
    in_proj_ba   = [b_g (Nv/Nk); a_g (Nv/Nk)]                               for g in key heads

so the rule cuts the six parts per rank (ranks rejoined part by part give the flat
``Q, K, V, Z, B, A`` of all heads), then interleaves ``q, k, v, z`` and ``b, a`` key head by
key head (:class:`~bridge_ext.ops.GroupRows`). Row operations only: ``lora_B`` follows.
``conv1d`` is ``[Q; K; V]`` flat, as in Qwen3.5 (the conv runs after the reordering).

Norms (as Megatron-Bridge's ``Qwen3NextBridge``): every ``Qwen3NextRMSNorm`` is ``x * (1 + w)``
like Megatron's zero-centred norms (copied); ``linear_attn.norm`` (``Qwen3NextRMSNormGated``)
is plain ``x * w`` -> Megatron ``out_norm`` + 1.
"""

from bridge_ext.ops import GroupRows, SplitRows
from bridge_ext.table import ExpertFamily, MappingTable, Rule, prefixed, rule
from bridge_ext.tables.blocks import GATED_DELTANET_STORED_PARTS, embeddings
from bridge_ext.tables.sizes import GATED_DELTANET_SIZES
from bridge_ext.tables.qwen3_5 import (EXPERTS, GDN_IN_PROJ_PARTS, MTP, MTP_EXPERTS, decoder_layer, gated_delta_net,
                                    mtp_block)

IN_PROJ = "self_attention.in_proj.weight"
# One key head's rows of in_proj_qkvz, and of in_proj_ba.
QKVZ_PER_KEY_HEAD = ("gdn_key_head_dim", "gdn_key_head_dim", "gdn_v_rows_per_key_head", "gdn_v_rows_per_key_head")
BA_PER_KEY_HEAD = ("gdn_v_heads_per_key_head", "gdn_v_heads_per_key_head")


def gated_delta_net_qkvz_ba() -> list[Rule]:
    """Qwen3.5's GDN rules with the ``in_proj`` rule for ``in_proj_qkvz`` / ``in_proj_ba``."""
    in_proj = rule(
        IN_PROJ,
        ["linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight"],
        SplitRows(*GDN_IN_PROJ_PARTS),  # per rank -> q, k, v, z, b, a (all heads, in order)
        GroupRows(*QKVZ_PER_KEY_HEAD),  # -> qkvz, b, a
        GroupRows(*BA_PER_KEY_HEAD, first=1),  # -> qkvz, ba
    )
    return [in_proj, *(each for each in gated_delta_net() if each.megatron != IN_PROJ)]


def decoder_layer_next(family: ExpertFamily) -> list[Rule]:
    return [*decoder_layer(family, linear_attention=False), *gated_delta_net_qkvz_ba()]


def language_model() -> list[Rule]:
    return [
        *embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"),
        *prefixed(decoder_layer_next(EXPERTS), "decoder.layers.{layer}.", "model.layers.{layer}."),
        *mtp_block(),
    ]


TABLE = MappingTable(
    model_types=("qwen3_next",),
    rules=tuple(language_model()),
    description="Qwen3-Next causal LM (Gated DeltaNet with in_proj_qkvz/in_proj_ba, gated attention, MoE, MTP)",
    model_classes={"qwen3_next": "Qwen3NextForCausalLM"},
    expert_families=(EXPERTS, MTP_EXPERTS),
    extra_weights=MTP,
    # vLLM packs Qwen3-Next expert LoRA per expert (not an is_3d_moe_weight model).
    vllm_expert_adapter_layouts={"Qwen3NextForCausalLM": "per_expert"},
    stored_split_parts=GATED_DELTANET_STORED_PARTS,
    sizes=(GATED_DELTANET_SIZES,),
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
