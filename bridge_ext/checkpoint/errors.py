"""Errors raised while reading a Megatron distributed checkpoint.

Every error is a :class:`CheckpointError` and names the path (file or folder) it concerns, so a
command-line tool can print ``str(error)`` and nothing else.
"""

from __future__ import annotations

from bridge_ext.errors import CheckpointError

__all__ = ["CheckpointError"]  # the root of these errors lives with the others


class CheckpointNotFoundError(CheckpointError):
    """The given path does not exist or is not a directory."""


class NotACheckpointError(CheckpointError):
    """A directory that is neither a checkpoint root (``latest_checkpointed_iteration.txt``)
    nor an iteration folder."""


class MissingIterationError(CheckpointError):
    """The tracker file (or the requested iteration) names a folder that does not exist."""


class UnsupportedFormatError(CheckpointError):
    """Not a ``torch_dist`` checkpoint (``metadata.json`` missing or naming another backend),
    or a storage feature this reader does not implement (e.g. DCP stream transforms)."""


class MissingMetadataError(CheckpointError):
    """``metadata.json`` says torch_dist but the DCP ``.metadata`` file is missing."""


class UnsafePickleError(CheckpointError):
    """A pickle (``.metadata``) references a global outside the allowlist; nothing was executed."""


class CheckpointLimitError(CheckpointError):
    """A ``.metadata`` lists more entries than any real checkpoint has (bridge_ext.checkpoint.entry_limits)."""


class UnsafeObjectError(CheckpointError):
    """A byte object cannot be loaded with ``torch.load(weights_only=True)``."""


class CorruptCheckpointError(CheckpointError):
    """A ``.distcp`` file is missing, truncated or holds data that does not match the metadata."""


class MissingRunConfigError(CheckpointError):
    """``run_config.yaml`` is needed (adapter-only data present) but missing."""


class RunConfigError(CheckpointError):
    """``run_config.yaml`` exists but cannot be parsed or lacks a required section."""


class MissingKeyError(CheckpointError, KeyError):
    """The requested key is not a global tensor (or byte object) of the checkpoint."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""
