"""Small trio helpers shared by the transport modules."""

from __future__ import annotations

import trio

from .._errors import ConnectionLost, StreamAborted

__all__ = ["BrokenConnection", "BrokenStream", "ConflictGuard", "Health", "Signal", "aborted"]


class BrokenStream(StreamAborted, trio.BrokenResourceError):
    """:class:`tunnel.StreamAborted` that trio code also sees as a broken resource."""


class BrokenConnection(ConnectionLost, trio.BrokenResourceError):
    """:class:`tunnel.ConnectionLost` that trio code also sees as a broken resource."""


def aborted(error_code: int, reason: str, *, remote: bool) -> BrokenStream:
    return BrokenStream(error_code, reason, remote=remote)


class Signal:
    """A level-less wakeup: ``wait`` returns after the next ``fire``."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class ConflictGuard:
    """Raises ``trio.BusyResourceError`` when two tasks use one side at once."""

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._busy = False
        self._message = message

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(self._message)
        self._busy = True

    def __exit__(self, *exc: object) -> None:
        self._busy = False



class Health:
    """Whether the connection still works: the first failure, which every part reports from then on.

    Owned by the connection (only :meth:`TunnelConnection._fail` sets it);
    the reader, writer, RPC table and streams read it.
    """

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.error is None

    def check(self) -> None:
        if self.error is not None:
            raise self.error
