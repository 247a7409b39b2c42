"""Hypothesis strategies for frames, shared by the tests.

Every strategy here produces *valid* frames: :func:`tunnel._frames.encode`
accepts them and :func:`tunnel._frames.decode` gives them back.  Bulk fields
are ``bytes``; sizes are kept small by default so that whole sequences of
frames stay cheap to generate, encode and feed byte by byte.

``frames()`` draws any frame type; the per-type strategies take the stream id
strategy as a parameter so that fuzzers can aim at a handful of ids that a
connection actually knows about.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tunnel._frames import (
    MAX_PAGE_SHIFT,
    MAX_WINDOW,
    MIN_PAGE_SHIFT,
    Data,
    DeviceState,
    DigestAlgorithm,
    Frame,
    Goodbye,
    Iteration,
    Pages,
    Ping,
    Pong,
    RecordFrame,
    RpcCall,
    RpcError,
    RpcReply,
    SettingsFrame,
    StreamAbort,
    StreamEnd,
    StreamOpen,
    WindowUpdate,
    ZeroPages,
    ZstdPages,
)

__all__ = [
    "data_frames",
    "device_states",
    "frames",
    "goodbyes",
    "iterations",
    "pages",
    "pings",
    "pongs",
    "rpc_calls",
    "rpc_errors",
    "rpc_replies",
    "settings_frames",
    "stream_aborts",
    "stream_ends",
    "stream_ids",
    "stream_opens",
    "u16",
    "u32",
    "u64",
    "window_updates",
    "zero_pages",
    "zstd_pages",
]

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
#: Any id a stream-level frame may carry.
stream_ids = st.integers(1, 0xFFFFFFFF)

St = st.SearchStrategy

_MAX_BULK = 2048  # bytes of bulk payload per generated frame, by default
_text = st.text(max_size=40)


def _bulk(max_size: int) -> St[bytes]:
    return st.binary(max_size=max_size)


def settings_frames() -> St[SettingsFrame]:
    pair = st.tuples(u16, u32)
    return st.builds(SettingsFrame, settings=st.lists(pair, max_size=10).map(tuple))


def pings() -> St[Ping]:
    return st.builds(Ping, opaque=st.binary(min_size=8, max_size=8))


def pongs() -> St[Pong]:
    return st.builds(Pong, opaque=st.binary(min_size=8, max_size=8))


def goodbyes() -> St[Goodbye]:
    return st.builds(Goodbye, last_stream_id=u32, error_code=u32, reason=_text)


def window_updates(ids: St[int] = st.integers(0, 0xFFFFFFFF)) -> St[WindowUpdate]:
    return st.builds(WindowUpdate, stream_id=ids, increment=st.integers(1, MAX_WINDOW))


def _rpc(cls: type[RpcCall | RpcReply], max_body: int) -> St[Any]:
    return st.builds(cls, program=u32, version=u32, procedure=u32, serial=u32, body=_bulk(max_body))


def rpc_calls(max_body: int = _MAX_BULK) -> St[RpcCall]:
    return _rpc(RpcCall, max_body)


def rpc_replies(max_body: int = _MAX_BULK) -> St[RpcReply]:
    return _rpc(RpcReply, max_body)


def rpc_errors() -> St[RpcError]:
    return st.builds(RpcError, program=u32, version=u32, procedure=u32, serial=u32, error_code=u32, message=_text)


def stream_opens(ids: St[int] = stream_ids) -> St[StreamOpen]:
    return st.builds(
        StreamOpen,
        stream_id=ids,
        kind=st.integers(0, 0xFF),
        digest=st.sampled_from(DigestAlgorithm),
        migration_id=st.binary(min_size=16, max_size=16),
        label=_text,
    )


def data_frames(ids: St[int] = stream_ids, max_size: int = _MAX_BULK) -> St[Data]:
    return st.builds(Data, stream_id=ids, data=_bulk(max_size))


@st.composite
def pages(
    draw: st.DrawFn,
    ids: St[int] = stream_ids,
    *,
    max_page_shift: int = 12,
    max_pages: int = 4,
    cheap_data: bool = False,
) -> RecordFrame:
    """PAGES frames.  With *cheap_data* the page contents are a repeated
    pattern, so huge page sizes (up to 2 MiB) cost little to draw."""
    page_size = 1 << draw(st.integers(MIN_PAGE_SHIFT, max_page_shift))
    slot = st.integers(0, 2**64 // page_size - 1).map(lambda k: k * page_size)
    addresses = tuple(draw(st.lists(slot, max_size=max_pages)))
    size = len(addresses) * page_size
    if cheap_data:
        pattern = draw(st.binary(min_size=1, max_size=16))
        data = (pattern * (size // len(pattern) + 1))[:size]
    else:
        data = draw(st.binary(min_size=size, max_size=size))
    return Pages(stream_id=draw(ids), region=draw(u32), page_size=page_size, addresses=addresses, data=data)


@st.composite
def zero_pages(draw: st.DrawFn, ids: St[int] = stream_ids, *, max_runs: int = 8) -> RecordFrame:
    page_size = 1 << draw(st.integers(MIN_PAGE_SHIFT, MAX_PAGE_SHIFT))
    slot = st.integers(0, 2**64 // page_size - 1).map(lambda k: k * page_size)
    runs = tuple(draw(st.lists(st.tuples(slot, st.integers(1, 2**64 - 1)), max_size=max_runs)))
    return ZeroPages(stream_id=draw(ids), region=draw(u32), page_size=page_size, runs=runs)


@st.composite
def zstd_pages(draw: st.DrawFn, ids: St[int] = stream_ids, *, max_page_shift: int = 21, max_pages: int = 8) -> RecordFrame:
    """ZSTD_PAGES frames.  The core does not look inside the compressed bytes,
    so they are arbitrary (at least one byte, as the layout requires)."""
    page_size = 1 << draw(st.integers(MIN_PAGE_SHIFT, max_page_shift))
    slot = st.integers(0, 2**64 // page_size - 1).map(lambda k: k * page_size)
    addresses = tuple(draw(st.lists(slot, max_size=max_pages)))
    compressed = draw(st.binary(min_size=1, max_size=256))
    return ZstdPages(stream_id=draw(ids), region=draw(u32), page_size=page_size, addresses=addresses, compressed=compressed)


def iterations(ids: St[int] = stream_ids) -> St[RecordFrame]:
    return st.builds(Iteration, stream_id=ids, iteration=u32, final=st.booleans())


def device_states(ids: St[int] = stream_ids, max_size: int = _MAX_BULK) -> St[RecordFrame]:
    return st.builds(DeviceState, stream_id=ids, name=_text, version=u32, data=_bulk(max_size))


@st.composite
def stream_ends(draw: st.DrawFn, ids: St[int] = stream_ids) -> StreamEnd:
    algorithm = draw(st.sampled_from(DigestAlgorithm))
    digest = draw(st.binary(min_size=algorithm.digest_size, max_size=algorithm.digest_size))
    return StreamEnd(stream_id=draw(ids), total_bytes=draw(u64), digest_algorithm=algorithm, digest=digest)


def stream_aborts(ids: St[int] = stream_ids) -> St[StreamAbort]:
    return st.builds(StreamAbort, stream_id=ids, error_code=u32, reason=_text)


def frames(ids: St[int] | None = None, *, window_ids: St[int] | None = None) -> St[Frame]:
    """Any valid frame.  *ids* replaces the stream ids of stream-level frames;
    *window_ids* those of WINDOW_UPDATE (default: *ids* or 0)."""
    sids = stream_ids if ids is None else ids
    if window_ids is None:
        window_ids = st.integers(0, 0xFFFFFFFF) if ids is None else st.one_of(st.just(0), ids)
    return st.one_of(
        settings_frames(),
        pings(),
        pongs(),
        goodbyes(),
        window_updates(window_ids),
        rpc_calls(),
        rpc_replies(),
        rpc_errors(),
        stream_opens(sids),
        data_frames(sids),
        pages(sids),
        zero_pages(sids),
        device_states(sids),
        stream_ends(sids),
        stream_aborts(sids),
        iterations(sids),
        zstd_pages(sids),
    )


def records(*, max_size: int = _MAX_BULK) -> St[Any]:
    """Typed records of every kind (the record each record-frame strategy carries)."""
    return st.one_of(pages(), zero_pages(), zstd_pages(), iterations(), device_states(max_size=max_size)).map(
        lambda frame: frame.record
    )
