"""Small file-system helpers for the writers: temporary names, atomic commit, cleanup."""

from __future__ import annotations

import os
import secrets

import trio

__all__ = ["TEMP_MARK", "commit_file", "create_temp", "pwrite_all", "remove_quietly"]

#: Temporary files are NAME + TEMP_MARK + random hex, next to the target.
TEMP_MARK = ".tmp-"


def create_temp(target: str, mode: int, flags: int) -> tuple[str, int]:
    """Create a fresh temporary file next to *target*; returns (path, fd)."""
    directory, name = os.path.split(target)
    path = os.path.join(directory, f"{name}{TEMP_MARK}{secrets.token_hex(6)}")
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    return path, fd


async def commit_file(fd: int, temp: str, target: str, *, durable: bool = True) -> None:
    """fsync *fd*, close it, rename *temp* over *target*, fsync the directory.

    The fsyncs run in a worker thread: flushing gigabytes can take seconds,
    and the connection's keepalive must go on meanwhile.  Without *durable*
    they are skipped: readers still never see a partial file (the rename is
    atomic), but a crash may lose it.
    """
    try:
        if durable:
            await trio.to_thread.run_sync(os.fsync, fd)
    finally:
        os.close(fd)
    os.replace(temp, target)
    if durable:
        await trio.to_thread.run_sync(_fsync_dir, os.path.dirname(target))
    else:
        await trio.lowlevel.checkpoint()


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
