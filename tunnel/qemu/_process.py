"""Supervised QEMU processes.

:meth:`QemuProcess.start` adds to the caller's arguments only what
supervision needs, in this order:

* the binary (:func:`qemu_binary`) in front;
* ``-qmp unix:<run_dir>/<name>.qmp,server=on,wait=off``, the monitor this
  class talks to;
* ``-S`` when ``paused`` or ``incoming`` (an incoming guest must not run
  before its state has arrived; the caller sends ``cont`` afterwards);
* ``-incoming defer`` when ``incoming`` (the migration source is given later
  with ``migrate-incoming``, e.g. an fd passed over QMP).

Everything else (machine, memory, devices, ``-nodefaults``, ``-display
none``, ``-mem-prealloc``) is the caller's.  QEMU's stdout and stderr go to
``log_path`` when given (appended), otherwise to an unlinked temporary file
in ``run_dir``; either way :meth:`QemuProcess.log_tail` reads the end, and a
start failure quotes it.

Children never outlive the supervisor: the child asks the kernel for
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``).  The kernel ties
that signal to the *thread* that forked, so the fork happens here, in the
calling (trio) thread: ``trio.lowlevel.open_process`` forks in a worker
thread that exits when idle, which would kill QEMU ten seconds later.  A
fork is a few milliseconds, so doing it inline costs nothing noticeable.
The child also gets its own session, so a Ctrl-C in the daemon's terminal
reaches the daemon, which then stops its guests cleanly, and not the guests.

Exit is observed through a pidfd (Linux >= 5.3), so waiting needs no thread
and no SIGCHLD handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO, Self

import trio

from ._errors import QemuError, QemuStartError, QMPConnectionClosed, QMPError
from ._qmp import QMPClient

__all__ = ["QemuProcess", "qemu_binary"]

QEMU_BINARY = "qemu-system-x86_64"
#: Environment variable naming the QEMU binary (a path or a name looked up in PATH).
QEMU_ENV = "TUNNEL_QEMU"
_PR_SET_PDEATHSIG = 1
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL
_LOG_TAIL = 4096

# Resolved here, in the parent: the forked child should only call into libc.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def qemu_binary() -> str | None:
    """The QEMU binary to run: ``$TUNNEL_QEMU`` if set, else ``qemu-system-x86_64`` from PATH."""
    return shutil.which(os.environ.get(QEMU_ENV) or QEMU_BINARY)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the forked child before exec."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        # The parent died between fork and prctl: the signal will never come.
        os._exit(1)


class QemuProcess:
    """One running QEMU and its QMP connection; see the module docstring."""

    def __init__(self, popen: subprocess.Popen[bytes], *, qmp_path: str, log: IO[bytes], name: str) -> None:
        self._popen = popen
        self._pidfd = os.pidfd_open(popen.pid)
        self._log = log
        self.name = name
        self.pid = popen.pid
        self.qmp_path = qmp_path
        self._qmp: QMPClient | None = None
        self._stopped = False

    # ------------------------------------------------------------------ start

    @classmethod
    async def start(
        cls,
        args: Sequence[str],
        *,
        run_dir: str,
        name: str,
        incoming: bool = False,
        paused: bool = False,
        log_path: str | None = None,
        binary: str | None = None,
        start_timeout: float = 60.0,
    ) -> QemuProcess:
        """Start QEMU with *args* (no binary, no ``-qmp``) and connect to its monitor.

        Raises :class:`QemuStartError`, quoting QEMU's own message, if QEMU
        cannot be found, exits early, or does not greet within *start_timeout*
        seconds (generous: ``-mem-prealloc`` of a big guest delays the greeting).
        """
        exe = binary or qemu_binary()
        if exe is None:
            raise QemuStartError(f"{QEMU_BINARY} not found in PATH (set ${QEMU_ENV} to choose a binary)")
        qmp_path = os.path.join(run_dir, f"{name}.qmp")
        if len(os.fsencode(qmp_path)) > _SUN_PATH_MAX:
            raise QemuStartError(f"QMP socket path too long for a unix socket ({len(qmp_path)} > {_SUN_PATH_MAX}): {qmp_path}")
        await _remove_stale_socket(qmp_path)
        command = [exe, *args, "-qmp", f"unix:{qmp_path.replace(',', ',,')},server=on,wait=off"]
        if paused or incoming:
            command.append("-S")
        if incoming:
            command += ["-incoming", "defer"]

        popen, log = _spawn(command, run_dir=run_dir, name=name, log_path=log_path)
        proc = cls(popen, qmp_path=qmp_path, log=log, name=name)
        try:
            proc._qmp = await proc._connect_qmp(start_timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await proc.stop(timeout=2)
            raise
        return proc

    async def _connect_qmp(self, timeout: float) -> QMPClient:
        """Wait for the monitor socket and its greeting, racing against QEMU exiting."""
        result: list[QMPClient] = []

        async def watch_exit(scope: trio.CancelScope) -> None:
            await self._wait_exit()
            scope.cancel()

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_exit, nursery.cancel_scope)
                delay = 0.005
                while True:
                    if os.path.exists(self.qmp_path):
                        try:
                            result.append(await QMPClient.connect(self.qmp_path))
                            break
                        except QMPConnectionClosed:
                            pass  # bound but not yet listening, or QEMU is exiting
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.1)
                nursery.cancel_scope.cancel()
        if result:
            return result[0]
        if self.returncode is not None:
            raise QemuStartError(f"QEMU ({self.name}) exited during start", log_tail=self.log_tail(), returncode=self.returncode)
        raise QemuStartError(f"QEMU ({self.name}) did not answer on {self.qmp_path} within {timeout} s", log_tail=self.log_tail())

    # ---------------------------------------------------------------- running

    @property
    def qmp(self) -> QMPClient:
        assert self._qmp is not None
        return self._qmp

    @property
    def returncode(self) -> int | None:
        """The exit status once QEMU has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait for QEMU to exit and return its exit status."""
        await self._wait_exit()
        return self._popen.wait()

    async def _wait_exit(self) -> None:
        if self._pidfd >= 0:
            await trio.lowlevel.wait_readable(self._pidfd)
        else:
            await trio.lowlevel.checkpoint()

    def log_tail(self, limit: int = _LOG_TAIL) -> str:
        """The last *limit* bytes QEMU wrote to stdout/stderr."""
        try:
            self._log.flush()
            size = os.fstat(self._log.fileno()).st_size
            return os.pread(self._log.fileno(), limit, max(0, size - limit)).decode(errors="replace")
        except (OSError, ValueError):
            return ""

    # --------------------------------------------------------------- stopping

    async def stop(self, timeout: float = 5.0) -> int:
        """Stop QEMU: QMP ``quit``, then SIGTERM, then SIGKILL, *timeout* seconds each.

        Idempotent.  Closes the QMP connection, reaps the process, removes the
        QMP socket and closes the log.  Returns the exit status.
        """
        if self.returncode is None and self._qmp is not None and not self._qmp.closed:
            with trio.move_on_after(timeout):
                with contextlib.suppress(QMPError):
                    await self._qmp.execute("quit")
                await self._wait_exit()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                # Through the pidfd: never a stranger that reused the pid.
                signal.pidfd_send_signal(self._pidfd, sig)
            with trio.move_on_after(timeout if sig == signal.SIGTERM else 60):
                await self._wait_exit()
        returncode = self._popen.poll()  # the pidfd said it exited: this reaps it
        await self._cleanup()
        if returncode is None:  # pragma: no cover - stuck in the kernel (uninterruptible sleep)
            raise QemuError(f"QEMU ({self.name}, pid {self.pid}) did not exit after SIGKILL")
        return returncode

    async def _cleanup(self) -> None:
        if self._stopped:
            await trio.lowlevel.checkpoint()
            return
        self._stopped = True
        if self._qmp is not None:
            await self._qmp.aclose()
        else:
            await trio.lowlevel.checkpoint()
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        self._log.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Shielded so that a cancelled caller still stops its guest; stop() bounds itself.
        with trio.CancelScope(shield=True):
            await self.stop()

    def __repr__(self) -> str:
        return f"<QemuProcess {self.name} pid={self.pid} returncode={self.returncode}>"


def _spawn(command: list[str], *, run_dir: str, name: str, log_path: str | None) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Fork and exec QEMU in the calling thread (see the module docstring for why not a worker thread)."""
    if log_path is not None:
        log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - owned by the QemuProcess
    else:
        log = tempfile.TemporaryFile(dir=run_dir, prefix=f".{name}-", suffix=".log")  # noqa: SIM115
    try:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),  # noqa: PLW1509 - see module docstring
        )
    except OSError as exc:
        log.close()
        raise QemuStartError(f"cannot execute {command[0]}: {exc}") from exc
    return popen, log


async def _remove_stale_socket(path: str) -> None:
    """Remove a QMP socket left by a QEMU that was killed; refuse one still in use."""
    if not os.path.exists(path):
        await trio.lowlevel.checkpoint()
        return
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except OSError:
        pass  # refused: nobody listens, the file is stale
    else:
        raise QemuStartError(f"QMP socket {path} is in use by a running QEMU")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
