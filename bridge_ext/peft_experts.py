"""MoE expert LoRA in PEFT's ``target_parameters`` layout (fused 3-D experts).

transformers v5 keeps the experts of Qwen3-MoE / Qwen3.5-MoE fused in two ``nn.Parameter`` s of
the ``mlp.experts`` module::

    gate_up_proj  [E, 2I, H]   (per expert: rows = [gate; up], nn.Linear (out, in) convention)
    down_proj     [E, H,  I]

PEFT 0.21.2 adapts such parameters with ``lora.ParamWrapper`` (``peft/tuners/lora/layer.py``).
Everything below was read off that class and checked on tiny models
(``tests/test_peft_experts.py``).

Shapes
------
``ParamWrapper._get_in_out_features`` reads a 3-D parameter as ``(E, in, out)``; because the
experts module has ``is_transposed = False`` (``use_experts_implementation``), ``update_layer``
swaps them, so for a parameter ``[E, out, in]``::

    lora_A = nn.Linear(in, r * E)   -> lora_A.weight  [r*E, in]
    lora_B = nn.Linear(r * E, out)  -> lora_B.weight  [out, r*E]

i.e. gate_up_proj: A ``[r*E, H]``, B ``[2I, r*E]``; down_proj: A ``[r*E, I]``, B ``[H, r*E]``.

Packing of the r*E axis (``ParamWrapper.get_delta_weight`` / ``get_delta_factors``)
----------------------------------------------------------------------------------
* ``lora_A.weight.reshape(E, r, in)``: **expert-major** -- rows ``e*r : (e+1)*r`` are ``A_e``.
* ``lora_B.weight.reshape(out, r, E)``: **rank-major, expert-minor** -- column ``k*E + e`` is
  column ``k`` of ``B_e``. (Not ``e*r + k``! The two factors are packed differently.)
* ``delta[e] = scaling * B_e @ A_e`` (``einsum("o r e, e r i -> e o i")``), no transpose, added to
  ``param[e]`` in the parameter's own ``[out, in]`` convention.

PEFT's transformers-v4->v5 adapter conversion (``peft/utils/transformers_weight_conversion.py``,
``build_peft_weight_mapping``) packs per-expert LoRA into the same layout (``FlattenDims`` on A,
``PermuteDims(2, 0, 1)`` + flatten + transpose on B), which confirms it.

Scaling
-------
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` is the
config's (per-expert) rank -- *not* ``r*E``. Megatron's ``alpha / r`` therefore carries over with
the same ``r`` and ``lora_alpha``.

Constraints
-----------
* All experts of one parameter must have the same rank (the r*E axis is a plain reshape).
* ``lora_dropout`` must be 0, ``fan_in_fan_out``, ``use_dora``, ``lora_bias`` false: ParamWrapper
  raises otherwise.
* gate_up_proj and down_proj may have different ranks / alphas only via ``rank_pattern`` /
  ``alpha_pattern`` keyed on ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` (PEFT
  matches patterns against ``<module path>.<parameter name>``).

Saved key names (nesting)
-------------------------
Each ParamWrapper adapts one parameter; a second targeted parameter on the same module wraps
the first wrapper. PEFT (``BaseTuner._inject_parameters``) walks
``experts.named_parameters(recurse=False)``, i.e. the module's **registration order**
(``gate_up_proj`` then ``down_proj`` in Qwen3MoeExperts / Qwen3_5MoeExperts), wrapping each
matching parameter; the first one wrapped ends up innermost. The order of
``target_parameters`` in the config does not matter (PEFT even sorts it). Hence::

    <experts>.base_layer.lora_A.weight / .lora_B.weight   -> gate_up_proj  (inner wrapper)
    <experts>.lora_A.weight            / .lora_B.weight   -> down_proj     (outer wrapper)

each with PEFT's ``base_model.model.`` prefix, e.g.
``base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight`` for a CausalLM, or
``base_model.model.model.language_model.layers.0.mlp.experts...`` for Qwen3.5-MoE
ConditionalGeneration. If only one of the two is targeted, it carries no ``base_layer``.

Trap for qwen2_moe-family model types (qwen3_moe, ...)
-----------------------------------------------------
On load, PEFT rewrites v4-style configs (``_convert_peft_config_moe``): for model types whose
transformers conversion pattern is ``qwen2_moe`` (qwen3_moe included; *not* qwen3_5_moe /
qwen3_5_moe_text, whose pattern is ``qwen3_5_text``) every ``target_modules`` entry named
``gate_proj``, ``up_proj``, ``down_proj`` or ``gate`` is moved into ``target_parameters`` and, if
both gate_proj and up_proj are present, ``rank_pattern``/``alpha_pattern`` for gate_up_proj are
set to ``2r``/``2 alpha``. An adapter written in this layout then no longer fits (shape mismatch
or silently re-targeted modules). The tests check adapter configs for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fuse_expert_lora(
    a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-expert LoRA factors into PEFT ParamWrapper's ``(lora_A, lora_B)`` weights.

    ``a_list[e]`` is ``A_e [r, in]`` and ``b_list[e]`` is ``B_e [out, r]`` (nn.Linear convention,
    ``delta W_e = scale * B_e @ A_e`` of shape ``[out, in]``). For Megatron ``linear_fc1`` that is
    ``A_e [r, H]``, ``B_e [2I, r]`` (gate rows then up rows, same as HF's gate_up_proj[e]); for
    ``linear_fc2`` ``A_e [r, I]``, ``B_e [H, r]``.

    Returns ``lora_A [r*E, in]`` (expert-major: rows ``e*r+k`` = ``A_e[k]``) and
    ``lora_B [out, r*E]`` (rank-major: column ``k*E+e`` = ``B_e[:, k]``). All experts must share
    one rank ``r``.
    """
    if len(a_list) == 0 or len(a_list) != len(b_list):
        raise ValueError(f"need one A and one B per expert, got {len(a_list)} A and {len(b_list)} B")
    r, d_in = a_list[0].shape
    d_out = b_list[0].shape[0]
    for e, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"expert {e}: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
        if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise ValueError(
                f"expert {e}: A {tuple(a.shape)} / B {tuple(b.shape)} differ from expert 0's A {(r, d_in)} / "
                f"B {(d_out, r)}; PEFT's r*E packing needs equal ranks and shapes for all experts"
            )
    lora_a = torch.cat(list(a_list), dim=0)  # [E*r, in]
    lora_b = torch.stack(list(b_list), dim=-1).reshape(d_out, r * len(b_list))  # [out, r, E] -> [out, r*E]
    return lora_a.contiguous(), lora_b.contiguous()


def peft_param_key_infixes(targeted: Sequence[str], registration_order: Sequence[str]) -> dict[str, str]:
    """Infix between ``<experts module>.`` and ``lora_A.weight`` for each targeted parameter.

    The first targeted parameter in the module's *registration order* (the table's
    ``ExpertFamily.parameters``) is wrapped first and is therefore innermost: with n targeted
    parameters the i-th gets ``"base_layer." * (n-1-i)``. The order of ``target_parameters``
    in the config plays no role. For transformers' Qwen3(.5)-MoE experts:
    ``{"gate_up_proj": "base_layer.", "down_proj": ""}``.
    """
    unknown = set(targeted) - set(registration_order)
    if unknown:
        raise ValueError(f"parameters {sorted(unknown)} are not in registration order {list(registration_order)}")
    ordered = [p for p in registration_order if p in set(targeted)]
    n = len(ordered)
    return {p: "base_layer." * (n - 1 - i) for i, p in enumerate(ordered)}

