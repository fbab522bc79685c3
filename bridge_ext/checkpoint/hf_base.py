"""The base model of a LoRA adapter-only checkpoint, made from a Hugging Face folder.

Megatron-Bridge saves PEFT runs without base weights. The base is the Hugging Face model the
run started from: its tensors are turned into Megatron tensors by the very tables the export
uses, in reverse (:func:`bridge_ext.reverse.reverse_rule`), one Megatron tensor at a time, so
the engine sees one model (base from the folder, adapters from the checkpoint) and a merged
export is ``table(reverse(W) + scale * B @ A)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from bridge_ext.dims import ModelDims
from bridge_ext.engine import ExportError
from bridge_ext.errors import ConvertError, SafetensorsFolderError, first_line
from bridge_ext.hf_files import StoredTensor, list_safetensors
from bridge_ext.reverse import reverse_rule
from bridge_ext.source import Adapter, convert_in_order
from bridge_ext.table import MappingTable, Rule


class HfFolderError(ConvertError):
    """A Hugging Face folder (``--hf-base``) is damaged or reaches outside itself; the message names the file."""


def hf_folder_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face folder (sharded or not): its file and shape, headers only.

    The listing is :func:`bridge_ext.hf_files.list_safetensors` (size-capped index naming regular
    files inside the folder; a link to one is fine: the Hugging Face cache is made of them); its
    errors become :class:`HfFolderError`, a conversion input error.
    """
    try:
        return list_safetensors(folder)
    except SafetensorsFolderError as error:
        raise HfFolderError(str(error)) from None


def hf_folder_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face folder."""
    return {name: stored.file for name, stored in hf_folder_tensors(folder).items()}


def hf_folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Hugging Face folder, from the safetensors headers only."""
    return {name: stored.shape for name, stored in hf_folder_tensors(folder).items()}


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
            raise HfFolderError(f"{file}: cannot read {hf_name}: {first_line(error)}") from None


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
