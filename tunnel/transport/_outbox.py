"""One stream's send side, as the writer sees it.

A stream never writes to the transport.  It hands one piece of work (a
:class:`Work`: the caller's buffer, one record, or a file descriptor staged
through a kernel pipe) to its :class:`Outbox`, asks the writer to schedule
the outbox, and waits until the work is done.  The writer task then calls
:meth:`Outbox.queue_frame` (or :meth:`Outbox.next_splice`) once per round
to put the next frame of that work into the core, within the stream's
credit and bandwidth.  So a stream holds at most one caller buffer, nothing
is queued behind it, and the statistics of what went out live here.

Ownership.  The buffer in a :class:`Work` stays the caller's: the writer
only reads slices of it until ``done`` is set.  A kernel pipe stays
``send_fd``'s, except while the writer splices from it: if ``send_fd``
returns meanwhile it marks the work ``abandoned`` and the writer closes
the pipe when its splice ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .._connection import Connection
from .._records import Record
from ._ratelimit import RateLimit
from ._splice import PipeSource
from ._util import Signal

__all__ = ["BLOCKED", "FINISHED", "SENT", "Outbox", "Work"]

#: queue_frame(): no credit (or the work is gone); a frame was queued; the work's last frame was queued.
BLOCKED, SENT, FINISHED = 0, 1, 2


class Work:
    """The one piece of work a stream has handed to the writer.

    Either a caller's buffer (*data*), one typed *record* of *size*
    flow-controlled bytes, or a *source* file descriptor staged through a
    kernel pipe (``send_fd``).
    """

    __slots__ = ("abandoned", "data", "done", "drained", "error", "record", "size", "source", "wait_scope", "writing")

    def __init__(
        self, data: memoryview | None, record: Record | None = None, size: int = 0, source: PipeSource | None = None
    ) -> None:
        self.data = data
        self.record = record
        self.size = size
        self.source = source
        #: ``send_fd`` returned while the writer was splicing: the pipe is the
        #: writer's now, which closes it once that splice ends, however it ends.
        self.abandoned = False
        self.writing = False
        self.drained = Signal()
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.wait_scope: trio.CancelScope | None = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()
        self.drained.fire()
        if self.wait_scope is not None:
            self.wait_scope.cancel()


class Outbox:
    """A stream's send side: the work in hand, its pacing, and what it has sent."""

    __slots__ = (
        "_blocked_since",
        "_schedule",
        "blocked_total",
        "bytes_sent",
        "bytes_spliced",
        "credit",
        "frames_sent",
        "rate",
        "stream_id",
        "work",
    )

    def __init__(self, stream_id: int, schedule: Callable[[Outbox], None], bandwidth: int = 0) -> None:
        self.stream_id = stream_id
        self._schedule = schedule
        self.rate = RateLimit(bandwidth)
        #: The work handed over and not yet done.
        self.work: Work | None = None
        #: Fired when the peer grants credit or the stream fails.
        self.credit = Signal()
        self.frames_sent = 0
        #: Payload bytes sent (what statistics report once the core forgets the stream).
        self.bytes_sent = 0
        self.bytes_spliced = 0
        self.blocked_total = 0.0
        self._blocked_since: float | None = None

    # ------------------------------------------------------------------
    # The stream's side

    def hand_over(self, work: Work) -> None:
        self.work = work
        self._schedule(self)

    def take_back(self, work: Work) -> None:
        """The stream no longer waits for *work* (it returned, or was cancelled)."""
        if self.work is work:
            self.work = None

    def schedule(self) -> None:
        """Ask the writer to look at this outbox again (new data in a pipe, a new rate)."""
        self._schedule(self)

    def fail(self, error: BaseException) -> None:
        """The stream failed or closed: the work in hand (if any) fails with *error*."""
        work, self.work = self.work, None
        if work is not None:
            work.fail(error)
        self.credit.fire()

    def blocked_seconds(self, now: float) -> float:
        if self._blocked_since is None:
            return self.blocked_total
        return self.blocked_total + now - self._blocked_since

    # ------------------------------------------------------------------
    # The writer's side

    def _blocked(self, now: float) -> None:
        if self._blocked_since is None:
            self._blocked_since = now

    def _unblocked(self, now: float) -> None:
        if self._blocked_since is not None:
            self.blocked_total += now - self._blocked_since
            self._blocked_since = None

    def _sent(self, size: int, now: float) -> None:
        self._unblocked(now)
        self.rate.spend(size, now)
        self.frames_sent += 1
        self.bytes_sent += size

    def queue_frame(self, core: Connection, window: int, now: float, chunk_size: int) -> int:
        """Queue the next frame of the work (buffer or record) in *core*: BLOCKED, SENT or FINISHED.

        An invalid record raises LocalProtocolError from the core, with nothing queued.
        """
        work = self.work
        assert work is not None and work.source is None
        if work.record is not None:
            size = work.size
            if window < size:
                self._blocked(now)
                return BLOCKED
            core.send_record(self.stream_id, work.record)
            finished = True
        else:
            assert work.data is not None
            if window <= 0:
                self._blocked(now)
                return BLOCKED
            size = min(len(work.data), window, self.rate.chunk(chunk_size))
            core.send_data(self.stream_id, work.data[:size])
            work.data = work.data[size:]
            finished = not work.data
        self._sent(size, now)
        if finished:
            self.work = None
            return FINISHED
        return SENT

    def fail_work(self, error: BaseException) -> None:
        """The work cannot be sent (an invalid record): that send fails, the stream goes on."""
        work, self.work = self.work, None
        if work is not None:
            work.fail(error)

    def next_splice(self, core: Connection, window: int, now: float, chunk_size: int) -> tuple[bytes, int, int] | int:
        """Header, pipe fd and size of the next DATA frame to splice from the work's pipe,
        or BLOCKED (no credit), or FINISHED (the pipe is empty: ``send_fd``'s task is
        woken to wait for its source, and schedules the outbox again when it has more).
        """
        work = self.work
        assert work is not None and work.source is not None
        source = work.source
        pipe = source.pipe
        if window > 0:
            source.fill()  # top up first: the frame carries all the source has ready
        if pipe.level == 0 or source.error is not None:
            work.drained.fire()  # send_fd's task waits for the source (or ends, or raises)
            return FINISHED
        if window <= 0:
            self._blocked(now)
            return BLOCKED
        size = min(pipe.level, window, self.rate.chunk(chunk_size))
        return core.prepare_external_data(self.stream_id, size), pipe.read_fd, size

    def spliced(self, work: Work, size: int, now: float) -> None:
        """*size* bytes went from *work*'s pipe into the transport."""
        assert work.source is not None
        work.source.pipe.level -= size
        self.bytes_spliced += size
        self._sent(size, now)
