"""Read planned tensors in a background thread while the caller converts and writes earlier ones.

A conversion knows every read it will make before the first one (the plan), so a thread can
read them in that order, a bounded number of bytes ahead. Reading (``preadv``) and checking
(``zlib.crc32``) release the GIL, so on two cores the disk, the checks and the conversion
overlap. The caller takes results in the same order; a read it did not plan for switches the
read-ahead off (the caller then reads itself) rather than guessing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


class ReadAhead:
    """Runs ``read(request)`` for each of ``requests`` in order, at most ``max_bytes`` ahead of :meth:`take`.

    ``nbytes(request)`` is the size a request will hold; one request larger than ``max_bytes``
    is still read, alone. An error raised by a read is raised again by the :meth:`take` of
    that request, so it surfaces where it would have without read-ahead.
    """

    def __init__(self, read: Callable[[Any], torch.Tensor], requests: Sequence[Hashable],
                 nbytes: Callable[[Any], int], max_bytes: int) -> None:
        self._read, self._requests, self._max_bytes = read, list(requests), max_bytes
        self._sizes = [nbytes(request) for request in self._requests]
        self._done: deque[tuple[torch.Tensor | None, BaseException | None]] = deque()
        self._ahead_bytes = 0
        self._next = 0  # index of the next request take() expects
        self._stopped = False
        self._changed = threading.Condition()
        self.misses = 0  # takes that did not match the plan (each one stops the read-ahead)
        self._thread = threading.Thread(target=self._run, name="checkpoint-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for request, size in zip(self._requests, self._sizes):
            with self._changed:
                self._changed.wait_for(lambda: self._stopped or not self._done
                                       or self._ahead_bytes + size <= self._max_bytes)
                if self._stopped:
                    return
                self._ahead_bytes += size
            try:
                outcome = (self._read(request), None)
            except BaseException as error:  # handed to the taker of this request
                outcome = (None, error)
            with self._changed:
                if self._stopped:
                    return
                self._done.append(outcome)
                self._changed.notify_all()

    def take(self, request: Hashable) -> torch.Tensor | None:
        """The result of ``request`` if it is the next planned one; None (and read-ahead stops) otherwise."""
        with self._changed:
            if self._stopped:
                return None
            if self._next >= len(self._requests) or self._requests[self._next] != request:
                self.misses += 1
                self._stop_locked()
                return None
            self._changed.wait_for(lambda: self._done)
            tensor, error = self._done.popleft()
            self._ahead_bytes -= self._sizes[self._next]
            self._next += 1
            self._changed.notify_all()
        if error is not None:
            raise error
        return tensor

    def close(self) -> None:
        """Stop reading and drop what was read ahead (waits for the read in progress)."""
        with self._changed:
            self._stop_locked()
        self._thread.join()

    def _stop_locked(self) -> None:
        self._stopped = True
        self._done.clear()
        self._changed.notify_all()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
