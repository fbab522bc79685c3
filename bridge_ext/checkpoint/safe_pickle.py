"""Read a DCP ``.metadata`` file without trusting it: a restricted unpickler with an allowlist of
plain data classes, after an opcode walk that refuses deep or self-referring objects.

The allowlist's origin and the limits: docs/checkpoint_metadata.md.
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bridge_ext.checkpoint.control_files import DCP_METADATA_LIMIT, read_control_file
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


MAX_NESTING = 100  # objects inside objects; real DCP metadata: about 10

# Opcodes that push one new atom (no reference to anything else on the stack).
_ATOMS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE",
    "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT", "GLOBAL",
})  # fmt: skip
_EMPTY_CONTAINERS = frozenset({"EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE"})
_FROM_MARK = frozenset({"TUPLE", "LIST", "DICT", "FROZENSET", "OBJ", "INST"})
_ADD_FROM_MARK = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})
_ADD_ONE = {"APPEND": 1, "BUILD": 1, "SETITEM": 2}
_FIXED_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_BUILT_FROM = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "STACK_GLOBAL": 2}
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_OPS = _MEMO_GET | _MEMO_PUT
_NO_EFFECT = frozenset({"PROTO", "FRAME"})


# opcode byte -> (name, how its argument is laid out), from pickletools' own table.
_OPCODES = {op.code.encode("latin-1")[0]: (op.name, op.arg.n if op.arg else 0) for op in pickletools.opcodes}
_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                  pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}
_TWO_LINES = frozenset({"GLOBAL", "INST"})


def _opcodes(data: bytes) -> Iterator[tuple[str, int | None]]:
    """``(opcode name, memo index or None)`` for each opcode, arguments skipped (faster than genops)."""
    end, position = len(data), 0
    while position < end:
        code = data[position]
        position += 1
        if code not in _OPCODES:
            raise ValueError(f"unknown opcode {code:#04x} at byte {position - 1}")
        name, layout = _OPCODES[code]
        start = position
        if layout > 0:
            position += layout
        elif layout == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if name in _TWO_LINES else 1):
                newline = data.find(b"\n", position)
                if newline < 0:
                    raise ValueError(f"{name} at byte {start - 1}: no end of line")
                position = newline + 1
        elif layout:
            size, signed = _LENGTH_PREFIX[layout]
            length = int.from_bytes(data[position:position + size], "little", signed=signed)
            if length < 0:
                raise ValueError(f"{name} at byte {start - 1}: negative length")
            position += size + length
        if position > end:
            raise ValueError(f"{name} at byte {start - 1}: the pickle ends inside its argument")
        memo_index = None
        if name in _MEMO_OPS:
            argument = data[start:position]
            memo_index = int(argument) if layout == pickletools.UP_TO_NEWLINE else int.from_bytes(argument, "little")
        yield name, memo_index
        if name == "STOP":
            return
    raise ValueError("the pickle ends without STOP")


class _ShapeError(Exception):
    """The pickle's structure is refused (message says why)."""


def check_pickle_shape(data: bytes, max_nesting: int = MAX_NESTING) -> None:
    """Refuse, before anything is built, a pickle nesting deeper than ``max_nesting`` or cyclic.

    Simulates the unpickler's stack with one node per object and an edge per "holds": the
    nesting is the longest path from the result. Identity is tracked through the memo, so an
    object filled in after being placed in another (``APPEND`` / ``SETITEM`` / ``BUILD`` on a
    memoised one) still counts. Raises :class:`_ShapeError`; malformed opcodes raise ValueError.
    """
    children: list[list[int]] = [[]]  # node 0: every atom
    known_depth: list[int] = [0]  # a lower bound per node: refuses a plain deep chain at once
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}

    def new(held: list[int]) -> int:
        children.append([])
        known_depth.append(0)
        return hold(len(children) - 1, held)

    def hold(node: int, items: list[int]) -> int:
        children[node].extend(items)
        deepest = 1 + max((known_depth[item] for item in items), default=-1)
        if deepest > known_depth[node]:
            if deepest > max_nesting:
                raise _ShapeError(f"objects nested more than {max_nesting} deep (real metadata nests about 10)")
            known_depth[node] = deepest
        return node

    def pop(count: int) -> list[int]:
        if len(stack) - count < (marks[-1] if marks else 0):
            raise ValueError("stack underflow")
        taken = stack[len(stack) - count:]
        del stack[len(stack) - count:]
        return taken

    def pop_mark() -> list[int]:
        if not marks:
            raise ValueError("no mark on the stack")
        start = marks.pop()
        taken = stack[start:]
        del stack[start:]
        return taken

    def top() -> int:
        if len(stack) <= (marks[-1] if marks else 0):
            raise ValueError("stack underflow")
        return stack[-1]

    result = None
    for name, arg in _opcodes(data):
        if name in _ATOMS:
            stack.append(0)
        elif name in _EMPTY_CONTAINERS:
            stack.append(new([]))
        elif name == "MARK":
            marks.append(len(stack))
        elif name in _FROM_MARK:
            stack.append(new(pop_mark()))
        elif name in _FIXED_TUPLES:
            stack.append(new(pop(_FIXED_TUPLES[name])))
        elif name in _BUILT_FROM:
            stack.append(new(pop(_BUILT_FROM[name])))
        elif name in _ADD_FROM_MARK or name in _ADD_ONE:
            items = pop_mark() if name in _ADD_FROM_MARK else pop(_ADD_ONE[name])
            hold(top(), items)  # the container below them
        elif name in _MEMO_PUT:
            if arg > len(memo):  # picklers number entries in order; a huge index would size the memo
                raise _ShapeError(f"memo index {arg} out of order (the memo holds {len(memo)} entries)")
            memo[arg] = top()
        elif name == "MEMOIZE":
            memo[len(memo)] = top()
        elif name in _MEMO_GET:
            if arg not in memo:
                raise ValueError(f"memo entry {arg} used before it is set")
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(top())
        elif name == "POP":
            if marks and marks[-1] == len(stack):
                marks.pop()
            else:
                pop(1)
        elif name == "POP_MARK":
            pop_mark()
        elif name == "STOP":
            result = top()
            break
        elif name not in _NO_EFFECT:  # persistent ids, extension codes, out-of-band buffers
            raise _ShapeError(f"opcode {name} is not allowed in checkpoint metadata")
    if result is None:
        raise ValueError("no STOP opcode")
    depth = _longest_path(children, result)
    if depth > max_nesting:
        raise _ShapeError(f"objects nested {depth} deep (more than {max_nesting}; real metadata nests about 10)")


def _longest_path(children: list[list[int]], root: int) -> int:
    """Longest chain of "holds" below ``root`` (iterative: the graph may be a million deep)."""
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    pending: list[tuple[int, bool]] = [(root, False)]
    while pending:
        node, done = pending.pop()
        if done:
            on_path.discard(node)
            depth[node] = 1 + max((depth[child] for child in children[node]), default=-1)
            continue
        if node in depth:
            continue
        if node in on_path:
            raise _ShapeError("an object contains itself")
        on_path.add(node)
        pending.append((node, True))
        for child in children[node]:
            if child in on_path:
                raise _ShapeError("an object contains itself")
            if child not in depth:
                pending.append((child, False))
    return depth[root]


def safe_unpickle(data: bytes, source: str | Path = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only :data:`ALLOWED_GLOBALS`; other globals raise before use.

    The structure is checked first (:func:`check_pickle_shape`): nothing is built from a pickle
    nesting deeper than :data:`MAX_NESTING`.
    """
    source = Path(source)
    try:
        check_pickle_shape(data)
    except _ShapeError as exc:
        raise UnsafePickleError(f"{source}: refusing to unpickle: {exc} (file not trusted)", source) from None
    except Exception as exc:  # pickletools' own errors on truncated or malformed opcodes
        raise CheckpointError(f"{source}: cannot unpickle: malformed pickle: {_short(exc)}", source) from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or malformed pickle
        raise CheckpointError(f"{source}: cannot unpickle: {type(exc).__name__}: {_short(exc)}", source) from exc


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_dcp_metadata(path: str | Path) -> Any:
    """Read a DCP ``.metadata`` file through the allowlist; returns its ``Metadata`` object."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    metadata = safe_unpickle(read_control_file(path, DCP_METADATA_LIMIT), path)
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: expected a torch Metadata object, found {type(metadata).__name__}", path)
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: metadata lacks state_dict_metadata or storage_data", path)
    return metadata
