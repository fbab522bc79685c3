"""The safetensors files of a Hugging Face model or PEFT adapter folder, and what they hold.

Read without trusting the folder: the index is size-capped and may only name regular files inside
the folder, every index entry must be in the file it names, and only file headers are read.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from bridge_ext.checkpoint.control_files import JSON_LIMIT, read_json_file
from bridge_ext.errors import SafetensorsFolderError, first_line
from bridge_ext.hf_folder import INDEX_FILE, SINGLE_FILE  # noqa: F401 - readers import both from here

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a folder is stored, and its shape (from the file header)."""

    file: Path
    shape: tuple[int, ...]


def list_safetensors(folder: str | Path, file_name: str = SINGLE_FILE) -> dict[str, StoredTensor]:
    """Every tensor of ``folder``: through ``<file_name>.index.json`` when there is one, else ``<file_name>``.

    Raises :class:`SafetensorsFolderError`, naming the file, when there is neither, when the index
    is not a ``weight_map`` of names to files inside the folder, or when a file is not a readable
    safetensors file or lacks a tensor its index puts there.
    """
    folder = Path(folder)
    index = folder / f"{file_name}.index.json"
    if index.exists():
        weight_map = _weight_map(index)
        files = [_file_in(folder, name, index) for name in sorted(set(weight_map.values()))]
    elif (folder / file_name).exists():
        weight_map = None
        files = [_file_in(folder, file_name, None)]
    else:
        raise SafetensorsFolderError(f"{folder}: no {file_name} and no {index.name}", folder)
    stored: dict[str, StoredTensor] = {}
    for file in files:
        stored.update((name, StoredTensor(file, shape)) for name, shape in safetensors_shapes(file).items())
    if weight_map is not None:
        misplaced = sorted(name for name, file_name in weight_map.items()
                           if name not in stored or stored[name].file != folder / file_name)
        if misplaced:
            raise SafetensorsFolderError(f"{index}: {len(misplaced)} tensor(s) are not in the file the index names, "
                                         f"e.g. {misplaced[:3]}", index)
    return stored


def index_weight_map(folder: str | Path, file_name: str = SINGLE_FILE) -> dict[str, str] | None:
    """Tensor name -> file name from ``<file_name>.index.json``, checked as :func:`list_safetensors`
    checks it but without reading the files, which may be absent (a download without weights);
    None when there is no index."""
    folder = Path(folder)
    index = folder / f"{file_name}.index.json"
    if not index.exists():
        return None
    weight_map = _weight_map(index)
    for name in set(weight_map.values()):
        _require_inside(folder, name, index)
    return weight_map


def has_safetensors(folder: str | Path, file_name: str = SINGLE_FILE) -> bool:
    """Whether ``folder`` has ``<file_name>.index.json`` or ``<file_name>`` at all (not whether they are sound)."""
    folder = Path(folder)
    return (folder / f"{file_name}.index.json").exists() or (folder / file_name).exists()


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a safetensors file's header; a damaged header is an error naming the file."""
    try:
        with safe_open(str(file), "pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own errors and OS errors
        raise SafetensorsFolderError(f"{file}: not a readable safetensors file: {first_line(error)}", file) from None


def _weight_map(index: Path) -> dict[str, str]:
    parsed = read_json_file(index, JSON_LIMIT, SafetensorsFolderError)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) and file for name, file in weight_map.items()
    ):
        raise SafetensorsFolderError(f'{index}: expected {{"weight_map": {{tensor name: file name}}}}', index)
    return weight_map


def _file_in(folder: Path, file_name: str, index: Path | None) -> Path:
    """``folder / file_name``, refused unless it names a regular file inside the folder."""
    where = f" (named in {index})" if index is not None else ""
    _require_inside(folder, file_name, index)
    file = folder / file_name
    try:
        regular = stat.S_ISREG(file.stat().st_mode)
    except OSError as error:
        raise SafetensorsFolderError(f"{file}{where}: cannot be read: {error.strerror or error}", file) from None
    if not regular:
        raise SafetensorsFolderError(f"{file}{where}: not a regular file", file)
    return file


def _require_inside(folder: Path, file_name: str, index: Path | None) -> None:
    # Judged by name, not by resolving links: the Hugging Face cache links every file to a blob.
    if "\0" in file_name:
        raise SafetensorsFolderError(f"{index or folder}: the file name {file_name!r} holds a NUL byte, "
                                     "which no file name can", index or folder)
    if Path(file_name).is_absolute() or ".." in Path(file_name).parts or "\\" in file_name:
        raise SafetensorsFolderError(f"{index}: weight_map points at {file_name!r}, outside {folder}; refusing to read it",
                                     index or folder)
