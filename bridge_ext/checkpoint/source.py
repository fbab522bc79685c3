"""A torch_dist checkpoint as a :class:`bridge_ext.source.TensorSource`: stored keys -> model names.

The engine expects the names and layout of a whole (TP=1) model in memory. Megatron's
checkpoint keys differ from those in a few generic ways (documented in :mod:`.layout`), undone
here by name alone, so that every architecture table applies unchanged:

* ``layers.`` followed by a non-number (``decoder.layers.mlp.linear_fc2.weight``): layers
  stacked on a leading axis; each index becomes ``layers.{i}.`` (several such axes nest in
  order of appearance);
* ``deepstack_merger_list.`` followed by a non-number: likewise (Qwen3-VL's vision block);
* ``experts.experts.``: experts on a leading axis; each becomes ``experts.local_experts.{e}.``
  (the in-memory name of sequential experts);
* ``mtp.layers.{i}.transformer_layer.``: the MTP inner layer, ``mtp_model_layer`` in memory;
* ``<name>.weight.{query,key,value,...}``: one weight Megatron stores as several keys (Gated
  DeltaNet ``in_proj`` / ``conv1d``; each part global in head order), joined back in the
  factory's part order;
* a LoRA ``linear_out`` is (except ``linear_fc1``'s, stored as global ``[gate; up]``) a plain
  column-parallel tensor: its global tensor is the tensor-parallel shards one after the other,
  which for a Gated DeltaNet ``in_proj`` (``[q_r; k_r; v_r; z_r; b_r; a_r]`` per rank) is not
  the global order. :meth:`CheckpointSource.shards` returns those shards, as a live model at
  that TP would, and the rule's per-rank operations do the rest;
* ``optimizer.*`` tensors are not model weights and are left out; every other key is a name the
  tables must know (or the plan names it as unmapped).

LoRA adapters (``<module>.adapter.linear_in/linear_out.weight``) take their rank from the
stored ``linear_in`` and alpha / dropout from ``run_config.yaml``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bridge_ext.checkpoint.errors import CheckpointError
from bridge_ext.checkpoint.reader import CheckpointReader
from bridge_ext.checkpoint.run_config import PeftSettings
from bridge_ext.source import Adapter, convert_in_order

LORA_IN, LORA_OUT = ".adapter.linear_in.weight", ".adapter.linear_out.weight"
NOT_MODEL_PREFIXES = ("optimizer.",)
# Part orders of Megatron's split-tensor factories (megatron/core/ssm/gated_delta_net.py, mamba_mixer.py).
SPLIT_PART_ORDERS = (
    ("query", "key", "value", "z", "beta", "alpha"),
    ("query", "key", "value"),
    ("z", "x", "B", "C", "dt"),
)
SUPPORTED_PEFT = ("LoRA", "VLMLoRA")

# Module lists stored on a leading axis (Qwen3-VL's vision block stacks its deepstack mergers too).
_STACKED = re.compile(r"(?<![^.])(layers|deepstack_merger_list|experts\.experts)\.(?!\d)")
_SPLIT = re.compile(r"^(?P<weight>.+\.weight)\.(?P<part>[A-Za-z]+)$")


@dataclass(frozen=True)
class StoredSlice:
    """Where one model tensor lives: stored key(s) and the leading-axis index inside them.

    Several keys are the parts of a split weight, concatenated on rows in this order.
    """

    keys: tuple[str, ...]
    index: tuple[int, ...]


def unstacked_names(key: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Model names held by a stored key, each with its leading-axis index.

    ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` of shape ``(L, E, ...)`` holds
    ``decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc1.weight`` at ``(l, e)``.
    """
    found = list(_STACKED.finditer(key))
    if len(found) > len(shape):
        raise CheckpointError(f"{key}: {len(found)} stacked axes in the name, but the tensor has shape {shape}")
    names: list[tuple[str, tuple[int, ...]]] = [("", ())]
    start = 0
    for axis, match in enumerate(found):
        literal = key[start : match.start()]
        infix = "experts.local_experts" if match.group(1) == "experts.experts" else match.group(1)
        names = [(f"{name}{literal}{infix}.{i}.", index + (i,)) for name, index in names for i in range(shape[axis])]
        start = match.end()
    return [(name + key[start:], index) for name, index in names]


def memory_name(name: str) -> str:
    """In-memory spelling of a checkpoint name (MTP's inner layer)."""
    return re.sub(r"^((?:\w+\.)*mtp\.layers\.\d+\.)transformer_layer\.", r"\1mtp_model_layer.", name)


class CheckpointSource:
    """The model tensors of a checkpoint under the names of the model in memory.

    Reading is lazy: :meth:`shards` reads one layer (or one expert) of one stored key.
    """

    def __init__(self, reader: CheckpointReader, peft: PeftSettings | None = None):
        self.reader = reader
        self.slices: dict[str, StoredSlice] = {}
        # stored key, or split weight -> its parts; in stored order (a split weight where its first part is)
        entries: dict[str, dict[str, str] | None] = {}
        for key in reader.tensors:
            if key.startswith(NOT_MODEL_PREFIXES):
                continue
            split = _SPLIT.match(key)
            if split is None:
                entries[key] = None
            else:
                entries.setdefault(split.group("weight"), {})[split.group("part")] = key
        for weight, by_part in entries.items():
            if by_part is None:
                self._add(weight, reader.tensors[weight].shape, (weight,))
                continue
            order = next((o for o in SPLIT_PART_ORDERS if set(o) == set(by_part)), None)
            if order is None:
                raise CheckpointError(
                    f"{reader.path}: {weight} is stored split into parts {sorted(by_part)}, "
                    f"which is none of the known Megatron layouts {SPLIT_PART_ORDERS}", reader.path)
            keys = tuple(by_part[part] for part in order)
            self._add(weight, reader.tensors[keys[0]].shape, keys)
        self._adapters = self._find_adapters(peft)

    def _add(self, key: str, shape: tuple[int, ...], keys: tuple[str, ...]) -> None:
        for name, index in unstacked_names(key, shape):
            name = memory_name(name)
            if name in self.slices:
                raise CheckpointError(f"{self.reader.path}: two stored tensors hold {name}", self.reader.path)
            self.slices[name] = StoredSlice(keys, index)

    def _find_adapters(self, peft: PeftSettings | None) -> dict[str, Adapter]:
        adapter_names = [name for name in self.slices if ".adapter." in name]
        if not adapter_names:
            return {}
        where = self.reader.location.run_config_file
        if peft is None:
            raise CheckpointError(
                f"{self.reader.path} holds LoRA adapters, but {where} has no peft section "
                "(alpha and dropout are needed to export them)", where)
        if peft.kind not in SUPPORTED_PEFT:
            raise CheckpointError(f"{where}: peft is {peft.kind}; only LoRA adapters can be exported", where)
        adapters = {}
        for name in adapter_names:
            if not name.endswith((LORA_IN, LORA_OUT)):
                raise CheckpointError(
                    f"{self.reader.path}: {name} is not a LoRA linear_in/linear_out weight "
                    "(CanonicalLoRA and DoRA adapters are not supported)", self.reader.path)
            if not name.endswith(LORA_IN):
                continue
            module = name[: -len(LORA_IN)]
            if module + LORA_OUT not in self.slices:
                raise CheckpointError(f"{self.reader.path}: {module} has a LoRA linear_in but no linear_out",
                                      self.reader.path)
            rank = self.shape(name)[0]
            expert = ".experts." in module
            if peft.dim is not None and rank != peft.dim and not (expert and peft.settings.get("normalize_moe_lora")):
                raise CheckpointError(
                    f"{self.reader.path}: {name} has shape {self.shape(name)} (rank {rank}), but {where} "
                    f"says peft.dim = {peft.dim}", self.reader.path)
            adapters[module] = Adapter(
                module=module,
                lora_a=module + LORA_IN,
                lora_b=module + LORA_OUT,
                alpha=float(peft.alpha if peft.alpha is not None else rank),
                rank=rank,
                dropout=float(peft.dropout or 0.0),
            )
        return adapters

    # ------------------------------------------------------------------ TensorSource
    def base_names(self) -> list[str]:
        return [name for name in self.slices if ".adapter." not in name]

    def adapters(self) -> dict[str, Adapter]:
        return dict(self._adapters)

    def shards(self, name: str) -> list[torch.Tensor]:
        stored = self._slice(name)
        parts = [self.reader.read_tensor(key, stored.index or None) for key in stored.keys]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        rows = self._tp_rows(name, stored)
        return list(torch.split(tensor, rows)) if rows else [tensor]

    @contextmanager
    def read_ahead(self, names: Iterable[str], max_bytes: int | None = None) -> Iterator[None]:
        """Within the block, :meth:`shards` of ``names`` (in this order) was read ahead in a background thread
        (at most ``max_bytes`` ahead; default: the reader's).

        Names this source does not hold are left out (another source reads them).
        """
        requests = [(key, self.slices[name].index or None) for name in names if name in self.slices
                    for key in self.slices[name].keys]
        with self.reader.read_ahead(requests, **({} if max_bytes is None else {"max_bytes": max_bytes})):
            yield

    # ------------------------------------------------------------------ shapes, without reading
    def shape(self, name: str) -> tuple[int, ...]:
        """The whole tensor's shape."""
        stored = self._slice(name)
        shapes = [self.reader.tensors[key].shape[len(stored.index):] for key in stored.keys]
        return (sum(shape[0] for shape in shapes), *shapes[0][1:])

    def shard_shapes(self, name: str) -> list[tuple[int, ...]]:
        """Shapes of what :meth:`shards` returns."""
        shape = self.shape(name)
        rows = self._tp_rows(name, self._slice(name))
        return [(size, *shape[1:]) for size in rows] if rows else [shape]

    def convert_tasks(self, converter, tasks):
        return convert_in_order(converter, tasks)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.tensors[self._slice(name).keys[0]].dtype

    def _slice(self, name: str) -> StoredSlice:
        try:
            return self.slices[name]
        except KeyError:
            raise CheckpointError(f"{self.reader.path}: the checkpoint holds no tensor {name}", self.reader.path) from None

    def _tp_rows(self, name: str, stored: StoredSlice) -> list[int] | None:
        """Row counts of the tensor-parallel shards, where the stored tensor lists them one after another.

        A LoRA ``linear_out`` stored as a plain column-parallel tensor (one row chunk per rank, as
        many chunks as its ``linear_in``) is that; one in global order has a single chunk, or a
        gate and an up chunk per rank (``linear_fc1``). None: use the tensor whole.
        """
        if len(stored.keys) != 1 or not name.endswith(LORA_OUT):
            return None
        lora_in = self.slices.get(name[: -len(LORA_OUT)] + LORA_IN)
        if lora_in is None:
            return None
        rows = self._chunk_starts(stored.keys[0], stored.index)
        if len(rows) < 2 or len(self._chunk_starts(lora_in.keys[0], lora_in.index, all_axes=True)) != len(rows):
            return None
        end = self.reader.tensors[stored.keys[0]].shape[len(stored.index)]
        return [stop - start for start, stop in zip(rows, rows[1:] + [end])]

    def _chunk_starts(self, key: str, index: tuple[int, ...], all_axes: bool = False) -> list:
        """Distinct chunk offsets (on the first axis after ``index``, or all of them) at ``index``."""
        axis = len(index)
        offsets = {c.offsets[axis:] if all_axes else c.offsets[axis]
                   for c in self.reader.tensors[key].chunks if c.offsets[:axis] == index}
        return sorted(offsets)
