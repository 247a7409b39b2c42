"""Pluggable source readers and destination writers, and the pumps between them and a tunnel stream.

    from tunnel.endpoints import send_source, receive_into, source_reader, destination_writer

    # source daemon
    reader = source_reader("memory-image")("/var/lib/guest.mem", tracker=tracker, guest=guest)
    result = await send_source(conn, reader, label="memory", compress=True)

    # destination daemon
    stream = await conn.accept_stream()
    await receive_into(stream, destination_writer("memory-image")("/var/lib/incoming.mem"))

Interfaces (:mod:`._api`): :class:`SourceReader`, :class:`DestinationWriter`,
the optional fd capabilities :class:`FdSource` / :class:`FdDestination`, and
:class:`PausableGuest`.  Built-ins: ``bytestream`` (a hypervisor's byte
stream over a pipe or socket, spliced), ``file`` (a saved guest, written
atomically), ``memory-image`` (a guest's memory image with pre-copy and
dirty-page tracking).  Plug-ins register under the ``tunnel.sources`` and
``tunnel.writers`` entry-point groups (:mod:`._registry`).
"""

from __future__ import annotations

from ._api import (
    DestinationWriter,
    EndpointError,
    FdDestination,
    FdSource,
    NotConverged,
    PausableGuest,
    Progress,
    SourceReader,
    SourceRecord,
    UnknownEndpoint,
)
from ._imagefile import image_digest
from ._precopy import PrecopyPolicy
from ._pump import TransferResult, receive_into, send_from, send_source
from ._registry import (
    available_sources,
    available_writers,
    destination_writer,
    register_source,
    register_writer,
    source_reader,
)
from .bytestream import ByteStreamReader, ByteStreamWriter
from .dirty import DirtySnapshot, DirtyTracker
from .file import FileReader, FileWriter
from .guest import SimulatedGuest
from .image import MemoryImageReader
from .image_writer import MemoryImageWriter

__all__ = [
    "ByteStreamReader",
    "ByteStreamWriter",
    "DestinationWriter",
    "DirtySnapshot",
    "DirtyTracker",
    "EndpointError",
    "FdDestination",
    "FdSource",
    "FileReader",
    "FileWriter",
    "MemoryImageReader",
    "MemoryImageWriter",
    "NotConverged",
    "PausableGuest",
    "PrecopyPolicy",
    "Progress",
    "SimulatedGuest",
    "SourceReader",
    "SourceRecord",
    "TransferResult",
    "UnknownEndpoint",
    "available_sources",
    "available_writers",
    "destination_writer",
    "image_digest",
    "receive_into",
    "register_source",
    "register_writer",
    "send_from",
    "send_source",
    "source_reader",
]
