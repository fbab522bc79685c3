"""PEFT 3-D expert LoRA helpers used by the tests only: the inverse packing, PEFT's delta and
scaling, saved key names and adapter_config fields, and the target-modules trap check.

The layout facts they follow are in bridge_ext/peft_experts.py's module docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bridge_ext.peft_experts import peft_param_key_infixes
from bridge_ext.peft_keys import LORA_A, LORA_B, peft_parameter_key
from bridge_ext.tables.qwen3_5 import EXPERTS

GATE_UP, DOWN = EXPERTS.parameters
EXPERT_PARAMETERS = EXPERTS.parameters  # transformers' registration order, as the table states it
TARGET_PARAMETERS = tuple(f"mlp.experts.{p}" for p in EXPERT_PARAMETERS)

# Model types for which PEFT 0.21.2 rewrites gate_proj/up_proj/down_proj/gate target modules
# into target_parameters (transformers' _MODEL_TO_CONVERSION_PATTERN -> "qwen2_moe" / "mixtral").
_V4_MOE_REWRITTEN_NAMES = {
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj", "gate"),
    "mixtral": ("w1", "w2", "w3", "gate"),
}


def expert_adapter_config_fields(
    r: int,
    lora_alpha: float,
    *,
    use_rslora: bool = False,
    down_r: int | None = None,
    down_alpha: float | None = None,
    targeted: Sequence[str] = EXPERT_PARAMETERS,
) -> dict:
    """adapter_config.json fields that the 3-D expert layout needs (merge them into the rest).

    ``r``/``lora_alpha`` are those of gate_up_proj (Megatron linear_fc1); ``down_r``/``down_alpha``
    those of down_proj (linear_fc2) when they differ, which yields ``rank_pattern`` /
    ``alpha_pattern`` entries keyed ``mlp.experts.down_proj``. ``target_modules`` is left to the
    caller (the non-expert leaves; ``[]`` when only experts are adapted) -- see
    :func:`check_target_modules`.
    """
    fields: dict = {
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "target_parameters": [f"mlp.experts.{p}" for p in EXPERT_PARAMETERS if p in set(targeted)],
        "lora_dropout": 0.0,  # ParamWrapper raises for != 0
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if down_r is not None and down_r != r:
        fields["rank_pattern"][f"mlp.experts.{DOWN}"] = down_r
    if down_alpha is not None and down_alpha != lora_alpha:
        fields["alpha_pattern"][f"mlp.experts.{DOWN}"] = down_alpha
    return fields


def check_target_modules(model_type: str, target_modules: Sequence[str]) -> None:
    """Refuse ``target_modules`` that PEFT 0.21.2 would rewrite into ``target_parameters`` on load.

    For model types whose transformers conversion pattern is ``qwen2_moe`` (e.g. qwen3_moe) or
    ``mixtral``, PEFT's ``_convert_peft_config_moe`` treats ``gate_proj``/``up_proj``/``down_proj``/
    ``gate`` (``w1``/``w2``/``w3``/``gate``) as v4 per-expert targets and moves them to
    ``target_parameters`` (doubling r/alpha of gate_up_proj when both gate and up are listed), which
    breaks an adapter written with the 3-D expert layout (and also mis-targets dense MLPs).
    """
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:  # pragma: no cover - transformers < 5
        return
    pattern = {"mixtral": "mixtral"}.get(model_type, _MODEL_TO_CONVERSION_PATTERN.get(model_type))
    names = _V4_MOE_REWRITTEN_NAMES.get(pattern or "")
    if not names:
        return
    bad = [t for t in target_modules if any(t == n or t.endswith(f".{n}") for n in names)]
    if bad:
        raise ValueError(
            f"target_modules {bad} cannot be used for model_type {model_type!r}: PEFT rewrites "
            f"{list(names)} into target_parameters on load (v4->v5 MoE conversion), which breaks the "
            "3-D expert adapter layout"
        )


def expert_adapter_keys(experts_module: str) -> dict[str, tuple[str, str]]:
    return peft_expert_adapter_keys(experts_module, EXPERT_PARAMETERS, EXPERT_PARAMETERS)


def split_expert_lora(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`bridge_ext.peft_experts.fuse_expert_lora`: PEFT ``(lora_A [r*E, in], lora_B [out, r*E])`` ->
    per-expert ``([A_e [r, in]], [B_e [out, r]])``."""
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError("lora_A and lora_B must be 2-D")
    re_a, d_in = lora_a.shape
    d_out, re_b = lora_b.shape
    if re_a != re_b or re_a % num_experts:
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not share an r*E axis "
            f"divisible by num_experts={num_experts}"
        )
    r = re_a // num_experts
    a = lora_a.reshape(num_experts, r, d_in)
    b = lora_b.reshape(d_out, r, num_experts)
    return [a[e].clone() for e in range(num_experts)], [b[:, :, e].clone() for e in range(num_experts)]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling for a ParamWrapper with per-expert rank ``r`` (the config's r, not r*E)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def expert_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, scaling: float
) -> torch.Tensor:
    """The ``[E, out, in]`` delta PEFT merges for packed ``(lora_A, lora_B)`` (re-implements
    ``ParamWrapper.get_delta_weight`` for a non-transposed 3-D parameter)."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])  # e r i
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts)  # o r e
    return torch.einsum("ore,eri->eoi", b, a) * scaling


def peft_expert_adapter_keys(
    experts_module: str, targeted: Sequence[str], registration_order: Sequence[str]
) -> dict[str, tuple[str, str]]:
    """Saved adapter keys for one experts module.

    ``experts_module`` is the HF module path, e.g. ``"model.layers.0.mlp.experts"``. Returns
    ``{param_name: (lora_A key, lora_B key)}``, keys as in ``adapter_model.safetensors``
    (``base_model.model.`` prefix, no adapter name).
    """
    infixes = peft_param_key_infixes(targeted, registration_order)
    return {p: (peft_parameter_key(experts_module, inf, LORA_A), peft_parameter_key(experts_module, inf, LORA_B))
            for p, inf in infixes.items()}
