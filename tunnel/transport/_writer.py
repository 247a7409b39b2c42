"""The writer task: the only one that writes to the transport.

Each round it first drains what the core has queued (RPC, window updates,
pongs, opens, ends, aborts) and only then writes one data frame, taken
round-robin from the outboxes that have work, credit and bandwidth budget.
So control traffic waits behind at most one data frame, and N busy streams
get equal shares.  It wakes when kicked (anything queued output or work)
or when a rate-limited outbox may send again; it checkpoints once per data
frame whatever the socket did, so it never hogs the loop.

What it owns: the :class:`BufferWriter` over the transport, the rotation of
scheduled outboxes, and the count of answers to the peer being written now
(``writing_control``), which the reader adds to the core's own count to
bound what it owes the peer.
"""

from __future__ import annotations

import math
from collections import deque

import trio

from .._connection import Connection
from .._errors import LocalProtocolError
from .._frames import Buffer
from ._io import BufferWriter
from ._outbox import BLOCKED, FINISHED, Outbox
from ._util import Health

__all__ = ["CLOSE_TIMEOUT", "Writer"]

#: How long the last flush (a GOODBYE) may take on close.
CLOSE_TIMEOUT = 5.0


class Writer:
    """Serializes all output: the core's queue first, then one data frame per round."""

    def __init__(self, core: Connection, out: BufferWriter, health: Health, chunk_size: int) -> None:
        self._core = core
        self._out = out
        self._health = health
        #: Largest DATA frame payload to write (lowered to the peer's maximum after the handshake).
        self.chunk_size = chunk_size
        self._kicked = trio.Event()
        self._rotation: deque[Outbox] = deque()
        self.frames_sent = 0
        #: Answers to the peer in the batch being written now.
        self.writing_control = 0
        #: Set when a write finishes, for a reader paused on what it owes the peer.
        self._drained: trio.Event | None = None

    @property
    def bytes_written(self) -> int:
        return self._out.written

    def kick(self) -> None:
        """Something was queued in the core or handed over: look again."""
        self._kicked.set()

    def schedule(self, outbox: Outbox) -> None:
        if outbox not in self._rotation:
            self._rotation.append(outbox)
        self._kicked.set()

    async def wait_drained(self) -> None:
        """Wait until the writer has written some of what the core owes the peer (or the connection failed)."""
        drained = self._drained = trio.Event()
        self._kicked.set()
        if self._health.alive:
            await drained.wait()
        else:
            await trio.lowlevel.checkpoint()

    def wake_all(self) -> None:
        """The connection failed: release a reader waiting in :meth:`wait_drained`, and the writer itself."""
        if self._drained is not None:
            self._drained.set()
        self._kicked.set()

    async def run(self) -> None:
        """Write until the connection fails, then flush what the core queued last (a GOODBYE).

        Transport errors propagate to the caller, which owns the transport and closes it.
        """
        while self._health.alive:
            if self._kicked.is_set():
                self._kicked = trio.Event()  # kicks from here on wake the wait below
            deadline = await self._round()
            if deadline is None:
                continue
            if deadline == math.inf:  # nothing to do until kicked: no timeout scope needed
                await self._kicked.wait()
            else:
                with trio.move_on_at(deadline):
                    await self._kicked.wait()
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            buffers = self._take_output()
            if buffers:
                await self._out.write(buffers)

    async def _round(self) -> float | None:
        """Write one batch; returns None if it did, else when to look again."""
        buffers = self._take_output()
        if buffers:
            self.frames_sent += 1
            await self._out.write(buffers)
            self._wrote()
            return None
        now = trio.current_time()
        deadline = math.inf
        rotation = self._rotation
        for _ in range(len(rotation)):
            outbox = rotation[0]
            rotation.rotate(-1)
            work = outbox.work
            if work is None:
                rotation.remove(outbox)
                continue
            ready_at = outbox.rate.ready_at(now)
            if ready_at > now:
                deadline = min(deadline, ready_at)
                continue
            window = self._core.send_window(outbox.stream_id)
            if work.source is not None:
                frame = outbox.next_splice(self._core, window, now, self.chunk_size)
                if frame == FINISHED:
                    rotation.remove(outbox)
                if isinstance(frame, int):
                    continue
                await self._splice(outbox, frame, now)
                await trio.lowlevel.checkpoint()  # one per data frame, whatever the socket did
                return None
            try:
                result = outbox.queue_frame(self._core, window, now, self.chunk_size)
            except LocalProtocolError as exc:  # an invalid record fails its send, not the connection
                rotation.remove(outbox)
                outbox.fail_work(exc)
                return None
            if result == BLOCKED:
                continue
            if result == FINISHED:
                rotation.remove(outbox)
            self.frames_sent += 1
            await self._out.write(self._take_output())
            self._wrote()
            if result == FINISHED:
                work.done.set()
            await trio.lowlevel.checkpoint()  # one per data frame, whatever the socket did
            return None
        return deadline

    async def _splice(self, outbox: Outbox, frame: tuple[bytes, int, int], now: float) -> None:
        """One DATA frame whose payload goes from the outbox's pipe into the socket."""
        work = outbox.work
        assert work is not None and work.source is not None
        head, pipe_fd, size = frame
        work.writing = True
        try:
            await self._out.write_spliced(head, pipe_fd, size)
        finally:
            work.writing = False
            if work.abandoned:
                # send_fd returned during the splice and handed the pipe to us:
                # close it on every path (a broken socket, a cancel) or it leaks.
                work.source.pipe.close()
        outbox.spliced(work, size, now)
        self.frames_sent += 1

    def _take_output(self) -> list[Buffer]:
        """What the core queued; its answers to the peer count as being written until _wrote()."""
        self.writing_control = self._core.pending_control_bytes
        return self._core.data_to_send()

    def _wrote(self) -> None:
        self.writing_control = 0
        if self._drained is not None:
            self._drained.set()
            self._drained = None
