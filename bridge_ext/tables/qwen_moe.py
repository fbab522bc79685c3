"""Qwen3-MoE and Qwen2-MoE decoders: GQA attention, a router, routed experts (+ shared expert).

* ``qwen3_moe``: q/k norms, no qkv bias, every layer MoE, no shared expert.
* ``qwen2_moe``: qkv bias, no q/k norms, a shared expert whose output is scaled by
  ``sigmoid(shared_expert_gate(x))`` (Megatron's ``shared_experts.gate_weight``); layers listed
  in ``mlp_only_layers`` (or off the ``decoder_sparse_step`` grid) keep a dense MLP.

Hugging Face names ``model.layers.{i}.*``. transformers v5 keeps the experts fused in memory
(``mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) and writes them per expert
(``mlp.experts.{e}.gate_proj.weight``...), which is also the published checkpoints' layout;
both are variants of the ``experts`` family.
"""

from bridge_ext.fp8_rules import fp8_rules
from bridge_ext.table import ExpertFamily, MappingTable, prefixed, rule
from bridge_ext.tables.fp8_blocks import ROUTER, SHARED_EXPERT_GATE, attention_gemms, expert_gemms, mlp_gemms, per_layer
from bridge_ext.tables.blocks import attention, dense_mlp, embeddings, post_attention_norm, routed_experts
from bridge_ext.tables.qwen3_5 import EXPERT_PARAMETERS

# Qwen3MoeExperts / Qwen2MoeExperts register gate_up_proj, then down_proj.
EXPERTS = ExpertFamily("experts", EXPERT_PARAMETERS)


def _moe_layer(*, shared_expert: bool) -> list:
    rules = [
        *attention(qkv_bias=shared_expert),
        *post_attention_norm(),
        rule("mlp.router.weight", "mlp.gate.weight", tp="replicated"),
        *routed_experts(EXPERTS),
    ]
    if shared_expert:
        rules += [
            rule("mlp.shared_experts.gate_weight", "mlp.shared_expert_gate.weight", tp="replicated"),
            *dense_mlp("mlp.shared_experts.", "mlp.shared_expert."),
            *dense_mlp(),  # dense layers (mlp_only_layers)
        ]
    return rules


def _decoder(*, shared_expert: bool) -> tuple:
    return (
        *embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"),
        *prefixed(_moe_layer(shared_expert=shared_expert), "decoder.layers.{layer}.", "model.layers.{layer}."),
    )


def _fp8(*, shared_expert: bool):
    gemms = [*attention_gemms(), *expert_gemms()]
    kept = [ROUTER]
    if shared_expert:
        gemms += [*mlp_gemms("mlp.shared_expert."), *mlp_gemms()]
        kept.append(SHARED_EXPERT_GATE)
    layer_gemms, layer_kept = per_layer("model.layers.{layer}.", gemms, kept)
    return fp8_rules(layer_gemms, ["lm_head", *layer_kept])


QWEN3_MOE = MappingTable(
    model_types=("qwen3_moe",),
    rules=_decoder(shared_expert=False),
    description="Qwen3-MoE causal LM (q/k norms, routed experts)",
    model_classes={"qwen3_moe": "Qwen3MoeForCausalLM"},
    expert_families=(EXPERTS,),
    # vLLM's Qwen3MoeForCausalLM is no is_3d_moe_weight model: experts.{e}.gate_proj LoRA.
    vllm_expert_adapter_layouts={"Qwen3MoeForCausalLM": "per_expert"},
    fp8=_fp8(shared_expert=False),
)

QWEN2_MOE = MappingTable(
    model_types=("qwen2_moe",),
    rules=_decoder(shared_expert=True),
    description="Qwen2-MoE causal LM (qkv bias, routed experts, sigmoid-gated shared expert)",
    model_classes={"qwen2_moe": "Qwen2MoeForCausalLM"},
    expert_families=(EXPERTS,),
    vllm_expert_adapter_layouts={"Qwen2MoeForCausalLM": "per_expert"},  # vLLM: no is_3d_moe_weight
    fp8=_fp8(shared_expert=True),
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (QWEN3_MOE, QWEN2_MOE)
