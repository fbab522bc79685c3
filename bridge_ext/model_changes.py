"""Whether a live model's structure changed since its export was planned, without walking it.

The export plan of a model is remembered (exports repeat every training step) while the model
keeps its modules, parameters and persistent buffers. Walking the thousands of modules of an
MoE model at every export to check that costs as much as an adapters-only export itself, so
torch's global registration hooks count instead every (re)assignment of a submodule, parameter
or persistent buffer on a module of a watched model.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.modules import module as torch_module

_watched: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_count = 0
_hooks_installed = False


def watch(chunks: list[torch.nn.Module]) -> None:
    """Count from now on every registration on a module of ``chunks``."""
    global _hooks_installed
    if not _hooks_installed:
        torch_module.register_module_module_registration_hook(_on_registration)
        torch_module.register_module_parameter_registration_hook(_on_registration)
        torch_module.register_module_buffer_registration_hook(_on_buffer_registration)
        _hooks_installed = True
    for chunk in chunks:
        _watched.update(chunk.modules())


def count() -> int:
    """Registrations on watched modules so far (a remembered plan holds while this stays)."""
    return _count


def _on_registration(module: torch.nn.Module, name: str, value) -> None:
    global _count
    if module in _watched:
        _count += 1


def _on_buffer_registration(module: torch.nn.Module, name: str, value) -> None:
    # non-persistent buffers are runtime state (token counts) that may be reassigned every step
    if name not in module._non_persistent_buffers_set:
        _on_registration(module, name, value)
