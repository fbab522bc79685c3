"""The named, reversible operations that mapping rules chain together.

Every operation maps a list of tensors to a list of tensors, Megatron -> Hugging Face in
:meth:`Op.forward`, back in :meth:`Op.reverse`. Row operations only rearrange rows (dim 0),
so the very same call converts a base weight and a LoRA ``lora_B`` (``[out, r]``); operations
that change values (``changes_values``) apply to base weights only.

:class:`Transpose` (the last operation of a rule) is the one that is not a row operation.
For ``W' = W^T`` the delta is ``(B A)^T = A^T B^T``, so the factors swap roles:
``lora_A' = B^T`` and ``lora_B' = A^T``; that is what an output that is a module weight gets.
A fused parameter targeted by PEFT's ``target_parameters`` (``ParamWrapper``, peft 0.21.2) on
a parameter stored ``[E, in, out]`` (transformers' ``is_transposed`` experts, e.g. gpt-oss
``gate_up_proj [E, H, 2I]``) keeps ``nn.Linear``'s ``(out, in)`` factors,
``lora_A [r*E, in]`` / ``lora_B [out, r*E]``, and transposes the product itself
(``einsum("o r e, e r i -> e i o")``): there the factors are the untransposed ones.

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
    """Base class: one step of a rule."""

    per_rank: ClassVar[bool] = False
    changes_values: ClassVar[bool] = False
    transposes: ClassVar[bool] = False

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
class SplitHeadGroups(Op):
    """Megatron's ``linear_qkv`` of a model whose layers differ in query groups: per group
    ``[q heads; k; v]``, q and k heads ``qk_dim`` rows, v heads ``v_dim``, the group count
    read off the rows (``heads * qk_dim + groups * (qk_dim + v_dim)``; MiMo-V2-Flash's sliding
    layers have twice the full layers' KV heads). A global operation: the group count holds for
    the whole tensor, not a shard (its rows depend on the tensor-parallel size).
    """

    heads: Size
    qk_dim: Size
    v_dim: Size

    def _split(self, rows: int, dims: ModelDims) -> SplitGroupedRows:
        heads, qk_dim, v_dim = (_resolve(size, dims) for size in (self.heads, self.qk_dim, self.v_dim))
        groups, rest = divmod(rows - heads * qk_dim, qk_dim + v_dim)
        if rest or groups <= 0 or heads % groups:
            raise ValueError(f"{rows} rows are not {heads} query heads of {qk_dim} and whole groups of "
                             f"one key head of {qk_dim} and one value head of {v_dim}")
        return SplitGroupedRows(heads // groups * qk_dim, qk_dim, v_dim)

    def forward(self, tensors, dims):
        (tensor,) = tensors
        return self._split(tensor.shape[0], dims).forward([tensor], dims)

    def reverse(self, tensors, dims):
        return self._split(sum(tensor.shape[0] for tensor in tensors), dims).reverse(tensors, dims)


@dataclass(frozen=True)
class SplitQKVHeadDims(Op):
    """Megatron's ``linear_qkv`` of a model whose layers differ in head width, not in head counts
    (Gemma 4: sliding layers of ``head_dim``, global ones of ``global_head_dim``): per group
    ``[q heads; k; v]``, every head ``width`` rows, the width read off the rows
    (``(heads + 2 * groups) * width``), which must be exactly one of ``widths``: any other row
    count is refused. A global operation (a shard's rows depend on the tensor-parallel size).
    """

    heads: Size
    groups: Size
    widths: tuple[Size, ...]

    def __init__(self, heads: Size, groups: Size, *widths: Size):
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "widths", widths)

    def _split(self, rows: int, dims: ModelDims) -> SplitGroupedRows:
        heads, groups = _resolve(self.heads, dims), _resolve(self.groups, dims)
        widths = sorted({_resolve(width, dims) for width in self.widths})
        fits = [width for width in widths if rows == (heads + 2 * groups) * width]
        if not fits or heads % groups:
            raise ValueError(f"{rows} rows are not {heads} query heads and {groups} key and value heads "
                             f"of one of the widths {widths}")
        (width,) = fits
        return SplitGroupedRows(heads // groups * width, width, width)

    def forward(self, tensors, dims):
        (tensor,) = tensors
        return self._split(tensor.shape[0], dims).forward([tensor], dims)

    def reverse(self, tensors, dims):
        return self._split(sum(tensor.shape[0] for tensor in tensors), dims).reverse(tensors, dims)


@dataclass(frozen=True)
class KeepParts(Op):
    """Only the parts at ``indices`` become Hugging Face tensors: the others have no counterpart
    there (Gemma 4's KV-shared layers read earlier layers' keys and values; Megatron keeps k / v
    rows and a key norm there that its forward does not use, transformers has no k_proj / v_proj /
    k_norm). ``KeepParts()`` keeps nothing. A table uses it only on the layers its config names
    (decided before export); the reverse direction cannot restore the dropped parts and refuses."""

    indices: tuple[int, ...]

    def __init__(self, *indices: int):
        object.__setattr__(self, "indices", indices)

    def forward(self, tensors, dims):
        if any(index >= len(tensors) for index in self.indices):
            raise ValueError(f"KeepParts{self.indices} got {len(tensors)} parts")
        return [tensors[index] for index in self.indices]

    def reverse(self, tensors, dims):
        raise ValueError("the Hugging Face checkpoint has no tensors for the parts this rule drops: "
                         "they cannot be restored")


@dataclass(frozen=True)
class GroupRows(Op):
    """Interleave consecutive parts group by group: the inverse of :class:`SplitGroupedRows`.

    ``GroupRows("a", "b", first=1)`` replaces parts 1 and 2 (each ``G`` groups of ``a`` resp.
    ``b`` rows) with one tensor ``[a_0; b_0; a_1; b_1; ...]``; other parts pass through.
    Qwen3-Next's ``in_proj_qkvz`` holds per key head ``[q; k; v; z]``; ``GroupRows(h, h)``
    alternates blocks of ``h`` rows of two parts (gated ``q_proj``: ``[q_h; gate_h]`` per head).
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
class Copies(Op):
    """Fan-out: the same tensor under ``count`` Hugging Face names (DeepSeek-V3 style MTP
    layers hold copies of the embedding and the output layer). The reverse direction takes
    one copy after checking that all are equal."""

    count: int

    def forward(self, tensors, dims):
        (tensor,) = tensors
        return [tensor] * self.count

    def reverse(self, tensors, dims):
        first, *others = tensors
        # meta tensors (shape checks before any data moves): only shapes can be compared
        differ = [index + 1 for index, other in enumerate(others)
                  if other.shape != first.shape or not (first.is_meta or other.is_meta or torch.equal(first, other))]
        if len(tensors) != self.count or differ:
            raise ValueError(f"the {self.count} copies must be equal; copies {differ} differ from copy 0"
                             if differ else f"expected {self.count} copies, got {len(tensors)}")
        return [first]


@dataclass(frozen=True)
class Transpose(Op):
    """``W' = W^T`` (the last two dims): a layout stored ``[in, out]``, e.g. gpt-oss experts.

    Must be a rule's last operation; LoRA factors follow the rule in the module docstring.
    """

    transposes: ClassVar[bool] = True

    def forward(self, tensors, dims):
        return [tensor.transpose(-2, -1).contiguous() for tensor in tensors]

    def reverse(self, tensors, dims):
        return [tensor.transpose(-2, -1).contiguous() for tensor in tensors]


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


@dataclass(frozen=True)
class Scalar(Op):
    """A one-element Megatron parameter (shape ``[1]``) as a scalar, so that a rule stacking
    several of them gives one ``[n]`` Hugging Face tensor (DeepSeek-V4's hyper-connection
    ``hc_*_scale``: Megatron's ``alpha_pre``, ``alpha_post``, ``alpha_res``). A reshape is no row
    operation: marked as changing values, so the engine converts each stacked member on its own
    and never applies it to LoRA factors (these parameters take none)."""

    changes_values: ClassVar[bool] = True

    def forward(self, tensors, dims):
        if any(tensor.shape != (1,) for tensor in tensors):
            raise ValueError("expected one-element tensors of shape (1,)")
        return [tensor.reshape(()) for tensor in tensors]

    def reverse(self, tensors, dims):
        if any(tensor.dim() != 0 for tensor in tensors):
            raise ValueError("expected scalars")
        return [tensor.reshape(1) for tensor in tensors]


@dataclass(frozen=True)
class Unsqueeze(Op):
    """A size-one dim inserted at ``dim`` (Megatron ``[E]`` -> Hugging Face ``[1, E]``: ERNIE-4.5's
    ``moe_statics.e_score_correction_bias``, one expert group); the reverse removes it and refuses
    a tensor whose ``dim`` is not of size one. A reshape is no row operation: marked as changing
    values, like :class:`Scalar` (such tensors take no LoRA)."""

    dim: int = 0
    changes_values: ClassVar[bool] = True

    def forward(self, tensors, dims):
        return [tensor.unsqueeze(self.dim) for tensor in tensors]

    def reverse(self, tensors, dims):
        if any(tensor.dim() <= self.dim or tensor.shape[self.dim] != 1 for tensor in tensors):
            raise ValueError(f"expected a size-one dim {self.dim}, got shapes {[tuple(t.shape) for t in tensors]}")
        return [tensor.squeeze(self.dim) for tensor in tensors]
