"""gpt-oss (``gpt_oss``): GQA with biases, attention sinks, alternating sliding-window
layers (no effect on names), and MoE experts stored fused and transposed with biases:
``mlp.experts.gate_up_proj [E, H, 2I]`` whose last dim interleaves gate and up
(``gate = [..., ::2]``, ``up = [..., 1::2]``), ``gate_up_proj_bias [E, 2I]`` (interleaved
alike), ``down_proj [E, I, H]``, ``down_proj_bias [E, H]``; router ``mlp.router.weight`` /
``bias``. Megatron's expert ``linear_fc1`` is ``[gate; up]`` ``[2I, H]``: its halves are
interleaved row by row (``GroupRows(1, 1)``), then transposed.

Expert LoRA goes through :class:`bridge_ext.ops.Transpose` (see its A/B semantics): PEFT's
``target_parameters`` wraps the ``[E, in, out]`` parameter with ``nn.Linear``-shaped factors,
which are Megatron's own (B's rows interleaved like the base). vLLM loads gpt-oss expert LoRA
in this 3-D layout (``GptOssForCausalLM.is_3d_moe_weight``).
"""

from __future__ import annotations

from bridge_ext.fp8_rules import Fp8Rules
from bridge_ext.ops import GroupRows, SplitRows, Transpose
from bridge_ext.table import ExpertFamily, MappingTable, Rule, prefixed, rule
from bridge_ext.tables import config_fields
from bridge_ext.tables.blocks import attention, embeddings, post_attention_norm

# transformers' GptOssExperts registers gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias;
# PEFT targets the two weights.
EXPERTS = ExpertFamily("experts", ("gate_up_proj", "down_proj"))
INTERLEAVE_GATE_UP = (SplitRows(1, 1), GroupRows(1, 1))


def experts() -> list[Rule]:
    fused = EXPERTS.variant("fused")
    rules = []
    for fc1, fc2, kind in _expert_names():
        if kind == "weight":
            rules += [
                rule(fc1, "mlp.experts.gate_up_proj", *INTERLEAVE_GATE_UP, Transpose(), stack="expert", variant=fused),
                rule(fc2, "mlp.experts.down_proj", Transpose(), tp="row", stack="expert", variant=fused),
            ]
        else:
            rules += [
                rule(fc1, "mlp.experts.gate_up_proj_bias", *INTERLEAVE_GATE_UP, stack="expert", variant=fused),
                rule(fc2, "mlp.experts.down_proj_bias", tp="replicated", stack="expert", variant=fused),
            ]
    return rules


def _expert_names() -> list[tuple[str, str, str]]:
    """(fc1, fc2, weight|bias) for sequential and Transformer Engine grouped experts."""
    names = []
    for kind in ("weight", "bias"):
        names.append((f"mlp.experts.local_experts.{{expert}}.linear_fc1.{kind}",
                      f"mlp.experts.local_experts.{{expert}}.linear_fc2.{kind}", kind))
        names.append((f"mlp.experts.linear_fc1.{kind}{{expert}}", f"mlp.experts.linear_fc2.{kind}{{expert}}", kind))
    return names


def decoder_layer() -> list[Rule]:
    return [
        *attention(qkv_bias=True),
        rule("self_attention.linear_proj.bias", "self_attn.o_proj.bias", tp="replicated"),
        rule("self_attention.core_attention.softmax_offset", "self_attn.sinks"),
        *post_attention_norm(),
        rule("mlp.router.weight", "mlp.router.weight", tp="replicated"),
        rule("mlp.router.bias", "mlp.router.bias", tp="replicated"),
        *experts(),
    ]


# Fed a synthetic block-FP8 export, vLLM 0.34's GptOssForCausalLM loader loads none of the expert
# scales (published gpt-oss checkpoints ship MXFP4 experts): FP8 is refused rather than sent.
FP8 = Fp8Rules(refused="vLLM's gpt-oss loader does not load block-FP8 expert scales "
                       "(experts.gate_up_proj_scale_inv / down_proj_scale_inv): the experts would run unscaled")

TABLE = MappingTable(
    model_types=("gpt_oss",),
    rules=(*embeddings("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"),
           *prefixed(decoder_layer(), "decoder.layers.{layer}.", "model.layers.{layer}.")),
    description="gpt-oss: GQA with sinks and sliding windows, fused transposed experts with biases",
    model_classes={"gpt_oss": "GptOssForCausalLM"},
    expert_families=(EXPERTS,),
    vllm_expert_adapter_layouts={"GptOssForCausalLM": "fused"},  # vLLM: is_3d_moe_weight
    # hidden_act "silu" names gpt-oss's clamped SwiGLU, which Megatron-Bridge runs as quick_gelu
    # with a clamp and a +1 offset (gpt_oss_bridge.py): no name-for-name comparison says more.
    config_fields=config_fields.standard({"hidden_act": "gpt-oss's clamped SwiGLU is Megatron's quick_gelu "
                                                        "with activation_func_clamp_value and glu_linear_offset"}),
    fp8=FP8,
)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
