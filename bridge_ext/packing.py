"""Several tensors as one contiguous byte message, and views of them back out of it.

Moving many small tensors one by one costs a launch (or a message) each; packed, they move
with one. Each tensor starts at a multiple of :data:`ALIGN` bytes, so that its view back out
of the message is aligned for any dtype.
"""

from __future__ import annotations

import functools
import math

import torch

ALIGN = 16

Spec = tuple[tuple[int, ...], torch.dtype]


def padded_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a tensor takes in a message (its own, rounded up to :data:`ALIGN`)."""
    return _padded(math.prod(shape) * dtype.itemsize)


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One ``uint8`` tensor holding the bytes of ``tensors`` one after another (one
    concatenation on the tensors' device)."""
    parts, padding_source = [], None
    for tensor in tensors:
        data = tensor.contiguous().view(-1).view(torch.uint8)
        parts.append(data)
        padding = _padded(data.numel()) - data.numel()
        if padding:
            if padding_source is None:
                padding_source = data.new_zeros(ALIGN)
            parts.append(padding_source[:padding])
    return torch.cat(parts)


def unpack(message: torch.Tensor, specs: list[Spec]) -> list[torch.Tensor]:
    """Views of a message, in the order :func:`pack` packed tensors of these shapes and dtypes
    (one strided view each: thousands of small tensors come out of one message)."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    views, offset = [], 0
    for shape, dtype in specs:
        whole = typed.get(dtype)
        if whole is None:
            whole = typed[dtype] = message.view(dtype)
        views.append(whole.as_strided(shape, _contiguous_strides(shape), offset // dtype.itemsize))
        offset += padded_bytes(shape, dtype)
    return views


@functools.lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
