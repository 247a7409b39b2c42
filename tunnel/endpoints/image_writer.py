"""Applying a memory-image stream to a file: the ``memory-image`` writer.

Theory of operation.  The stream's first record, the :class:`ImageHeader`,
gives the image size and page size; the writer then creates
``NAME.tmp-<random>`` next to the target, sparse, of that size.  ``PAGES``
are written with ``pwrite`` at their addresses (one call per run of
consecutive addresses, straight from the received buffer).  A byte per page
records which pages were ever written, so a ``ZERO_PAGES`` run costs
nothing for pages still holes and zeroes only the pages an earlier pass
wrote (a page the guest cleared after it was sent).  Device-state blobs are
kept in memory (bounded) for the caller.  ``commit()`` requires the final
pre-copy pass to have started (the stream's verified end
then says it is complete), fsyncs the file (in a worker thread, so
the connection's keepalive goes on), renames it over the target and fsyncs
the directory; ``abort()`` closes and removes the temporary file.  Nothing
appears under the target name unless the stream ended normally (the
transport verified its digest) and ``commit()`` succeeded.

Writes go to the page cache synchronously: each is at most one record, and
a thread hop per record would cost more than the write.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import trio

from .. import DeviceStateRecord, IterationRecord, PagesRecord, ZeroPagesRecord
from ._api import EndpointError, SourceRecord
from ._fsutil import commit_file, create_temp, pwrite_all, remove_quietly
from ._imagefile import HEADER_NAME, ImageHeader, image_digest

__all__ = ["MemoryImageWriter"]

_WRITTEN_RUNS = re.compile(rb"[^\x00]+")


class MemoryImageWriter:
    """Destination writer of a memory image at *path*, created atomically on commit.

    *size* and *page_size*, if given, must match the stream's header.
    *require_final*: refuse to commit unless the final pre-copy iteration
    arrived (a stream from a reader without iterations needs False).
    *durable* False skips the fsyncs at commit: the rename still hides a
    partial image, but a crash may lose it (scratch space, virtual-clock tests).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        page_size: int | None = None,
        region: int = 0,
        require_final: bool = True,
        max_device_state: int = 64 * 1024 * 1024,
        mode: int = 0o644,
        durable: bool = True,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.size = size
        self.page_size = page_size
        self.region = region
        self.require_final = require_final
        self.max_device_state = max_device_state
        self.mode = mode
        self.durable = durable
        self.temp_path: str | None = None
        #: Device-state blobs received, by name (copies).
        self.device_states: dict[str, bytes] = {}
        #: Pre-copy passes started so far, and whether the final one started.
        self.iterations = 0
        self.final = False
        self.committed = False
        self.pages_written = 0
        self.pages_zeroed = 0
        self._fd: int | None = None
        self._written = bytearray()
        self._zero = b""
        self._device_bytes = 0
        self._header_seen = False
        if size is not None and page_size is not None:
            self._open(ImageHeader(size=size, page_size=page_size, region=region))

    # ------------------------------------------------------------------
    # DestinationWriter

    async def write(self, record: SourceRecord) -> None:
        if self.committed:
            raise EndpointError("the image was already committed")
        apply = _APPLY.get(type(record))
        if apply is None:
            raise EndpointError(f"a memory image takes pages, not {type(record).__name__} records")
        apply(self, record)
        await trio.lowlevel.checkpoint()

    async def commit(self) -> None:
        if self.committed:
            raise EndpointError("commit() called twice")
        if self._fd is None or self.temp_path is None:
            raise EndpointError("the stream ended before the memory-image header")
        if self.require_final and not self.final:
            raise EndpointError(f"the stream ended after {self.iterations} pre-copy passes without a final one")
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

    def digest(self) -> str:
        """:func:`image_digest` of the committed image (compare it with the source's)."""
        if not self.committed:
            raise EndpointError("the image is not committed")
        assert self.page_size is not None
        return image_digest(self.path, self.page_size)

    # ------------------------------------------------------------------

    def _open(self, header: ImageHeader) -> None:
        if self.size is not None and header.size != self.size:
            raise EndpointError(f"the source image has {header.size} bytes, this destination expects {self.size}")
        if self.page_size is not None and header.page_size != self.page_size:
            raise EndpointError(f"the source uses {header.page_size}-byte pages, this destination {self.page_size}")
        self.size, self.page_size, self.region = header.size, header.page_size, header.region
        temp, fd = create_temp(self.path, self.mode, os.O_RDWR)
        self.temp_path, self._fd = temp, fd
        os.ftruncate(fd, header.size)  # sparse: pages never sent stay holes
        self._written = bytearray(header.size // header.page_size)
        self._zero = bytes(min(header.size, 256 * header.page_size))

    def _check(self, region: int, page_size: int) -> int:
        if self._fd is None:
            raise EndpointError("page records before the memory-image header")
        if region != self.region:
            raise EndpointError(f"a record for region {region}, this image is region {self.region}")
        if page_size != self.page_size:
            raise EndpointError(f"a record with {page_size}-byte pages, this image has {self.page_size}")
        return self._fd

    def _iteration(self, record: IterationRecord) -> None:
        if self.final:
            raise EndpointError("an iteration record after the final one")
        self.iterations = record.iteration + 1
        self.final = record.final

    def _pages(self, record: PagesRecord) -> None:
        fd = self._check(record.region, record.page_size)
        ps, size = record.page_size, self.size
        assert size is not None
        addresses, data = record.addresses, memoryview(record.data)
        count = len(addresses)
        if not count:
            return
        if len(data) != count * ps:
            raise EndpointError(f"{count} pages with {len(data)} bytes of data")
        first = addresses[0]
        if addresses == tuple(range(first, first + count * ps, ps)):  # the usual case: one run
            runs = [(0, count)]
        else:
            runs = _consecutive(addresses, ps)
        for index, length in runs:
            address = addresses[index]
            if address + length * ps > size:
                raise EndpointError(f"page at {address} lies outside the {size}-byte image")
            pwrite_all(fd, data[index * ps : (index + length) * ps], address)
            self._written[address // ps : address // ps + length] = b"\x01" * length
        self.pages_written += count

    def _zero_pages(self, record: ZeroPagesRecord) -> None:
        fd = self._check(record.region, record.page_size)
        ps, size = record.page_size, self.size
        assert size is not None
        for address, count in record.runs:
            if address + count * ps > size:
                raise EndpointError(f"zero run at {address} of {count} pages lies outside the {size}-byte image")
            first = address // ps
            for match in _WRITTEN_RUNS.finditer(self._written, first, first + count):
                start, end = match.span()
                offset, remaining = start * ps, (end - start) * ps
                while remaining:
                    chunk = min(remaining, len(self._zero))
                    pwrite_all(fd, memoryview(self._zero)[:chunk], offset)
                    offset += chunk
                    remaining -= chunk
                self._written[start:end] = bytes(end - start)
                self.pages_zeroed += end - start

    def _device_state(self, record: DeviceStateRecord) -> None:
        if record.name == HEADER_NAME:
            header = ImageHeader.parse(record)
            if self._fd is not None and not self._header_seen:
                # Opened from the size and page size we were given: the stream's header must agree.
                self._header_seen = True
                if (header.size, header.page_size, header.region) != (self.size, self.page_size, self.region):
                    raise EndpointError(
                        f"the source image has {header.size} bytes in {header.page_size}-byte pages (region {header.region}), "
                        f"this destination expects {self.size} in {self.page_size}-byte pages (region {self.region})"
                    )
                return
            if self._fd is not None or self.committed:
                raise EndpointError("a second memory-image header")
            self._header_seen = True
            self._open(header)
            return
        size = len(record.data)
        previous = len(self.device_states.get(record.name, b""))
        if self._device_bytes - previous + size > self.max_device_state:
            raise EndpointError(f"device state beyond the {self.max_device_state}-byte limit")
        self.device_states[record.name] = bytes(record.data)  # the record's buffer is reused after we return
        self._device_bytes += size - previous


def _consecutive(addresses: tuple[int, ...], page_size: int) -> list[tuple[int, int]]:
    """(index, length) of each run of consecutive page addresses."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(addresses)):
        if addresses[i] != addresses[i - 1] + page_size:
            runs.append((start, i - start))
            start = i
    runs.append((start, len(addresses) - start))
    return runs


#: How each record type is applied to the image (bytes chunks are refused).
_APPLY: dict[type[Any], Callable[[MemoryImageWriter, Any], None]] = {
    PagesRecord: MemoryImageWriter._pages,
    ZeroPagesRecord: MemoryImageWriter._zero_pages,
    IterationRecord: MemoryImageWriter._iteration,
    DeviceStateRecord: MemoryImageWriter._device_state,
}
