"""Convert and write the base tensors of a model folder in several worker processes at once.

The shards' headers are laid out from the plan before anything is read (every tensor's file and
offset is known), so the work splits by task: each worker is handed a run of consecutive tasks,
reads their tensors (with its own read-ahead, in its stream order), converts and checks them, and
writes each one with ``pwrite`` at its planned offset of the file the parent created. The bytes
of every file are therefore the same whatever the number of workers.

Workers are forked after every check passed (they share the plan, the tables and the open shard
files with the parent; nothing is pickled but a message per tensor). The parent stays in charge:
it counts each tensor written, raises the first error a worker reports (after stopping the
others) and, on any exit, kills and reaps every worker before the staging folder is removed, so
an interruption still leaves nothing behind. A worker ignores the stop signals (its parent
decides) and dies with its parent (``PR_SET_PDEATHSIG``) if that one is killed outright.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import pickle
import signal
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from bridge_ext.errors import BridgeExtError
from bridge_ext.hf_folder import ShardedSafetensorsWriter, TensorSpec, write_tensor_at

# Below this many bytes of output per worker, forking costs more than it gains.
MIN_BYTES_PER_WORKER = 128 << 20
# Each worker reads ahead at least this much (the read-ahead is shared among the workers).
MIN_READ_AHEAD = 64 << 20
# What a worker holds besides its read-ahead: the tensor being converted, its conversion and cast.
TENSOR_COPIES = 3
_PR_SET_PDEATHSIG = 1


# name -> (an open shard file's descriptor, inherited by the workers; offset; what goes there)
Places = dict[str, tuple[int, int, TensorSpec]]


class WorkerError(BridgeExtError, OSError):
    """A worker ended without reporting: the system killed it (e.g. out of memory). An OSError:
    the command's exit code 7, as for other failures of the system."""


def default_workers(output_bytes: int, largest_tensor: int, read_ahead: int) -> int:
    """Workers for a conversion writing ``output_bytes``: the cores this process may use, fewer
    when the memory available would not hold each one's read-ahead and tensors, or when the
    output is too small to share."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_worker = read_ahead + TENSOR_COPIES * largest_tensor
    available = _memory_available()
    by_memory = max(1, available // 2 // per_worker) if available else cores
    by_size = max(1, output_bytes // MIN_BYTES_PER_WORKER)
    return int(max(1, min(cores, by_memory, by_size)))


def _memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def split_evenly(sizes: Sequence[int], parts: int) -> list[range]:
    """Consecutive index ranges of ``sizes`` with about equal sums (at most ``parts``, none empty)."""
    total = sum(sizes)
    ranges, start, done = [], 0, 0
    for index, size in enumerate(sizes):
        done += size
        boundary = total * (len(ranges) + 1) / parts
        if done >= boundary and len(ranges) < parts - 1 and index + 1 < len(sizes):
            ranges.append(range(start, index + 1))
            start = index + 1
    ranges.append(range(start, len(sizes)))
    return [part for part in ranges if len(part)]


def write_in_workers(parts: Sequence[Callable[[], Iterator[tuple[str, torch.Tensor]]]],
                     places: Places, *,
                     on_written: Callable[[str, int], None],
                     result: Callable[[], Any] = lambda: None) -> list[Any]:
    """Run each of ``parts`` in a worker of its own, writing what it yields at its place.

    ``on_written(name, nbytes)`` is called in this process for each tensor a worker wrote;
    ``result()`` is called in each worker when its part is done, and its (picklable) value
    returned, in the order of ``parts``. The first error a worker raises is raised here, once
    every worker is stopped.
    """
    context = multiprocessing.get_context("fork")
    workers: list[tuple[multiprocessing.Process, Connection]] = []
    results: dict[int, Any] = {}
    try:
        for number, part in enumerate(parts):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(part, places, sender, result, os.getpid()),
                                      name=f"bridge-ext-convert-{number}", daemon=True)
            process.start()
            sender.close()
            workers.append((process, receiver))
        pending = {receiver: number for number, (_, receiver) in enumerate(workers)}
        while pending:
            for receiver in wait(list(pending)):
                number = pending[receiver]
                try:
                    message = receiver.recv()
                except EOFError:
                    process = workers[number][0]
                    process.join()
                    raise WorkerError(f"conversion worker {number} (pid {process.pid}) ended without a word "
                                      f"(exit code {process.exitcode}: killed by the system, e.g. out of "
                                      "memory?); nothing was installed") from None
                kind = message[0]
                if kind == "written":
                    on_written(message[1], message[2])
                elif kind == "done":
                    results[number] = message[1]
                    del pending[receiver]
                else:  # "error"
                    raise _unpickled(message[1])
    finally:
        for process, receiver in workers:
            if process.is_alive():
                process.kill()
            process.join()
            receiver.close()
    return [results[number] for number in range(len(parts))]


def _worker(part: Callable[[], Iterator[tuple[str, torch.Tensor]]], places: Places,
            sender: Connection, result: Callable[[], Any], parent: int) -> None:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)  # the parent decides; it kills the workers on its way out
    _die_with_parent(parent)
    torch.set_num_threads(1)  # one core per worker; the read-ahead thread shares it while waiting on reads
    try:
        for name, tensor in part():
            fd, offset, spec = places[name]
            write_tensor_at(fd, offset, spec, name, tensor)
            sender.send(("written", name, spec.nbytes))
            del tensor
        sender.send(("done", result()))
    except BaseException as error:  # noqa: BLE001 - every failure goes to the parent, which raises it
        sender.send(("error", _picklable(error)))
    finally:
        sender.close()


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        pass  # not Linux: a killed parent's workers finish their part and exit
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _picklable(error: BaseException) -> bytes:
    """``error`` pickled as it is when it comes back intact, else as a RuntimeError saying what it was."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - an exception type that does not pickle
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))


def _unpickled(data: bytes) -> BaseException:
    return pickle.loads(data)


def base_in_workers(source, reads_from, plan, mode, layout: Sequence[TensorSpec], *,
                    transform: Callable[[str, torch.Tensor], torch.Tensor],
                    workers: int | None, read_ahead: int,
                    on_tensor: Callable[[str, int], None] | None = None,
                    ) -> Callable[[ShardedSafetensorsWriter], dict[str, int]] | None:
    """A ``write_base`` for :func:`bridge_ext.save.write_export` that converts ``plan``'s base
    tasks in ``workers`` processes (None: :func:`default_workers`), or None when one would do.

    ``reads_from`` is the checkpoint source whose ``read_ahead`` each worker uses for its own
    reads (``read_ahead`` bytes shared among the workers). ``transform`` (the value check) runs
    in the workers; each returns the ``non_finite`` counts it found, merged in task order.
    """
    from bridge_ext.engine import convert_tasks
    from bridge_ext.plan import conversion_passes
    from bridge_ext.stream_plan import planned_reads

    tasks = plan.base_tasks
    specs = {spec.name: spec for spec in layout}
    sizes = [sum(specs[name].nbytes for name in task.hf_names if name in specs) or 1 for task in tasks]
    if workers is None:
        workers = default_workers(sum(spec.nbytes for spec in layout), max((s.nbytes for s in layout), default=0),
                                  read_ahead)
    ranges = split_evenly(sizes, min(workers, len(tasks)))
    if len(ranges) <= 1:
        return None
    each = max(MIN_READ_AHEAD, read_ahead // len(ranges))

    def part(indices: range) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
        def produce() -> Iterator[tuple[str, torch.Tensor]]:
            share = dataclasses.replace(plan, base_tasks=[tasks[i] for i in indices])
            with reads_from.read_ahead(planned_reads(source, share, mode, False), max_bytes=each):
                for converter, its_tasks in conversion_passes(source, share, base=mode, adapters=False):
                    for name, tensor in convert_tasks(source, converter, its_tasks):
                        yield name, transform(name, tensor)
        return produce

    def write_base(writer: ShardedSafetensorsWriter) -> dict[str, int]:
        places = writer.open_all()

        def written(name: str, nbytes: int) -> None:
            writer.written_elsewhere(name, nbytes)
            if on_tensor is not None:
                on_tensor(name, nbytes)

        found: dict[str, int] = {}
        for counts in write_in_workers([part(indices) for indices in ranges], places, on_written=written,
                                       result=lambda: getattr(transform, "non_finite", {})):
            found.update(counts)
        if hasattr(transform, "non_finite"):
            transform.non_finite.update(found)
        return found

    return write_base
