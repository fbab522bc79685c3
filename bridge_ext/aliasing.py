"""Exported tensors that share no memory with the model, unless the caller asks for zero copy.

A pass-through rule (a norm weight, a LoRA factor, an expert's own matrix at tensor-parallel size
1) or a view (a split of a fused QKV) would otherwise hand the caller the model's own storage: a
receiver that scales or casts a tensor in place (vLLM's LoRA ``optimize()`` does
``lora_b *= alpha / r``) would change the trainer's weights. Only such tensors are copied; a
tensor the export made anew (gathered, stacked, merged, copied to the host) passes as it is.

Consecutive contiguous tensors to copy (a layer's LoRA factors, its experts) are copied together:
one ``torch.cat`` into a fresh buffer of at most :data:`GROUP_BYTES`, each tensor a view of its
own part of it, so a GPU runs a few copy kernels per group instead of one per tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

#: Bytes copied in one batch: bounds how long the stream holds tensors back, and what one kept
#: tensor keeps alive.
GROUP_BYTES = 16 << 20


def model_storages(chunks: Iterable[torch.nn.Module]) -> frozenset[int]:
    """The storage addresses of every parameter and buffer of ``chunks`` (this process's part)."""
    found = set()
    for chunk in chunks:
        for tensor in itertools.chain(chunk.parameters(), chunk.buffers()):
            address = tensor.untyped_storage().data_ptr()
            if address:  # empty and meta tensors hold no memory
                found.add(address)
    return frozenset(found)


def shares_storage(tensor: torch.Tensor, storages: frozenset[int]) -> bool:
    return tensor.untyped_storage().data_ptr() in storages


def fresh_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` (contiguous, of one dtype and device when more than one), sharing
    one new buffer when there are several."""
    if len(tensors) == 1:
        return [tensors[0].clone()]
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    sizes = [tensor.numel() for tensor in tensors]
    return [part.view(tensor.shape) for part, tensor in zip(flat.split(sizes), tensors)]


def without_aliases(pairs: Iterable[tuple[str, torch.Tensor]], storages: frozenset[int],
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs`` in order, with each tensor that lives in one of ``storages`` replaced by a copy."""
    group: list[tuple[str, torch.Tensor]] = []
    key, size = None, 0
    for name, tensor in pairs:
        shared = shares_storage(tensor, storages)
        this = (tensor.dtype, tensor.device) if shared and tensor.is_contiguous() else None
        nbytes = tensor.numel() * tensor.element_size()
        if group and (this != key or size + nbytes > GROUP_BYTES):
            yield from zip((n for n, _ in group), fresh_copies([t for _, t in group]))
            group, size = [], 0
        if this is None:
            yield name, fresh_copies([tensor])[0] if shared else tensor
            continue
        group.append((name, tensor))
        key, size = this, size + nbytes
    if group:
        yield from zip((n for n, _ in group), fresh_copies([t for _, t in group]))
