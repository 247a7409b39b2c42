"""Moving stream payload between file descriptors and the connection's socket
with ``os.splice``, so guest data never enters Python.

Theory of operation.  ``splice(2)`` moves bytes between a pipe and another
file descriptor inside the kernel.  Each spliced stream direction gets a
private pipe (:class:`KernelPipe`) used as a bounded kernel-side buffer:

* Sending (:class:`PipeSource`): whatever the source (QEMU's socket or
  pipe) has is spliced into the pipe.  The connection's writer then knows
  exactly how many bytes are ready, writes a DATA header for ``k <= credit``
  of them and splices those ``k`` bytes from the pipe into the socket.  The
  header states the length before the payload, which is why the bytes are
  staged in the pipe first.  The writer tops the pipe up itself right
  before each header (a non-blocking splice), so a frame carries all the
  source has ready and, while the source keeps up, the task in ``send_fd``
  sleeps: it wakes only to wait for the source once the pipe ran empty.
* Receiving: while the core reports a DATA payload under way for a stream
  with a file sink, the reader splices it from the socket into the sink's
  pipe and on into the sink, as far as the sink takes it without blocking;
  credit goes back only for bytes in the sink.  When the sink would block,
  the task in ``receive_fd`` waits for it and moves the rest.  Payload
  bytes that arrived in an ordinary read (those just behind a header) are
  queued as memory segments, in order with the pipe's (:class:`SinkQueue`).

Neither the reader nor the writer ever waits for a source or a sink; they
wait only for the connection's socket.  A slow sink fills its pipe, then
its window, and then its peer stops sending: other streams go on.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections import deque

from ._buffers import ReadBuffer
from ._util import Signal

__all__ = ["KernelPipe", "PipeSource", "SinkQueue", "can_splice", "is_spliceable", "splice_some", "widen_pipe"]

PIPE_SIZE = 1024 * 1024
#: A sink pipe with less room than this counts as full.
_MIN_INTAKE = 64 * 1024


def can_splice() -> bool:
    return hasattr(os, "splice")


def is_spliceable(fd: int) -> bool:
    """splice(2) works between a pipe and a pipe or socket."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Grow *fd*'s pipe buffer to *size* if it is a smaller pipe (best effort).

    A default pipe holds 64 KiB, so every splice to or from it moved at most
    that much and the process at its other end had to run between any two
    of them.  A wider pipe lets each side move up to a whole frame per call.
    """
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:  # over /proc/sys/fs/pipe-max-size or the user's pipe quota: keep it as it is
        pass


def splice_some(fd_in: int, fd_out: int, size: int, *, more: bool = False) -> int | None:
    """Splice up to *size* bytes; None if it would block, 0 at end of input."""
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK | (os.SPLICE_F_MORE if more else 0)
    try:
        return os.splice(fd_in, fd_out, size, flags=flags)
    except (BlockingIOError, InterruptedError):
        return None


class KernelPipe:
    """A pipe used as a bounded buffer that lives in the kernel."""

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:  # pragma: no cover - capped by /proc/sys/fs/pipe-max-size
            pass
        self.capacity = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        #: Bytes currently in the pipe.
        self.level = 0
        #: A splice found the pipe full before *level* said so: its buffer slots
        #: (one per piece, however small) ran out.  Cleared once it is drained.
        self.refused = False

    @property
    def room(self) -> int:
        return 0 if self.refused else self.capacity - self.level

    def read_out(self, size: int) -> bytes:
        """Read *size* bytes out of the pipe (when a splice user gives up)."""
        chunks = []
        while size:
            try:
                chunk = os.read(self.read_fd, size)
            except BlockingIOError:  # pragma: no cover - level says the bytes are there
                break
            if not chunk:  # pragma: no cover
                break
            self.level -= len(chunk)
            size -= len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1


class PipeSource:
    """A source file descriptor staged through a :class:`KernelPipe` (``send_fd``)."""

    __slots__ = ("eof", "error", "fd", "limit", "pipe", "staging", "total")

    def __init__(self, fd: int, limit: int | None, staging: int | None = None) -> None:
        self.fd = fd
        self.limit = limit
        self.pipe = KernelPipe()
        #: At most this many bytes wait in the pipe (None: as many as it holds).
        self.staging = staging
        #: Bytes taken from the source so far.
        self.total = 0
        #: The source ended, or *limit* bytes were taken.
        self.eof = False
        #: The source failed (kept here: the writer must not raise it).
        self.error: OSError | None = None

    def fill(self) -> bool:
        """Move what the source has into the pipe without blocking; True if anything moved."""
        moved_any = False
        pipe = self.pipe
        while not self.eof and self.error is None:
            want = pipe.room if self.staging is None else min(pipe.room, self.staging - pipe.level)
            if self.limit is not None:
                want = min(want, self.limit - self.total)
            if want <= 0:
                self.eof = self.limit is not None and self.total >= self.limit
                break
            try:
                moved = splice_some(self.fd, pipe.write_fd, want)
            except OSError as exc:
                self.error = exc
                break
            if moved is None:  # the source has nothing more right now
                break
            if moved == 0:
                self.eof = True
                break
            pipe.level += moved
            self.total += moved
            moved_any = True
        return moved_any


class _Piped:
    """Bytes of a sink's payload that wait in one of its pipes."""

    __slots__ = ("pipe", "size")

    def __init__(self, pipe: KernelPipe, size: int) -> None:
        self.pipe = pipe
        self.size = size


class SinkQueue:
    """Payload waiting to reach a sink fd, in order: pipe bytes and memory segments.

    The pipes together hold *capacity* bytes (the stream's receive window)
    and some more, so the reader can always splice the payload in, however slow the sink:
    credit comes back only for bytes in the sink, so the peer never sends
    more than the pipes hold.  (One 1 MiB pipe behind a slow sink made the
    reader copy half of the payload through memory.)  More pipes are opened
    only as the sink falls behind, and an emptied pipe is reused.

    :meth:`flush` moves payload on without blocking.  The reader flushes
    after each batch it queues, so while the sink keeps up the task in
    ``receive_fd`` sleeps; once the sink would block (*blocked*) only that
    task flushes, after waiting for the sink to become writable.
    """

    def __init__(self, fd: int, capacity: int = PIPE_SIZE) -> None:
        self.fd = fd
        self.pipes = [KernelPipe()]
        # One more than the window needs: a pipe counts as full a little early.
        self.max_pipes = -(-capacity // self.pipes[0].capacity) + 1
        #: _Piped = bytes in a pipe; tuple = a memory segment and its read buffer.
        self.segments: deque[_Piped | tuple[memoryview | bytes, ReadBuffer | None]] = deque()
        self.signal = Signal()
        #: The sink returned EAGAIN; cleared by the task in receive_fd once it is writable.
        self.blocked = False
        #: Writing to the sink failed (kept here: the reader must not raise it).
        self.error: OSError | None = None
        #: Bytes written into the sink.
        self.written = 0

    def intake(self) -> KernelPipe | None:
        """The pipe to splice the next payload bytes into; None if all are full.

        Any pipe with room will do, not only the last: each pipe is FIFO and
        the segments record which pipe holds what, so the order holds.
        """
        # A pipe holds a limited number of buffers (pages), not bytes: with
        # little room left it may take nothing more, so it counts as full.
        tail = self.pipes[-1]
        if tail.room >= _MIN_INTAKE:
            return tail
        roomiest = max(self.pipes, key=lambda pipe: pipe.room)
        if roomiest.room >= _MIN_INTAKE:
            self.pipes.remove(roomiest)
            self.pipes.append(roomiest)  # the next pieces go there too
            return roomiest
        if len(self.pipes) < self.max_pipes:
            try:
                pipe = KernelPipe()
            except OSError:  # out of file descriptors: the reader reads into memory instead
                return None
            self.pipes.append(pipe)
            return pipe
        return None

    def add_pipe(self, pipe: KernelPipe, size: int) -> None:
        """*size* payload bytes were spliced into *pipe* (from :meth:`intake`)."""
        pipe.level += size
        last = self.segments[-1] if self.segments else None
        if isinstance(last, _Piped) and last.pipe is pipe:
            last.size += size
        else:
            self.segments.append(_Piped(pipe, size))

    def add_memory(self, data: memoryview | bytes, buf: ReadBuffer | None) -> None:
        self.segments.append((data, buf))

    def flush(self) -> tuple[int, int]:
        """Move queued payload into the sink until done or it would block.

        Returns (bytes moved, of which spliced from the pipes).  Sets
        *blocked* or *error* when it stops early.
        """
        moved = spliced = 0
        segments = self.segments
        while segments and self.error is None:
            head = segments[0]
            try:
                if isinstance(head, _Piped):
                    n = splice_some(head.pipe.read_fd, self.fd, head.size)
                    if n is None:
                        self.blocked = True
                        break
                    if n == 0:  # pragma: no cover - the pipe holds head bytes
                        raise OSError("sink pipe ran dry")
                    head.pipe.level -= n
                    head.pipe.refused = False  # slots freed
                    spliced += n
                    head.size -= n
                    if not head.size:
                        segments.popleft()
                else:
                    data, buf = head
                    try:
                        n = os.write(self.fd, data)
                    except BlockingIOError:
                        self.blocked = True
                        break
                    if n == len(data):
                        segments.popleft()
                        if buf is not None:
                            buf.release()
                    else:
                        segments[0] = (memoryview(data)[n:], buf)
            except OSError as exc:
                self.error = exc
                break
            moved += n
        self.written += moved
        return moved, spliced

    def release(self) -> list[tuple[bytes | memoryview, ReadBuffer | None]]:
        """Give up: everything still queued, in order, as memory; closes the pipes."""
        out: list[tuple[bytes | memoryview, ReadBuffer | None]] = []
        for seg in self.segments:
            out.append((seg.pipe.read_out(seg.size), None) if isinstance(seg, _Piped) else seg)
        self.segments.clear()
        for pipe in self.pipes:
            pipe.close()
        return out
