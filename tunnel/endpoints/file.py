"""Migrating to and from a file (a saved guest): the ``file`` source and writer.

The reader streams a regular file as opaque chunks, read into one reused
buffer (each chunk is on the wire before the next read).  The writer
creates ``NAME.tmp-<random>`` in the target's directory, writes the chunks
as they arrive, and on commit fsyncs it, renames it over the target and
fsyncs the directory, so the target name only ever holds a complete file
whose end-of-stream digest matched; abort removes the temporary file.
File I/O runs in the event loop (page-cache speed); only the fsyncs, which
can take seconds for a large file, go to a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import trio

from .. import StreamKind
from ._api import EndpointError, Progress, SourceRecord
from ._fsutil import commit_file, create_temp, remove_quietly

__all__ = ["FileReader", "FileWriter"]

_CHUNK = 1024 * 1024  # the transport's largest frame payload by default


class FileReader:
    """Source reader of the file at *path*, sent as opaque chunks."""

    stream_kind = StreamKind.FILE

    def __init__(self, path: str | os.PathLike[str], *, chunk_size: int = _CHUNK) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self._buf = memoryview(bytearray(chunk_size))
        self._sent = 0
        self._records = 0
        self._finished = False
        self._closed = False

    def records(self) -> AsyncIterator[SourceRecord]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[SourceRecord]:
        while True:
            size = os.preadv(self._fd, [self._buf], self._sent)
            if not size:
                break
            self._sent += size
            self._records += 1
            yield self._buf[:size]  # reused once the pump resumes us: it is on the wire by then
        self._finished = True

    def progress(self) -> Progress:
        return Progress(
            records=self._records,
            bytes_sent=self._sent,
            total_bytes=self.size,
            remaining_bytes=0 if self._finished else max(0, self.size - self._sent),
            finished=self._finished,
        )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        await trio.lowlevel.checkpoint()


class FileWriter:
    """Destination writer of a file at *path*, created atomically on commit.

    *durable* False skips the fsyncs (still atomic for readers, not crash-safe).
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: int = 0o644, durable: bool = True) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.durable = durable
        temp, fd = create_temp(self.path, mode, os.O_WRONLY)
        self.temp_path: str | None = temp
        self._fd: int | None = fd
        self.bytes_written = 0
        self.committed = False

    async def write(self, record: SourceRecord) -> None:
        if self._fd is None:
            raise EndpointError("the file was already committed or aborted")
        if not isinstance(record, bytes | memoryview | bytearray):
            raise EndpointError(f"a file takes a byte stream, not {type(record).__name__} records")
        view = memoryview(record)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.bytes_written += done
        await trio.lowlevel.checkpoint()

    async def commit(self) -> None:
        if self._fd is None or self.temp_path is None:
            raise EndpointError("the file was already committed or aborted")
        fd, self._fd = self._fd, None
        await commit_file(fd, self.temp_path, self.path, durable=self.durable)
        self.temp_path = None
        self.committed = True

    async def abort(self, reason: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.temp_path is not None:
            remove_quietly(self.temp_path)
            self.temp_path = None
        await trio.lowlevel.checkpoint()
