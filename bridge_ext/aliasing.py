"""Exported tensors that share no memory with the model, unless the caller asks for zero copy.

A pass-through rule (a norm weight, a LoRA factor, an expert's own matrix at tensor-parallel size
1) or a view (a split of a fused QKV) would otherwise hand the caller the model's own storage: a
receiver that scales or casts a tensor in place (vLLM's LoRA ``optimize()`` does
``lora_b *= alpha / r``) would change the trainer's weights. Only such tensors are copied; a
tensor the export made anew (gathered, stacked, merged, copied to the host) passes as it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch


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


def fresh_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def without_aliases(pairs: Iterable[tuple[str, torch.Tensor]], storages: frozenset[int],
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs`` with each tensor that lives in one of ``storages`` replaced by a copy."""
    for name, tensor in pairs:
        yield name, fresh_copy(tensor) if shares_storage(tensor, storages) else tensor
