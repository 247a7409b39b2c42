"""zstd compression of page batches (ZSTD_PAGES), kept out of the sans-I/O core.

Theory of operation.  The core only carries a ZSTD_PAGES frame's compressed
bytes; this module makes and checks them, and is the only place that imports
``zstandard`` (lazily: a connection without it just never advertises the ZSTD
feature).  A stream opened with ``compress=True`` on a connection where both
sides set ZSTD compresses each page batch and sends ZSTD_PAGES only when that
pays (at most :data:`PAYS` of the raw size), else plain PAGES; the receiver
decompresses back into an ordinary ``PagesRecord``.

Measured on this machine type (2 cores, 1 MiB batches of executable-like
data): zstd level 1 compresses at 1.5-3 ms per MiB and reaches a ratio of
0.17-0.44; level 3 takes 2-7 ms for a ratio only ~5% better, so level 1.
Incompressible data costs ~0.6 ms per MiB either way (zstd stores it raw).
Decompression takes 0.4-1.2 ms per MiB.  ``zstandard`` releases the GIL,
so batches large enough to block the event loop for more than about half a
millisecond go to a worker thread (``trio.to_thread``, ~0.2 ms of overhead
here); smaller ones are done inline.

Receiving is defensive: the output size comes from the frame header (count x
page_size, already capped by the core at 64 x this side's max frame size), a
zstd frame announcing another content size is refused before anything is
allocated, and nothing larger than that size is ever allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import trio

from .._frames import Buffer

__all__ = [
    "COMPRESS_THREAD_MIN",
    "DECOMPRESS_THREAD_MIN",
    "MAX_WINDOW",
    "PAYS",
    "ZSTD_LEVEL",
    "CompressionError",
    "PageCompressor",
    "PageDecompressor",
    "run_sized",
    "zstd_available",
]

#: zstd level for page batches: the fastest, see the measurements above.
ZSTD_LEVEL = 1
#: Send ZSTD_PAGES only when the compressed page data is at most this fraction of the raw.
PAYS = 0.9
#: Raw bytes from which compressing (~2 ms per MiB) moves to a worker thread.
COMPRESS_THREAD_MIN = 128 * 1024
#: Decompressed bytes from which decompressing (~1 ms per MiB) moves to a worker thread.
DECOMPRESS_THREAD_MIN = 256 * 1024
#: Largest zstd window allowed (protocol.md §4.17).  It bounds the memory of a
#: receiver that decompresses in pieces; this one decompresses in one shot into
#: the exact-size output and needs no window buffer (zstd then ignores its
#: window limit), so the rule is checked on the frame header instead, lest
#: senders come to rely on receivers that do not enforce it.
MAX_WINDOW = 8 * 1024 * 1024

_MAGIC = b"\x28\xb5\x2f\xfd"  # zstd frame magic 0xFD2FB528, little-endian
_UNKNOWN_SIZE = 2**64 - 1  # ZSTD_CONTENTSIZE_UNKNOWN

T = TypeVar("T")


class CompressionError(Exception):
    """Compressed page data that is corrupt, or does not decompress to the announced size."""


def zstd_available() -> bool:
    """Whether ``zstandard`` can be imported, so that this side may advertise ZSTD."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def _zstd() -> ModuleType:
    import zstandard

    return zstandard


class PageCompressor:
    """One stream's compressor; used by one task (or its worker thread) at a time."""

    __slots__ = ("_cctx",)

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        # The content size goes into the zstd frame header (zstandard's default),
        # so a receiver can check it before decompressing.
        self._cctx = _zstd().ZstdCompressor(level=level, write_content_size=True)

    def compress(self, data: Buffer) -> bytes | None:
        """One zstd frame of *data*, or None when it would not pay."""
        out: bytes = self._cctx.compress(data)
        return out if len(out) <= PAYS * len(data) else None


class PageDecompressor:
    """One stream's decompressor; used by one task (or its worker thread) at a time."""

    __slots__ = ("_dctx",)

    def __init__(self) -> None:
        self._dctx = _zstd().ZstdDecompressor()

    def decompress(self, compressed: Buffer, size: int) -> bytes:
        """The *size* bytes *compressed* (exactly one zstd frame) stands for, or CompressionError."""
        zstd = _zstd()
        view = memoryview(compressed)
        if bytes(view[:4]) != _MAGIC:
            raise CompressionError("the compressed data is not a zstd frame")
        try:
            params = zstd.get_frame_parameters(view)
        except zstd.ZstdError as exc:
            raise CompressionError(f"bad zstd frame header: {exc}") from None
        if params.dict_id:
            raise CompressionError(f"the zstd frame needs dictionary {params.dict_id}")
        if params.window_size > MAX_WINDOW:
            raise CompressionError(f"the zstd frame's window of {params.window_size} bytes exceeds {MAX_WINDOW}")
        if params.content_size != _UNKNOWN_SIZE and params.content_size != size:
            # Refused before anything is allocated for it.
            raise CompressionError(f"the zstd frame holds {params.content_size} bytes, the pages {size}")
        try:
            # max_output_size bounds the allocation when the header has no
            # content size (0 would mean "no limit", hence at least 1).
            out: bytes = self._dctx.decompress(view, max_output_size=max(size, 1), allow_extra_data=False)
        except zstd.ZstdError as exc:
            raise CompressionError(f"zstd: {exc}") from None
        if len(out) != size:
            raise CompressionError(f"the zstd frame decompressed to {len(out)} bytes, the pages are {size}")
        return out


async def run_sized(size: int, threshold: int, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``: in a worker thread if *size* reaches *threshold*, else inline.

    Not cancellable once started (the caller's buffers are in use until the
    thread is done); both paths checkpoint.
    """
    if size >= threshold:
        return await trio.to_thread.run_sync(fn, *args)
    await trio.lowlevel.checkpoint_if_cancelled()
    result = fn(*args)
    await trio.lowlevel.cancel_shielded_checkpoint()
    return result
