"""Helpers shared by the memory-image reader and writer: the stream header,
data extents of sparse files, and a sparse-aware content digest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .. import DeviceStateRecord
from ._api import EndpointError

__all__ = ["HEADER_NAME", "ImageHeader", "data_extents", "image_digest", "page_extents", "read_into"]

#: Name of the device-state record that opens a memory-image stream.
HEADER_NAME = "tunnel.memory-image"
HEADER_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageHeader:
    """First record of a memory-image stream, so the destination needs no side channel."""

    size: int
    page_size: int
    region: int

    def record(self) -> DeviceStateRecord:
        body = json.dumps({"size": self.size, "page_size": self.page_size, "region": self.region}).encode()
        return DeviceStateRecord(name=HEADER_NAME, version=HEADER_VERSION, data=body)

    @classmethod
    def parse(cls, record: DeviceStateRecord) -> ImageHeader:
        if record.version != HEADER_VERSION:
            raise EndpointError(f"memory-image header version {record.version}, this side speaks {HEADER_VERSION}")
        try:
            fields = json.loads(bytes(record.data))
            header = cls(size=int(fields["size"]), page_size=int(fields["page_size"]), region=int(fields["region"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise EndpointError(f"malformed memory-image header: {exc}") from None
        if header.size < 0 or header.page_size <= 0 or header.size % header.page_size:
            raise EndpointError(f"memory-image header: size {header.size} is not a multiple of page size {header.page_size}")
        return header


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges of *fd* that may hold data; holes are skipped.

    Uses ``SEEK_DATA`` / ``SEEK_HOLE`` so a sparse image costs reads only
    for what it stores; a file system without them yields one extent.
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size
                return
            raise
        if start >= size:
            return
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        yield start, end
        offset = end


def page_extents(fd: int, size: int, page_size: int) -> Iterator[tuple[int, int]]:
    """:func:`data_extents` as (first page, page count), widened to whole pages and merged."""
    pending: tuple[int, int] | None = None
    for start, end in data_extents(fd, size):
        first, last = start // page_size, -(-end // page_size)
        if pending is not None and first <= pending[1]:
            pending = (pending[0], max(pending[1], last))
            continue
        if pending is not None:
            yield pending[0], pending[1] - pending[0]
        pending = (first, last)
    if pending is not None:
        yield pending[0], pending[1] - pending[0]


def read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill *view* from *fd* at *offset*; bytes past the end of the file read as zero."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            view[done:] = bytes(len(view) - done)
            return
        done += got


def image_digest(path: str | os.PathLike[str], page_size: int = 4096, *, chunk_pages: int = 256) -> str:
    """SHA-256 of an image's content, independent of how sparse the file is.

    Covers the size and every page that is not all zero, with its address;
    so two images digest equal exactly when their contents are equal, and
    an 8 GiB image that is mostly holes costs only its data extents.
    """
    h = hashlib.sha256()
    zero = bytes(page_size)
    buf = bytearray(chunk_pages * page_size)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "big"))
        for first, count in page_extents(fd, size, page_size):
            end = (first + count) * page_size
            for offset in range(first * page_size, end, len(buf)):
                length = min(len(buf), end - offset)
                read_into(fd, view[:length], offset)  # a short last page reads as zero-padded
                for at in range(0, length, page_size):
                    if not buf.startswith(zero, at):
                        h.update((offset + at).to_bytes(8, "big"))
                        h.update(view[at : at + page_size])
    finally:
        os.close(fd)
    return h.hexdigest()
