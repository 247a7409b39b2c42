"""The source side of a migration: one job per outgoing migration, owned by the source daemon.

Theory of operation.  A job moves through phases: *begin* (check the guest,
take its definition), *prepare* (the destination readies an incoming QEMU),
*transfer* (QEMU's stream through the tunnel or a direct channel), *finish*
(the destination loads and resumes the guest) and *confirm* (the source
stops its copy).  Up to the end of *transfer* the guest is the source's:
any failure, an abort or a daemon shutdown cancels QEMU's migration and
resumes the guest as it was, at once; telling the destination to discard its
copy happens afterwards, in the background, so an abort returns as soon as
the source guest runs again.  From *finish* on, QEMU has sent everything and
the destination may already run the guest, so the source never resumes on
a guess: it asks the destination how the migration ended (MIGRATION_OUTCOME)
and resumes only if the destination says it discarded its copy.  If the
destination cannot be reached, the guest stays paused, reported as
"migrated, unconfirmed", and the daemon keeps asking.  A record in the
guest's directory (``migration.json``) lets a restarted daemon do the same.
Post-copy changes these rules from the switch on (:mod:`._postcopy`): the
job never cancels its QEMU, refuses aborts, and survives a broken
connection by resuming over a new one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from .. import DigestAlgorithm, RPCError, StreamKind, TunnelError
from ..control import PROGRAM, DaemonError, Procedure, connect, decode, encode, error_of
from ..endpoints import EndpointError, MemoryImageReader, PrecopyPolicy, Progress, image_digest, send_from
from ..qemu import (
    POSTCOPY_STATES,
    MigrationError,
    MigrationStatus,
    QemuError,
    QemuProcess,
    QMPError,
    postcopy_capabilities,
    query_capabilities,
    query_migration,
    resume_outgoing_fd,
    resume_outgoing_uri,
    run_state,
    set_max_bandwidth,
    set_parameters,
    set_tls,
    start_outgoing_fd,
    start_outgoing_uri,
    start_postcopy,
)
from ..transport import TunnelConnection, TunnelStream, open_connection
from ._imageguest import PAGE as IMAGE_PAGE
from ._imageguest import ImageGuest
from ._jobstats import complete_jobinfo
from ._migration import (
    FINISH_TIMEOUT,
    POLL_INTERVAL,
    RETURN_PATH,
    UNLIMITED_BANDWIDTH,
    postcopy_buffers,
    pump_socket,
    socketpair,
)
from ._postcopy import PostcopyControl, ResumeRequest
from ._qemusock import BUFFER as QEMU_SOCKET_BUFFER
from ._qemusock import MAIN_LABEL, PREEMPT_LABEL, QemuListener, qemu_end
from ._recovery import cancel_and_resume, settle_source

if TYPE_CHECKING:
    from ._daemon import Daemon, Domain

__all__ = ["SourceJob"]

MiB = 1024 * 1024
#: States a job ends in.
FINAL = ("completed", "performed", "failed", "cancelled", "unconfirmed")
#: How long the source waits for the destination's answer once QEMU has sent everything.
FINISH_WAIT = FINISH_TIMEOUT + 15.0
#: Bound on telling the destination to discard its copy (it discards anyway when the connection goes).
DISCARD_TIMEOUT = 5.0
#: How long QEMU may take to leave a state it can no longer be in (the switch requested, the channel closed).
SETTLE_WAIT = 10.0
#: How long QEMU may take to connect to this daemon's migration socket (post-copy with preempt).
CONNECT_TIMEOUT = 10.0
#: QEMU states before the switch could have taken effect.
PRE_SWITCH = ("setup", "active", "pre-switchover", "device", "wait-unplug")
#: What a failed attempt to resume a post-copy migration may raise.
ATTEMPT_FAILURES = (DaemonError, TunnelError, QemuError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def _cancelled(exc: BaseException) -> bool:
    """Cancellation, possibly as a group of Cancelled from the nurseries it went through."""
    if isinstance(exc, trio.Cancelled):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None


@asynccontextmanager
async def peer_connection(stream: trio.abc.Stream) -> AsyncIterator[TunnelConnection]:
    """A tunnel connection to the destination whose own teardown failures are not the job's."""
    body_failed = False
    try:
        async with open_connection(stream, client=True) as conn:
            try:
                yield conn
            except BaseException:
                body_failed = True
                raise
    except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
        if body_failed:
            raise


async def call(peer: TunnelConnection, procedure: Procedure, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return decode(await peer.call(PROGRAM, procedure, encode(request)))
    except RPCError as exc:
        raise error_of(exc) from None


class SourceJob:
    """One outgoing migration, owned by the source daemon (see the module docstring)."""

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
        persistent: bool = False,
        undefine_source: bool = False,
        timeout_s: float = 0.0,
        timeout_action: str = "suspend",
        auto_converge: bool = False,
        compression: tuple[str, ...] = (),
        abort_on_error: bool = False,
        postcopy: bool = False,
        postcopy_after_precopy: bool = False,
        retries: int = 0,
        postcopy_bandwidth_mib: int = 0,
    ) -> None:
        self.daemon = daemon
        #: virsh --timeout: once the transfer ran this long (0: never), pause the guest (``suspend``, as
        #: --timeout-suspend) or switch to post-copy (``postcopy``, as --timeout-postcopy).
        self.timeout_s = timeout_s
        self.timeout_action = timeout_action
        self.timeout_suspended = False
        self.timeout_postcopy = False
        #: Post-copy's requested pages on a stream of their own (QEMU's preempt channel), and those streams (one per leg).
        self.preempt = False
        self.preempt_streams: list[TunnelStream] = []
        #: QEMU's auto-converge capability (throttles the vCPUs of a guest that dirties memory faster than it goes).
        self.auto_converge = auto_converge
        #: ("xbzrle",) for QEMU guests, ("zstd",) for memory-image guests, or none.
        self.compression = compression
        #: virsh --abort-on-error: cancel the migration when the guest stops on an I/O error.
        self.abort_on_error = abort_on_error
        self._watch_scope = trio.CancelScope()
        self.postcopy = PostcopyControl(enabled=postcopy, after_precopy=postcopy_after_precopy, retries=retries)
        self.postcopy_bandwidth_mib = postcopy_bandwidth_mib
        #: The destination's post-copy figures from FINISH (blocktime).
        self.destination_stats: dict[str, Any] = {}
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
        self.dest_name = dname or domain.name
        self.persistent = persistent
        self.undefine_source = undefine_source
        self.migration_id = uuid.uuid4().bytes
        self.phase = "begin"
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
        #: Set once where the guest runs is decided (before the destination has been told to clean up).
        self.resolved = trio.Event()

    # ------------------------------------------------------------------
    # Control from other requests

    def abort(self, reason: str = "aborted by the client") -> None:
        if self.done.is_set():
            raise DaemonError(f"no migration job is running for domain {self.domain.name!r}")
        if self.postcopy.switched:
            hint = f"resume it with: migrate --postcopy-resume {self.domain.name} DEST_URI" if self.postcopy.paused else "let it complete"
            raise DaemonError(
                f"the migration of {self.domain.name!r} is in post-copy: the guest runs on the destination and part of its "
                f"memory is still here, so it cannot go back and cannot be aborted; {hint}"
            )
        if self.phase in ("finish", "confirm"):
            raise DaemonError(
                f"the migration of {self.domain.name!r} is completing (QEMU sent everything, the destination is loading it); "
                "it can no longer be aborted"
            )
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
        """libvirt-style job statistics (:data:`._jobstats.JOB_KEYS`): times, data totals, rates, pages, iteration."""
        if self.reader is not None:
            self._note_progress(self.reader.progress())
        elif not self.done.is_set() and isinstance(self.domain.process, QemuProcess) and self.state in ("active", "postcopy-paused"):
            try:
                with trio.move_on_after(2):
                    self._note(await query_migration(self.domain.process.qmp))
            except QMPError:
                pass
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """The statistics as last noted, without asking QEMU."""
        end = self.ended if self.ended is not None else time.monotonic()
        info: dict[str, Any] = {
            "domain": self.domain.name,
            "operation": "outgoing",
            "status": self.state,
            "destination": self.dest,
            "tunnelled": self.tunnelled,
            "live": self.live,
            "time_elapsed_ms": int((end - self.started) * 1000),
            "bandwidth_limit_bytes_per_s": self.bandwidth_mib * MiB if self.bandwidth_mib > 0 else None,
            "auto_converge": self.auto_converge,
            "compression": list(self.compression) or None,
            "timeout_suspended": self.timeout_suspended,
        }
        info.update(self.last)
        if info.get("memory_remaining") is not None and info.get("memory_total") is not None:
            info["memory_remaining"] = min(info["memory_remaining"], info["memory_total"])
        # No storage is migrated: the data figures are the memory figures.
        info.update(data_total=info.get("memory_total"), data_processed=info.get("memory_processed"),
                    data_remaining=info.get("memory_remaining"))
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
            if "zstd" in self.compression:
                info["compression_saved_bytes"] = stats.pages_raw_bytes - stats.pages_wire_bytes
        if self.postcopy.enabled:
            info["postcopy"] = True
            info["phase"] = self.postcopy.phase()
            info["postcopy_breaks"] = self.postcopy.breaks
            info["postcopy_resumes"] = self.postcopy.resumes
            info["postcopy_preempt"] = self.preempt
            info["postcopy_preempt_bytes"] = sum(each.statistics().bytes_sent for each in self.preempt_streams)
            # The switch --timeout asked for, once it happened (pre-copy may have completed first).
            info["timeout_postcopy"] = self.timeout_postcopy and self.postcopy.switched
        info.update(self.destination_stats)
        if self.error is not None:
            info["error"] = self.error
        return complete_jobinfo(info)

    def _note_progress(self, progress: Progress) -> None:
        rate = progress.rate_bytes_per_s
        if not rate and self.transfer_started is not None:  # before pre-copy measured a pass: the average so far
            elapsed = time.monotonic() - self.transfer_started
            rate = progress.bytes_sent / elapsed if elapsed > 0.1 else None
        self.last = {
            "memory_total": progress.total_bytes,
            "memory_processed": progress.bytes_sent,
            "memory_remaining": progress.remaining_bytes,
            "rate_bytes_per_s": int(rate) if rate else None,
            "iteration": progress.iteration + 1,
            "expected_downtime_ms": int(progress.expected_downtime_s * 1000) if progress.expected_downtime_s is not None else None,
            "dirty_rate_bytes_per_s": int(progress.dirty_bytes_per_s),
            "page_size": IMAGE_PAGE,
            "constant_pages": progress.zero_pages,
            "normal_pages": progress.pages_sent,
            "normal_bytes": progress.pages_sent * IMAGE_PAGE,
            "converged": progress.converged,
        }
        if self.transfer_started is not None:
            self.last["setup_time_ms"] = int((self.transfer_started - self.started) * 1000)

    def _note(self, status: Any) -> None:
        ram = status.raw.get("ram") or {}
        page = int(ram.get("page-size") or 4096)
        self.last = {
            "memory_total": status.total,
            "memory_processed": status.transferred,
            "memory_remaining": status.remaining,
            "rate_bytes_per_s": int((status.mbps or 0) * 1e6 / 8),
            "dirty_rate_bytes_per_s": status.dirty_pages_rate * page,
            "iteration": status.dirty_sync_count,
            "expected_downtime_ms": status.expected_downtime_ms,
            # QEMU 7.2 reports a post-copy migration's downtime from a start it never set (hours): drop what cannot be.
            "downtime_ms": status.downtime_ms if (status.downtime_ms or 0) <= (status.total_time_ms or 0) else None,
            "postcopy_requests": status.postcopy_requests,
            "setup_time_ms": status.setup_time_ms,
            "page_size": page,
            "constant_pages": status.duplicate,
            "normal_pages": status.normal,
            "normal_bytes": status.normal_bytes,
            "cpu_throttle_percent": status.raw.get("cpu-throttle-percentage"),
        }
        xbzrle = status.raw.get("xbzrle-cache")
        if xbzrle and "xbzrle" in self.compression:
            self.last["compression_saved_bytes"] = int(xbzrle.get("pages", 0)) * page - int(xbzrle.get("bytes", 0))

    # ------------------------------------------------------------------
    # The sequence

    async def run(self, adopted: QemuProcess | None = None) -> None:
        """The job, to its end; *adopted*: a post-copy migration a previous daemon left paused, resumed from there."""
        domain = self.domain
        if self.timeout_s > 0 or self.abort_on_error:
            assert self.daemon._nursery is not None
            self.daemon._nursery.start_soon(self._watch)
        try:
            with self.scope:
                await (self._paused(adopted) if adopted is not None else self._perform())
        except BaseException as exc:
            self._settle_state(exc)
            if not isinstance(exc, Exception):
                raise  # cancelled by the daemon shutting down: the outcome is set below
        finally:
            self._settle_state(None)
            self._watch_scope.cancel()
            self.postcopy.fail_requests(self.error or f"the migration job ended: {self.state}")
            self.ended = time.monotonic()
            self.resolved.set()
            self.done.set()
            if domain.job is self:
                domain.job = None
            if self.state == "completed":
                self.daemon.completed_jobs[domain.name] = self.snapshot()
            self.daemon.log(
                f"migration of {domain.name} to {self.dest}: {self.state}"
                + (f" ({self.error})" if self.error else "")
                + f"; {self.daemon.where_is(domain)}",
                "info" if self.state == "completed" else "warning",
                domain=domain.name, destination=self.dest, outcome=self.state, error=self.error,
            )

    async def _watch(self) -> None:
        """--timeout: pause the guest (or switch to post-copy) once the transfer ran that long; --abort-on-error: cancel on an I/O error."""
        with self._watch_scope:
            while True:
                await trio.sleep(0.2)
                if self.phase != "transfer" or self.transfer_started is None:
                    continue
                process = self.domain.process
                timed_out = self.timeout_s > 0 and time.monotonic() - self.transfer_started >= self.timeout_s
                if timed_out and self.timeout_action == "postcopy" and not self.timeout_postcopy:
                    self.timeout_postcopy = True
                    self.postcopy.switch_wanted.set()  # the polling task switches (see _wait_qemu)
                    self.daemon.log(f"migration of {self.domain.name}: still transferring after {self.timeout_s:g} s (--timeout); "
                                    "switching to post-copy", domain=self.domain.name)
                elif timed_out and self.timeout_action == "suspend" and not self.timeout_suspended:
                    self.timeout_suspended = True
                    if isinstance(process, ImageGuest):
                        await process.pause()
                    elif isinstance(process, QemuProcess):
                        with contextlib.suppress(QMPError):
                            await process.qmp.execute("stop")
                    self.daemon.log(f"migration of {self.domain.name}: still transferring after {self.timeout_s:g} s (--timeout); "
                                    "guest suspended so that it completes", domain=self.domain.name)
                if self.abort_on_error and isinstance(process, QemuProcess):
                    try:
                        state = await run_state(process.qmp)
                    except QMPError:
                        continue
                    if state == "io-error" and self.phase == "transfer":
                        with contextlib.suppress(DaemonError):
                            self.abort("the guest stopped on an I/O error (--abort-on-error)")
                        return

    def _settle_state(self, exc: BaseException | None) -> None:
        """The job's final state, once: ``failed`` with the reason, or ``cancelled`` (abort, shutdown)."""
        if self.state in FINAL:
            return
        if self.postcopy.active and self.state != "completed":
            # Left for the next daemon (shutdown) or never resumed: the guest runs on the destination, waiting for pages.
            self.state = "postcopy-paused"
            self.error = self.error or "the daemon is shutting down; the next daemon resumes the post-copy migration"
            return
        if exc is not None and not _cancelled(exc):
            self.state, self.error = "failed", self._describe(exc)
        else:
            self.state = "cancelled"
            self.error = self.abort_reason or "the daemon is shutting down"

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, BaseExceptionGroup):  # the first real failure, not the cancellations it caused
            rest = exc.split(trio.Cancelled)[1]
            while isinstance(rest, BaseExceptionGroup):
                rest = rest.exceptions[0]
            exc = rest or exc
        if isinstance(exc, DaemonError):
            return exc.message
        if isinstance(exc, (MigrationError, TunnelError, QemuError, OSError, trio.BrokenResourceError)):
            self.daemon.log(f"migration of {self.domain.name} failed: {type(exc).__name__}: {exc}")
        else:  # a bug: fail this job, keep the daemon serving
            self.daemon.log("".join(traceback.format_exception(exc)).rstrip())
        return self.daemon.public(exc)

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
            self.was_running = process.running
        else:
            self.was_running = await run_state(process.qmp) == "running"
        dest = self.daemon.parse_peer_uri(self.dest)
        self.phase = "prepare"
        try:
            async with peer_connection(await connect(dest, self.daemon.tls)) as peer:
                try:
                    prepared = await call(
                        peer,
                        Procedure.PREPARE,
                        {
                            "definition": definition,
                            "migration_id": self.migration_id.hex(),
                            "tunnelled": self.tunnelled,
                            "live": self.live,
                            "running": self.was_running,
                            "verify": self.verify,
                            "persistent": self.persistent,
                            "postcopy": self.postcopy.enabled,
                            "postcopy_preempt": await self._preempt_wanted(process),
                        },
                    )
                    self.phase = "transfer"
                    await self._record()
                    if not self.live and self.was_running:
                        # offline migration: the guest pauses for its whole duration
                        await (process.pause() if isinstance(process, ImageGuest) else process.qmp.execute("stop"))
                    if isinstance(process, ImageGuest):
                        await self._transfer_image(peer, process)
                    else:
                        await self._transfer(peer, process.qmp, prepared)
                    self.phase = "finish"
                    finished = await self._finish(peer)
                except BaseException as exc:
                    with trio.CancelScope(shield=True):
                        past_switch = await self._past_switch(process)
                        if not past_switch:
                            await self._recover(peer, process, exc)
                    raise
                await self._completed(process, definition["name"], finished)
                return
        except BaseException as exc:
            if not self.postcopy.active or _cancelled(exc) or not isinstance(process, QemuProcess):
                raise
            self._note_break(exc)
        await self._paused(process)

    async def _record(self) -> None:
        """What a restarted daemon needs to settle this migration, or resume it (QEMU guests only: image guests die with the daemon)."""
        if isinstance(self.domain.process, QemuProcess):
            record: dict[str, Any] = {
                "role": "source", "migration_id": self.migration_id.hex(), "destination": self.dest, "was_running": self.was_running,
            }  # fmt: skip
            if self.postcopy.enabled:
                record.update(postcopy=True, tunnelled=self.tunnelled, retries=self.postcopy.retries, dest_name=self.dest_name,
                              undefine_source=self.undefine_source)
            await self.daemon.store.set_runtime(self.domain.name, "migration", record)

    async def _finish(self, peer: TunnelConnection) -> dict[str, Any]:
        """FINISH: past the point of no return, so an abort cannot interrupt it (it is bounded).

        A shutdown does: it cancels the connection's own tasks, so no answer
        could arrive anyway.  :meth:`_recover` then asks on a new connection,
        or leaves the record for the next daemon.
        """
        with trio.fail_after(FINISH_WAIT):
            finished = await call(peer, Procedure.FINISH, {"migration_id": self.migration_id.hex(), "ok": True})
        self.transfer_ended = time.monotonic()
        for key in ("postcopy_blocktime_ms", "postcopy_vcpu_blocktime_ms"):
            if key in finished:
                self.destination_stats[f"destination_{key}"] = finished[key]
        return finished

    async def _completed(self, process: QemuProcess | ImageGuest, dest_name: str, finished: dict[str, Any]) -> None:
        """confirm: the guest lives on the destination now."""
        self.phase = "confirm"
        self.summary = {"destination_state": finished.get("state"), "destination_name": dest_name}
        if self.verify and isinstance(process, ImageGuest):
            # Paused since the final pass, so this is the content the destination must hold.
            self.summary["source_image_sha256"] = await trio.to_thread.run_sync(image_digest, process.path)
            self.summary["destination_image_sha256"] = finished.get("image_sha256")
        with trio.CancelScope(shield=True):
            try:
                await self.daemon.migrated_away(self.domain, destination=self.dest, migration_id=self.migration_id.hex(),
                                                undefine=self.undefine_source)
            finally:
                self.state = "completed"  # once the books say where it went: a jobinfo reader then finds them
        self.resolved.set()  # the client has its answer before the connection to the destination closes

    async def _recover(self, peer: TunnelConnection, process: QemuProcess | ImageGuest, exc: BaseException) -> None:
        """The migration failed or was cancelled: the guest must run on exactly one host.

        Before QEMU completed, that is the source: cancel and resume it now,
        report, and only then tell the destination to discard its copy.
        After, ask the destination (see the module docstring).
        """
        domain = self.domain
        completed = self.phase in ("finish", "confirm")
        if isinstance(process, QemuProcess) and not completed:
            status = await cancel_and_resume(process.qmp, was_running=self.was_running, note=self._note_cancelled)
            completed = status == "completed"  # QEMU finished just before the cancel reached it
        elif isinstance(process, ImageGuest) and not completed and self.was_running:
            process.resume()
        if not completed:
            await self.daemon.store.set_runtime(domain.name, "migration", None)
            self._settle_state(exc)
            self.resolved.set()  # abort and migrate answer now; the destination is told below
            await self._discard_destination(peer)
            return
        outcome = await settle_source(
            self.daemon,
            domain,
            destination=self.dest,
            migration_id=self.migration_id.hex(),
            was_running=self.was_running,
            peer=peer,
            undefine=self.undefine_source,
        )
        if outcome == "migrated":
            self.summary = {"destination_name": self.dname or domain.name}
            self.state, self.error = "completed", None
        elif outcome == "unconfirmed":
            self.state = "unconfirmed"
            self.error = f"the destination {self.dest} has not confirmed; the guest stays paused here until it does"
            self.daemon.settle_later(domain, destination=self.dest, migration_id=self.migration_id.hex(), was_running=self.was_running)
        self._settle_state(exc)
        self.resolved.set()

    def _note_cancelled(self, status: Any) -> None:
        """QEMU's figures just before the cancel: a cancelled job keeps what it had done."""
        if status.total:
            self._note(status)

    async def _discard_destination(self, peer: TunnelConnection) -> None:
        with trio.move_on_after(DISCARD_TIMEOUT):
            try:
                if self.stream is not None:
                    await self.stream.abort(reason=self.abort_reason or self.error or "migration failed on the source")
                await call(peer, Procedure.FINISH, {"migration_id": self.migration_id.hex(), "ok": False})
            except (DaemonError, TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the destination discards it anyway when the connection goes

    async def _perform_only(self, process: QemuProcess) -> None:
        """The perform phase of a client-driven migration; the guest stays paused until confirm."""
        qmp = process.qmp
        self.was_running = await run_state(qmp) == "running"
        self.phase = "transfer"
        try:
            if not self.live and self.was_running:
                await qmp.execute("stop")
            assert self.direct_uri is not None
            await self._transfer(None, qmp, {"uri": self.direct_uri, "tls": self.direct_tls})
            self.transfer_ended = time.monotonic()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await cancel_and_resume(qmp, was_running=self.was_running, note=self._note_cancelled)
            self._settle_state(exc)
            self.resolved.set()
            raise
        self.phase = "finish"
        self.state = "performed"

    async def confirm(self, ok: bool) -> None:
        """End a client-driven migration: stop the source guest, or resume it as it was."""
        if self.state != "performed":
            raise DaemonError(f"the migration of {self.domain.name!r} is {self.state}, not waiting for confirmation")
        process = self.domain.process
        if ok:
            self.state = "completed"
            await self.daemon.migrated_away(self.domain, destination=self.dest, migration_id=self.migration_id.hex(),
                                            undefine=self.undefine_source)
        else:
            self.state, self.error = "failed", "the destination did not finish"
            if isinstance(process, QemuProcess):
                await cancel_and_resume(process.qmp, was_running=self.was_running)
        self.daemon.log(f"migration of {self.domain.name} to {self.dest}: {self.state}")

    async def _transfer_image(self, peer: TunnelConnection, guest: ImageGuest) -> None:
        """Pre-copy of a memory image: passes while the guest dirties pages, then stop-and-copy."""
        self.state = "active"
        self.transfer_started = time.monotonic()
        reader = MemoryImageReader(guest.path, tracker=guest.tracker, guest=guest.sim, policy=PrecopyPolicy())
        self.reader = reader
        if "zstd" in self.compression and not peer.compression:
            raise DaemonError("the destination does not accept zstd-compressed pages (install tunnel[zstd] there), or migrate without --compressed")
        stream = await peer.open_stream(
            kind=StreamKind.MEMORY,
            digest=DigestAlgorithm.CRC32,
            migration_id=self.migration_id,
            label="memory",
            bandwidth=self.bandwidth_mib * MiB,
            compress="zstd" in self.compression,
        )
        self.stream = stream
        try:
            await send_from(reader, stream)
        except EndpointError as exc:
            raise DaemonError(str(exc)) from None
        self._note_progress(reader.progress())

    async def _transfer(self, peer: TunnelConnection | None, qmp: Any, prepared: dict[str, Any]) -> None:
        self.state = "active"
        bandwidth = self._bandwidth_bytes()
        self.transfer_started = time.monotonic()
        # Source-only capabilities go both ways every time (see _capabilities); post-copy's the destination sets too.
        preempt = self.tunnelled and self.postcopy.enabled and bool(prepared.get("postcopy_preempt"))
        capabilities = self._capabilities()
        if self.postcopy.enabled:  # 0: no limit, QEMU's own default for post-copy
            known = await query_capabilities(qmp)
            capabilities.update(postcopy_capabilities(preempt=preempt if "postcopy-preempt" in known else None))
            await set_parameters(qmp, {"max-postcopy-bandwidth": self.postcopy_bandwidth_mib * MiB})
        if not self.tunnelled:
            await self._set_tls(qmp, bool(prepared.get("tls")))
            await start_outgoing_uri(qmp, prepared["uri"], max_bandwidth=bandwidth, capabilities=capabilities)
            self._note(await self._wait_qemu(qmp))
            return
        assert peer is not None

        async def start(channel: int | str) -> None:
            if isinstance(channel, str):
                await start_outgoing_uri(qmp, channel, max_bandwidth=bandwidth, capabilities={**RETURN_PATH, **capabilities})
            else:
                await start_outgoing_fd(qmp, channel, max_bandwidth=bandwidth, capabilities={**RETURN_PATH, **capabilities})

        await self._tunnel(peer, qmp, start, preempt=preempt)

    async def _preempt_wanted(self, process: QemuProcess | ImageGuest) -> bool:
        """Ask the destination for post-copy's preempt channel?  Tunnelled post-copy, and a QEMU that has it."""
        if not (self.tunnelled and self.postcopy.enabled and self.daemon.postcopy_preempt) or not isinstance(process, QemuProcess):
            await trio.lowlevel.checkpoint()
            return False
        return "postcopy-preempt" in await query_capabilities(process.qmp)

    async def _tunnel(
        self, peer: TunnelConnection, qmp: Any, start: Callable[[int | str], Awaitable[None]], *, preempt: bool = False
    ) -> None:
        """QEMU's channels through new streams of *peer*, until QEMU completed and they ended.

        Without *preempt*, *start* gives QEMU its end of a socketpair (an fd).
        With it, *start* gives QEMU a ``unix:`` URI this daemon listens on, and
        QEMU connects there: its main channel now, post-copy's preempt
        channel at the switch (:mod:`._qemusock`); each gets a stream.
        """
        stream = await peer.open_stream(
            kind=StreamKind.BYTES, digest=DigestAlgorithm.NONE, migration_id=self.migration_id, label=MAIN_LABEL
        )
        self.stream = stream
        self.preempt = preempt
        listener: QemuListener | None = None
        theirs: socket.socket | None = None
        ours: socket.socket | None = None
        try:
            if preempt:
                process = self.domain.process
                assert isinstance(process, QemuProcess)
                listener = QemuListener(os.path.join(self.domain.guest_dir, "migrate-out.sock"), pid=process.pid,
                                        owner=self.daemon.qemu_uid)
                await start(listener.uri)
                ours = await self._accept_main(qmp, listener)
                # QEMU's end, sized as a socketpair's and shrunk at the switch as for fd: (see _qemusock).
                theirs = await trio.to_thread.run_sync(qemu_end, process.pid, listener.path)
                if theirs is not None:
                    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, QEMU_SOCKET_BUFFER)
            else:
                ours, theirs = socketpair()
                await start(theirs.fileno())
                # QEMU holds its own copy now.  With post-copy allowed, our copy stays open until the switch: it is
                # QEMU's socket, whose send buffer is then shrunk (postcopy_buffers).  While it is open the pump
                # cannot see QEMU's EOF, so it closes once QEMU completed at the latest.
                if not self.postcopy.enabled:
                    theirs.close()
                    theirs = None
            await self._pump_until_done(peer, qmp, stream, ours, theirs, listener)
        finally:
            for sock in (theirs, ours):
                if sock is not None:
                    sock.close()
            if listener is not None:
                listener.close()

    async def _accept_main(self, qmp: Any, listener: QemuListener) -> socket.socket:
        """QEMU's main channel on *listener*, or an error once QEMU gave up or did not connect in time."""
        with trio.move_on_after(CONNECT_TIMEOUT):
            while True:
                with trio.move_on_after(POLL_INTERVAL * 10):
                    return await listener.accept()
                status = await query_migration(qmp)
                if status.status in ("failed", "cancelled"):  # a resume that cannot connect stays paused: the timeout ends it
                    raise MigrationError(status)
        raise DaemonError(f"QEMU did not connect to this daemon's migration socket within {CONNECT_TIMEOUT:.0f} s")

    async def _pump_until_done(
        self,
        peer: TunnelConnection,
        qmp: Any,
        stream: TunnelStream,
        ours: socket.socket,
        theirs: socket.socket | None,
        listener: QemuListener | None,
    ) -> None:
        """Pump QEMU's channel(s) until QEMU completed and every channel it opened ended; raise the first failure."""
        qemu_end = theirs

        def postcopy_started() -> None:
            nonlocal qemu_end
            if qemu_end is not None:
                postcopy_buffers(qemu_end)
                qemu_end.close()
                qemu_end = None

        # Errors are collected, not raised inside the nursery, so callers see
        # one exception (never a group) whichever side failed first.
        pump_errors: list[BaseException] = []
        failures: list[BaseException] = []
        pumps_done = [trio.Event()]
        async with trio.open_nursery() as nursery:

            async def pump(stream: TunnelStream, sock: socket.socket, done: trio.Event) -> None:
                try:
                    await pump_socket(stream, sock)
                except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    pump_errors.append(exc)
                    nursery.cancel_scope.cancel()
                finally:
                    done.set()

            async def preempt_channel(listener: QemuListener) -> None:
                sock = await listener.accept()  # at the switch: QEMU connects no other
                listener.close()
                done = trio.Event()
                pumps_done.append(done)  # before the first await below: a completion waits for this pump too
                try:
                    preempt = await peer.open_stream(
                        kind=StreamKind.BYTES, digest=DigestAlgorithm.NONE, migration_id=self.migration_id, label=PREEMPT_LABEL
                    )
                    self.preempt_streams.append(preempt)
                    await pump(preempt, sock, done)
                except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    pump_errors.append(exc)
                    nursery.cancel_scope.cancel()
                finally:
                    done.set()
                    sock.close()

            nursery.start_soon(pump, stream, ours, pumps_done[0])
            if listener is not None:
                nursery.start_soon(preempt_channel, listener)
            try:
                self._note(await self._wait_qemu(qmp, on_postcopy=postcopy_started))
                postcopy_started()  # QEMU completed without a switch: the pump needs its EOF
                # QEMU closes its channels once done, which ends the pumps; bound the wait.
                with trio.move_on_after(FINISH_TIMEOUT):
                    for done in pumps_done:  # a preempt channel accepted meanwhile is waited for too
                        await done.wait()
                if not all(done.is_set() for done in pumps_done):
                    failures.append(DaemonError("the migration stream did not end after QEMU completed"))
            except QemuError as exc:
                failures.append(exc)
            nursery.cancel_scope.cancel()
        if failures:
            raise failures[0]
        if pump_errors:
            raise pump_errors[0]

    def _capabilities(self) -> dict[str, bool]:
        """Source-only QEMU capabilities, set both ways every time: a QEMU keeps them from its last migration."""
        return {"auto-converge": self.auto_converge, "xbzrle": "xbzrle" in self.compression}

    async def _set_tls(self, qmp: Any, tls: bool) -> None:
        """QEMU's own TLS for a native channel the destination secured, with this daemon's certificate."""
        if not tls:
            await set_tls(qmp, None)
            return
        files = self.daemon.tls
        if files is None:
            raise DaemonError("the destination wants TLS for the migration data, and this daemon has no TLS identity (--tls-cert)")
        domain = self.domain
        owner = self.daemon.qemu_uid
        creds = await trio.to_thread.run_sync(lambda: files.write_qemu_dir(os.path.join(domain.guest_dir, "tls"), "client", owner=owner))
        await set_tls(qmp, creds, endpoint="client", hostname=self.daemon.parse_peer_uri(self.dest).host)


    # ------------------------------------------------------------------
    # Post-copy (see ._postcopy)

    async def _wait_qemu(self, qmp: Any, on_postcopy: Callable[[], None] | None = None) -> MigrationStatus:
        """Poll QEMU until it completes; switch to post-copy when asked (or after the first pass); note the phase.

        *on_postcopy* is called once, when QEMU is first seen in a post-copy state.
        """
        control = self.postcopy
        while True:
            status = await query_migration(qmp)
            self._note(status)
            if status.status == "completed":
                return status
            if status.status in ("failed", "cancelled"):
                raise MigrationError(status)
            if status.postcopy:
                if on_postcopy is not None:
                    on_postcopy()
                    on_postcopy = None
                if not control.active:
                    self.daemon.log(f"migration of {self.domain.name}: post-copy; the guest runs on the destination")
                control.active = control.switched = True
                self.phase = "postcopy"
                if status.status == "postcopy-active" and control.paused:
                    control.paused = False
                    self.state = "active"
            elif control.should_switch(status) and self.abort_reason is None:
                control.switched = True  # from here on an abort is refused: the switch below cannot be undone
                try:
                    await start_postcopy(qmp)
                except QMPError as exc:
                    control.switched = False
                    raise DaemonError(f"QEMU refused to switch the migration of {self.domain.name!r} to post-copy: {exc.desc}") from None
            await trio.sleep(POLL_INTERVAL)

    async def switch_to_postcopy(self) -> None:
        """MIGRATE_POSTCOPY: ask the polling task to switch, and wait until it did (bounded)."""
        control = self.postcopy
        name = self.domain.name
        if self.done.is_set() or self.phase not in ("transfer", "postcopy"):
            raise DaemonError(f"the migration of {name!r} is not transferring (it is {self.state}); there is nothing to switch")
        if not control.enabled:
            raise DaemonError(
                f"the migration of {name!r} was started without --postcopy: both QEMUs must allow post-copy from the start; "
                "migrate again with --postcopy"
            )
        if control.switched:
            await trio.lowlevel.checkpoint()
            return
        control.switch_wanted.set()
        with trio.move_on_after(SETTLE_WAIT):
            while not control.switched and not self.done.is_set():
                await trio.sleep(POLL_INTERVAL)
        if not control.switched:
            raise DaemonError(f"the migration of {name!r} did not switch to post-copy ({self.state}{': ' + self.error if self.error else ''})")

    def request_resume(self, destination: str) -> ResumeRequest:
        """``migrate --postcopy-resume``: try again now, over a new connection to *destination*."""
        if self.done.is_set() or not self.postcopy.active:
            raise DaemonError(f"the migration of {self.domain.name!r} is not a post-copy migration waiting to resume")
        if not self.postcopy.paused:
            raise DaemonError(f"the migration of {self.domain.name!r} is not paused: its post-copy is running")
        self.daemon.parse_peer_uri(destination)
        return self.postcopy.request_resume(destination)

    async def _past_switch(self, process: QemuProcess | ImageGuest) -> bool:
        """After a failure: is QEMU past the switch to post-copy?  Never guesses while a requested switch may still land."""
        if not self.postcopy.switched or not isinstance(process, QemuProcess):
            return False
        try:
            with trio.move_on_after(SETTLE_WAIT):
                status = await query_migration(process.qmp)
                while status.status in PRE_SWITCH:  # our end of its socket is closed: it fails or switches soon
                    await trio.sleep(POLL_INTERVAL)
                    status = await query_migration(process.qmp)
        except QMPError:
            return True  # cannot tell: keep everything
        past = status.status in POSTCOPY_STATES or status.status == "completed" or status.status in PRE_SWITCH
        if past:
            self.postcopy.active = True
        else:
            self.postcopy.switched = False  # QEMU failed before the switch: the guest is the source's, as in pre-copy
        return past

    def _note_break(self, exc: BaseException) -> None:
        self.postcopy.paused = True
        self.postcopy.breaks += 1
        self.state = "postcopy-paused"
        self.stream = None
        self.error = f"post-copy paused: {self._describe(exc)}"
        self.daemon.log(f"migration of {self.domain.name} to {self.dest}: {self.error}; both QEMUs keep the guest, waiting to resume")

    async def _paused(self, process: QemuProcess) -> None:
        """The connection broke past the switch: keep everything, try again (retries, or a client's resume) until it completes."""
        control = self.postcopy
        failures = 0
        while True:
            if failures >= control.retries:
                self.resolved.set()  # a waiting migrate call gets its answer: paused, resume by hand
            destination, request = await control.next_attempt(failures, self.dest)
            self.daemon.log(f"migration of {self.domain.name}: resuming post-copy through {destination}"
                            + (" (requested)" if request is not None else f" (attempt {failures + 1} of {control.retries})"))
            resumes = control.resumes
            try:
                await self._resume(process, destination)
            except ATTEMPT_FAILURES as exc:
                failures = 0 if control.resumes > resumes else failures + 1
                self._note_break(exc)
                if request is not None:
                    request.finish(self.error)
                continue
            if request is not None:
                request.finish(None)
            return

    async def _resume(self, process: QemuProcess, destination: str) -> None:
        """One attempt: a new connection, POSTCOPY_RECOVER, QEMU resumed through it, then finish and confirm."""
        qmp = process.qmp
        async with peer_connection(await connect(self.daemon.parse_peer_uri(destination), self.daemon.tls)) as peer:
            status = await query_migration(qmp)
            with trio.move_on_after(SETTLE_WAIT if self.tunnelled else 0):
                while status.status == "postcopy-active":  # our end of its socket is closed: it pauses soon
                    await trio.sleep(POLL_INTERVAL)
                    status = await query_migration(qmp)
            reply = await call(peer, Procedure.POSTCOPY_RECOVER, {"migration_id": self.migration_id.hex(), "source_status": status.status})
            if self.dest != destination:
                self.dest = destination
                await self._record()
            if reply.get("outcome") == "finished":  # the destination saw it through already (it restarted after the end)
                finished: dict[str, Any] = {"state": reply.get("state")}
            else:
                if status.status == "postcopy-paused":
                    if self.tunnelled:

                        async def start(channel: int | str) -> None:
                            if isinstance(channel, str):
                                await resume_outgoing_uri(qmp, channel)
                            else:
                                await resume_outgoing_fd(qmp, channel)
                            self._resumed()

                        # The channels are as the migration started: QEMU's capability says which.
                        preempt = (await query_capabilities(qmp)).get("postcopy-preempt", False)
                        await self._tunnel(peer, qmp, start, preempt=preempt)
                    else:
                        await resume_outgoing_uri(qmp, reply["uri"])
                        self._resumed()
                        self._note(await self._wait_qemu(qmp))
                else:
                    self._resumed()
                    self._note(await self._wait_qemu(qmp))
                self.phase = "finish"
                finished = await self._finish(peer)
            self.error = None
            await self._completed(process, self.dest_name, finished)

    def _resumed(self) -> None:
        self.postcopy.paused = False
        self.postcopy.resumes += 1
        self.state = "active"
        self.phase = "postcopy"
        self.daemon.log(f"migration of {self.domain.name}: post-copy resumed through {self.dest}")
