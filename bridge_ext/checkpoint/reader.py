"""Stream global tensors out of a Megatron ``torch_dist`` checkpoint, one at a time, no model needed.

How torch DCP stores data (torch/distributed/checkpoint/filesystem.py, ``_write_item``; Megatron's
``FileSystemWriterAsync`` calls the same function with ``SerializationFormat.TORCH_SAVE``):

* ``Metadata.state_dict_metadata[key]`` is a ``TensorStorageMetadata`` (global ``size``,
  ``properties.dtype`` and ``chunks``: each chunk's global ``offsets`` and ``sizes``) or a
  ``BytesStorageMetadata`` (a byte object).
* ``Metadata.storage_data[MetadataIndex(key, offset)]`` is a ``_StorageInfo(relative_path, offset,
  length, transform_descriptors)``: the byte range of that chunk inside ``__{rank}_{i}.distcp``
  (byte objects: ``MetadataIndex(key)`` with ``offset=None``).
* A tensor chunk's byte range is a complete ``torch.save`` zip archive of exactly that chunk
  (shape = chunk sizes, contiguous, own storage), so it loads with
  ``torch.load(weights_only=True)`` from a seekable view of the range. A byte object's range is
  the raw ``io.BytesIO`` Megatron wrote: ``torch.save([obj, ...])``.

:class:`CheckpointReader` reads ``.metadata`` through :mod:`bridge_ext.checkpoint.safe_pickle`, then
reads only the chunks a request overlaps, one chunk in memory at a time, copying each into the
output tensor: reading ``index=i`` of a stacked ``(L, ...)`` tensor touches only layer ``i``'s
chunks. Byte objects load with ``weights_only=True`` only (DCP's own planner would use
``weights_only=False``). Note: ``import megatron.core`` widens torch's process-wide weights_only
allowlist (megatron/core/safe_globals.py: BytesIO, PosixPath, SimpleNamespace, argparse.Namespace,
numpy arrays, OptimizerConfig, RerunState, ...); all are plain data classes.

Tensor records are not read through ``torch.load`` but taken apart by
:mod:`bridge_ext.checkpoint.record`: large reads straight into the tensor's memory and the CRC-32
of every byte checked (torch's own loader checks none), so a flipped bit is an error naming the
tensor and the file. :meth:`CheckpointReader.read_ahead` reads planned tensors in a background
thread while the caller converts earlier ones.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import reprlib
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from bridge_ext.checkpoint.coverage import coverage_problem
from bridge_ext.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingKeyError,
    MissingRunConfigError,
    UnsafeObjectError,
    UnsupportedFormatError,
)
from bridge_ext.checkpoint.layout import (
    COMMON_STATE_KEY,
    LEGACY_COMMON_FILE,
    CheckpointLocation,
    is_adapter_key,
    locate_checkpoint,
)
from bridge_ext.checkpoint.read_ahead import ReadAhead
from bridge_ext.checkpoint.record import RecordFile, check_archive_crcs, read_tensor_record
from bridge_ext.checkpoint.run_config import RunConfig, load_run_config
from bridge_ext.checkpoint.safe_pickle import load_dcp_metadata
from bridge_ext.errors import is_out_of_memory

Index = int | tuple[int, ...] | slice | None
# Bytes read ahead of the conversion: a few tensors, so that the disk never waits for the converter.
READ_AHEAD_BYTES = 192 << 20


@dataclass(frozen=True)
class StoredRange:
    """Where one chunk or byte object lies: ``file`` (name in the folder), ``offset``, ``length``."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class ChunkInfo:
    """One stored piece of a global tensor: its global ``offsets`` and ``sizes``, and its bytes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    stored: StoredRange | None


@dataclass(frozen=True)
class TensorInfo:
    """A global tensor of the checkpoint."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[ChunkInfo, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class CheckpointReader:
    """Read-only access to one torch_dist iteration folder (a root resolves through ``latest``).

    ``tensors``: key -> :class:`TensorInfo`; ``objects``: byte-object keys. Nothing but
    ``.metadata`` is read when constructing it.
    """

    def __init__(self, path: str | Path, *, iteration: int | None = None) -> None:
        self.location: CheckpointLocation = locate_checkpoint(path, iteration)
        self.path: Path = self.location.path
        metadata = load_dcp_metadata(self.location.metadata_file)
        try:
            self._stored = self._storage_ranges(metadata)
            self.tensors: Mapping[str, TensorInfo] = self._tensor_infos(metadata)
            self.objects: tuple[str, ...] = tuple(
                key for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)
            )
        except CheckpointError:
            raise
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointError(
                f"{self.location.metadata_file}: malformed DCP metadata: {type(exc).__name__}: {exc}",
                self.location.metadata_file,
            ) from exc
        self._check_data_files()
        self._check_records_disjoint()
        self._run_config: RunConfig | None | bool = False  # False: not loaded yet
        self._read_ahead: ReadAhead | None = None
        self._chunks_by_layer: dict[str, dict[int, list[ChunkInfo]]] = {}

    def _storage_ranges(self, metadata: Any) -> dict[tuple[str, tuple[int, ...] | None], StoredRange]:
        stored: dict[tuple[str, tuple[int, ...] | None], StoredRange] = {}
        for index, info in metadata.storage_data.items():
            if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
                raise TypeError(f"storage entry {_shown(index)} is not keyed by a tensor name")
            if not isinstance(info, _StorageInfo):
                raise TypeError(f"{index.fqn}: storage entry is a {type(info).__name__}, not a _StorageInfo")
            if getattr(info, "transform_descriptors", None):
                raise UnsupportedFormatError(
                    f"{self.location.metadata_file}: {index.fqn} is stored through stream transforms "
                    f"{_shown(info.transform_descriptors)} (e.g. compression), which this reader does not support",
                    self.location.metadata_file,
                )
            offset = None if index.offset is None else _ints(index.offset, f"{index.fqn} storage offset")
            if not isinstance(info.relative_path, str):
                raise TypeError(f"{index.fqn}: the data file name is a {type(info.relative_path).__name__}")
            start, length = _ints((info.offset, info.length), f"{index.fqn} byte range")
            if start < 0 or length < 0:
                raise ValueError(f"{index.fqn}: negative byte range {start}..{start + length}")
            stored[(index.fqn, offset)] = StoredRange(info.relative_path, start, length)
        return stored

    def _tensor_infos(self, metadata: Any) -> dict[str, TensorInfo]:
        """Every global tensor, after proving its chunks cover it exactly once (:mod:`.coverage`)."""
        tensors: dict[str, TensorInfo] = {}
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(key, str):
                raise TypeError(f"a state dict key is a {type(key).__name__} ({_shown(key)}), not a name")
            if isinstance(entry, BytesStorageMetadata):
                continue
            if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.properties.dtype, torch.dtype):
                raise TypeError(f"{key}: unexpected entry {type(entry).__name__}")
            shape = _ints(entry.size, f"{key} size")
            if any(n < 0 for n in shape):
                raise ValueError(f"{key}: negative size {shape}")
            chunks = []
            for chunk in entry.chunks:
                offsets, sizes = _ints(chunk.offsets, f"{key} chunk offsets"), _ints(chunk.sizes, f"{key} chunk sizes")
                if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)
                ):
                    raise ValueError(f"{key}: chunk at {offsets} of size {sizes} lies outside {shape}")
                chunks.append(ChunkInfo(offsets, sizes, self._stored.get((key, offsets))))
            info = TensorInfo(key, shape, entry.properties.dtype, tuple(chunks))
            self._check_chunks(info)
            tensors[key] = info
        return tensors

    def _check_chunks(self, info: TensorInfo) -> None:
        """Each element stored exactly once, and each chunk's record big enough for its elements."""
        problem = coverage_problem(info.shape, [(chunk.offsets, chunk.sizes) for chunk in info.chunks])
        if problem is not None:
            files = sorted({chunk.stored.file for chunk in info.chunks if chunk.stored is not None})
            raise CorruptCheckpointError(
                f"{self.location.metadata_file}: {info.key} {info.shape} (data in {', '.join(files) or 'no file'}): "
                f"{problem}; the metadata is damaged or was not written by torch DCP",
                self.location.metadata_file,
            )
        for chunk in info.chunks:
            needed = math.prod(chunk.sizes) * info.dtype.itemsize
            if chunk.stored is not None and chunk.stored.length < needed:
                raise CorruptCheckpointError(
                    f"{self.location.metadata_file}: {info.key} chunk at offset {chunk.offsets} of size "
                    f"{chunk.sizes} needs {needed} bytes, but its record in {chunk.stored.file} has "
                    f"{chunk.stored.length}",
                    self.location.metadata_file,
                )

    def _check_records_disjoint(self) -> None:
        """No two stored entries share bytes: DCP writes each record once, one after the other.

        A damaged offset pointing at another chunk's record of the same shape would otherwise
        read that chunk's values in silence.
        """
        by_file: dict[str, list[tuple[int, int, str]]] = {}
        for (key, offsets), stored in self._stored.items():
            if stored.length:
                what = key if offsets is None else f"{key} chunk at offset {offsets}"
                by_file.setdefault(stored.file, []).append((stored.offset, stored.offset + stored.length, what))
        for name, ranges in by_file.items():
            ranges.sort()
            for (start, end, what), (next_start, _, next_what) in zip(ranges, ranges[1:]):
                if next_start < end:
                    raise CorruptCheckpointError(
                        f"{self.location.metadata_file}: {what} (bytes {start}..{end} of {name}) and {next_what} "
                        f"(from byte {next_start}) share bytes; the metadata is damaged",
                        self.location.metadata_file,
                    )

    def _check_data_files(self) -> None:
        """A name the metadata gives as a data file must not be a folder, a device or a pipe."""
        for name in sorted({stored.file for stored in self._stored.values()}):
            if "\0" in name:  # no file can have this name: stat() would raise ValueError
                raise CorruptCheckpointError(f"{self.location.metadata_file}: the data file name {name!r} holds a "
                                             "NUL byte, which no file name can", self.location.metadata_file)
            file = self.path / name
            if name != os.path.basename(name) or name in ("", ".", ".."):
                continue  # refused, naming the tensor, when read (_data_file)
            try:
                mode = file.stat().st_mode
            except OSError:
                continue  # missing: named with the tensor that needs it when read
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise CorruptCheckpointError(f"{file}: {kind}, but the metadata stores tensor data in it", file)

    # ------------------------------------------------------------------ listing
    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """key -> (global shape, dtype) for every global tensor."""
        return {key: (info.shape, info.dtype) for key, info in self.tensors.items()}

    def tensor_info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise MissingKeyError(f"{self.path}: no global tensor {key!r} in the checkpoint", self.path) from None

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        """Global tensors of LoRA/DoRA adapters (``*.adapter.*``)."""
        return tuple(key for key in self.tensors if is_adapter_key(key))

    @property
    def base_keys(self) -> tuple[str, ...]:
        """Global tensors that are not adapter weights."""
        return tuple(key for key in self.tensors if not is_adapter_key(key))

    # ------------------------------------------------------------------ tensors
    def read_tensor(self, key: str, index: Index = None) -> torch.Tensor:
        """Read a global tensor, or ``tensor[index]`` for leading-axis ``index``, reading only needed chunks.

        ``index``: None (whole tensor); an int (one layer of ``(L, ...)``, axis removed); a tuple of
        ints (``(layer, expert)`` of ``(L, E, ...)``, axes removed); a ``slice`` of the first axis
        (step 1). Memory: the result plus one chunk; a request that is exactly one stored chunk
        (one layer of a stacked tensor, a TP=1 tensor) is read straight into the result.
        """
        if self._read_ahead is not None:
            tensor = self._read_ahead.take((key, index))
            if tensor is not None:
                return tensor
        return self._read_now(key, index)

    def _read_now(self, key: str, index: Index) -> torch.Tensor:
        info = self.tensor_info(key)
        starts, stops, drop = _box(info, index)
        wanted = math.prod(b - a for a, b in zip(starts, stops))
        pieces = []
        for chunk in self._chunks_near(info, starts, stops):
            lo = [max(a, o) for a, o in zip(starts, chunk.offsets)]
            hi = [min(b, o + s) for b, o, s in zip(stops, chunk.offsets, chunk.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            pieces.append((chunk, lo, hi))
        pieces.sort(key=lambda p: (p[0].stored.file, p[0].stored.offset) if p[0].stored else ("", 0))
        handles: dict[str, RecordFile] = {}
        try:
            if len(pieces) == 1 and pieces[0][0].offsets == tuple(starts) and pieces[0][0].sizes == tuple(
                b - a for a, b in zip(starts, stops)
            ):
                out = self._load_chunk(info, pieces[0][0], handles)  # the chunk is the request
                covered = out.numel()
            else:
                out = torch.empty([b - a for a, b in zip(starts, stops)], dtype=info.dtype)
                covered = 0
                for chunk, lo, hi in pieces:
                    target = out
                    for dim, (low, high) in enumerate(zip(lo, hi)):
                        target = target.narrow(dim, low - starts[dim], high - low)
                    whole = all(lo[d] == o and hi[d] == o + n for d, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes)))
                    if whole and target.is_contiguous():  # e.g. the gate or the up half of a fc1 layer
                        self._load_chunk(info, chunk, handles, into=target)
                    else:
                        source = self._load_chunk(info, chunk, handles)
                        for dim, (low, high) in enumerate(zip(lo, hi)):
                            source = source.narrow(dim, low - chunk.offsets[dim], high - low)
                        target.copy_(source)
                        del source
                    covered += target.numel()
        finally:
            for handle in handles.values():
                handle.close()
        if covered != wanted:
            raise CorruptCheckpointError(
                f"{self.location.metadata_file}: the stored chunks of {key} cover {covered} of the "
                f"{wanted} requested elements",
                self.location.metadata_file,
            )
        for dim in sorted(drop, reverse=True):
            out = out.select(dim, 0)
        return out

    def _chunks_near(self, info: TensorInfo, starts: list[int], stops: list[int]) -> tuple[ChunkInfo, ...]:
        """The chunks that can overlap the request: of one layer only, when it asks for one layer.

        Keeps reading a stacked tensor layer by layer linear in the number of layers.
        """
        if not info.shape or stops[0] - starts[0] != 1:
            return info.chunks
        by_layer = self._chunks_by_layer.get(info.key)
        if by_layer is None:
            by_layer = {}
            if all(chunk.sizes[0] == 1 for chunk in info.chunks):
                for chunk in info.chunks:
                    by_layer.setdefault(chunk.offsets[0], []).append(chunk)
            self._chunks_by_layer[info.key] = by_layer
        return tuple(by_layer.get(starts[0], ())) if by_layer else info.chunks

    @contextmanager
    def read_ahead(self, requests: Sequence[tuple[str, Index]],
                   max_bytes: int = READ_AHEAD_BYTES) -> Iterator[ReadAhead]:
        """Within the block, :meth:`read_tensor` of ``requests`` (``(key, index)``, in this order) was read ahead.

        A background thread reads them at most ``max_bytes`` ahead of the caller. A request
        out of this order is read directly and ends the read-ahead.
        """
        if self._read_ahead is not None:
            raise RuntimeError("read_ahead is already active on this reader")

        def nbytes(request: tuple[str, Index]) -> int:
            key, index = request
            info = self.tensor_info(key)
            starts, stops, _ = _box(info, index)
            return math.prod(b - a for a, b in zip(starts, stops)) * info.dtype.itemsize

        ahead = ReadAhead(lambda request: self._read_now(*request), requests, nbytes, max_bytes)
        self._read_ahead = ahead
        try:
            yield ahead
        finally:
            self._read_ahead = None
            ahead.close()

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, global tensor)`` one at a time (all tensors by default, in metadata order)."""
        for key in self.tensors if keys is None else keys:
            yield key, self.read_tensor(key)

    def iter_slices(self, key: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(i, tensor[i])`` along the first axis (layer by layer for stacked keys)."""
        info = self.tensor_info(key)
        if not info.shape:
            raise ValueError(f"{key} is a scalar: nothing to iterate over")
        for i in range(info.shape[0]):
            yield i, self.read_tensor(key, i)

    def _load_chunk(self, info: TensorInfo, chunk: ChunkInfo, handles: dict[str, RecordFile],
                    into: torch.Tensor | None = None) -> torch.Tensor:
        """One stored chunk as a tensor (or read into ``into``, contiguous and of the chunk's shape)."""
        if chunk.stored is None:
            raise CorruptCheckpointError(
                f"{self.location.metadata_file}: no storage entry for {info.key} chunk at offset "
                f"{chunk.offsets}",
                self.location.metadata_file,
            )
        stored = chunk.stored
        file = self._data_file(stored, info.key)
        handle = handles.get(stored.file)
        if handle is None:
            handle = handles[stored.file] = RecordFile(file)  # closed by the caller
        what = f"{info.key} chunk at offset {chunk.offsets} (bytes {stored.offset}..{stored.offset + stored.length})"
        try:
            tensor = read_tensor_record(handle, stored.offset, stored.length, what, into)
        except CheckpointError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise  # the machine's limit, not damage to the file
            raise _load_error(file, what, exc) from exc
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != info.dtype:
            raise CorruptCheckpointError(
                f"{file}: {what} holds {tuple(tensor.shape)} {tensor.dtype}, metadata says "
                f"{chunk.sizes} {info.dtype}",
                file,
            )
        return tensor.contiguous()

    def _data_file(self, stored: StoredRange, key: str) -> Path:
        name = stored.file
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise CorruptCheckpointError(
                f"{self.location.metadata_file}: {key} points at {name!r}, outside the checkpoint folder",
                self.location.metadata_file,
            )
        file = self.path / name
        try:
            size = file.stat().st_size
        except OSError:
            raise CorruptCheckpointError(f"{file}: data file missing (needed for {key})", file) from None
        if stored.offset < 0 or stored.length < 0 or stored.offset + stored.length > size:
            raise CorruptCheckpointError(
                f"{file}: truncated: {key} needs bytes {stored.offset}..{stored.offset + stored.length} "
                f"but the file has {size} bytes",
                file,
            )
        return file

    # ------------------------------------------------------------------ byte objects
    def read_object(self, key: str) -> Any:
        """Load a byte object (``common_state/shard_0_1``, ``*._extra_state/shard_l_L``) with weights_only=True.

        Megatron stores ``torch.save([obj])``; the single element is returned (a longer list as is).
        """
        if key not in self.objects:
            raise MissingKeyError(f"{self.path}: no byte object {key!r} in the checkpoint", self.path)
        stored = self._stored.get((key, None))
        if stored is None:
            raise CorruptCheckpointError(
                f"{self.location.metadata_file}: no storage entry for byte object {key}", self.location.metadata_file
            )
        file = self._data_file(stored, key)
        with open(file, "rb") as handle:
            handle.seek(stored.offset)
            data = handle.read(stored.length)
        what = f"byte object {key} (bytes {stored.offset}..{stored.offset + stored.length})"
        check_archive_crcs(data, file, what)
        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _load_error(file, what, exc) from exc
        if isinstance(value, list) and len(value) == 1:
            return value[0]
        return value

    def common_state(self) -> dict[str, Any]:
        """The non-tensor state (``checkpoint_version``, ``iteration``, ``content_metadata``...)."""
        if COMMON_STATE_KEY in self.objects:
            return self.read_object(COMMON_STATE_KEY)
        legacy = self.path / LEGACY_COMMON_FILE
        if legacy.is_file():
            try:
                return torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise _load_error(legacy, "common state", exc) from exc
        return {}

    # ------------------------------------------------------------------ run config / PEFT
    @property
    def run_config(self) -> RunConfig | None:
        """``run_config.yaml`` of the iteration folder, or None when there is none."""
        if self._run_config is False:
            file = self.location.run_config_file
            # anything by that name (a folder, a pipe, a broken link) is read, and refused by name
            self._run_config = load_run_config(file) if os.path.lexists(file) else None
        return self._run_config  # type: ignore[return-value]

    def require_run_config(self) -> RunConfig:
        config = self.run_config
        if config is None:
            raise MissingRunConfigError(
                f"{self.location.run_config_file}: missing; it is needed for the model and PEFT settings",
                self.location.run_config_file,
            )
        return config

    @property
    def is_adapter_only(self) -> bool:
        """True for a PEFT checkpoint holding adapters only (``peft`` set, no base weights stored).

        Raises :class:`MissingRunConfigError` when only adapter weights are stored but
        ``run_config.yaml`` (LoRA settings, base model) is missing, and :class:`CheckpointError`
        when the config and the stored keys disagree.
        """
        adapters, base = bool(self.adapter_keys), bool(self.base_keys)
        config = self.run_config
        if config is None:
            if adapters and not base:
                raise MissingRunConfigError(
                    f"{self.location.run_config_file}: missing, but {self.path} holds only adapter "
                    "weights: the LoRA settings and base model are in run_config.yaml",
                    self.location.run_config_file,
                )
            return False
        if config.peft is None:
            if adapters and not base:
                raise CheckpointError(
                    f"{config.path}: peft is null, but {self.path} holds only adapter weights", config.path
                )
            return False
        if not adapters and not base:
            raise CheckpointError(f"{self.path}: no tensors stored", self.path)
        return not base


def _box(info: TensorInfo, index: Index) -> tuple[list[int], list[int], list[int]]:
    """The requested region as per-axis [start, stop) and the axes to drop afterwards."""
    starts = [0] * len(info.shape)
    stops = list(info.shape)
    if index is None:
        return starts, stops, []
    if isinstance(index, slice):
        if not info.shape:
            raise IndexError(f"{info.key}: cannot slice a scalar")
        start, stop, step = index.indices(info.shape[0])
        if step != 1:
            raise ValueError(f"{info.key}: only step-1 slices of the first axis are supported")
        starts[0], stops[0] = start, max(start, stop)
        return starts, stops, []
    indices = (index,) if isinstance(index, int) else tuple(index)
    if len(indices) > len(info.shape) or not all(isinstance(i, int) for i in indices):
        raise IndexError(f"{info.key}: index {index!r} does not fit shape {info.shape}")
    for dim, i in enumerate(indices):
        size = info.shape[dim]
        position = i + size if i < 0 else i
        if not 0 <= position < size:
            raise IndexError(f"{info.key}: index {i} out of range for axis {dim} of size {size}")
        starts[dim], stops[dim] = position, position + 1
    return starts, stops, list(range(len(indices)))


def _ints(values: Any, what: str) -> tuple[int, ...]:
    """A tuple of plain ints (a float or a string there means the metadata is damaged)."""
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"{what}: expected a sequence of integers, found a {type(values).__name__}")
    if not all(type(value) is int for value in values):
        raise TypeError(f"{what}: expected integers, found {_shown(values)}")
    return tuple(values)


def _shown(value: Any) -> str:
    """A short repr for messages (a hostile value may be huge)."""
    text = reprlib.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _load_error(file: Path, what: str, exc: Exception) -> CheckpointError:
    detail = _load_detail(exc)
    if isinstance(exc, pickle.UnpicklingError) and re.search(r"GLOBAL|global|Unsupported class", str(exc)):
        return UnsafeObjectError(
            f"{file}: {what} cannot be loaded with weights_only=True (it references objects outside "
            f"torch's safe allowlist; refusing to unpickle it): {detail}",
            file,
        )
    return CorruptCheckpointError(f"{file}: corrupted data for {what}: {type(exc).__name__}: {detail}", file)


def _load_detail(exc: Exception) -> str:
    """The informative line of a torch.load error (without its weights_only boilerplate)."""
    text = str(exc)
    match = re.search(r"(WeightsUnpickler error:[^\n]*\n*[^\n]*|Trying to load[^\n]*|Unsupported[^\n]*)", text)
    detail = " ".join(match.group(1).split()) if match else (text.strip().splitlines() or [type(exc).__name__])[0]
    return detail if len(detail) <= 300 else detail[:297] + "..."
