"""Spawn a sender/receiver pair of this script over loopback TCP (bench helper)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import trio
from _common import child_result, run_child


def spawn_pair(script: str, extra: list[str], timeout: float = 600) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``script --role recv --fd N`` and ``script --role send --port P``; return (send, recv) results."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    fd = lsock.fileno()
    recv = subprocess.Popen(
        [sys.executable, os.path.abspath(script), "--role", "recv", "--fd", str(fd), *extra],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(fd,),
    )
    send = run_child([os.path.abspath(script), "--role", "send", "--port", str(port), *extra])
    lsock.close()
    try:
        r = child_result(recv, timeout)
        s = child_result(send, timeout)
    finally:
        for p in (recv, send):
            if p.poll() is None:
                p.kill()
    return s, r


async def connect(port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def accept(listener_fd: int) -> trio.abc.Stream:
    lsock = trio.socket.from_stdlib_socket(socket.socket(fileno=listener_fd))
    listener = trio.SocketListener(lsock)
    stream = await listener.accept()
    await listener.aclose()
    return stream


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]
