"""Packed messages: every tensor comes back bit for bit, aligned, whatever its shape or dtype."""

import pytest
import torch

from bridge_ext.packing import ALIGN, pack, padded_bytes, unpack


def _tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    plain = torch.randn(7, 3, generator=generator)
    return [
        plain.to(torch.bfloat16),
        torch.randn(5, generator=generator).to(torch.float16),  # 10 bytes: padded
        torch.tensor(3.5, dtype=torch.float64),  # 0-dim
        torch.empty(0, 4),  # no elements
        torch.randint(-9, 9, (3, 3), generator=generator, dtype=torch.int8),  # 9 bytes
        plain.t(),  # not contiguous
        torch.tensor([True, False, True]),
        torch.randn(2, 2, 2, generator=generator),
    ]


@pytest.mark.parametrize("seed", range(3))
def test_unpack_returns_every_packed_tensor_bit_for_bit(seed):
    tensors = _tensors(seed)
    message = pack(tensors)
    assert message.dtype == torch.uint8 and message.dim() == 1
    assert message.numel() == sum(padded_bytes(tuple(t.shape), t.dtype) for t in tensors)
    views = unpack(message.clone(), [(tuple(t.shape), t.dtype) for t in tensors])
    assert len(views) == len(tensors)
    for original, view in zip(tensors, views):
        assert view.dtype == original.dtype and view.shape == original.shape
        assert torch.equal(view, original)
        assert (view.storage_offset() * view.element_size()) % ALIGN == 0


def test_views_share_the_message():
    tensors = _tensors(0)
    message = pack(tensors)
    views = unpack(message, [(tuple(t.shape), t.dtype) for t in tensors])
    message.zero_()
    assert all(not view.any() for view in views if view.numel())


def test_padding_rounds_up_to_the_alignment():
    assert padded_bytes((5,), torch.float16) == ALIGN
    assert padded_bytes((8,), torch.float16) == ALIGN
    assert padded_bytes((9,), torch.float16) == 2 * ALIGN
    assert padded_bytes((0,), torch.float32) == 0
