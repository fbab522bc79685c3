"""PEFT's saved adapter key format, defined once.

A LoRA pair on the Hugging Face module ``m`` is saved as ``base_model.model.<m>.lora_A.weight``
and ``...lora_B.weight`` (no adapter name inside the key); a fused parameter adapted through
``target_parameters`` keys its pair on the module holding it, with one ``base_layer.`` per
wrapper around it (see :mod:`bridge_ext.peft_experts`).
"""

from __future__ import annotations

from bridge_ext.errors import ExportError


def weight_module(name: str) -> str | None:
    """The module whose ``weight`` ``name`` is (``a.b.weight`` -> ``a.b``); None for any other name."""
    return name[: -len(".weight")] if name.endswith(".weight") else None

PEFT_PREFIX = "base_model.model."
LORA_A = "lora_A"
LORA_B = "lora_B"
LORA_FACTORS = (LORA_A, LORA_B)


def peft_key(hf_name: str, factor: str) -> str:
    """PEFT's saved key of ``lora_A``/``lora_B`` for the Hugging Face weight ``hf_name``."""
    if not hf_name.endswith(".weight"):
        raise ExportError(f"{hf_name} is not a module weight; PEFT keys it as a target parameter")
    return f"{PEFT_PREFIX}{hf_name[: -len('.weight')]}.{factor}.weight"


def peft_parameter_key(module: str, infix: str, factor: str) -> str:
    """The saved key of a ``target_parameters`` factor on ``module`` (``infix``: its ``base_layer.`` s)."""
    return f"{PEFT_PREFIX}{module}.{infix}{factor}.weight"


MAGNITUDE = "lora_magnitude_vector"


def peft_magnitude_key(hf_name: str) -> str:
    """PEFT's saved key of a DoRA magnitude for the Hugging Face weight ``hf_name`` (no
    ``.weight``: ``get_peft_model_state_dict`` saves it so)."""
    if not hf_name.endswith(".weight"):
        raise ExportError(f"{hf_name} is not a module weight; PEFT has no DoRA for target parameters")
    return f"{PEFT_PREFIX}{hf_name[: -len('.weight')]}.{MAGNITUDE}"
