"""Read the small files that describe a checkpoint or a model folder, with a size cap.

``.metadata``, the tracker, ``metadata.json``, ``run_config.yaml``, ``config.json`` and the
safetensors index are read whole. A hostile or damaged one (an 8 GiB sparse file, a device, a
folder in its place) must fail at once with a message naming it, not exhaust memory first.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge_ext.checkpoint.errors import CheckpointError
from bridge_ext.errors import first_line

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# Generous caps: the largest real files measured are far below them (a DCP .metadata of a
# 70B-parameter model is a few MiB; a safetensors index of 100k tensors about 10 MiB).
TRACKER_LIMIT = 4 * KIB
SMALL_JSON_LIMIT = 1 * MIB  # metadata.json, config.json
JSON_LIMIT = 64 * MIB  # model.safetensors.index.json
RUN_CONFIG_LIMIT = 16 * MIB
DCP_METADATA_LIMIT = 1 * GIB

ErrorFactory = Callable[[str, Path], Exception]


def checkpoint_error(message: str, path: Path) -> Exception:
    return CheckpointError(message, path)


def read_control_file(path: str | Path, limit: int, error: ErrorFactory = checkpoint_error) -> bytes:
    """The whole content of the regular file ``path`` if it holds at most ``limit`` bytes.

    Raises ``error(message, path)`` when it is missing, not a regular file, unreadable or larger.
    At most ``limit + 1`` bytes are ever read, whatever the file system reports.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise error(f"{path}: not a regular file ({_kind(info.st_mode)})", path)
            if info.st_size > limit:
                raise error(f"{path}: {info.st_size} bytes, more than the {_human(limit)} such a file may hold "
                            "(damaged or not what it claims to be)", path)
            # What the size says (plus one byte, to see a file that grew), then on until the limit:
            # a read of limit + 1 bytes at once would allocate them all, whatever the file holds.
            pieces = [handle.read(info.st_size + 1)]
            total = len(pieces[0])
            while total <= limit and pieces[-1]:
                pieces.append(handle.read(min(limit + 1 - total, 1 << 24)))
                total += len(pieces[-1])
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    except IsADirectoryError:
        raise error(f"{path}: a directory, where a file is expected", path) from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}", path) from None
    if len(data) > limit:
        raise error(f"{path}: more than the {_human(limit)} such a file may hold", path)
    return data


def read_json_file(path: str | Path, limit: int, error: ErrorFactory = checkpoint_error) -> Any:
    """The parsed content of the JSON file ``path`` read by :func:`read_control_file`;
    ``error(message, path)`` also when it is not valid JSON."""
    data = read_control_file(path, limit, error)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        raise error(f"{path}: not valid JSON: {first_line(exc)}", Path(path)) from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _human(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} bytes"
