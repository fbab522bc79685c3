"""The value check's bit-level finiteness test agrees with ``torch.isfinite`` on every float format
(of the values widened to float32, or float64 as is: torch.isfinite does not take float8)."""

from __future__ import annotations

import pytest
import torch

from bridge_ext import value_check
from bridge_ext.value_check import all_finite, non_finite_count

SPECIAL = [float("nan"), -float("nan"), float("inf"), float("-inf")]
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def finite_reference(tensor: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(tensor if tensor.dtype == torch.float64 else tensor.float())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("position", [0, 1023, 1024, 3000])  # either side of a block boundary
def test_all_finite_finds_each_nan_and_inf(dtype, position, monkeypatch):
    monkeypatch.setattr(value_check, "_BLOCK", 1024)
    values = torch.randn(3001, generator=torch.Generator().manual_seed(0))
    finite = values.to(dtype)
    assert all_finite(finite) is bool(finite_reference(finite).all()) is True
    assert non_finite_count(finite) == 0
    for special in SPECIAL:
        spoiled = values.clone()
        spoiled[position] = special
        spoiled[7] = special
        spoiled = spoiled.to(dtype)
        expected = bool(finite_reference(spoiled).all())  # float8_e4m3fn saturates an Inf to 448
        assert all_finite(spoiled) is expected, (special, position)
        assert not expected or (dtype == torch.float8_e4m3fn and special in (float("inf"), float("-inf")))
        assert non_finite_count(spoiled) == int((~finite_reference(spoiled)).sum()), (special, position)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_largest_smallest_and_signed_zero_are_finite(dtype):
    info = torch.finfo(dtype)
    edges = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, info.tiny / 4, -0.0, 0.0], dtype=dtype)
    assert all_finite(edges) and all_finite(edges[:0])
    assert not all_finite(edges.t().contiguous().index_fill_(0, torch.tensor([3]), float("inf")))


def test_a_non_contiguous_tensor_is_checked_too():
    values = torch.zeros(64, 64, dtype=torch.bfloat16)
    values[3, 5] = float("nan")
    assert not all_finite(values.t()) and all_finite(values[:3].t())
