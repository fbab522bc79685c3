"""Block-wise assembly of fused experts: each ``[E, ...]`` output filled a block of experts at a
time, the rule's row operations run once per block on the block's experts side by side; with
``on_host``, straight into pinned host memory (a GPU export to the CPU: the GPU never holds a
whole fused tensor, and the host copies run while the next blocks are gathered)."""

from __future__ import annotations

import torch

from bridge_ext.engine.rules import RuleRunner
from bridge_ext.engine.tasks import Task, describe
from bridge_ext.errors import ExportError
from bridge_ext.source import TensorSource

__all__ = ["STACK_BLOCK_BYTES", "empty_output", "stacked_bases"]

STACK_BLOCK_BYTES = 64 << 20  # experts' shards converted side by side at once


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, on_host: bool) -> torch.Tensor:
    """An output to fill; in pinned host memory with ``on_host`` where ``device`` is a GPU."""
    if on_host and device.type == "cuda":
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.empty(shape, dtype=dtype, device=device)


def stacked_bases(task: Task, source: TensorSource, run: RuleRunner, dtype: torch.dtype | None,
                  on_host: bool = False) -> list[torch.Tensor]:
    """Each output ``[E, out, in]`` of the stacked ``task`` (in ``dtype``, else the converted
    dtype), filled a block of experts at a time; with ``on_host`` (and shards on a GPU) in pinned
    host memory, each block copied there as soon as it is converted, without waiting for the
    copy: the consumer must wait for the device's current stream before reading (``to_host`` does).

    The rule's row operations run once per block on the block's experts side by side
    (``[out, experts * in]`` per tensor-parallel shard: row operations ignore columns);
    one expert at a time where the experts' shards are not split by rows, or by the
    columns of a matrix. A block holds at most :data:`STACK_BLOCK_BYTES` of shards.
    """
    outputs: list[torch.Tensor] = []
    names = task.sources
    start = 0
    while start < len(names):
        block = [source.shards(names[start])]
        if len(block[0]) == 1 or task.rule.tp == "column" or (task.rule.tp == "row" and block[0][0].dim() == 2):
            step = max(1, STACK_BLOCK_BYTES // sum(_nbytes(shard) for shard in block[0]))
            for name in names[start + 1:start + step]:
                shards = source.shards(name)
                if [shard.shape for shard in shards] != [shard.shape for shard in block[0]]:
                    raise ExportError(f"{describe(task, name)}: the experts differ in shape or sharding "
                                      f"({[tuple(s.shape) for s in shards]} against "
                                      f"{[tuple(s.shape) for s in block[0]]} of {names[start]})")
                block.append(shards)
            joined, trailing = _side_by_side(block, join_columns=task.rule.tp == "row")
            what = describe(task, names[start] if len(block) == 1 else
                            f"{names[start]} .. {names[start + len(block) - 1]} side by side")
            parts = [part.reshape(part.shape[0], len(block), *trailing).transpose(0, 1)
                     for part in run(task.rule, joined, what=what)]
        else:
            parts = [part.unsqueeze(0) for part in run(task.rule, block[0], what=describe(task, names[start]))]
        if not outputs:
            outputs = [empty_output((len(names), *part.shape[1:]), dtype or part.dtype, part.device, on_host)
                       for part in parts]
        for output, part in zip(outputs, parts, strict=True):
            output[start:start + len(block)].copy_(part, non_blocking=True)
        start += len(block)
    return outputs


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _side_by_side(block: list[list[torch.Tensor]], join_columns: bool) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """Experts' shards ``block[e][s]`` ``[rows_s, *rest]`` -> per shard ``[rows_s, E * prod(rest)]``
    (expert ``e``'s ``rest`` flattened into its own run of columns; a bias is one column),
    and one expert's ``rest``. With ``join_columns`` the 2-D shards of each expert are first
    joined along columns (row-parallel tensors), giving one tensor."""
    stacked = [torch.stack([shards[s] for shards in block], dim=1) for s in range(len(block[0]))]
    if join_columns and len(stacked) > 1:
        stacked = [torch.cat(stacked, dim=2)]
    return [tensor.reshape(tensor.shape[0], -1) for tensor in stacked], tuple(stacked[0].shape[2:])
