"""A per-stream bandwidth limit that can change while the stream runs."""

from __future__ import annotations

__all__ = ["RateLimit"]


class RateLimit:
    """Paces bytes to *rate* bytes per second (0 = unlimited).

    Each send books its bytes into the future; the next send may start when
    the booked time has arrived.  A burst of at most ``burst_s`` seconds of
    budget carries over from idle time, so the limit holds on average
    without stalling a stream that was briefly idle.
    """

    __slots__ = ("_next", "burst_s", "rate")

    def __init__(self, rate: int = 0, burst_s: float = 0.05) -> None:
        self.rate = 0
        self.burst_s = burst_s
        self._next = 0.0
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        if rate < 0:
            raise ValueError("bandwidth limit must be >= 0 bytes per second (0 for none)")
        self.rate = int(rate)

    def chunk(self, default: int) -> int:
        """Frame size to use: small enough to pace smoothly at low rates."""
        if not self.rate:
            return default
        return max(4096, min(default, int(self.rate * self.burst_s)))

    def ready_at(self, now: float) -> float:
        """When the next send may start (``<= now`` means at once)."""
        return self._next if self.rate else now

    def spend(self, size: int, now: float) -> None:
        if self.rate:
            self._next = max(self._next, now - self.burst_s) + size / self.rate
