"""Real QEMU live migration: native unix socket vs PEER2PEER + TUNNELLED through the daemons.

A guest whose RAM holds random bytes (QEMU's ``loader`` device, 1 GiB by
default) is migrated live, alternating in one invocation between:

* ``native``: two QEMUs started here, QEMU to QEMU over a unix socket
  (``migrate-incoming unix:PATH`` / ``migrate unix:PATH``), timed from
  ``migrate`` until the destination's ``query-migrate`` says ``completed``
  (polled every 5 ms);
* ``tunnelled``: two ``python3 -m tunnel daemon`` processes on unix sockets,
  the guest defined and started on the source daemon and migrated with
  ``live, p2p, tunnelled`` through the client API; the time is the job's
  ``transfer_ms`` (QEMU's ``migrate`` on the source until the destination
  daemon reports the guest loaded), which, like the native figure, leaves
  out starting the destination QEMU;
* ``tls``: the same, the daemons (and the client) talking mutual TLS on
  127.0.0.1 with certificates from ``trustme``;
* ``p2p``: the daemons' native (not tunnelled) PEER2PEER migration, QEMU
  to QEMU over a unix socket the destination daemon opens, timed the same
  way; it separates the daemons' own overhead (job sequence, polling) from
  the tunnel's.
* ``qemu_tcp``: like ``native``, but over plain TCP on 127.0.0.1 (what a
  user without a tunnel and without TLS would run between two hosts);
* ``qemu_tls``: like ``native``, but QEMU's own migration TLS
  (``tls-creds-x509``, ``verify-peer=on``, each QEMU with its daemon's
  certificate) over TCP on 127.0.0.1: what ``tls`` is measured against;
* ``p2p_tls``: ``p2p`` between the daemons on TLS, where the data channel
  is QEMU's own TLS over TCP;
* ``relay2``: like ``native``, but through two bare splice relays in a
  chain (``_splicerelay.py``: unix sockets, a pipe and a blocking thread
  per direction, no framing): the least two processes relaying QEMU's
  stream can cost, so the floor under ``tunnelled`` on this machine
  (``relay2_ratio``, ``tunnelled_vs_relay2``, ``relay2_cpu_s_per_GiB``).

With ``--modes dirty_native,dirty_tunnelled`` (not in the default set) the
guest is instead the self-checking guest of the tests
(``tests/guest/dirtyguest.S``), rewriting ``--dirty-rate`` pages a second
(0: flat out) over a working set of ``--dirty-mib`` MiB and verifying pages
as it goes: ``dirty_native`` QEMU to QEMU over a unix socket, and
``dirty_tunnelled`` PEER2PEER + TUNNELLED through the daemons, pre-copy
only, each given ``--dirty-wait`` seconds to converge.  Reported per mode:
whether every run converged (``*_converged``), the time and iterations of
those that did, and the guest's own verdict: no CORRUPT line on either side
(``*_guest_ok``) and progress on the destination after the move
(``*_guest_progress``).  A CORRUPT line stops the benchmark.

Every random-RAM mode uses the same guest definition, ``-mem-prealloc`` included (a
daemon definition is the same on both sides), and QEMU's max-bandwidth is
raised in all of them (the daemons do it themselves).  Without
preallocation, first-touch page faults on the destination dominate every
figure on this kind of machine.

The destination's memory is compared with the random file (``pmemsave``)
after the first run of each mode (``--verify-all``: every run): an incoming
QEMU never loads the loader's file itself, so equal memory proves the bytes
came through the migration, and a fast wrong result cannot be reported.

The daemons' CPU (user + system, from /proc/PID/stat) is read just before
and just after each daemon migration and reported per GiB that went
through the tunnel (for ``p2p``: per GiB QEMU sent).

Usage: python bench/qemu.py [--quick] [--size MiB] [--repeat N] [--modes native,tunnelled,tls,p2p,qemu_tcp,qemu_tls,p2p_tls,relay2] [--verify-all]
       python bench/qemu.py --modes dirty_native,dirty_tunnelled [--dirty-mib MiB] [--dirty-rate PAGES_PER_S] [--dirty-wait S]
The last line printed is one JSON object; times are in seconds, medians
over the runs of a mode; ratios are tunnelled over native, and
``tls_vs_qemu_tls`` the tunnel over TLS against QEMU's own TLS, from the
same invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import trio
from _common import emit, median, now
from _splicerelay import start_relays, stop_relays
from dirtyguest import GUEST_LOG, build_kernel, guest_mib, read_report, wait_progress
from dirtyguest import guest_args as dirty_guest_args

from tunnel.client import Client, DaemonError, connect
from tunnel.daemon import TLSFiles
from tunnel.qemu import (
    MigrationError,
    QemuProcess,
    cancel,
    qemu_binary,
    query_migration,
    set_max_bandwidth,
    set_tls,
    start_incoming_uri,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
#: The random-RAM guest's modes (the default set), then the self-checking guest's.
RANDOM_MODES = ["native", "tunnelled", "tls", "p2p", "qemu_tcp", "qemu_tls", "p2p_tls", "relay2"]
DIRTY_MODES = ["dirty_native", "dirty_tunnelled"]
MODES = RANDOM_MODES + DIRTY_MODES
DEFAULT_MODES = ",".join(RANDOM_MODES)
#: How long the destination's self-checking guest gets to show progress after the move.
PROGRESS_WAIT = 60.0
#: Modes that run QEMU to QEMU without the daemons.
DIRECT_MODES = ("native", "qemu_tcp", "qemu_tls", "relay2")
#: Modes that talk to the daemons over TLS.
TLS_DAEMON_MODES = ("tls", "p2p_tls")
#: Where the random bytes go in guest RAM: above what the firmware touches.
LOAD_ADDRESS = 16 * MiB
#: Guest RAM beyond the random bytes (firmware, page tables, the rest of the machine).
EXTRA_RAM_MIB = 128
#: What "no limit" means to QEMU (its own default caps migration at 128 MiB/s).
UNLIMITED_BANDWIDTH = 1 << 40
#: How often the native run asks the destination whether it has finished.
NATIVE_POLL = 0.005
#: Bound on one migration run, start of the QEMUs to clean-up.
RUN_TIMEOUT = 600.0
DAEMON_START_TIMEOUT = 30.0
GUEST = "bench-vm"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- files


def write_random(path: str, size: int) -> str:
    """Write *size* random bytes to *path*; return their sha256."""
    digest = hashlib.sha256()
    block_size = 16 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(block_size, left))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def guest_args(rand: str, random_mib: int) -> list[str]:
    """QEMU's arguments for every mode (the daemons add ``-qmp``, ``-S`` and ``-incoming`` as QemuProcess does)."""
    return [
        "-machine", "q35", "-accel", "tcg", "-m", str(random_mib + EXTRA_RAM_MIB),
        "-nodefaults", "-display", "none", "-mem-prealloc",
        "-device", f"loader,file={rand},addr={LOAD_ADDRESS:#x},force-raw=on",
    ]  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    root: str
    rand: str
    random_bytes: int
    expected_sha256: str
    args: list[str]


async def verify(setup: Setup, dump: str, label: str) -> None:
    """Compare a destination memory dump with the random file; the dump is removed either way."""
    try:
        got = await trio.to_thread.run_sync(file_sha256, dump)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dump)
    if got != setup.expected_sha256:
        raise SystemExit(f"{label}: the destination's memory differs from the random file (sha256 {got} != {setup.expected_sha256})")


def pmemsave(setup: Setup, dump: str) -> dict[str, Any]:
    return {"execute": "pmemsave", "arguments": {"val": LOAD_ADDRESS, "size": setup.random_bytes, "filename": dump}}


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process *pid*, all its threads (not its children)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 of proc(5) (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --------------------------------------------------------------------------- native


async def native_run(
    setup: Setup, index: int, check: bool, certs: dict[str, TLSFiles] | None = None, *, tcp: bool = False, relays: bool = False
) -> dict[str, float]:
    """QEMU to QEMU: over a unix socket, over TCP (*tcp*, ``qemu_tcp``), with *certs* over TCP with QEMU's own TLS
    (``qemu_tls``), or through two bare splice relays (*relays*, ``relay2``)."""
    label = "qemu_tls" if certs is not None else "qemu_tcp" if tcp else "relay2" if relays else "native"
    run_dir = os.path.join(setup.root, label)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "migrate.sock")
    uri = f"unix:{path}" if certs is None and not tcp else f"tcp:127.0.0.1:{free_port()}"
    relay_procs: list[subprocess.Popen[bytes]] = []
    async with (
        await QemuProcess.start(setup.args, run_dir=run_dir, name="src", log_path=os.path.join(run_dir, "src.log")) as src,
        await QemuProcess.start(setup.args, run_dir=run_dir, name="dst", incoming=True, log_path=os.path.join(run_dir, "dst.log")) as dst,
    ):
        try:
            if certs is not None:
                # Each QEMU with its daemon's certificate, in QEMU's layout; the server requires the client's.
                server_dir = certs["destination"].write_qemu_dir(os.path.join(run_dir, "tls-server"), "server")
                client_dir = certs["source"].write_qemu_dir(os.path.join(run_dir, "tls-client"), "client")
                await set_tls(dst.qmp, server_dir, endpoint="server")
                await set_tls(src.qmp, client_dir, endpoint="client", hostname="localhost")
            await start_incoming_uri(dst.qmp, uri)
            if relays:
                relay_path = await start_relays(run_dir, path, relay_procs)
                uri = f"unix:{relay_path}"
            await set_max_bandwidth(src.qmp, UNLIMITED_BANDWIDTH)
            cpu_before = proc_cpu_s(src.pid) + proc_cpu_s(dst.pid)
            relay_cpu_before = sum(proc_cpu_s(p.pid) for p in relay_procs)  # their start-up is not relaying
            started = now()
            await src.qmp.execute("migrate", {"uri": uri})
            while True:
                status = await query_migration(dst.qmp)
                if status.status == "completed":
                    seconds = now() - started
                    qemu_cpu = proc_cpu_s(src.pid) + proc_cpu_s(dst.pid) - cpu_before
                    relay_cpu = sum(proc_cpu_s(p.pid) for p in relay_procs) - relay_cpu_before
                    break
                if status.status in ("failed", "cancelled"):
                    raise MigrationError(status)
                await trio.sleep(NATIVE_POLL)
            # QEMU's own view of the source side, for reference (not polled, so exact).
            while (source := await query_migration(src.qmp)).active:
                await trio.sleep(NATIVE_POLL)
            if source.status != "completed":
                raise MigrationError(source)
            if check:
                dump = os.path.join(setup.root, f"{label}.dump")
                await dst.qmp.execute("pmemsave", pmemsave(setup, dump)["arguments"])
                await verify(setup, dump, f"{label} run {index}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            stop_relays(relay_procs)
    return {"seconds": seconds, "qemu_total_s": (source.total_time_ms or 0) / 1000, "qemu_cpu_s": qemu_cpu,
            "relay_cpu_s": relay_cpu, "bytes": source.transferred}


# --------------------------------------------------------------------------- daemons


def _die_with_parent(parent_pid: int) -> None:
    """In the forked daemon: SIGTERM (a clean shutdown that stops its guests) if this benchmark dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _spawn_daemon(command: list[str], log_path: str) -> subprocess.Popen[bytes]:
    """Fork and exec a daemon in the calling (main) thread, which lives as long as the benchmark: see _die_with_parent."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            # Its own session: a Ctrl-C here reaches only this script, which then stops the daemons in order.
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),  # noqa: PLW1509 - the kernel ties PDEATHSIG to this thread
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_certs(certdir: str) -> dict[str, TLSFiles]:
    """A CA and one certificate per party (CN source / destination / client), each valid for 127.0.0.1 and localhost."""
    import trustme

    ca = trustme.CA()
    ca_path = os.path.join(certdir, "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    files = {}
    for name in ("source", "destination", "client"):
        cert = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
        cert_path = os.path.join(certdir, f"{name}.pem")
        key_path = os.path.join(certdir, f"{name}.key")
        with open(cert_path, "wb") as f:
            f.writelines(pem.bytes() for pem in cert.cert_chain_pems)
        cert.private_key_pem.write_to_path(key_path)
        files[name] = TLSFiles(cert=cert_path, key=key_path, ca=ca_path)
    return files


@dataclass(slots=True, kw_only=True)
class DaemonProc:
    name: str
    proc: subprocess.Popen[bytes]
    unix_uri: str
    tls_uri: str
    log_path: str

    def cpu_s(self) -> float:
        """User + system CPU seconds of the daemon process (its QEMUs not included)."""
        return proc_cpu_s(self.proc.pid)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""


class Daemons:
    """The two daemon processes, each on a unix socket and on TLS; always stopped on the way out."""

    def __init__(self, root: str, certs: dict[str, TLSFiles]) -> None:
        self.root = root
        self.certs = certs
        self.procs: dict[str, DaemonProc] = {}

    async def start(self, name: str, *, allow: list[str]) -> DaemonProc:
        sock = os.path.join(self.root, f"{name}.sock")
        tls_uri = f"tls://127.0.0.1:{free_port()}"
        files = self.certs[name]
        log_path = os.path.join(self.root, f"{name}.log")
        command = [
            sys.executable, "-m", "tunnel", "daemon",
            "--listen", f"unix://{sock}", "--listen", tls_uri, "--state-dir", os.path.join(self.root, name),
            "--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca,
        ]  # fmt: skip
        for peer in allow:
            command += ["--allow-peer", peer]
        # the bench's client certificate drives both; the guest's RAM file lives in the bench's directory
        command += ["--allow-admin", "cn:client", "--allow-path", self.root, "--shutdown-guests-on-exit"]
        proc = _spawn_daemon(command, log_path)
        daemon = DaemonProc(name=name, proc=proc, unix_uri=f"unix://{sock}", tls_uri=tls_uri, log_path=log_path)
        self.procs[name] = daemon
        # Ready once a client gets an answer over each listener.
        with trio.move_on_after(DAEMON_START_TIMEOUT):
            for uri, tls in ((daemon.unix_uri, None), (daemon.tls_uri, self.certs["client"])):
                while True:
                    if proc.poll() is not None:
                        raise SystemExit(f"the {name} daemon exited ({proc.returncode}):\n{daemon.log_tail()}")
                    if uri.startswith("unix://") and not os.path.exists(sock):
                        await trio.sleep(0.05)
                        continue
                    try:
                        async with connect(uri, tls=tls) as client:
                            await client.list()
                        break
                    except DaemonError:
                        await trio.sleep(0.05)
            return daemon
        raise SystemExit(f"the {name} daemon did not answer within {DAEMON_START_TIMEOUT} s:\n{daemon.log_tail()}")

    async def stop(self) -> None:
        for daemon in self.procs.values():
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
        for daemon in self.procs.values():
            with trio.move_on_after(30):
                while daemon.proc.poll() is None:
                    await trio.sleep(0.05)
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


async def daemon_run(setup: Setup, daemons: Daemons, mode: str, index: int, check: bool) -> dict[str, float]:
    source, destination = daemons.procs["source"], daemons.procs["destination"]
    over_tls = mode in TLS_DAEMON_MODES
    tls = daemons.certs["client"] if over_tls else None
    src_uri = source.tls_uri if over_tls else source.unix_uri
    dst_uri = destination.tls_uri if over_tls else destination.unix_uri
    definition = {"name": GUEST, "description": "bench/qemu.py: random bytes in RAM", "qemu": setup.args}
    async with connect(src_uri, tls=tls) as src, connect(dst_uri, tls=tls) as dst:
        try:
            await src.define(definition)
            await src.start(GUEST)
            cpu_before = (source.cpu_s(), destination.cpu_s())
            started = now()
            result = await src.migrate(GUEST, dst_uri, live=True, p2p=True, tunnelled=mode in ("tunnelled", "tls"), undefine_source=True)
            wall = now() - started
            cpu_after = (source.cpu_s(), destination.cpu_s())
            if result.get("destination_state") != "running":
                raise SystemExit(f"{mode} run {index}: the destination reports {result.get('destination_state')!r}, not running")
            if check:
                # pmemsave writes into the guest's own directory on the destination
                dump = os.path.join(daemons.root, "destination", "run", GUEST, f"{mode}.dump")
                reply = await dst.monitor(GUEST, pmemsave(setup, f"{mode}.dump"))
                if "error" in reply:
                    raise SystemExit(f"{mode} run {index}: pmemsave on the destination failed: {reply['error']}")
                await verify(setup, dump, f"{mode} run {index}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await _remove_guest(dst)
                await _remove_guest(src)
    moved = result.get("tunnel_bytes_sent") or result.get("data_processed") or 0
    return {
        "seconds": result["transfer_ms"] / 1000,
        "wall_s": wall,
        "job_s": result.get("time_elapsed_ms", 0) / 1000,
        "bytes": moved,
        "source_cpu_s": cpu_after[0] - cpu_before[0],
        "destination_cpu_s": cpu_after[1] - cpu_before[1],
    }


async def _remove_guest(client: Client) -> None:
    """Leave no guest running and no definition behind (each step may fail: the guest may not be there)."""
    with contextlib.suppress(DaemonError):
        await client.destroy(GUEST)
    with contextlib.suppress(DaemonError):
        await client.undefine(GUEST)


# --------------------------------------------------------------------------- the self-checking guest


@dataclass(frozen=True, slots=True, kw_only=True)
class DirtySetup:
    root: str
    mib: int
    rate: int
    wait: float
    args: list[str]


def dirty_setup(root: str, mib: int, rate: int, wait: float) -> DirtySetup:
    kernel = build_kernel(root)
    args = [
        "-machine", "q35", "-accel", "tcg", "-m", str(guest_mib(mib)), "-nodefaults", "-display", "none", "-mem-prealloc",
        *dirty_guest_args(kernel, mib=mib, rate=rate),
    ]  # fmt: skip
    return DirtySetup(root=root, mib=mib, rate=rate, wait=wait, args=args)


async def guest_verdict(source_log: str, dest_log: str, label: str) -> dict[str, Any]:
    """The guest's own checks: no CORRUPT line on either side (else stop), and progress on the destination."""
    progress = False
    with trio.move_on_after(PROGRESS_WAIT):
        await wait_progress(dest_log, lines=2)  # the destination's log starts empty: every line is from after the move
        progress = True
    for side, path in (("source", source_log), ("destination", dest_log)):
        report = read_report(path)
        if not report.ok:
            raise SystemExit(f"{label}: the guest found corrupt memory on the {side}: {report.corrupt[:4]} {report.errors}")
    return {"guest_ok": True, "guest_progress": progress}


async def dirty_native_run(setup: DirtySetup, index: int) -> dict[str, Any]:
    """The self-checking guest, QEMU to QEMU over a unix socket, pre-copy only: did it converge within setup.wait?"""
    run_dir = os.path.join(setup.root, f"dirty-native-{index}")
    path = os.path.join(run_dir, "migrate.sock")
    os.makedirs(run_dir)
    async with (
        await QemuProcess.start(setup.args, guest_dir=os.path.join(run_dir, "src"), name="src") as src,
        await QemuProcess.start(setup.args, guest_dir=os.path.join(run_dir, "dst"), name="dst", incoming=True) as dst,
    ):
        await wait_progress(os.path.join(src.guest_dir, GUEST_LOG), lines=1)
        await start_incoming_uri(dst.qmp, f"unix:{path}")
        await set_max_bandwidth(src.qmp, UNLIMITED_BANDWIDTH)
        started = now()
        await src.qmp.execute("migrate", {"uri": f"unix:{path}"})
        result: dict[str, Any] = {"converged": False, "seconds": None}
        with trio.move_on_after(setup.wait):
            while (status := await query_migration(dst.qmp)).status != "completed":
                if status.status in ("failed", "cancelled"):
                    raise MigrationError(status)
                await trio.sleep(NATIVE_POLL)
            result.update(converged=True, seconds=now() - started)
        source = await query_migration(src.qmp)
        if not result["converged"]:
            await cancel(src.qmp)
            return {**result, "iterations": source.dirty_sync_count, "bytes": source.transferred}
        while (source := await query_migration(src.qmp)).active:
            await trio.sleep(NATIVE_POLL)
        await dst.qmp.execute("cont")  # an incoming QEMU waits paused (-S) until told; the daemons do this in FINISH
        verdict = await guest_verdict(os.path.join(src.guest_dir, GUEST_LOG), os.path.join(dst.guest_dir, GUEST_LOG), f"dirty_native run {index}")
        return {**result, **verdict, "iterations": source.dirty_sync_count, "bytes": source.transferred, "downtime_ms": source.downtime_ms}


async def dirty_daemon_run(setup: DirtySetup, daemons: Daemons, index: int) -> dict[str, Any]:
    """The self-checking guest through the daemons (PEER2PEER + TUNNELLED), pre-copy only, aborted after setup.wait."""
    source, destination = daemons.procs["source"], daemons.procs["destination"]
    definition = {"name": GUEST, "description": "bench/qemu.py: the self-checking guest", "qemu": setup.args}
    source_log = os.path.join(daemons.root, "source", "run", GUEST, GUEST_LOG)
    dest_log = os.path.join(daemons.root, "destination", "run", GUEST, GUEST_LOG)
    async with connect(source.unix_uri) as src, connect(destination.unix_uri) as dst:
        try:
            await src.define(definition)
            await src.start(GUEST)
            await wait_progress(source_log, lines=1)
            await src.migrate(GUEST, destination.unix_uri, live=True, p2p=True, tunnelled=True, detach=True)
            info: dict[str, Any] = {}
            with trio.move_on_after(setup.wait):
                while (info := await src.jobinfo(GUEST))["status"] not in ("completed", "failed", "cancelled"):
                    await trio.sleep(0.05)
            if info.get("status") in ("failed", "cancelled"):
                raise SystemExit(f"dirty_tunnelled run {index}: the migration {info['status']}: {info.get('error')}")
            result: dict[str, Any] = {"converged": info.get("status") == "completed", "iterations": info.get("iteration"),
                                      "bytes": info.get("tunnel_bytes_sent") or info.get("data_processed") or 0}
            if not result["converged"]:
                with contextlib.suppress(DaemonError):
                    await src.abort(GUEST)
                return {**result, "seconds": None}
            verdict = await guest_verdict(source_log, dest_log, f"dirty_tunnelled run {index}")
            return {**result, **verdict, "seconds": info["transfer_ms"] / 1000, "downtime_ms": info.get("downtime_ms")}
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await _remove_guest(dst)
                await _remove_guest(src)
                for path in (source_log, dest_log):  # the next run's logs start empty
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)


def summarize_dirty(results: dict[str, list[dict[str, Any]]], setup: DirtySetup) -> dict[str, Any]:
    out: dict[str, Any] = {"dirty_mib": setup.mib, "dirty_rate_pages_per_s": setup.rate, "dirty_wait_s": setup.wait}
    for mode, runs in results.items():
        converged = [r for r in runs if r["converged"]]
        out[f"{mode}_converged"] = len(converged) == len(runs)
        out[f"{mode}_converged_runs"] = len(converged)
        out[f"{mode}_s"] = round(median([r["seconds"] for r in converged]), 3) if converged else None
        out[f"{mode}_iterations"] = median([r["iterations"] for r in runs if r.get("iterations") is not None]) if runs else None
        # The guest's verdict covers the runs that moved it (a CORRUPT line stops the benchmark before this).
        out[f"{mode}_guest_ok"] = all(r["guest_ok"] for r in converged) if converged else None
        out[f"{mode}_guest_progress"] = all(r["guest_progress"] for r in converged) if converged else None
    return out


# --------------------------------------------------------------------------- driver


def summarize(results: dict[str, list[dict[str, float]]], setup: Setup, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "random_mib": setup.random_bytes // MiB,
        "guest_ram_mib": setup.random_bytes // MiB + EXTRA_RAM_MIB,
        "repeat": repeat,
        "memory_verified": True,
    }
    prefix = {"native": "native", "tunnelled": "tunnelled", "tls": "tls_tunnelled", "p2p": "p2p", "qemu_tcp": "qemu_tcp", "qemu_tls": "qemu_tls", "p2p_tls": "p2p_tls", "relay2": "relay2"}
    for mode, runs in results.items():
        key = prefix[mode]
        out[f"{key}_s"] = round(median([r["seconds"] for r in runs]), 3)
        out[f"{key}_runs_s"] = [round(r["seconds"], 3) for r in runs]
        if mode in DIRECT_MODES:
            out[f"{key}_qemu_total_s"] = round(median([r["qemu_total_s"] for r in runs]), 3)
            # Both QEMUs' CPU while migrating: with the daemons' CPU, what a tunnelled run needs from the host's cores.
            out[f"{key}_qemu_cpu_s"] = round(median([r["qemu_cpu_s"] for r in runs]), 3)
            if mode == "relay2":
                out["relay2_cpu_s_per_GiB"] = round(median([r["relay_cpu_s"] / (r["bytes"] / GiB) for r in runs if r["bytes"]]), 3)
            continue
        out[f"{key}_wall_s"] = round(median([r["wall_s"] for r in runs]), 3)
        out[f"{key}_job_s"] = round(median([r["job_s"] for r in runs]), 3)
        per_gib = [(r["source_cpu_s"] + r["destination_cpu_s"]) / (r["bytes"] / GiB) for r in runs if r["bytes"]]
        cpu_key = {
            "tunnelled": "daemon_cpu_s_per_GiB",
            "tls": "tls_daemon_cpu_s_per_GiB",
            "p2p": "p2p_daemon_cpu_s_per_GiB",
            "p2p_tls": "p2p_tls_daemon_cpu_s_per_GiB",
        }[mode]
        out[cpu_key] = round(median(per_gib), 3)
        out[f"{key}_source_cpu_s"] = round(median([r["source_cpu_s"] for r in runs]), 3)
        out[f"{key}_destination_cpu_s"] = round(median([r["destination_cpu_s"] for r in runs]), 3)
        out[f"{key}_bytes"] = int(median([r["bytes"] for r in runs]))
    if "native" in results:
        for mode, ratio_key in (("tunnelled", "ratio"), ("tls", "tls_ratio"), ("p2p", "p2p_ratio"), ("p2p_tls", "p2p_tls_ratio")):
            if mode in results:
                out[ratio_key] = round(out[f"{prefix[mode]}_s"] / out["native_s"], 3)
    if "native" in results and "relay2" in results:
        out["relay2_ratio"] = round(out["relay2_s"] / out["native_s"], 3)
    if "relay2" in results and "tunnelled" in results:
        out["tunnelled_vs_relay2"] = round(out["tunnelled_s"] / out["relay2_s"], 3)
    if "native" in results and "qemu_tcp" in results:
        out["qemu_tcp_ratio"] = round(out["qemu_tcp_s"] / out["native_s"], 3)
    if "qemu_tcp" in results and "tunnelled" in results:
        out["tunnelled_vs_qemu_tcp"] = round(out["tunnelled_s"] / out["qemu_tcp_s"], 3)
    if "qemu_tls" in results and "tls" in results:
        out["tls_vs_qemu_tls"] = round(out["tls_tunnelled_s"] / out["qemu_tls_s"], 3)
    if "qemu_tls" in results and "p2p_tls" in results:
        out["p2p_tls_vs_qemu_tls"] = round(out["p2p_tls_s"] / out["qemu_tls_s"], 3)
    return out


async def run(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    random_mib = args.size or (256 if args.quick else 1024)
    repeat = 1 if args.quick and args.repeat is None else (args.repeat or 3)
    root = tempfile.mkdtemp(prefix="tunnel-bench-qemu-")
    os.chmod(root, 0o700)
    daemons: Daemons | None = None
    random_modes = [m for m in modes if m in RANDOM_MODES]
    dirty_modes = [m for m in modes if m in DIRTY_MODES]
    try:
        setup: Setup | None = None
        if random_modes:
            rand = os.path.join(root, "guest-ram.bin")
            say(f"writing {random_mib} MiB of random guest RAM ...")
            expected = await trio.to_thread.run_sync(write_random, rand, random_mib * MiB)
            setup = Setup(root=root, rand=rand, random_bytes=random_mib * MiB, expected_sha256=expected, args=guest_args(rand, random_mib))
        dirty = dirty_setup(root, args.dirty_mib or (64 if args.quick else 256), args.dirty_rate, args.dirty_wait) if dirty_modes else None
        certs: dict[str, TLSFiles] | None = None
        if any(m not in ("native", "qemu_tcp", "relay2", "dirty_native") for m in modes):  # qemu_tls needs them, and every daemon
            certdir = os.path.join(root, "certs")
            os.mkdir(certdir)
            certs = make_certs(certdir)
        if any(m not in DIRECT_MODES and m != "dirty_native" for m in modes):
            assert certs is not None
            daemons = Daemons(root, certs)
            await daemons.start("source", allow=[])
            await daemons.start("destination", allow=["cn:source"])
        results: dict[str, list[dict[str, float]]] = {m: [] for m in random_modes}
        dirty_results: dict[str, list[dict[str, Any]]] = {m: [] for m in dirty_modes}
        for index in range(1, repeat + 1):
            for mode in dirty_modes:
                assert dirty is not None
                with trio.fail_after(RUN_TIMEOUT):
                    if mode == "dirty_native":
                        d = await dirty_native_run(dirty, index)
                    else:
                        assert daemons is not None
                        d = await dirty_daemon_run(dirty, daemons, index)
                dirty_results[mode].append(d)
                say(f"run {index} {mode}: " + (f"converged in {d['seconds']:.3f} s, {d['iterations']} iterations, guest "
                                               f"{'ok' if d['guest_ok'] else 'CORRUPT'}, progress on the destination: "
                                               f"{'yes' if d['guest_progress'] else 'NO'}" if d["converged"] else
                                               f"did not converge within {dirty.wait:g} s ({d['iterations']} iterations)"))
            for mode in random_modes:
                assert setup is not None
                check = args.verify_all or index == 1
                with trio.fail_after(RUN_TIMEOUT):
                    if mode == "native":
                        r = await native_run(setup, index, check)
                    elif mode == "qemu_tcp":
                        r = await native_run(setup, index, check, tcp=True)
                    elif mode == "qemu_tls":
                        r = await native_run(setup, index, check, certs)
                    elif mode == "relay2":
                        r = await native_run(setup, index, check, relays=True)
                    else:
                        assert daemons is not None
                        r = await daemon_run(setup, daemons, mode, index, check)
                results[mode].append(r)
                line = f"run {index} {mode:9s} {r['seconds']:7.3f} s  {r['bytes'] / r['seconds'] / 1e6:7.1f} MB/s"
                if mode in DIRECT_MODES:
                    line += f"  qemu cpu {r['qemu_cpu_s']:.2f} s"
                else:
                    line += f"  wall {r['wall_s']:.3f} s  daemon cpu {r['source_cpu_s']:.2f} + {r['destination_cpu_s']:.2f} s"
                say(line + ("  (memory verified)" if check else ""))
        out = summarize(results, setup, repeat) if setup is not None else {"repeat": repeat}
        if dirty is not None:
            out.update(summarize_dirty(dirty_results, dirty))
        return out
    except Exception:
        # The temporary directory goes away below: keep what the daemons said about the failure.
        for daemon in daemons.procs.values() if daemons is not None else ():
            print(f"--- {daemon.name} daemon log (tail) ---\n{daemon.log_tail()}", file=sys.stderr)
        raise
    finally:
        with trio.CancelScope(shield=True):
            if daemons is not None:
                await daemons.stop()
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB of random RAM and 1 run per mode")
    p.add_argument("--size", type=int, help="MiB of random guest RAM (default 1024)")
    p.add_argument("--repeat", type=int, help="runs per mode (default 3; 1 with --quick)")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated subset of {','.join(MODES)} (default {DEFAULT_MODES})")
    p.add_argument("--verify-all", action="store_true", help="check the destination's memory after every run, not only the first of each mode")
    p.add_argument("--dirty-mib", type=int, help="the self-checking guest's working set in MiB (default 256; 64 with --quick)")
    p.add_argument("--dirty-rate", type=int, default=10000, help="pages it rewrites per second, 0: flat out (default 10000, ~40 MiB/s)")
    p.add_argument("--dirty-wait", type=float, default=120.0, help="seconds its pre-copy gets to converge (default 120)")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        p.error(f"unknown modes {unknown}: choose from {','.join(MODES)}")
    if qemu_binary() is None:
        raise SystemExit("qemu-system-x86_64 not found (set $TUNNEL_QEMU)")
    try:
        result = trio.run(run, args, modes)
    except KeyboardInterrupt:
        raise SystemExit("interrupted (everything started was stopped and the temporary files removed)") from None
    emit(result)


if __name__ == "__main__":
    main()
