from __future__ import annotations

import os

import pytest
import trio
from conftest import TRANSPORTS, connected


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_stream_roundtrip(transport: str) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with connected(TRANSPORTS[transport]) as (client, server):
        async def send() -> None:
            s = await client.open_stream(label="x")
            await s.send_all(payload)
            await s.send_eof()
            assert await s.receive_some() == b""
            await s.aclose()

        got = bytearray()
        async with trio.open_nursery() as n:
            n.start_soon(send)
            r = await server.accept_stream()
            assert r.label == "x"
            while chunk := await r.receive_some():
                got += chunk
            await r.send_eof()
            await r.aclose()
        assert got == payload
