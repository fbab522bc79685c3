"""Bounds on the entries of a DCP ``.metadata``, checked by counting before any entry is read.

Far above the largest real checkpoints (the estimate is in docs/checkpoint_metadata.md: a
1T-parameter MoE saved at TP8 / EP64 with its optimizer state has about 10^5 chunks in its
largest tensor and about 10^6 entries in all), so that a crafted file cannot make the reader
build or check millions of entries it claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bridge_ext.checkpoint.errors import CheckpointLimitError

MAX_CHUNKS_PER_TENSOR = 1 << 21  # 2,097,152
MAX_ENTRIES = 1 << 24  # 16,777,216: tensors, byte objects, their chunks and storage entries together


def check_entry_counts(metadata: Any, path: Path) -> None:
    """Refuse ``metadata`` (a torch ``Metadata``) holding more entries than the bounds allow."""
    entries = metadata.state_dict_metadata
    total = len(entries) + len(metadata.storage_data)
    for key, entry in entries.items():
        chunks = getattr(entry, "chunks", None)
        count = len(chunks) if isinstance(chunks, (list, tuple)) else 0
        if count > MAX_CHUNKS_PER_TENSOR:
            name = key if isinstance(key, str) and len(key) <= 200 else f"a tensor ({type(key).__name__} key)"
            raise CheckpointLimitError(
                f"{path}: {name} lists {count} chunks, more than the {MAX_CHUNKS_PER_TENSOR} a tensor may have "
                "(real checkpoints have at most about 10^5; the metadata is damaged or crafted)", path)
        total += count
    if total > MAX_ENTRIES:
        raise CheckpointLimitError(
            f"{path}: {total} entries (tensors, chunks and storage entries), more than the {MAX_ENTRIES} a "
            "checkpoint may have (real checkpoints have at most about 10^6; the metadata is damaged or crafted)", path)
