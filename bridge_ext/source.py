"""Where Megatron tensors come from: a live model (any parallel layout) or a checkpoint.

The engine sees a :class:`TensorSource`: normalised Megatron names (no ``module.`` wrapper
prefixes, no LoRA ``to_wrap``, global layer and expert numbers), each tensor's
tensor-parallel shards on demand, and the LoRA adapters by module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from bridge_ext.engine import Task, TaskConverter


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter on one Megatron linear: ``W + alpha / rank * B @ A``.

    ``lora_a`` and ``lora_b`` are the Megatron names of its ``linear_in`` / ``linear_out``
    weights, read through the same source as the base weights.

    DoRA (``megatron.bridge.peft.dora``): ``magnitude`` names its ``weight_magnitude`` ``[out]``
    and the layer computes ``m / ||W + s B A||_row * (W x + s B A x)``; ``bias_inside``: the
    wrapped linear adds its bias inside that product (Megatron then scales the bias too);
    ``expert``: the module is a routed expert's.

    CanonicalLoRA (``megatron.bridge.peft.canonical_lora``): ``parts`` holds one adapter per
    part of the fused module (``("q", Adapter), ...``; see ``Rule.lora_parts``), and ``lora_a`` /
    ``lora_b`` are the first part's.
    """

    module: str
    lora_a: str
    lora_b: str
    alpha: float
    rank: int
    dropout: float = 0.0
    magnitude: str | None = None
    bias_inside: bool = False
    expert: bool = False
    parts: tuple[tuple[str, Adapter], ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def part(self, name: str) -> Adapter | None:
        """The CanonicalLoRA adapter of the part ``name`` (None: that part has none)."""
        return dict(self.parts).get(name)


class TensorSource(Protocol):
    """What the engine reads Megatron tensors through."""

    def base_names(self) -> list[str]:
        """Normalised names of all base tensors, in a stable order shared by every rank."""

    def adapters(self) -> dict[str, Adapter]:
        """LoRA adapters by the normalised name of the module they wrap."""

    def shards(self, name: str) -> list[torch.Tensor]:
        """The tensor-parallel shards of ``name`` in rank order (one: the whole tensor)."""

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        """The shapes of ``shards(name)``, known without reading (checks run on them first)."""

    def convert_tasks(self, converter: TaskConverter, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        """``converter`` over ``tasks``, in order; a source spanning processes schedules its
        transfers from ``converter.reads(task)``. One process: :func:`convert_in_order`."""


def convert_in_order(converter: TaskConverter, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
    """``convert_tasks`` of a source whose tensors are all at hand."""
    for task in tasks:
        yield from converter(task)

