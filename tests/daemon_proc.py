"""Real daemon processes for tests: ``python -m tunnel daemon`` started, waited for and stopped.

    async with daemon_process(tmp, "src", "--listen", f"unix://{tmp}/src.sock") as d:
        ...  # d.pid, d.log(), d.rss_kib(), d.state_dir

The daemon's stderr goes to a file (``d.log()`` reads it), so a test can
check what the operator would read.  On exit the daemon gets SIGTERM, then
SIGKILL; QEMU processes it started that are still alive afterwards are
killed by :func:`kill_guests` (guests outlive the daemon by design).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trustme

from tunnel.daemon import TLSFiles

__all__ = ["Certs", "DaemonProcess", "daemon_process", "free_port", "kill_guests", "pid_alive", "qemu_pids_under"]


class Certs:
    """A CA and, per name, a certificate for 127.0.0.1/localhost whose CN is that name."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = os.path.join(directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)

    def files(self, name: str, *, ca: trustme.CA | None = None, **kwargs: Any) -> TLSFiles:
        path = os.path.join(self.directory, f"{name}.pem")
        cert = (ca or self.ca).issue_cert("127.0.0.1", "localhost", common_name=name, **kwargs)
        cert.private_key_and_cert_chain_pem.write_to_path(path)
        return TLSFiles(cert=path, key=path, ca=self.ca_path)

    def daemon_args(self, name: str) -> list[str]:
        files = self.files(name)
        return ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def qemu_pids_under(directory: str) -> list[int]:
    """Live QEMU processes whose command line names a path under *directory*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(directory.encode() in a for a in argv) and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def kill_guests(directory: str) -> None:
    for pid in qemu_pids_under(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class DaemonProcess:
    proc: trio.Process
    state_dir: str
    log_path: str
    sockets: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            with trio.move_on_after(timeout):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


@asynccontextmanager
async def daemon_process(
    root: str, name: str, *args: str, sockets: Sequence[str] = (), ports: Sequence[int] = (), kill_qemus: bool = True
) -> AsyncIterator[DaemonProcess]:
    """Run ``tunnel daemon --state-dir ROOT/NAME ARGS`` until the body ends.

    Waits until every unix socket in *sockets* (default: those of ``--listen unix://``
    and ``--listen-ro`` in *args*) accepts and every TCP port in *ports* is open.
    """
    state_dir = os.path.join(root, name)
    log_path = os.path.join(root, f"{name}.log")
    if not sockets:
        sockets = [a[len("unix://") :] for a in args if a.startswith("unix://")]
    with open(log_path, "ab") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tunnel", "daemon", "--state-dir", state_dir, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
        )
    daemon = DaemonProcess(proc=proc, state_dir=state_dir, log_path=log_path, sockets=list(sockets))
    try:
        with trio.fail_after(30):
            while not all(_listening(p) for p in sockets) or not all([await _port_open(p) for p in ports]):
                if proc.poll() is not None:
                    raise AssertionError(f"daemon {name} exited: {daemon.log()}")
                await trio.sleep(0.05)
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            await daemon.stop()
            if kill_qemus:
                kill_guests(state_dir)


async def _port_open(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True
