"""Receive buffers that are reused instead of allocated per read.

Theory of operation.  Allocating a fresh 1 MiB object for every read costs
page faults on first touch that, on this kind of machine, take longer than
copying the data in.  The reader therefore ``recv_into``s pooled buffers and
hands out memoryview slices of them (no copy).  Each buffer counts the slices
still held by streams (``refs``); a slice is released when the application
moves on to its next receive.  The reader fills a buffer front to back and
starts it over once nothing refers to it; a buffer still referred to is
retired and returns to the pool when its last slice is released.

Pinning is bounded: past ``max_buffers`` buffers in use, new slices are
copied out instead, so the memory held never exceeds
``max_buffers * size`` plus what flow control already bounds.

Large buffers are anonymous mappings, not bytearrays.  glibc serves a freed
1 MiB block's successors from its heap (its mmap threshold rises to the size
of each mmapped block freed) and keeps them there: a daemon that had served
500 busy connections kept ~600 MB after they closed.  A mapping goes back to
the kernel when its last slice is released, and its pages cost memory only
once written.  A closed pool keeps nothing, so a connection's buffers go
with it even while the connection object waits for the garbage collector.
"""

from __future__ import annotations

import mmap

__all__ = ["BufferPool", "ReadBuffer"]


#: Buffers of at least this size are anonymous mappings.
_MAP_AT = 128 * 1024


class ReadBuffer:
    __slots__ = ("data", "pool", "refs", "retired", "view")

    def __init__(self, pool: BufferPool, size: int) -> None:
        self.data: bytearray | mmap.mmap = mmap.mmap(-1, size) if size >= _MAP_AT else bytearray(size)
        self.view = memoryview(self.data)
        self.refs = 0
        self.retired = False
        self.pool = pool

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.retired:
            self.retired = False
            self.pool.put_back(self)


class BufferPool:
    def __init__(self, size: int = 1024 * 1024, max_buffers: int = 32, keep: int = 4) -> None:
        self.size = size
        self.max_buffers = max_buffers
        self.keep = keep
        self._free: list[ReadBuffer] = []
        #: Buffers currently out of the free list (the reader's and retired ones).
        self.in_use = 0
        self._closed = False

    def close(self) -> None:
        """Drop the free buffers, and from now on each buffer as it comes back."""
        self._closed = True
        self._free.clear()

    def get(self) -> ReadBuffer:
        self.in_use += 1
        if self._free:
            return self._free.pop()
        return ReadBuffer(self, self.size)

    def retire(self, buf: ReadBuffer) -> None:
        """The reader is done filling *buf*: free it now or when its last slice goes."""
        if buf.refs == 0:
            self.put_back(buf)
        else:
            buf.retired = True

    def put_back(self, buf: ReadBuffer) -> None:
        """*buf* is free (retired, and its last slice released): keep it for reuse or drop it."""
        self.in_use -= 1
        if len(self._free) < self.keep and not self._closed:
            self._free.append(buf)

    @property
    def may_pin(self) -> bool:
        """Whether another slice may keep a buffer alive (else copy it)."""
        return self.in_use <= self.max_buffers
