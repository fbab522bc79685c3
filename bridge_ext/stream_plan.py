"""What an export stream will read and produce, known before its first tensor is read.

:func:`planned_layout` runs the same conversion code as :func:`bridge_ext.export.stream` on
meta tensors (shapes and dtypes, no data), so a writer can lay out every shard's header before
the first tensor arrives. :func:`planned_reads` lists the source tensors the stream will read,
in the order it reads them, so a reader can fetch them ahead.
"""

from __future__ import annotations

import torch

from bridge_ext.engine import MetaSource, Mode, Task, TaskConverter
from bridge_ext.plan import ExportPlan, conversion_passes
from bridge_ext.hf_folder import TensorSpec


class _TypedMetaSource(MetaSource):
    """The engine's meta source, with the source's dtypes (shard headers need them)."""

    def shards(self, name: str) -> list[torch.Tensor]:
        dtype = self.source.dtype(name)
        return [tensor.to(dtype) for tensor in super().shards(name)]


class _LayoutConverter(TaskConverter):
    def _check_copies_equal(self, task: Task) -> None:
        """Values are compared when the real tensors stream; meta tensors have none."""


def planned_layout(source, plan: ExportPlan, mode: Mode, dtype: torch.dtype | None = None) -> list[TensorSpec] | None:
    """The base tensors ``stream(source, plan, base=mode, dtype=dtype)`` yields, in order.

    None when ``source`` cannot tell its dtypes without reading (e.g. a Hugging Face base folder).
    """
    if not hasattr(source, "dtype"):
        return None
    converter = _LayoutConverter(_TypedMetaSource(source), plan.dims, mode, dtype)
    with torch.device("meta"):  # outputs the converter allocates (stacked experts) stay meta too
        return [TensorSpec.of(name, tensor) for task in plan.base_tasks for name, tensor in converter(task)]


def planned_reads(source, plan: ExportPlan, base: Mode | None, adapters: bool) -> list[str]:
    """Source tensor names ``stream(source, plan, base=base, adapters=adapters)`` reads, in order (repeats kept)."""
    passes = conversion_passes(source, plan, base=base, adapters=adapters)
    return [name for converter, tasks in passes for task in tasks for name in converter.reads(task)]
