"""Two connected cores under random operations, checked against a model.

The machine drives a client and a server Connection.  Each side's output
goes into a byte queue and reaches the peer only when a ``deliver`` step
moves some of it, in chunks of random size, so the two directions run out of
phase and frames arrive split anywhere.  The receiving application "takes"
records into a backlog and acknowledges them later, so credit comes back late
and the small windows are exhausted often.

The model records, per stream and direction, the records the sender queued
(DATA coalesced into runs of bytes, since frames may be split on delivery)
and what the receiver got.  Invariants:

* no credit or window is ever negative, on a stream or the connection;
* bytes received and not yet acknowledged never exceed the window granted;
* what arrived is always a prefix of what was sent; once delivery has caught
  up it is all of it (unless the receiver aborted the stream);
* once delivery has caught up, both sides agree on every stream's state, the
  sender's credit equals the receiver's window, RPC calls and pings match up;
* STREAM_END arrives after everything else, with the sender's total and a
  digest computed independently by the model;
* no stream error and no connection error happens in a legal run.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tunnel import (
    CallFailed,
    CallReceived,
    Connection,
    ConnectionState,
    DataReceived,
    DigestAlgorithm,
    ErrorCode,
    Event,
    LocalProtocolError,
    DeviceStateRecord,
    PagesRecord,
    PongReceived,
    RecordReceived,
    ReplyReceived,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
    ZeroPagesRecord,
)
from tunnel._frames import HEADER_SIZE, DeviceState, Pages, RecordFrame, ZeroPages, encode

SETTINGS = Settings(
    max_frame_size=16 * 1024,
    initial_stream_window=4096,
    connection_window=6144,
    max_concurrent_streams=3,
    max_concurrent_calls=3,
)
SIDES = ("client", "server")
MIRROR = {
    StreamState.IDLE: StreamState.IDLE,
    StreamState.OPEN: StreamState.OPEN,
    StreamState.HALF_CLOSED_LOCAL: StreamState.HALF_CLOSED_REMOTE,
    StreamState.HALF_CLOSED_REMOTE: StreamState.HALF_CLOSED_LOCAL,
    StreamState.CLOSED: StreamState.CLOSED,
}
SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)

Record = tuple[Any, ...]


def append_record(records: list[Record], record: Record) -> None:
    """Append, merging consecutive data runs (frame boundaries are not kept)."""
    if record[0] == "data":
        if records and records[-1][0] == "data":
            records[-1][1].extend(record[1])
        else:
            records.append(("data", bytearray(record[1])))
    else:
        records.append(record)


def is_prefix(got: list[Record], sent: list[Record]) -> bool:
    if len(got) > len(sent):
        return False
    for i, (g, s) in enumerate(zip(got, sent)):
        if g == s:
            continue
        last = i == len(got) - 1
        if last and g[0] == s[0] == "data" and bytes(s[1]).startswith(bytes(g[1])):
            continue
        return False
    return True


class Direction:
    """One direction of one stream: what was sent, what arrived."""

    def __init__(self, algorithm: int) -> None:
        self.algorithm = algorithm
        self.sent: list[Record] = []
        self.received: list[Record] = []
        self.total = 0
        self.received_total = 0
        self._crc = 0
        self._sha = hashlib.sha256()
        #: The sender sent STREAM_END / the receiver saw it.
        self.ended = False
        self.end_seen = False
        #: The receiver aborted the stream: what follows is dropped.
        self.receiver_dropped = False

    def add_sent(self, record: Record, payload: bytes, *, hashed: bool = True) -> None:
        append_record(self.sent, record)
        self.total += len(payload)
        if hashed:
            self._crc = zlib.crc32(payload, self._crc)
            self._sha.update(payload)

    def digest(self) -> bytes:
        if self.algorithm == DigestAlgorithm.CRC32:
            return self._crc.to_bytes(4, "big")
        if self.algorithm == DigestAlgorithm.SHA256:
            return self._sha.digest()
        return b""


class Side:
    def __init__(self, name: str, conn: Connection) -> None:
        self.name = name
        self.conn = conn
        #: Bytes this side wrote that the peer has not read yet.
        self.queue = bytearray()
        #: (stream id, flow-controlled length) of records taken, not yet acknowledged.
        self.backlog: list[tuple[int, int]] = []
        #: Calls from the peer awaiting our answer: serial -> body.
        self.calls_in: dict[int, bytes] = {}
        #: Our calls awaiting an answer, and the ones we gave up on.
        self.outstanding: dict[int, bytes] = {}
        self.cancelled: dict[int, bytes] = {}
        self.pings: list[bytes] = []

    def drain(self) -> None:
        self.queue += self.conn.bytes_to_send()


def rng_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class TwoCores(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        a = Connection(client=True, settings=SETTINGS)
        b = Connection(client=False, settings=SETTINGS)
        b.receive_data(a.bytes_to_send())
        a.receive_data(b.bytes_to_send())
        assert a.state is b.state is ConnectionState.OPEN
        self.sides = {"client": Side("client", a), "server": Side("server", b)}
        #: stream id -> (opener, digest algorithm)
        self.streams: dict[int, tuple[str, int]] = {}
        self.dirs: dict[tuple[int, str], Direction] = {}
        self.aborted_by: dict[int, set[str]] = {}

    def peer(self, name: str) -> Side:
        return self.sides["server" if name == "client" else "client"]

    # ------------------------------------------------------------------
    # Streams

    @initialize(client_digest=st.sampled_from(list(DigestAlgorithm)), server_digest=st.sampled_from(list(DigestAlgorithm)))
    def first_streams(self, client_digest: DigestAlgorithm, server_digest: DigestAlgorithm) -> None:
        self.open_stream("client", client_digest, "first")
        self.open_stream("server", server_digest, "first")

    @rule(who=st.sampled_from(SIDES), digest=st.sampled_from(list(DigestAlgorithm)), label=st.sampled_from(["", "ram", "dev"]))
    def open_stream(self, who: str, digest: DigestAlgorithm, label: str) -> None:
        side = self.sides[who]
        conn = side.conn
        parity = 1 if conn.client else 0
        mine = sum(1 for sid in conn.open_streams if sid % 2 == parity)
        if mine >= SETTINGS.max_concurrent_streams:
            try:
                conn.open_stream(digest=digest)
            except LocalProtocolError:
                return
            raise AssertionError("open_stream beyond the peer's MAX_CONCURRENT_STREAMS did not raise")
        sid = conn.open_stream(digest=digest, label=label)
        assert sid not in self.streams and sid % 2 == parity
        self.streams[sid] = (who, digest)
        for name in SIDES:
            self.dirs[(sid, name)] = Direction(digest)
        self.aborted_by[sid] = set()
        side.drain()

    def _sendable(self, side: Side) -> list[int]:
        return [sid for sid in sorted(self.streams) if side.conn.send_window(sid) > 0]

    @rule(who=st.sampled_from(SIDES), kind=st.sampled_from(["data", "external"]), seed=st.integers(0, 2**32 - 1), data=st.data())
    def send_bytes(self, who: str, kind: str, seed: int, data: st.DataObject) -> None:
        self.send(who, kind, seed, data)

    @rule(
        who=st.sampled_from(SIDES),
        kind=st.sampled_from(["pages", "zero", "device"]),
        seed=st.integers(0, 2**32 - 1),
        data=st.data(),
    )
    def send_record(self, who: str, kind: str, seed: int, data: st.DataObject) -> None:
        self.send(who, kind, seed, data)

    @rule(
        who=st.sampled_from(SIDES),
        kind=st.sampled_from(["data", "external", "pages", "zero", "device"]),
        seed=st.integers(0, 2**32 - 1),
        data=st.data(),
    )
    def send_more(self, who: str, kind: str, seed: int, data: st.DataObject) -> None:
        self.send(who, kind, seed, data)

    def send(self, who: str, kind: str, seed: int, data: st.DataObject) -> None:
        side = self.sides[who]
        conn = side.conn
        candidates = self._sendable(side)
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        window = conn.send_window(sid)
        direction = self.dirs[(sid, who)]
        state = conn.stream_state(sid)
        assert state in SENDING
        if kind == "external" and direction.algorithm != DigestAlgorithm.NONE:
            kind = "data"
        if kind in ("data", "external"):
            n = data.draw(st.one_of(st.just(window), st.integers(1, window)), label="size")
            payload = rng_bytes(seed, n)
            if kind == "data":
                conn.send_data(sid, payload)
                side.drain()
            else:
                header = conn.prepare_external_data(sid, n)
                side.drain()
                side.queue += header + payload
            direction.add_sent(("data", payload), payload, hashed=kind == "data")
            used = n
        elif kind == "pages":
            count = min((window - 16) // (8 + 512), 4)
            if count < 1:
                return
            count = data.draw(st.integers(1, count), label="pages")
            addresses = tuple(512 * k for k in data.draw(st.lists(st.integers(0, 2000), min_size=count, max_size=count)))
            pages = rng_bytes(seed, 512 * count)
            region = seed % 7
            conn.send_pages(sid, region=region, page_size=512, addresses=addresses, data=pages)
            payload = encode(Pages(stream_id=sid, region=region, page_size=512, addresses=addresses, data=pages))[HEADER_SIZE:]
            direction.add_sent(("pages", region, 512, addresses, pages), payload)
            used = len(payload)
        elif kind == "zero":
            most = min((window - 16) // 16, 4)
            if most < 1:
                return
            runs = tuple(
                (4096 * a, c)
                for a, c in data.draw(
                    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 10**4)), min_size=1, max_size=most)
                )
            )
            conn.send_zero_pages(sid, region=0, page_size=4096, runs=runs)
            payload = encode(ZeroPages(stream_id=sid, region=0, page_size=4096, runs=runs))[HEADER_SIZE:]
            direction.add_sent(("zero", 0, 4096, runs), payload)
            used = len(payload)
        else:
            name = data.draw(st.sampled_from(["cpu0", "virtio-net", "é"]), label="name")
            room = window - 6 - len(name.encode())
            if room < 0:
                return
            blob = rng_bytes(seed, data.draw(st.integers(0, min(room, 3000)), label="blob"))
            version = seed % 5
            conn.send_device_state(sid, name=name, version=version, data=blob)
            payload = encode(DeviceState(stream_id=sid, name=name, version=version, data=blob))[HEADER_SIZE:]
            direction.add_sent(("dev", name, version, blob), payload)
            used = len(payload)
        side.drain()
        assert conn.send_window(sid) == window - used
        info = conn.stream_info(sid)
        assert info is not None and info.bytes_sent == direction.total

    @rule(who=st.sampled_from(SIDES), data=st.data())
    def end_stream(self, who: str, data: st.DataObject) -> None:
        side = self.sides[who]
        candidates = [sid for sid in sorted(self.streams) if side.conn.stream_state(sid) in SENDING]
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        before = side.conn.stream_state(sid)
        side.conn.end_stream(sid)
        side.drain()
        self.dirs[(sid, who)].ended = True
        after = StreamState.HALF_CLOSED_LOCAL if before is StreamState.OPEN else StreamState.CLOSED
        assert side.conn.stream_state(sid) is after
        # No more records on that direction.
        try:
            side.conn.send_data(sid, b"x")
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("send after end_stream did not raise")

    @rule(who=st.sampled_from(SIDES), data=st.data())
    def abort_stream(self, who: str, data: st.DataObject) -> None:
        side = self.sides[who]
        live = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)
        candidates = [sid for sid in sorted(self.streams) if side.conn.stream_state(sid) in live]
        if not candidates:
            return
        sid = data.draw(st.sampled_from(candidates), label="stream")
        side.conn.abort_stream(sid)
        side.drain()
        assert side.conn.stream_state(sid) is StreamState.CLOSED
        self.dirs[(sid, self.peer(who).name)].receiver_dropped = True
        self.aborted_by[sid].add(who)

    # ------------------------------------------------------------------
    # Delivery and the receiving application

    @rule(
        frm=st.sampled_from(SIDES),
        amount=st.one_of(st.integers(1, 30000), st.just(10**9)),
        chunk=st.sampled_from([3, 50, 512, 4096, 10**9]),
        splice=st.booleans(),
    )
    def deliver(self, frm: str, amount: int, chunk: int, splice: bool) -> None:
        self._deliver(self.sides[frm], self.peer(frm), amount, chunk, splice)

    @rule(frm=st.sampled_from(SIDES), amount=st.integers(1, 20000), chunk=st.sampled_from([7, 100, 1000, 10**9]))
    def deliver_spliced(self, frm: str, amount: int, chunk: int) -> None:
        self._deliver(self.sides[frm], self.peer(frm), amount, chunk, True)

    def _deliver(self, src: Side, dst: Side, amount: int, chunk: int, splice: bool) -> None:
        n = min(amount, len(src.queue))
        if not n:
            return
        blob = bytes(src.queue[:n])
        del src.queue[:n]
        pos = 0
        while pos < n:
            pending = dst.conn.pending_data_payload
            if splice and pending is not None:
                sid, remaining = pending
                info = dst.conn.stream_info(sid)
                if info is None or info.digest == DigestAlgorithm.NONE:
                    # The driver moves payload bytes itself (os.splice in real life).
                    k = min(remaining, n - pos, chunk)
                    piece = blob[pos : pos + k]
                    pos += k
                    self._handle(src, dst, dst.conn.receive_external_data(k), piece)
                    continue
            k = min(chunk, n - pos)
            self._handle(src, dst, dst.conn.receive_data(blob[pos : pos + k]), None)
            pos += k
        dst.drain()

    @rule()
    def settle(self) -> None:
        """Deliver everything both ways until both sides are quiet."""
        a, b = self.sides["client"], self.sides["server"]
        while a.queue or b.queue:
            self._deliver(a, b, 10**9, 10**9, False)
            self._deliver(b, a, 10**9, 10**9, False)
        self._check_caught_up()

    def _handle(self, src: Side, dst: Side, events: list[Event], spliced: bytes | None) -> None:
        for e in events:
            if isinstance(e, StreamOpened):
                assert self.streams[e.stream_id] == (src.name, e.digest)
            elif isinstance(e, DataReceived):
                direction = self.dirs[(e.stream_id, src.name)]
                assert not direction.receiver_dropped and not direction.end_seen
                if e.data is None:
                    assert spliced is not None and len(spliced) == e.flow_controlled_length
                    got = spliced
                else:
                    got = bytes(e.data)
                assert len(got) == e.flow_controlled_length > 0
                self._took(dst, direction, e.stream_id, ("data", got), len(got))
            elif isinstance(e, RecordReceived):
                direction = self.dirs[(e.stream_id, src.name)]
                assert not direction.receiver_dropped and not direction.end_seen
                r = e.record
                if isinstance(r, PagesRecord):
                    record: Record = ("pages", r.region, r.page_size, tuple(r.addresses), bytes(r.data))
                elif isinstance(r, ZeroPagesRecord):
                    record = ("zero", r.region, r.page_size, tuple(r.runs))
                else:
                    assert isinstance(r, DeviceStateRecord)
                    record = ("dev", r.name, r.version, bytes(r.data))
                frame = RecordFrame(stream_id=e.stream_id, record=r)
                assert e.flow_controlled_length == len(encode(frame)) - HEADER_SIZE
                self._took(dst, direction, e.stream_id, record, e.flow_controlled_length)
            elif isinstance(e, StreamEnded):
                direction = self.dirs[(e.stream_id, src.name)]
                assert direction.ended and not direction.end_seen and not direction.receiver_dropped
                direction.end_seen = True
                assert e.total_bytes == direction.total == direction.received_total
                assert e.digest == direction.digest()
                assert direction.received == direction.sent
            elif isinstance(e, StreamReset):
                # Two correct cores never commit stream errors, and never
                # exceed each other's stream limit.
                assert e.remote, e
                assert e.error_code == ErrorCode.CANCEL, e
                assert src.name in self.aborted_by[e.stream_id]
                # The abort travels behind everything sent before it.
                direction = self.dirs[(e.stream_id, src.name)]
                assert direction.received == direction.sent
            elif isinstance(e, WindowUpdated):
                assert e.increment > 0
            elif isinstance(e, CallReceived):
                assert e.serial not in dst.calls_in
                body = bytes(e.body)
                expected = src.outstanding.get(e.serial, src.cancelled.get(e.serial))
                assert expected == body
                dst.calls_in[e.serial] = body
            elif isinstance(e, ReplyReceived):
                assert e.serial not in dst.cancelled
                assert bytes(e.body) == b"re:" + dst.outstanding.pop(e.serial)
            elif isinstance(e, CallFailed):
                assert e.serial not in dst.cancelled
                dst.outstanding.pop(e.serial)
                assert e.error_code in (ErrorCode.APPLICATION_ERROR, ErrorCode.BUSY)
            elif isinstance(e, PongReceived):
                # A PONG answers the PING it echoes and every earlier one
                # (the peer may coalesce PONGs; protocol.md 8.1).
                assert e.opaque in dst.pings
                del dst.pings[: dst.pings.index(e.opaque) + 1]
            else:
                pytest.fail(f"unexpected event {e!r}")

    def _took(self, dst: Side, direction: Direction, sid: int, record: Record, length: int) -> None:
        append_record(direction.received, record)
        direction.received_total += length
        dst.backlog.append((sid, length))

    @rule(who=st.sampled_from(SIDES), data=st.data())
    def acknowledge(self, who: str, data: st.DataObject) -> None:
        self._acknowledge(who, data)

    @rule(who=st.sampled_from(SIDES), data=st.data())
    def acknowledge_more(self, who: str, data: st.DataObject) -> None:
        self._acknowledge(who, data)

    def _acknowledge(self, who: str, data: st.DataObject) -> None:
        """The application is done with some of the records it took."""
        side = self.sides[who]
        if not side.backlog:
            return
        count = data.draw(st.integers(1, len(side.backlog)), label="count")
        for _ in range(count):
            i = data.draw(st.integers(0, len(side.backlog) - 1), label="which")
            sid, length = side.backlog.pop(i)
            side.conn.acknowledge_received(sid, length)
        side.drain()

    # ------------------------------------------------------------------
    # RPC and pings

    @rule(who=st.sampled_from(SIDES), size=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
    def call(self, who: str, size: int, seed: int) -> None:
        side = self.sides[who]
        body = rng_bytes(seed, size)
        serial = side.conn.send_call(0x20008086, 1, seed % 100, body)
        assert serial not in side.outstanding and serial not in side.cancelled
        side.outstanding[serial] = body
        side.drain()

    @rule(who=st.sampled_from(SIDES), ok=st.booleans(), data=st.data())
    def answer(self, who: str, ok: bool, data: st.DataObject) -> None:
        side = self.sides[who]
        if not side.calls_in:
            return
        serial = data.draw(st.sampled_from(sorted(side.calls_in)), label="serial")
        body = side.calls_in.pop(serial)
        if ok:
            side.conn.send_reply(serial, b"re:" + body)
        else:
            side.conn.send_error(serial, ErrorCode.APPLICATION_ERROR, "refused")
        side.drain()

    @rule(who=st.sampled_from(SIDES), data=st.data())
    def cancel(self, who: str, data: st.DataObject) -> None:
        side = self.sides[who]
        if not side.outstanding:
            return
        serial = data.draw(st.sampled_from(sorted(side.outstanding)), label="serial")
        side.conn.cancel_call(serial)
        side.cancelled[serial] = side.outstanding.pop(serial)

    @rule(who=st.sampled_from(SIDES), opaque=st.binary(min_size=8, max_size=8))
    def ping(self, who: str, opaque: bytes) -> None:
        side = self.sides[who]
        if opaque in side.pings:
            return  # payloads in flight are distinct, so a PONG says which PINGs it answers
        side.conn.ping(opaque)
        side.pings.append(opaque)
        side.drain()

    # ------------------------------------------------------------------
    # Invariants

    @invariant()
    def windows_and_buffers(self) -> None:
        for side in self.sides.values():
            conn = side.conn
            assert conn.state is ConnectionState.OPEN, conn.close_reason
            assert conn.pending_output == 0
            assert conn.connection_credit >= 0 and conn.connection_window >= 0
            for sid in conn.open_streams:
                info = conn.stream_info(sid)
                assert info is not None
                assert info.send_credit >= 0 and info.receive_window >= 0
                assert info.bytes_sent == self.dirs[(sid, side.name)].total
                assert info.bytes_received == self.dirs[(sid, self.peer(side.name).name)].received_total
            # Taken and unacknowledged never exceeds what was granted.
            per_stream: dict[int, int] = {}
            for sid, length in side.backlog:
                per_stream[sid] = per_stream.get(sid, 0) + length
            assert all(v <= SETTINGS.initial_stream_window for v in per_stream.values())
            taken = sum(per_stream.values())
            assert taken <= conn.buffered_received <= SETTINGS.connection_window
            assert conn.calls_outstanding == len(side.outstanding)
        for direction in self.dirs.values():
            assert is_prefix(direction.received, direction.sent)
            assert direction.received_total <= direction.total
        if not self.sides["client"].queue and not self.sides["server"].queue:
            self._check_caught_up()

    def _check_caught_up(self) -> None:
        a, b = self.sides["client"], self.sides["server"]
        for x, y in ((a, b), (b, a)):
            # Nothing in flight: every byte counted by the receiver was taken.
            assert x.conn.buffered_received == sum(length for _, length in x.backlog)
            assert x.conn.connection_credit == y.conn.connection_window
            assert set(x.outstanding) <= set(y.calls_in) <= set(x.outstanding) | set(x.cancelled)
            assert x.pings == []
        for sid in self.streams:
            sa, sb = a.conn.stream_state(sid), b.conn.stream_state(sid)
            assert sb is MIRROR[sa], (sid, sa, sb)
            for x, y in ((a, b), (b, a)):
                direction = self.dirs[(sid, x.name)]
                if not direction.receiver_dropped:
                    assert direction.received == direction.sent
                    assert direction.end_seen == direction.ended
                if x.conn.stream_state(sid) in SENDING and y.conn.stream_state(sid) in RECEIVING:
                    xi, yi = x.conn.stream_info(sid), y.conn.stream_info(sid)
                    assert xi is not None and yi is not None
                    assert xi.send_credit == yi.receive_window

    def teardown(self) -> None:
        # The application takes everything; all credit must come home.
        self.settle()
        for side in self.sides.values():
            while side.backlog:
                sid, length = side.backlog.pop()
                side.conn.acknowledge_received(sid, length)
            side.drain()
        self.settle()
        for side in self.sides.values():
            assert side.conn.buffered_received == 0
            peer = self.peer(side.name)
            assert side.conn.connection_credit == peer.conn.connection_window


TwoCores.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_two_cores = TwoCores.TestCase
