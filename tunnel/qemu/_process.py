"""QEMU processes that outlive the daemon that started them.

Theory of operation.

*Lifetime.*  Restarting the daemon never touches a running guest (libvirt's
promise), so QEMU gets no death signal: it runs in its own session (a Ctrl-C
in the daemon's terminal reaches the daemon, not the guests), with stdin from
``/dev/null`` and stdout/stderr appended to a named log file that stays valid
after the daemon is gone.  A daemon that exits and leaves its guests running
calls :meth:`QemuProcess.detach`; the next one finds them again with
:meth:`QemuProcess.attach`.

*Layout.*  Everything about one guest lives in its guest directory (created
0700 if missing; :class:`GuestFiles` names the paths):

* ``qmp.sock``: the QMP monitor, ``-qmp unix:<dir>/qmp.sock,server=on,wait=off``;
* ``qemu.pid``: QEMU's own ``-pidfile``, what :meth:`~QemuProcess.attach` starts from;
* ``qemu.log``: QEMU's stdout and stderr, appended, kept after :meth:`~QemuProcess.stop`.

QEMU's working directory is the guest directory, so relative paths in its
arguments (and in ``pmemsave``) land there.  Besides ``-qmp`` and
``-pidfile``, :meth:`~QemuProcess.start` adds only the binary in front,
``-sandbox`` (below), ``-S`` when paused or incoming (an incoming guest must
not run before its state has arrived) and ``-incoming defer`` when incoming
(the source is given later with ``migrate-incoming``).  Everything else
(machine, memory, devices, ``-display none``) is the caller's.

*Confinement.*  ``sandbox=True`` (the default) adds QEMU's seccomp filter
:data:`SANDBOX`: no obsolete system calls, no setuid, no fork or exec (the
kernel kills a QEMU that tries, e.g. for an ``exec:`` migration, with
SIGSYS), no scheduler or resource-limit changes.  Migration over fds and
sockets is unaffected.  ``user=`` runs QEMU as that user, its primary group
and no supplementary groups, switched in the child before exec so QEMU never
runs as root (the daemon needs root for this), and gives the guest directory
to that user so QEMU can create its socket and pidfile.  The rest is the
caller's business: the directories above the guest directory must be
searchable by that user, and files QEMU opens itself (disk images, a
``loader`` device's file) readable by it.

*Exit.*  Exit is observed through a pidfd (Linux >= 5.3): no thread, no
SIGCHLD handler, and a signal sent through it never reaches a stranger that
reused the pid.  Only a parent learns an exit status: a QEMU from
:meth:`~QemuProcess.start` reports its status (negative: killed by that
signal), an attached one reports ``None`` ("exited, status unknown"; use
:attr:`~QemuProcess.exited` to tell exit from running).

*Zombies.*  A started QEMU stays the daemon's child, so its exit status is
known.  A child that is detached and exits while the daemon still runs would
stay a zombie: :meth:`~QemuProcess.detach` hands it to a trio system task
that waits on (a duplicate of) its pidfd and reaps it.  The task ends with
``trio.run``; once the daemon's process exits, the kernel reparents QEMU to
init (or the nearest subreaper), which reaps it in turn.

*Identity.*  A pidfile can be stale and its pid reused.  :meth:`attach`
opens a pidfd on the pid (pinning that process), checks that its
``/proc/PID/cmdline`` holds this guest directory's exact ``-qmp`` argument,
then that the pidfd still reports the process alive, so the command line
read was that process's own; only then does it talk QMP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import select
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import trio

from ._errors import QemuError, QemuGone, QemuStartError, QMPConnectionClosed, QMPError
from ._qmp import QMPClient

__all__ = ["SANDBOX", "GuestFiles", "QemuProcess", "qemu_binary"]

QEMU_BINARY = "qemu-system-x86_64"
#: Environment variable naming the QEMU binary (a path or a name looked up in PATH).
QEMU_ENV = "TUNNEL_QEMU"
#: The ``-sandbox`` value of a sandboxed QEMU (seccomp; all four options exist since QEMU 2.11).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL
_LOG_TAIL = 4096


def qemu_binary() -> str | None:
    """The QEMU binary to run: ``$TUNNEL_QEMU`` if set, else ``qemu-system-x86_64`` from PATH."""
    return shutil.which(os.environ.get(QEMU_ENV) or QEMU_BINARY)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestFiles:
    """The paths of one guest's directory (see the module docstring); all absolute."""

    directory: str
    qmp: str
    pidfile: str
    log: str

    @classmethod
    def of(cls, guest_dir: str) -> GuestFiles:
        directory = os.path.abspath(guest_dir)
        return cls(
            directory=directory,
            qmp=os.path.join(directory, "qmp.sock"),
            pidfile=os.path.join(directory, "qemu.pid"),
            log=os.path.join(directory, "qemu.log"),
        )

    @property
    def qmp_arg(self) -> str:
        """QEMU's ``-qmp`` value; :meth:`QemuProcess.attach` recognises its QEMU by it."""
        return f"unix:{self.qmp.replace(',', ',,')},server=on,wait=off"


class QemuProcess:
    """One running QEMU and the daemon's handles on it; see the module docstring.

    Create with :meth:`start` or :meth:`attach`.  The object owns the QMP
    connection, the pidfd and the log fd; :meth:`stop` ends QEMU and closes
    them, :meth:`detach` closes them and leaves QEMU running.
    """

    def __init__(
        self,
        *,
        pid: int,
        pidfd: int,
        files: GuestFiles,
        log_fd: int,
        name: str,
        popen: subprocess.Popen[bytes] | None,
        owns_dir: bool = False,
    ) -> None:
        self.name = name
        self.pid = pid
        self.files = files
        self._pidfd = pidfd  # -1 once closed
        self._popen = popen  # None when attached: not our child, no exit status
        self._log_fd = log_fd  # -1: no log (attached to a guest whose log is gone)
        self._owns_dir = owns_dir  # the deprecated run_dir layout: remove the directory on stop if empty
        self._qmp: QMPClient | None = None
        self._exited = False  # exit seen through the pidfd (what is left to know once it is closed)
        self._closed = False  # stop() or detach() ran
        self._detached = False

    # ------------------------------------------------------------------ start

    @classmethod
    async def start(
        cls,
        args: Sequence[str],
        *,
        guest_dir: str | None = None,
        name: str,
        incoming: bool = False,
        paused: bool = False,
        sandbox: bool = True,
        user: str | None = None,
        binary: str | None = None,
        start_timeout: float = 60.0,
        run_dir: str | None = None,
        log_path: str | None = None,
    ) -> QemuProcess:
        """Start QEMU with *args* (no binary, ``-qmp`` or ``-pidfile``) in *guest_dir* and connect to its monitor.

        ``run_dir=`` and ``log_path=`` are the deprecated layout: the guest
        directory is then ``run_dir/NAME`` (removed on stop if empty) and the
        log goes to *log_path* if given, where :meth:`attach` will not find it.

        Raises :class:`QemuStartError`, quoting QEMU's own message, if QEMU
        cannot be found, exits early, or does not greet within *start_timeout*
        seconds (generous: ``-mem-prealloc`` of a big guest delays the greeting).
        """
        if (guest_dir is None) == (run_dir is None):
            raise TypeError("QemuProcess.start() needs exactly one of guest_dir= and the deprecated run_dir=")
        if guest_dir is not None:
            if log_path is not None:
                raise TypeError("log_path= goes with the deprecated run_dir=; the log of guest_dir= is guest_dir/qemu.log")
            files = GuestFiles.of(guest_dir)
        else:
            assert run_dir is not None
            files = GuestFiles.of(os.path.join(run_dir, name))
            if log_path is not None:
                files = dataclasses.replace(files, log=os.path.abspath(log_path))
        exe = binary or qemu_binary()
        if exe is None:
            raise QemuStartError(f"{QEMU_BINARY} not found in PATH (set ${QEMU_ENV} to choose a binary)")
        if len(os.fsencode(files.qmp)) > _SUN_PATH_MAX:
            raise QemuStartError(f"QMP socket path too long for a unix socket ({len(files.qmp)} > {_SUN_PATH_MAX}): {files.qmp}")
        ids = _user_ids(user) if user is not None else None
        _make_guest_dir(files.directory, ids)
        await _remove_stale_socket(files.qmp)
        # No QEMU listens here, so a pidfile is a leftover (perhaps root's, which a QEMU run as *user* could not rewrite).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.pidfile)
        command = [exe, *args, "-qmp", files.qmp_arg, "-pidfile", files.pidfile]
        if sandbox:
            command += ["-sandbox", SANDBOX]
        if paused or incoming:
            command.append("-S")
        if incoming:
            command += ["-incoming", "defer"]

        popen, log_fd = _spawn(command, files, ids)
        proc = cls(
            pid=popen.pid,
            pidfd=os.pidfd_open(popen.pid),
            files=files,
            log_fd=log_fd,
            name=name,
            popen=popen,
            owns_dir=run_dir is not None,
        )
        try:
            proc._qmp = await proc._connect_qmp(start_timeout)
            # QEMU writes its pidfile before it opens the monitor; attach() depends on it.
            try:
                written: int | None = _read_pid(files.pidfile)
            except (OSError, ValueError):
                written = None
            if written != proc.pid:
                raise QemuStartError(
                    f"QEMU ({name}) did not write its pid to {files.pidfile} (does *args* set its own -pidfile?)"
                )
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
        if self.exited:
            raise QemuStartError(f"QEMU ({self.name}) exited during start", log_tail=self.log_tail(), returncode=self.returncode)
        raise QemuStartError(f"QEMU ({self.name}) did not answer on {self.qmp_path} within {timeout} s", log_tail=self.log_tail())

    # ----------------------------------------------------------------- attach

    @classmethod
    async def attach(cls, *, guest_dir: str, name: str, timeout: float = 10.0) -> QemuProcess:
        """Take over the QEMU running in *guest_dir* (started by an earlier daemon) and connect to its monitor.

        The result is not this process's child: :meth:`wait` and :meth:`stop`
        return ``None`` for its exit status.  Raises :class:`QemuGone` if the
        pidfile is missing or stale, its pid is not this guest's QEMU, or
        QEMU does not answer QMP within *timeout* seconds (QEMU serves one
        QMP client at a time: another daemon may still be connected).
        """
        files = GuestFiles.of(guest_dir)
        try:
            pid = _read_pid(files.pidfile)
        except FileNotFoundError:
            raise QemuGone(f"guest {name!r} is not running: no pidfile {files.pidfile}") from None
        except (OSError, ValueError) as exc:
            raise QemuGone(f"guest {name!r}: unreadable pidfile {files.pidfile} ({exc}); remove it and start the guest") from None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise QemuGone(f"guest {name!r} is not running: stale pidfile {files.pidfile} names no process ({pid})") from None
        try:
            if _pidfd_exited(pidfd):
                raise QemuGone(f"guest {name!r} is not running: its QEMU (pid {pid}) has exited")
            is_ours = _runs_qmp_arg(pid, files.qmp_arg)
            # Still alive after the read: the command line was this process's, not a successor's under a reused pid.
            if _pidfd_exited(pidfd):
                raise QemuGone(f"guest {name!r} is not running: its QEMU (pid {pid}) has exited")
            if not is_ours:
                raise QemuGone(f"guest {name!r}: stale pidfile {files.pidfile}: pid {pid} is not the QEMU of {files.directory}")
        except BaseException:
            os.close(pidfd)
            raise
        try:
            log_fd = os.open(files.log, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            log_fd = -1  # log_tail() is then empty; the guest is no less alive
        proc = cls(pid=pid, pidfd=pidfd, files=files, log_fd=log_fd, name=name, popen=None)
        try:
            with trio.move_on_after(timeout) as scope:
                proc._qmp = await QMPClient.connect(files.qmp)
            if scope.cancelled_caught:
                raise QemuGone(
                    f"QEMU of guest {name!r} (pid {pid}) did not answer on {files.qmp} within {timeout} s; is another client connected?"
                )
        except QMPError as exc:
            await proc._release()
            raise QemuGone(f"QEMU of guest {name!r} (pid {pid}) does not answer QMP on {files.qmp}: {exc}") from None
        except BaseException:
            await proc._release()  # an attach that fails never stops the guest
            raise
        return proc

    # ---------------------------------------------------------------- running

    @property
    def qmp(self) -> QMPClient:
        assert self._qmp is not None
        return self._qmp

    @property
    def qmp_path(self) -> str:
        return self.files.qmp

    @property
    def guest_dir(self) -> str:
        return self.files.directory

    @property
    def is_child(self) -> bool:
        """Whether this process started QEMU (and so can learn its exit status)."""
        return self._popen is not None

    @property
    def exited(self) -> bool:
        """Whether QEMU has exited, child or not."""
        if self._popen is not None and self._popen.poll() is not None:
            return True
        if self._pidfd >= 0 and not self._exited:
            self._exited = _pidfd_exited(self._pidfd)
        return self._exited

    @property
    def returncode(self) -> int | None:
        """The exit status once QEMU has exited (negative: killed by that signal), else None.

        Always None for an attached or detached QEMU: only the parent learns
        the status.  :attr:`exited` tells whether it has exited.
        """
        return self._popen.poll() if self._popen is not None else None

    async def wait(self) -> int | None:
        """Wait for QEMU to exit; return its exit status, or None when it is not our child."""
        await self._wait_exit()
        return self._popen.wait() if self._popen is not None else None

    async def _wait_exit(self) -> None:
        if self._detached:
            raise QemuError(f"QEMU ({self.name}, pid {self.pid}) was detached; attach() to it again to watch it")
        if self._pidfd < 0:
            await trio.lowlevel.checkpoint()
            return
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
        except trio.ClosedResourceError:
            # detach() (or a stop() that gave up) closed the pidfd under us.
            raise QemuError(f"QEMU ({self.name}, pid {self.pid}) is no longer watched: its handles were closed") from None
        self._exited = True

    def log_tail(self, limit: int = _LOG_TAIL) -> str:
        """The last *limit* bytes QEMU wrote to stdout/stderr."""
        if self._log_fd < 0:
            return ""
        try:
            size = os.fstat(self._log_fd).st_size
            return os.pread(self._log_fd, limit, max(0, size - limit)).decode(errors="replace")
        except OSError:
            return ""

    # --------------------------------------------------------------- stopping

    async def stop(self, timeout: float = 5.0) -> int | None:
        """Stop QEMU: QMP ``quit``, then SIGTERM, then SIGKILL, *timeout* seconds each.

        Idempotent.  Closes the handles, reaps a child, removes ``qmp.sock``
        and ``qemu.pid`` (the log stays).  Returns the exit status, None when
        QEMU was attached (not our child).  Refuses a detached QEMU.
        """
        if self._detached:
            raise QemuError(f"QEMU ({self.name}, pid {self.pid}) was detached; attach() to it again to stop it")
        if self._closed:
            await trio.lowlevel.checkpoint()
            return self.returncode
        if not self.exited and self._qmp is not None and not self._qmp.closed:
            with trio.move_on_after(timeout):
                with contextlib.suppress(QMPError):
                    await self._qmp.execute("quit")
                await self._wait_exit()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.exited:
                break
            with contextlib.suppress(ProcessLookupError):
                # Through the pidfd: never a stranger that reused the pid.
                signal.pidfd_send_signal(self._pidfd, sig)
            with trio.move_on_after(timeout if sig == signal.SIGTERM else 60):
                await self._wait_exit()
        exited = self.exited  # for a child, poll() here has reaped it
        await self._release()
        if not exited:  # pragma: no cover - stuck in the kernel (uninterruptible sleep)
            raise QemuError(f"QEMU ({self.name}, pid {self.pid}) did not exit after SIGKILL")
        self._remove_files()
        return self.returncode

    async def detach(self) -> None:
        """Close the QMP connection, the pidfd and the log fd, and leave QEMU running.

        For a daemon that exits and leaves its guests to the next one
        (:meth:`attach`).  A child is handed to a reaper (module docstring,
        "Zombies").  Idempotent; a stopped QEMU stays stopped.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._detached = True
        popen, self._popen = self._popen, None
        if popen is not None and popen.poll() is None:
            # The reaper owns a duplicate: the original is closed below, waking any task in wait().
            trio.lowlevel.spawn_system_task(_reap, popen, os.dup(self._pidfd), name=f"reap QEMU {self.name} (pid {self.pid})")
        await self._release()

    async def _release(self) -> None:
        """Close every handle this object owns; QEMU itself is untouched."""
        self._closed = True
        if self._pidfd >= 0:
            self._exited = self._exited or _pidfd_exited(self._pidfd)
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._qmp is not None:
            await self._qmp.aclose()
        else:
            await trio.lowlevel.checkpoint()

    def _remove_files(self) -> None:
        """After exit: the socket and pidfile are leftovers (QEMU removes the pidfile itself only on a clean exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.files.qmp)
        with contextlib.suppress(OSError, ValueError):
            if _read_pid(self.files.pidfile) == self.pid:  # never a successor's
                os.unlink(self.files.pidfile)
        if self._owns_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.files.directory)  # only when empty: a log inside stays, with its directory

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Shielded so that a cancelled caller still stops its guest; stop() bounds itself.
        if self._detached:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):
            await self.stop()

    def __repr__(self) -> str:
        state = "detached" if self._detached else "exited" if self._closed or self.exited else "running"
        return f"<QemuProcess {self.name} pid={self.pid} {state} returncode={self.returncode}>"


def _user_ids(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise QemuStartError(f"cannot run QEMU as {user!r}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def _make_guest_dir(directory: str, ids: tuple[int, int] | None) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if ids is not None:
            os.chown(directory, *ids)  # QEMU creates its socket and pidfile here
    except OSError as exc:
        raise QemuStartError(f"cannot prepare the guest directory {directory}: {exc}") from exc


def _spawn(command: list[str], files: GuestFiles, ids: tuple[int, int] | None) -> tuple[subprocess.Popen[bytes], int]:
    """Start QEMU in its own session and its guest directory, output appended to the log; return it and the log fd."""
    try:
        # Read-write so that log_tail() can pread what QEMU appended through its copy.
        log_fd = os.open(files.log, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise QemuStartError(f"cannot open the QEMU log {files.log}: {exc}") from exc
    try:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            cwd=files.directory,
            user=ids[0] if ids is not None else None,
            group=ids[1] if ids is not None else None,
            extra_groups=[] if ids is not None else None,
        )
    except OSError as exc:
        os.close(log_fd)
        raise QemuStartError(f"cannot execute {command[0]}: {exc}") from exc
    return popen, log_fd


async def _reap(popen: subprocess.Popen[bytes], pidfd: int) -> None:
    """System task: reap a detached child when it exits, or give up when trio.run ends."""
    try:
        await trio.lowlevel.wait_readable(pidfd)
        popen.poll()
    finally:
        os.close(pidfd)


def _read_pid(pidfile: str) -> int:
    with open(pidfile, "rb") as f:
        pid = int(f.read(32).strip())
    if pid <= 0:
        raise ValueError(f"bad pid {pid}")
    return pid


def _pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (zombies included)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _runs_qmp_arg(pid: int, qmp_arg: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return os.fsencode(qmp_arg) in argv


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
        raise QemuStartError(f"QMP socket {path} is in use by a running QEMU (attach to it, or stop it first)")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
