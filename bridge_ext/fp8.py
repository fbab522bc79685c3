"""Block FP8 quantization: ``float8_e4m3fn`` weights with float32 ``weight_scale_inv`` per 128x128 block.

The format vLLM, SGLang and transformers load for ``quant_method: fp8`` with
``weight_block_size: [128, 128]``. A matrix ``[N, K]`` is cut into 128x128 blocks (partial
blocks at the bottom and right edges); each block gets ``scale = amax(|w|) / 448`` in float32
(an all-zero block gets 1), its values become ``w / scale`` rounded to the nearest even
``float8_e4m3fn``, and the scales form ``weight_scale_inv [ceil(N/128), ceil(K/128)]``
(dequantized: ``q * scale``). Leading dimensions (fused experts ``[E, N, K]``) are batch
dimensions: each matrix has its own blocks.

A stream of many same-shaped tensors (per-expert weights) is quantized in groups
(:func:`quantize_runs`): one stacked call per group, so a GPU runs a handful of kernels per
group instead of per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

BLOCK = 128
E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
#: Source bytes quantized in one call: bounds the float32 temporaries (about 4x this).
GROUP_BYTES = 64 << 20
_WIDENED_BY_DIVISION = (torch.bfloat16, torch.float16, torch.float32)


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    """``weight_scale_inv``'s shape for a weight of ``shape`` (leading dims kept)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block), -(-cols // block))


def quantize_blocks(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` of ``weight [..., N, K]`` on its own device (see the module doc)."""
    if weight.ndim < 2:
        raise ValueError(f"block FP8 needs a matrix, not shape {tuple(weight.shape)}")
    *lead, rows, cols = weight.shape
    row_blocks, col_blocks = -(-rows // block), -(-cols // block)
    # bf16 / fp16 stay as they are: |w| and its maximum are exact in them, and the division
    # below widens them to float32 as it reads (no float32 copy of the weight in memory)
    values = weight if weight.dtype in _WIDENED_BY_DIVISION else weight.to(torch.float32)
    pad_rows, pad_cols = row_blocks * block - rows, col_blocks * block - cols
    if pad_rows or pad_cols:  # zeros change no block's amax
        values = F.pad(values, (0, pad_cols, 0, pad_rows))
    blocks = values.reshape(*lead, row_blocks, block, col_blocks, block)
    amax = blocks.abs().amax(dim=(-3, -1)).to(torch.float32)
    # divide by a tensor: CUDA turns division by a Python number into multiplication by its
    # rounded reciprocal, which moves some scales by an ulp (and their blocks' e4m3 values)
    scale = torch.where(amax > 0, amax / amax.new_full((), E4M3_MAX), torch.ones_like(amax))
    # one kernel: float32 quotient, rounded to e4m3 (nearest even) as it is stored
    quantized = torch.empty(blocks.shape, dtype=FP8, device=blocks.device)
    torch.div(blocks, scale[..., :, None, :, None], out=quantized)
    quantized = quantized.reshape(*lead, row_blocks * block, col_blocks * block)
    if pad_rows or pad_cols:
        quantized = quantized[..., :rows, :cols].contiguous()
    return quantized, scale


def quantize_parts(weight: torch.Tensor, parts: int = 1, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_blocks` with the rows cut into ``parts`` equal parts first, each with its
    own blocks (fused ``gate_up_proj [E, 2I, H]``: the engine reads gate and up separately),
    scales stacked on the row axis: ``[..., parts * ceil(N/parts/128), ceil(K/128)]``."""
    if parts == 1:
        return quantize_blocks(weight, block)
    *lead, rows, cols = weight.shape
    if rows % parts:
        raise ValueError(f"cannot cut {rows} rows into {parts} equal parts")
    quantized, scale = quantize_blocks(weight.reshape(*lead, parts, rows // parts, cols), block)
    return quantized.reshape(weight.shape), scale.reshape(*lead, parts * scale.shape[-2], scale.shape[-1])


def quantize_bounded(weight: torch.Tensor, parts: int = 1, limit: int = GROUP_BYTES,
                     block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_parts` in slices of at most about ``limit`` source bytes (experts of a fused
    stack, or whole block rows of a matrix), written into the outputs: a large tensor's float32
    temporaries stay bounded."""
    nbytes = weight.numel() * weight.element_size()
    if nbytes <= limit:
        return quantize_parts(weight, parts, block)
    quantized = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    scale_rows = weight.shape[-2] // parts
    scale = torch.empty((*weight.shape[:-2], parts * -(-scale_rows // block), -(-weight.shape[-1] // block)),
                        dtype=torch.float32, device=weight.device)
    if weight.ndim > 2:
        step = max(1, weight.shape[0] * limit // nbytes)
        for start in range(0, weight.shape[0], step):
            quantized[start:start + step], scale[start:start + step] = quantize_parts(
                weight[start:start + step], parts, block)
        return quantized, scale
    if parts != 1:
        return quantize_parts(weight, parts, block)
    step = max(1, weight.shape[0] * limit // nbytes // block) * block
    for start in range(0, weight.shape[0], step):
        quantized[start:start + step], scale[start // block:(start + step) // block] = quantize_blocks(
            weight[start:start + step], block)
    return quantized, scale


def quantize_runs(pairs: Iterable[tuple[str, torch.Tensor]], parts_of: Callable[[str], int | None],
                  scale_name: Callable[[str], str], group_bytes: int = GROUP_BYTES,
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with each tensor that ``parts_of`` gives a part count for replaced by its FP8
    weight and, right after it, its scales under ``scale_name(name)``; other tensors unchanged.
    Order is kept. Consecutive tensors of one shape, dtype, device and part count (a layer's
    experts) are quantized together, up to ``group_bytes`` of source per group."""
    group: list[tuple[str, torch.Tensor]] = []
    key = None
    size = 0
    for name, tensor in pairs:
        parts = parts_of(name)
        this = None if parts is None else (tuple(tensor.shape), tensor.dtype, tensor.device, parts)
        nbytes = tensor.numel() * tensor.element_size()
        if group and (this != key or size + nbytes > group_bytes):
            yield from _quantized_group(group, key[3], scale_name)
            group, size = [], 0
        if this is None:
            yield name, tensor
            continue
        group.append((name, tensor))
        key, size = this, size + nbytes
    if group:
        yield from _quantized_group(group, key[3], scale_name)


def _quantized_group(group: list[tuple[str, torch.Tensor]], parts: int,
                     scale_name: Callable[[str], str]) -> Iterator[tuple[str, torch.Tensor]]:
    if len(group) == 1:
        name, tensor = group[0]
        quantized, scale = quantize_bounded(tensor, parts)
        yield name, quantized
        yield scale_name(name), scale
        return
    quantized, scale = quantize_parts(torch.stack([tensor for _, tensor in group]), parts)
    for (name, _), each_q, each_s in zip(group, quantized, scale):
        yield name, each_q
        yield scale_name(name), each_s
