"""Write Hugging Face folders: sharded safetensors with an index.

:class:`ShardedSafetensorsWriter` takes tensors one at a time and holds at most one shard in
memory. Folders are staged and installed by :mod:`bridge_ext.output_folder`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# Larger than any one disk: a shard size beyond it is a typo (1e100B), not a plan.
MAX_SHARD_BYTES = 1 << 50


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MiB"`` / ``1024`` -> bytes; ValueError unless 1 byte to 1 PiB."""
    if isinstance(size, int):
        number = size
    else:
        text = size.strip().upper().replace(" ", "")
        units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
        unit = next((unit for unit in units if text.endswith(unit)), "")
        value = float(text[: len(text) - len(unit)])  # ValueError on garbage
        if not math.isfinite(value):
            raise ValueError(f"{size!r} is not a finite size")
        number = value * units.get(unit, 1)
    if not 1 <= number <= MAX_SHARD_BYTES:
        raise ValueError(f"{size!r} is not between 1 byte and 1 PiB")
    return int(number)


class ShardedSafetensorsWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` files plus their index."""

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.tensor_count = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"{name} was written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        if any(tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
               for other in self._pending.values()):
            tensor = tensor.clone()  # safetensors refuses tensors sharing memory
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.tensor_count += 1

    def _flush(self) -> None:
        file_name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.directory / file_name), metadata=self.metadata)
        self._shards.append((file_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index if several."""
        if self._pending or not self._shards:
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
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
