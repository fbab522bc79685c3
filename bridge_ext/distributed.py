"""Moving a live model's shards between the ranks of a parallel job, only where needed.

Each rank holds tensor-parallel shards of some tensors (its pipeline stage's layers, its
expert-parallel rank's experts). Two Megatron groups each hold one complete copy of what
they cover: the model-parallel group (tensor x pipeline ranks) for dense tensors, and the
expert model-parallel group (expert-tensor x expert x pipeline ranks) for expert tensors
(parameters Megatron marks ``allreduce=False``). Within such a group every shard has a
holder; data-parallel replicas are other groups and never talk to each other here.

* Names, shard shapes and dtypes are exchanged once, with one ``all_gather_object`` in each
  of the two groups, never per tensor (and the export remembers the result per model).
* A task (one Megatron tensor and its LoRA factors -> Hugging Face tensors) is converted on its
  receivers only (:data:`Destination`); each shard a receiver lacks is sent to it by one
  holder (the lowest rank holding it) with point-to-point operations. Nothing is broadcast
  to ranks that do not need it; ranks that are neither holder nor receiver do nothing.
* Transfers are batched into steps of about :data:`STEP_BYTES` (one ``batch_isend_irecv``
  per step, in the same order on every rank, so the job cannot deadlock; within a step one
  message per pair of ranks, the shards packed into it, however small), and the next step
  is posted before the current one is waited for, so communication overlaps conversion. A
  received message is freed after the last read of its shards. A tensor of a step or more
  whose shards are joined along rows as they are is received straight into its rows of the
  whole tensor. The cut into steps depends on metadata only: it is made once per task list
  and mode (:class:`ExchangePlan`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from bridge_ext.engine import ExportError, Task, TaskConverter, merge_batches
from bridge_ext.packing import Spec, pack, padded_bytes, unpack
from bridge_ext.source import Adapter

Destination = Literal["all", "owner", "rank0"]
DESTINATIONS: tuple[str, ...] = ("all", "owner", "rank0")
STEP_BYTES = 64 << 20
STEPS_AHEAD = 3
POSTED_AHEAD = 2  # steps posted beyond the one read: peers keep sending while this rank copies to host
FAMILIES = ("dense", "expert")


def is_parallel_job() -> bool:
    """True inside a ``torch.distributed`` job of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_agree(flag: bool) -> bool:
    """True when every rank of the job says True (one small all-reduce; ``flag`` in one process)."""
    if not is_parallel_job():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@dataclass
class GlobalTensor:
    """One tensor as the ranks of this rank's group hold it."""

    name: str
    family: str
    dtype: torch.dtype
    shapes: list[tuple[int, ...]]
    holders: list[list[int]]  # per shard: the global ranks holding it, ascending

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of all shards (read once the shapes are complete: scheduling runs every export)."""
        return sum(self.dtype.itemsize * math.prod(shape) for shape in self.shapes)


def family_group(family: str):
    """The Megatron process group that holds one complete copy of a family's tensors."""
    from megatron.core import parallel_state

    if family == "expert":
        return parallel_state.get_expert_tensor_model_pipeline_parallel_group()
    return parallel_state.get_model_parallel_group()


def tensor_parallel_group_id(family: str) -> int:
    """The lowest rank of this rank's (expert) tensor-parallel group: copies of a shard live there."""
    from megatron.core import parallel_state

    group = (parallel_state.get_expert_tensor_parallel_group() if family == "expert"
             else parallel_state.get_tensor_model_parallel_group())
    return min(dist.get_process_group_ranks(group))


def _round_robin(rows: list[list]) -> Iterator:
    """``[[a0, a1], [b0]] -> a0, b0, a1``: pipeline stages' tensors interleave."""
    for row in itertools.zip_longest(*rows):
        yield from (item for item in row if item is not None)


def _gather(family: str, local, adapters: dict[str, Adapter]) -> tuple[list[int], list]:
    """This family's group ranks and, per rank, ``(entries, adapters, TP group id)``."""
    group = family_group(family)
    ranks = dist.get_process_group_ranks(group)
    mine = [(t.name, t.shard, t.shards, tuple(t.tensor.shape), t.tensor.dtype)
            for t in local if t.expert == (family == "expert")]
    gathered: list = [None] * len(ranks)
    dist.all_gather_object(gathered, (mine, adapters, tensor_parallel_group_id(family)), group=group)
    return ranks, gathered


def _merge(family: str, ranks: list[int], gathered: list, tensors: dict[str, GlobalTensor]) -> list[str]:
    """Add the gathered shards to ``tensors``; the new names, in a rank-independent order."""
    names = []
    rows = [[(rank, *entry) for entry in entries] for rank, (entries, _, _) in zip(ranks, gathered)]
    for rank, name, shard, shards, shape, dtype in _round_robin(rows):
        tensor = tensors.get(name)
        if tensor is None:
            tensor = tensors[name] = GlobalTensor(name, family, dtype, [None] * shards, [[] for _ in range(shards)])
            names.append(name)
        if tensor.family != family or len(tensor.shapes) != shards or tensor.dtype != dtype or (
                tensor.shapes[shard] not in (None, shape)):
            raise ExportError(f"ranks disagree on {name}: shard {shard}/{shards} {shape} {dtype} on rank {rank}")
        tensor.shapes[shard] = shape
        tensor.holders[shard].append(rank)
    tp_group_of = {rank: tp_group for rank, (_, _, tp_group) in zip(ranks, gathered)}
    for tensor in (tensors[name] for name in names):
        missing = [shard for shard, holders in enumerate(tensor.holders) if not holders]
        if missing:
            raise ExportError(f"{tensor.name}: no rank holds tensor-parallel shard(s) {missing}")
        for holders in tensor.holders:
            holders.sort()
            if len({tp_group_of[rank] for rank in holders}) > 1:  # copies live in one TP group
                raise ExportError(f"{tensor.name} is held by ranks {holders} of different pipeline stages or "
                                  "expert ranks: its local layer or expert number was not made global")
    return names


def exchange_metadata(local, adapters: dict[str, Adapter]):
    """Gather names, shard shapes and dtypes in each family's group (the one exchange).

    Returns ``(tensors by name, names in an order every rank shares, adapters of the whole
    model, group ranks by family)``.
    """
    tensors: dict[str, GlobalTensor] = {}
    order: list[str] = []
    all_adapters = dict(adapters)
    group_ranks = {}
    for family in FAMILIES:
        group_ranks[family], gathered = _gather(family, local, adapters)
        for _, their_adapters, _ in gathered:
            all_adapters.update(their_adapters)
        order += _merge(family, group_ranks[family], gathered, tensors)
    return tensors, order, all_adapters, group_ranks


@dataclass
class Step:
    """One export's state of a step: transfers posted together (one ``batch_isend_irecv``) in
    the group of ``family``; what they move is the plan's (:class:`StepTransfers`)."""

    family: str
    works: list | None = None
    received: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    done: torch.cuda.Event | None = None  # on GPU: passed once the step's data is in


@dataclass
class ExchangePlan:
    """What one kind of export over these tasks moves and when: it depends on metadata only, so
    it is worked out once per task list and conversion mode and reused by every later export."""

    tasks: list[Task]
    receivers: dict[int, tuple[int, ...]]  # id(task) -> ranks converting it
    last_read: dict[int, str]  # id(task) -> the last name it reads
    batches: list[list[Task]]  # see merge_batches
    joinable: set[str]  # received straight into one whole tensor (see ShardExchange._post)
    families: list[str]  # per step: the family whose group moves it
    step_of: dict[str, int]
    reads: Counter  # name -> times read
    transfers: list[StepTransfers]  # per step: what this rank sends and receives


@dataclass
class StepTransfers:
    """This rank's messages of one step: per peer, the local tensors it sends (packed into one
    message) and the shards it receives (one message, unpacked by ``specs`` into views)."""

    sends: list[tuple[int, list[str]]]
    receives: list[tuple[int, list[tuple[str, int]], list[Spec], int]]  # peer, shards, specs, bytes


class ShardExchange:
    """The tensors of a live model in a parallel job, delivered to ``destination``."""

    def __init__(self, local, adapters: dict[str, Adapter], destination: Destination = "all",
                 step_bytes: int | None = None):
        self.destination = destination
        self.step_bytes = step_bytes or STEP_BYTES
        self.rank = dist.get_rank()
        self.local = {tensor.name: tensor for tensor in local}
        self.tensors, self.names, self.adapters, self.group_ranks = exchange_metadata(local, adapters)
        self.groups = {family: family_group(family) for family in FAMILIES}
        self.sent_bytes = self.received_bytes = 0  # over this source's exports
        self.device = torch.device("cpu")  # where received shards go; set per export
        self._steps: list[Step] = []
        self._step_of: dict[str, int] = {}
        self._joinable: set[str] = set()  # received straight into one whole tensor (see _post)
        self._plans: dict[tuple, ExchangePlan] = {}
        self._whole: dict[str, torch.Tensor] = {}
        self._in_place: set[tuple[str, int]] = set()
        self._reads_left: Counter = Counter()
        self._transfers_of: list[StepTransfers] = []
        self._posted = self._done = 0

    # -- who receives what -------------------------------------------------------------
    def receivers(self, task: Task) -> tuple[int, ...]:
        """Ranks of this rank's group that convert ``task`` (empty: another group's concern)."""
        tensor = self.tensors[task.sources[0]]
        ranks = self.group_ranks[tensor.family]
        if self.destination == "all":
            return tuple(ranks)
        if 0 not in ranks:
            return ()
        if self.destination == "rank0":
            return (0,)
        return (min(holders[0] for holders in tensor.holders),)

    def _transfers(self, name: str, receivers: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
        """``(shard, source rank, receiving rank)`` for each shard a receiver lacks."""
        for receiver in receivers:
            for shard, holders in enumerate(self.tensors[name].holders):
                if receiver not in holders:
                    yield shard, holders[0], receiver

    # -- scheduling ------------------------------------------------------------------
    def _cut(self, reads: list[tuple[str, tuple[int, ...]]]) -> tuple[list, dict[str, int]]:
        """Cut the reads into steps of ``(entries, family)``, each entry ``(name, receivers)``
        (same cut on every rank: it depends on metadata only)."""
        cut, step_of = [], {}
        entries, nbytes, family = [], 0, ""
        for name, receivers in reads:
            if name in step_of:
                continue
            tensor = self.tensors[name]
            if entries and (nbytes + tensor.nbytes > self.step_bytes or family != tensor.family):
                cut.append((entries, family))
                entries, nbytes = [], 0
            entries.append((name, receivers))
            nbytes += tensor.nbytes
            family = tensor.family
            step_of[name] = len(cut)
        if entries:
            cut.append((entries, family))
        return cut, step_of

    def _start(self, plan: ExchangePlan) -> None:
        """Fresh steps of ``plan`` for one export."""
        self._steps = [Step(family) for family in plan.families]
        self._step_of, self._reads_left, self._joinable = plan.step_of, Counter(plan.reads), plan.joinable
        self._transfers_of = plan.transfers
        self._whole, self._in_place = {}, set()  # nothing of an export left unfinished is reused
        self._posted = self._done = 0

    def _step_transfers(self, entries: list[tuple[str, tuple[int, ...]]]) -> StepTransfers:
        """What this rank sends and receives in a step with these entries (metadata only)."""
        sends: dict[int, list[str]] = {}
        receives: dict[int, list[tuple[str, int]]] = {}
        for name, receivers in entries:
            for shard, source, receiver in self._transfers(name, receivers):
                if source == self.rank:
                    sends.setdefault(receiver, []).append(name)
                elif receiver == self.rank:
                    receives.setdefault(source, []).append((name, shard))
        incoming = []
        for peer, shards in receives.items():
            specs = [(self.tensors[name].shapes[shard], self.tensors[name].dtype) for name, shard in shards]
            incoming.append((peer, shards, specs, sum(padded_bytes(*spec) for spec in specs)))
        return StepTransfers(list(sends.items()), incoming)

    def _post(self, index: int) -> None:
        """Post the transfers of step ``index`` that involve this rank: per peer and direction
        one message (the step's shards packed into one byte buffer), however many shards."""
        step = self._steps[index]
        group = self.groups[step.family]
        transfers = self._transfers_of[index]
        ops = []
        for peer, names in transfers.sends:
            tensors = [self.local[name].tensor.detach() for name in names]
            message = tensors[0].contiguous() if len(tensors) == 1 else pack(tensors)
            ops.append(dist.P2POp(dist.isend, message, peer, group))
            self.sent_bytes += _nbytes(message)
        for peer, shards, specs, nbytes in transfers.receives:
            if len(specs) == 1 and shards[0][0] in self._joinable:  # into its rows of the whole tensor
                buffer = self._rows(*shards[0], self._whole_of(shards[0][0]))
                self._in_place.add(shards[0])
                views = [buffer]
            elif len(specs) == 1:  # one shard: received in place, no unpacking
                buffer = torch.empty(specs[0][0], dtype=specs[0][1], device=self.device)
                views = [buffer]
            else:
                buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                views = unpack(buffer, specs)
            ops.append(dist.P2POp(dist.irecv, buffer, peer, group))
            step.received.update(zip(shards, views))
            self.received_bytes += _nbytes(buffer)
        step.works = dist.batch_isend_irecv(ops) if ops else []

    def _complete(self, index: int) -> None:
        """Post steps up to ``index + POSTED_AHEAD``, wait for steps up to ``index``.

        On GPU waiting only orders the streams; the host is held at most
        :data:`STEPS_AHEAD` steps ahead of the device, which bounds the memory in flight.
        """
        if index < self._done:  # done already (and the steps after it posted then)
            return
        while self._posted < min(index + 1 + POSTED_AHEAD, len(self._steps)):
            self._post(self._posted)
            self._posted += 1
        while self._done <= index:
            step = self._steps[self._done]
            for work in step.works:
                work.wait()
            step.works = []
            if self.device.type == "cuda":
                step.done = torch.cuda.current_stream(self.device).record_event()
            self._done += 1
            behind = self._steps[self._done - STEPS_AHEAD] if self._done >= STEPS_AHEAD else None
            if behind is not None and behind.done is not None:
                behind.done.synchronize()

    # -- the TensorSource side --------------------------------------------------------
    def shards(self, name: str) -> list[torch.Tensor]:
        """All shards of ``name`` (on a receiver of its task, inside :meth:`convert_tasks`)."""
        index = self._step_of.get(name)
        if index is None:
            raise ExportError(f"{name} was read but not scheduled for this task")
        if index >= self._done:
            self._complete(index)
        received = self._steps[index].received
        local = self.local.get(name)
        count = len(self.tensors[name].shapes)
        shards = [local.tensor.detach() if local is not None and local.shard == shard else received[(name, shard)]
                  for shard in range(count)]
        whole = self._whole.get(name) if self._whole else None
        if whole is not None:  # some shards arrived in their rows of it: put the others there once
            for shard, tensor in enumerate(shards):
                if (name, shard) not in self._in_place:
                    self._rows(name, shard, whole).copy_(tensor)
                    self._in_place.add((name, shard))
            shards = [whole]
        left = self._reads_left[name] = self._reads_left[name] - 1
        if left == 0:
            if whole is not None:
                del self._whole[name]
            for shard in range(count):
                received.pop((name, shard), None)
                self._in_place.discard((name, shard))
        return shards

    def _whole_of(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (its shards joined along rows), allocated at its first shard."""
        whole = self._whole.get(name)
        if whole is None:
            tensor = self.tensors[name]
            rows = sum(shape[0] for shape in tensor.shapes)
            whole = self._whole[name] = torch.empty((rows, *tensor.shapes[0][1:]), dtype=tensor.dtype,
                                                    device=self.device)
        return whole

    def _rows(self, name: str, shard: int, whole: torch.Tensor) -> torch.Tensor:
        start = sum(shape[0] for shape in self.tensors[name].shapes[:shard])
        return whole[start:start + self.tensors[name].shapes[shard][0]]

    def convert_tasks(self, converter: TaskConverter, tasks: list[Task]) -> Iterator[tuple[str, torch.Tensor]]:
        """Convert each task on its receivers; every rank posts its sends in the same order."""
        # received shards go where this rank's parameters are now (they may have been offloaded)
        self.device = next((t.tensor.device for t in self.local.values()), torch.device("cpu"))
        key = (id(tasks), converter.mode, id(converter.expert_adapters))
        plan = self._plans.get(key)
        if plan is None or plan.tasks is not tasks:
            plan = self._plans[key] = self._plan(converter, tasks)
        self._start(plan)
        for batch in plan.batches:
            if self.rank in plan.receivers[id(batch[0])]:
                yield from converter.convert_batch(batch)
            else:
                steps = [self._step_of[plan.last_read[id(task)]] for task in batch if id(task) in plan.last_read]
                if steps:
                    self._complete(max(steps))
        self._complete(len(self._steps) - 1)

    def _plan(self, converter: TaskConverter, tasks: list[Task]) -> ExchangePlan:
        receivers = [self.receivers(task) for task in tasks]
        reads = [converter.reads(task) for task in tasks]
        for task, names in zip(tasks, reads):
            families = {self.tensors[name].family for name in names} - {self.tensors[task.sources[0]].family}
            if families:
                raise ExportError(f"{task.sources[0]} and its LoRA factors are split over different groups")
        receivers_of = {id(task): ranks for task, ranks in zip(tasks, receivers)}
        # a large tensor (a step of its own) whose shards are joined as they are is received
        # straight into its rows of the whole tensor: no shard buffers, no join afterwards
        joinable = {name for task, ranks in zip(tasks, receivers) if self.rank in ranks
                    for name in converter.joins_rows(task)
                    if len(self.tensors[name].shapes) > 1 and self.tensors[name].nbytes >= self.step_bytes}
        flat = [(name, ranks) for names, ranks in zip(reads, receivers) for name in names]
        cut, step_of = self._cut(flat)
        return ExchangePlan(
            tasks=tasks, receivers=receivers_of,
            last_read={id(task): names[-1] for task, names in zip(tasks, reads) if names},
            batches=list(merge_batches(converter, tasks, same=lambda task: receivers_of[id(task)])),
            joinable=joinable, families=[family for _, family in cut], step_of=step_of,
            reads=Counter(name for name, _ in flat), transfers=[self._step_transfers(entries) for entries, _ in cut])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
