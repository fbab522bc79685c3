"""What a live export is asked for, checked before anything is planned: the model, the dtype, the device.

A wrong argument must fail with a :class:`~bridge_ext.errors.BridgeExtError` naming it, not
with an ``AttributeError`` deep inside, and must never yield tensors that look like an export
but are not one (integer truncations, meta tensors without values).
"""

from __future__ import annotations

import torch

from bridge_ext.errors import ExportError


def check_model(model) -> None:
    """``model`` is a Megatron-Core model (a module with its ``TransformerConfig`` as ``.config``)
    or a non-empty list / tuple of such virtual-pipeline chunks."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise ExportError("model is an empty list: give a Megatron-Core model or its virtual-pipeline chunks")
    for chunk in chunks:
        inner = chunk
        while isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module  # DDP / Float16Module wrappers
        if not isinstance(inner, torch.nn.Module) or getattr(inner, "config", None) is None:
            what = type(chunk).__name__ if isinstance(chunk, torch.nn.Module) else repr(chunk)[:60]
            raise ExportError(f"model must be a Megatron-Core model (a torch.nn.Module whose .config is its "
                              f"TransformerConfig) or a list of its virtual-pipeline chunks, not {what}")


def check_dtype(dtype) -> None:
    """A cast target must be a floating-point torch dtype (an integer cast truncates every weight)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ExportError(f"dtype must be a floating-point torch dtype (torch.bfloat16, torch.float16, "
                          f"torch.float32...), not {dtype!r}")


def check_device(device) -> None:
    """``device`` is None (where the model is) or the CPU: nothing else is implemented."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind != "cpu":
        raise ExportError(f"device must be None (tensors where the model is) or 'cpu', not {device!r}")


def overflows(dtype: torch.dtype | None) -> bool:
    """Whether a cast to ``dtype`` can make infinities of a model's values (float16 ends at 65504;
    bfloat16 and float32 reach ~3.4e38, where weights never are): then it is checked."""
    return dtype is not None and torch.finfo(dtype).max < 1e38
