"""Block-FP8 rules of the common decoder blocks, as vLLM runs them (its packed modules and
linear classes), Hugging Face names relative to a layer prefix.

vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``
(``packed_modules_mapping``), splits them by output rows and ``o_proj`` / ``down_proj`` by
input columns; its FusedMoE reads experts per expert (``experts.{e}.gate_proj``) or fused
(``experts.gate_up_proj`` with ``gate_up_proj_scale_inv``, gate and up blocked separately).
Routers (``mlp.gate``) and shared-expert gates stay bf16, as in published FP8 checkpoints.
"""

from bridge_ext.fp8_rules import Fp8Gemm, prefixed_gemms

ROUTER = "mlp.gate"
SHARED_EXPERT_GATE = "mlp.shared_expert_gate"


def attention_gemms() -> list[Fp8Gemm]:
    return [
        Fp8Gemm(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "column"),
        Fp8Gemm(("self_attn.o_proj.weight",), "row"),
    ]


def mlp_gemms(hf: str = "mlp.") -> list[Fp8Gemm]:
    return [
        Fp8Gemm((f"{hf}gate_proj.weight", f"{hf}up_proj.weight"), "column"),
        Fp8Gemm((f"{hf}down_proj.weight",), "row"),
    ]


def expert_gemms(hf: str = "mlp.experts.", per_expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 ) -> list[Fp8Gemm]:
    """Routed experts under ``hf`` in both layouts (per expert, with the ``per_expert`` gate / up /
    down module names, and fused ``[E, ...]``)."""
    gate, up, down = (f"{hf}{{expert}}.{name}.weight" for name in per_expert)
    return [
        Fp8Gemm((gate, up), "column"),
        Fp8Gemm((down,), "row"),
        Fp8Gemm((f"{hf}gate_up_proj",), "column", parts=2),
        Fp8Gemm((f"{hf}down_proj",), "row"),
    ]


def per_layer(prefix: str, gemms: list[Fp8Gemm], modules: list[str]) -> tuple[list[Fp8Gemm], list[str]]:
    """GEMMs and bf16 module patterns of a layer under ``prefix`` (e.g. ``model.layers.{layer}.``)."""
    return prefixed_gemms(gemms, prefix), [prefix + module for module in modules]
