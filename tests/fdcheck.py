"""A check that a block of code leaves no file descriptor open (pipes, sockets)."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

__all__ = ["no_fd_leak", "open_fds"]


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each refers to."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own fd, closed by now
            pass
    return fds


@asynccontextmanager
async def no_fd_leak() -> AsyncIterator[None]:
    """Fail if the body leaves more file descriptors open than it found.

    Garbage is collected and trio checkpoints first, so only fds that
    something still owns count: those a finally or a close() missed.
    """
    before = open_fds()
    yield
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    await trio.lowlevel.checkpoint()
    after = open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"file descriptors leaked: {leaked}"
