"""A QMP (QEMU Machine Protocol) client on trio.

Theory of operation.  QMP is newline-delimited JSON over a unix socket:
QEMU greets with ``{"QMP": ...}``, the client sends ``qmp_capabilities``, then
commands ``{"execute": ..., "arguments": ..., "id": ...}`` each get exactly one
``{"return": ...}`` or ``{"error": ...}`` echoing the ``id``, and
asynchronous ``{"event": ...}`` messages arrive in between at any time.

There is no background reader task, so a client needs no nursery and cannot
leak one.  Instead, whichever task is waiting for something (a reply or an
event) takes the receive lock, reads *one* message, files it (replies by id
into ``_replies``, events into a bounded deque) and releases the lock.  The
lock is fair, so every waiting task gets its turn, finds its reply already
filed by someone else or reads the next message itself.  Replies to requests
whose caller was cancelled are dropped on arrival.

Bounds: a line longer than ``max_line`` bytes is an error (the connection is
closed; memory does not follow a runaway peer), and at most ``max_events``
events are kept: when nobody consumes them, the oldest are dropped and
counted in ``dropped_events``.
"""

from __future__ import annotations

import array
import itertools
import json
import socket
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import trio

from ._errors import QMPConnectionClosed, QMPError

__all__ = ["MAX_EVENTS", "MAX_LINE", "QMPClient", "QMPEvent"]

#: Longest QMP line accepted (QEMU's largest replies, e.g. query-qmp-schema, are ~200 KiB).
MAX_LINE = 16 * 1024 * 1024
#: Events kept for wait_event / iteration before the oldest are dropped.
MAX_EVENTS = 1024
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class QMPEvent:
    """One asynchronous QMP event (``STOP``, ``RESUME``, ``MIGRATION``, ...)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    #: QEMU's timestamp, seconds since the epoch.
    timestamp: float = 0.0


class QMPClient:
    """A connected QMP monitor; create with :meth:`connect`.

    Several tasks may call :meth:`execute` concurrently.  Events are kept
    from the moment of connection; :meth:`wait_event` and iteration consume
    them in arrival order.
    """

    def __init__(self, sock: trio.socket.SocketType, *, max_line: int = MAX_LINE, max_events: int = MAX_EVENTS) -> None:
        self._sock = sock
        self._max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline, so a long line is scanned once
        self._ids = itertools.count(1)
        # id -> reply, None while awaited; only ids in here are filed when they arrive.
        self._replies: dict[int, dict[str, Any] | None] = {}
        self._events: deque[QMPEvent] = deque(maxlen=max_events)
        self._receive_lock = trio.Lock()
        self._send_lock = trio.Lock()
        self._closed: QMPConnectionClosed | None = None
        self.greeting: Mapping[str, Any] | None = None
        #: Events dropped because the buffer was full.
        self.dropped_events = 0

    # ------------------------------------------------------------------ setup

    @classmethod
    async def connect(cls, path: str, *, max_line: int = MAX_LINE, max_events: int = MAX_EVENTS) -> QMPClient:
        """Connect to QEMU's QMP unix socket, read the greeting, enter command mode."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except OSError as exc:
            sock.close()
            raise QMPConnectionClosed(f"cannot connect to QMP socket {path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        client = cls(sock, max_line=max_line, max_events=max_events)
        try:
            await client._pump(lambda: client.greeting is not None)
            await client.execute("qmp_capabilities")
        except BaseException:
            client._close("QMP connection closed during setup")
            raise
        return client

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's (major, minor, micro) from the greeting."""
        assert self.greeting is not None
        qemu = self.greeting.get("version", {}).get("qemu", {})
        return (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # --------------------------------------------------------------- commands

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run *command*; return its ``return`` value or raise :class:`QMPError`."""
        return await self._execute(command, arguments, fd=None)

    async def send_fd(self, name: str, fd: int) -> None:
        """Pass *fd* to QEMU under *name* (QMP ``getfd`` with SCM_RIGHTS).

        QEMU receives its own duplicate; the caller still owns *fd* and may
        close it once this returns.  A later ``getfd`` with the same name
        replaces the earlier descriptor.
        """
        await self._execute("getfd", {"fdname": name}, fd=fd)

    async def _execute(self, command: str, arguments: Mapping[str, Any] | None, *, fd: int | None) -> Any:
        self._check_open(command)
        request_id = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self._replies[request_id] = None
        try:
            await self._send(data, fd, command)
            await self._pump(lambda: self._replies[request_id] is not None, command)
            reply = self._replies[request_id]
        finally:
            # Also on cancellation: a late reply to this id is then dropped on arrival.
            del self._replies[request_id]
        assert reply is not None
        if "error" in reply:
            error = reply["error"]
            raise QMPError(str(error.get("desc", "")), error_class=str(error.get("class", "GenericError")), command=command)
        return reply.get("return")

    async def _send(self, data: bytes, fd: int | None, command: str) -> None:
        async with self._send_lock:
            self._check_open(command)
            view = memoryview(data)
            try:
                if fd is not None:
                    # The descriptor rides on the first byte(s) of the getfd command itself,
                    # which is where QEMU's monitor looks for it.
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
                    sent = await self._sock.sendmsg([view], ancillary)
                    view = view[sent:]
                while view:
                    sent = await self._sock.send(view)
                    view = view[sent:]
            except (OSError, trio.ClosedResourceError) as exc:
                self._close(f"QMP connection lost while sending: {exc}")
                raise QMPConnectionClosed(f"QMP connection lost while sending: {exc}", command=command) from exc
            except BaseException:
                if len(view) not in (0, len(data)):
                    # Half a command is on the wire; nothing sensible can follow it.
                    self._close("QMP send interrupted mid-command")
                raise

    # ----------------------------------------------------------------- events

    async def wait_event(self, name: str, *, timeout: float | None = None) -> QMPEvent:
        """Take the oldest buffered event called *name*, waiting for one if needed.

        Raises ``trio.TooSlowError`` after *timeout* seconds, and
        :class:`QMPConnectionClosed` if QEMU goes away first.
        """
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            await self._pump(lambda: any(event.name == name for event in self._events), f"wait_event({name})")
        for event in self._events:
            if event.name == name:
                self._events.remove(event)
                return event
        raise AssertionError("unreachable: the event was just found")  # pragma: no cover

    async def next_event(self, *, timeout: float | None = None) -> QMPEvent:
        """Take the oldest buffered event of any name, waiting for one if needed."""
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            await self._pump(lambda: bool(self._events), "next_event")
        return self._events.popleft()

    def buffered_events(self) -> list[QMPEvent]:
        """The events received and not yet consumed, oldest first (not removed)."""
        return list(self._events)

    def clear_events(self) -> None:
        self._events.clear()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> QMPEvent:
        """Iterate over events until the connection closes."""
        try:
            return await self.next_event()
        except QMPConnectionClosed:
            raise StopAsyncIteration from None

    # ---------------------------------------------------------------- reading

    async def _pump(self, done: Callable[[], bool], command: str | None = None) -> None:
        """Read and file messages until *done()*; see the module docstring."""
        while not done():
            if self._closed is not None:
                raise QMPConnectionClosed(self._closed.desc, command=command)
            async with self._receive_lock:
                if done() or self._closed is not None:
                    continue
                message = await self._read_message()
                self._file(message)
        await trio.lowlevel.checkpoint()

    async def _read_message(self) -> dict[str, Any]:
        while True:
            newline = self._buf.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                self._scanned = 0
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    self._close("malformed QMP message")
                    raise QMPError(f"malformed QMP message: {exc}", error_class="ProtocolError") from exc
                if not isinstance(message, dict):
                    self._close("malformed QMP message")
                    raise QMPError("QMP message is not a JSON object", error_class="ProtocolError")
                return message
            self._scanned = len(self._buf)
            if len(self._buf) > self._max_line:
                self._close("QMP line too long")
                raise QMPError(f"QMP line longer than {self._max_line} bytes", error_class="ProtocolError")
            try:
                data = await self._sock.recv(_READ_SIZE)
            except (OSError, trio.ClosedResourceError) as exc:
                self._close(f"QMP connection lost: {exc}")
                raise QMPConnectionClosed(f"QMP connection lost: {exc}") from exc
            if not data:
                self._close("QMP connection closed by QEMU")
                raise QMPConnectionClosed("QMP connection closed by QEMU")
            self._buf += data

    def _file(self, message: dict[str, Any]) -> None:
        if "event" in message:
            stamp = message.get("timestamp") or {}
            timestamp = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
            if len(self._events) == self._events.maxlen:
                self.dropped_events += 1
            self._events.append(QMPEvent(name=str(message["event"]), data=message.get("data") or {}, timestamp=timestamp))
        elif "QMP" in message:
            self.greeting = message["QMP"]
        else:
            request_id = message.get("id")
            if isinstance(request_id, int) and request_id in self._replies:
                self._replies[request_id] = message

    # ---------------------------------------------------------------- closing

    def _check_open(self, command: str | None) -> None:
        if self._closed is not None:
            raise QMPConnectionClosed(self._closed.desc, command=command)

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = QMPConnectionClosed(reason)
        # trio's close() wakes tasks blocked on the socket with ClosedResourceError.
        self._sock.close()

    async def aclose(self) -> None:
        """Close the socket; pending and later calls raise :class:`QMPConnectionClosed`."""
        self._close("QMP connection closed locally")
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
