"""Read a DCP ``.metadata`` file without trusting it: a restricted unpickler with an allowlist of
plain data classes, after an opcode walk that refuses deep, self-referring or memo-repeated objects.

The allowlist's origin and the limits: docs/checkpoint_metadata.md.
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

import torch

from bridge_ext.checkpoint.control_files import DCP_METADATA_LIMIT, read_control_file
from bridge_ext.checkpoint.entry_limits import check_entry_counts
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
# Objects a pickle may describe per byte of it, each memo reference counted with everything the
# referenced object holds (what a reader walking the result visits). Real DCP metadata describes
# about 0.5 per byte; a list repeating one chunk through the memo describes 4 to 10 per byte.
MAX_OBJECTS_PER_BYTE = 2
MIN_OBJECTS_ALLOWED = 1 << 16  # tiny pickles (a test's, a corrupted file's) are never refused for it

# What each opcode does to the unpickler's stack, as one small action code (plus a count).
_ATOM, _EMPTY, _MARK, _FROM_MARK, _BUILD_N, _ADD_FROM_MARK, _ADD_N = range(7)
_PUT, _MEMOIZE, _GET, _DUP, _POP, _POP_MARK, _STOP, _NO_EFFECT, _REFUSED = range(7, 16)
_ACTIONS: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
                     "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE",
                     "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
                     "GLOBAL"), (_ATOM, 0)),
    **dict.fromkeys(("EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE"), (_EMPTY, 0)),
    "MARK": (_MARK, 0),
    **dict.fromkeys(("TUPLE", "LIST", "DICT", "FROZENSET", "OBJ", "INST"), (_FROM_MARK, 0)),
    "TUPLE1": (_BUILD_N, 1), "TUPLE2": (_BUILD_N, 2), "TUPLE3": (_BUILD_N, 3),
    "REDUCE": (_BUILD_N, 2), "NEWOBJ": (_BUILD_N, 2), "NEWOBJ_EX": (_BUILD_N, 3), "STACK_GLOBAL": (_BUILD_N, 2),
    **dict.fromkeys(("APPENDS", "SETITEMS", "ADDITEMS"), (_ADD_FROM_MARK, 0)),
    "APPEND": (_ADD_N, 1), "BUILD": (_ADD_N, 1), "SETITEM": (_ADD_N, 2),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), (_PUT, 0)), "MEMOIZE": (_MEMOIZE, 0),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), (_GET, 0)),
    "DUP": (_DUP, 0), "POP": (_POP, 0), "POP_MARK": (_POP_MARK, 0), "STOP": (_STOP, 0),
    "PROTO": (_NO_EFFECT, 0), "FRAME": (_NO_EFFECT, 0),
}  # fmt: skip
# Anything else (persistent ids, extension codes, out-of-band buffers) is refused.
_LINE, _TWO_LINES = -1, -100  # arguments ending at a newline (GLOBAL and INST: two of them)
_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                  pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}


def _opcode_table() -> list[tuple[str, int, int, int, bool, int] | None]:
    """opcode byte -> (name, action, count, argument size or _LINE / _TWO_LINES / -prefix, signed, prefix size)."""
    table: list[tuple[str, int, int, int, bool, int] | None] = [None] * 256
    for op in pickletools.opcodes:
        action, count = _ACTIONS.get(op.name, (_REFUSED, 0))
        layout = op.arg.n if op.arg else 0
        signed, prefix = False, 0
        if layout == pickletools.UP_TO_NEWLINE:
            layout = _TWO_LINES if op.name in ("GLOBAL", "INST") else _LINE
        elif layout < 0:
            prefix, signed = _LENGTH_PREFIX[layout]
            layout = -2
        table[op.code.encode("latin-1")[0]] = (op.name, action, count, layout, signed, prefix)
    return table


_OPCODES = _opcode_table()


class _ShapeError(Exception):
    """The pickle's structure is refused (message says why)."""


def check_pickle_shape(data: bytes, max_nesting: int = MAX_NESTING, max_objects: int | None = None) -> int:
    """Refuse, before anything is built, a pickle nesting deeper than ``max_nesting``, cyclic, or
    describing more than ``max_objects`` objects (default: :data:`MAX_OBJECTS_PER_BYTE` per byte).

    Simulates the unpickler's stack with one node per object (atoms share node 0) and tracks how
    deep each is and how many objects it stands for (itself plus what it holds, a memo reference
    counting the whole referenced object again): a container's depth is one more than its
    deepest item's when it is filled, its count the sum of its items'. That is exact unless an
    object is filled after another already holds it (``APPEND`` / ``SETITEM`` / ``BUILD`` on a
    memoised one, which picklers do not write); then a second pass records every "holds" edge
    and measures the longest path and the counts on that graph, refusing cycles. Returns the
    count. Raises :class:`_ShapeError`; malformed opcodes raise ValueError.
    """
    if max_objects is None:
        max_objects = max(MIN_OBJECTS_ALLOWED, MAX_OBJECTS_PER_BYTE * len(data))
    found = _scan(data, max_nesting, max_objects, exact=False)
    if found is None:  # filled late: the first pass's depths may be stale
        found = _scan(data, max_nesting, max_objects, exact=True)
    depth, objects = found
    if depth > max_nesting:
        raise _ShapeError(f"objects nested {depth} deep (more than {max_nesting}; real metadata nests about 10)")
    if objects > max_objects:
        raise _ShapeError(_too_many(max_objects, len(data)))
    return objects


def _too_many(max_objects: int, nbytes: int) -> str:
    return (f"its {nbytes} bytes describe more than {max_objects} objects through memo references "
            f"(at most {MAX_OBJECTS_PER_BYTE} per byte; real metadata describes about 0.5)")


def _pop_mark(marks: list[int], opcode: str, byte: int) -> tuple[int, int]:
    """The stack height at the innermost mark (removed), and the floor the mark below it sets."""
    if not marks:
        raise ValueError(f"{opcode} at byte {byte}: no mark on the stack")
    split = marks.pop()
    return split, (marks[-1] if marks else 0)


def _scan(data: bytes, max_nesting: int, max_objects: int,  # noqa: C901 - one loop, one branch per action
          exact: bool) -> tuple[int, int] | None:
    """The result's nesting and object count; None when ``exact`` is False and an object was filled late."""
    table, end, position = _OPCODES, len(data), 0
    depth: list[int] = [0]  # node -> depth when last filled (node 0: every atom)
    objects: list[int] = [1]  # node -> objects it stands for, capped just above max_objects
    held: list[bool] = [False]  # node -> already inside another object
    children: list[list[int]] = [[]]  # node -> held nodes (exact pass only)
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    floor = 0  # the stack below the last mark is out of reach

    def fill(node: int, items: list[int]) -> bool:
        """Put ``items`` into ``node``; False when that makes earlier depths stale."""
        late = held[node] or node in items
        deepest = 0
        count = objects[node]
        for item in items:
            held[item] = True
            count += objects[item]
            if depth[item] > deepest:
                deepest = depth[item]
        if count > max_objects and not exact:  # the first pass's counts never exceed the true ones
            raise _ShapeError(_too_many(max_objects, end))
        objects[node] = min(count, max_objects + 1)
        if deepest >= depth[node]:
            if deepest + 1 > max_nesting:
                raise _ShapeError(f"objects nested more than {max_nesting} deep (real metadata nests about 10)")
            depth[node] = deepest + 1
        if exact:
            children[node].extend(items)
        return not late

    while True:
        if position >= end:
            raise ValueError("the pickle ends without STOP")
        entry = table[data[position]]
        if entry is None:
            raise ValueError(f"unknown opcode {data[position]:#04x} at byte {position}")
        name, action, count, layout, signed, prefix = entry
        start = position = position + 1
        if layout > 0:
            position += layout
        elif layout == -2:
            length = int.from_bytes(data[position:position + prefix], "little", signed=signed)
            if length < 0:
                raise ValueError(f"{name} at byte {start - 1}: negative length")
            position += prefix + length
        elif layout:
            for _ in range(2 if layout == _TWO_LINES else 1):
                newline = data.find(b"\n", position)
                if newline < 0:
                    raise ValueError(f"{name} at byte {start - 1}: no end of line")
                position = newline + 1
        if position > end:
            raise ValueError(f"{name} at byte {start - 1}: the pickle ends inside its argument")

        if action == _ATOM:
            stack.append(0)
        elif action == _MEMOIZE or action == _PUT:
            if len(stack) <= floor:
                raise ValueError(f"{name} at byte {start - 1}: nothing to memoise")
            index = len(memo)
            if action == _PUT:
                argument = data[start:position]
                index = int(argument) if layout == _LINE else int.from_bytes(argument, "little")
                if index > len(memo):  # picklers number entries in order; a huge index would size the memo
                    raise _ShapeError(f"memo index {index} out of order (the memo holds {len(memo)} entries)")
            memo[index] = stack[-1]
        elif action == _GET:
            argument = data[start:position]
            index = int(argument) if layout == _LINE else int.from_bytes(argument, "little")
            if index not in memo:
                raise ValueError(f"memo entry {index} used before it is set")
            stack.append(memo[index])
        elif action == _EMPTY or action == _BUILD_N or action == _FROM_MARK:
            if action == _FROM_MARK:
                split, floor = _pop_mark(marks, name, start - 1)
            else:
                split = len(stack) - count
                if split < floor:
                    raise ValueError(f"{name} at byte {start - 1}: stack underflow")
            items = stack[split:]
            del stack[split:]
            depth.append(0)
            objects.append(1)
            held.append(False)
            if exact:
                children.append([])
            node = len(depth) - 1
            if items:
                fill(node, items)
            stack.append(node)
        elif action == _MARK:
            marks.append(len(stack))
            floor = len(stack)
        elif action == _ADD_N or action == _ADD_FROM_MARK:
            if action == _ADD_FROM_MARK:
                split, floor = _pop_mark(marks, name, start - 1)
            else:
                split = len(stack) - count
            if split - 1 < floor:
                raise ValueError(f"{name} at byte {start - 1}: stack underflow")
            items = stack[split:]
            del stack[split:]
            if not fill(stack[-1], items) and not exact:
                return None
        elif action == _DUP:
            if len(stack) <= floor:
                raise ValueError("DUP on an empty stack")
            stack.append(stack[-1])
        elif action == _POP:
            if marks and marks[-1] == len(stack):
                marks.pop()
                floor = marks[-1] if marks else 0
            elif len(stack) > floor:
                stack.pop()
            else:
                raise ValueError("POP on an empty stack")
        elif action == _POP_MARK:
            if not marks:
                raise ValueError("POP_MARK without a mark")
            del stack[marks.pop():]
            floor = marks[-1] if marks else 0
        elif action == _STOP:
            if len(stack) <= floor:
                raise ValueError("STOP on an empty stack")
            result = stack[-1]
            return _measure(children, result, max_objects) if exact else (depth[result], objects[result])
        elif action == _REFUSED:
            raise _ShapeError(f"opcode {name} is not allowed in checkpoint metadata")


def _measure(children: list[list[int]], root: int, max_objects: int) -> tuple[int, int]:
    """Longest chain of "holds" below ``root`` and the objects it stands for (capped just above
    ``max_objects``); iterative: the graph may be a million deep."""
    depth: dict[int, int] = {}
    objects: dict[int, int] = {}
    on_path: set[int] = set()
    pending: list[tuple[int, bool]] = [(root, False)]
    while pending:
        node, done = pending.pop()
        if done:
            on_path.discard(node)
            depth[node] = 1 + max((depth[child] for child in children[node]), default=-1)
            objects[node] = min(max_objects + 1, 1 + sum(objects[child] for child in children[node]))
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
    return depth[root], objects[root]


def safe_unpickle(data: bytes, source: str | Path = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only :data:`ALLOWED_GLOBALS`; other globals raise before use.

    The structure is checked first (:func:`check_pickle_shape`): nothing is built from a pickle
    nesting deeper than :data:`MAX_NESTING` or describing more than :data:`MAX_OBJECTS_PER_BYTE`
    objects per byte through its memo.
    """
    source = Path(source)
    try:
        check_pickle_shape(data)
    except _ShapeError as exc:
        raise UnsafePickleError(f"{source}: refusing to unpickle: {exc} (file not trusted)", source) from None
    except MemoryError:
        raise  # the machine's limit, not the file's fault: reported as such (exit 7)
    except Exception as exc:  # pickletools' own errors on truncated or malformed opcodes
        raise CheckpointError(f"{source}: cannot unpickle: malformed pickle: {_short(exc)}", source) from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except (CheckpointError, MemoryError):
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
    check_entry_counts(metadata, path)
    return metadata
