"""Prove that the stored chunks of a global tensor cover each of its elements exactly once.

The reader fills a tensor from its chunks into uninitialised memory. Chunks that overlap while
their element counts still add up leave a gap, and a gap would be process memory written into
the output. With every chunk inside the tensor (checked by the reader), "no two chunks overlap"
plus "the chunk volumes add up to the tensor's" is exactly "every element covered once".

Overlaps are found on the boxes, never per element: chunks split along one axis at a time
(stacked layers, then experts, then tensor-parallel rows or columns) are grouped by their
interval on that axis, groups with disjoint intervals are checked one by one on the next axis;
only where intervals partly overlap (not a layout Megatron writes) are boxes compared pairwise
after a sort (a sweep).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def coverage_problem(shape: Sequence[int], boxes: Sequence[Box]) -> str | None:
    """None when ``boxes`` (each inside ``shape``) tile it exactly, else what is wrong, in words."""
    solid = [box for box in boxes if math.prod(box[1]) > 0]
    overlap = _find_overlap(solid, 0, len(shape))
    if overlap is not None:
        (first, first_sizes), (second, second_sizes) = overlap
        return (f"the chunk at offset {first} (size {first_sizes}) overlaps the chunk at offset {second} "
                f"(size {second_sizes})")
    covered, total = sum(math.prod(sizes) for _, sizes in solid), math.prod(shape)
    if covered != total:
        return f"the chunks cover {covered} of its {total} elements (a gap)"
    return None


def _find_overlap(boxes: list[Box], axis: int, rank: int) -> tuple[Box, Box] | None:
    """Two overlapping boxes, given that all of ``boxes`` share their intervals on axes < ``axis``."""
    if len(boxes) < 2:
        return None
    if axis == rank:  # identical boxes
        return boxes[0], boxes[1]
    groups: dict[tuple[int, int], list[Box]] = defaultdict(list)
    for box in boxes:
        groups[(box[0][axis], box[1][axis])].append(box)
    intervals = sorted(groups)
    if all(start + size <= next_start for (start, size), (next_start, _) in zip(intervals, intervals[1:])):
        for interval in intervals:
            found = _find_overlap(groups[interval], axis + 1, rank)
            if found is not None:
                return found
        return None
    return _sweep(boxes, axis, rank)


def _sweep(boxes: list[Box], axis: int, rank: int) -> tuple[Box, Box] | None:
    """Pairwise comparison of the boxes whose intervals on ``axis`` overlap (sorted by start)."""
    active: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[0][axis]):
        start = box[0][axis]
        active = [other for other in active if other[0][axis] + other[1][axis] > start]
        for other in active:
            if all(other[0][d] < box[0][d] + box[1][d] and box[0][d] < other[0][d] + other[1][d]
                   for d in range(axis, rank)):
                return other, box
        active.append(box)
    return None
