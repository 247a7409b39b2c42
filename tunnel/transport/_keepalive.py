"""PING / PONG: round-trip times for the application, keepalive and the frame timeout.

The watchdog task pings an idle peer and declares it dead after the
keepalive timeout, and drops a peer whose frame stays incomplete for
``frame_timeout``.  It reads the reader's progress (when it last received,
since when a frame is incomplete); the reader never wakes it, which would
cost every read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio

from .._connection import Connection
from .._errors import ErrorCode
from .._events import PongReceived
from ._util import BrokenConnection, Health

__all__ = ["Keepalive", "ReadProgress"]


class ReadProgress(Protocol):
    """What the watchdog reads of the reader."""

    @property
    def last_rx(self) -> float: ...

    @property
    def partial_since(self) -> float | None: ...


class Keepalive:
    """Outstanding pings and the watchdog."""

    def __init__(
        self,
        core: Connection,
        health: Health,
        wake_writer: Callable[[], None],
        fail: Callable[[BaseException], None],
        *,
        interval: float | None,
        timeout: float,
        frame_timeout: float | None,
    ) -> None:
        self._core = core
        self._health = health
        self._wake_writer = wake_writer
        self._fail = fail
        self.interval = interval
        self.timeout = timeout
        self.frame_timeout = frame_timeout
        self._pings = 0
        #: ping() calls waiting, by sequence number (their opaque bytes).
        self._waiters: dict[int, trio.Event] = {}

    @property
    def needed(self) -> bool:
        """Whether the watchdog has anything to watch."""
        return self.interval is not None or self.frame_timeout is not None

    def send_ping(self) -> int:
        """Queue a PING; returns its sequence number, which is also its payload.

        The peer may answer only the newest of several PINGs (protocol.md
        8.1), so a PONG answers every PING up to the one it echoes.
        """
        self._pings += 1
        self._core.ping(self._pings.to_bytes(8, "big"))
        self._wake_writer()
        return self._pings

    async def ping(self) -> float:
        self._health.check()
        waiter = trio.Event()
        seq = self.send_ping()
        self._waiters[seq] = waiter
        start = trio.current_time()
        try:
            await waiter.wait()
        finally:
            self._waiters.pop(seq, None)
        self._health.check()
        return trio.current_time() - start

    def pong(self, event: PongReceived) -> None:
        seq = int.from_bytes(event.opaque, "big")
        for answered in [n for n in self._waiters if n <= seq]:
            self._waiters.pop(answered).set()

    def fail(self) -> None:
        """The connection failed: wake every ping() (which then raises)."""
        for waiter in self._waiters.values():
            waiter.set()

    async def watch(self, reader: ReadProgress) -> None:
        """Keepalive (ping an idle peer, drop a silent one) and the frame timeout; call after the handshake."""
        interval = self.interval
        frame_timeout = self.frame_timeout
        pinged_at = -math.inf
        while self._health.alive:
            now = trio.current_time()
            wake = math.inf
            last_rx = reader.last_rx
            if interval is not None:
                idle = now - last_rx
                if idle >= self.timeout:
                    self._time_out(
                        f"nothing received for {idle:.1f} s",
                        f"keepalive timeout: nothing received from the peer for {idle:.1f} s (timeout {self.timeout} s)",
                    )
                    return
                # <=: a reply that arrives in the same clock tick as the ping still
                # counts (else the loop would spin, sleeping until a past time).
                if idle >= interval and pinged_at <= last_rx:
                    pinged_at = now
                    self.send_ping()
                    wake = last_rx + self.timeout
                elif idle >= interval:
                    # Pinged already, no reply yet: nothing to do until the timeout
                    # (waking at last_rx + interval, a time already past, would spin).
                    wake = last_rx + self.timeout
                else:
                    wake = last_rx + min(interval, self.timeout)
            if frame_timeout is not None:
                since = reader.partial_since
                if since is None:
                    # The reader does not wake this task when a frame begins (it
                    # would cost every read): look again soon enough that a stalled
                    # frame is dropped within 1.25 frame_timeout.
                    wake = min(wake, now + frame_timeout / 4)
                elif now - since >= frame_timeout:
                    self._time_out(
                        f"a frame stayed incomplete for {now - since:.1f} s",
                        f"frame timeout: a frame from the peer stayed incomplete for {now - since:.1f} s (timeout {frame_timeout} s)",
                    )
                    return
                else:
                    wake = min(wake, since + frame_timeout)
            await trio.sleep_until(wake)

    def _time_out(self, reason: str, message: str) -> None:
        self._core.close(ErrorCode.KEEPALIVE_TIMEOUT, reason)
        self._fail(BrokenConnection(message))
