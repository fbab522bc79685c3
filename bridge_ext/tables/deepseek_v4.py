"""DeepSeek-V4 (``deepseek_v4``, ``DeepseekV4ForCausalLM``): MLA with one shared KV head and a
grouped output projection, compressed sparse attention (compressors and a lightning indexer on
compressed layers), hash-routed then top-k MoE with shared experts, manifold-constrained
hyper-connections, MTP.

Names are the published checkpoint's (DeepSeek's own format: ``embed.weight``, ``head.weight``,
``norm.weight``, ``hc_head_*``, ``layers.{i}.attn.*`` / ``.ffn.*`` / ``.hc_attn_*`` /
``.hc_ffn_*``, ``mtp.{i}.*``), which is what all three readers take: Megatron-Bridge 0.6.2's
``DeepSeekV4Bridge`` maps exactly these names, vLLM 0.34's ``DeepseekV4ForCausalLM`` and its
``DeepSeekV4MTP`` drafter load them (``vllm/models/deepseek_v4``), and transformers 5.23 loads
them through its ``deepseek_v4`` conversion mapping. transformers' own ``save_pretrained`` writes
a mixture instead (``model.`` before the layers, ``model.embed_tokens``, ``model.hc_head.hc_*``,
the attention's ``kv_norm`` as ``attn.norm``: its renames reverted key by key), which vLLM does
not load; the proof (tests/test_conformance_deepseek_v4.py) loads these names in transformers
and compares every tensor with its in-memory model.

The Megatron side is Megatron-Bridge's mapping registry: megatron-core 0.19.2 has none of the
modules (no ``dsv4_hybrid`` attention variant, no hyper-connection module), so no Megatron
model of this family can be built with the installed stack. Megatron holds each
hyper-connection's three scalars as separate one-element parameters (``alpha_pre``,
``alpha_post``, ``alpha_res``) that the checkpoint keeps as one ``hc_*_scale`` ``[3]``: one
rule stacks them in that order. ``tid2eid`` (hash routing, an integer buffer) is exported as it
is, in its dtype.
"""

from __future__ import annotations

from bridge_ext.config_compare import ConfigField
from bridge_ext.ops import Scalar, SplitRows, TrimVocab
from bridge_ext.table import ExpertFamily, ExtraWeights, MappingTable, Rule, TableBuilder, prefixed, rule
from bridge_ext.tables.config_fields import standard

DESCRIPTION = "DeepSeek-V4: MLA with compressed sparse attention, hash + top-k MoE, hyper-connections, MTP"
CORE = "self_attention.core_attention."
# transformers 5.23 save-time name -> published name (first match wins)
PUBLISHED_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.embed_tokens\.weight$", "embed.weight"),
    (r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"^model\.layers\.(\d+)\.attn\.norm\.weight$", r"layers.\1.attn.kv_norm.weight"),
    (r"^model\.", ""),
)
# the published per-expert names (w1 = gate, w3 = up, w2 = down), the only layout all readers take
EXPERTS = ExpertFamily("experts", ("w1", "w3", "w2"))
MTP_EXPERTS = ExpertFamily("mtp_experts", ("w1", "w3", "w2"), extra=True)


def compressor(megatron: str, hf: str) -> list[Rule]:
    return [rule(f"{megatron}linear_wkv.weight", f"{hf}wkv.weight", tp="replicated"),
            rule(f"{megatron}linear_wgate.weight", f"{hf}wgate.weight", tp="replicated"),
            rule(f"{megatron}ape", f"{hf}ape", tp="replicated"),
            rule(f"{megatron}norm.weight", f"{hf}norm.weight", tp="replicated")]


def attention() -> list[Rule]:
    """MLA with a single KV projection and the grouped output (``wo_a`` replicated, ``wo_b`` row),
    the sinks split by heads; compressor and indexer only on compressed layers."""
    return [
        rule("input_layernorm.weight", "attn_norm.weight", tp="replicated"),
        rule("self_attention.linear_q_down_proj.weight", "attn.wq_a.weight", tp="replicated"),
        rule("self_attention.q_layernorm.weight", "attn.q_norm.weight", tp="replicated"),
        rule("self_attention.linear_q_up_proj.weight", "attn.wq_b.weight"),
        rule("self_attention.linear_kv_proj.weight", "attn.wkv.weight", tp="replicated"),
        rule("self_attention.kv_layernorm.weight", "attn.kv_norm.weight", tp="replicated"),
        rule("self_attention.linear_o_group_proj", "attn.wo_a.weight", tp="replicated"),
        rule("self_attention.linear_proj.weight", "attn.wo_b.weight", tp="row"),
        rule(CORE + "attn_sink", "attn.attn_sink"),
        *compressor(CORE + "compressor.", "attn.compressor."),
        rule(CORE + "indexer.linear_wq_b.weight", "attn.indexer.wq_b.weight", tp="replicated"),
        rule(CORE + "indexer.linear_weights_proj.weight", "attn.indexer.weights_proj.weight", tp="replicated"),
        *compressor(CORE + "indexer.compressor.", "attn.indexer.compressor."),
    ]


def moe(family: ExpertFamily) -> list[Rule]:
    rules = [
        rule("pre_mlp_layernorm.weight", "ffn_norm.weight", tp="replicated"),
        rule("mlp.router.weight", "ffn.gate.weight", tp="replicated"),
        rule("mlp.router.expert_bias", "ffn.gate.bias", tp="replicated"),
        rule("mlp.router.tid2eid", "ffn.gate.tid2eid", tp="replicated"),
        rule("mlp.shared_experts.linear_fc1.weight", ["ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight"],
             SplitRows(1, 1), lora_parts=("gate", "up")),
        rule("mlp.shared_experts.linear_fc2.weight", "ffn.shared_experts.w2.weight", tp="row"),
    ]
    for fc1, fc2 in (("mlp.experts.linear_fc1.weight{expert}", "mlp.experts.linear_fc2.weight{expert}"),
                     ("mlp.experts.local_experts.{expert}.linear_fc1.weight",
                      "mlp.experts.local_experts.{expert}.linear_fc2.weight")):
        rules += [
            rule(fc1, ["ffn.experts.{expert}.w1.weight", "ffn.experts.{expert}.w3.weight"], SplitRows(1, 1),
                 variant=family.variant("per_expert"), lora_parts=("gate", "up")),
            rule(fc2, "ffn.experts.{expert}.w2.weight", tp="row", variant=family.variant("per_expert")),
        ]
    return rules


def hyper_connections() -> list[Rule]:
    rules = []
    for megatron, hf in (("self_attention_hyper_connection.", "hc_attn_"), ("mlp_hyper_connection.", "hc_ffn_")):
        rules += [
            rule(f"{megatron}mapping_proj.weight", f"{hf}fn", tp="replicated"),
            rule(f"{megatron}bias", f"{hf}base", tp="replicated"),
            rule(f"{megatron}alpha_{{part=pre|post|res}}", f"{hf}scale", Scalar(), tp="replicated", stack="part"),
        ]
    return rules


def decoder_layer(family: ExpertFamily) -> list[Rule]:
    return [*attention(), *moe(family), *hyper_connections()]


def hc_head(megatron: str, hf: str) -> list[Rule]:
    return [rule(f"{megatron}hc_head_{part}", f"{hf}hc_head_{part}", tp="replicated") for part in ("fn", "base", "scale")]


def mtp_count(config) -> int:
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def rules(config) -> list[Rule]:
    """Embedding, output layer, final norm and output hyper-connection; MTP layers (each a
    decoder layer with ``enorm`` / ``hnorm``, separate ``e_proj`` / ``h_proj``, its own final norm
    and hyper-connection head, no embedding or output copy: vLLM's drafter reuses the target's);
    decoder layers."""
    table = [
        rule("embedding.word_embeddings.weight", "embed.weight", TrimVocab()),
        rule("output_layer.weight", "head.weight", TrimVocab()),
        rule("decoder.final_layernorm.weight", "norm.weight", tp="replicated"),
        *hc_head("decoder.", ""),
    ]
    if mtp_count(config):
        mtp = [
            rule("enorm.weight", "enorm.weight", tp="replicated"),
            rule("hnorm.weight", "hnorm.weight", tp="replicated"),
            rule("e_proj.weight", "e_proj.weight"),
            rule("h_proj.weight", "h_proj.weight"),
            rule("final_layernorm.weight", "norm.weight", tp="replicated"),
            *hc_head("", ""),
        ]
        table += prefixed(mtp, "mtp.layers.{depth}.", "mtp.{depth}.")
        table += prefixed(decoder_layer(MTP_EXPERTS), "mtp.layers.{depth}.mtp_model_layer.", "mtp.{depth}.")
    return table + prefixed(decoder_layer(EXPERTS), "decoder.layers.{layer}.", "layers.{layer}.")


# Megatron-Bridge's provider (deepseek_v4_bridge.py, provider_bridge) sets these from the config.
CONFIG_FIELDS = (
    *standard({
        "sliding_window": "DeepSeek-V4's window is Megatron's csa_window_size (compared below)",
        "layer_types": "per-layer compression, not a sliding-window pattern: csa_compress_ratios (not compared)",
        "partial_rotary_factor": "Megatron-Bridge sets rotary_percent = 1.0 and the rope width as qk_pos_emb_head_dim",
        "head_dim": "Megatron-Bridge sets v_head_dim from it; kv_channels is not read",
        **dict.fromkeys(("rope_parameters.rope_type", "rope_parameters.factor", "original_max_position_embeddings",
                         "beta_fast", "beta_slow"),
                        "DeepSeek-V4 nests its RoPE settings per branch (rope_parameters.main / .compress: YaRN "
                        "on the compressed layers only); the standard reader sees no top-level type"),
    }),
    *(ConfigField(family, hf, megatron) for family, hf, megatron in (
        ("DeepSeek-V4 attention", "q_lora_rank", "q_lora_rank"),
        ("DeepSeek-V4 attention", "o_groups", "o_groups"),
        ("DeepSeek-V4 attention", "o_lora_rank", "o_lora_rank"),
        ("DeepSeek-V4 attention", "sliding_window", "csa_window_size"),
        ("DeepSeek-V4 attention", "index_n_heads", "dsa_indexer_n_heads"),
        ("DeepSeek-V4 attention", "index_head_dim", "dsa_indexer_head_dim"),
        ("DeepSeek-V4 attention", "index_topk", "dsa_indexer_topk"),
        ("DeepSeek-V4 attention", "compress_rope_theta", "csa_compress_rotary_base"),
        ("hyper-connections", "hc_mult", "num_residual_streams"),
        ("hyper-connections", "hc_sinkhorn_iters", "mhc_sinkhorn_iterations"),
        ("mixture of experts", "swiglu_limit", "activation_func_clamp_value"),
    )),
)


def build(config) -> MappingTable:
    prefixes = tuple(f"mtp.{depth}." for depth in range(mtp_count(config)))
    return MappingTable(
        model_types=("deepseek_v4",),
        rules=tuple(rules(config)),
        description=DESCRIPTION,
        model_classes={"deepseek_v4": "DeepseekV4ForCausalLM"},
        expert_families=(EXPERTS, MTP_EXPERTS),
        extra_weights=ExtraWeights(prefixes=prefixes, count_key="num_nextn_predict_layers") if prefixes else None,
        # vLLM 0.34's loaders (main and drafter) take experts per expert only (w1 / w2 / w3)
        vllm_expert_adapter_layouts={"DeepseekV4ForCausalLM": "per_expert"},
        vllm_expert_layouts={"DeepseekV4ForCausalLM": "per_expert"},
        config_fields=CONFIG_FIELDS,
        published_renames=PUBLISHED_RENAMES,
        # the rules name the published checkpoint; PEFT keys adapters by transformers' in-memory
        # names, which differ in the middle of keys (attn -> self_attn, wq_a -> q_a_proj): adapters
        # in checkpoint names would load nowhere, without an error
        adapters_refused=("PEFT keys its adapters by transformers' in-memory names (self_attn.q_a_proj, ...), "
                          "not the published checkpoint's (attn.wq_a, ...) that this table writes"),
    )


TABLE = TableBuilder(model_types=("deepseek_v4",), build=build, description=DESCRIPTION)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
