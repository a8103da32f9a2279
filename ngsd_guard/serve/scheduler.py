"""Concurrent requests decoded together: a bounded queue, one decode thread, a queue per request.

Requests that arrive while the decode thread is busy, or within ``join_window_s`` of the first
one, are decoded together in one batch of up to ``max_batch`` rows (per-row gates, stops and
options: the engine's batched API). The thread hands every row's records to that row's
:class:`Submission`, an async iterator on the server's event loop. A submission cancelled by
its client (a disconnect) ends its own rows at the next token; the other rows decode on.

At most ``max_batch`` requests decode and ``max_queue`` more wait; :meth:`Scheduler.submit`
refuses the next one (:class:`QueueFullError`, a 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from ..guarded import GuardedLM
from ..records import Generation, StepRecord
from .engine import GenerationRequest, joinable, stream_requests

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Every row is busy and the queue is full: retry later."""


class SchedulerStoppedError(Exception):
    """The server is shutting down."""


class Submission:
    """The rows of one request (one per choice) in the scheduler.

    ``async for index, item in submission`` yields ``(choice index, StepRecord)`` pairs and, as
    each row ends, ``(choice index, Generation)``; it stops when every row has ended and raises
    the error of a failed batch. ``cancel()`` ends these rows and no others.
    """

    def __init__(
        self, requests: Sequence[GenerationRequest], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.rows = [_Row(self, index, request) for index, request in enumerate(requests)]
        self.arrived = time.monotonic()
        self.cancelled = threading.Event()
        self._loop = loop
        self._items: asyncio.Queue[tuple[int, StepRecord | Generation | BaseException]] = (
            asyncio.Queue()
        )
        self._open = len(self.rows)

    def deliver(self, index: int, item: StepRecord | Generation | BaseException) -> None:
        """Hand a record, a row's generation or an error to the client (from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (index, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def __aiter__(self) -> Submission:
        return self

    async def __anext__(self) -> tuple[int, StepRecord | Generation]:
        if not self._open:
            raise StopAsyncIteration
        index, item = await self._items.get()
        if isinstance(item, BaseException):
            self._open = 0
            raise item
        if isinstance(item, Generation):
            self._open -= 1
        return index, item


class _Row:
    """One row of a submission, as the decode thread sees it."""

    def __init__(self, submission: Submission, index: int, request: GenerationRequest) -> None:
        self.submission, self.index, self.request = submission, index, request

    @property
    def cancelled(self) -> bool:
        return self.submission.cancelled.is_set()

    def deliver(self, item: StepRecord | Generation | BaseException) -> None:
        self.submission.deliver(self.index, item)


class Scheduler:
    """Batches concurrent requests onto one ``GuardedLM``; see the module docstring.

    ``start()`` launches the decode thread, ``stop()`` ends it (waiting requests get a
    :class:`SchedulerStoppedError`).
    """

    def __init__(
        self, lm: GuardedLM, *, max_batch: int, max_queue: int, join_window_s: float
    ) -> None:
        self.lm = lm
        self.max_batch, self.max_queue, self.join_window_s = max_batch, max_queue, join_window_s
        self._waiting: deque[_Row] = deque()
        self._active = 0
        self._batches = 0
        self._largest_batch = 0
        self._stopping = False
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- event-loop side
    def submit(self, requests: Sequence[GenerationRequest]) -> Submission:
        """Queue one request's rows for the next batch (call on the event loop that reads
        the submission).

        Raises:
            QueueFullError: not enough room for all of them.
            SchedulerStoppedError: the server is shutting down.
        """
        submission = Submission(requests, asyncio.get_running_loop())
        with self._condition:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down")
            taken = self._active + len(self._waiting)
            if taken + len(requests) > self.max_batch + self.max_queue:
                raise QueueFullError(
                    f"all {self.max_batch} rows are busy and {len(self._waiting)} requests "
                    "are waiting; retry later"
                )
            self._waiting.extend(submission.rows)
            self._condition.notify()
        return submission

    @property
    def ready(self) -> bool:
        """Decoding and able to take one more request."""
        with self._condition:
            room = self._active + len(self._waiting) < self.max_batch + self.max_queue
        return room and self.alive

    @property
    def alive(self) -> bool:
        """The decode thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def load(self) -> dict[str, int]:
        """Rows decoding and waiting now; batches decoded so far and the largest one."""
        with self._condition:
            return {
                "active": self._active,
                "waiting": len(self._waiting),
                "batches": self._batches,
                "largest_batch": self._largest_batch,
            }

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ngsd-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._condition:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._condition.notify_all()
        for row in waiting:
            row.deliver(SchedulerStoppedError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- decode thread
    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:  # empty when every waiting request was cancelled
                self._decode(batch)

    def _next_batch(self) -> list[_Row] | None:
        """Wait for a request, then up to ``join_window_s`` for more; take up to ``max_batch``."""
        with self._condition:
            while not self._stopping and not self._waiting:
                self._condition.wait()
            first = self._waiting[0].submission.arrived if self._waiting else 0.0
            deadline = first + self.join_window_s
            while not self._stopping and len(self._waiting) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            if self._stopping:
                return None
            batch = self._take(self.max_batch)
            self._active += len(batch)
            self._batches += bool(batch)
            self._largest_batch = max(self._largest_batch, len(batch))
            return batch

    def _take(self, room: int) -> list[_Row]:
        """Pop up to ``room`` live rows that can share a batch with the first one."""
        batch: list[_Row] = []
        kept: deque[_Row] = deque()
        while self._waiting:
            row = self._waiting.popleft()
            if row.cancelled:
                continue
            if len(batch) < room and (not batch or joinable(batch[0].request, row.request)):
                batch.append(row)
            else:
                kept.append(row)
        self._waiting = kept
        return batch

    def _decode(self, rows: Sequence[_Row]) -> None:
        """The one place the scheduler drives the engine: one batch, each row's records to its
        submission; a cancelled submission's rows are cancelled at the next record."""
        cancelled: set[int] = set()
        try:
            stream = stream_requests(self.lm, [row.request for row in rows])
            for record in stream:
                rows[record.row].deliver(record)
                for number, row in enumerate(rows):
                    if number not in cancelled and row.cancelled:
                        cancelled.add(number)
                        stream.cancel(number)
                if self._stopping:
                    stream.close()
                    raise SchedulerStoppedError("the server is shutting down")
            for row, generation in zip(rows, stream.generations, strict=True):
                row.deliver(generation)
        except Exception as error:
            if not isinstance(error, SchedulerStoppedError):
                logger.exception("a batch of %d rows failed", len(rows))
            for row in rows:
                row.deliver(error)
        finally:
            with self._condition:
                self._active -= len(rows)
