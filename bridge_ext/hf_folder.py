"""Write Hugging Face folders: sharded safetensors with an index.

:class:`ShardedSafetensorsWriter` takes tensors one at a time; given the layout of what will
come (names, dtypes, shapes in order) it writes each tensor into its file at once and holds
none, otherwise it holds at most one shard in memory. Folders are staged and installed by
:mod:`bridge_ext.output_folder`.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bridge_ext.errors import ExportError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = f"{SINGLE_FILE}.index.json"


# Larger than any one disk: a shard size beyond it is a typo (1e100B), not a plan.
MAX_SHARD_BYTES = 1 << 50


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MiB"`` / ``1024`` -> bytes; ValueError unless 1 byte to 1 PiB."""
    if isinstance(size, int):
        number = size
    else:
        text = size.strip().upper().replace(" ", "")
        units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "PIB": 1 << 50,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15, "B": 1}
        unit = next((unit for unit in units if text.endswith(unit)), "")
        value = float(text[: len(text) - len(unit)])  # ValueError on garbage
        if not math.isfinite(value):
            raise ValueError(f"{size!r} is not a finite size")
        number = value * units.get(unit, 1)
    if not 1 <= number <= MAX_SHARD_BYTES:
        raise ValueError(f"{size!r} is not between 1 byte and 1 PiB")
    return int(number)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a writer will be given: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tensor.dtype, tuple(tensor.shape))


# The safetensors format's dtype names (safetensors/src/tensor.rs).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.complex64: "C64",
}


class SafetensorsFile:
    """One safetensors file written in place: the header first, then each tensor at its offset.

    The format (huggingface/safetensors): an 8-byte little-endian header length, the JSON
    header (``__metadata__`` and, per tensor, ``dtype``, ``shape`` and ``data_offsets``
    relative to the data start) padded with spaces to a multiple of 8, then the data with no
    gap. Tensors are placed largest element size first, as ``safetensors.torch.save_file``
    does, so that every tensor starts aligned to its element size; within a size, in the
    given order. Tensors may then be written in any order.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
        placed = sorted(specs, key=lambda spec: -spec.dtype.itemsize)  # stable: given order within a size
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for spec in placed:
            if spec.dtype not in SAFETENSORS_DTYPES:
                raise ExportError(f"{spec.name}: safetensors cannot store {spec.dtype}")
            header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        text += b" " * (-len(text) % 8)
        data_start = 8 + len(text)
        self.path = path
        self.size = data_start + offset
        self._places = {spec.name: (spec, data_start + header[spec.name]["data_offsets"][0]) for spec in placed}
        self._unwritten = set(self._places)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._closer = weakref.finalize(self, os.close, self._fd)  # also when a failed export drops it
        _write_at(self._fd, memoryview(len(text).to_bytes(8, "little") + text), 0)

    @property
    def complete(self) -> bool:
        return not self._unwritten

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (contiguous, on the CPU, of the planned dtype and shape) at its place."""
        spec, offset = self._places[name]
        if name not in self._unwritten:
            raise ExportError(f"{name} was written twice")
        write_tensor_at(self._fd, offset, spec, name, tensor)
        self._unwritten.discard(name)

    def places(self) -> dict[str, tuple[int, int, TensorSpec]]:
        """name -> (this file's descriptor, offset, spec): for a writer in a forked process."""
        return {name: (self._fd, offset, spec) for name, (spec, offset) in self._places.items()}

    def written_elsewhere(self, name: str) -> None:
        """Record that ``name`` was written at its place by another process (see :meth:`places`)."""
        if name not in self._unwritten:
            raise ExportError(f"{name} was written twice" if name in self._places else f"{name} is not in {self.path}")
        self._unwritten.discard(name)

    def close(self) -> None:
        self._closer()
        if self._unwritten:
            raise ExportError(f"{self.path}: {sorted(self._unwritten)} were planned but never written")


def write_tensor_at(fd: int, offset: int, spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
    """``pwrite`` ``tensor`` (contiguous, on the CPU, of ``spec``'s dtype and shape) at ``offset`` of ``fd``.

    The bytes go from the tensor's memory to the file in one large write (no copy in between).
    """
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ExportError(f"{name}: planned as {spec.dtype} {spec.shape}, produced as "
                          f"{tensor.dtype} {tuple(tensor.shape)}")
    if spec.nbytes:
        _write_at(fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), offset)
        if hasattr(os, "posix_fadvise"):  # start writing these pages to disk now, not all at the end
            os.posix_fadvise(fd, offset, spec.nbytes, os.POSIX_FADV_DONTNEED)


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` (one call writes at most about 2 GiB)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class ShardedSafetensorsWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` files plus their index.

    With ``layout`` (every tensor :meth:`add` will be given, in order) the shards are planned up
    front and each tensor is written to its file as soon as it is added: memory holds no tensor,
    whatever ``max_shard_bytes``. Without it, a shard is collected in memory and written when full.
    Either way a new shard starts when the next tensor would make the current one exceed
    ``max_shard_bytes`` (a larger tensor gets a shard of its own).
    """

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None,
                 layout: Sequence[TensorSpec] | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._planned: dict[str, int] | None = None  # name -> shard number, when the layout is known
        self._open: dict[int, SafetensorsFile] = {}
        self._layout: list[list[TensorSpec]] = []
        self._added: set[str] = set()
        self.total_bytes = 0
        self.tensor_count = 0
        if layout is not None:
            self._plan(layout)

    def _plan(self, layout: Sequence[TensorSpec]) -> None:
        shard_bytes = 0
        for spec in layout:
            if self._layout and self._layout[-1] and shard_bytes + spec.nbytes <= self.max_shard_bytes:
                self._layout[-1].append(spec)
                shard_bytes += spec.nbytes
            else:
                self._layout.append([spec])
                shard_bytes = spec.nbytes
        self._planned = {}
        for number, specs in enumerate(self._layout):
            for spec in specs:
                if spec.name in self._planned:
                    raise ExportError(f"{spec.name} is planned twice")
                self._planned[spec.name] = number
            self._shards.append((self._shard_name(number), [spec.name for spec in specs]))

    @staticmethod
    def _shard_name(number: int) -> str:
        return f"shard-{number:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._added:
            raise ExportError(f"{name} was written twice")
        self._added.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        tensor = tensor.detach().to("cpu").contiguous()
        self.total_bytes += nbytes
        self.tensor_count += 1
        if self._planned is None:
            if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self._pending[name] = tensor
            self._pending_bytes += nbytes
            return
        if name not in self._planned:
            raise ExportError(f"{name} is not in the planned layout")
        number = self._planned[name]
        file = self._open.get(number)
        if file is None:
            file = self._open[number] = SafetensorsFile(
                self.directory / self._shard_name(number), self._layout[number], self.metadata)
        file.write(name, tensor)
        if file.complete:
            file.close()
            del self._open[number]

    def open_all(self) -> dict[str, tuple[int, int, TensorSpec]]:
        """Create every planned shard now, headers written; name -> (descriptor, offset, spec).

        For writers in forked processes (:mod:`bridge_ext.checkpoint.parallel_write`), which
        inherit the descriptors; each tensor they write is then recorded with :meth:`written_elsewhere`.
        """
        if self._planned is None:
            raise ExportError("open_all needs the planned layout")
        places = {}
        for number, specs in enumerate(self._layout):
            if number not in self._open and any(spec.name not in self._added for spec in specs):
                self._open[number] = SafetensorsFile(self.directory / self._shard_name(number), specs, self.metadata)
            if number in self._open:
                places.update(self._open[number].places())
        return places

    def written_elsewhere(self, name: str, nbytes: int) -> None:
        """Record ``name`` (``nbytes``) as written by another process at its place from :meth:`open_all`."""
        if name in self._added or self._planned is None or name not in self._planned:
            raise ExportError(f"{name} was written twice" if name in self._added else
                              f"{name} is not in the planned layout")
        self._added.add(name)
        self.total_bytes += nbytes
        self.tensor_count += 1
        number = self._planned[name]
        file = self._open[number]
        file.written_elsewhere(name)
        if file.complete:
            file.close()
            del self._open[number]

    def _flush(self) -> None:
        file_name = self._shard_name(len(self._shards))
        file = SafetensorsFile(self.directory / file_name,
                               [TensorSpec.of(name, tensor) for name, tensor in self._pending.items()], self.metadata)
        for name, tensor in self._pending.items():
            file.write(name, tensor)
        file.close()
        self._shards.append((file_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index if several."""
        if self._planned is None and (self._pending or not self._shards):
            self._flush()
        if self._planned is not None:
            missing = [name for name in self._planned if name not in self._added]
            if missing:
                raise ExportError(f"{len(missing)} planned tensor(s) were never written: {missing[:5]}")
            if not self._shards:  # nothing planned: one empty file, as without a layout
                self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for number, (temporary, tensor_names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / temporary, self.directory / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, allow_nan=False) + "\n")
        return names
