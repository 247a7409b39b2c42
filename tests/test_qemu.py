"""The QEMU layer against real QEMU (TCG): QMP, processes, migrations (sandboxed QEMU).

Guests are small (128 MiB, 64 MiB of it random data loaded on the source
only) so the file runs in seconds.  Every test bounds itself with
``trio.fail_after`` and stops every QEMU it starts (``async with``).
Lifetime across daemons (detach, attach) is in test_qemu_lifetime.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
from qemu_fixtures import (
    RANDOM_ADDR,
    RandomRam,
    assert_same_memory,
    base_args,
    loader_args,
    random_ram,
    requires_qemu,
    run_dir,
)

from tunnel.qemu import (
    MigrationError,
    QemuProcess,
    QemuStartError,
    QMPClient,
    QMPConnectionClosed,
    QMPError,
    cancel,
    query_migration,
    query_parameters,
    run_state,
    set_max_bandwidth,
    start_incoming_fd,
    start_incoming_uri,
    start_outgoing_fd,
    start_outgoing_uri,
    wait_migration,
    wait_run_state,
)

__all__ = ["random_ram", "run_dir"]  # fixtures, imported for pytest

# Tests marked @requires_qemu run real QEMU; the others check QMPClient's bounds
# against a scripted QMP peer on a real unix socket, which QEMU cannot be made to misbehave like.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = 10 * 1024**3  # bytes/s: lifts QEMU 7.2's default cap of 128 MiB/s
SLOW = 256 * 1024  # bytes/s: 64 MiB would take over four minutes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------- QMP

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\n'


async def _scripted_peer(
    path: str, script: Callable[[trio.SocketStream], Awaitable[None]], task_status: trio.TaskStatus[None]
) -> None:
    """Serve one QMP client: greet, answer qmp_capabilities, then run *script*."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    task_status.started()
    conn, _ = await listener.accept()
    listener.close()
    async with trio.SocketStream(conn) as stream:
        await stream.send_all(GREETING)
        request = b""
        while not request.endswith(b"\n"):
            request += await stream.receive_some(4096)
        reply_id = json.loads(request)["id"]
        await stream.send_all(json.dumps({"return": {}, "id": reply_id}).encode() + b"\n")
        await script(stream)


async def test_qmp_line_cap_is_an_error_not_memory(run_dir: str) -> None:
    async def endless_line(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)  # the command
        chunk = b"x" * 65536
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for _ in range(64):  # 4 MiB without a newline, far past the client's cap
                await stream.send_all(chunk)

    path = os.path.join(run_dir, "fake.qmp")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(_scripted_peer, path, endless_line)
            qmp = await QMPClient.connect(path, max_line=256 * 1024)
            with pytest.raises(QMPError) as info:
                await qmp.execute("query-status")
            assert "longer than" in info.value.desc
            assert qmp.closed
            assert len(qmp._buf) <= 256 * 1024 + 65536
            with pytest.raises(QMPConnectionClosed):
                await qmp.execute("query-status")


async def test_qmp_event_buffer_is_bounded(run_dir: str) -> None:
    async def flood(stream: trio.SocketStream) -> None:
        events = b"".join(
            b'{"event": "E%d", "data": {"n": %d}, "timestamp": {"seconds": 1, "microseconds": 0}}\n' % (i, i) for i in range(1000)
        )
        await stream.send_all(events)
        request = await stream.receive_some(4096)
        await stream.send_all(json.dumps({"return": {"ok": 1}, "id": json.loads(request)["id"]}).encode() + b"\n")
        # then QEMU "exits"

    path = os.path.join(run_dir, "fake.qmp")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(_scripted_peer, path, flood)
            qmp = await QMPClient.connect(path, max_events=100)
            assert await qmp.execute("query-status") == {"ok": 1}  # read past 1000 events to its reply
            assert [e.name for e in qmp.buffered_events()] == [f"E{i}" for i in range(900, 1000)]
            assert qmp.dropped_events == 900
            assert (await qmp.wait_event("E950")).data == {"n": 950}
            assert (await qmp.next_event()).name == "E900"
            names = [event.name async for event in qmp]  # ends when the peer closes
            assert len(names) == 98 and "E950" not in names
            with pytest.raises(QMPConnectionClosed):
                await qmp.wait_event("E1", timeout=5)


@requires_qemu
async def test_qmp_round_trips_events_and_errors(run_dir: str) -> None:
    with trio.fail_after(30):
        async with await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/vm", name="vm", paused=True) as vm:
            qmp = vm.qmp
            assert qmp.version >= (7, 0, 0)
            assert await run_state(qmp) == "prelaunch"

            # Many tasks at once: each gets its own reply, matched by id.
            results: dict[int, object] = {}

            async def ask(i: int) -> None:
                command = "query-status" if i % 2 else "query-name"
                results[i] = await qmp.execute(command)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(ask, i)
            assert all(("status" in r) == bool(i % 2) for i, r in results.items())  # type: ignore[operator]

            with pytest.raises(QMPError) as info:
                await qmp.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            assert "no-such-command" in info.value.desc
            with pytest.raises(QMPError) as info:
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": "lots"})
            assert info.value.error_class == "GenericError"
            assert await run_state(qmp) == "prelaunch"  # the connection survives errors

            await qmp.execute("cont")
            assert (await qmp.wait_event("RESUME", timeout=10)).name == "RESUME"
            await qmp.execute("stop")
            async for event in qmp:
                if event.name == "STOP":
                    break
            assert await run_state(qmp) == "paused"

            # getfd with SCM_RIGHTS: QEMU then knows the name (closefd of an unknown one fails).
            r, w = os.pipe()
            try:
                await qmp.send_fd("probe", w)
            finally:
                os.close(r)
                os.close(w)
            await qmp.execute("closefd", {"fdname": "probe"})
            with pytest.raises(QMPError):
                await qmp.execute("closefd", {"fdname": "probe"})


@requires_qemu
async def test_qmp_reports_qemu_going_away(run_dir: str) -> None:
    with trio.fail_after(30):
        async with await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/vm", name="vm", paused=True) as vm:
            waiter_error: list[BaseException] = []

            async def wait_forever() -> None:
                try:
                    await vm.qmp.wait_event("NEVER")
                except QMPConnectionClosed as exc:
                    waiter_error.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_forever)
                await trio.sleep(0.05)
                os.kill(vm.pid, signal.SIGKILL)
            assert waiter_error, "a task waiting for an event must see the connection close"
            with pytest.raises(QMPConnectionClosed):
                await vm.qmp.execute("query-status")
            assert await vm.wait() == -signal.SIGKILL


# ------------------------------------------------------------- processes


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _seccomp_mode(pid: int) -> int:
    """2 when the process runs under a seccomp filter (QEMU's -sandbox)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Seccomp:")).split()[1])


@requires_qemu
async def test_bad_argument_is_a_clear_start_error(run_dir: str) -> None:
    guest_dir = f"{run_dir}/bad"
    with trio.fail_after(30):
        with pytest.raises(QemuStartError) as info:
            await QemuProcess.start([*base_args(), "-machine", "no-such-machine"], guest_dir=guest_dir, name="bad")
    assert "unsupported machine type" in str(info.value)
    assert info.value.returncode not in (None, 0)
    assert sorted(os.listdir(guest_dir)) == ["qemu.log"]  # no socket, no pidfile; the log explains
    assert "unsupported machine type" in _read(f"{guest_dir}/qemu.log")


@requires_qemu
async def test_guest_dir_layout_and_stop_leaves_only_the_log(run_dir: str) -> None:
    guest_dir = f"{run_dir}/vm"
    with trio.fail_after(30):
        vm = await QemuProcess.start(base_args(), guest_dir=guest_dir, name="vm")
        try:
            assert vm.guest_dir == guest_dir and vm.is_child
            assert os.stat(guest_dir).st_mode & 0o777 == 0o700
            assert sorted(os.listdir(guest_dir)) == ["qemu.log", "qemu.pid", "qmp.sock"]
            assert int(_read(f"{guest_dir}/qemu.pid")) == vm.pid
            assert os.readlink(f"/proc/{vm.pid}/cwd") == guest_dir
            assert os.getsid(vm.pid) == vm.pid  # its own session: the daemon's terminal signals miss it
            assert _seccomp_mode(vm.pid) == 2  # sandboxed by default
            assert await run_state(vm.qmp) == "running"  # not paused: no -S was added
            # Relative paths resolve in the guest directory.
            await vm.qmp.execute("pmemsave", {"val": 0, "size": 4096, "filename": "first-page.mem"})
            assert os.path.getsize(f"{guest_dir}/first-page.mem") == 4096
            os.unlink(f"{guest_dir}/first-page.mem")
        finally:
            assert await vm.stop() == 0  # a clean QMP quit
        assert not _alive(vm.pid) and vm.exited
        assert os.listdir(guest_dir) == ["qemu.log"]
        assert vm.qmp.closed
        assert await vm.stop() == 0  # idempotent

        # The context manager stops its guest even when the body is cancelled; the log is appended to.
        vm2 = await QemuProcess.start(base_args(), guest_dir=guest_dir, name="vm", paused=True)
        with trio.CancelScope() as scope:
            async with vm2:
                scope.cancel()
                await trio.sleep_forever()
        assert vm2.returncode is not None and not _alive(vm2.pid)
        assert os.listdir(guest_dir) == ["qemu.log"]


@requires_qemu
async def test_stop_escalates_to_signals(run_dir: str) -> None:
    with trio.fail_after(30):
        vm = await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/vm", name="vm", paused=True)
        # A stopped process answers no QMP and ignores SIGTERM until continued: only SIGKILL works.
        os.kill(vm.pid, signal.SIGSTOP)
        assert await vm.stop(timeout=0.5) == -signal.SIGKILL
        assert not _alive(vm.pid)
        assert os.listdir(f"{run_dir}/vm") == ["qemu.log"]  # the pidfile QEMU could not remove is gone too


@requires_qemu
async def test_deprecated_run_dir_and_log_path_still_work(run_dir: str) -> None:
    """The daemon's call until it moves to guest_dir=: the guest directory is run_dir/NAME, removed when empty."""
    log_path = os.path.join(run_dir, "vm.log")
    with trio.fail_after(30):
        async with await QemuProcess.start(base_args(), run_dir=run_dir, name="vm", paused=True, log_path=log_path) as vm:
            assert vm.qmp_path == f"{run_dir}/vm/qmp.sock"
            assert await run_state(vm.qmp) == "prelaunch"
        assert sorted(os.listdir(run_dir)) == ["vm.log"]
        with pytest.raises(TypeError):
            await QemuProcess.start(base_args(), run_dir=run_dir, guest_dir=f"{run_dir}/vm", name="vm")


# ------------------------------------------------------------ migrations


@requires_qemu
async def test_native_migration_over_unix_socket(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(64 << 20)
    with trio.fail_after(60):
        async with (
            await QemuProcess.start(base_args() + loader_args(ram), guest_dir=f"{run_dir}/src", name="src", paused=True) as src,
            await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/dst", name="dst", incoming=True) as dst,
        ):
            assert await run_state(dst.qmp) == "inmigrate"
            uri = f"unix:{run_dir}/migrate.sock"
            await start_incoming_uri(dst.qmp, uri)
            await start_outgoing_uri(src.qmp, uri, max_bandwidth=FAST)
            status = await wait_migration(src.qmp, poll=0.02)
            assert status.status == "completed"
            assert status.transferred >= ram.size  # random pages cannot be sent as zero pages
            assert status.total >= 128 << 20  # guest RAM plus firmware and ROM blocks
            assert (await wait_migration(dst.qmp, poll=0.02)).status == "completed"
            assert await run_state(src.qmp) == "postmigrate"
            await assert_same_memory(src.qmp, dst.qmp, run_dir, addr=RANDOM_ADDR, size=ram.size, expected=ram.sha256)
            await assert_same_memory(src.qmp, dst.qmp, run_dir)  # the whole RAM


async def _relay(a: socket.socket, b: socket.socket, counts: dict[str, int]) -> None:
    """Copy both ways between two sockets, passing each EOF on, as the tunnel will."""
    stream_a = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    stream_b = trio.SocketStream(trio.socket.from_stdlib_socket(b))

    async def copy(src: trio.SocketStream, dst: trio.SocketStream, key: str) -> None:
        while data := await src.receive_some(1 << 20):
            counts[key] += len(data)
            await dst.send_all(data)
        await dst.send_eof()

    async with stream_a, stream_b, trio.open_nursery() as nursery:
        nursery.start_soon(copy, stream_a, stream_b, "forward")
        nursery.start_soon(copy, stream_b, stream_a, "back")


@requires_qemu
async def test_migration_through_socketpairs_and_a_relay(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """The daemon's fd plumbing: source QEMU -> socketpair -> relay -> socketpair -> destination QEMU.

    Sockets, not pipes, so QEMU's return path flows back through the relay.
    The source runs during the migration, so pages are re-dirtied and resent.
    """
    ram = random_ram(64 << 20)
    caps = {"return-path": True}
    counts = {"forward": 0, "back": 0}
    with trio.fail_after(60):
        async with (
            await QemuProcess.start(base_args() + loader_args(ram), guest_dir=f"{run_dir}/src", name="src") as src,
            await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/dst", name="dst", incoming=True) as dst,
            trio.open_nursery() as nursery,
        ):
            assert _seccomp_mode(src.pid) == _seccomp_mode(dst.pid) == 2  # fd migration works sandboxed
            src_qemu, src_relay = socket.socketpair()
            dst_qemu, dst_relay = socket.socketpair()
            with src_qemu, dst_qemu:  # QEMU holds its own duplicates after getfd
                await start_incoming_fd(dst.qmp, dst_qemu.fileno(), capabilities=caps)
                nursery.start_soon(_relay, src_relay, dst_relay, counts)
                await start_outgoing_fd(src.qmp, src_qemu.fileno(), capabilities=caps, max_bandwidth=FAST)
            status = await wait_migration(src.qmp, poll=0.02)
            assert (await wait_migration(dst.qmp, poll=0.02)).status == "completed"
            # The guest was running: the destination holds it paused (-S) until `cont`.
            assert await wait_run_state(dst.qmp, "paused") == "paused"
            assert await run_state(src.qmp) == "postmigrate"
            assert status.transferred >= ram.size
            assert counts["forward"] >= status.transferred
            assert counts["back"] > 0, "the return path carried nothing back"
            await assert_same_memory(src.qmp, dst.qmp, run_dir)
            await dst.qmp.execute("cont")
            assert await run_state(dst.qmp) == "running"


@requires_qemu
async def test_cancel_half_way_leaves_the_source_usable(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(64 << 20)
    with trio.fail_after(60):
        async with await QemuProcess.start(base_args() + loader_args(ram), guest_dir=f"{run_dir}/src", name="src") as src:
            assert await run_state(src.qmp) == "running"
            async with await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/dst1", name="dst1", incoming=True) as dst1:
                uri = f"unix:{run_dir}/m1.sock"
                await start_incoming_uri(dst1.qmp, uri)
                await start_outgoing_uri(src.qmp, uri, max_bandwidth=SLOW)
                while (status := await query_migration(src.qmp)).transferred == 0 or status.status != "active":
                    await trio.sleep(0.02)
                await cancel(src.qmp)
                with pytest.raises(MigrationError) as info:
                    await wait_migration(src.qmp, poll=0.02)
                assert info.value.status.status == "cancelled"
                assert info.value.status.transferred < ram.size
                assert await run_state(src.qmp) == "running"
                # The half-fed destination gives up on its own; stop() handles an exited QEMU.
                assert await dst1.wait() != 0
            # ... and the source can migrate again, completely.
            async with await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/dst2", name="dst2", incoming=True) as dst2:
                uri = f"unix:{run_dir}/m2.sock"
                await start_incoming_uri(dst2.qmp, uri)
                await start_outgoing_uri(src.qmp, uri, max_bandwidth=FAST)
                assert (await wait_migration(src.qmp, poll=0.02)).status == "completed"
                assert (await wait_migration(dst2.qmp, poll=0.02)).status == "completed"
                await assert_same_memory(src.qmp, dst2.qmp, run_dir)


@requires_qemu
async def test_max_bandwidth_applies_to_a_running_migration(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """At SLOW the 64 MiB need minutes; the test's bound of 60 s is met only because the raised cap takes effect."""
    ram = random_ram(64 << 20)
    with trio.fail_after(60):
        async with (
            await QemuProcess.start(base_args() + loader_args(ram), guest_dir=f"{run_dir}/src", name="src", paused=True) as src,
            await QemuProcess.start(base_args(), guest_dir=f"{run_dir}/dst", name="dst", incoming=True) as dst,
        ):
            uri = f"unix:{run_dir}/migrate.sock"
            await start_incoming_uri(dst.qmp, uri)
            await start_outgoing_uri(src.qmp, uri, max_bandwidth=SLOW)
            assert (await query_parameters(src.qmp))["max-bandwidth"] == SLOW
            while (before := await query_migration(src.qmp)).transferred == 0:
                await trio.sleep(0.02)
            assert before.status == "active" and before.transferred < ram.size
            await set_max_bandwidth(src.qmp, FAST)
            assert (await query_parameters(src.qmp))["max-bandwidth"] == FAST
            status = await wait_migration(src.qmp, poll=0.02)
            assert status.transferred >= ram.size
            await assert_same_memory(src.qmp, dst.qmp, run_dir, addr=RANDOM_ADDR, size=ram.size, expected=ram.sha256)
