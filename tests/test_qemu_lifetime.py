"""Guests outlive their daemon: detach, attach, the sandbox and an unprivileged QEMU, against real QEMU (TCG).

A "supervisor" here is a child Python process that starts a QEMU the way
the daemon does and then dies or leaves.  Every QEMU a test learns about is
pinned with a pidfd by :class:`Reaper`, which kills whatever is still
running when the test ends, however it ends.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import trio
from daemon_proc import pid_alive
from qemu_fixtures import base_args, requires_qemu, run_dir

from tunnel.qemu import QemuError, QemuGone, QemuProcess, QMPConnectionClosed, run_state

__all__ = ["run_dir"]  # fixture, imported for pytest

pytestmark = requires_qemu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _status_field(pid: int, key: str) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith(f"{key}:")).split()[1:]


class Reaper:
    """Last resort: pins each QEMU by pidfd when it is learned and SIGKILLs the ones left running at the end."""

    def __init__(self) -> None:
        self._pidfds: list[int] = []

    def add(self, pid: int) -> None:
        self._pidfds.append(os.pidfd_open(pid))

    def kill_all(self) -> None:
        for pidfd in self._pidfds:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited (perhaps a zombie of init): nothing to do
            finally:
                os.close(pidfd)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    guard = Reaper()
    try:
        yield guard
    finally:
        guard.kill_all()


async def _supervised(guest_dir: str, mode: str, reaper: Reaper) -> tuple[trio.Process, int]:
    """Run a supervisor that starts a paused QEMU in *guest_dir*, then sleeps (mode "sleep") or detaches and exits ("detach")."""
    code = textwrap.dedent(
        f"""
        import trio
        from tunnel.qemu import QemuProcess

        async def main():
            vm = await QemuProcess.start({base_args()!r}, guest_dir={guest_dir!r}, name="vm", paused=True)
            if {mode!r} == "detach":
                await vm.detach()
            print(vm.pid, flush=True)
            if {mode!r} == "sleep":
                await trio.sleep_forever()

        trio.run(main)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    supervisor = await trio.lowlevel.open_process([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert supervisor.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await supervisor.stdout.receive_some(64)
            assert chunk, "the supervisor exited before starting QEMU"
            line += chunk
        await supervisor.stdout.aclose()
        pid = int(line)
        reaper.add(pid)
    except BaseException:
        supervisor.kill()
        with trio.CancelScope(shield=True):
            await supervisor.wait()
        raise
    return supervisor, pid


async def test_qemu_outlives_a_killed_supervisor_and_is_attached_again(run_dir: str, reaper: Reaper) -> None:
    """A daemon killed with SIGKILL (no cleanup at all) leaves its guest running; the next one takes it over."""
    guest_dir = f"{run_dir}/vm"
    with trio.fail_after(30):
        supervisor, pid = await _supervised(guest_dir, "sleep", reaper)
        supervisor.kill()
        assert await supervisor.wait() == -signal.SIGKILL
        await trio.sleep(0.5)  # a death signal would have struck by now
        assert pid_alive(pid)

        vm = await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        try:
            assert vm.pid == pid == int(_read(f"{guest_dir}/qemu.pid"))
            assert not vm.is_child and not vm.exited and vm.returncode is None
            assert await run_state(vm.qmp) == "prelaunch"  # the supervisor's -S guest, untouched
            await vm.qmp.execute("cont")
            assert await run_state(vm.qmp) == "running"
            # Exit seen through the pidfd; a non-child's status is unknown.
            await vm.qmp.execute("quit")
            assert await vm.wait() is None
            assert vm.exited
        finally:
            assert await vm.stop() is None
        assert not pid_alive(pid)
        assert os.listdir(guest_dir) == ["qemu.log"]  # socket and pidfile gone, the log kept


async def test_detach_leaves_qemu_running_and_stop_of_an_attached_qemu_kills_it(run_dir: str, reaper: Reaper) -> None:
    guest_dir = f"{run_dir}/vm"
    with trio.fail_after(30):
        # A supervisor that detaches and exits normally.
        supervisor, pid = await _supervised(guest_dir, "detach", reaper)
        assert await supervisor.wait() == 0
        assert pid_alive(pid)

        # Attach, detach: the guest runs on, and our handles are closed.
        vm = await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        qmp = vm.qmp
        await vm.detach()
        await vm.detach()  # idempotent
        assert qmp.closed and pid_alive(pid)
        with pytest.raises(QMPConnectionClosed):
            await qmp.execute("query-status")
        with pytest.raises(QemuError, match="detached"):
            await vm.stop()
        with pytest.raises(QemuError, match="detached"):
            await vm.wait()

        # Attach again (QMP serves one client at a time, so the detach did free it); stop it the hard way.
        vm = await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        assert await run_state(vm.qmp) == "prelaunch"
        os.kill(pid, signal.SIGSTOP)  # deaf to quit and SIGTERM: only the pidfd's SIGKILL ends it
        assert await vm.stop(timeout=0.5) is None
        assert not pid_alive(pid)
        assert os.listdir(guest_dir) == ["qemu.log"]
        with pytest.raises(QemuGone, match="no pidfile"):
            await QemuProcess.attach(guest_dir=guest_dir, name="vm")


async def test_a_detached_child_is_reaped_while_the_daemon_runs(run_dir: str, reaper: Reaper) -> None:
    guest_dir = f"{run_dir}/vm"
    with trio.fail_after(30):
        vm = await QemuProcess.start(base_args(), guest_dir=guest_dir, name="vm", paused=True)
        reaper.add(vm.pid)
        assert vm.is_child

        async def watch() -> None:
            with pytest.raises(QemuError, match="closed"):
                await vm.wait()  # the daemon's watcher task, woken by detach

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(0.05)
            await vm.detach()
        assert vm.returncode is None and pid_alive(vm.pid)

        again = await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        assert await again.stop() is None
        # Still our child, so a zombie until reaped: the system task left by detach() does it.
        with trio.fail_after(5):
            while os.path.exists(f"/proc/{vm.pid}"):
                await trio.sleep(0.01)


async def test_attach_refuses_what_is_not_this_guests_qemu(run_dir: str, reaper: Reaper) -> None:
    guest_dir, other_dir = f"{run_dir}/vm", f"{run_dir}/other"
    os.mkdir(guest_dir, 0o700)
    pidfile = f"{guest_dir}/qemu.pid"

    def write_pidfile(text: str) -> None:
        with open(pidfile, "w") as f:
            f.write(text)

    with trio.fail_after(30):
        with pytest.raises(QemuGone, match="no pidfile"):
            await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        write_pidfile("garbage\n")
        with pytest.raises(QemuGone, match="unreadable pidfile"):
            await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        write_pidfile(f"{os.getpid()}\n")  # alive, but not a QEMU
        with pytest.raises(QemuGone, match="is not the QEMU of"):
            await QemuProcess.attach(guest_dir=guest_dir, name="vm")
        write_pidfile(f"{await _dead_pid()}\n")
        with pytest.raises(QemuGone, match="names no process|is not the QEMU of"):
            await QemuProcess.attach(guest_dir=guest_dir, name="vm")

        # Another guest's QEMU, alive and well, is not this guest's.
        async with await QemuProcess.start(base_args(), guest_dir=other_dir, name="other", paused=True) as other:
            reaper.add(other.pid)
            write_pidfile(f"{other.pid}\n")
            with pytest.raises(QemuGone, match="is not the QEMU of"):
                await QemuProcess.attach(guest_dir=guest_dir, name="vm")
            # Its own directory names it, but its one QMP client is us: a clear error, and the guest lives on.
            with pytest.raises(QemuGone, match="did not answer"):
                await QemuProcess.attach(guest_dir=other_dir, name="other", timeout=0.5)
            assert await run_state(other.qmp) == "prelaunch"


async def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = await trio.lowlevel.open_process(["true"])
    await process.wait()
    return process.pid


async def test_sandboxed_qemu_cannot_spawn(run_dir: str, reaper: Reaper) -> None:
    """spawn=deny: QEMU's own exec: migration is fatal to it (SIGSYS from seccomp) and runs nothing."""
    guest_dir = f"{run_dir}/vm"
    with trio.fail_after(30):
        async with await QemuProcess.start(base_args(), guest_dir=guest_dir, name="vm", paused=True) as vm:
            reaper.add(vm.pid)
            assert _status_field(vm.pid, "Seccomp") == ["2"]
            with pytest.raises(QMPConnectionClosed):
                await vm.qmp.execute("migrate", {"uri": "exec:touch MARKER"})  # relative: would land in guest_dir
            assert await vm.wait() == -signal.SIGSYS
        assert not os.path.exists(f"{guest_dir}/MARKER")
        assert os.listdir(guest_dir) == ["qemu.log"]


@pytest.mark.skipif(os.geteuid() != 0, reason="running QEMU as another user needs root")
async def test_qemu_runs_as_an_unprivileged_user(run_dir: str, reaper: Reaper) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    os.chmod(run_dir, 0o711)  # the caller's part: the user must be able to reach the guest directory
    guest_dir = f"{run_dir}/vm"
    with trio.fail_after(30):
        async with await QemuProcess.start(base_args(), guest_dir=guest_dir, name="vm", paused=True, user="nobody") as vm:
            reaper.add(vm.pid)
            assert set(_status_field(vm.pid, "Uid")) == {str(nobody.pw_uid)}
            assert set(_status_field(vm.pid, "Gid")) == {str(nobody.pw_gid)}
            assert _status_field(vm.pid, "Groups") == []  # root's supplementary groups dropped
            assert _status_field(vm.pid, "Seccomp") == ["2"]
            assert os.stat(guest_dir).st_uid == nobody.pw_uid
            for name in ("qmp.sock", "qemu.pid"):  # created by QEMU itself
                assert os.stat(f"{guest_dir}/{name}").st_uid == nobody.pw_uid
            assert await run_state(vm.qmp) == "prelaunch"
        assert not pid_alive(vm.pid)
        assert os.listdir(guest_dir) == ["qemu.log"]
