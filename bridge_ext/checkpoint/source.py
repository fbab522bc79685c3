"""A torch_dist checkpoint as a :class:`bridge_ext.source.TensorSource`: stored keys -> model names.

The engine expects the names and layout of a whole (TP=1) model in memory. Megatron's
checkpoint keys differ from those in a few generic ways (documented in :mod:`.layout`), undone
here by name alone, so that every architecture table applies unchanged:

* ``layers.`` followed by a non-number (``decoder.layers.mlp.linear_fc2.weight``): layers
  stacked on a leading axis; each index becomes ``layers.{i}.`` (several such axes nest in
  order of appearance); likewise the other module lists the table names
  (``MappingTable.stored_stacked_lists``, e.g. Qwen3-VL's ``deepstack_merger_list``);
* ``experts.experts.``: experts on a leading axis; each becomes ``experts.local_experts.{e}.``
  (the in-memory name of sequential experts);
* ``mtp.layers.{i}.transformer_layer.``: the MTP inner layer, ``mtp_model_layer`` in memory;
* ``<name>.weight.{query,key,value,...}``: one weight Megatron stores as several keys (Gated
  DeltaNet ``in_proj`` / ``conv1d``, Mamba's; each part global in head order), joined back in
  the factory's part order, which the table states (``MappingTable.stored_split_parts``);
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
from dataclasses import dataclass, replace

import torch

from bridge_ext.checkpoint.errors import CheckpointError
from bridge_ext.checkpoint.reader import CheckpointReader
from bridge_ext.checkpoint.run_config import PeftSettings
from bridge_ext.source import Adapter, convert_in_order
from bridge_ext.table import MappingTable

LORA_IN, LORA_OUT = ".adapter.linear_in.weight", ".adapter.linear_out.weight"
MAGNITUDE = ".adapter.weight_magnitude"  # DoRA's, beside linear_in/linear_out
NOT_MODEL_PREFIXES = ("optimizer.",)
SUPPORTED_PEFT = ("LoRA", "VLMLoRA", "DoRA", "CanonicalLoRA")
# CanonicalLoRA's per-part pairs (``linear_qkv.adapter.adapter_q.linear_in.weight``)
_CANONICAL = re.compile(r"^(?P<module>.+)\.adapter\.adapter_(?P<part>[a-z]+)\.linear_(?P<factor>in|out)\.weight$")

# Module lists every Megatron model stores on a leading axis; a table names its others.
STACKED_LISTS = ("layers", "experts.experts")
_SPLIT = re.compile(r"^(?P<weight>.+\.(?:weight|bias))\.(?P<part>[A-Za-z]+)$")


@dataclass(frozen=True)
class StoredSlice:
    """Where one model tensor lives: stored key(s) and the leading-axis index inside them.

    Several keys are the parts of a split weight, concatenated on rows in this order.
    """

    keys: tuple[str, ...]
    index: tuple[int, ...]


def stacked_pattern(lists: Iterable[str] = ()) -> re.Pattern[str]:
    """Where a stored key names a module list on a leading axis: :data:`STACKED_LISTS` and ``lists``,
    followed by a non-number."""
    names = "|".join(re.escape(name) for name in (*STACKED_LISTS, *lists))
    return re.compile(rf"(?<![^.])({names})\.(?!\d)")


def unstacked_names(key: str, shape: tuple[int, ...],
                    stacked: re.Pattern[str] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Model names held by a stored key, each with its leading-axis index (``stacked``: the
    lists stored so, default :func:`stacked_pattern` of none beyond the common ones).

    ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` of shape ``(L, E, ...)`` holds
    ``decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc1.weight`` at ``(l, e)``.
    """
    found = list((stacked or _COMMON_STACKED).finditer(key))
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


_COMMON_STACKED = stacked_pattern()


def memory_name(name: str) -> str:
    """In-memory spelling of a checkpoint name (MTP's inner layer)."""
    return re.sub(r"^((?:\w+\.)*mtp\.layers\.\d+\.)transformer_layer\.", r"\1mtp_model_layer.", name)


class CheckpointSource:
    """The model tensors of a checkpoint under the names of the model in memory.

    Reading is lazy: :meth:`shards` reads one layer (or one expert) of one stored key. ``table``
    (the architecture's) names the module lists stored stacked and the split weights' part orders
    beyond the common ones.
    """

    def __init__(self, reader: CheckpointReader, peft: PeftSettings | None = None, table: MappingTable | None = None):
        self.reader = reader
        self.slices: dict[str, StoredSlice] = {}
        self._stacked = stacked_pattern(table.stored_stacked_lists) if table is not None else _COMMON_STACKED
        split_orders = table.stored_split_parts if table is not None else ()
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
            order = next((o for o in split_orders if set(o) == set(by_part)), None)
            if order is None:
                raise CheckpointError(
                    f"{reader.path}: {weight} is stored split into parts {sorted(by_part)}, "
                    f"which is none of the layouts the architecture's table knows {split_orders}", reader.path)
            keys = tuple(by_part[part] for part in order)
            self._add(weight, reader.tensors[keys[0]].shape, keys)
        self._adapters = self._find_adapters(peft)

    def _add(self, key: str, shape: tuple[int, ...], keys: tuple[str, ...]) -> None:
        for name, index in unstacked_names(key, shape, self._stacked):
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
            raise CheckpointError(f"{where}: peft is {peft.kind}; only {', '.join(SUPPORTED_PEFT)} adapters can be "
                                  "exported", where)
        adapters = {}
        dora, canonical = peft.kind == "DoRA", peft.kind == "CanonicalLoRA"
        parts: dict[str, dict[str, Adapter]] = {}
        for name in adapter_names:
            part = _CANONICAL.match(name) if canonical else None
            if part is None and not name.endswith((LORA_IN, LORA_OUT, MAGNITUDE) if dora else (LORA_IN, LORA_OUT)):
                raise CheckpointError(f"{self.reader.path}: {name} is not a {peft.kind} adapter weight",
                                      self.reader.path)
            if part is not None:
                if part["factor"] == "in":
                    prefix = name[: -len("in.weight")]
                    parts.setdefault(part["module"], {})[part["part"]] = self._lora(
                        part["module"], f"{prefix}in.weight", f"{prefix}out.weight", peft)
                continue
            if not name.endswith(LORA_IN):
                continue
            module = name[: -len(LORA_IN)]
            if dora:
                self._check_dora(module)
            adapters[module] = replace(self._lora(module, module + LORA_IN, module + LORA_OUT, peft),
                                       magnitude=module + MAGNITUDE if dora else None)
        for module, by_part in parts.items():
            first = next(iter(by_part.values()))
            adapters[module] = replace(first, parts=tuple(sorted(by_part.items())))
        return adapters

    def _lora(self, module: str, lora_in: str, lora_out: str, peft: PeftSettings) -> Adapter:
        """The LoRA pair ``lora_in`` / ``lora_out`` on ``module``, its rank checked against ``peft.dim``."""
        where = self.reader.location.run_config_file
        if lora_out not in self.slices:
            raise CheckpointError(f"{self.reader.path}: {module} has a LoRA linear_in but no linear_out",
                                  self.reader.path)
        rank = self.shape(lora_in)[0]
        expert = ".experts." in module
        if peft.dim is not None and rank != peft.dim and not (expert and peft.settings.get("normalize_moe_lora")):
            raise CheckpointError(
                f"{self.reader.path}: {lora_in} has shape {self.shape(lora_in)} (rank {rank}), but {where} "
                f"says peft.dim = {peft.dim}", self.reader.path)
        return Adapter(module=module, lora_a=lora_in, lora_b=lora_out,
                       alpha=float(peft.alpha if peft.alpha is not None else rank), rank=rank,
                       dropout=float(peft.dropout or 0.0), expert=expert)

    def _check_dora(self, module: str) -> None:
        """A DoRA module must have its magnitude, and be one whose forward PEFT's DoRA computes."""
        path = self.reader.path
        if module + MAGNITUDE not in self.slices:
            raise CheckpointError(f"{path}: the DoRA adapter of {module} has no weight_magnitude", path)
        if module + ".bias" in self.slices:  # a checkpoint does not say whether Megatron adds it inside
            raise CheckpointError(f"{path}: DoRA on {module}, which has a bias: Megatron scales a bias it adds "
                                  "inside the layer and PEFT's DoRA does not; converting it is not supported", path)
        # a whole magnitude beside a sharded linear_in: a row-parallel linear saved at tensor-parallel size > 1
        magnitude, lora_in = self.slices[module + MAGNITUDE], self.slices[module + LORA_IN]
        if (len(self._chunk_starts(magnitude.keys[0], magnitude.index)) == 1
                and len(self._chunk_starts(lora_in.keys[0], lora_in.index, all_axes=True)) > 1):
            raise CheckpointError(f"{path}: DoRA on the row-parallel {module}, trained at tensor-parallel size > 1, "
                                  "scaled each rank's output by the norm of that rank's columns only, which no "
                                  "Hugging Face module computes", path)

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
        gate and an up chunk per rank (``linear_fc1``). A DoRA magnitude of a column-parallel
        linear is stored the plain way (``linear_fc1``'s too). None: use the tensor whole.
        """
        suffix = LORA_OUT if name.endswith(LORA_OUT) else MAGNITUDE if name.endswith(MAGNITUDE) else None
        if len(stored.keys) != 1 or suffix is None:
            return None
        lora_in = self.slices.get(name[: -len(suffix)] + LORA_IN)
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
