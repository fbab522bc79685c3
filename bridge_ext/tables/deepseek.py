"""DeepSeek-V3 (``deepseek_v3``; Moonlight declares it too) and Kimi-K2 (``kimi_k2``).

Multi-head Latent Attention: ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or a plain
``q_proj`` when ``q_lora_rank`` is null, as in Moonlight), ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``. Megatron's MLA linears hold the same rows
(``linear_q_up_proj`` per head ``[nope; rope]``, ``linear_kv_up_proj`` per head ``[k_nope; v]``,
``linear_kv_down_proj`` ``[kv_lora_rank; rope]``), so every MLA tensor maps one to one.
First ``first_k_dense_replace`` layers dense, then MoE: routed experts, shared experts
(``mlp.shared_experts``, plural) and the router with its correction bias
(``mlp.gate.e_score_correction_bias``, Megatron's buffer ``mlp.router.expert_bias``).

MTP layers follow the decoder: ``model.layers.{num_hidden_layers + i}`` with ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, a whole decoder layer, and copies of the
embedding (``embed_tokens``) and output layer (``shared_head.head``), which Megatron shares
with the main model (the published DeepSeek-V3 checkpoint and vLLM's ``deepseek_mtp.py`` hold /
load these names). transformers builds none of it.

Kimi-K2's config.json declares ``model_type: kimi_k2`` over ``DeepseekV3ForCausalLM`` (its
remote ``configuration_deepseek.py`` is DeepSeek-V3's); :func:`register_kimi_k2_config`
registers a ``kimi_k2`` config for ``AutoConfig`` so such folders are read without remote code.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge_ext.ops import Copies, TrimVocab
from bridge_ext.fp8_rules import Fp8Gemm, Fp8Rules, fp8_rules
from bridge_ext.table import ExpertFamily, ExtraWeights, MappingTable, Rule, TableBuilder, prefixed, rule
from bridge_ext.tables.fp8_blocks import ROUTER, expert_gemms, mlp_gemms, per_layer
from bridge_ext.tables.blocks import dense_mlp, post_attention_norm, routed_experts

# transformers v5's DeepSeek-V3 / GLM-4.5 experts register gate_up_proj, then down_proj.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
EXPERTS = ExpertFamily("experts", EXPERT_PARAMETERS)
MTP_EXPERTS = ExpertFamily("mtp_experts", EXPERT_PARAMETERS, extra=True)


def mla_attention() -> list[Rule]:
    """MLA of one layer; both norm spellings (local modules, Transformer Engine fused)."""
    return [
        rule("input_layernorm.weight", "input_layernorm.weight", tp="replicated"),
        rule("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight"),
        rule("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
        rule("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight", tp="replicated"),
        rule("self_attention.linear_q_up_proj.layer_norm_weight", "self_attn.q_a_layernorm.weight", tp="replicated"),
        rule("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
        rule("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
        rule("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight", tp="replicated"),
        rule("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attn.kv_a_layernorm.weight", tp="replicated"),
        rule("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
        rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", tp="row"),
    ]


def moe(family: ExpertFamily) -> list[Rule]:
    """Sigmoid router with correction bias (a Megatron buffer), shared and routed experts."""
    return [
        rule("mlp.router.weight", "mlp.gate.weight", tp="replicated"),
        rule("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", tp="replicated"),
        *dense_mlp("mlp.shared_experts.", "mlp.shared_experts."),
        *routed_experts(family),
    ]


def decoder_layer(family: ExpertFamily) -> list[Rule]:
    return [*mla_attention(), *post_attention_norm(), *dense_mlp(), *moe(family)]


def mtp_count(config) -> int:
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def mtp_layer_prefixes(config) -> tuple[str, ...]:
    first = config.num_hidden_layers
    return tuple(f"model.layers.{first + depth}." for depth in range(mtp_count(config)))


def deepseek_style_rules(config, decoder: Callable[[ExpertFamily], list[Rule]]) -> list[Rule]:
    """Embedding / output / final norm, MTP layers at ``model.layers.{num_hidden_layers + i}``
    (before the decoder rules: the reverse direction must find their offsets first), decoder."""
    first = config.num_hidden_layers
    depths = range(mtp_count(config))
    mtp = f"model.layers.{{depth+{first}}}."
    embed = ["model.embed_tokens.weight", *(f"model.layers.{first + d}.embed_tokens.weight" for d in depths)]
    head = ["lm_head.weight", *(f"model.layers.{first + d}.shared_head.head.weight" for d in depths)]
    rules = [
        rule("embedding.word_embeddings.weight", embed, TrimVocab(), Copies(len(embed))),
        rule("output_layer.weight", head, TrimVocab(), Copies(len(head))),
        rule("decoder.final_layernorm.weight", "model.norm.weight", tp="replicated"),
    ]
    if depths:
        rules += [
            rule("mtp.layers.{depth}.enorm.weight", mtp + "enorm.weight", tp="replicated"),
            rule("mtp.layers.{depth}.hnorm.weight", mtp + "hnorm.weight", tp="replicated"),
            rule("mtp.layers.{depth}.eh_proj.weight", mtp + "eh_proj.weight"),
            rule("mtp.layers.{depth}.final_layernorm.weight", mtp + "shared_head.norm.weight", tp="replicated"),
            *prefixed(decoder(MTP_EXPERTS), "mtp.layers.{depth}.mtp_model_layer.", mtp),
        ]
    return rules + prefixed(decoder(EXPERTS), "decoder.layers.{layer}.", "model.layers.{layer}.")


def mla_gemms() -> list[Fp8Gemm]:
    """vLLM's MLA: ``q_a_proj`` and ``kv_a_proj_with_mqa`` form the replicated ``fused_qkv_a_proj``
    (``kv_a_proj_with_mqa``'s 576 rows end in a partial block); the up-projections split by rows."""
    return [
        Fp8Gemm(("self_attn.q_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"), "replicated"),
        Fp8Gemm(("self_attn.q_proj.weight",), "column"),
        Fp8Gemm(("self_attn.q_b_proj.weight",), "column"),
        Fp8Gemm(("self_attn.kv_b_proj.weight",), "column"),
        Fp8Gemm(("self_attn.o_proj.weight",), "row"),
    ]


def deepseek_fp8() -> Fp8Rules:
    """Every decoder layer, MTP layers included (published DeepSeek-V3 FP8 checkpoints quantize
    them; vLLM's drafter builds them with the quantization config). The MTP layer's ``eh_proj``
    (a plain ``nn.Linear`` in vLLM) and ``shared_head.head`` stay bf16, as does the router."""
    gemms, kept = per_layer("model.layers.{layer}.",
                            [*mla_gemms(), *mlp_gemms(), *mlp_gemms("mlp.shared_experts."), *expert_gemms()],
                            [ROUTER, "eh_proj", "shared_head.head"])
    return fp8_rules(gemms, ["lm_head", *kept])


def deepseek_style_table(config, *, model_class: str, decoder: Callable[[ExpertFamily], list[Rule]],
                         description: str, fp8: Fp8Rules | None = None,
                         main_loads_fused: bool = False) -> MappingTable:
    """``main_loads_fused``: vLLM's main class loads fused expert weights (its MTP drafter never does)."""
    prefixes = mtp_layer_prefixes(config)
    return MappingTable(
        model_types=(config.model_type,),
        rules=tuple(deepseek_style_rules(config, decoder)),
        description=description,
        model_classes={config.model_type: model_class},
        expert_families=(EXPERTS, MTP_EXPERTS),
        extra_weights=ExtraWeights(prefixes=prefixes, count_key="num_nextn_predict_layers") if prefixes else None,
        # vLLM's DeepseekV3ForCausalLM and Glm4MoeForCausalLM: no is_3d_moe_weight
        vllm_expert_adapter_layouts={model_class: "per_expert"},
        # vLLM 0.34 (tests/consumers): the MTP drafters' loaders raise KeyError on fused expert
        # weights, and DeepseekV3ForCausalLM's too (Glm4MoeForCausalLM's loads them)
        vllm_expert_layouts={model_class: "per_expert"} if prefixes or not main_loads_fused else {},
        fp8=fp8,
    )


def build(config) -> MappingTable:
    return deepseek_style_table(config, model_class="DeepseekV3ForCausalLM", decoder=decoder_layer,
                                description="DeepSeek-V3 / Moonlight / Kimi-K2: MLA, MoE with shared experts, MTP",
                                fp8=deepseek_fp8())


def register_kimi_k2_config() -> type:
    """A ``kimi_k2`` config (DeepSeek-V3's, under Kimi-K2's model type) for ``AutoConfig``, and
    DeepSeek-V3's checkpoint conversion for it: Kimi-K2 checkpoints keep experts per expert,
    which transformers v5 fuses in memory only for model types it has a conversion for."""
    from transformers import AutoConfig, DeepseekV3Config
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "kimi_k2" in CONFIG_MAPPING:
        return CONFIG_MAPPING["kimi_k2"]

    class KimiK2Config(DeepseekV3Config):
        model_type = "kimi_k2"

    AutoConfig.register("kimi_k2", KimiK2Config)
    if get_checkpoint_conversion_mapping("kimi_k2") is None:
        register_checkpoint_conversion_mapping("kimi_k2", get_checkpoint_conversion_mapping("deepseek_v3"))
    return KimiK2Config


TABLE = TableBuilder(model_types=("deepseek_v3", "kimi_k2"), build=build,
                     description="DeepSeek-V3 / Moonlight / Kimi-K2: MLA, MoE with shared experts, MTP",
                     register_hf_config=register_kimi_k2_config)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
