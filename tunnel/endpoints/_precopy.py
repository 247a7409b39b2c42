"""The pre-copy policy: another pass, the final pass, or give up.

Pure bookkeeping, no I/O, so it is tested on its own.  After each pass the
reader reports what it sent and how long that took; the send rate is
measured over all passes so far (bytes / seconds of sending, so one short
pass of a few pages cannot make it jump).  The pages dirty at that moment
would be the stop-and-copy pass: if sending them at the measured rate fits
the downtime budget, the next pass is the final one.  Otherwise pre-copy
goes on, unless it is not converging: the number of dirty pages has not
reached a new low for ``stall_passes`` passes (the guest dirties memory as
fast as the link drains it), or ``max_iterations`` passes are used up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Literal

__all__ = ["PrecopyPlanner", "PrecopyPolicy", "Step"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecopyPolicy:
    """When pre-copy stops, and what happens if it cannot converge."""

    #: Longest acceptable stop-and-copy pass at the measured rate, seconds.
    downtime_s: float = 0.3
    #: Most passes in all, the first full pass and the final pass included.
    max_iterations: int = 30
    #: Give up when the dirty page count has not hit a new low for this many passes.
    stall_passes: int = 5
    #: "fail": raise :class:`NotConverged` and abort the migration (a guest
    #: left running on the source is the safe outcome).  "stop-and-copy":
    #: pause the guest anyway and send the rest, accepting a longer downtime.
    on_non_convergence: Literal["fail", "stop-and-copy"] = "fail"

    def __post_init__(self) -> None:
        if self.downtime_s < 0:
            raise ValueError("downtime_s must be >= 0")
        if self.max_iterations < 2:
            raise ValueError("max_iterations must be >= 2 (a full pass and a final pass)")
        if self.stall_passes < 1:
            raise ValueError("stall_passes must be >= 1")
        if self.on_non_convergence not in ("fail", "stop-and-copy"):
            raise ValueError("on_non_convergence must be 'fail' or 'stop-and-copy'")


class Step(Enum):
    CONTINUE = "continue"
    FINAL = "final"
    GIVE_UP = "give-up"


class PrecopyPlanner:
    """Measures passes and decides the next step (see the module docstring)."""

    def __init__(self, policy: PrecopyPolicy, page_size: int) -> None:
        self.policy = policy
        self.page_size = page_size
        self.passes = 0
        self._bytes = 0
        self._seconds = 0.0
        self._best = math.inf
        self._stalled = 0
        self.dirty_pages_per_s = 0.0
        self.expected_downtime_s: float | None = None
        self.converged: bool | None = None

    @property
    def rate(self) -> float | None:
        """Bytes per second over all passes; inf if they took no measurable time."""
        if not self._bytes:
            return None
        return self._bytes / self._seconds if self._seconds > 0 else math.inf

    def downtime_for(self, dirty_pages: int) -> float | None:
        rate = self.rate
        if not dirty_pages:
            return 0.0
        if rate is None:
            return None
        return dirty_pages * self.page_size / rate

    def pass_done(self, *, sent_bytes: int, seconds: float) -> None:
        self.passes += 1
        self._bytes += sent_bytes
        self._seconds += max(0.0, seconds)

    def dirty_observed(self, *, pages: int, seconds: float) -> None:
        if seconds > 0:
            self.dirty_pages_per_s = pages / seconds

    def next_step(self, dirty_pages: int) -> Step:
        """Called after each pass with the pages dirty now."""
        downtime = self.downtime_for(dirty_pages)
        self.expected_downtime_s = downtime
        if downtime is not None and downtime <= self.policy.downtime_s:
            self.converged = True
            return Step.FINAL
        if dirty_pages < self._best:
            self._best = dirty_pages
            self._stalled = 0
        else:
            self._stalled += 1
        if self.passes + 1 >= self.policy.max_iterations or self._stalled >= self.policy.stall_passes:
            self.converged = False
            return Step.GIVE_UP
        return Step.CONTINUE
