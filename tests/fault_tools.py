"""Fault injection against real daemon processes and real QEMU guests.

* :class:`Relay`: a man in the middle between the source daemon and the
  destination daemon (unix socket or TCP).  It forwards bytes both ways and
  follows the tunnel's frame headers (12 bytes after an 8-byte preface, see
  protocol.md §2-§3), so a fault can be armed at a byte count or at a frame:
  the PREPARE or FINISH call, the stream's end, FINISH's answer.  Armed
  actions: ``fin`` (orderly close both ways), ``rst`` (SO_LINGER 0 then
  close: a TCP reset; on a unix socket a plain close), ``stall`` (stop
  forwarding until released or cut) or a callback (kill something, then go
  on forwarding).
* :class:`Pair`: two ``tunnel daemon`` processes (source and destination),
  the relay, and a guest with random RAM; :meth:`Pair.run_case` migrates
  with one fault injected, restarts what died, lets the daemons settle and
  checks the invariant (:meth:`Pair.check`): the guest runs on exactly one
  host, as it ran before, with its memory intact; no QEMU, temporary file,
  guest directory or daemon fd is left over.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Self

import trio
from daemon_proc import DaemonProcess, daemon_process, kill_guests, qemu_pids_under
from qemu_fixtures import RANDOM_ADDR, RandomRam, base_args, file_digest, loader_args

from tunnel._errors import TunnelError
from tunnel._frames import HEADER, HEADER_SIZE, FrameType
from tunnel.client import Client, connect
from tunnel.control import Procedure
from tunnel.daemon import DaemonError

__all__ = ["FAULTS", "POINTS", "Case", "Pair", "Relay", "Result", "Trigger", "make_ram", "random_case"]

MiB = 1024 * 1024
PREFACE_SIZE = 8
#: Bytes of an RPC frame's payload that name the call: program, version, procedure, serial.
RPC_PREFIX = struct.Struct(">IIII")
#: Rows in these states are still moving: the checker waits for them to settle.
TRANSIENT = frozenset({"migrating", "incoming", "migrated, unconfirmed", "unknown"})
#: How long the daemons get to settle after a fault (the source retries MIGRATION_OUTCOME every 2 s).
SETTLE_TIMEOUT = 20.0
#: Migration bandwidth cap: 32 MiB of random RAM take ~2 s, so "during the transfer" is a real window.
BANDWIDTH_MIB = 16
GUEST = "vm"
IMAGE_GUEST = "img"
IMAGE_DEFINITION = {"name": IMAGE_GUEST, "image": {"size_mib": 64, "random_mib": 32, "dirty_pages_per_s": 500}}
DAEMON_ERRORS = (DaemonError, TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


# ----------------------------------------------------------------------
# The relay


class _FrameTracker:
    """Follows one direction of a tunnel connection: where each frame starts, its type and (RPC) procedure."""

    def __init__(self) -> None:
        self.skip = PREFACE_SIZE  # payload bytes (or the preface) still to pass before the next header
        self.head = bytearray()  # header (+ RPC prefix) bytes collected so far
        self.head_start = 0  # offset, in the chunk being fed, where the pending header began (0 if earlier)

    def feed(self, chunk: bytes) -> list[tuple[int, int, int | None]]:
        """(offset in *chunk* where a frame starts, frame type, RPC procedure or None) for each frame identified."""
        found: list[tuple[int, int, int | None]] = []
        i = 0
        n = len(chunk)
        while i < n:
            if self.skip:
                step = min(self.skip, n - i)
                self.skip -= step
                i += step
                continue
            if not self.head:
                self.head_start = i
            need = HEADER_SIZE
            if len(self.head) >= HEADER_SIZE:
                length, ftype = HEADER.unpack_from(self.head)[:2]
                if ftype in (FrameType.RPC_CALL, FrameType.RPC_REPLY, FrameType.RPC_ERROR) and length >= RPC_PREFIX.size:
                    need = HEADER_SIZE + RPC_PREFIX.size
            take = min(need - len(self.head), n - i)
            self.head += chunk[i : i + take]
            i += take
            if len(self.head) < need:
                continue
            length, ftype = HEADER.unpack_from(self.head)[:2]
            if need == HEADER_SIZE and ftype in (FrameType.RPC_CALL, FrameType.RPC_REPLY, FrameType.RPC_ERROR) and length >= RPC_PREFIX.size:
                continue  # go on collecting the RPC prefix
            procedure = RPC_PREFIX.unpack_from(self.head, HEADER_SIZE)[2] if need > HEADER_SIZE else None
            found.append((self.head_start, ftype, procedure))
            self.skip = length - (need - HEADER_SIZE)
            self.head = bytearray()
            self.head_start = 0
        return found


@dataclass(kw_only=True)
class Trigger:
    """Where an armed fault fires, on the first connection that gets there."""

    #: ``fwd`` (source to destination) or ``back``.
    direction: str = "fwd"
    #: Fire once this many bytes went that way on one connection ...
    at_bytes: int | None = None
    #: ... or at a frame of this type (and, for RPC frames, this procedure).
    frame: int | None = None
    procedure: int | None = None
    #: Act after forwarding the chunk that holds the frame, rather than before the frame.
    after: bool = False


Action = str | Callable[[], None]


class _Conn:
    def __init__(self, a: trio.socket.SocketType, b: trio.socket.SocketType) -> None:
        self.socks = (a, b)
        self.counts = {"fwd": 0, "back": 0}
        self.trackers = {"fwd": _FrameTracker(), "back": _FrameTracker()}
        self.stalled = False
        self.resume = trio.Event()
        self.closed = False

    def close(self, how: str) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self.socks:
            with contextlib.suppress(OSError):
                if how == "rst" and s.family != socket.AF_UNIX:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif how == "fin":
                    s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.resume.set()


class Relay:
    """Forwards connections from *listen* (a unix path, or a TCP port with 0 for any) to *target*; faults on demand."""

    def __init__(self, listen: str | int, target: str | int) -> None:
        self.listen = listen
        self.target = target
        self.port = 0
        self.conns: list[_Conn] = []
        self.total = 0
        self.trigger: Trigger | None = None
        self.action: Action | None = None
        #: Set when the armed fault fired.
        self.fired = trio.Event()
        self.fired_at: str | None = None

    @property
    def uri(self) -> str:
        return f"unix://{self.listen}" if isinstance(self.listen, str) else f"tcp://127.0.0.1:{self.port}"

    def arm(self, trigger: Trigger, action: Action) -> trio.Event:
        self.trigger, self.action = trigger, action
        self.fired = trio.Event()
        self.fired_at = None
        return self.fired

    def disarm(self) -> None:
        self.trigger = self.action = None

    def cut(self, how: str) -> None:
        """Close every current connection now (``fin`` or ``rst``)."""
        for conn in list(self.conns):
            conn.close(how)

    def stall(self) -> None:
        for conn in self.conns:
            conn.stalled = True

    def release(self) -> None:
        for conn in self.conns:
            conn.stalled = False
            conn.resume.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if isinstance(self.listen, str):
            lsock = trio.socket.socket(socket.AF_UNIX)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen)
            await lsock.bind(self.listen)
        else:
            lsock = trio.socket.socket(socket.AF_INET)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await lsock.bind(("127.0.0.1", self.listen))
            self.port = lsock.getsockname()[1]
        lsock.listen(16)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    a, _ = await lsock.accept()
                    nursery.start_soon(self._serve, a)
        finally:
            lsock.close()
            self.cut("fin")
            if isinstance(self.listen, str):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.listen)

    async def _serve(self, a: trio.socket.SocketType) -> None:
        if isinstance(self.target, str):
            b = trio.socket.socket(socket.AF_UNIX)
            address: Any = self.target
        else:
            b = trio.socket.socket(socket.AF_INET)
            address = ("127.0.0.1", self.target)
        try:
            await b.connect(address)
        except OSError:
            a.close()
            b.close()
            return
        conn = _Conn(a, b)
        self.conns.append(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, conn, a, b, "fwd")
                nursery.start_soon(self._pump, conn, b, a, "back")
        finally:
            self.conns.remove(conn)
            conn.close("fin")

    def _due(self, conn: _Conn, direction: str, chunk: bytes, events: list[tuple[int, int, int | None]]) -> int | None:
        """Offset in *chunk* at which the armed fault fires, or None."""
        t = self.trigger
        if t is None or t.direction != direction:
            return None
        if t.at_bytes is not None:
            before = conn.counts[direction]
            if before + len(chunk) >= t.at_bytes:
                return len(chunk) if t.after else max(0, t.at_bytes - before)
            return None
        for offset, ftype, procedure in events:
            if ftype == t.frame and (t.procedure is None or procedure == t.procedure):
                return len(chunk) if t.after else offset
        return None

    async def _pump(self, conn: _Conn, src: trio.socket.SocketType, dst: trio.socket.SocketType, direction: str) -> None:
        try:
            while True:
                chunk = await src.recv(1 << 16)
                if not chunk:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                events = conn.trackers[direction].feed(chunk)
                at = self._due(conn, direction, chunk, events)
                if at is not None:
                    action = self.action
                    self.disarm()
                    self.fired_at = f"{direction} byte {conn.counts[direction] + at}"
                    await self._send(conn, dst, chunk[:at], direction)
                    chunk = chunk[at:]
                    self.fired.set()
                    if callable(action):
                        action()
                    elif action == "stall":
                        self.stall()
                    else:
                        assert action in ("fin", "rst")
                        conn.close(action)
                        return
                while conn.stalled and not conn.closed:
                    conn.resume = trio.Event()
                    await conn.resume.wait()
                if conn.closed:
                    return
                await self._send(conn, dst, chunk, direction)
        except (OSError, trio.ClosedResourceError):
            conn.close("fin")

    async def _send(self, conn: _Conn, dst: trio.socket.SocketType, data: bytes, direction: str) -> None:
        view = memoryview(data)
        while view:
            sent = await dst.send(view)
            view = view[sent:]
            conn.counts[direction] += sent
            self.total += sent


# ----------------------------------------------------------------------
# Cases and results

#: Fault classes and the points each can hit.
FAULTS: dict[str, tuple[str, ...]] = {
    "cut": ("prepare", "transfer", "end", "finish", "finish-answer", "confirm"),
    "stall": ("transfer", "end", "finish-answer"),
    "term-src": ("transfer", "end", "finish"),
    "kill-src": ("transfer", "end", "finish"),
    "term-dst": ("prepare", "transfer", "end", "finish"),
    "kill-dst": ("prepare", "transfer", "end", "finish"),
    "kill-qemu-src": ("transfer", "finish"),
    "kill-qemu-dst": ("transfer", "end"),
    "stop-qemu-dst": ("transfer", "end"),
    "disk-full": ("transfer",),
}
POINTS = ("prepare", "transfer", "end", "finish", "finish-answer", "confirm")


@dataclass(frozen=True, kw_only=True)
class Case:
    fault: str
    point: str
    #: ``fin`` or ``rst`` for a cut (``rst`` is a real reset over TCP only).
    how: str = "fin"
    tunnelled: bool = True
    transport: str = "unix"
    #: Where in the stream a ``transfer`` point fires, as a fraction of the random data.
    fraction: float = 0.5
    #: Seconds: how long a stall or SIGSTOP lasts, or how long FINISH's answer is held before the cut.
    hold: float = 2.0

    @property
    def label(self) -> str:
        extra = f"/{self.how}" if self.fault == "cut" else ""
        mode = "tunnelled" if self.tunnelled else "native"
        return f"{self.fault}{extra}@{self.point} {mode}/{self.transport}"


def random_case(rng: random.Random) -> Case:
    fault = rng.choice(sorted(FAULTS))
    point = rng.choice(FAULTS[fault])
    tunnelled = fault == "disk-full" or rng.random() < 0.75
    if not tunnelled and point == "end":
        # A native migration's stream bypasses the relay: no frame marks its end.  Never "finish" for a QEMU
        # kill on the destination: once the destination resumed the guest that would kill its only copy.
        point = "finish" if "finish" in FAULTS[fault] else "transfer"
    transport = rng.choice(("unix", "tcp"))
    return Case(
        fault=fault,
        point=point,
        how=rng.choice(("fin", "rst")),
        tunnelled=tunnelled,
        transport=transport,
        fraction=round(rng.uniform(0.05, 0.95), 2),
        hold=round(rng.uniform(0.5, 4.0), 1),
    )


@dataclass
class Result:
    case: Case
    #: ``clean``, ``lost``, ``doubled`` or ``leaked``.
    verdict: str
    #: ``source``, ``destination`` or None (the guest runs nowhere).
    where: str | None
    #: Whether the fault fired (a migration can end before its point).
    injected: bool
    migrate: str
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        note = "" if self.injected else " (fault not reached)"
        more = f" - {'; '.join(self.details)}" if self.details else ""
        return f"{self.verdict:7} {self.case.label}: guest on {self.where}, migrate {self.migrate}{note} [{self.seconds:.1f}s]{more}"


def make_ram(directory: str, size: int = 32 * MiB) -> RandomRam:
    """A file of random bytes in *directory* (which the daemons allow) and its sha256."""
    path = os.path.join(directory, f"random-{size}.bin")
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(0, size, MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
    return RandomRam(path=path, size=size, sha256=digest.hexdigest())


#: How long a leftover (a QEMU, a daemon's fd) may take to go before it counts as leaked: longer than the
#: daemon's own bounds on winding a migration down (telling the destination, 5 s, then closing the connection,
#: 5 s; stopping QEMU, quit then SIGTERM), so a slow machine is not mistaken for a leak.
LEFTOVER_WAIT = 15.0

def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return -1


def _stray_files(state_dir: str, live_guest: str | None) -> list[str]:
    """Temporary files anywhere, and guest directories (sockets, pidfiles, records) of guests not running."""
    stray = []
    for dirpath, dirnames, filenames in os.walk(state_dir):
        for name in filenames + dirnames:
            if ".tmp-" in name or name.endswith(".creating"):
                stray.append(os.path.relpath(os.path.join(dirpath, name), state_dir))
    run = os.path.join(state_dir, "run")
    for name in sorted(os.listdir(run)) if os.path.isdir(run) else ():
        if os.path.isdir(os.path.join(run, name)) and name != live_guest:
            stray.append(f"run/{name}/ ({', '.join(sorted(os.listdir(os.path.join(run, name))))})")
    return stray


# ----------------------------------------------------------------------
# The pair of daemons


class _Slot:
    """One daemon role: its process (restarted after a fault) and its command line."""

    def __init__(self, root: str, name: str, args: list[str]) -> None:
        self.root, self.name, self.args = root, name, args
        self.stack: AsyncExitStack | None = None
        self.proc: DaemonProcess | None = None
        self.restarts = 0

    async def start(self) -> None:
        self.stack = AsyncExitStack()
        self.proc = await self.stack.enter_async_context(daemon_process(self.root, self.name, *self.args, kill_qemus=False))

    async def close(self) -> None:
        if self.stack is not None:
            stack, self.stack = self.stack, None
            await stack.aclose()

    def dead(self) -> bool:
        return self.proc is None or self.proc.proc.poll() is not None

    async def restart(self) -> None:
        await self.close()
        self.restarts += 1
        await self.start()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)


class Pair:
    """A source and a destination daemon (processes), a relay between them, and the test guest.

    The destination listens on a unix socket and (``--insecure``) on TCP;
    the source reaches it through a unix relay or a TCP relay, as the case
    says.  The client always talks to each daemon over its own unix socket.
    """

    #: The destination's images tmpfs: more than the image guest's whole image (64 MiB), so once the filler is gone
    #: the guest can dirty every page of its sparse image there; at 40 MiB it paused for a full disk after the move.
    def __init__(self, root: str, ram: RandomRam, *, images_tmpfs_mib: int | None = 96) -> None:
        self.root = root
        self.ram = ram
        self.src_sock, self.dst_sock = f"{root}/src.sock", f"{root}/dst.sock"
        self.dst_port = _free_port()
        allow = ["--allow-path", os.path.dirname(ram.path), "--insecure"]
        self.src = _Slot(root, "src", ["--listen", f"unix://{self.src_sock}", *allow])
        self.dst = _Slot(
            root,
            "dst",
            ["--listen", f"unix://{self.dst_sock}", "--listen", f"tcp://127.0.0.1:{self.dst_port}", "--allow-peer", "addr:127.0.0.1", *allow],
        )
        self.relays = {"unix": Relay(f"{root}/relay.sock", self.dst_sock), "tcp": Relay(0, self.dst_port)}
        self.images_tmpfs_mib = images_tmpfs_mib
        self.tmpfs: str | None = None
        self.tmpfs_skip: str | None = None
        self.fd_baseline: dict[int, int] = {}
        self._nursery: trio.Nursery | None = None

    # -------------------------------------------------------------- lifetime

    async def __aenter__(self) -> Self:
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            self._mount_tmpfs()
            self._stack.callback(self._unmount_tmpfs)
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(self._nursery.cancel_scope.cancel)
            for relay in self.relays.values():
                await self._nursery.start(relay.run)
            self._stack.push_async_callback(self._stop_daemons)
            await self.src.start()
            await self.dst.start()
            async with self.client("src") as c:
                await c.define({"name": GUEST, "qemu": base_args() + loader_args(self.ram, RANDOM_ADDR)})
                await c.define(IMAGE_DEFINITION)
                # One start and stop, so the fd baseline (taken by reset) is of a daemon that has run a guest.
                await c.start(GUEST)
            await self.reset()
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(None, None, None)

    async def _stop_daemons(self) -> None:
        with trio.CancelScope(shield=True):
            for slot in (self.src, self.dst):
                await slot.close()
                kill_guests(os.path.join(self.root, slot.name))

    def _mount_tmpfs(self) -> None:
        """The destination's images directory on a small tmpfs, so a case can fill it (root only)."""
        if self.images_tmpfs_mib is None:
            return
        if os.geteuid() != 0:
            self.tmpfs_skip = "filling the destination's disk needs root to mount a small tmpfs"
            return
        path = os.path.join(self.root, "dst", "images")
        os.makedirs(path, mode=0o700, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.images_tmpfs_mib}m,mode=0700", "tmpfs", path], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            self.tmpfs_skip = f"cannot mount a tmpfs: {done.stderr.strip()}"
            return
        self.tmpfs = path

    def _unmount_tmpfs(self) -> None:
        if self.tmpfs is not None:
            subprocess.run(["umount", "-l", self.tmpfs], capture_output=True, check=False)
            self.tmpfs = None

    @contextlib.asynccontextmanager
    async def client(self, side: str) -> AsyncIterator[Client]:
        async with connect(f"unix://{self.src_sock if side == 'src' else self.dst_sock}") as c:
            yield c

    def slot(self, side: str) -> _Slot:
        return self.src if side == "src" else self.dst

    async def restart_dead(self, sides: tuple[str, ...] = ("src", "dst"), wait: float = 0.0) -> list[str]:
        """Restart each daemon of *sides* that exited (after waiting up to *wait* s for one told to stop)."""
        restarted = []
        for side in sides:
            slot = self.slot(side)
            if wait and slot.proc is not None and slot.proc.proc.returncode is None:
                with trio.move_on_after(wait):
                    await slot.proc.proc.wait()
            if slot.dead():
                await slot.restart()
                restarted.append(side)
        return restarted

    # -------------------------------------------------------------- observing

    async def rows(self, side: str) -> dict[str, dict[str, Any]]:
        async with self.client(side) as c:
            return {row["name"]: row for row in await c.list()}

    async def settle(self, name: str, timeout: float = SETTLE_TIMEOUT) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Poll both daemons until *name* is in no transient state and two looks agree, or *timeout* passes."""
        last: tuple[Any, Any] | None = None
        src: dict[str, Any] = {}
        dst: dict[str, Any] = {}
        with trio.move_on_after(timeout):
            while True:
                try:
                    src, dst = await self.rows("src"), await self.rows("dst")
                except DAEMON_ERRORS:
                    await trio.sleep(0.5)
                    continue
                look = (src.get(name), dst.get(name))
                moving = any(row is not None and row["state"] in TRANSIENT for row in look)
                if not moving and look == last:
                    return src, dst, True
                last = look
                await trio.sleep(0.5)
        return src, dst, False

    async def memory_sha256(self, side: str, name: str) -> str:
        """sha256 of the loaded region, by pmemsave into the guest's own directory."""
        state_dir = os.path.join(self.root, side)
        path = os.path.join(state_dir, "run", name, "fault-check.mem")
        async with self.client(side) as c:
            reply = await c.monitor(
                name, {"execute": "pmemsave", "arguments": {"val": RANDOM_ADDR, "size": self.ram.size, "filename": "fault-check.mem"}}
            )
        if "return" not in reply:
            raise DaemonError(f"pmemsave failed: {reply}")
        try:
            return await trio.to_thread.run_sync(file_digest, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def check(self, name: str = GUEST, *, expect_state: str = "running", may_be_lost: bool = False) -> tuple[str, str | None, list[str]]:
        """The invariant after a fault: (verdict, where the guest runs, details)."""
        src, dst, settled = await self.settle(name)
        details: list[str] = []
        verdict = "clean"
        rows = {"source": src.get(name), "destination": dst.get(name)}
        live = {side: row for side, row in rows.items() if row is not None and row["state"] in ("running", "paused")}
        if not settled:
            stuck = {side: row["state"] for side, row in rows.items() if row is not None}
            details.append(f"not settled after {SETTLE_TIMEOUT:.0f} s: {stuck}")
            verdict = "lost"
        where = next(iter(live)) if len(live) == 1 else None
        if len(live) > 1:
            verdict = "doubled"
            details.append("runs on both hosts: " + ", ".join(f"{s} {r['state']} pid {r['pid']}" for s, r in live.items()))
        elif not live:
            if may_be_lost:
                details.append("runs nowhere: the fault killed its only complete copy (expected)")
            else:
                verdict = "lost" if verdict == "clean" else verdict
                details.append(f"runs nowhere: {({s: r['state'] for s, r in rows.items() if r is not None})}")
        else:
            assert where is not None
            row = live[where]
            if row["state"] != expect_state:
                verdict = "lost"
                details.append(f"{row['state']} on the {where}, was {expect_state}")
            side = "src" if where == "source" else "dst"
            if name == GUEST:
                try:
                    digest = await self.memory_sha256(side, name)
                except DAEMON_ERRORS as exc:
                    verdict = "lost"
                    details.append(f"cannot read its memory on the {where}: {exc}")
                else:
                    if digest != self.ram.sha256:
                        verdict = "lost"
                        details.append(f"memory on the {where} differs from the loaded data")
        # Leaks: QEMU processes beyond the live guest, temporary files, guest directories.
        leaks: list[str] = []
        for side, label in (("src", "source"), ("dst", "destination")):
            state_dir = os.path.join(self.root, side)
            pids = sorted(qemu_pids_under(state_dir))
            wanted = [live[label]["pid"]] if label in live and live[label]["pid"] is not None else []
            if name == IMAGE_GUEST:
                wanted = []
            if pids != wanted:
                leaks.append(f"QEMU on the {label}: {pids}, expected {wanted}")
            stray = _stray_files(state_dir, name if label in live and name == GUEST else None)
            if stray:
                leaks.append(f"files on the {label}: {', '.join(stray)}")
        if leaks:
            details.extend(leaks)
            if verdict == "clean":
                verdict = "leaked"
        return verdict, where, details

    async def reset(self) -> list[str]:
        """Stop the guests wherever they run; then check the daemons' fd counts against the last quiet moment."""
        problems: list[str] = []
        for side in ("src", "dst"):
            try:
                rows = await self.rows(side)
                async with self.client(side) as c:
                    for name, row in rows.items():
                        if row["state"] != "shut off":
                            with contextlib.suppress(DaemonError):
                                await c.destroy(name)
            except DAEMON_ERRORS as exc:
                problems.append(f"cannot reset the {side}: {exc}")
        # A memory-image guest that ended on the destination leaves its image there (a transient domain's disk):
        # remove it, so the next case fills the destination's small tmpfs from the same start.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "dst", "images", f"{IMAGE_GUEST}.img"))
        for side in ("src", "dst"):
            state_dir = os.path.join(self.root, side)
            with trio.move_on_after(LEFTOVER_WAIT):
                while qemu_pids_under(state_dir):
                    await trio.sleep(0.1)
            left = qemu_pids_under(state_dir)
            if left:
                problems.append(f"QEMU left on the {side} after destroy: {left}")
                kill_guests(state_dir)
        # fds: equal to the count at the previous quiet moment of the same daemon process (a little time to close).
        for side in ("src", "dst"):
            proc = self.slot(side).proc
            if proc is None:
                continue
            count = _fd_count(proc.pid)
            base = self.fd_baseline.get(proc.pid)
            with trio.move_on_after(LEFTOVER_WAIT):
                while base is not None and count > base:
                    await trio.sleep(0.1)
                    count = _fd_count(proc.pid)
            if base is not None and count > base:
                problems.append(f"the {side} daemon holds {count} fds, {base} before")
            if base is None or count < base:
                self.fd_baseline[proc.pid] = count
        return problems

    # -------------------------------------------------------------- one case

    async def run_case(self, case: Case, *, timeout: float = 120) -> Result:
        with trio.fail_after(timeout):
            return await self._run_case(case)

    async def _run_case(self, case: Case) -> Result:
        started = time.monotonic()
        name = IMAGE_GUEST if case.fault == "disk-full" else GUEST
        relay = self.relays[case.transport]
        filler = None
        if case.fault == "disk-full":
            if self.tmpfs is None:
                return Result(case, "clean", None, False, "skipped", [self.tmpfs_skip or "no tmpfs"], 0.0)
            filler = self._fill(16 * MiB)
        async with self.client("src") as c:
            force = any(r["name"] == name and r.get("migrated_to") for r in await c.list())
            await c.start(name, force=force)
        if name == GUEST:
            await self._wait_loaded()
        details: list[str] = []
        outcome = "did not return"
        fired = trio.Event()
        post: Callable[[], Any] | None = None
        may_be_lost = False
        src_qemu = self._qemu_pid("src")
        state: dict[str, Any] = {}

        def kill_daemon(side: str, sig: int) -> Callable[[], None]:
            return lambda: self.slot(side).signal(sig)

        def kill_qemu(side: str, sig: int) -> Callable[[], None]:
            def act() -> None:
                pid = src_qemu if side == "src" else self._qemu_pid("dst")
                state["qemu"] = pid
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)

            return act

        fault, point = case.fault, case.point
        action: Action
        if fault == "cut":
            action = case.how
        elif fault == "stall":
            action = "stall"
        elif fault in ("term-src", "kill-src", "term-dst", "kill-dst"):
            action = kill_daemon(fault[-3:], signal.SIGTERM if fault.startswith("term") else signal.SIGKILL)
        elif fault == "kill-qemu-src":
            action = kill_qemu("src", signal.SIGKILL)
            may_be_lost = point == "transfer"
        elif fault == "kill-qemu-dst":
            action = kill_qemu("dst", signal.SIGKILL)
        elif fault == "stop-qemu-dst":
            action = kill_qemu("dst", signal.SIGSTOP)
        else:
            action = "watch"
        trigger = self._trigger(case)
        if point == "finish-answer":
            # FINISH's answer is held in the relay, then the connection goes: the source lost it.
            inner = action
            action = "stall"
            if fault == "cut":
                post = lambda: relay.cut(case.how)
            elif callable(inner):
                post = inner
        if trigger is not None and action != "watch":
            fired = relay.arm(trigger, action)
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def migrate() -> None:
                nonlocal outcome
                try:
                    async with self.client("src") as c:
                        await c.migrate(name, relay.uri, live=True, p2p=True, tunnelled=case.tunnelled, bandwidth_mib=BANDWIDTH_MIB)
                    outcome = "completed"
                except DAEMON_ERRORS as exc:
                    outcome = "failed: " + str(exc).splitlines()[0][:160]
                finally:
                    done.set()

            nursery.start_soon(migrate)
            if trigger is None and action != "watch":
                nursery.start_soon(self._watch_jobinfo, case, relay, action, fired, done)
            with trio.move_on_after(90):
                async with trio.open_nursery() as waiter:

                    async def on_done() -> None:
                        await done.wait()
                        waiter.cancel_scope.cancel()

                    async def on_fired() -> None:
                        await fired.wait()
                        waiter.cancel_scope.cancel()

                    waiter.start_soon(on_done)
                    waiter.start_soon(on_fired)
            relay.disarm()
            if fired.is_set():
                if fault == "stall" or fault == "stop-qemu-dst" or point == "finish-answer":
                    await trio.sleep(case.hold)
                if post is not None:
                    post()
                if fault == "stop-qemu-dst" and state.get("qemu") is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(state["qemu"], signal.SIGCONT)
                relay.release()
                if fault in ("term-src", "kill-src", "term-dst", "kill-dst"):
                    restarted = await self.restart_dead((fault[-3:],), wait=40)
                    if restarted:
                        details.append(f"restarted {', '.join(restarted)}")
            with trio.move_on_after(90):
                await done.wait()
            nursery.cancel_scope.cancel()
        relay.release()
        restarted = await self.restart_dead()
        if restarted:
            details.append(f"restarted {', '.join(restarted)}")
        if fault == "disk-full":
            verdict, where, more = await self._check_image(filler)
        else:
            verdict, where, more = await self.check(name, may_be_lost=may_be_lost)
        details += more
        problems = await self.reset()
        if problems:
            details += problems
            if verdict == "clean":
                verdict = "leaked"
        injected = fired.is_set() or fault == "disk-full"
        return Result(case, verdict, where, injected, outcome, details, time.monotonic() - started)

    def _trigger(self, case: Case) -> Trigger | None:
        """Where in the relayed bytes the case's fault fires (None: by watching the source's job instead)."""
        point = case.point
        if point == "prepare":
            return Trigger(direction="fwd", frame=FrameType.RPC_CALL, procedure=Procedure.PREPARE)
        if point == "transfer":
            if not case.tunnelled:
                return None  # QEMU's data bypasses the relay
            return Trigger(direction="fwd", at_bytes=int(self.ram.size * case.fraction))
        if point == "end":
            return Trigger(direction="fwd", frame=FrameType.STREAM_END)
        if point == "finish":
            return Trigger(direction="fwd", frame=FrameType.RPC_CALL, procedure=Procedure.FINISH, after=case.fault != "cut")
        if point == "finish-answer":
            return Trigger(direction="back", frame=FrameType.RPC_REPLY, procedure=Procedure.FINISH)
        if point == "confirm":
            return Trigger(direction="back", frame=FrameType.RPC_REPLY, procedure=Procedure.FINISH, after=True)
        raise ValueError(f"unknown point {point!r}")

    async def _watch_jobinfo(self, case: Case, relay: Relay, action: Action, fired: trio.Event, done: trio.Event) -> None:
        """Native migrations: fire once the source's job has sent *fraction* of the random data."""
        with contextlib.suppress(*DAEMON_ERRORS):
            async with self.client("src") as c:
                while not done.is_set():
                    info = await c.jobinfo(GUEST)
                    if info.get("status") == "active" and (info.get("data_processed") or 0) >= self.ram.size * case.fraction:
                        relay.fired_at = f"job at {info.get('data_processed')} bytes"
                        if callable(action):
                            action()
                        elif action == "stall":
                            relay.stall()
                        else:
                            relay.cut(action)
                        fired.set()
                        return
                    await trio.sleep(0.02)

    def _qemu_pid(self, side: str) -> int | None:
        pids = qemu_pids_under(os.path.join(self.root, side))
        return pids[0] if len(pids) == 1 else None

    async def _wait_loaded(self) -> None:
        """The loader device has copied the random data once QEMU answers (it runs at machine init); a short bound anyway."""
        with trio.fail_after(20):
            while True:
                async with self.client("src") as c:
                    reply = await c.monitor(GUEST, {"execute": "query-status"})
                if reply.get("return", {}).get("status") == "running":
                    return
                await trio.sleep(0.1)

    # -------------------------------------------------------------- the memory-image guest and a full disk

    def _fill(self, free: int) -> str:
        """Fill the destination's tmpfs until *free* bytes are left; returns the filler file."""
        assert self.tmpfs is not None
        path = os.path.join(self.tmpfs, "filler")
        st = os.statvfs(self.tmpfs)
        size = max(0, st.f_bavail * st.f_frsize - free)
        with open(path, "wb") as f:
            f.write(b"\xff" * size)
        return path

    async def _check_image(self, filler: str | None) -> tuple[str, str | None, list[str]]:
        """After a migration into a full disk: the guest runs on the source, nothing is left on the destination, and
        once there is room again a migration moves the very image (both sides' digests, ``verify``)."""
        verdict, where, details = await self.check(IMAGE_GUEST)
        if filler is not None:
            os.unlink(filler)
        if verdict != "clean" or where != "source":
            return verdict, where, details
        try:
            async with self.client("src") as c:
                result = await c.migrate(IMAGE_GUEST, self.relays["unix"].uri, live=True, p2p=True, tunnelled=True, verify=True)
        except DAEMON_ERRORS as exc:
            return "lost", where, [*details, f"the migration once there was room failed: {exc}"]
        if result.get("source_image_sha256") != result.get("destination_image_sha256") or not result.get("source_image_sha256"):
            return "lost", "destination", [*details, f"image digests differ: {result}"]
        verdict, _, more = await self.check(IMAGE_GUEST)
        details += [f"then migrated with room to spare: image {str(result['source_image_sha256'])[:12]} on both"] + more
        return verdict, where, details


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
