"""Concurrent requests decoded together: a bounded queue, one decode thread, continuous batching.

The decode thread keeps one batch (a ``GuardedLM.stream_requests`` stream) running while there
are requests: a new request joins it at the next step, each row with its own options, gate and
stops, up to ``max_batch`` rows; a request that cannot join (``guard`` differs from the batch's)
waits until the batch drains, and nothing behind it overtakes it. A fresh batch waits
``join_window_s`` for more requests, so that requests arriving together share one prefill.
Every row's records go to its request's :class:`Submission`, an async iterator on the server's
event loop, and its Generation as soon as the row ends. A submission cancelled by its client (a
disconnect) cancels its own rows at the next step; the other rows decode on.

At most ``max_batch`` rows decode and ``max_queue`` more wait; :meth:`Scheduler.submit` refuses
the next request (:class:`QueueFullError`, a 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from ..errors import NGSDError
from ..guarded import BatchStream, GenerationRequest, GuardedLM
from ..records import Generation, StepRecord

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
        self._cancelled = 0
        self._tokens = 0
        self._decoding = False
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
        """Now: rows decoding and waiting, whether a batch is open. So far: batches started,
        the most rows one held at once, rows cancelled by their clients, tokens decoded."""
        with self._condition:
            return {
                "active": self._active,
                "waiting": len(self._waiting),
                "batches": self._batches,
                "largest_batch": self._largest_batch,
                "cancelled": self._cancelled,
                "tokens": self._tokens,
                "decoding": int(self._decoding),
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
                self._decoding = True
                try:
                    self._decode(batch)
                finally:
                    self._decoding = False

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
            head = next((row for row in self._waiting if not row.cancelled), None)
            guard = _guard(head.request) if head is not None else True
            batch = self._take(self.max_batch, guard)
            self._batches += bool(batch)
            return batch

    def _take(self, room: int, guard: bool) -> list[_Row]:
        """Pop live rows from the head of the queue while they can join a batch decoding
        with ``guard``, up to ``room`` (call holding the condition)."""
        taken: list[_Row] = []
        while self._waiting and len(taken) < room:
            row = self._waiting[0]
            if not row.cancelled and _guard(row.request) != guard:
                break
            self._waiting.popleft()
            if not row.cancelled:
                taken.append(row)
        self._active += len(taken)
        return taken

    def _decode(self, batch: Sequence[_Row]) -> None:
        """The one place the scheduler drives the engine: one stream, kept running while
        requests can join it; each row's records and result to its submission."""
        live: dict[int, _Row] = {}
        stream: BatchStream | None = None
        guard = _guard(batch[0].request)
        for row in batch:
            stream = self._join(stream, row, live)
        if stream is None:
            return
        try:
            for record in stream:
                self._tokens += 1
                row = live.get(record.row)
                if row is not None:
                    row.deliver(record)
                    if record.finish_reason is not None:
                        row.deliver(stream.generation(record.row))
                        self._leave(live, record.row)
                for number in [n for n, r in live.items() if r.cancelled]:
                    stream.cancel(number)
                    self._leave(live, number)
                    with self._condition:
                        self._cancelled += 1
                if self._stopping:
                    stream.close()
                    raise SchedulerStoppedError("the server is shutting down")
                with self._condition:
                    joining = self._take(self.max_batch - len(live), guard)
                for row in joining:
                    self._join(stream, row, live)
            for number, row in list(live.items()):  # rows that ended without a last record
                row.deliver(stream.generation(number))
                self._leave(live, number)
        except Exception as error:
            if not isinstance(error, SchedulerStoppedError):
                logger.exception("a batch of %d rows failed", len(live))
            for number, row in list(live.items()):
                row.deliver(error)
                self._leave(live, number)

    def _join(
        self, stream: BatchStream | None, row: _Row, live: dict[int, _Row]
    ) -> BatchStream | None:
        """Start the stream with ``row``, or add ``row`` to it; a request the engine refuses
        (a bad option, a prompt too long) gets its error and leaves."""
        try:
            if stream is None:
                stream, number = self.lm.stream_requests([row.request]), 0
            else:
                number = stream.add(row.request)
        except NGSDError as error:
            row.deliver(error)
            with self._condition:
                self._active -= 1
            return stream
        live[number] = row
        with self._condition:
            self._largest_batch = max(self._largest_batch, len(live))
        return stream

    def _leave(self, live: dict[int, _Row], number: int) -> None:
        del live[number]
        with self._condition:
            self._active -= 1


def _guard(request: GenerationRequest) -> bool:
    """Whether a request decodes guarded: rows of one batch must agree."""
    return bool(request.options.get("guard", True))
