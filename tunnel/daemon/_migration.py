"""Migration between two daemons, modelled on libvirt's v3 sequence.

Theory of operation.  The client asks the *source* daemon to migrate a guest
(PEER2PEER: the source drives everything).  The source daemon

1. **begin**: checks the guest is running or paused and takes its definition
   (renamed if the client gave ``--dname``) and run state as the cookie;
2. connects to the destination daemon with its *own* identity and calls
   **prepare**: the destination authorizes that identity, starts QEMU with
   the same definition and ``-incoming defer``, and either (TUNNELLED) waits
   for the stream the source will open on this connection with the
   migration's id, or (native) opens a unix or TCP endpoint for QEMU;
3. **perform**: points its QEMU's migration at a socketpair whose other end
   the daemon pumps into the stream (TUNNELLED), or at the destination's
   endpoint (native), and waits for QEMU to report completion;
4. calls **finish** on the destination, which waits until its QEMU has
   loaded everything, resumes it if the source guest was running, keeps its
   definition and reports the state;
5. **confirm**: on success the source stops its QEMU (the guest now lives on
   the destination); on any failure it tells the destination to discard its
   QEMU and resumes the source guest as it was.

Each QEMU is connected to the tunnel through one end of a socketpair (a
two-way socket, not a pipe), and the daemon pumps both directions: QEMU's
migration stream forward and its return path back.  On a plain-socket
connection those bytes are spliced by the kernel and never enter Python.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any

import trio

from .._errors import TunnelError
from .._frames import DigestAlgorithm, StreamKind
from ..endpoints import (
    EndpointError,
    MemoryImageReader,
    MemoryImageWriter,
    PrecopyPolicy,
    Progress,
    image_digest,
    receive_into,
    send_from,
)
from ..qemu import (
    MigrationError,
    QemuError,
    QemuProcess,
    QMPError,
    cancel,
    query_migration,
    run_state,
    set_max_bandwidth,
    set_tls,
    start_incoming_fd,
    start_incoming_uri,
    start_outgoing_fd,
    start_outgoing_uri,
    wait_migration,
)
from ..transport import TunnelConnection, TunnelStream, open_connection
from ._imageguest import PAGE as PAGE_SIZE
from ._imageguest import ImageGuest
from ._net import TLSFiles, connect
from ._rpc import PROGRAM, DaemonError, Procedure, decode, encode, error_of, public_message

if TYPE_CHECKING:
    from ._daemon import Daemon, Domain

__all__ = ["UNLIMITED_BANDWIDTH", "Incoming", "SourceJob"]

MiB = 1024 * 1024
#: What "no limit" means to QEMU, whose own default caps migration at 128 MiB/s.
UNLIMITED_BANDWIDTH = 1 << 40
#: QEMU's return path (destination to source on the same socket): the
#: tunnel's streams are two-way, so it flows back through the tunnel.
RETURN_PATH = {"return-path": True}
#: How often QEMU's migration state is polled: it bounds how late completion is noticed.
POLL_INTERVAL = 0.005
#: How long the destination may take to load what the source finished sending.
FINISH_TIMEOUT = 120.0
#: Bound on each clean-up step, so an unresponsive peer cannot hang a failure.
CLEANUP_TIMEOUT = 15.0


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    return a, b


async def pump_socket(stream: TunnelStream, sock: socket.socket) -> tuple[int, int]:
    """Move bytes both ways between *sock* (QEMU's end is the other) and *stream*.

    Forward: everything QEMU writes, up to its EOF, then EOF on the stream.
    Back: everything the peer sends, then ``shutdown(SHUT_WR)`` so QEMU sees
    EOF at once.  Returns (bytes sent, bytes received).  The first failure of
    either direction stops both and is raised as itself (never as a group).
    """
    fd = sock.fileno()
    counts = [0, 0]
    failures: list[BaseException] = []

    async def forward(scope: trio.CancelScope) -> None:
        try:
            counts[0] = await stream.send_fd(fd)
            await stream.send_eof()
        except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
            scope.cancel()

    async def back(scope: trio.CancelScope) -> None:
        try:
            counts[1] = await stream.receive_fd(fd)
        except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
            scope.cancel()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # QEMU already closed its end

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forward, nursery.cancel_scope)
        nursery.start_soon(back, nursery.cancel_scope)
    if failures:
        raise failures[0]
    return counts[0], counts[1]


def domain_state(qemu_state: str) -> str:
    """What an operator calls QEMU's run state: running, paused (however it got there) or shut off."""
    if qemu_state == "running":
        return "running"
    return "shut off" if qemu_state == "shutdown" else "paused"


class SourceJob:
    """One outgoing PEER2PEER migration, owned by the source daemon."""

    def __init__(
        self,
        daemon: Daemon,
        domain: Domain,
        dest: str,
        *,
        live: bool,
        tunnelled: bool,
        bandwidth_mib: int,
        dname: str | None,
        verify: bool = False,
        direct_uri: str | None = None,
        direct_tls: bool = False,
    ) -> None:
        self.daemon = daemon
        #: Client-driven (not PEER2PEER) migration: only perform, to this QEMU endpoint the
        #: client got from the destination; the client then calls finish and confirm.
        self.direct_uri = direct_uri
        self.direct_tls = direct_tls
        self.was_running = False
        #: Memory-image guests: both sides report the image's content digest (costs a read of the image).
        self.verify = verify
        self.domain = domain
        self.dest = dest
        self.live = live
        self.tunnelled = tunnelled
        self.bandwidth_mib = bandwidth_mib
        self.dname = dname
        self.migration_id = uuid.uuid4().bytes
        self.state = "setup"
        self.error: str | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.stream: TunnelStream | None = None
        #: The memory-image reader of an image guest's migration (None for QEMU guests).
        self.reader: MemoryImageReader | None = None
        self.last: dict[str, Any] = {}
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        self.abort_reason: str | None = None
        self.summary: dict[str, Any] = {}
        #: From QEMU's ``migrate`` to the destination reporting the guest loaded (finish).
        self.transfer_started: float | None = None
        self.transfer_ended: float | None = None

    # ------------------------------------------------------------------
    # Control from other requests

    def abort(self, reason: str = "aborted by the client") -> None:
        if self.done.is_set():
            raise DaemonError(f"no migration job is running for domain {self.domain.name!r}")
        self.abort_reason = reason
        self.scope.cancel()

    async def set_speed(self, mib_per_s: int) -> None:
        self.bandwidth_mib = mib_per_s
        process = self.domain.process
        if self.reader is not None and self.stream is not None:
            self.stream.set_bandwidth(mib_per_s * MiB)  # the tunnel's own limiter: no QEMU here
        elif isinstance(process, QemuProcess):
            await set_max_bandwidth(process.qmp, self._bandwidth_bytes())
        await trio.lowlevel.checkpoint()

    def _bandwidth_bytes(self) -> int:
        return self.bandwidth_mib * MiB if self.bandwidth_mib > 0 else UNLIMITED_BANDWIDTH

    async def info(self) -> dict[str, Any]:
        """libvirt-style job statistics: times, data totals, rate, iteration."""
        if self.reader is not None:
            self._note_progress(self.reader.progress())
        elif not self.done.is_set() and isinstance(self.domain.process, QemuProcess) and self.state == "active":
            try:
                with trio.move_on_after(2):
                    self._note(await query_migration(self.domain.process.qmp))
            except QMPError:
                pass
        end = self.ended if self.ended is not None else time.monotonic()
        info: dict[str, Any] = {
            "domain": self.domain.name,
            "status": self.state,
            "destination": self.dest,
            "tunnelled": self.tunnelled,
            "live": self.live,
            "time_elapsed_ms": int((end - self.started) * 1000),
            "bandwidth_mib": self.bandwidth_mib,
        }
        info.update(self.last)
        rate = info.get("rate_bytes_per_s") or 0
        remaining = info.get("data_remaining")
        if self.state == "active" and rate and remaining is not None:
            info["time_remaining_ms"] = int(remaining / rate * 1000)
        elif self.state == "completed":
            info["time_remaining_ms"] = 0
        if self.transfer_started is not None and self.transfer_ended is not None:
            info["transfer_ms"] = round((self.transfer_ended - self.transfer_started) * 1000, 1)
        if self.stream is not None:
            stats = self.stream.statistics()
            info["tunnel_bytes_sent"] = stats.bytes_sent
            info["tunnel_bytes_received"] = stats.bytes_received
        if self.error is not None:
            info["error"] = self.error
        return info

    def _note_progress(self, progress: Progress) -> None:
        total = progress.total_bytes
        self.last = {
            "data_total": total,
            "data_processed": progress.bytes_sent,
            "data_remaining": progress.remaining_bytes,
            "rate_bytes_per_s": int(progress.rate_bytes_per_s or 0),
            "iteration": progress.iteration + 1,
            "expected_downtime_ms": int(progress.expected_downtime_s * 1000) if progress.expected_downtime_s is not None else None,
            "dirty_rate_bytes_per_s": int(progress.dirty_bytes_per_s),
            "zero_pages": progress.zero_pages,
            "converged": progress.converged,
        }

    def _note(self, status: Any) -> None:
        self.last = {
            "qemu_status": status.status,
            "data_total": status.total,
            "data_processed": status.transferred,
            "data_remaining": status.remaining,
            "rate_bytes_per_s": int((status.mbps or 0) * 1e6 / 8),
            "iteration": status.dirty_sync_count,
            "expected_downtime_ms": status.expected_downtime_ms,
        }

    # ------------------------------------------------------------------
    # The sequence

    async def run(self) -> None:
        domain = self.domain
        try:
            with self.scope:
                await self._perform()
        except DaemonError as exc:
            self.state, self.error = "failed", exc.message
        except MigrationError as exc:
            self.state, self.error = "failed", self.daemon.public(exc)
        except (TunnelError, QemuError, OSError, trio.BrokenResourceError) as exc:
            self.state, self.error = "failed", self.daemon.public(exc)
            self.daemon.log(f"migration of {domain.name} failed: {type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug: fail this job, keep the daemon serving
            self.state, self.error = "failed", self.daemon.public(exc)
            self.daemon.log("".join(traceback.format_exception(exc)).rstrip())
        finally:
            if self.state not in ("completed", "performed", "failed"):
                # Cancelled: by abort, or by the daemon shutting down.
                self.state = "cancelled"
                self.error = self.abort_reason or "the daemon is shutting down"
            self.ended = time.monotonic()
            self.done.set()
            if domain.job is self:
                domain.job = None
        self.daemon.log(f"migration of {domain.name} to {self.dest}: {self.state}" + (f" ({self.error})" if self.error else ""))

    async def _perform(self) -> None:
        domain = self.domain
        process = domain.process
        if process is None:
            raise DaemonError(f"domain {domain.name!r} is not running")
        if self.direct_uri is not None:
            assert isinstance(process, QemuProcess)
            await self._perform_only(process)
            return
        # begin: the migratable definition and the cookie
        definition = dict(domain.definition)
        if self.dname:
            definition["name"] = self.dname
        if isinstance(process, ImageGuest):
            was_running = process.running
        else:
            was_running = await run_state(process.qmp) == "running"
        dest = self.daemon.parse_peer_uri(self.dest)
        stream = await connect(dest, self.daemon.tls)
        async with open_connection(stream, client=True) as peer:
            prepared = await self._call(
                peer,
                Procedure.PREPARE,
                {
                    "definition": definition,
                    "migration_id": self.migration_id.hex(),
                    "tunnelled": self.tunnelled,
                    "live": self.live,
                    "running": was_running,
                    "verify": self.verify,
                },
            )
            success = False
            try:
                if not self.live and was_running:
                    # offline migration: the guest pauses for its whole duration
                    await (process.pause() if isinstance(process, ImageGuest) else process.qmp.execute("stop"))
                if isinstance(process, ImageGuest):
                    await self._transfer_image(peer, process)
                else:
                    await self._transfer(peer, process.qmp, prepared)
                finished = await self._call(peer, Procedure.FINISH, {"migration_id": self.migration_id.hex(), "ok": True})
                self.transfer_ended = time.monotonic()
                success = True
            finally:
                if not success:
                    with trio.CancelScope(shield=True):
                        await self._rollback(peer, process, was_running)
        # confirm: the guest lives on the destination now
        self.summary = {"destination_state": finished.get("state"), "destination_name": definition["name"]}
        if self.verify and isinstance(process, ImageGuest):
            # Paused since the final pass, so this is the content the destination must hold.
            self.summary["source_image_sha256"] = await trio.to_thread.run_sync(image_digest, process.path)
            self.summary["destination_image_sha256"] = finished.get("image_sha256")
        self.state = "completed"
        with trio.CancelScope(shield=True):
            await self.daemon.stop_guest(domain, reason="migrated")

    async def _perform_only(self, process: QemuProcess) -> None:
        """The perform phase of a client-driven migration; the guest stays paused until confirm."""
        qmp = process.qmp
        self.was_running = was_running = await run_state(qmp) == "running"
        success = False
        try:
            if not self.live and was_running:
                await qmp.execute("stop")
            assert self.direct_uri is not None
            await self._transfer(None, qmp, {"uri": self.direct_uri, "tls": self.direct_tls})
            self.transfer_ended = time.monotonic()
            success = True
        finally:
            if not success:
                with trio.CancelScope(shield=True):
                    await self._rollback(None, process, was_running)
        self.state = "performed"

    async def confirm(self, ok: bool) -> None:
        """End a client-driven migration: stop the source guest, or resume it as it was."""
        if self.state != "performed":
            raise DaemonError(f"the migration of {self.domain.name!r} is {self.state}, not waiting for confirmation")
        process = self.domain.process
        if ok:
            self.state = "completed"
            await self.daemon.stop_guest(self.domain, reason="migrated")
        else:
            self.state, self.error = "failed", "the destination did not finish"
            if isinstance(process, QemuProcess):
                await self._rollback(None, process, self.was_running)
        self.daemon.log(f"migration of {self.domain.name} to {self.dest}: {self.state}")

    async def _transfer_image(self, peer: TunnelConnection, guest: ImageGuest) -> None:
        """Pre-copy of a memory image: passes while the guest dirties pages, then stop-and-copy."""
        self.state = "active"
        self.transfer_started = time.monotonic()
        reader = MemoryImageReader(guest.path, tracker=guest.tracker, guest=guest.sim, policy=PrecopyPolicy())
        self.reader = reader
        stream = await peer.open_stream(
            kind=StreamKind.MEMORY,
            digest=DigestAlgorithm.CRC32,
            migration_id=self.migration_id,
            label="memory",
            bandwidth=self.bandwidth_mib * MiB,
        )
        self.stream = stream
        try:
            await send_from(reader, stream)
        except EndpointError as exc:
            raise DaemonError(str(exc)) from None
        self._note_progress(reader.progress())

    async def _call(self, peer: TunnelConnection, procedure: Procedure, request: dict[str, Any]) -> dict[str, Any]:
        from .._errors import RPCError

        try:
            return decode(await peer.call(PROGRAM, procedure, encode(request)))
        except RPCError as exc:
            raise error_of(exc) from None

    async def _transfer(self, peer: TunnelConnection | None, qmp: Any, prepared: dict[str, Any]) -> None:
        self.state = "active"
        bandwidth = self._bandwidth_bytes()
        self.transfer_started = time.monotonic()
        if not self.tunnelled:
            await self._set_tls(qmp, bool(prepared.get("tls")))
            await start_outgoing_uri(qmp, prepared["uri"], max_bandwidth=bandwidth)
            self._note(await wait_migration(qmp, poll=POLL_INTERVAL))
            return
        assert peer is not None
        stream = await peer.open_stream(
            kind=StreamKind.BYTES, digest=DigestAlgorithm.NONE, migration_id=self.migration_id, label="qemu"
        )
        self.stream = stream
        ours, theirs = _socketpair()
        try:
            await start_outgoing_fd(qmp, theirs.fileno(), max_bandwidth=bandwidth, capabilities=RETURN_PATH)
            theirs.close()  # QEMU holds its own copy now
            # Errors are collected, not raised inside the nursery, so callers see
            # one exception (never a group) whichever side failed first.
            pump_errors: list[BaseException] = []
            failures: list[BaseException] = []
            pump_done = trio.Event()
            async with trio.open_nursery() as nursery:

                async def pump() -> None:
                    try:
                        await pump_socket(stream, ours)
                    except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        pump_errors.append(exc)
                        nursery.cancel_scope.cancel()
                    finally:
                        pump_done.set()

                nursery.start_soon(pump)
                try:
                    self._note(await wait_migration(qmp, poll=POLL_INTERVAL))
                    # QEMU closes its end once done, which ends the pump; bound the wait.
                    with trio.move_on_after(FINISH_TIMEOUT):
                        await pump_done.wait()
                    if not pump_done.is_set():
                        failures.append(DaemonError("the migration stream did not end after QEMU completed"))
                except QemuError as exc:
                    failures.append(exc)
                nursery.cancel_scope.cancel()
            if failures:
                raise failures[0]
            if pump_errors:
                raise pump_errors[0]
        finally:
            theirs.close()
            ours.close()

    async def _set_tls(self, qmp: Any, tls: bool) -> None:
        """QEMU's own TLS for a native channel the destination secured, with this daemon's certificate."""
        if not tls:
            await set_tls(qmp, None)
            return
        files = self.daemon.tls
        if files is None:
            raise DaemonError("the destination wants TLS for the migration data, and this daemon has no TLS identity (--tls-cert)")
        domain = self.domain
        creds = await trio.to_thread.run_sync(files.write_qemu_dir, os.path.join(domain.run_dir, f"{domain.name}.tls"), "client")
        await set_tls(qmp, creds, endpoint="client", hostname=self.daemon.parse_peer_uri(self.dest).host)

    async def _rollback(self, peer: TunnelConnection | None, process: QemuProcess | ImageGuest, was_running: bool) -> None:
        """Failure: discard the destination, resume the source as it was."""
        if isinstance(process, QemuProcess):
            with trio.move_on_after(CLEANUP_TIMEOUT):
                try:
                    await cancel(process.qmp)
                except QMPError:
                    pass
        if self.stream is not None:
            with trio.move_on_after(CLEANUP_TIMEOUT):
                try:
                    await self.stream.abort(reason=self.abort_reason or self.error or "migration failed on the source")
                except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        with trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                if peer is not None:  # client-driven: the client tells the destination
                    await self._call(peer, Procedure.FINISH, {"migration_id": self.migration_id.hex(), "ok": False})
            except (DaemonError, TunnelError, trio.BrokenResourceError):
                pass  # the destination discards it anyway when the connection goes
        if isinstance(process, ImageGuest):
            if was_running:
                process.resume()
            return
        qmp = process.qmp
        with trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                # QEMU may still be finishing its cancellation; resume only once it has.
                for _ in range(100):
                    state = await run_state(qmp)
                    if state not in ("finish-migrate",):
                        break
                    await trio.sleep(0.05)
                if was_running and state != "running":
                    await qmp.execute("cont")
            except QMPError as exc:
                self.daemon.log(f"could not resume {self.domain.name} after a failed migration: {exc}")


class Incoming:
    """One prepared incoming migration on the destination daemon."""

    def __init__(self, domain: Domain, migration_id: bytes, *, tunnelled: bool, running: bool, verify: bool = False) -> None:
        self.domain = domain
        self.verify = verify
        self.image_sha256: str | None = None
        self.migration_id = migration_id
        self.tunnelled = tunnelled
        self.running = running
        self.sock: socket.socket | None = None
        self.uri: str | None = None
        self.stream_seen = trio.Event()
        self.pump_done = trio.Event()
        self.pump_error: str | None = None
        #: The inactive definition of the same name the destination had before, restored if this fails.
        self.previous: Domain | None = None
        #: The image writer of a memory-image guest's migration.
        self.writer: MemoryImageWriter | None = None

    async def prepare(self, peer_sockname: Any, *, images_dir: str, tls: TLSFiles | None = None) -> dict[str, Any]:
        """Ready the destination; for a native migration return QEMU's endpoint.

        The data channel is as private as the connection that prepared it: a
        unix socket beside ours, QEMU's own TLS with this daemon's certificate
        (``verify-peer``) when the source came over TLS, plain TCP only when
        it came over an ``--insecure`` TCP listener.  QEMU accepts one
        connection on it.
        """
        if self.domain.is_image:
            # Size and page size come from the definition this daemon checked, never from the peer's stream header.
            self.writer = MemoryImageWriter(
                os.path.join(images_dir, f"{self.domain.name}.img"),
                mode=0o600,
                size=self.domain.definition["image"]["size_mib"] * MiB,
                page_size=PAGE_SIZE,
            )
            await trio.lowlevel.checkpoint()
            return {}
        process = self.domain.process
        assert isinstance(process, QemuProcess)
        if self.tunnelled:
            ours, theirs = _socketpair()
            try:
                await start_incoming_fd(process.qmp, theirs.fileno(), capabilities=RETURN_PATH)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self.sock = ours
            return {}
        if isinstance(peer_sockname, str):  # the source reached us over a unix socket
            path = os.path.join(self.domain.run_dir, f"{self.domain.name}.incoming.sock")
            if os.path.lexists(path):
                os.unlink(path)
            self.uri = f"unix:{path}"
            await start_incoming_uri(process.qmp, self.uri)
            return {"uri": self.uri}
        host = peer_sockname[0]
        if tls is not None:
            creds = tls.write_qemu_dir(os.path.join(self.domain.run_dir, f"{self.domain.name}.tls"), "server")
            await set_tls(process.qmp, creds, endpoint="server")
        await start_incoming_uri(process.qmp, f"tcp:{host}:0")
        status = await process.qmp.execute("query-migrate")
        for address in status.get("socket-address", []):
            if address.get("type") == "inet":
                port = address["port"]
                self.uri = f"tcp:{host}:{port}"
                return {"uri": self.uri, "tls": tls is not None}
        raise DaemonError("the destination QEMU did not report its incoming TCP port")

    async def pump(self, stream: TunnelStream) -> None:
        self.stream_seen.set()
        if self.writer is not None:
            try:
                await receive_into(stream, self.writer)  # commits only after the stream's digest matched
            except (TunnelError, EndpointError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.pump_error = public_message(exc, hide=(os.path.dirname(self.domain.run_dir),))
            finally:
                self.pump_done.set()
            return
        assert self.sock is not None
        try:
            await pump_socket(stream, self.sock)
        except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.pump_error = public_message(exc, hide=(os.path.dirname(self.domain.run_dir),))
        finally:
            self.sock.close()
            self.pump_done.set()

    async def finish(self, daemon: Daemon) -> str:
        """Wait until the guest is loaded; resume it if it ran on the source; return its state."""
        if self.writer is not None:
            with trio.move_on_after(FINISH_TIMEOUT) as waited:
                await self.pump_done.wait()
            if waited.cancelled_caught or not self.stream_seen.is_set():
                raise DaemonError(f"the memory image of {self.domain.name!r} did not arrive")
            if self.pump_error is not None or not self.writer.committed:
                raise DaemonError(f"the memory image of {self.domain.name!r} was not committed: {self.pump_error}")
            if self.verify:
                self.image_sha256 = await trio.to_thread.run_sync(self.writer.digest)
            await daemon.start_incoming_image(self.domain, running=self.running)
            return "running" if self.running else "paused"
        process = self.domain.process
        if not isinstance(process, QemuProcess):
            raise DaemonError(f"the incoming QEMU of {self.domain.name!r} exited")
        with trio.move_on_after(FINISH_TIMEOUT) as waited:
            try:
                await wait_migration(process.qmp, poll=POLL_INTERVAL)
            except MigrationError as exc:
                raise DaemonError(f"the destination QEMU failed to load {self.domain.name!r}: {exc}") from None
        if waited.cancelled_caught:
            raise DaemonError(f"the destination QEMU did not finish loading {self.domain.name!r} within {FINISH_TIMEOUT:.0f} s")
        if self.pump_error is not None:
            raise DaemonError(f"the migration stream failed on the destination: {self.pump_error}")
        if self.running:
            await process.qmp.execute("cont")
        return domain_state(await run_state(process.qmp))


def rate_text(bytes_per_s: float) -> str:
    if not bytes_per_s or math.isnan(bytes_per_s):
        return "-"
    return f"{bytes_per_s / MiB:.1f} MiB/s"
