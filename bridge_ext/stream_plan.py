"""What an export stream will read and produce, known before its first tensor is read.

:func:`planned_layout` runs the same conversion code as :func:`bridge_ext.export.stream` on
meta tensors (shapes and dtypes, no data), so a writer can lay out every shard's header before
the first tensor arrives. :func:`planned_reads` lists the source tensors the stream will read,
in the order it reads them, so a reader can fetch them ahead.
"""

from __future__ import annotations

import torch

from bridge_ext.engine import Mode, Task, TaskConverter
from bridge_ext.export import ExportPlan
from bridge_ext.hf_folder import TensorSpec
from bridge_ext.source import Adapter


class _MetaSource:
    """A source's tensors as meta tensors of their shapes and dtypes."""

    def __init__(self, source) -> None:
        self._source = source

    def adapters(self) -> dict[str, Adapter]:
        return self._source.adapters()

    def shards(self, name: str) -> list[torch.Tensor]:
        dtype = self._source.dtype(name)
        return [torch.empty(shape, dtype=dtype, device="meta") for shape in self._source.shard_shapes(name)]


class _LayoutConverter(TaskConverter):
    def _check_copies_equal(self, task: Task) -> None:
        """Values are compared when the real tensors stream; meta tensors have none."""


def planned_layout(source, plan: ExportPlan, mode: Mode, dtype: torch.dtype | None = None) -> list[TensorSpec] | None:
    """The base tensors ``stream(source, plan, base=mode, dtype=dtype)`` yields, in order.

    None when ``source`` cannot tell its dtypes without reading (e.g. a Hugging Face base folder).
    """
    if not hasattr(source, "dtype"):
        return None
    converter = _LayoutConverter(_MetaSource(source), plan.dims, mode, dtype)
    with torch.device("meta"):  # outputs the converter allocates (stacked experts) stay meta too
        return [TensorSpec.of(name, tensor) for task in plan.base_tasks for name, tensor in converter(task)]


def planned_reads(source, plan: ExportPlan, base: Mode | None, adapters: bool) -> list[str]:
    """Source tensor names ``stream(source, plan, base=base, adapters=adapters)`` reads, in order (repeats kept)."""
    names: list[str] = []
    if base is not None:
        converter = TaskConverter(source, plan.dims, base)
        names += [name for task in plan.base_tasks for name in converter.reads(task)]
    if adapters:
        converter = TaskConverter(source, plan.dims, Mode.ADAPTERS)
        names += [name for task in plan.adapter_tasks for name in converter.reads(task)]
    return names
