"""Helpers for the endpoint tests (no tests here): images, migrations between a reader and a writer."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from conftest import connected, memory_pair

from tunnel.endpoints import DestinationWriter, SourceReader, TransferResult, receive_into, send_source

PAGE = 4096


def make_image(path: str, pages: list[bytes | None], page_size: int = PAGE) -> None:
    """An image of len(pages) pages: None stays a hole, anything else is written (zeros too)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(pages) * page_size)
        for i, page in enumerate(pages):
            if page is not None:
                assert len(page) == page_size
                os.pwrite(fd, page, i * page_size)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def leftovers(directory: str) -> list[str]:
    """Temporary files a writer left behind."""
    return sorted(name for name in os.listdir(directory) if ".tmp-" in name)


@dataclass
class Outcome:
    source: TransferResult | BaseException
    destination: TransferResult | BaseException


async def migrate(
    reader: SourceReader,
    writer: DestinationWriter,
    *,
    pair: Callable[[], Any] = memory_pair,
    connect_options: dict[str, Any] | None = None,
    **send_options: Any,
) -> Outcome:
    """Run one migration over a connected pair; each side's result or exception, never raised."""
    results: dict[str, TransferResult | BaseException] = {}
    with trio.fail_after(120):
        async with connected(pair, **(connect_options or {})) as (client, server):

            async def destination() -> None:
                stream = await server.accept_stream()
                try:
                    results["destination"] = await receive_into(stream, writer)
                except Exception as exc:  # noqa: BLE001 - each side's outcome is what the tests inspect
                    results["destination"] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(destination)
                try:
                    results["source"] = await send_source(client, reader, **send_options)
                except Exception as exc:  # noqa: BLE001 - each side's outcome is what the tests inspect
                    results["source"] = exc
    return Outcome(source=results["source"], destination=results["destination"])
