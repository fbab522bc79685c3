"""Read Megatron-Core ``torch_dist`` distributed checkpoints without building a model.

* :mod:`.layout` — locate a checkpoint (root with ``latest_checkpointed_iteration.txt`` or an
  iteration folder) and the documented key layout (stacked layers, fc1, experts, adapters, GDN);
* :mod:`.safe_pickle` — ``.metadata`` through an allowlisting unpickler (never ``pickle.load``);
* :mod:`.reader` — list global tensors and byte objects; stream one global tensor (or one layer /
  expert of it) at a time from the ``.distcp`` chunks; byte objects with ``weights_only=True``;
* :mod:`.coverage` — proof that a tensor's chunks store each element exactly once;
* :mod:`.control_files` — the small files read whole (``.metadata``, tracker, YAML, JSON), size-capped;
* :mod:`.run_config` — Megatron-Bridge ``run_config.yaml`` (model and PEFT settings), aliases bounded;
* :mod:`.config_check` — the Hugging Face config read safely and compared with ``run_config.yaml``;
* :mod:`.errors` — every failure is a :class:`CheckpointError` naming the path;
* :mod:`.source` — the checkpoint as the engine's tensor source (stored keys -> model names);
* :mod:`.hf_base` — the base of an adapter-only checkpoint, from a Hugging Face folder.

Writing such checkpoints (for the demo, the tests and the benchmarks) is the test-support
package's (``bridge_ext_testing.writer``).
"""

from bridge_ext.checkpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MissingIterationError,
    MissingKeyError,
    MissingMetadataError,
    MissingRunConfigError,
    NotACheckpointError,
    RunConfigError,
    UnsafeObjectError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from bridge_ext.checkpoint.layout import CheckpointLocation, is_adapter_key, locate_checkpoint, split_object_key
from bridge_ext.checkpoint.reader import ChunkInfo, CheckpointReader, TensorInfo
from bridge_ext.checkpoint.run_config import PeftSettings, RunConfig, load_run_config
from bridge_ext.checkpoint.safe_pickle import ALLOWED_GLOBALS, load_dcp_metadata, safe_unpickle
from bridge_ext.checkpoint.source import CheckpointSource

__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointError",
    "CheckpointLocation",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointSource",
    "ChunkInfo",
    "CorruptCheckpointError",
    "MissingIterationError",
    "MissingKeyError",
    "MissingMetadataError",
    "MissingRunConfigError",
    "NotACheckpointError",
    "PeftSettings",
    "RunConfig",
    "RunConfigError",
    "TensorInfo",
    "UnsafeObjectError",
    "UnsafePickleError",
    "UnsupportedFormatError",
    "is_adapter_key",
    "load_dcp_metadata",
    "load_run_config",
    "locate_checkpoint",
    "safe_unpickle",
    "split_object_key",
]
