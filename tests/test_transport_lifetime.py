"""Who closes what: pipes, fds and lent buffers on the failure paths of the transport.

The tests named for a bug failed before its fix.  fds are counted from
/proc/self/fd (tests/fdcheck.py); nothing measures time: timeouts run on
the ``autojump_clock``, or bound a wait for an event.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from conftest import connected, unix_pair
from fdcheck import no_fd_leak

import tunnel
from tunnel.transport import TunnelStream, open_connection

KiB = 1024
MiB = 1024 * 1024


#: Windows far larger than the socket buffers: a sender blocks on the socket, not on credit.
_WIDE = tunnel.Settings(initial_stream_window=256 * MiB, connection_window=256 * MiB)


async def _handshake(transport: trio.abc.Stream) -> tunnel.Connection:
    """Play the server's side of the handshake by hand; then nobody reads *transport*."""
    core = tunnel.Connection(client=False, settings=_WIDE)
    await transport.send_all(core.bytes_to_send())
    while core.state is tunnel.ConnectionState.HANDSHAKE:
        data = await transport.receive_some(64 * KiB)
        assert data, "the peer closed during the handshake"
        core.receive_data(data)
    await transport.send_all(core.bytes_to_send())
    return core


async def _feed_forever(fd: int) -> None:
    """Keep the pipe *fd* full (until cancelled); never EOF."""
    chunk = b"x" * MiB
    while True:
        try:
            os.write(fd, chunk)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


@pytest.mark.parametrize("ending", ["peer_reset", "connection_closed"])
async def test_send_fd_cancelled_mid_splice_leaks_no_pipe(ending: str, autojump_clock: trio.testing.MockClock) -> None:
    """Bug 1: send_fd cancelled while the writer splices from its pipe; then the
    peer resets or the connection closes with the splice still blocked.  The
    writer owns the pipe from then on and closes it on that path too."""
    with trio.fail_after(60):
        async with no_fd_leak():
            src_r, src_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            async with unix_pair() as (ours, theirs), trio.open_nursery() as nursery:
                nursery.start_soon(_handshake, theirs)
                nursery.start_soon(_feed_forever, src_w)
                try:
                    async with open_connection(ours, client=True, keepalive_interval=None, frame_timeout=None) as conn:
                        stream = await conn.open_stream(digest=tunnel.DigestAlgorithm.NONE)
                        with trio.move_on_after(1) as scope:
                            await stream.send_fd(src_r)
                        assert scope.cancelled_caught
                        # Nobody reads the socket: it filled, and the writer is stuck in a splice.
                        assert stream.statistics().bytes_spliced > 0
                        if ending == "peer_reset":
                            await theirs.aclose()
                            await trio.testing.wait_all_tasks_blocked()
                except tunnel.ConnectionLost:
                    assert ending == "peer_reset"
                await theirs.aclose()
                nursery.cancel_scope.cancel()
            os.close(src_r)
            os.close(src_w)


@pytest.mark.parametrize("ending", ["peer_abort", "local_abort"])
async def test_lent_view_stays_valid_after_an_abort_until_the_next_receive(ending: str) -> None:
    """Bug 2: receive_view()'s view is valid until the next receive call, also
    when the stream is aborted meanwhile; the reader must not refill its buffer.
    (5 KiB: pinned, not copied, and small enough that the reader keeps filling
    the same buffer, from its start once nothing refers to it.)"""
    with trio.fail_after(30):
        async with connected() as (client, server):
            first = await client.open_stream()
            await first.send_all(b"a" * 5 * KiB)
            r1 = await server.accept_stream()
            view = await r1.receive_view()
            assert isinstance(view, memoryview), "expected a view of the read buffer"
            kept = bytes(view)
            if ending == "peer_abort":
                await first.abort()
            else:
                await r1.abort()
            second = await client.open_stream()
            await second.send_all(b"b" * 5 * KiB)
            r2 = await server.accept_stream()
            got = b""
            while len(got) < 5 * KiB:
                got += await r2.receive_some()
            assert bytes(view) == kept
            with pytest.raises(tunnel.StreamAborted):
                await r1.receive_some()


#: A stream window far smaller than what is sent: a send_all waits on credit part way.
_NARROW = tunnel.Settings(initial_stream_window=64 * KiB)


async def _read_to_end(stream: TunnelStream) -> int:
    total = 0
    while chunk := await stream.receive_some():
        total += len(chunk)
    return total


async def test_aclose_during_send_all_aborts_instead_of_ending() -> None:
    """Bug 3: aclose() while a send_all is in flight used to send STREAM_END with the
    count and digest of what was sent so far: the peer saw a clean, verified,
    truncated stream.  It must see STREAM_ABORT."""
    with trio.fail_after(5):
        async with connected(server_settings=_NARROW) as (client, server), trio.open_nursery() as nursery:
            s = await client.open_stream(digest=tunnel.DigestAlgorithm.CRC32)
            sent = trio.Event()

            async def send() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await s.send_all(b"x" * MiB)
                sent.set()

            nursery.start_soon(send)
            r = await server.accept_stream()
            assert len(await r.receive_some()) > 0  # the send is under way
            await trio.testing.wait_all_tasks_blocked()  # and waits for credit
            await s.aclose()
            await sent.wait()
            with pytest.raises(tunnel.StreamAborted):
                await _read_to_end(r)


async def test_cancelled_send_all_breaks_the_stream_and_aborts_it() -> None:
    """Bug 3: a cancelled send_all leaves the stream broken, as trio's SSLStream
    does: later sends raise trio.BrokenResourceError, and the peer never sees a
    clean end."""
    with trio.fail_after(5):
        async with connected(server_settings=_NARROW) as (client, server):
            s = await client.open_stream()
            r = await server.accept_stream()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(s.send_all, b"x" * MiB)
                    assert len(await r.receive_some()) > 0
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
            with pytest.raises(trio.BrokenResourceError):
                await s.send_all(b"more")
            with pytest.raises(trio.BrokenResourceError):
                await s.send_eof()
            await s.aclose()
            with pytest.raises(tunnel.StreamAborted):
                await _read_to_end(r)


async def _drain_forever(fd: int) -> None:
    """Read the pipe *fd* until EOF (or cancelled)."""
    while True:
        try:
            if not os.read(fd, MiB):
                return
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


@pytest.mark.parametrize("failure", ["cancel_receive_fd", "cancel_send_fd", "peer_aborts", "connection_closed"])
async def test_fd_transfer_failures_leak_no_fd(failure: str) -> None:
    """send_fd -> receive_fd, spliced over a unix socket, stopped part way in each
    way a transfer fails: every pipe the transport opened is closed again."""
    with trio.fail_after(30):
        async with no_fd_leak():
            src_r, src_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            dst_r, dst_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                async with connected(unix_pair) as (client, server), trio.open_nursery() as nursery:
                    nursery.start_soon(_feed_forever, src_w)
                    nursery.start_soon(_drain_forever, dst_r)
                    s = await client.open_stream(digest=tunnel.DigestAlgorithm.NONE)
                    r = await server.accept_stream()
                    outcome: dict[str, BaseException | int] = {}
                    finished = {"send": trio.Event(), "receive": trio.Event()}

                    async def run(name: str, op: object, fd: int, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                        with trio.CancelScope() as scope:
                            task_status.started(scope)
                            try:
                                outcome[name] = await op(fd)  # type: ignore[operator]
                            except (trio.BrokenResourceError, trio.ClosedResourceError, tunnel.TunnelError) as exc:
                                outcome[name] = exc
                        finished[name].set()

                    send_scope = await nursery.start(run, "send", s.send_fd, src_r)
                    receive_scope = await nursery.start(run, "receive", r.receive_fd, dst_w)
                    while r.statistics().bytes_spliced < 4 * MiB:  # well under way
                        await trio.lowlevel.checkpoint()
                    if failure == "cancel_receive_fd":
                        receive_scope.cancel()
                        await finished["receive"].wait()
                        await r.aclose()
                        await finished["send"].wait()
                        assert isinstance(outcome["send"], tunnel.StreamAborted)
                    elif failure == "cancel_send_fd":
                        send_scope.cancel()
                        await finished["receive"].wait()
                        assert isinstance(outcome.get("receive"), tunnel.StreamAborted)
                    elif failure == "peer_aborts":
                        await s.abort()
                        await finished["receive"].wait()
                        assert isinstance(outcome.get("receive"), tunnel.StreamAborted)
                    else:
                        await client.aclose()
                        await finished["send"].wait()
                        await finished["receive"].wait()
                        assert isinstance(outcome.get("send"), trio.BrokenResourceError)
                        assert isinstance(outcome.get("receive"), trio.BrokenResourceError), outcome
                    nursery.cancel_scope.cancel()
            finally:
                for fd in (src_r, src_w, dst_r, dst_w):
                    os.close(fd)
