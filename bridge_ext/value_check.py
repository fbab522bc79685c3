"""Look at the values a conversion writes: count NaN / Inf, refuse a cast that overflows.

A checkpoint may hold non-finite values (a diverged run); they are counted per tensor as tensors
stream and reported, not hidden. A cast to float16 turns every value beyond ±65504 into an
infinity (bfloat16 and float32 reach ~3e38): that is refused, naming the tensor, unless the
caller allows it. The check reads each tensor once at memory speed (:func:`all_finite`: the raw
bits, a cache-sized block at a time); details are computed only for tensors that fail it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bridge_ext.errors import ConvertError


class OverflowingCastError(ConvertError):
    """Casting to the requested dtype would turn finite values into infinities."""


@dataclass
class ValueCheck:
    """Casts each produced tensor to ``dtype`` (None: keep) and records what is not finite.

    ``non_finite``: tensor name -> number of NaN / Inf values written (after the cast, so with
    ``allow_overflow`` the infinities the cast made are counted too).
    """

    dtype: torch.dtype | None = None
    allow_overflow: bool = False
    allow_with: str = "--allow-overflow"  # how the caller allows an overflow, for the message
    non_finite: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        cast = tensor if self.dtype is None or tensor.dtype == self.dtype else tensor.to(self.dtype)
        cast = cast.contiguous()  # the writer needs it so: no copy is added, and the bits can be read
        if not tensor.is_floating_point() or all_finite(cast):
            return cast
        if cast is not tensor and not self.allow_overflow:
            made = int((torch.isinf(cast) & torch.isfinite(tensor)).sum())
            if made:
                largest = float(tensor.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max())
                raise OverflowingCastError(
                    f"{name}: casting {tensor.dtype} to {self.dtype} turns {made} finite value(s) into "
                    f"infinities (largest magnitude {largest:.4g}; {self.dtype} ends at "
                    f"{torch.finfo(self.dtype).max:.6g}); keep the checkpoint's dtype, choose bfloat16 or "
                    f"float32, or pass {self.allow_with} to write them anyway")
        self.non_finite[name] = non_finite_count(cast)
        return cast


# dtype -> (the integer view of its bits, the mask of all but the sign, the smallest magnitude
# that is an Inf or NaN): all exponent bits set in IEEE 754 formats; float8_e4m3fn has no
# infinities and one NaN magnitude, all bits set (and torch.isfinite does not take float8).
_BITS = {
    torch.bfloat16: (np.int16, 0x7FFF, 0x7F80),
    torch.float16: (np.int16, 0x7FFF, 0x7C00),
    torch.float32: (np.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (np.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    torch.float8_e5m2: (np.int8, 0x7F, 0x7C),
    torch.float8_e4m3fn: (np.int8, 0x7F, 0x7F),
}
# Elements per block: the block and its masked copy stay in the core's cache.
_BLOCK = 1 << 17


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element of ``tensor`` (contiguous, on the CPU) is NaN or +-Inf.

    For IEEE formats the magnitude bits are masked and compared with the all-ones exponent, a
    block at a time (one read of the tensor, vectorised, no tensor-sized temporary): about 30x
    ``torch.isfinite`` on bfloat16 (which converts every element to float first). Other dtypes
    use ``torch.isfinite``.
    """
    flat = _bits(tensor)
    if flat is None:
        return bool(torch.isfinite(tensor).all())
    view, mask, smallest = _BITS[tensor.dtype]
    block = np.empty(min(_BLOCK, flat.size), dtype=view)
    for start in range(0, flat.size, _BLOCK):
        piece = block[: min(_BLOCK, flat.size - start)]
        np.bitwise_and(flat[start : start + _BLOCK], mask, out=piece)
        if piece.max() >= smallest:
            return False
    return True


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many elements of ``tensor`` are NaN or +-Inf."""
    flat = _bits(tensor)
    if flat is None:
        return int((~torch.isfinite(tensor)).sum())
    _, mask, smallest = _BITS[tensor.dtype]
    return int(np.count_nonzero(np.bitwise_and(flat, mask) >= smallest))


def _bits(tensor: torch.Tensor) -> np.ndarray | None:
    """The elements' bits as integers (a view), where :data:`_BITS` knows the dtype."""
    if tensor.dtype not in _BITS or tensor.device.type != "cpu":
        return None
    tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().view(_BITS[tensor.dtype][0])


def non_finite_summary(non_finite: dict[str, int], shown: int = 5) -> str:
    """One line naming the tensors with NaN / Inf values and how many each holds."""
    names = sorted(non_finite)
    listed = ", ".join(f"{name} ({non_finite[name]})" for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{sum(non_finite.values())} non-finite value(s) (NaN or Inf) in {len(names)} tensor(s): {listed}{more}"
