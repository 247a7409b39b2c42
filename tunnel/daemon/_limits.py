"""How many connections the daemon serves at once, as libvirtd does.

A connection is *anonymous* from accept until its TLS and tunnel
handshakes are done, then *authenticated*.  Both kinds count towards
``max_clients``; anonymous ones also towards ``max_anonymous_clients``, so
peers that connect and never finish the handshake can hold only a few
slots, each for at most the handshake timeouts, while authenticated
clients keep being served.  A connection over either limit is closed at
once, without a byte read.

The defaults are libvirtd's (``max_clients = 5000``,
``max_anonymous_clients = 20``): an idle connection costs this daemon about
40 KiB, so 5000 of them cost ~200 MB, and 20 handshakes at a time is
plenty for clients that complete theirs in milliseconds.  The process
needs a file limit (``ulimit -n``) above ``max_clients``.
"""

from __future__ import annotations

from typing import Self

__all__ = ["ConnectionLimits", "Slot"]

#: Refusals are logged at most this often (seconds), with a count of those not logged.
_LOG_EVERY = 10.0


class Slot:
    """One admitted connection's place; release it when the connection ends (``with``)."""

    __slots__ = ("_limits", "anonymous", "released")

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self.anonymous = True
        self.released = False

    def authenticated(self) -> None:
        """The handshakes are done: the connection no longer counts as anonymous."""
        if self.anonymous and not self.released:
            self.anonymous = False
            self._limits.anonymous -= 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._limits.clients -= 1
        if self.anonymous:
            self._limits.anonymous -= 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ConnectionLimits:
    def __init__(self, *, max_clients: int = 5000, max_anonymous_clients: int = 20) -> None:
        if max_clients < 1 or max_anonymous_clients < 1:
            raise ValueError("max_clients and max_anonymous_clients must be at least 1")
        self.max_clients = max_clients
        self.max_anonymous_clients = min(max_anonymous_clients, max_clients)
        #: Connections admitted and not yet released; of those, still anonymous.
        self.clients = 0
        self.anonymous = 0
        #: Connections refused since the daemon started.
        self.refused = 0
        self._logged_at = -float("inf")
        self._unlogged = 0

    def admit(self) -> Slot | None:
        """A slot for a connection just accepted, or None to refuse it."""
        if self.clients >= self.max_clients or self.anonymous >= self.max_anonymous_clients:
            self.refused += 1
            return None
        self.clients += 1
        self.anonymous += 1
        return Slot(self)

    def refusal_message(self, now: float) -> str | None:
        """The log line for the refusal just made, or None while refusals are being summed up
        (a flood of connections must not become a flood of log lines)."""
        if now - self._logged_at < _LOG_EVERY:
            self._unlogged += 1
            return None
        self._logged_at = now
        more = f" ({self._unlogged} more refused since the last message)" if self._unlogged else ""
        self._unlogged = 0
        if self.clients >= self.max_clients:
            why = f"{self.clients} clients connected, the maximum is {self.max_clients} (max_clients)"
        else:
            why = (
                f"{self.anonymous} clients have not finished their handshake, the maximum is "
                f"{self.max_anonymous_clients} (max_anonymous_clients)"
            )
        return f"refused a connection: {why}{more}"
