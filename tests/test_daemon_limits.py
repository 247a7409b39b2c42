"""The daemon's connection limits: real unix sockets, a daemon in the test's
trio loop, no QEMU (LIST needs none)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from tunnel.client import connect
from tunnel.daemon import Daemon
from tunnel.daemon._limits import ConnectionLimits


def test_slots_count_anonymous_until_authenticated() -> None:
    limits = ConnectionLimits(max_clients=3, max_anonymous_clients=2)
    a, b = limits.admit(), limits.admit()
    assert a is not None and b is not None
    assert limits.admit() is None  # two handshakes under way
    a.authenticated()
    c = limits.admit()
    assert c is not None and (limits.clients, limits.anonymous) == (3, 2)
    c.authenticated()
    assert limits.admit() is None  # three clients
    with b:
        pass
    b.release()  # twice does nothing
    a.release()
    assert (limits.clients, limits.anonymous) == (1, 0)
    assert limits.refused == 2


def test_refusals_are_logged_once_per_interval() -> None:
    limits = ConnectionLimits(max_clients=1, max_anonymous_clients=1)
    assert limits.admit() is not None
    lines = []
    for now in (0.0, 1.0, 2.0, 11.0):
        assert limits.admit() is None
        lines.append(limits.refusal_message(now))
    assert lines[1] is None and lines[2] is None
    assert lines[0] is not None and "max_clients" in lines[0]
    assert lines[3] is not None and "(2 more refused" in lines[3]


@asynccontextmanager
async def _daemon(tmp: str, **options: int) -> AsyncIterator[tuple[str, Daemon, list[str]]]:
    log: list[str] = []
    uri = f"unix://{tmp}/d.sock"
    daemon = Daemon(state_dir=f"{tmp}/state", listen=[uri], log=log.append, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield uri, daemon, log
        finally:
            nursery.cancel_scope.cancel()


async def _silent(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    try:
        await sock.send(b"TUN")  # part of a preface, never the rest
    except BrokenPipeError:
        pass  # refused before it said anything
    return sock


async def _closed_by_daemon(sock: trio.socket.SocketType) -> bool:
    """Read until the daemon closes *sock* (a reset if it did so without reading what was sent)."""
    try:
        while await sock.recv(4096):
            pass  # the daemon's own preface and SETTINGS
    except ConnectionResetError:
        pass
    return True


async def _wait_for(predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await trio.sleep(0.01)


async def test_excess_anonymous_connections_are_refused_and_the_daemon_still_answers(tmp_path: object) -> None:
    with trio.fail_after(20):
        async with _daemon(str(tmp_path), max_clients=4, max_anonymous_clients=2) as (uri, daemon, log):
            path = uri[len("unix://") :]
            held = [await _silent(path), await _silent(path)]
            await _wait_for(lambda: daemon.limits.anonymous == 2)
            refused = await _silent(path)
            assert await _closed_by_daemon(refused)  # closed at once, nothing read
            assert any("refused a connection" in line and "max_anonymous_clients" in line for line in log), log
            held.pop().close()
            await _wait_for(lambda: daemon.limits.anonymous == 1)
            # An authenticated client takes a slot but no anonymous one.
            async with connect(uri) as first, connect(uri) as second:
                assert await first.list() == []
                assert await second.list() == []
                assert (daemon.limits.clients, daemon.limits.anonymous) == (3, 1)
                extra = await _silent(path)
                await _wait_for(lambda: daemon.limits.clients == 4)
                over = await _silent(path)  # a fifth client: over max_clients
                assert await _closed_by_daemon(over)
                assert daemon.limits.refused == 2  # logged with the next message (one per 10 s)
                assert await first.list() == []
                for sock in (extra, over, *held, refused):
                    sock.close()
            await _wait_for(lambda: daemon.limits.clients == 0)
            assert daemon.limits.anonymous == 0


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    async with _daemon(str(tmp_path), max_anonymous_clients=1) as (uri, daemon, _log):
        path = uri[len("unix://") :]
        sock = await _silent(path)
        with trio.fail_after(60):
            assert await _closed_by_daemon(sock)  # the daemon gave up on the handshake
            await _wait_for(lambda: daemon.limits.anonymous == 0)
        sock.close()
        async with connect(uri) as client:
            assert await client.list() == []


def test_listen_backlog_is_512() -> None:
    from tunnel.daemon import _net

    assert _net.BACKLOG == 512
