"""Every error bridge_ext raises on purpose derives from :class:`BridgeExtError`.

A caller can catch the root; the command-line tool maps each family to its exit code
(docs/convert.md). Messages name the tensors, files and fields concerned, in library words.
"""

from __future__ import annotations

from pathlib import Path


class BridgeExtError(Exception):
    """The root of bridge_ext's own errors."""


def first_line(error: BaseException) -> str:
    """An error's first line, at most 200 characters, to quote a third-party error in a message."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's ``MemoryError``, or torch's CPU allocator refusing (a RuntimeError)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


class ExportError(BridgeExtError, ValueError):
    """The model and the mapping table disagree; the message names the tensors concerned."""


class CheckpointError(BridgeExtError):
    """A checkpoint could not be located or read. ``path`` is the file or folder concerned."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class ConvertError(BridgeExtError, ValueError):
    """The inputs cannot be converted as asked; the message says why (tensor names, shapes, paths)."""


class OutputExistsError(BridgeExtError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for; or something
    appeared at the output, or replaced the folder found there, while the output was being written."""


class OutputLocationError(BridgeExtError, ValueError):
    """An output path that is refused whatever the options: the filesystem root, the working
    directory or a parent of it, a symbolic link, an input (or inside or around one), or a folder
    nested in the other output."""


class OutputWriteError(BridgeExtError):
    """The filesystem refused to create or write an output (permission denied, no space left, file
    size limit, read-only). ``path`` is the file or folder concerned, when known."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class VerificationError(BridgeExtError):
    """An exported folder is not what its consumer expects; the message says what differs."""


class CompatibilityError(BridgeExtError, RuntimeError):
    """The installed Megatron packages are not the ones a workaround was written for."""


class RuleError(ExportError):
    """An operation of a mapping rule cannot convert a tensor; the message names the rule, the
    Megatron tensor, the Hugging Face names and the shapes."""


class SafetensorsFolderError(BridgeExtError, ValueError):
    """A model or adapter folder's safetensors files are missing, damaged or reach outside the
    folder; ``path`` is the file or folder concerned."""

    def __init__(self, message: str, path: str | Path) -> None:
        super().__init__(message)
        self.path = Path(path)
