"""The block FP8 quantizer against the format's definition and Megatron-Bridge's own function, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bridge_ext.fp8 import quantize_blocks, quantize_bounded, quantize_parts, quantize_runs, scale_shape

SHAPES = [(1, 1), (5, 300), (127, 129), (128, 128), (300, 200), (256, 384), (129, 1)]


def reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Written from the definition, one block at a time: scale = amax / 448 in float32 (1 for an
    all-zero block), q = w / scale rounded to the nearest even e4m3 value."""
    rows, cols = weight.shape
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty((rows + 127) // 128, (cols + 127) // 128, dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].to(torch.float32)
            amax = block.abs().max()
            scale = amax / torch.tensor(448.0) if amax > 0 else torch.tensor(1.0)
            scales[i, j] = scale
            quantized[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale).to(torch.float8_e4m3fn)
    return quantized, scales


def weight_of(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * torch.logspace(-3, 1, shape[-1])
    if shape[-2] > 128 and shape[-1] > 128:
        weight[..., :128, 128:256] = 0  # an all-zero block
    return weight.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantizer_equals_the_definition_bit_for_bit(shape, dtype):
    weight = weight_of(shape, dtype)
    quantized, scale = quantize_blocks(weight)
    expected_q, expected_s = reference(weight)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape(shape)
    assert same_bits(quantized, expected_q)
    assert torch.equal(scale.view(torch.int32), expected_s.view(torch.int32))


@pytest.mark.parametrize("shape", SHAPES)
def test_quantizer_equals_megatron_bridge(shape):
    utils = pytest.importorskip("megatron.bridge.models.conversion.quantization_utils")
    weight = weight_of(shape, torch.bfloat16, seed=1)
    quantized, scale = quantize_blocks(weight)
    like = torch.empty(scale_shape(shape), dtype=torch.float32)
    mb_q, mb_s = utils.quantize_fp8_e4m3fn_like_scale(weight, like)
    assert same_bits(quantized, mb_q)
    assert torch.equal(scale.view(torch.int32), mb_s.view(torch.int32))


def test_all_zero_block_gets_scale_one_and_dequantizes_within_e4m3():
    weight = weight_of((300, 200))
    quantized, scale = quantize_blocks(weight)
    assert scale[0, 1] == 1.0 and not quantized[:128, 128:].to(torch.float32).any()
    expanded = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    error = (quantized.to(torch.float32) * expanded - weight).abs()
    assert (error <= expanded * 16 + 1e-30).all()  # half an e4m3 ulp at 448 is 16


def test_batched_and_sliced_forms_equal_one_matrix_at_a_time():
    stack = weight_of((3, 130, 257), torch.bfloat16, seed=2)
    quantized, scale = quantize_blocks(stack)
    bounded_q, bounded_s = quantize_bounded(stack, limit=130 * 257 * 2)  # one expert per slice
    rows_q, rows_s = quantize_bounded(stack[0], limit=128 * 257 * 2)  # one block row per slice
    for e in range(3):
        expected_q, expected_s = reference(stack[e])
        assert same_bits(quantized[e], expected_q) and same_bits(bounded_q[e], expected_q)
        assert torch.equal(scale[e], expected_s) and torch.equal(bounded_s[e], expected_s)
    assert same_bits(rows_q, quantized[0]) and torch.equal(rows_s, scale[0])


def test_parts_quantize_gate_and_up_separately():
    gate_up = weight_of((2, 2 * 96, 64), seed=3)
    quantized, scale = quantize_parts(gate_up, parts=2)
    assert scale.shape == (2, 2, 1)
    for e in range(2):
        for half in range(2):
            rows = slice(half * 96, (half + 1) * 96)
            expected_q, expected_s = reference(gate_up[e, rows])
            assert same_bits(quantized[e, rows], expected_q) and torch.equal(scale[e, half:half + 1], expected_s)


def test_runs_keep_order_and_equal_tensor_by_tensor():
    tensors = [(f"experts.{e}.gate_proj.weight", weight_of((96, 64), seed=e)) for e in range(5)]
    tensors += [("norm.weight", torch.ones(64)), ("experts.gate_up_proj", weight_of((2, 192, 64), seed=9))]
    parts = {name: 2 if name == "experts.gate_up_proj" else 1 for name, _ in tensors if name != "norm.weight"}
    out = list(quantize_runs(iter(tensors), parts.get, lambda name: name + "_scale_inv", group_bytes=3 * 96 * 64 * 4))
    names = [name for name, _ in out]
    assert names == [n for name, _ in tensors for n in ([name, name + "_scale_inv"] if name in parts else [name])]
    produced = dict(out)
    for name, tensor in tensors:
        if name in parts:
            expected_q, expected_s = quantize_parts(tensor, parts[name])
            assert same_bits(produced[name], expected_q) and torch.equal(produced[name + "_scale_inv"], expected_s)
        else:
            assert produced[name] is tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(300, 200), (768, 2048), (4, 130, 257)])
def test_quantizer_on_the_gpu_equals_the_cpu_bit_for_bit(shape):
    weight = weight_of(shape, torch.bfloat16, seed=4)
    quantized, scale = quantize_blocks(weight.cuda())
    expected_q, expected_s = quantize_blocks(weight)
    assert same_bits(quantized.cpu(), expected_q) and torch.equal(scale.cpu(), expected_s)


def test_transformers_cpu_dequantization_misreads_partial_edge_blocks():
    """transformers 5.23's CPU dequantization (``Fp8Dequantize``, what loading a ``quant_method:
    fp8`` folder on CPU runs) takes the block size from the scale grid (``rows // scale_rows``),
    not from ``weight_block_size``: right for whole 128-blocks, wrong where an edge block is
    partial. A weight of 200 rows (scales for rows 0-127 and 128-199) is read in 100-row blocks:
    rows 100-127 get the second block's scale. One of 129 or 576 rows (DeepSeek-V3's
    ``kv_a_proj_with_mqa``) is refused. docs/fp8.md; when transformers changes this, this fails."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    dequantize = Fp8Dequantize(None)._dequantize_one
    weight = weight_of((200, 64))
    weight[128:] *= 10  # the two row blocks get different scales
    quantized, scales = quantize_blocks(weight)
    by_definition = quantized.float() * scales.repeat_interleave(128, dim=0)[:200]
    assert torch.equal(dequantize(quantized, scales, torch.float32), quantized.float() * scales.repeat_interleave(
        100, dim=0))  # 100-row blocks
    theirs = dequantize(quantized, scales, torch.float32)
    assert torch.equal(theirs[:100], by_definition[:100]) and torch.equal(theirs[128:], by_definition[128:])
    assert not torch.allclose(theirs[100:128], by_definition[100:128])
    whole = weight_of((256, 384))  # whole blocks: read as defined
    quantized, scales = quantize_blocks(whole)
    assert torch.equal(dequantize(quantized, scales, torch.float32),
                       quantized.float() * scales.repeat_interleave(128, 0).repeat_interleave(128, 1))
    for rows in (129, 576):
        quantized, scales = quantize_blocks(weight_of((rows, 64)))
        with pytest.raises(ValueError, match="not divisible by scale grid"):
            dequantize(quantized, scales, torch.float32)
