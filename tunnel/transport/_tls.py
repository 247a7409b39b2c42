"""TLS for bulk data: a ``trio.abc.Stream`` that encrypts big buffers in one pass each.

Why it exists.  ``trio.SSLStream`` is built for request/response traffic:
it runs every ``SSLObject`` call on the event loop, reads the transport in
small pieces, and goes round its retry loop (Python) once per TLS record.
A daemon moving a migration stream through it spent most of its CPU there,
single-threaded, and moved 100-250 MB/s where OpenSSL alone encrypts
several GB/s.  Kernel TLS (kTLS) would take the record layer out of the
process altogether, but it is not an option here: the kernels we run on
lack the ``tls`` ULP (``setsockopt(TCP_ULP, "tls")`` fails with ENOENT),
and Python 3.11's ``ssl`` module (OpenSSL 3.0) can neither enable kTLS nor
hand the session keys to the kernel.

Theory of operation.  The stream drives a sans-I/O ``ssl.SSLObject`` over
two ``ssl.MemoryBIO``s, like ``trio.SSLStream``, but:

* **Writes**: ``send_all`` and ``send_all_parts`` (the tunnel's writer: a
  frame header and its payload) cut the caller's buffers into pieces of up
  to ``WRITE_CHUNK`` (1 MiB), one ``SSLObject.write`` each, and encrypt up
  to 2 MiB of them in one pass, so a header leaves with its payload.  OpenSSL cuts
  that into full 16 KiB records in C, and the ciphertext leaves the outgoing
  BIO in one ``read()`` and goes to the transport in one ``send_all``.
* **Reads**: the transport is read in pieces of up to ``READ_CHUNK`` (1 MiB,
  ``recv_into`` a reused buffer on a plain socket) and whatever whole
  records the BIO holds are decrypted in one pass, ``SSLObject.read(n,
  buffer)`` straight into a reused plaintext buffer, or into the caller's
  with :meth:`TLSStream.receive_into`.  Python runs once per record only
  inside that pass (SSL_read returns at most one record), never a trio
  checkpoint or a transport read per record.
* **Sizes chosen for migrations, not for the stream alone**: pieces of
  256 KiB end to end (passes and reads) keep a piece's three touches
  (socket, BIO, plaintext; 768 KiB) in the core's L2 cache (1 MiB here),
  and a bare TLS tunnel stream between two processes moved 1839 against
  1483 MB/s (``bench/throughput.py --modes tls_tunnel``, 1 GiB, 3 runs).
  But a TUNNELLED QEMU migration over TLS got slower with them (1.21-1.28
  against 1.09-1.16 s, daemon CPU 1.6 against 1.45 s per GiB; 3
  interleaved rounds of 2): four times as many pieces cost the tunnel's
  reader, the writer and the write to QEMU a pass of Python each, on
  cores the two QEMUs share.  Reading 256 KiB at a time but handing the
  caller up to its buffer's size gained the QEMU migration nothing beyond
  noise (1.08-1.15 against 1.12-1.19 s) and the stream lost the gain.  So
  the sizes stay at 1 MiB and 2 MiB.
* **Threads, on request**: with ``offload_min=N`` a pass over at least N
  bytes runs in a worker thread (``trio.to_thread.run_sync``; ``THREAD_MIN``,
  64 KiB, is a sensible N).  OpenSSL releases the GIL while it encrypts or
  decrypts, so the event loop goes on serving other tasks on another core.
  By default every pass runs inline, on the event loop: on the 2-core
  machines this was measured on, the hand-offs (a thread wake-up, a trio
  wake-up through its wakeup socket, the GIL passed back and forth once
  per record) cost more than the second core gave, even with a core free
  for each process.  A 1 GiB TLS tunnel stream between two processes moved
  1438 MB/s inline against 1187 MB/s with 64 KiB offload (medians of 5
  interleaved runs, 1.24 against 1.48 CPU s), and a tunnelled QEMU
  migration over TLS took 1.18-1.32 s against 1.53-1.70 s.  An inline
  pass blocks the event loop for about half a millisecond per MiB (a 2 MiB
  pass at most).
* **One SSL object, one owner at a time**: OpenSSL does not allow two
  threads in one ``SSL`` at once, so every call into the ``SSLObject`` and
  its BIOs holds ``_crypto_lock``.  The event loop never blocks on it: an
  inline pass that finds the lock taken goes to a worker thread instead.
* **Ciphertext in order**: ciphertext is taken out of the outgoing BIO under
  that lock and appended to ``_pending``, in the order OpenSSL produced it;
  whichever task holds ``_send_lock`` writes everything pending to the
  transport.  A read can produce ciphertext too (a TLS 1.3 KeyUpdate reply,
  alerts), and it must not overtake records encrypted before it.  A read
  writes only while no ``send_all`` is under way (that one writes it
  along): a read blocked on writing the other direction's megabyte could
  leave both peers writing and neither reading.

TLS semantics are trio's (``https_compatible=False``): the peer's
certificate is checked by the context (the daemons require client
certificates), ``aclose`` sends close_notify unless another task is in
the middle of a write, an end of the transport without close_notify is a
``trio.BrokenResourceError``, and every TLS or transport failure becomes a
``trio.BrokenResourceError`` with the original error as ``__cause__``.  A
write cancelled after its data was encrypted leaves the stream broken: the
peer's view of the byte stream is then unknown.
"""

from __future__ import annotations

import enum
import ssl
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from .._frames import Buffer
from ._util import ConflictGuard

__all__ = ["READ_CHUNK", "THREAD_MIN", "WRITE_CHUNK", "TLSStream", "tune_context"]

T = TypeVar("T")

#: Largest plaintext piece encrypted by one ``SSLObject.write``.
WRITE_CHUNK = 1024 * 1024
#: Largest transport read, and the plaintext buffer decrypted into.
READ_CHUNK = 1024 * 1024
#: A sensible ``offload_min`` for TLSStream: passes of this many bytes or more in worker threads.
THREAD_MIN = 64 * 1024
#: First size of the read and plaintext buffers.  Each grows to READ_CHUNK
#: once a read or a pass fills it (bulk data): an idle or refused
#: connection costs no more than this.
FIRST_BUFFER = 16 * 1024

#: TLS 1.2 suites, AES-128-GCM first (AES-NI makes it the cheapest AEAD here).
#: TLS 1.3 suites cannot be ordered from Python 3.11 (no ``set_ciphersuites``),
#: so TLS 1.3 runs OpenSSL's first choice, AES-256-GCM: about 10% more per byte
#: than AES-128-GCM in ``openssl speed``, and no slower than TLS 1.2 with
#: AES-128-GCM through ``SSLObject``; TLS 1.3 stays.
TLS12_CIPHERS = "ECDHE+AES128+AESGCM:ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def tune_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Tune *ctx* for :class:`TLSStream` between daemons; returns it.

    AES-128-GCM first for TLS 1.2; no renegotiation (so a write never has
    to wait for a read); and no TLS 1.3 session tickets from a server: the
    daemons never resume sessions, and a ticket is a write the server makes
    after its handshake that a client busy writing would not read.
    """
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0
    return ctx


def _grown(buffer: memoryview, *, full: bool = False) -> memoryview:
    """*buffer*, or a bigger one if it is empty (FIRST_BUFFER) or was just filled (READ_CHUNK)."""
    if not len(buffer):
        return memoryview(bytearray(FIRST_BUFFER))
    if full and len(buffer) < READ_CHUNK:
        return memoryview(bytearray(READ_CHUNK))
    return buffer


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TLSStream(trio.abc.Stream):
    """TLS over *transport_stream* (usually a ``trio.SocketStream``), built for bulk data.

    A drop-in for ``trio.SSLStream(..., https_compatible=False)`` where the
    daemon needs it: the handshake happens on :meth:`do_handshake` or on
    first use, and :meth:`getpeercert`, :meth:`cipher` and :meth:`version`
    describe the session.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        offload_min: int | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        #: Passes of at least this many bytes run in a worker thread (None: all inline).
        self._offload_min = offload_min if offload_min is not None else 1 << 62
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname)
        self._state = _State.OK
        self._handshook = False
        self._handshake_lock = trio.Lock()
        #: Held by whoever is inside the SSLObject or its BIOs (the event loop or a worker thread).
        self._crypto_lock = threading.Lock()
        #: Ciphertext taken out of the outgoing BIO and not yet written, in order.
        self._pending: deque[bytes] = deque()
        #: Held while writing to the transport (send_all, a read's reply, close_notify).
        self._send_lock = trio.Lock()
        self._send_guard = ConflictGuard("another task is sending on this TLS stream")
        self._sending = False  # a send_all is under way: it writes whatever is pending
        self._recv_guard = ConflictGuard("another task is receiving on this TLS stream")
        # Decrypted bytes not yet returned: _plain[_plain_start:_plain_end].
        self._plain = memoryview(bytearray(0))
        self._plain_start = self._plain_end = 0
        self._eof = False  # close_notify received
        #: Plaintext OpenSSL decrypted but did not return yet (as of the last pass).
        self._held = 0
        sock = transport_stream.socket if isinstance(transport_stream, trio.SocketStream) else None
        self._sock = sock
        self._wire = memoryview(bytearray(0))  # what a plain socket is read into
        # Worker threads of this stream: one per direction at most (the guards see to it), plus aclose.
        self._limiter = trio.CapacityLimiter(3)

    # ------------------------------------------------------------------
    # The session

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate, as ``ssl.SSLObject.getpeercert`` (None before the handshake)."""
        return self._ssl.getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    def version(self) -> str | None:
        return self._ssl.version()

    @property
    def server_side(self) -> bool:
        return self._ssl.server_side

    # ------------------------------------------------------------------
    # Running SSLObject calls

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run *fn* (the caller holds the crypto lock), then move the ciphertext it produced to _pending."""
        try:
            return fn(*args)
        finally:
            if self._outgoing.pending:
                self._pending.append(self._outgoing.read())

    def _locked(self, fn: Callable[..., T], *args: object) -> T:
        with self._crypto_lock:
            return self._call(fn, *args)

    async def _run(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` under the crypto lock: in a worker thread for *size* >= offload_min or a busy lock.

        Not cancellable once started; checkpoints on every path.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if size < self._offload_min and self._crypto_lock.acquire(blocking=False):
            try:
                result = self._call(fn, *args)
            finally:
                self._crypto_lock.release()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return result
        return await trio.to_thread.run_sync(self._locked, fn, *args, limiter=self._limiter)

    def _check_status(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLS stream is broken")

    def _broken(self, exc: BaseException) -> trio.BrokenResourceError | trio.ClosedResourceError:
        """What to raise for *exc* from the transport or OpenSSL; the stream is broken from now on."""
        if self._state is _State.CLOSED:
            return trio.ClosedResourceError("this TLS stream was closed")
        self._state = _State.BROKEN
        if isinstance(exc, trio.BrokenResourceError):
            return exc
        error = trio.BrokenResourceError(f"TLS: {exc}")
        error.__cause__ = exc
        return error

    async def _flush(self) -> None:
        """Write all pending ciphertext to the transport, in order."""
        async with self._send_lock:
            try:
                while self._pending:
                    data = self._pending.popleft()
                    await self.transport_stream.send_all(data)
            except BaseException as exc:
                # A write cut short (error or cancel) leaves the peer's view unknown.
                if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                    raise self._broken(exc)
                if self._state is _State.OK:
                    self._state = _State.BROKEN
                raise

    async def _read_transport(self) -> Buffer:
        """What the transport has, up to READ_CHUNK bytes (empty at its end)."""
        try:
            if self._sock is None:
                return await self.transport_stream.receive_some(READ_CHUNK)
            wire = self._wire = _grown(self._wire)
            size = await self._sock.recv_into(wire)
            if size == len(wire):
                self._wire = _grown(wire, full=True)  # for the next read: this one's bytes stay put
            return wire[:size]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._broken(exc)

    def _feed(self, data: Buffer) -> None:
        """Put ciphertext into the incoming BIO; empty *data* marks the transport's end."""
        if len(data):
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # ------------------------------------------------------------------
    # Handshake

    async def do_handshake(self) -> None:
        """Run the TLS handshake if it has not run yet (it also runs on first use)."""
        self._check_status()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        async with self._handshake_lock:
            if self._handshook:
                return
            try:
                while True:
                    try:
                        self._locked(self._ssl.do_handshake)
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    except ssl.SSLError as exc:
                        # Let the peer see our alert (best effort), then fail.
                        with trio.move_on_after(1):
                            try:
                                await self._flush()
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                        raise self._broken(exc)
                    await self._flush()
                    if done:
                        break
                    self._locked(self._feed, await self._read_transport())
            except BaseException:
                if self._state is _State.OK:
                    self._state = _State.BROKEN  # cancelled part-way: the session is unusable
                raise
            self._handshook = True

    # ------------------------------------------------------------------
    # Sending

    def _encrypt(self, chunks: list[memoryview]) -> None:
        try:
            for chunk in chunks:
                self._ssl.write(chunk)
        except ssl.SSLWantReadError as exc:  # only renegotiation would want this, and it is refused
            raise ssl.SSLError("TLS write needs a read (renegotiation?)") from exc

    async def send_all(self, data: Buffer) -> None:
        await self.send_all_parts((data,))

    async def send_all_parts(self, parts: Sequence[Buffer]) -> None:
        """``send_all`` of *parts* joined, without joining them.

        A frame header and its payload are encrypted in the same pass and
        leave in the same transport write, instead of a record and a write
        of their own for the header.
        """
        with self._send_guard:
            self._check_status()
            if not self._handshook:
                # Only then: a checkpoint here, between the tunnel's writer handing over a
                # view of its caller's buffer and its encryption, would let the caller go.
                await self.do_handshake()
            self._sending = True
            try:
                await self._send(*parts)
            finally:
                self._sending = False

    async def _send(self, *parts: Buffer) -> None:
        """Encrypt and write *parts*, in order, in passes of at most 2 * WRITE_CHUNK bytes (so a header rides with a payload of up to 1 MiB)."""
        batch: list[memoryview] = []
        size = 0
        for part in parts:
            view = memoryview(part)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            for offset in range(0, len(view), WRITE_CHUNK):
                chunk = view[offset : offset + WRITE_CHUNK]
                if size and size + len(chunk) > 2 * WRITE_CHUNK:
                    await self._send_batch(batch, size)
                    batch, size = [], 0
                batch.append(chunk)
                size += len(chunk)
        if size:
            await self._send_batch(batch, size)
        else:
            await trio.lowlevel.checkpoint()

    async def _send_batch(self, chunks: list[memoryview], size: int) -> None:
        """Encrypt *chunks* (*size* bytes in all) in one pass, then write the ciphertext."""
        self._check_status()  # aclose may have run while we waited
        try:
            await self._run(size, self._encrypt, chunks)
        except ssl.SSLError as exc:
            raise self._broken(exc)
        except BaseException:
            self._state = _State.BROKEN if self._state is _State.OK else self._state
            raise
        try:
            await self._flush()
        except BaseException:
            # Cancelled before the ciphertext was written (waiting for the send lock):
            # the peer's view of the byte stream is unknown, as for a write cut short.
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_status()
            # A receive may be writing a reply: wait for it rather than conflict on the transport.
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    # ------------------------------------------------------------------
    # Receiving

    def _decrypt_into(self, view: memoryview, data: Buffer | None = None) -> int:
        """Feed *data* (if any), then decrypt the whole records the incoming BIO holds into *view*.

        Sets _eof at close_notify.  One Python iteration per record: SSL_read
        returns at most one.
        """
        if data is not None:
            self._feed(data)
        ssl_read = self._ssl.read
        filled = 0
        total = len(view)
        while filled < total:
            try:
                got: int = ssl_read(total - filled, view[filled:])  # type: ignore[assignment]  # with a buffer, a count
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._eof = True
                break
            if not got:  # pragma: no cover - OpenSSL reports the end as SSLZeroReturnError
                self._eof = True
                break
            filled += got
        # A read shorter than a record leaves the rest decrypted inside OpenSSL, not in the BIO.
        self._held = self._ssl.pending()
        return filled

    async def _receive(self, view: memoryview) -> int:
        """Decrypt into *view* (not empty): bytes decrypted, 0 after close_notify."""
        await self.do_handshake()
        data: Buffer | None = None
        if not self._incoming.pending and not self._held and not self._incoming.eof:
            data = await self._read_transport()
        while True:
            size = self._incoming.pending + self._held + (len(data) if data is not None else 0)
            try:
                got = await self._run(size, self._decrypt_into, view, data)
            except ssl.SSLError as exc:
                raise self._broken(exc)
            if self._pending and not self._sending:
                # A reply the read produced (a TLS 1.3 KeyUpdate, an alert).  While a
                # send_all is under way, _pending may also hold its records: it writes
                # them all, and a read must not block on writing them (if both peers'
                # reads did, neither would read again).
                await self._flush()
            if got or self._eof:
                return got
            self._check_status()
            data = await self._read_transport()

    def _check_max(self, max_bytes: int | None) -> int:
        if max_bytes is None:
            return READ_CHUNK
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
            raise TypeError("max_bytes must be an integer or None")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return max_bytes

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to *max_bytes* decrypted bytes; ``b""`` after the peer's close_notify."""
        size = self._check_max(max_bytes)
        with self._recv_guard:
            self._check_status()
            if self._plain_start == self._plain_end and not self._eof:
                # A pass that fills the buffer means bulk data: the next pass gets a big one.
                plain = self._plain = _grown(self._plain, full=self._plain_end == len(self._plain))
                self._plain_start = 0
                self._plain_end = await self._receive(plain)
                self._check_status()  # aclose ran meanwhile: not an end of stream
            else:
                await trio.lowlevel.checkpoint()
            start = self._plain_start
            end = min(self._plain_end, start + size)
            self._plain_start = end
            return bytes(self._plain[start:end])

    async def receive_into(self, buffer: Buffer) -> int:
        """Decrypt into *buffer* (writable, not empty) without an extra copy: bytes written, 0 after close_notify."""
        view = memoryview(buffer).cast("B")
        if not len(view):
            raise ValueError("receive_into needs a non-empty buffer")
        with self._recv_guard:
            self._check_status()
            if self._plain_start < self._plain_end:
                size = min(len(view), self._plain_end - self._plain_start)
                view[:size] = self._plain[self._plain_start : self._plain_start + size]
                self._plain_start += size
                await trio.lowlevel.checkpoint()
                return size
            if self._eof:
                await trio.lowlevel.checkpoint()
                return 0
            return await self._receive(view)

    # ------------------------------------------------------------------
    # Closing

    async def aclose(self) -> None:
        """Send close_notify (unless the stream is broken or another task is writing), then close the transport."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        was_ok = self._state is _State.OK and self._handshook
        self._state = _State.CLOSED
        try:
            if was_ok and not self._sending and not self._send_lock.locked():
                try:
                    await self._run(0, self._unwrap)
                    async with self._send_lock:
                        while self._pending:
                            await self.transport_stream.send_all(self._pending.popleft())
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
                    pass  # the peer may have closed first: that is a clean end too
        finally:
            self._pending.clear()
            self._wire = self._plain = memoryview(bytearray(0))
            await self.transport_stream.aclose()

    def _unwrap(self) -> None:
        try:
            self._ssl.unwrap()  # queues close_notify; the peer's reply is not waited for
        except ssl.SSLWantReadError:
            pass
