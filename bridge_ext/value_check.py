"""Look at the values a conversion writes: count NaN / Inf, refuse a cast that overflows.

A checkpoint may hold non-finite values (a diverged run); they are counted per tensor as tensors
stream and reported, not hidden. A cast to float16 turns every value beyond ±65504 into an
infinity (bfloat16 and float32 reach ~3e38): that is refused, naming the tensor, unless the
caller allows it. The check costs one ``isfinite`` pass per tensor; details are computed only
for tensors that fail it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        if not tensor.is_floating_point() or bool(torch.isfinite(cast).all()):
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
        self.non_finite[name] = int((~torch.isfinite(cast)).sum())
        return cast


def non_finite_summary(non_finite: dict[str, int], shown: int = 5) -> str:
    """One line naming the tensors with NaN / Inf values and how many each holds."""
    names = sorted(non_finite)
    listed = ", ".join(f"{name} ({non_finite[name]})" for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{sum(non_finite.values())} non-finite value(s) (NaN or Inf) in {len(names)} tensor(s): {listed}{more}"
