"""Read a DCP ``.metadata`` file without trusting it: a restricted unpickler with an allowlist.

torch's ``FileSystemReader.read_metadata`` (torch/distributed/checkpoint/filesystem.py) reads
``.metadata`` with a bare ``pickle.load``, which runs whatever a crafted file asks for. The
metadata Megatron-Core 0.19 / torch 2.x write references only these globals (verified by
recording ``find_class`` calls on real saves, TP=1 and TP=2, with and without LoRA):

* ``torch.distributed.checkpoint.metadata``: ``Metadata``, ``TensorStorageMetadata``,
  ``BytesStorageMetadata``, ``ChunkStorageMetadata``, ``TensorProperties``, ``MetadataIndex``,
  ``StorageMeta``, ``_MEM_FORMAT_ENCODING``;
* ``torch.distributed.checkpoint.filesystem``: ``_StorageInfo``;
* ``torch.distributed.checkpoint.planner``: ``SavePlan``, ``WriteItem``, ``WriteItemType``,
  ``TensorWriteData`` (Megatron stores the per-rank save plans in ``Metadata.all_local_plans``);
* ``torch``: ``Size`` and dtypes (``torch.float32``...); ``torch.serialization._get_layout``.

:data:`ALLOWED_GLOBALS` adds a few neighbours a different torch version or planner may use
(``BytesIOWriteData``, ``_StoragePrefix``, the load-plan classes, the pre-2.1 location of
``TensorProperties``, ``collections.OrderedDict``, and the ``pathlib`` path classes: plain
torch DCP saves store ``StorageMeta.checkpoint_id`` as a ``PosixPath``). Every one of them is a plain data class,
an ``Enum`` or a pure lookup: calling or building it runs no code of the file's choosing.
Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
:class:`UnsafePickleError` before it is resolved; persistent ids are refused too.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from bridge_ext.checkpoint.errors import CheckpointError, UnsafePickleError

_DCP = "torch.distributed.checkpoint"

_DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16",
    "complex32", "chalf", "complex64", "cfloat", "complex128", "cdouble",
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "short", "int32", "int",
    "int64", "long", "bool",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)  # fmt: skip

# torch's own FileSystemWriter stores StorageMeta.checkpoint_id as a Path (Megatron's: a str)
_PATH_CLASSES = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (f"{_DCP}.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        (f"{_DCP}.planner", name)
        for name in (
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "BytesIOWriteData",
            "LoadPlan",
            "ReadItem",
            "LoadItemType",
        )
    }
    | {(f"{_DCP}.filesystem", "_StorageInfo"), (f"{_DCP}.filesystem", "_StoragePrefix")}
    | {
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
        ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    }
    | {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    | {(module, name) for module in ("pathlib", "pathlib._local") for name in _PATH_CLASSES}
    | {("torch", name) for name in _DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)}
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global {module}.{name}: not one of the "
                "torch checkpoint classes a DCP .metadata file may reference (file not trusted)",
                self._source,
            )
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: {module}.{name} is allowed but does not exist in this torch version",
                self._source,
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in .metadata", self._source)


def safe_unpickle(data: bytes, source: str | Path = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only :data:`ALLOWED_GLOBALS`; other globals raise before use."""
    source = Path(source)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or malformed pickle
        raise CheckpointError(f"{source}: cannot unpickle: {type(exc).__name__}: {exc}", source) from exc


def load_dcp_metadata(path: str | Path) -> Any:
    """Read a DCP ``.metadata`` file through the allowlist; returns its ``Metadata`` object."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    metadata = safe_unpickle(path.read_bytes(), path)
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: expected a torch Metadata object, found {type(metadata).__name__}", path)
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: metadata lacks state_dict_metadata or storage_data", path)
    return metadata
