"""Flow-control bookkeeping, pure arithmetic (after h2's ``windows.py``).

A receiver holds one :class:`ReceiveWindow` per stream and one for the
connection.  Bytes count against it when a flow-controlled frame arrives and
are given back to the peer only when the application says it has *taken*
them (:meth:`ReceiveWindow.acknowledge`), in batches of about half a window
so that WINDOW_UPDATE frames stay rare.
"""

from __future__ import annotations

from ._errors import ErrorCode, RemoteProtocolError
from ._frametypes import MAX_WINDOW

__all__ = ["ReceiveWindow", "SendCredit"]


class ReceiveWindow:
    """Credit this side has granted and not yet seen used."""

    __slots__ = ("_granted", "_unacknowledged", "_withheld", "available", "max_window")

    def __init__(self, max_window: int) -> None:
        self.max_window = max_window
        #: Bytes the peer may still send before it must wait for an update.
        self.available = max_window
        self._unacknowledged = 0
        #: Credit lent by request() and not yet taken by the application.
        self._granted = 0
        #: Bytes of a shrunk window still out (granted, in flight or buffered):
        #: kept, not given back, when the application takes them.
        self._withheld = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by the application."""
        return self.max_window + self._granted + self._withheld - self.available - self._unacknowledged

    def resize(self, max_window: int) -> int:
        """Make the window *max_window* from now on; returns the increment to send now, or 0.

        Shrinking takes nothing back: credit the peer holds stays valid.  The
        difference is withheld instead, from the bytes the application takes
        next, so the peer soon holds at most the new window.  Growing first
        cancels what is still withheld, then grants the rest at once.
        """
        if not 0 <= max_window <= MAX_WINDOW:
            raise ValueError(f"window {max_window} is outside 0..2**31-1")
        change = max_window - self.max_window
        self.max_window = max_window
        if change < 0:
            self._withheld -= change
            return 0
        cancelled = min(change, self._withheld)
        self._withheld -= cancelled
        increment = min(change - cancelled, MAX_WINDOW - self.available)
        self.available += increment
        return increment

    def request(self, size: int) -> int:
        """The application waits for data; returns credit to grant now, or 0.

        Only when the peer holds no credit and none is buffered or waiting
        to go back.  With a window above 0 that never lasts (acknowledge()
        returns credit once it runs out), so this serves a window of 0: the
        peer may send *size* bytes for this one request, and those bytes
        are not given back when taken (the next request grants again).
        """
        if size <= 0 or self.available or self._unacknowledged or self.buffered:
            return 0
        return self.lend(size)

    def lend(self, size: int) -> int:
        """Grant *size* more bytes (within 2**31-1) that are not given back when
        taken, as request() does; returns the increment to send."""
        size = max(0, min(size, MAX_WINDOW - self.available))
        self._granted += size
        self.available += size
        return size

    def consume(self, size: int, what: str) -> None:
        """The peer sent *size* flow-controlled bytes."""
        if size > self.available:
            raise RemoteProtocolError(
                f"{what}: peer sent {size} bytes with only {self.available} bytes of credit",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.available -= size

    def acknowledge(self, size: int) -> int:
        """The application took *size* bytes; returns the increment to send now, or 0.

        Credit is returned once at least half a window is waiting, or when the
        peer has no credit left at all (so a window smaller than one frame can
        never deadlock).
        """
        lent = min(size, self._granted)  # request()'s credit is not given back
        self._granted -= lent
        kept = min(size - lent, self._withheld)  # a shrunk window's excess is not given back
        self._withheld -= kept
        self._unacknowledged += size - lent - kept
        if self._unacknowledged and (
            self._unacknowledged * 2 >= self.max_window or self.available == 0
        ):
            increment = self._unacknowledged
            self._unacknowledged = 0
            self.available += increment
            return increment
        return 0


class SendCredit:
    """Credit the peer has granted this side."""

    __slots__ = ("available",)

    def __init__(self, initial: int) -> None:
        self.available = initial

    def grant(self, increment: int, what: str) -> None:
        if self.available + increment > MAX_WINDOW:
            raise RemoteProtocolError(
                f"{what}: window update of {increment} would exceed 2**31-1",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.available += increment
