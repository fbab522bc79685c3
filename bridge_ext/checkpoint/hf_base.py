"""The base model of a LoRA adapter-only checkpoint, made from a Hugging Face folder.

Megatron-Bridge saves PEFT runs without base weights. The base is the Hugging Face model the
run started from: its tensors are turned into Megatron tensors by the very tables the export
uses, in reverse (:func:`bridge_ext.reverse.reverse_rule`), one Megatron tensor at a time, so
the engine sees one model (base from the folder, adapters from the checkpoint) and a merged
export is ``table(reverse(W) + scale * B @ A)``.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import torch
from safetensors import safe_open

from bridge_ext.checkpoint.control_files import JSON_LIMIT, read_control_file
from bridge_ext.dims import ModelDims
from bridge_ext.engine import ExportError
from bridge_ext.errors import ConvertError
from bridge_ext.reverse import reverse_rule
from bridge_ext.source import Adapter, convert_in_order
from bridge_ext.table import MappingTable, Rule

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HfFolderError(ConvertError):
    """A Hugging Face folder (``--hf-base``) is damaged or reaches outside itself; the message names the file."""


def hf_folder_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face folder (sharded or not).

    The index is size-capped and must map names to files inside the folder: an entry such as
    ``../other/model.safetensors`` or an absolute path is refused, as are files that are not
    regular files (a link to one is fine: the Hugging Face cache is made of them).
    """
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = _weight_map(index)
        files: dict[str, Path] = {}
        for file_name in sorted(set(weight_map.values())):
            file = folder / file_name
            # Judged by name, not by resolving links: the Hugging Face cache links every file to a blob.
            if Path(file_name).is_absolute() or ".." in Path(file_name).parts or "\\" in file_name:
                raise HfFolderError(f"{index}: weight_map points at {file_name!r}, outside {folder}; refusing to read it")
            _require_regular_file(file, f"named in {index}")
            files[file_name] = file
        return {name: files[file_name] for name, file_name in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.exists():
        raise HfFolderError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}: not a Hugging Face model folder")
    _require_regular_file(single, "")
    return dict.fromkeys(safetensors_shapes(single), single)


def has_weights(folder: Path) -> bool:
    """Whether a Hugging Face folder holds weights (an index or a single safetensors file) at all."""
    return (folder / INDEX_FILE).exists() or (folder / SINGLE_FILE).exists()


def hf_folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Hugging Face folder, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(hf_folder_files(folder).values())):
        shapes.update(safetensors_shapes(file))
    return shapes


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a safetensors file's header; a garbage header is an error naming the file."""
    try:
        with safe_open(str(file), "pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own and OS errors for a bad file
        raise HfFolderError(f"{file}: not a readable safetensors file: {_first_line(error)}") from None


def _weight_map(index: Path) -> dict[str, str]:
    data = read_control_file(index, JSON_LIMIT, lambda message, _: HfFolderError(message))
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise HfFolderError(f"{index}: not valid JSON: {_first_line(error)}") from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) and file for name, file in weight_map.items()
    ):
        raise HfFolderError(f"{index}: expected {{\"weight_map\": {{tensor name: file name}}}}")
    return weight_map


def _require_regular_file(file: Path, where: str) -> None:
    try:
        regular = stat.S_ISREG(file.stat().st_mode)
    except OSError as error:
        raise HfFolderError(f"{file}{' (' + where + ')' if where else ''}: cannot be read: "
                            f"{error.strerror or error}") from None
    if not regular:
        raise HfFolderError(f"{file}{' (' + where + ')' if where else ''}: not a regular file")


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


class HfBaseSource:
    """Megatron base tensors (normalised names) computed from a Hugging Face folder's tensors.

    ``shapes`` lists the folder's tensors (name -> shape); with ``folder=None`` only names and
    shapes are known (enough to plan an adapters-only export) and reading a tensor is an error.
    ``variants`` are the rule variants the folder's own layout matches (fused or per-expert).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], table: MappingTable, dims: ModelDims,
                 variants: frozenset[str], folder: Path | None = None):
        self.folder = folder
        self.files = hf_folder_files(folder) if folder is not None else {}
        self.dims = dims
        self.hf_shapes = shapes
        self._rules: dict[str, tuple[Rule, dict[str, str], int | None]] = {}
        unknown = []
        for hf_name, shape in shapes.items():
            found = table.match_hf(hf_name, variants)
            if found is None:
                unknown.append(hf_name)
                continue
            match, _ = found
            rule, values = match.rule, dict(match.values)
            # A stacked HF tensor holds one Megatron tensor per expert; a shared one, the first copy.
            reduced = rule.stack or rule.shared
            count = shape[0] if rule.stack else 1
            for number in range(count):
                filled = {**values, reduced: str(number)} if reduced else values
                name = rule.megatron_pattern.fill(filled)
                self._rules.setdefault(name, (rule, values, number if rule.stack else None))
        if unknown:
            raise ExportError(f"{len(unknown)} Hugging Face tensor(s) of the base model have no rule in the "
                              f"{table.model_types} table: {', '.join(sorted(unknown))}")

    def base_names(self) -> list[str]:
        return list(self._rules)

    def adapters(self) -> dict[str, Adapter]:
        return {}

    def shards(self, name: str) -> list[torch.Tensor]:
        if self.folder is None:
            raise ExportError(f"{name}: base weights are needed, but no Hugging Face base folder was given")
        rule, values, expert = self._rules[name]
        return [reverse_rule(rule, [self._read(hf, expert) for hf in rule.hf_names(values)], self.dims)]

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        rule, values, expert = self._rules[name]
        metas = [torch.empty(self.hf_shapes[hf][0 if expert is None else 1:], device="meta")
                 for hf in rule.hf_names(values)]
        return [tuple(reverse_rule(rule, metas, self.dims).shape)]

    def convert_tasks(self, converter, tasks):
        return convert_in_order(converter, tasks)

    def _read(self, hf_name: str, expert: int | None) -> torch.Tensor:
        if hf_name not in self.files:
            raise ExportError(f"{self.folder}: the base model has no tensor {hf_name}")
        file = self.files[hf_name]
        try:
            with safe_open(str(file), "pt") as handle:
                if expert is None:
                    return handle.get_tensor(hf_name)
                return handle.get_slice(hf_name)[expert]  # one expert, not the whole stack
        except Exception as error:  # noqa: BLE001 - a truncated or damaged file: safetensors' own errors
            raise HfFolderError(f"{file}: cannot read {hf_name}: {_first_line(error)}") from None


class CombinedSource:
    """Base weights from one source, LoRA adapters from another (an adapter-only checkpoint)."""

    def __init__(self, base, adapters):
        self.base = base
        self.adapter_source = adapters

    def base_names(self) -> list[str]:
        return self.base.base_names()

    def adapters(self) -> dict[str, Adapter]:
        return self.adapter_source.adapters()

    def shards(self, name: str) -> list[torch.Tensor]:
        return (self.adapter_source if ".adapter." in name else self.base).shards(name)

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        return (self.adapter_source if ".adapter." in name else self.base).shard_shapes(name)

    def convert_tasks(self, converter, tasks):
        return convert_in_order(converter, tasks)
