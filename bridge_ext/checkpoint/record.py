"""Read one tensor record of a ``.distcp`` file directly: its zip structure, its bytes, its CRC-32s.

A tensor chunk in a ``.distcp`` file is a complete ``torch.save`` zip archive (see
:mod:`bridge_ext.checkpoint.reader`). ``torch.load`` would read it through many small reads and
never checks the CRC-32 the zip format stores for every member. Here the record is taken apart
once:

* the central directory (at the record's end; Python's :mod:`zipfile`, zip64 included) gives
  each member's offset, size, compression and CRC-32;
* ``<archive>/data.pkl`` (a few hundred bytes) is unpickled with torch's own ``weights_only``
  unpickler, the one ``torch.load(weights_only=True)`` uses, onto a storage on the ``meta``
  device (no memory) of exactly the data member's size: it gives the tensor's dtype, shape,
  strides and storage offset, which must lie inside that storage;
* the bytes of ``<archive>/data/0`` (stored, not compressed) that the tensor views are read with
  large ``preadv`` calls straight into the result, and the CRC-32 computed piece by piece while
  each piece is still in cache (:mod:`bridge_ext.checkpoint.crc`). Both calls release the GIL, so
  a read-ahead thread runs beside the conversion. torch DCP saves each chunk with a storage of its
  own, so that is the whole member and its CRC-32 is checked; a tensor viewing part of a larger
  storage (a crafted record) is read in the bytes it views only (seeking over the rest), and then
  the member's CRC-32, which covers bytes not read, cannot be checked. Memory: the result, never
  the storage.

Every mismatch (a member missing, compressed or of the wrong size, a CRC-32 that differs, a
tensor that is not what the metadata says) raises :class:`CorruptCheckpointError` naming the
tensor and the file.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch._weights_only_unpickler as weights_only_unpickler  # what torch.load(weights_only=True) runs

from bridge_ext.checkpoint.crc import crc32
from bridge_ext.checkpoint.errors import CorruptCheckpointError

# Reading and checking a piece at a time keeps it in cache between the two (and bounds one call).
PIECE_BYTES = 4 << 20
LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name length, extra field length
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
MAX_PICKLE_BYTES = 1 << 20  # a tensor's data.pkl is a few hundred bytes


class RecordFile:
    """A ``.distcp`` file open for positional reads (``os.pread``: no shared file position)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise EOFError(f"{length} bytes wanted at {offset}, {len(data)} read")
        return data

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` from ``offset``; returns its CRC-32."""
        crc = 0
        done = 0
        while done < len(buffer):
            piece = buffer[done : done + PIECE_BYTES]
            count = os.preadv(self.fd, [piece], offset + done)
            if count <= 0:
                raise EOFError(f"{len(buffer)} bytes wanted at {offset}, {done} read")
            crc = crc32(piece[:count], crc)
            done += count
        return crc


def read_tensor_record(file: RecordFile, offset: int, length: int, what: str,
                       into: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor stored as a ``torch.save`` archive at ``offset`` (``length`` bytes) of ``file``.

    ``what`` names the record in errors (tensor and chunk). With ``into`` (a contiguous tensor)
    the record must hold a contiguous tensor of its dtype and shape, and its bytes are read
    straight into ``into``'s memory. Pickle errors propagate as they are (the caller tells an
    unsafe pickle from a corrupt one); everything else that is wrong with the record raises
    :class:`CorruptCheckpointError`.
    """
    members = _members(file, offset, length, what)
    pickles = [info for name, info in members.items() if name.endswith("/data.pkl")]
    storages = {name.rsplit("/data/", 1)[1]: info for name, info in members.items() if "/data/" in name}
    if len(pickles) != 1 or list(storages) != ["0"]:
        raise _corrupt(file, what, f"members {sorted(members)} are not one data.pkl and one data/0")
    pickle_info, data_info = pickles[0], storages["0"]
    for info in (pickle_info, data_info):
        if info.compress_type != zipfile.ZIP_STORED:
            raise _corrupt(file, what, f"{info.filename} is compressed; torch.save stores tensors uncompressed")
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise _corrupt(file, what, f"{pickle_info.filename} has {pickle_info.file_size} bytes")
    pickled = file.read(_data_offset(file, offset, length, pickle_info, what), pickle_info.file_size)
    if crc32(pickled) != pickle_info.CRC:
        raise _corrupt(file, what, f"CRC-32 mismatch in {pickle_info.filename}")
    nbytes = data_info.file_size
    layout = _unpickle(pickled, torch.UntypedStorage(nbytes, device="meta"), nbytes)
    if not isinstance(layout, torch.Tensor):
        raise _corrupt(file, what, f"it holds a {type(layout).__name__}, not a tensor")
    if into is not None and (layout.dtype, layout.shape) != (into.dtype, into.shape):
        raise _corrupt(file, what, f"it holds {tuple(layout.shape)} {layout.dtype}, metadata says "
                                   f"{tuple(into.shape)} {into.dtype}")
    itemsize = layout.dtype.itemsize
    first, last = _span(layout)
    if last * itemsize > nbytes:
        raise _corrupt(file, what, f"its tensor reaches byte {last * itemsize} of a {nbytes}-byte storage")
    out = into if into is not None else torch.empty(layout.shape, dtype=layout.dtype)
    if not layout.numel():
        return out
    start = _data_offset(file, offset, length, data_info, what)
    whole = first == 0 and last * itemsize == nbytes  # the storage is the tensor's, as torch DCP writes it
    if layout.is_contiguous():  # one run of bytes: straight into the result
        crc = file.read_into(start + first * itemsize, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
    elif (last - first) <= 2 * layout.numel():  # a dense view (e.g. transposed): its span, then a copy
        span = torch.empty(last - first, dtype=layout.dtype)
        crc = file.read_into(start + first * itemsize, memoryview(span.view(torch.uint8).numpy()))
        out.copy_(span.as_strided(layout.shape, layout.stride()))
        del span
    else:  # a sparse view of a larger storage: only the bytes it views, run by run
        whole = False
        crc = None
        _read_runs(file, start, layout, out)
    if whole and crc != data_info.CRC:
        raise _corrupt(file, what, f"CRC-32 mismatch in {data_info.filename}: its bytes changed after "
                                   "they were written (disk, copy or transfer error)")
    return out


def _span(layout: torch.Tensor) -> tuple[int, int]:
    """The elements of its storage a tensor touches: [first, last) (first == last when it is empty)."""
    first = layout.storage_offset()
    if not layout.numel():
        return first, first
    return first, first + 1 + sum((size - 1) * stride for size, stride in zip(layout.shape, layout.stride()))


def _read_runs(file: RecordFile, start: int, layout: torch.Tensor, out: torch.Tensor) -> None:
    """Read a strided view into ``out`` (contiguous) one contiguous run of its elements at a time."""
    shape, strides, itemsize = list(layout.shape), list(layout.stride()), layout.dtype.itemsize
    run, inner = 1, len(shape)
    while inner and (shape[inner - 1] == 1 or strides[inner - 1] == run):
        inner -= 1
        run *= shape[inner]
    flat = out.reshape(-1).view(torch.uint8).numpy()
    for number, index in enumerate(itertools.product(*map(range, shape[:inner]))):
        element = layout.storage_offset() + sum(i * stride for i, stride in zip(index, strides))
        done = number * run * itemsize
        file.read_into(start + element * itemsize, memoryview(flat[done:done + run * itemsize]))


def check_archive_crcs(data: bytes, path: Path, what: str) -> None:
    """Check the CRC-32 of every member of a small ``torch.save`` archive held in memory (a byte object)."""
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError):
        return  # not a readable zip: torch.load reports it with its own words
    if bad is not None:
        raise CorruptCheckpointError(f"{path}: corrupted data for {what}: CRC-32 mismatch in {bad}", path)


def _members(file: RecordFile, offset: int, length: int, what: str) -> dict[str, zipfile.ZipInfo]:
    view = io.BufferedReader(_RecordView(file, offset, length), buffer_size=64 << 10)
    try:
        with zipfile.ZipFile(view) as archive:
            return {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error) as error:
        raise _corrupt(file, what, f"not a readable torch.save archive ({error})") from None


def _data_offset(file: RecordFile, offset: int, length: int, info: zipfile.ZipInfo, what: str) -> int:
    """Where ``info``'s bytes start in the file (after its local header), checked to lie in the record."""
    if info.header_offset < 0 or info.header_offset + LOCAL_HEADER.size > length:
        raise _corrupt(file, what, f"{info.filename}'s local header lies outside the record")
    header = LOCAL_HEADER.unpack(file.read(offset + info.header_offset, LOCAL_HEADER.size))
    if header[0] != LOCAL_HEADER_SIGNATURE:
        raise _corrupt(file, what, f"{info.filename} has no local header where the directory says")
    start = info.header_offset + LOCAL_HEADER.size + header[-2] + header[-1]
    if start + info.file_size > length:
        raise _corrupt(file, what, f"{info.filename} runs past the end of the record")
    return offset + start


def _unpickle(pickled: bytes, storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """Run data.pkl with its one storage reference resolved to ``storage`` (``nbytes`` long)."""

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[2] != "0":
            raise ValueError(f"unexpected storage reference {saved_id!r}")
        _, storage_type, _, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if not isinstance(numel, int) or numel * dtype.itemsize != nbytes:
            raise ValueError(f"the pickle's storage of {numel} x {dtype} does not fill data/0 ({nbytes} bytes)")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    unpickler = weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    return unpickler.load()


def _corrupt(file: RecordFile, what: str, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{file.path}: corrupted data for {what}: {detail}", file.path)


class _RecordView(io.RawIOBase):
    """A seekable read-only view of one record, for :mod:`zipfile` (it reads the directory at the end)."""

    def __init__(self, file: RecordFile, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        data = os.pread(self._file.fd, count, self._start + self._pos)
        memoryview(buffer)[: len(data)] = data
        self._pos += len(data)
        return len(data)
