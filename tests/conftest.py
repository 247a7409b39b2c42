"""Shared fixtures: connected tunnel pairs over several real and in-memory transports."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import tunnel
from tunnel.transport import TunnelConnection, open_connection

TransportPair = Callable[[], "asynccontextmanager[tuple[trio.abc.Stream, trio.abc.Stream]]"]


@asynccontextmanager
async def memory_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    a, b = trio.testing.memory_stream_pair()
    yield a, b


@asynccontextmanager
async def lockstep_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    a, b = trio.testing.lockstep_stream_pair()
    yield a, b


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
        yield client, server
    finally:
        for listener in listeners:
            await listener.aclose()


@asynccontextmanager
async def unix_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    a, b = trio.socket.socketpair()
    yield trio.SocketStream(a), trio.SocketStream(b)


@asynccontextmanager
async def tls_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("tunnel.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with tcp_pair() as (raw_client, raw_server):
        client = trio.SSLStream(raw_client, client_ctx, server_hostname="tunnel.test")
        server = trio.SSLStream(raw_server, server_ctx, server_side=True)
        yield client, server


@asynccontextmanager
async def tls_bulk_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    """:class:`tunnel.transport.TLSStream` over TCP, mutual TLS as between daemons."""
    from tunnel.transport import TLSStream

    client_ctx, server_ctx = mutual_tls_contexts()
    async with tcp_pair() as (raw_client, raw_server):
        client = TLSStream(raw_client, client_ctx, server_hostname="tunnel.test")
        server = TLSStream(raw_server, server_ctx, server_side=True)
        yield client, server


def mutual_tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client, server) contexts for "tunnel.test", each requiring the other's certificate, tuned as the daemon's."""
    import trustme

    from tunnel.transport import tune_context

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("tunnel.test").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca.issue_cert("client.test", common_name="client.test").configure_cert(client_ctx)
    return tune_context(client_ctx), tune_context(server_ctx)


TRANSPORTS = {"memory": memory_pair, "tcp": tcp_pair, "unix": unix_pair, "tls": tls_pair, "tls_bulk": tls_bulk_pair}


@asynccontextmanager
async def connected(
    pair: Callable[[], object] = memory_pair,
    *,
    client_settings: tunnel.Settings | None = None,
    server_settings: tunnel.Settings | None = None,
    **kwargs: object,
) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    """Two tunnel connections joined by a transport pair, both running."""
    async with pair() as (a, b):  # type: ignore[operator]
        async with trio.open_nursery() as nursery:
            server_ready: trio.Event = trio.Event()
            holder: dict[str, TunnelConnection] = {}
            done = trio.Event()

            async def run_server() -> None:
                async with open_connection(b, client=False, settings=server_settings, **kwargs) as conn:  # type: ignore[arg-type]
                    holder["server"] = conn
                    server_ready.set()
                    await done.wait()

            nursery.start_soon(run_server)
            async with open_connection(a, client=True, settings=client_settings, **kwargs) as client:  # type: ignore[arg-type]
                await server_ready.wait()
                try:
                    yield client, holder["server"]
                finally:
                    done.set()


@pytest.fixture
async def fd_leak_check() -> AsyncIterator[None]:
    """The test leaves no file descriptor open (tests/fdcheck.py).  Take it as an
    argument: pytest-trio runs async fixtures named there, not in ``usefixtures``."""
    from fdcheck import no_fd_leak

    async with no_fd_leak():
        yield


def pytest_sessionstart(session: pytest.Session) -> None:
    """Install QEMU for tests/test_qemu.py when it is missing and this run can (root, apt-get).

    Otherwise, or if the install fails, the QEMU tests skip and say why.  Set
    TUNNEL_NO_INSTALL=1 to never install anything.
    """
    import os
    import shutil
    import subprocess

    if os.environ.get("TUNNEL_QEMU") or os.environ.get("TUNNEL_NO_INSTALL") or shutil.which("qemu-system-x86_64"):
        return  # a chosen binary (TUNNEL_QEMU) is never second-guessed
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def run(*args: str) -> bool:
        print(f"conftest: qemu-system-x86_64 not found; running: apt-get {' '.join(args)}", flush=True)
        try:
            done = subprocess.run([apt, *args], env=env, stdin=subprocess.DEVNULL, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"conftest: apt-get failed: {exc}", flush=True)
            return False
        return done.returncode == 0

    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        install = ("install", "-y", "-q", "qemu-system-x86")
        if not run(*install) and (not run("update", "-q") or not run(*install)):
            print("conftest: could not install qemu-system-x86; the QEMU tests will be skipped", flush=True)
