"""Post-copy migration: the switch, and the guest-safety rules once it happened.

Theory of operation.  A migration started with ``postcopy`` sets QEMU's
``postcopy-ram`` and ``return-path`` on both sides (and ``postcopy-blocktime``
on the destination).  It runs as pre-copy until it is switched: by the client
(MIGRATE_POSTCOPY), or after the first full pass (``postcopy_after_precopy``).
The source job issues ``migrate-start-postcopy`` itself, from the task that
polls QEMU, so a switch and an abort never race: the abort is refused from
the moment the switch is requested.  QEMU then stops the source guest, sends
the device state, and the destination daemon, which watches its QEMU, resumes
the guest there as soon as it reports ``postcopy-active`` and records the
outcome ``finished``.  Pages the destination still lacks are requested by its
QEMU on the return path, which travels back on the same two-way tunnel stream
(or QEMU's own socket, natively) while the rest is pushed forward.

From the switch on, the only runnable copy is the destination's, and part of
its memory is still on the source.  So:

* nobody cancels, resumes or discards anything: an abort is refused with an
  error, the source QEMU is never cancelled (QEMU 7.2 would accept it and
  lose the guest, see :class:`tunnel.qemu.PostcopyError`), and the
  destination never discards its QEMU when the connection goes;
* a broken connection leaves both QEMUs in ``postcopy-paused`` (each daemon
  closes its end of QEMU's socket, so QEMU sees the break at once).  The
  source job stays, with status ``postcopy-paused``, and tries again: at once
  and with a bounded backoff, ``retries`` times, and whenever a client asks
  (MIGRATE with ``postcopy_resume``).  Each attempt opens a new connection and
  calls POSTCOPY_RECOVER with the migration id; the destination takes the
  paused migration over from the connection that had it (aborting its stream
  if that connection still looks alive), waits for its QEMU to pause, runs
  ``migrate-recover`` on a new socketpair (or a new socket, natively) and
  expects the new stream with the same id; then the source runs ``migrate``
  with ``resume``.  When QEMU completes, FINISH goes over the new connection;
* a daemon that stops (or crashes) in that state leaves its QEMU as it is, and
  the next one finds the source QEMU in a post-copy state (or completed with
  a post-copy record) and adopts a paused job, or on the destination an
  incoming QEMU past the switch and keeps it waiting for POSTCOPY_RECOVER.

:class:`PostcopyControl` holds the source job's side of this: the switch
flags, the resume requests and the retry policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..qemu import MigrationStatus

__all__ = ["BACKOFF_MAX", "PostcopyControl", "ResumeRequest", "backoff"]

#: The longest wait between two automatic attempts to resume, in seconds.
BACKOFF_MAX = 10.0
#: The first automatic attempt waits this long (the connection just broke), then it doubles.
BACKOFF_FIRST = 0.5


def backoff(failures: int) -> float:
    """Seconds before automatic attempt number *failures* + 1 (0: at once)."""
    if failures == 0:
        return 0.0
    return min(BACKOFF_FIRST * 2.0 ** (failures - 1), BACKOFF_MAX)


@dataclass(eq=False)
class ResumeRequest:
    """A client's ``migrate --postcopy-resume``: answered when that attempt ends (the job completes, or it fails)."""

    destination: str
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None

    def finish(self, error: str | None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class PostcopyControl:
    """The source job's post-copy state (see the module docstring)."""

    def __init__(self, *, enabled: bool, after_precopy: bool = False, retries: int = 0) -> None:
        self.enabled = enabled or after_precopy
        self.after_precopy = after_precopy
        #: Automatic attempts to resume after each break.
        self.retries = retries
        #: A client asked to switch (MIGRATE_POSTCOPY); the polling task does it.
        self.switch_wanted = trio.Event()
        #: ``migrate-start-postcopy`` was issued: no abort, no cancel from here on.
        self.switched = False
        #: QEMU reported a post-copy state.
        self.active = False
        #: The connection broke; the job waits for an attempt to resume.
        self.paused = False
        self.breaks = 0
        self.resumes = 0
        self._requests: list[ResumeRequest] = []
        self._wake = trio.Event()

    def should_switch(self, status: MigrationStatus) -> bool:
        if not self.enabled or self.switched or status.status != "active":
            return False
        return self.switch_wanted.is_set() or (self.after_precopy and status.dirty_sync_count >= 2)

    def phase(self) -> str:
        return "post-copy" if self.active else "pre-copy"

    def request_resume(self, destination: str) -> ResumeRequest:
        request = ResumeRequest(destination)
        self._requests.append(request)
        self._wake.set()
        return request

    async def next_attempt(self, failures: int, default_destination: str) -> tuple[str, ResumeRequest | None]:
        """Wait for the next attempt: a client's request, or an automatic one while retries remain.

        Returns the destination to try and the request it answers (None: automatic).
        """
        auto = failures < self.retries
        delay = backoff(failures) if auto else None
        with trio.move_on_after(delay if delay is not None else float("inf")):
            while not self._requests:
                self._wake = trio.Event()
                await self._wake.wait()
        if self._requests:
            request = self._requests.pop(0)
            return request.destination, request
        return default_destination, None

    def fail_requests(self, error: str) -> None:
        """The job ended: answer every request still waiting."""
        for request in self._requests:
            request.finish(error)
        self._requests.clear()
