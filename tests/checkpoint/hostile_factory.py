"""Crafted checkpoints that are small on disk but once cost time or memory far beyond their size.

Each takes a copy of a real tiny checkpoint (an iteration folder) and changes it in place:

* :func:`add_staggered_tensor`: one added tensor of ``(rows, columns)`` tiled by two chunks per
  column, split at a row that moves from one column to the next (an exact tiling whose intervals
  partly overlap on every axis: a pairwise check is quadratic in the chunks);
* :func:`repeat_chunk`: one tensor whose chunk list repeats a single chunk object ``times`` times
  through the pickle memo (a few bytes a reference);
* :func:`view_of_large_storage`: one tensor's record replaced by a torch.save of a view of a much
  larger storage, written sparse (the storage's bytes are a hole, only the viewed bytes are set).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch

LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def _metadata(folder: Path):
    return pickle.loads((folder / ".metadata").read_bytes())  # our own test file


def add_staggered_tensor(folder: Path, rows: int = 8, columns: int = 2000, *, overlap: bool = False) -> str:
    """Add ``staggered.weight`` (no storage entries: only its coverage is checked); returns its key."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    chunks = []
    for column in range(columns):
        split = 1 + column % (rows - 1)
        top = split + 1 if overlap and column == columns - 1 else split  # the last column's chunks share a row
        chunks.append(ChunkStorageMetadata(torch.Size([0, column]), torch.Size([top, 1])))
        chunks.append(ChunkStorageMetadata(torch.Size([split, column]), torch.Size([rows - split, 1])))
    metadata = _metadata(folder)
    key = "staggered.weight"
    metadata.state_dict_metadata[key] = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([rows, columns]), chunks)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return key


def repeat_chunk(folder: Path, key: str, times: int) -> int:
    """``key``'s chunk list becomes its first chunk ``times`` times (one object); returns the file's size."""
    metadata = _metadata(folder)
    entry = metadata.state_dict_metadata[key]
    entry.chunks = [entry.chunks[0]] * times
    data = pickle.dumps(metadata)
    (folder / ".metadata").write_bytes(data)
    return len(data)


def view_of_large_storage(folder: Path, key: str, storage_bytes: int) -> torch.Tensor:
    """Store ``key`` (a one-chunk tensor) as a view into a ``storage_bytes`` storage; returns its values.

    The record is appended to the chunk's ``.distcp`` file as a sparse hole plus the few bytes
    the view shows (torch.save under ``skip_data`` leaves the storage's space unwritten).
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = _metadata(folder)
    entry = metadata.state_dict_metadata[key]
    (chunk,) = entry.chunks
    shape, dtype = tuple(chunk.sizes), entry.properties.dtype
    storage = torch.empty(storage_bytes // dtype.itemsize, dtype=dtype)  # never touched: no memory used
    first = storage.numel() // 2
    view = storage[first:first + torch.Size(shape).numel()].view(shape)
    info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
    data_file = folder / info.relative_path
    record_start = data_file.stat().st_size
    with open(data_file, "r+b") as handle, torch.serialization.skip_data():  # not "ab": it seeks over the hole
        handle.seek(record_start)
        torch.save(view, handle)
    del storage, view
    length = data_file.stat().st_size - record_start
    with open(data_file, "rb") as handle:  # the record's directory, at its end (zip64: under 200 bytes)
        handle.seek(record_start)
        archive = zipfile.ZipFile(io.BufferedReader(_RecordFile(handle, length)))
        member = next(item for item in archive.infolist() if item.filename.endswith("/data/0"))
    values = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).to(dtype).view(shape)
    with open(data_file, "r+b") as handle:  # the viewed bytes, inside the hole
        handle.seek(record_start + member.header_offset)
        header = LOCAL_HEADER.unpack(handle.read(LOCAL_HEADER.size))
        handle.seek(record_start + member.header_offset + LOCAL_HEADER.size + header[-2] + header[-1]
                    + first * dtype.itemsize)
        handle.write(values.view(torch.uint8).numpy().tobytes())
    info.offset, info.length = record_start, length
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return values


class _RecordFile(io.RawIOBase):
    """The record at ``handle``'s position as a seekable file, for zipfile (reads only what it asks for)."""

    def __init__(self, handle, length: int) -> None:
        super().__init__()
        self._handle, self._start, self._length, self._position = handle, handle.tell(), length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        self._position = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence] + position
        return self._position

    def readinto(self, buffer) -> int:
        self._handle.seek(self._start + self._position)
        data = self._handle.read(min(len(buffer), self._length - self._position))
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)
