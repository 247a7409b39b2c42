"""Tunnel streams pass trio's generic half-closeable stream checks.

The connection is carried over in-memory, lockstep ("clogged" transport),
TCP, unix-socket and TLS transports.  The clogged stream maker opens a
stream whose credit is used up in both directions: ``send_all`` and
``wait_send_all_might_not_block`` then block until the peer's
``receive_some`` hands back credit.
"""

from __future__ import annotations

import pytest
from conftest import TRANSPORTS, connected, lockstep_pair
from trio.testing import check_half_closeable_stream

import tunnel
from tunnel.transport import TunnelConnection, TunnelStream

WINDOW = 16 * 1024
SMALL = tunnel.Settings(initial_stream_window=WINDOW, connection_window=1024 * 1024)


async def _open_pair(client: TunnelConnection, server: TunnelConnection) -> tuple[TunnelStream, TunnelStream]:
    s = await client.open_stream(label="check")
    # The peer learns of a stream from its first frame: the open is already queued.
    r = await server.accept_stream()
    return s, r


async def _clog(stream: TunnelStream) -> None:
    """Use up this direction's credit: the peer does not read yet."""
    credit = stream.statistics().send_credit
    await stream.send_all(b"c" * credit)
    assert stream.statistics().send_credit == 0


@pytest.mark.parametrize("transport", sorted(TRANSPORTS) + ["lockstep"])
async def test_check_half_closeable_stream(transport: str) -> None:
    pair = lockstep_pair if transport == "lockstep" else TRANSPORTS[transport]
    async with connected(pair, client_settings=SMALL, server_settings=SMALL) as (client, server):

        async def maker() -> tuple[TunnelStream, TunnelStream]:
            return await _open_pair(client, server)

        async def clogged_maker() -> tuple[TunnelStream, TunnelStream]:
            s, r = await _open_pair(client, server)
            await _clog(s)
            await _clog(r)
            return s, r

        await check_half_closeable_stream(maker, clogged_maker)
        # Every stream the checks opened and closed is gone; the connection is intact.
        await client.ping()
