"""The named, reversible operations that mapping rules chain together.

Every operation maps a list of tensors to a list of tensors, Megatron -> Hugging Face in
:meth:`Op.forward`, back in :meth:`Op.reverse`. Row operations only rearrange rows (dim 0),
so the very same call converts a base weight and a LoRA ``lora_B`` (``[out, r]``); operations
that change values (``changes_values``) apply to base weights only.

``per_rank`` operations see one tensor-parallel shard at a time (Megatron lays fused
projections out per rank: ``[q_r; k_r; v_r; ...]``); the engine concatenates their outputs
across ranks part by part, then runs the remaining (global) operations. On a single rank, or
on a checkpoint's global tensor, the shard is the whole tensor.

Sizes are named (``"head_dim"``) and looked up in :class:`bridge_ext.dims.ModelDims`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from bridge_ext.dims import ModelDims

Size = int | str


def _resolve(size: Size, dims: ModelDims) -> int:
    return size if isinstance(size, int) else dims[size]


def _proportional_rows(rows: int, sizes: tuple[Size, ...], dims: ModelDims) -> list[int]:
    """``rows`` cut in the proportions of ``sizes`` (a shard of a tensor is cut like the whole)."""
    resolved = [_resolve(size, dims) for size in sizes]
    total = sum(resolved)
    if any(rows * size % total for size in resolved):
        raise ValueError(f"{rows} rows cannot be cut in proportions {resolved}")
    return [rows * size // total for size in resolved]


class Op:
    """Base class: one step of a rule.

    ``after_merge`` operations (a transpose) change a base weight's layout in a way its LoRA
    factors cannot follow: they come last in a rule, run after the LoRA delta is merged, and
    adapters keep the layout before them (the one a model holds in memory, which PEFT adapts).
    """

    per_rank: ClassVar[bool] = False
    changes_values: ClassVar[bool] = False
    after_merge: ClassVar[bool] = False

    def forward(self, tensors: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        raise NotImplementedError

    def reverse(self, tensors: list[torch.Tensor], dims: ModelDims) -> list[torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class SplitRows(Op):
    """Cut one tensor's rows into consecutive parts, in the given proportions.

    ``SplitRows(1, 1)`` halves (``linear_fc1 = [gate; up]``); named sizes give exact global
    sizes, and a tensor-parallel shard is cut in the same proportions.
    """

    sizes: tuple[Size, ...]
    per_rank: ClassVar[bool] = True

    def __init__(self, *sizes: Size):
        object.__setattr__(self, "sizes", sizes)

    def forward(self, tensors, dims):
        (tensor,) = tensors
        return list(torch.split(tensor, _proportional_rows(tensor.shape[0], self.sizes, dims)))

    def reverse(self, tensors, dims):
        return [torch.cat(tensors)]


@dataclass(frozen=True)
class SplitGroupedRows(Op):
    """Rows repeat a group ``[part_0; part_1; ...]``; gather each part across the groups.

    Megatron's ``linear_qkv`` holds per query group ``[q heads; (gate heads;) k; v]``: part i
    of the result is part i of every group, in group order.
    """

    sizes: tuple[Size, ...]
    per_rank: ClassVar[bool] = True

    def __init__(self, *sizes: Size):
        object.__setattr__(self, "sizes", sizes)

    def forward(self, tensors, dims):
        (tensor,) = tensors
        sizes = [_resolve(size, dims) for size in self.sizes]
        group_rows = sum(sizes)
        if tensor.shape[0] % group_rows:
            raise ValueError(f"{tensor.shape[0]} rows are not whole groups of {sizes}")
        grouped = tensor.reshape(tensor.shape[0] // group_rows, group_rows, *tensor.shape[1:])
        return [part.reshape(-1, *tensor.shape[1:]) for part in torch.split(grouped, sizes, dim=1)]

    def reverse(self, tensors, dims):
        sizes = [_resolve(size, dims) for size in self.sizes]
        groups = tensors[0].shape[0] // sizes[0]
        rest = tensors[0].shape[1:]
        parts = [part.reshape(groups, size, *rest) for part, size in zip(tensors, sizes)]
        return [torch.cat(parts, dim=1).reshape(-1, *rest)]


@dataclass(frozen=True)
class GroupRows(Op):
    """Interleave consecutive parts group by group: the inverse of :class:`SplitGroupedRows`.

    ``GroupRows("a", "b", first=1)`` replaces parts 1 and 2 (each ``G`` groups of ``a`` resp.
    ``b`` rows) with one tensor ``[a_0; b_0; a_1; b_1; ...]``; other parts pass through.
    Qwen3-Next's ``in_proj_qkvz`` holds per key head ``[q; k; v; z]``.
    """

    sizes: tuple[Size, ...]
    first: int = 0

    def __init__(self, *sizes: Size, first: int = 0):
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "first", first)

    def forward(self, tensors, dims):
        end = self.first + len(self.sizes)
        (grouped,) = SplitGroupedRows(*self.sizes).reverse(tensors[self.first : end], dims)
        return [*tensors[: self.first], grouped, *tensors[end:]]

    def reverse(self, tensors, dims):
        parts = SplitGroupedRows(*self.sizes).forward([tensors[self.first]], dims)
        return [*tensors[: self.first], *parts, *tensors[self.first + 1 :]]


@dataclass(frozen=True)
class Concat(Op):
    """Join consecutive parts into Hugging Face tensors; each group lists its parts' sizes.

    ``Concat(("gdn_qk_rows", "gdn_qk_rows", "gdn_v_rows"), ("gdn_v_rows",))`` makes two
    tensors from four parts: ``[q; k; v]`` and ``z``. The sizes (or proportions: ``(1, 1)``
    for gate and up) tell the reverse direction where to cut.
    """

    groups: tuple[tuple[Size, ...], ...]

    def __init__(self, *groups: Sequence[Size]):
        object.__setattr__(self, "groups", tuple(tuple(group) for group in groups))

    def forward(self, tensors, dims):
        if len(tensors) != sum(len(group) for group in self.groups):
            raise ValueError(f"Concat{self.groups} got {len(tensors)} parts")
        out, start = [], 0
        for group in self.groups:
            out.append(torch.cat(tensors[start : start + len(group)]))
            start += len(group)
        return out

    def reverse(self, tensors, dims):
        parts: list[torch.Tensor] = []
        for tensor, group in zip(tensors, self.groups, strict=True):
            parts.extend(torch.split(tensor, _proportional_rows(tensor.shape[0], group, dims)))
        return parts


@dataclass(frozen=True)
class InterleaveRows(Op):
    """Merge the first two parts block by block: ``[a_0; b_0; a_1; b_1; ...]``.

    Hugging Face's gated ``q_proj`` holds per head ``[q_h; gate_h]`` (block = head_dim).
    """

    block: Size

    def forward(self, tensors, dims):
        first, second, *rest = tensors
        block = _resolve(self.block, dims)
        shape = (first.shape[0] // block, 1, block, *first.shape[1:])
        merged = torch.cat([first.reshape(shape), second.reshape(shape)], dim=1)
        return [merged.reshape(-1, *first.shape[1:]), *rest]

    def reverse(self, tensors, dims):
        merged, *rest = tensors
        block = _resolve(self.block, dims)
        pairs = merged.reshape(merged.shape[0] // (2 * block), 2, block, *merged.shape[1:])
        first, second = (pairs[:, i].reshape(-1, *merged.shape[1:]) for i in range(2))
        return [first, second, *rest]


@dataclass(frozen=True)
class TransposeLast(Op):
    """Swap the last two dims of every tensor: ``[out, in]`` -> ``[in, out]``.

    Qwen3-VL-MoE checkpoints store each expert of the fused ``gate_up_proj`` / ``down_proj``
    as ``[in, out]`` (``x @ W``); transformers transposes on load, to ``nn.Linear``'s ``[out, in]``.
    """

    after_merge: ClassVar[bool] = True

    def forward(self, tensors, dims):
        return [tensor.transpose(-2, -1).contiguous() for tensor in tensors]

    def reverse(self, tensors, dims):
        return self.forward(tensors, dims)


@dataclass(frozen=True)
class AddOne(Op):
    """Megatron's zero-centred norm weight ``w`` is ``w + 1`` as a plain norm weight."""

    changes_values: ClassVar[bool] = True

    def forward(self, tensors, dims):
        return [tensor + 1 for tensor in tensors]

    def reverse(self, tensors, dims):
        return [tensor - 1 for tensor in tensors]


@dataclass(frozen=True)
class TrimVocab(Op):
    """Drop the padding rows Megatron adds beyond the vocabulary size."""

    changes_values: ClassVar[bool] = True

    def forward(self, tensors, dims):
        vocab = dims["vocab_size"]
        return [tensor[:vocab] for tensor in tensors]

    def reverse(self, tensors, dims):
        return list(tensors)  # the caller pads to the Megatron model's own vocabulary size
