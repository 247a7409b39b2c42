"""protocol.md is the contract: its test vectors decode, and its tables match the code.

Every ```hex vector=NAME``` block of protocol.md is decoded verbatim with the
core's decoder and compared with the values kept here (not with the prose of
the document), then re-encoded byte for byte.  The ZSTD_PAGES vector's zstd
frame is decompressed with ``zstandard`` and compared with the page contents
the document states.  The document's tables of frame
types, settings, features, error codes, digest algorithms, stream kinds,
stream-state transitions and frame layouts are parsed and compared with the
code's enums and encoder.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import uuid
import zlib
from pathlib import Path

import pytest
import trio
import zstandard

import tunnel
from tunnel import Connection, ErrorCode, FrameType, RemoteProtocolError, Settings
from tunnel._frames import (
    CONNECTION_FRAMES,
    FLOW_CONTROLLED,
    HEADER,
    HEADER_SIZE,
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
    StreamKind,
    StreamOpen,
    WindowUpdate,
    ZeroPages,
    ZstdPages,
    decode,
    encode,
)
from tunnel._settings import MAGIC, PREFACE, PROTOCOL_VERSION, Feature, SettingId
from tunnel._state import TRANSITIONS, StreamInput, StreamState

DOC = Path(__file__).resolve().parent.parent / "protocol.md"
TEXT = DOC.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# Parsing the document


def _vectors() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for name, body in re.findall(r"^```hex vector=([\w-]+)[ \t]*\n(.*?)^```", TEXT, re.MULTILINE | re.DOTALL):
        assert name not in found, f"vector {name} appears twice"
        found[name] = bytes.fromhex("".join(body.split()))
    return found


VECTORS = _vectors()


@dataclasses.dataclass
class Table:
    heading: str
    header: list[str]
    rows: list[list[str]]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables() -> list[Table]:
    tables: list[Table] = []
    heading = ""
    lines = TEXT.splitlines()
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif not in_fence and line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                assert len(rows[-1]) == len(header), f"ragged table row under {heading!r}: {lines[i]}"
                i += 1
            tables.append(Table(heading, header, rows))
            continue
        i += 1
    return tables


TABLES = _tables()


def _table(*header: str, heading: str | None = None) -> Table:
    matches = [t for t in TABLES if t.header[: len(header)] == list(header) and (heading is None or heading in t.heading)]
    assert len(matches) == 1, f"expected one table {header} under {heading!r}, found {len(matches)}"
    return matches[0]


def _strip(cell: str) -> str:
    return cell.replace("`", "").strip()


def _leading_int(cell: str) -> int:
    m = re.match(r"\s*`?(0x[0-9a-fA-F]+|\d+)", cell)
    assert m, f"no number at the start of {cell!r}"
    return int(m.group(1), 0)


# ---------------------------------------------------------------------------
# Expected values, kept here independently of the document's prose

MIGRATION_ID = uuid.UUID("5f0d6b8e-9a51-4c1e-8d3a-2b7f0c9e41a7").bytes
PAGE = bytes(range(256)) * 2
RECORDS: list[Frame] = [
    Data(stream_id=1, data=b"QEVM\x00\x00\x00\x03"),
    Pages(stream_id=1, region=0, page_size=512, addresses=(0x1000,), data=PAGE),
    ZeroPages(stream_id=1, region=0, page_size=4096, runs=((0, 16), (0x20000, 256))),
    DeviceState(stream_id=1, name="virtio-net", version=1, data=b"\x01\x02\x03\x04"),
]
RECORD_PAYLOADS = b"".join(encode(r)[HEADER_SIZE:] for r in RECORDS)
REFUSAL_REASON = "no common protocol version: peer speaks 2..3, this side speaks 1..1"
#: What the ZSTD_PAGES vector's zstd frame decompresses to, as §10.15 states it.
ZSTD_CONTENT = b"\x11" * 512 + b"\x22" * 512
ZSTD_FRAME = bytes.fromhex("28b52ffd6000036d0000181111220200fc4015fb2ac002")

EXPECTED_FRAMES: dict[str, Frame] = {
    "settings": SettingsFrame(settings=((1, 16384), (2, 65536), (0x7F00, 1))),
    "ping": Ping(opaque=bytes.fromhex("0102030405060708")),
    "pong": Pong(opaque=bytes.fromhex("0102030405060708")),
    "goodbye": Goodbye(last_stream_id=4, error_code=ErrorCode.NO_ERROR, reason="migration complete"),
    "goodbye_refusal": Goodbye(last_stream_id=0, error_code=ErrorCode.UNSUPPORTED_VERSION, reason=REFUSAL_REASON),
    "window_update": WindowUpdate(stream_id=0, increment=8 * 1024 * 1024),
    "window_update_stream": WindowUpdate(stream_id=1, increment=2 * 1024 * 1024),
    "rpc_call": RpcCall(program=0x20008086, version=1, procedure=7, serial=1, body=b"\0\0\0\x05hello\0\0\0"),
    "rpc_reply": RpcReply(program=0x20008086, version=1, procedure=7, serial=1, body=b"\0\0\0\0"),
    "rpc_error": RpcError(
        program=0x20008086, version=1, procedure=7, serial=2, error_code=ErrorCode.BUSY, message="128 calls already in progress"
    ),
    "rpc_error_denied": RpcError(
        program=0x54554E64,
        version=1,
        procedure=6,
        serial=3,
        error_code=ErrorCode.PERMISSION_DENIED,
        message="MIGRATE needs the admin role; cn:backup has read-only",
    ),
    "stream_open": StreamOpen(
        stream_id=1, kind=StreamKind.MEMORY, digest=DigestAlgorithm.CRC32, migration_id=MIGRATION_ID, label="pc.ram"
    ),
    "data": RECORDS[0],
    "pages": RECORDS[1],
    "zero_pages": RECORDS[2],
    "device_state": RECORDS[3],
    "stream_end": StreamEnd(
        stream_id=1,
        total_bytes=612,
        digest_algorithm=DigestAlgorithm.CRC32,
        digest=zlib.crc32(RECORD_PAYLOADS).to_bytes(4, "big"),
    ),
    "stream_abort": StreamAbort(stream_id=3, error_code=ErrorCode.CANCEL, reason="cancelled by the operator"),
    "iteration": Iteration(stream_id=1, iteration=0),
    "iteration_final": Iteration(stream_id=1, iteration=7, final=True),
    "zstd_pages": ZstdPages(stream_id=1, region=1, page_size=512, addresses=(0, 0x2000), compressed=ZSTD_FRAME),
}
HANDSHAKE_VECTORS = ("handshake_client", "handshake_server")
#: The settings of the handshake vectors: the defaults, with ZSTD as the trio layer adds it (§10.1).
LIVE_SETTINGS = Settings(features=Feature.DIGEST_SHA256 | Feature.ZSTD)


def _plain(frame: Frame) -> Frame:
    """*frame* with memoryview fields turned into bytes, for comparison."""
    changes: dict[str, object] = {
        f.name: bytes(getattr(frame, f.name)) for f in dataclasses.fields(frame) if isinstance(getattr(frame, f.name), memoryview)
    }
    return dataclasses.replace(frame, **changes)  # type: ignore[arg-type]  # field types vary by frame


def _open_pair() -> tuple[Connection, Connection]:
    """A client and a server that have completed the handshake from the document's bytes."""
    client, server = Connection(client=True, settings=LIVE_SETTINGS), Connection(client=False, settings=LIVE_SETTINGS)
    assert client.bytes_to_send() == VECTORS["handshake_client"]
    assert server.bytes_to_send() == VECTORS["handshake_server"]
    server.receive_data(VECTORS["handshake_client"])
    client.receive_data(VECTORS["handshake_server"])
    return client, server


# ---------------------------------------------------------------------------
# Vectors


def test_vector_names_match_expectations() -> None:
    assert set(VECTORS) == set(EXPECTED_FRAMES) | set(HANDSHAKE_VECTORS)


def test_record_payloads_total() -> None:
    assert len(RECORD_PAYLOADS) == 612
    assert f"{len(RECORD_PAYLOADS)} bytes, CRC-32 {zlib.crc32(RECORD_PAYLOADS).to_bytes(4, 'big').hex(' ')}" in TEXT


@pytest.mark.parametrize("name", sorted(EXPECTED_FRAMES))
def test_frame_vector_decodes(name: str) -> None:
    raw = VECTORS[name]
    frame = decode(raw, max_frame_size=Settings().max_frame_size)
    assert _plain(frame) == EXPECTED_FRAMES[name]
    assert encode(frame) == raw
    assert encode(EXPECTED_FRAMES[name]) == raw
    length, ftype, flags, reserved, stream_id = HEADER.unpack_from(raw)
    assert (length, flags, reserved, stream_id) == (len(raw) - HEADER_SIZE, 0, 0, frame.stream_id)
    # The frame's class (or its record's) is named after its type.
    named = frame.record if isinstance(frame, RecordFrame) else frame
    assert type(named).__name__.upper().replace("FRAME", "").replace("RECORD", "") == FrameType(ftype).name.replace("_", "")


def test_every_frame_type_has_a_vector() -> None:
    covered = {FrameType(HEADER.unpack_from(raw)[1]) for name, raw in VECTORS.items() if name in EXPECTED_FRAMES}
    covered |= {FrameType(HEADER.unpack_from(VECTORS[n], PREFACE.size)[1]) for n in HANDSHAKE_VECTORS}
    assert covered == set(FrameType)


@pytest.mark.parametrize("name", HANDSHAKE_VECTORS)
def test_handshake_vector_decodes(name: str) -> None:
    raw = VECTORS[name]
    assert PREFACE.unpack_from(raw) == (b"TUNL", 1, 1)
    frame = decode(raw[PREFACE.size :])
    assert frame == LIVE_SETTINGS.to_frame()
    assert Settings.from_frame(frame) == LIVE_SETTINGS
    assert encode(frame) == raw[PREFACE.size :]
    # The core's own default differs only in FEATURES, the last four bytes (§10.1).
    core_default = PREFACE.pack(MAGIC, 1, 1) + encode(Settings().to_frame())
    assert core_default[:-4] == raw[:-4] and core_default[-4:] == bytes.fromhex("00000001")


def test_handshake_vectors_complete_a_handshake() -> None:
    client, server = Connection(client=True, settings=LIVE_SETTINGS), Connection(client=False, settings=LIVE_SETTINGS)
    events_server = server.receive_data(VECTORS["handshake_client"])
    events_client = client.receive_data(VECTORS["handshake_server"])
    expected = [tunnel.HandshakeComplete(version=1, peer_settings=LIVE_SETTINGS)]
    assert events_server == expected
    assert events_client == expected
    assert client.state is server.state is tunnel.ConnectionState.OPEN
    # The code's own handshake output is the document's vector.
    assert client.bytes_to_send() == VECTORS["handshake_client"]
    assert server.bytes_to_send() == VECTORS["handshake_server"]


def test_settings_vector_meaning() -> None:
    frame = decode(VECTORS["settings"])
    assert isinstance(frame, SettingsFrame)
    assert Settings.from_frame(frame) == Settings(max_frame_size=16384, initial_stream_window=65536)


def test_conversation_from_vectors() -> None:
    """The frame vectors form a valid conversation, read by a server (§10)."""
    _, server = _open_pair()
    opened = tunnel.StreamOpened(
        stream_id=1, kind=StreamKind.MEMORY, digest=DigestAlgorithm.CRC32, migration_id=MIGRATION_ID, label="pc.ram"
    )
    assert server.receive_data(VECTORS["stream_open"]) == [opened]
    names = ("data", "pages", "zero_pages", "device_state")
    got = [event for name in names for event in server.receive_data(VECTORS[name])]
    sizes = [len(VECTORS[name]) - HEADER_SIZE for name in names]
    assert sum(sizes) == 612
    assert got == [
        tunnel.DataReceived(stream_id=1, data=b"QEVM\x00\x00\x00\x03", flow_controlled_length=sizes[0]),
        tunnel.RecordReceived(
            stream_id=1,
            record=tunnel.PagesRecord(region=0, page_size=512, addresses=(0x1000,), data=PAGE),
            flow_controlled_length=sizes[1],
        ),
        tunnel.RecordReceived(
            stream_id=1,
            record=tunnel.ZeroPagesRecord(region=0, page_size=4096, runs=((0, 16), (0x20000, 256))),
            flow_controlled_length=sizes[2],
        ),
        tunnel.RecordReceived(
            stream_id=1,
            record=tunnel.DeviceStateRecord(name="virtio-net", version=1, data=b"\x01\x02\x03\x04"),
            flow_controlled_length=sizes[3],
        ),
    ]
    end = EXPECTED_FRAMES["stream_end"]
    assert isinstance(end, StreamEnd)
    assert server.receive_data(VECTORS["stream_end"]) == [tunnel.StreamEnded(stream_id=1, total_bytes=612, digest=end.digest)]
    assert server.stream_state(1) is StreamState.HALF_CLOSED_REMOTE

    assert server.receive_data(VECTORS["ping"]) == []
    assert server.bytes_to_send() == VECTORS["pong"]

    [call] = server.receive_data(VECTORS["rpc_call"])
    assert isinstance(call, tunnel.CallReceived)
    assert (call.program, call.version, call.procedure, call.serial, bytes(call.body)) == (
        0x20008086,
        1,
        7,
        1,
        b"\0\0\0\x05hello\0\0\0",
    )
    server.send_reply(call.serial, b"\0\0\0\0")
    assert server.bytes_to_send() == VECTORS["rpc_reply"]


def test_conversation_byte_by_byte() -> None:
    """The same conversation, trickled one byte at a time, ends the same way."""
    _, server = _open_pair()
    stream = b"".join(VECTORS[n] for n in ("stream_open", "data", "pages", "zero_pages", "device_state", "stream_end"))
    events: list[tunnel.Event] = []
    for i in range(len(stream)):
        events += server.receive_data(stream[i : i + 1])
    assert isinstance(events[-1], tunnel.StreamEnded)
    assert events[-1].total_bytes == 612


def test_zstd_vector_decompresses_to_the_stated_pages() -> None:
    wire = decode(VECTORS["zstd_pages"])
    assert isinstance(wire, RecordFrame) and isinstance(wire.record, tunnel.ZstdPagesRecord)
    frame = wire.record
    size = frame.raw_size
    assert size == len(ZSTD_CONTENT) == 1024
    assert zstandard.ZstdDecompressor().decompress(frame.compressed) == ZSTD_CONTENT
    params = zstandard.get_frame_parameters(frame.compressed)
    assert (params.content_size, params.dict_id, params.has_checksum) == (1024, 0, False)
    assert len(frame.compressed) == 23 and "23-byte" in TEXT
    # The text states the same contents the test checks.
    assert "512 bytes of 0x11 followed by 512 bytes of 0x22" in " ".join(TEXT.split())
    # The trio layer's own decompressor accepts it too.
    from tunnel.transport._compress import PageDecompressor

    assert PageDecompressor().decompress(frame.compressed, size) == ZSTD_CONTENT


def test_zstd_conversation_from_vectors() -> None:
    """The ITERATION and ZSTD_PAGES vectors on a connection where both sides set ZSTD (§10)."""
    client, server = _open_pair()
    assert server.features == tunnel.Feature(3)
    events: list[tunnel.Event] = []
    for name in ("stream_open", "iteration", "zstd_pages", "iteration_final"):
        events += server.receive_data(VECTORS[name])
    assert [type(e) for e in events] == [
        tunnel.StreamOpened,
        tunnel.RecordReceived,
        tunnel.RecordReceived,
        tunnel.RecordReceived,
    ]
    assert events[1] == tunnel.RecordReceived(stream_id=1, record=tunnel.IterationRecord(iteration=0), flow_controlled_length=8)
    event = events[2]
    assert isinstance(event, tunnel.RecordReceived) and isinstance(event.record, tunnel.ZstdPagesRecord)
    zp = event.record
    assert (zp.region, zp.page_size, zp.addresses, bytes(zp.compressed)) == (1, 512, (0, 0x2000), ZSTD_FRAME)
    assert event.flow_controlled_length == 16 + 16 + 23  # the wire size, not the 1024 bytes of pages
    assert events[3] == tunnel.RecordReceived(
        stream_id=1, record=tunnel.IterationRecord(iteration=7, final=True), flow_controlled_length=8
    )
    assert server.buffered_received == 8 + 55 + 8
    # Without ZSTD on both sides, the same ZSTD_PAGES bytes are a connection error.
    client, plain = Connection(client=True), Connection(client=False, settings=LIVE_SETTINGS)
    plain.receive_data(client.bytes_to_send())
    client.receive_data(plain.bytes_to_send())
    assert plain.features == tunnel.Feature.DIGEST_SHA256
    plain.receive_data(VECTORS["stream_open"])
    with pytest.raises(RemoteProtocolError) as info:
        plain.receive_data(VECTORS["zstd_pages"])
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR


def test_refusal_vector() -> None:
    """A v1-only endpoint answers a 2..3 preface with the goodbye_refusal frame."""
    server = Connection(client=False, settings=LIVE_SETTINGS)
    own = server.bytes_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(PREFACE.pack(MAGIC, 2, 3))
    assert info.value.error_code == ErrorCode.UNSUPPORTED_VERSION
    out = server.bytes_to_send()
    refusal = decode(out)
    assert isinstance(refusal, Goodbye)
    assert (refusal.error_code, refusal.last_stream_id) == (ErrorCode.UNSUPPORTED_VERSION, 0)
    assert own == VECTORS["handshake_server"]

    # And the refused side, still in its handshake, sees the refusal as the end.
    client = Connection(client=True)
    [event] = client.receive_data(VECTORS["handshake_server"][: PREFACE.size] + VECTORS["goodbye_refusal"])
    assert event == tunnel.ConnectionTerminated(error_code=ErrorCode.UNSUPPORTED_VERSION, last_stream_id=0, reason=REFUSAL_REASON)


# ---------------------------------------------------------------------------
# Constants and tables


def test_version_and_magic() -> None:
    assert PROTOCOL_VERSION == 1
    assert TEXT.splitlines()[0].startswith("# ") and "Protocol version 1" in TEXT.splitlines()[0]
    assert MAGIC == b"TUNL"
    table = _table("Offset", "Size", "Field", heading="2.1 Preface")
    assert [_strip(r[2]) for r in table.rows] == ["magic", "min_version", "max_version"]
    assert [int(r[1]) for r in table.rows] == [4, 2, 2]
    assert sum(int(r[1]) for r in table.rows) == PREFACE.size == 8
    assert "`TUNL` (54 55 4e 4c)" in table.rows[0][3]
    assert MAGIC.hex(" ") in table.rows[0][3]


def test_header_table() -> None:
    assert HEADER_SIZE == 12
    assert "12-byte header" in TEXT
    table = _table("Offset", "Size", "Field", heading="3.1 Frame header")
    assert [_strip(r[2]) for r in table.rows] == ["length", "type", "flags", "reserved", "stream_id"]
    offsets, sizes = [int(r[0]) for r in table.rows], [int(r[1]) for r in table.rows]
    assert sizes == [4, 1, 1, 2, 4]
    assert offsets == [0, 4, 5, 6, 8]
    assert HEADER.format == ">IBBHI" and sum(sizes) == HEADER.size == HEADER_SIZE


def test_frame_type_table() -> None:
    table = _table("Type", "Name", "Stream id", "Flow-controlled")
    seen = {}
    for row in table.rows:
        value, name, sid, flow = _leading_int(row[0]), _strip(row[1]), row[2], row[3]
        seen[name] = value
        ftype = FrameType[name]
        assert ftype == value, name
        expected_sid = "0" if ftype in CONNECTION_FRAMES else "any" if ftype is FrameType.WINDOW_UPDATE else "non-zero"
        assert sid == expected_sid, name
        assert flow == ("yes" if ftype in FLOW_CONTROLLED else "no"), name
    assert seen == {t.name: int(t) for t in FrameType}


def test_payload_heading_numbers() -> None:
    headings = re.findall(r"^### 4\.\d+ ([A-Z_]+) \((0x[0-9a-f]{2})\)$", TEXT, re.MULTILINE)
    assert {name: int(value, 16) for name, value in headings} == {t.name: int(t) for t in FrameType}


_EMPTY_FRAMES: dict[FrameType, Frame] = {
    FrameType.SETTINGS: SettingsFrame(settings=((1, 16384),)),  # one entry
    FrameType.PING: Ping(),
    FrameType.PONG: Pong(),
    FrameType.GOODBYE: Goodbye(),
    FrameType.WINDOW_UPDATE: WindowUpdate(increment=1),
    FrameType.RPC_CALL: RpcCall(program=0, version=0, procedure=0, serial=0),
    FrameType.RPC_REPLY: RpcReply(program=0, version=0, procedure=0, serial=0),
    FrameType.RPC_ERROR: RpcError(program=0, version=0, procedure=0, serial=0, error_code=0),
    FrameType.STREAM_OPEN: StreamOpen(stream_id=1),
    FrameType.DATA: Data(stream_id=1, data=b""),
    FrameType.PAGES: Pages(stream_id=1, region=0, page_size=512, addresses=(), data=b""),
    FrameType.ZERO_PAGES: ZeroPages(stream_id=1, region=0, page_size=512, runs=()),
    FrameType.DEVICE_STATE: DeviceState(stream_id=1, name=""),
    FrameType.STREAM_END: StreamEnd(stream_id=1, total_bytes=0),
    FrameType.STREAM_ABORT: StreamAbort(stream_id=1, error_code=0),
    FrameType.ITERATION: Iteration(stream_id=1, iteration=0),
    # The one-byte minimum of the compressed field is not part of the fixed layout.
    FrameType.ZSTD_PAGES: ZstdPages(stream_id=1, region=0, page_size=512, addresses=(), compressed=b"z"),
}
_EMPTY_EXTRA = {FrameType.ZSTD_PAGES: 1}


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_payload_layout_table(ftype: FrameType) -> None:
    """Offsets are contiguous, and the fixed part is what the encoder writes for an empty frame."""
    number = re.search(rf"^### (4\.\d+) {ftype.name} \(", TEXT, re.MULTILINE)
    assert number, ftype.name
    table = _table("Offset", "Size", "Field", heading=f"{number.group(1)} {ftype.name} (")
    fixed = 0
    for row in table.rows:
        if not (row[0].isdigit() and row[1].isdigit()):
            break
        assert int(row[0]) == fixed, f"{ftype.name}: field {row[2]} at offset {row[0]}, expected {fixed}"
        fixed += int(row[1])
    assert fixed == len(encode(_EMPTY_FRAMES[ftype])) - HEADER_SIZE - _EMPTY_EXTRA.get(ftype, 0)


def test_settings_table() -> None:
    table = _table("Id", "Name", "Default", "Valid range")
    defaults = Settings()
    names = []
    for row in table.rows:
        ident, name, default, valid = _leading_int(row[0]), _strip(row[1]), _leading_int(row[2]), row[3]
        names.append(name)
        assert SettingId[name] == ident
        field = name.lower()
        assert int(getattr(defaults, field)) == default, name
        low, high = (int(x) for x in re.fullmatch(r"(\d+) \.\. (\d+)", valid).groups())  # type: ignore[union-attr]
        Settings(**{field: low})
        Settings(**{field: high})
        with pytest.raises(tunnel.LocalProtocolError):
            Settings(**{field: high + 1})
        if low > 0:
            with pytest.raises(tunnel.LocalProtocolError):
                Settings(**{field: low - 1})
    assert names == [s.name for s in SettingId]
    # The default SETTINGS frame lists every setting in id order, as the document says.
    assert [ident for ident, _ in Settings().to_frame().settings] == [int(s) for s in SettingId]


def test_features_table() -> None:
    table = _table("Bit", "Name", "Meaning")
    assert {_strip(r[1]): _leading_int(r[0]) for r in table.rows} == {f.name: int(f) for f in Feature if f}
    # The core's default is fixed (so are the handshake vectors); the trio layer adds ZSTD when it can decompress.
    assert Settings().features == Feature.DIGEST_SHA256
    zstd = next(r for r in table.rows if _strip(r[1]) == "ZSTD")
    assert "ZSTD_PAGES" in zstd[2] and "Reserved" not in zstd[2]


def test_error_code_table() -> None:
    table = _table("Code", "Name", "Scope", "Meaning")
    assert [(_leading_int(r[0]), _strip(r[1])) for r in table.rows] == [(int(c), c.name) for c in ErrorCode]
    allowed = {"connection", "stream", "RPC"}
    for row in table.rows:
        scopes = {s.strip() for s in row[2].split(",")}
        assert scopes and scopes <= allowed, row


def test_digest_table() -> None:
    table = _table("Value", "Name", "Digest length")
    rows = {_strip(r[1]): (_leading_int(r[0]), int(r[2])) for r in table.rows}
    assert rows == {a.name: (int(a), a.digest_size) for a in DigestAlgorithm}
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the ISO-HDLC check value the table describes


def test_stream_kind_table() -> None:
    table = _table("Kind", "Name", "Meaning")
    assert {_strip(r[1]): _leading_int(r[0]) for r in table.rows} == {k.name: int(k) for k in StreamKind}


def test_transition_table() -> None:
    table = _table("State", "Input", "Next state")
    doc = {(StreamState[r[0]], StreamInput[r[1]]): StreamState[r[2]] for r in table.rows}
    assert len(doc) == len(table.rows)
    assert doc == TRANSITIONS
    inputs = _table("Input", "Frame")
    named = {name.strip() for row in inputs.rows for name in row[0].split(",")}
    assert named == {i.name for i in StreamInput}


def test_daemon_procedure_table() -> None:
    from tunnel.daemon import PROGRAM, Procedure
    from tunnel.daemon._access import PROCEDURE_ROLES

    table = _table("Procedure", "Number", "Role", heading="Appendix A")
    assert {row[0]: int(row[1]) for row in table.rows} == {p.name: p.value for p in Procedure}
    # the role each procedure needs, as the daemon's dispatcher checks it
    assert {row[0]: row[2] for row in table.rows} == {p.name: role.value for p, role in PROCEDURE_ROLES.items()}
    assert f"0x{PROGRAM:08X}" in TEXT
    assert f"PERMISSION_DENIED` ({int(ErrorCode.PERMISSION_DENIED)})" in " ".join(TEXT.split())


# ---------------------------------------------------------------------------
# The handshake vectors are what live endpoints send (§10.1)


async def _first_bytes(stream: trio.abc.Stream, size: int) -> bytes:
    got = b""
    with trio.fail_after(10):
        while len(got) < size:
            chunk = await stream.receive_some(size - len(got))
            assert chunk, f"the peer closed after {len(got)} bytes"
            got += chunk
    return got


async def test_handshake_server_vector_is_what_a_live_daemon_sends() -> None:
    from tunnel.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="tpd-", dir="/tmp") as root:
        sock = f"{root}/d.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(Daemon(state_dir=f"{root}/state", listen=[f"unix://{sock}"]).run)
            stream = await trio.open_unix_socket(sock)
            got = await _first_bytes(stream, len(VECTORS["handshake_server"]))
            nursery.cancel_scope.cancel()
        await stream.aclose()
    assert got == VECTORS["handshake_server"]


async def test_handshake_client_vector_is_what_a_live_client_sends() -> None:
    import tunnel.client

    with tempfile.TemporaryDirectory(prefix="tpd-", dir="/tmp") as root:
        sock = f"{root}/d.sock"
        listener = trio.socket.socket(trio.socket.AF_UNIX)
        with listener:
            await listener.bind(sock)
            listener.listen(1)
            async with trio.open_nursery() as nursery:

                async def client() -> None:
                    async with tunnel.client.connect(f"unix://{sock}"):
                        pass  # pragma: no cover - the fake daemon never answers

                nursery.start_soon(client)
                raw, _ = await listener.accept()
                stream = trio.SocketStream(raw)
                got = await _first_bytes(stream, len(VECTORS["handshake_client"]))
                nursery.cancel_scope.cancel()  # before the client can see the socket close
            await stream.aclose()
    assert got == VECTORS["handshake_client"]
