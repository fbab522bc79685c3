"""LoRA merges ``W + scale * B @ A``: one weight, or every expert of a stacked ``[E, out, in]`` at once.

Both compute in fp32 and cast back to the base dtype, with the same roundings as
``base.float() + scale * (B @ A)``; both bound the fp32 memory they take.
"""

from __future__ import annotations

import torch

__all__ = ["MERGE_BLOCK_BYTES", "MERGE_EXPERT_BYTES", "merge", "merge_experts"]

MERGE_BLOCK_BYTES = 1 << 20  # fp32 rows of one product on CPU, to stay in cache
MERGE_EXPERT_BYTES = 64 << 20  # fp32 products of a batched expert merge


def merge(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
          transposed: bool = False) -> torch.Tensor:
    """``W + scale * B @ A`` (``W + scale * (B @ A)^T`` when ``transposed``) in fp32, cast
    back to the base dtype; computed in place on the product, on CPU a block of rows at a time."""
    if transposed:
        return merge(base.t(), lora_a, lora_b, scale).t()
    lora_a, lora_b = lora_a.float(), lora_b.float()
    rows = max(1, MERGE_BLOCK_BYTES // (4 * base.shape[1])) if base.device.type == "cpu" else base.shape[0]
    if rows >= base.shape[0]:
        return (lora_b @ lora_a).mul_(scale).add_(base).to(base.dtype)
    merged = torch.empty_like(base)
    block = torch.empty(rows, base.shape[1], device=base.device)
    for start in range(0, base.shape[0], rows):
        stop = min(start + rows, base.shape[0])
        product = torch.matmul(lora_b[start:stop], lora_a, out=block[: stop - start])
        merged[start:stop] = product.mul_(scale).add_(base[start:stop])
    return merged


def merge_experts(stacked: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
    """``W_e += scale * B_e @ A_e`` for every expert of ``stacked`` ``[E, out, in]``, in place, from
    PEFT's 3-D packing (``lora_A [E*r, in]``, ``lora_B [out, r*E]``), a few experts at a time so
    that the fp32 block stays small."""
    experts, out_features, in_features = stacked.shape
    rank = lora_a.shape[0] // experts
    a = lora_a.view(experts, rank, in_features)
    b = lora_b.view(out_features, rank, experts).permute(2, 0, 1)
    step = max(1, MERGE_EXPERT_BYTES // (4 * out_features * in_features))
    for start in range(0, experts, step):
        stop = min(start + step, experts)
        product = torch.bmm(b[start:stop].float(), a[start:stop].float())
        stacked[start:stop] = product.mul_(scale).add_(stacked[start:stop]).to(stacked.dtype)
