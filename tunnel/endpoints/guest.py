"""A simulated guest that dirties its memory image while it is being migrated.

For tests, benchmarks and the demo: a trio task that writes into random
pages of a memory image file at a configurable number of pages per second
and marks them in a :class:`DirtyTracker`, as a running guest would while a
hypervisor logs dirty pages.  Each dirtying writes ``write_size`` random
bytes at a random offset of the page (or, with ``zero_fraction``, zeroes
the whole page, so a destination must really clear pages it already has).

It runs in the caller's event loop, so time is trio's: under
``trio.testing.MockClock`` a test gets an exact, reproducible dirty rate
(with a *seed*).  The rate is kept by catching up: after each tick it dirties
as many pages as the elapsed time calls for, so a busy event loop delays
the writes but does not lower the rate.  :meth:`pause` is what a migration
calls before its stop-and-copy pass.  A write that fails (a full disk)
pauses the guest instead of ending it, as QEMU's vCPUs stop on an I/O error
with ``werror=stop``: :attr:`io_error` says why, :meth:`resume` retries.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import trio

from .dirty import DirtyTracker

__all__ = ["SimulatedGuest"]


class SimulatedGuest:
    """Dirties *pages_per_second* random pages of the image at *path*."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        tracker: DirtyTracker,
        *,
        pages_per_second: float,
        page_size: int = 4096,
        write_size: int = 64,
        zero_fraction: float = 0.0,
        seed: int | None = None,
        tick: float = 0.01,
    ) -> None:
        if pages_per_second < 0:
            raise ValueError("pages_per_second must be >= 0")
        if not 1 <= write_size <= page_size:
            raise ValueError(f"write_size must be 1..{page_size}")
        if not 0.0 <= zero_fraction <= 1.0:
            raise ValueError("zero_fraction must be within 0..1")
        self.path = os.fspath(path)
        self.tracker = tracker
        self.pages_per_second = pages_per_second
        self.page_size = page_size
        self.write_size = write_size
        self.zero_fraction = zero_fraction
        self.tick = tick
        self._rng = random.Random(seed)
        self._zero = bytes(page_size)
        self._paused = False
        self._stopped = False
        self._wake = trio.Event()
        #: Pages written so far (a page written twice counts twice).
        self.pages_dirtied = 0
        #: The write error that paused the guest (a full disk), until :meth:`resume`.
        self.io_error: OSError | None = None
        #: Called with that error when it pauses the guest.
        self.on_io_error: Callable[[OSError], None] | None = None

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop dirtying pages (the vCPUs stop); takes effect before this returns."""
        self._paused = True
        await trio.lowlevel.checkpoint()

    def resume(self) -> None:
        self._paused = False
        self.io_error = None
        self._wake.set()

    def stop(self) -> None:
        """Make :meth:`run` return."""
        self._stopped = True
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dirty pages until :meth:`stop` (or cancellation); start it with ``nursery.start``."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            pages = min(self.tracker.pages, os.fstat(fd).st_size // self.page_size)
            task_status.started()
            while not self._stopped:
                if self._paused or not self.pages_per_second or not pages:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                since = trio.current_time()
                done = 0
                while not self._stopped and not self._paused:
                    await trio.sleep(self.tick)
                    if self._stopped or self._paused:
                        break
                    due = int((trio.current_time() - since) * self.pages_per_second) - done
                    try:
                        self._dirty(fd, pages, due)
                    except OSError as exc:
                        # The image cannot be written (a full disk): the guest stops, as QEMU's
                        # vCPUs do on an I/O error with werror=stop, until resume().
                        self.io_error = exc
                        self._paused = True
                        if self.on_io_error is not None:
                            self.on_io_error(exc)
                        break
                    done += due
        finally:
            os.close(fd)

    def _dirty(self, fd: int, pages: int, count: int) -> None:
        rng = self._rng
        size = self.page_size
        for _ in range(count):
            page = rng.randrange(pages)
            if self.zero_fraction and rng.random() < self.zero_fraction:
                os.pwrite(fd, self._zero, page * size)
            else:
                offset = rng.randrange(size - self.write_size + 1)
                os.pwrite(fd, rng.randbytes(self.write_size), page * size + offset)
            self.tracker.mark(page)  # after the write: a snapshot taken before it will miss nothing
            self.pages_dirtied += 1
