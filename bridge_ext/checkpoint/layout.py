"""Locate a Megatron ``torch_dist`` checkpoint on disk, and the facts about its key layout.

Folder layout
-------------
Megatron-Bridge / Megatron-LM training writes a *checkpoint root*::

    root/latest_checkpointed_iteration.txt   "10"  (or "release")
    root/latest_train_state.pt               (Bridge)
    root/iter_0000010/                       "iter_{:07d}" (Bridge checkpoint_utils.get_checkpoint_name)
        metadata.json      {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
        .metadata          pickled torch DCP Metadata (read it with safe_pickle, never pickle.load)
        __{rank}_{writer}.distcp   tensor data and byte objects
        run_config.yaml    (Bridge) model / peft / checkpoint settings
        train_state.pt     (Bridge)
    root/release/          when the tracker says "release"

Format detection follows Bridge (training/checkpointing.py): ``metadata.json`` -> torch_dist,
``.metadata`` alone -> fsdp_dtensor (not supported here). Legacy (< 0.19) torch_dist folders
also hold ``common.pt``; since megatron-core 0.19 the non-tensor state is the byte object
``common_state/shard_0_1`` inside the ``.distcp`` files.

Stored keys (verified on a tiny Qwen3, megatron-core 0.19.2 / megatron-bridge 0.6.2)
------------------------------------------------------------------------------------
* Layers are *stacked*: with ``singleton_local_shards=False`` (Megatron-Bridge always saves so)
  each layer's ShardedTensor gets a prepended layer axis and the stored key drops the layer
  index: ``decoder.layers.self_attention.linear_qkv.weight`` has global shape ``(L, qkv_rows, H)``
  and is stored as one chunk per layer (and per TP shard), so one layer reads alone.
  Local-spec names follow the TE names: ``decoder.layers.self_attention.linear_qkv.layer_norm_weight``
  (= input_layernorm), ``decoder.layers.mlp.linear_fc1.layer_norm_weight`` (= pre_mlp_layernorm).
  Unstacked: ``embedding.word_embeddings.weight``, ``decoder.final_layernorm.weight``,
  ``output_layer.weight``.
* ``linear_fc1.weight`` (gated MLP) is ``(L, 2F, H)`` = ``[gate; up]`` globally at any TP: a
  ShardedTensorFactory (megatron/core/transformer/mlp.py) stores the gate and up halves of each
  rank as separate chunks at row offsets ``r*F/tp`` and ``F + r*F/tp``, so there are
  ``2*tp`` chunks per layer. With ``singleton_local_shards=True`` the halves are separate keys
  ``..._w`` / ``..._v`` and keys keep the layer number.
* MoE experts (SequentialMLP ``local_experts.{i}`` in memory) are stored with
  ``prepend_axis_num=2``: ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` is
  ``(L, E, 2F, H)``; read one expert with ``index=(layer, expert)``.
* Byte objects: ``<module>._extra_state/shard_{l}_{L}`` (one per layer, ``torch.save([obj])``;
  ``[None]`` for local layers) and ``common_state/shard_0_1`` (``[{'checkpoint_version', 'iteration',
  'content_metadata', ...}]``). They load with ``weights_only=True``.
* LoRA (Megatron-Bridge): the ``to_wrap`` level disappears, base weights keep their plain keys,
  adapters are stacked like the base: ``<module>.adapter.linear_in.weight (L, r, in)``,
  ``<module>.adapter.linear_out.weight (L, out, r)``; fc1's ``linear_out`` is ``[gate; up]`` rows
  like fc1 itself. Adapter-only checkpoints (Bridge ``apply_peft_adapter_filter_to_state_dict``)
  keep only keys containing ``.adapter.`` (no ``_extra_state``) plus ``common_state``; only
  ``run_config.yaml`` (``peft`` not null) says that the checkpoint is a PEFT one.
* Gated DeltaNet (megatron/core/ssm/gated_delta_net/gdn.py; tiny Qwen3.5 checkpoints at TP=1 and 2):
  the fused in_proj is split into keys ``...self_attention.in_proj.weight.{query,key,value,z,beta,alpha}``
  and the conv into ``...conv1d.weight.{query,key,value}``, each in global head order;
  MTP's inner layer is keyed ``transformer_layer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bridge_ext.checkpoint.control_files import SMALL_JSON_LIMIT, TRACKER_LIMIT, read_control_file, read_json_file
from bridge_ext.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    MissingIterationError,
    MissingMetadataError,
    NotACheckpointError,
    UnsupportedFormatError,
)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
BACKEND_FILE = "metadata.json"
DCP_METADATA_FILE = ".metadata"
RUN_CONFIG_FILE = "run_config.yaml"
LEGACY_COMMON_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"
ITERATION_MARKERS = (BACKEND_FILE, DCP_METADATA_FILE, RUN_CONFIG_FILE, "train_state.pt")

_MAX_ITERATION_DIGITS = 18  # fits int64, as Megatron's own iteration counter
_TRACKER_NUMBER = re.compile(rb"[0-9]{1,%d}" % _MAX_ITERATION_DIGITS)
_OBJECT_SHARD = re.compile(r"^(?P<base>.+)/shard_(?P<index>[0-9_.]+)_(?P<count>\d+)$")


@dataclass(frozen=True)
class CheckpointLocation:
    """A resolved torch_dist iteration folder.

    ``root`` is the checkpoint root when one was given (else None); ``iteration`` the number
    from the tracker or folder name (None for ``release`` or an unnumbered folder).
    """

    path: Path
    root: Path | None
    iteration: int | None
    release: bool = False

    @property
    def metadata_file(self) -> Path:
        return self.path / DCP_METADATA_FILE

    @property
    def run_config_file(self) -> Path:
        return self.path / RUN_CONFIG_FILE


def iteration_dir_name(iteration: int) -> str:
    """``iter_{:07d}`` as Megatron-Bridge / Megatron-LM name iteration folders."""
    return f"iter_{iteration:07d}"


def locate_checkpoint(path: str | Path, iteration: int | None = None) -> CheckpointLocation:
    """Resolve a checkpoint root (``latest`` or ``iteration``) or an iteration folder; check it is torch_dist.

    Raises a :class:`CheckpointError` subclass naming the path for: not a directory, neither a
    root nor an iteration folder, the tracker / ``iteration`` naming a missing folder, not
    torch_dist, ``.metadata`` missing.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory", path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: not a directory (expected a checkpoint folder)", path)

    tracker = path / TRACKER_FILE
    if iteration is not None:
        if not 0 <= iteration < 10**_MAX_ITERATION_DIGITS:
            raise MissingIterationError(f"{path}: iteration {iteration} is not an iteration number", path)
        folder = path / iteration_dir_name(iteration)
        if not folder.is_dir():
            raise MissingIterationError(f"{path}: no folder {folder.name} for iteration {iteration}", folder)
        return _check_torch_dist(CheckpointLocation(folder, path, iteration))
    if tracker.exists():
        number = read_tracker(tracker)
        release = number is None
        folder = path / ("release" if release else iteration_dir_name(number))
        if not folder.is_dir():
            raise MissingIterationError(
                f"{tracker} points at {folder.name}, which does not exist in {path}", folder
            )
        return _check_torch_dist(CheckpointLocation(folder, path, number, release))
    if _looks_like_iteration_dir(path):
        match = re.fullmatch(r"iter_(\d+)", path.name)
        number = int(match.group(1)) if match else None
        return _check_torch_dist(CheckpointLocation(path, None, number, path.name == "release"))
    raise NotACheckpointError(
        f"{path}: not a Megatron checkpoint: no {TRACKER_FILE} (checkpoint root) and no "
        f"{BACKEND_FILE} / {DCP_METADATA_FILE} (iteration folder)",
        path,
    )


def read_tracker(tracker: Path) -> int | None:
    """The iteration a tracker file names (None for ``release``).

    Megatron writes ASCII digits or ``release``; anything else (other Unicode digits, which
    ``int`` would accept, a number too long to be an iteration) is refused, naming the file.
    """
    data = read_control_file(tracker, TRACKER_LIMIT)
    text = data.strip(b" \t\r\n")
    if text == b"release":
        return None
    if _TRACKER_NUMBER.fullmatch(text) is None:
        shown = text[:40].decode("utf-8", errors="replace")
        raise CheckpointError(
            f"{tracker}: expected an iteration number (ASCII digits, at most {_MAX_ITERATION_DIGITS}) or "
            f"'release', found {shown!r}",
            tracker,
        )
    return int(text)


def _looks_like_iteration_dir(path: Path) -> bool:
    if any((path / marker).exists() for marker in ITERATION_MARKERS):
        return True
    return next(path.glob("*.distcp"), None) is not None


def _check_torch_dist(location: CheckpointLocation) -> CheckpointLocation:
    folder = location.path
    backend_file = folder / BACKEND_FILE
    if not backend_file.exists():
        kind = "an fsdp_dtensor checkpoint" if (folder / DCP_METADATA_FILE).exists() else "not torch_dist"
        raise UnsupportedFormatError(
            f"{folder}: {kind}: {BACKEND_FILE} is missing (only Megatron torch_dist checkpoints are supported)",
            folder,
        )
    config = read_json_file(backend_file, SMALL_JSON_LIMIT, _unsupported)
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != "torch_dist":
        raise UnsupportedFormatError(
            f"{backend_file}: sharded_backend is {repr(backend)[:80]}; only 'torch_dist' is supported", backend_file
        )
    if not location.metadata_file.exists():
        raise MissingMetadataError(
            f"{folder}: {DCP_METADATA_FILE} is missing (incomplete or corrupted torch_dist checkpoint)",
            location.metadata_file,
        )
    return location


def _unsupported(message: str, path: Path) -> Exception:
    return UnsupportedFormatError(message, path)


def is_adapter_key(key: str) -> bool:
    """A LoRA/DoRA adapter weight key (Megatron-Bridge wraps adapters as ``<module>.adapter.*``)."""
    return ".adapter." in key


def split_object_key(key: str) -> tuple[str, str, int] | None:
    """``'x._extra_state/shard_1_2'`` -> ``('x._extra_state', '1', 2)``; None when not a sharded-object key."""
    match = _OBJECT_SHARD.match(key)
    if match is None:
        return None
    return match.group("base"), match.group("index"), int(match.group("count"))
