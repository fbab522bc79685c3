"""DoRA (Megatron-Bridge's ``megatron.bridge.peft.dora``) as PEFT and merged weights express it.

Megatron-Bridge's ``DoRALinear`` computes ``m / ||W + s B A||_row * (W x + s B A x)`` (``s =
alpha / dim``; the norm over each output row, detached) and returns a bias it does not add
itself unscaled; PEFT's ``DoraLinearLayer`` computes the same, its norm detached, and adds the
module's bias unscaled. So a bias-free or bias-returning linear exports as PEFT DoRA with the
magnitude under ``<module>.lora_magnitude_vector``, split by rows like ``lora_B`` (row norms
do not mix rows), and merges as ``m / ||W + s B A||_row * (W + s B A)``.

Not expressible, refused naming the modules: as a PEFT adapter, a linear that adds its bias
inside the scaled product (Megatron scales the bias too, PEFT does not: the merged export scales
it), and routed experts (PEFT refuses DoRA
on fused expert parameters; Megatron-Bridge 0.6.2 cannot train it there: its magnitude is
viewed ``(1, 1, -1)`` against the experts' 2-D inputs, and grouped experts have no single
``weight`` to take a norm of). vLLM loads no DoRA adapter at all (its PEFT helper refuses
``use_dora``).
"""

from __future__ import annotations

import torch

from bridge_ext.errors import ExportError
from bridge_ext.source import Adapter, TensorSource


def dora_merge(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """``m / ||W + s B A||_row * (W + s B A)`` in fp32, cast back to the base dtype once."""
    weight = (lora_b.float() @ lora_a.float()).mul_(scale).add_(base)
    norm = torch.linalg.norm(weight, dim=1)
    return weight.mul_((magnitude.float() / norm).unsqueeze(1)).to(base.dtype)


def dora_scaled_bias(name: str, shards: list[torch.Tensor], adapters: dict[str, Adapter],
                     source: TensorSource) -> list[torch.Tensor]:
    """The bias ``name`` (as its tensor-parallel ``shards``) for a merged export: one that its DoRA
    linear adds inside the scaled product times the same factor ``m / ||W + s B A||_row`` (per
    tensor-parallel shard of rows, as Megatron computes it); other biases as they are."""
    adapter = adapters.get(name.removesuffix(".bias"))
    if adapter is None or not adapter.bias_inside:
        return shards
    weights, lora_bs = source.shards(adapter.module + ".weight"), source.shards(adapter.lora_b)
    magnitudes, a_shards = source.shards(adapter.magnitude), source.shards(adapter.lora_a)
    # Megatron's own per-shard layout (column-parallel only, checked below), not the export's LoRA rule
    lora_a = a_shards[0] if len(a_shards) == 1 else torch.cat(a_shards)
    if not len(weights) == len(lora_bs) == len(magnitudes) or weights[0].shape[1] != lora_a.shape[1]:
        raise ExportError(f"{name}: DoRA's bias scale of a row-parallel or unevenly sharded linear is not supported")
    factors = []
    for weight, lora_b, magnitude in zip(weights, lora_bs, magnitudes):
        row = (lora_b.float() @ lora_a.float()).mul_(adapter.scale).add_(weight)
        factors.append(magnitude.float() / torch.linalg.norm(row, dim=1))
    if len(shards) == 1 and len(factors) > 1:  # delivered whole (see TaskConverter.joins_rows)
        factors = [torch.cat(factors)]
    if len(shards) != len(factors):
        raise ExportError(f"{name}: its shards do not match its DoRA linear's")
    return [(bias.float() * factor).to(bias.dtype) for bias, factor in zip(shards, factors)]


def _listed(modules: list[str], limit: int = 4) -> str:
    more = f" and {len(modules) - limit} more" if len(modules) > limit else ""
    return ", ".join(modules[:limit]) + more


def check_dora(adapters: list[Adapter], *, merged: bool, adapters_out: bool) -> None:
    """Refuse, before any tensor moves, DoRA adapters that this export cannot reproduce (a merged
    export scales a bias added inside by the same factor as its weight rows)."""
    experts = sorted(a.module for a in adapters if a.expert)
    if experts and (merged or adapters_out):
        raise ExportError(f"DoRA on routed experts ({_listed(experts)}): Megatron-Bridge cannot train it there "
                          "and PEFT refuses DoRA on fused experts; leave the experts out of DoRA's target_modules")
    inside = sorted(a.module for a in adapters if a.bias_inside)
    if inside and adapters_out:
        raise ExportError(f"DoRA on {_listed(inside)} scales the bias Megatron adds inside the layer, which PEFT's "
                          "DoRA leaves unscaled: no PEFT adapter expresses it; export merged weights (peft=False)")


def refuse_for_vllm(adapters: list[Adapter]) -> None:
    """vLLM loads no DoRA adapter (its PEFT helper refuses ``use_dora``)."""
    if adapters:
        raise ExportError(f"the adapters are DoRA ({adapters[0].module}, ...), which vLLM cannot load: give vLLM "
                          "merged weights, or write the adapter folder for PEFT")
