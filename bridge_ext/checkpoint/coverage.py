"""Prove that the stored chunks of a global tensor cover each of its elements exactly once.

The reader fills a tensor from its chunks into uninitialised memory. Chunks that overlap while
their element counts still add up leave a gap, and a gap would be process memory written into
the output. With every chunk inside the tensor (checked by the reader), "no two chunks overlap"
plus "the chunk volumes add up to the tensor's" is exactly "every element covered once".

The check works on the boxes, never per element, in time linear in the number of chunks:

* Chunks split along one axis at a time (stacked layers, then experts, then tensor-parallel rows
  or columns: every layout Megatron and torch DCP write) are grouped by their interval on that
  axis; groups with disjoint intervals are checked one by one on the next axis.
* Where intervals partly overlap (no layout Megatron writes, e.g. chunks staggered from one
  column to the next), the group is checked by counting corners: a set of boxes covers a region
  exactly once if and only if the signed corners of the boxes add up to the signed corners of
  the region (the indicator function is the prefix sum of its corners, in any dimension). Each
  box adds ``2**k`` corners, ``k`` the axes on which the group's boxes do not all span the
  tensor; ``k`` is bounded by :data:`MAX_IRREGULAR_AXES`. Where the corners do not cancel, the
  smallest corner left over is an element stored twice or not at all, and it is named.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)

# Axes on which chunks of one group may be irregular (each box then adds 2**k corners). Megatron
# tensors have at most four axes (layer, expert, rows, columns) and are split on a grid.
MAX_IRREGULAR_AXES = 6


@dataclass(frozen=True)
class Coverage:
    """The verdict on a tensor's chunks: ``problem`` in words (None: an exact tiling), and
    ``operations``, the boxes visited plus the corners counted (the check's cost)."""

    problem: str | None
    operations: int


def coverage_problem(shape: Sequence[int], boxes: Sequence[Box]) -> str | None:
    """None when ``boxes`` (each inside ``shape``) tile it exactly, else what is wrong, in words."""
    return check_coverage(shape, boxes).problem


def check_coverage(shape: Sequence[int], boxes: Sequence[Box]) -> Coverage:
    """:func:`coverage_problem` with the number of operations it took."""
    shape = tuple(shape)
    solid = [box for box in boxes if math.prod(box[1]) > 0]
    work = _Work(shape, len(boxes))
    problem = work.find(solid, 0)
    if problem is None:
        covered, total = sum(math.prod(sizes) for _, sizes in solid), math.prod(shape)
        if covered != total:
            problem = f"the chunks cover {covered} of its {total} elements (a gap)"
    return Coverage(problem, work.operations)


class _Work:
    def __init__(self, shape: tuple[int, ...], operations: int) -> None:
        self.shape, self.rank, self.operations = shape, len(shape), operations

    def find(self, boxes: list[Box], axis: int) -> str | None:
        """What is wrong inside ``boxes``, which share their intervals on axes < ``axis`` (None: no overlap)."""
        if len(boxes) < 2:
            return None
        self.operations += len(boxes)
        if axis == self.rank:  # identical boxes
            return _overlap(boxes[0], boxes[1])
        groups: dict[tuple[int, int], list[Box]] = defaultdict(list)
        for box in boxes:
            groups[(box[0][axis], box[1][axis])].append(box)
        intervals = sorted(groups)
        self.operations += len(intervals)
        if all(start + size <= next_start for (start, size), (next_start, _) in zip(intervals, intervals[1:])):
            for interval in intervals:
                found = self.find(groups[interval], axis + 1)
                if found is not None:
                    return found
            return None
        return self.corners(boxes, axis)

    def corners(self, boxes: list[Box], axis: int) -> str | None:
        """Whether ``boxes`` tile their slab (axes >= ``axis``: the whole tensor) exactly, by their corners."""
        axes = [d for d in range(axis, self.rank)
                if any(box[0][d] != 0 or box[1][d] != self.shape[d] for box in boxes)]
        self.operations += len(boxes) * (self.rank - axis)
        if len(axes) > MAX_IRREGULAR_AXES:
            return (f"its chunks split it irregularly along {len(axes)} axes at once (at most "
                    f"{MAX_IRREGULAR_AXES} are supported; torch DCP and Megatron split on a grid)")
        count: dict[tuple[int, ...], int] = defaultdict(int)
        for offsets, sizes in boxes:
            for mask in range(1 << len(axes)):
                corner = tuple(offsets[d] + sizes[d] if mask >> i & 1 else offsets[d] for i, d in enumerate(axes))
                count[corner] += -1 if mask.bit_count() & 1 else 1
            self.operations += 1 << len(axes)
        for mask in range(1 << len(axes)):  # the slab's own corners, which must be all that is left
            corner = tuple(self.shape[d] if mask >> i & 1 else 0 for i, d in enumerate(axes))
            count[corner] -= -1 if mask.bit_count() & 1 else 1
        left = [corner for corner, value in count.items() if value]
        self.operations += len(count)
        if not left:
            return None
        # The smallest corner left over has no other below it, so its count is the element's excess.
        corner = min(left)
        element = list(boxes[0][0][:axis]) + [0] * (self.rank - axis)
        for d, value in zip(axes, corner):
            element[d] = value
        holders = [box for box in boxes if all(o <= e < o + s for o, s, e in zip(box[0], box[1], element))]
        self.operations += len(boxes)
        if len(holders) >= 2:
            return f"{_overlap(holders[0], holders[1])} at element {tuple(element)}"
        return f"element {tuple(element)} is in no chunk (a gap)"


def _overlap(first: Box, second: Box) -> str:
    return (f"the chunk at offset {tuple(first[0])} (size {tuple(first[1])}) overlaps the chunk at offset "
            f"{tuple(second[0])} (size {tuple(second[1])})")
