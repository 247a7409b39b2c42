"""The RPC call table: calls this side waits on, and the handlers that serve the peer's.

The table owns the state of every call in both directions: the waiters of
outgoing calls by serial, and the registered handlers.  It never writes:
it queues calls and answers in the sans-I/O core and wakes the writer.
Handlers run as tasks in the connection's nursery, so a slow handler holds
up neither the reader nor other calls; the core bounds how many the peer
may have in flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .._connection import Connection
from .._errors import ErrorCode, FrameTooLargeError, RPCError
from .._events import CallFailed, CallReceived, ReplyReceived
from .._frames import Buffer
from ._util import Health

__all__ = ["CallTable", "Handler"]

#: An RPC handler: takes the call body, returns the reply body.
Handler = Callable[[bytes], Awaitable[Buffer]]


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result = b""
        self.error: BaseException | None = None


class CallTable:
    """Outgoing calls and their waiters, registered handlers and the calls they serve."""

    def __init__(self, core: Connection, health: Health, wake_writer: Callable[[], None]) -> None:
        self._core = core
        self._health = health
        self._wake_writer = wake_writer
        self._calls: dict[int, _Call] = {}
        self._handlers: dict[tuple[int, int, int], Handler] = {}
        #: The versions registered for each program, for UNKNOWN_PROCEDURE messages.
        self._versions: dict[int, set[int]] = {}
        #: Where handler tasks run (the connection's nursery), once it is open.
        self.nursery: trio.Nursery | None = None
        self.served = 0

    @property
    def outstanding(self) -> int:
        """Calls this side made that wait for an answer."""
        return len(self._calls)

    def register(self, program: int, procedure: int, handler: Handler, version: int) -> None:
        self._handlers[(program, version, procedure)] = handler
        self._versions.setdefault(program, set()).add(version)

    async def call(self, program: int, procedure: int, body: Buffer, version: int) -> bytes:
        self._health.check()
        serial = self._core.send_call(program, version, procedure, body)
        call = _Call()
        self._calls[serial] = call
        self._wake_writer()
        try:
            await call.done.wait()
        finally:
            if not call.done.is_set():
                del self._calls[serial]
                self._core.cancel_call(serial)
        if call.error is not None:
            raise call.error
        return call.result

    # ------------------------------------------------------------------
    # Called by the dispatcher (the reader task)

    def answered(self, event: ReplyReceived | CallFailed) -> None:
        call = self._calls.pop(event.serial, None)
        if call is None:
            return  # cancelled meanwhile
        if isinstance(event, ReplyReceived):
            call.result = bytes(event.body)
        else:
            call.error = RPCError(event.error_code, event.message)
        call.done.set()

    def called(self, event: CallReceived) -> None:
        handler = self._handlers.get((event.program, event.version, event.procedure))
        if handler is None:
            self._core.send_error(event.serial, ErrorCode.UNKNOWN_PROCEDURE, self._unknown(event))
            self._wake_writer()
            return
        assert self.nursery is not None
        self.nursery.start_soon(self._serve, handler, event.serial, bytes(event.body))

    def fail(self, error: BaseException) -> None:
        """The connection failed: every waiting call raises *error*."""
        for call in self._calls.values():
            call.error = error
            call.done.set()
        self._calls.clear()

    # ------------------------------------------------------------------

    def _unknown(self, call: CallReceived) -> str:
        program = f"program 0x{call.program:08x}"
        versions = self._versions.get(call.program)
        if not versions:
            return f"{program} is not served here"
        if call.version not in versions:
            supported = ", ".join(str(v) for v in sorted(versions))
            return f"{program} version {call.version} is not supported (supported: {supported})"
        return f"{program} version {call.version} has no procedure {call.procedure}"

    async def _serve(self, handler: Handler, serial: int, body: bytes) -> None:
        try:
            reply = await handler(body)
        except RPCError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - the handler's failure goes back to the caller
            code, message = ErrorCode.APPLICATION_ERROR, f"{type(exc).__name__}: {exc}"
        else:
            if not self._health.alive:
                return
            try:
                self._core.send_reply(serial, reply)
            except FrameTooLargeError as exc:
                self._core.send_error(serial, ErrorCode.APPLICATION_ERROR, f"reply too large: {exc}")
            self.served += 1
            self._wake_writer()
            return
        if self._health.alive:
            self._core.send_error(serial, code, message)
            self.served += 1
            self._wake_writer()
