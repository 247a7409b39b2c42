"""The unix sockets of post-copy's preempt channel: only the guest's QEMU gets in on the source."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import trio

from tunnel.control import DaemonError
from tunnel.daemon._qemusock import QemuListener, connect_qemu, qemu_end

CONNECT_AND_SEND = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b"from the child")
s.recv(1)
"""


async def test_listener_accepts_the_named_process_only(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "out.sock")
    listener = QemuListener(path, pid=-1)  # the child's pid, once it exists
    assert listener.uri == f"unix:{path}"
    assert os.stat(path).st_mode & 0o777 == 0o600
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.connect(path)  # this process is not the one named, and it connects first
    child = subprocess.Popen([sys.executable, "-c", CONNECT_AND_SEND, path], stdin=subprocess.DEVNULL)
    try:
        listener.pid = child.pid
        with trio.fail_after(10):
            conn = await listener.accept()
        with conn:
            assert conn.recv(64) == b"from the child"
            conn.sendall(b"x")
        assert listener.refused == 1
        assert stranger.recv(1) == b""  # closed unread
        stranger.close()
        listener.close()
        assert not os.path.exists(path)
        with pytest.raises(trio.ClosedResourceError):
            await listener.accept()
    finally:
        child.kill()
        child.wait()


async def test_listener_replaces_a_leftover_socket_and_connect_reports_a_missing_one(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "out.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()
    listener = QemuListener(path, pid=os.getpid())
    with connect_qemu(path) as sock, trio.fail_after(10):
        conn = await listener.accept()
        with conn:
            sock.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 4 * 1024 * 1024
    listener.close()
    with pytest.raises(DaemonError, match="cannot connect to the incoming QEMU's migration socket"):
        connect_qemu(path)


async def test_qemu_end_is_the_other_process_own_socket(tmp_path: os.PathLike[str]) -> None:
    """What the daemon sizes on the source: the child's own end of its connection, not a socket like it."""
    path = os.path.join(tmp_path, "out.sock")
    listener = QemuListener(path, pid=-1)
    child = subprocess.Popen([sys.executable, "-c", CONNECT_AND_SEND, path], stdin=subprocess.DEVNULL)
    try:
        listener.pid = child.pid
        with trio.fail_after(10):
            conn = await listener.accept()
        end = await trio.to_thread.run_sync(qemu_end, child.pid, path)
        assert end is not None  # the tests run as root, who may ptrace the child
        with conn, end:
            assert conn.recv(64) == b"from the child"
            end.sendall(b"written through the duplicate")  # the child's socket: it arrives on our side of it
            assert conn.recv(64) == b"written through the duplicate"
            conn.sendall(b"x")
        assert qemu_end(child.pid, os.path.join(tmp_path, "elsewhere.sock")) is None
    finally:
        listener.close()
        child.kill()
        child.wait()
