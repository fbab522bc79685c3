"""The safetensors files of a Hugging Face model or PEFT adapter folder, and what they hold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from bridge_ext.errors import NotASafetensorsFolderError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = f"{SINGLE_FILE}.index.json"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a folder is stored, and its shape (read from the file header)."""

    file: Path
    shape: tuple[int, ...]


def list_safetensors(folder: str | Path, file_name: str = SINGLE_FILE) -> dict[str, StoredTensor]:
    """Every tensor of ``folder``: through ``<file_name>.index.json`` when there is one, else ``<file_name>``.

    Only the file headers are read. Raises :class:`NotASafetensorsFolderError` when there is neither.
    """
    folder = Path(folder)
    index = folder / f"{file_name}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / file_name).is_file():
        files = [file_name]
    else:
        raise NotASafetensorsFolderError(f"{folder} holds neither {file_name} nor {index.name}", folder)
    stored: dict[str, StoredTensor] = {}
    for name in files:
        path = folder / name
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                stored[key] = StoredTensor(path, tuple(handle.get_slice(key).get_shape()))
    return stored
