"""Meta runs: a conversion on meta tensors of the source's shard shapes checks every shape and
split, and records exactly what the real run will read, without reading anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from bridge_ext.engine.tasks import Task
from bridge_ext.source import Adapter, TensorSource

if TYPE_CHECKING:
    from bridge_ext.engine.converter import TaskConverter

__all__ = ["MetaSource", "pack_nothing"]


class MetaSource:
    """A source's tensors as meta tensors of their shard shapes (nothing is read), recording
    every name read, in order."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.read: list[str] = []

    def base_names(self) -> list[str]:
        return self.source.base_names()

    def adapters(self) -> dict[str, Adapter]:
        return self.source.adapters()

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        return self.source.shard_shapes(name)

    def shards(self, name: str) -> list[torch.Tensor]:
        self.read.append(name)
        return [torch.empty(shape, device="meta") for shape in self.source.shard_shapes(name)]

    def convert_tasks(self, converter: TaskConverter, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        for task in tasks:
            yield from converter(task)


def pack_nothing(hf_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """An expert-adapter layout that writes no key: a meta run without a layout still reads
    every expert, as the real run does before it refuses."""
    return iter(())
