"""One connection to the daemon, from a client or a peer daemon: the RPC procedures.

Every procedure states the role it needs (:data:`._access.PROCEDURE_ROLES`)
and :meth:`Session.handlers` checks it before the handler runs.  Handlers
raise :class:`DaemonError` for what the caller should read; anything else is
a bug, logged in full and reported as one line without internals.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import Buffer, ErrorCode, RPCError
from ..control import PROGRAM, VERSION, DaemonError, Procedure
from ..qemu import QemuError, QMPError
from ..transport import Handler, TunnelConnection, TunnelStream
from ._access import GRANTED_BY, PROCEDURE_ROLES, Role, describe
from ._domains import validate_name
from ._imageguest import ImageGuest
from ._incoming import Incoming
from ._jobstats import complete_jobinfo
from ._net import Identity
from ._qemusock import PREEMPT_LABEL
from ._qmpallow import check_qmp
from ._recovery import outcome_reply
from ._rpc import field, json_handler, public_message
from ._source import SourceJob

if TYPE_CHECKING:
    from ._daemon import Daemon, Domain

__all__ = ["Session"]

JSON = dict[str, Any]
#: QMP commands that change whether the guest runs: not while a migration decides where it runs.
RUN_STATE_COMMANDS = frozenset({"cont", "stop", "system_reset", "system_powerdown", "system_wakeup"})


#: Compression each guest kind can use: QEMU's XBZRLE (multifd needs several channels, which the tunnel's one stream is not),
#: the tunnel's zstd on page batches for memory images.
COMPRESSION = {"qemu": ("xbzrle",), "image": ("zstd",)}


def _compression(domain: Domain, compressed: bool, methods: list[Any] | None) -> tuple[str, ...]:
    """virsh --compressed [--comp-methods LIST]: the methods to use, checked against the guest kind."""
    kind = "image" if domain.is_image else "qemu"
    if methods is None:
        return COMPRESSION[kind][:1] if compressed else ()
    if not all(isinstance(m, str) for m in methods):
        raise DaemonError("malformed request: 'comp_methods' must be a list of strings")
    for method in methods:
        if method not in COMPRESSION[kind]:
            other = "image" if kind == "qemu" else "qemu"
            extra = f" ({method} is for {'memory-image' if other == 'image' else 'QEMU'} guests)" if method in COMPRESSION[other] else ""
            raise DaemonError(f"compression method {method!r} is not supported for domain {domain.name!r}{extra}; "
                              f"use {', '.join(COMPRESSION[kind])}")
    return tuple(dict.fromkeys(methods))


def _migration_id(request: JSON) -> bytes:
    try:
        migration_id = bytes.fromhex(field(request, "migration_id", str))
    except ValueError:
        raise DaemonError("malformed request: bad migration_id") from None
    if len(migration_id) != 16:
        raise DaemonError("malformed request: a migration_id is 32 hex digits")
    return migration_id


class Session:
    """One connection to the daemon, from a client or a peer daemon."""

    def __init__(self, daemon: Daemon, identity: Identity, sockname: Any, roles: frozenset[Role], *, scheme: str) -> None:
        self.daemon = daemon
        #: How the peer reached us (unix, tls, tcp): a native migration's data channel is as secure as this.
        self.scheme = scheme
        self.identity = identity
        self.sockname = sockname
        self.roles = roles
        self.conn: TunnelConnection | None = None
        self.prepared: dict[bytes, Incoming] = {}

    def handlers(self) -> dict[tuple[int, int], Handler]:
        """The procedures of :data:`PROGRAM`, for ``open_connection(handlers=...)``.

        That registers them at version 1, :data:`VERSION`, so the trio layer
        answers a call of any other version ``UNKNOWN_PROCEDURE`` (protocol.md
        §7, Appendix A) before a handler could run.
        """
        table: dict[Procedure, Callable[[JSON], Awaitable[JSON]]] = {
            Procedure.DEFINE: self.define,
            Procedure.UNDEFINE: self.undefine,
            Procedure.START: self.start,
            Procedure.DESTROY: self.destroy,
            Procedure.LIST: self.list,
            Procedure.DOMAIN_INFO: self.domain_info,
            Procedure.MIGRATE: self.migrate,
            Procedure.JOBINFO: self.jobinfo,
            Procedure.ABORT: self.abort,
            Procedure.SET_SPEED: self.set_speed,
            Procedure.MONITOR: self.monitor,
            Procedure.CONFIRM: self.confirm,
            Procedure.PREPARE: self.prepare,
            Procedure.FINISH: self.finish,
            Procedure.MIGRATION_OUTCOME: self.migration_outcome,
            Procedure.SUSPEND: self.suspend,
            Procedure.RESUME: self.resume,
            Procedure.SHUTDOWN: self.shutdown,
            Procedure.REBOOT: self.reboot,
            Procedure.MIGRATE_POSTCOPY: self.migrate_postcopy,
            Procedure.POSTCOPY_RECOVER: self.postcopy_recover,
        }
        assert VERSION == 1, "register the handlers with conn.register(..., version=VERSION)"
        return {(PROGRAM, int(proc)): self._guarded(proc, json_handler(fn)) for proc, fn in table.items()}

    def _guarded(self, procedure: Procedure, handler: Handler) -> Handler:
        """*handler*, run only when this connection holds the role *procedure* needs."""
        needed = PROCEDURE_ROLES[procedure]

        async def guarded(body: bytes) -> Buffer:
            if needed not in self.roles:
                self.daemon.log(f"refused {procedure.name} from {self.identity} ({describe(self.roles)}): needs {needed.value}",
                                "warning", peer=str(self.identity), roles=describe(self.roles), procedure=procedure.name)
                raise RPCError(
                    ErrorCode.PERMISSION_DENIED,
                    f"{procedure.name} needs the {needed.value} role (granted by the daemon's {GRANTED_BY[needed]}); "
                    f"{self.identity} has {describe(self.roles)}",
                )
            try:
                return await handler(body)
            except RPCError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: log it, tell the client no more than that
                self.daemon.log(f"internal error in {procedure.name} from {self.identity}: " + "".join(traceback.format_exception(exc)).rstrip(),
                                "error", peer=str(self.identity), procedure=procedure.name)
                raise RPCError(ErrorCode.INTERNAL_ERROR, f"{procedure.name} failed: {public_message(exc)}") from None

        return guarded

    # ------------------------------------------------------------------
    # Domain management

    async def define(self, request: JSON) -> JSON:
        daemon = self.daemon
        definition = daemon.check_definition(field(request, "definition", dict))
        existing = daemon.domains.get(definition["name"])
        if existing is not None and existing.process is not None:
            raise DaemonError(f"domain {definition['name']!r} is running; it cannot be redefined until it stops")
        await daemon.store.save(definition)
        if existing is not None:
            existing.definition = definition
            existing.persistent = True
        else:
            daemon.domains[definition["name"]] = daemon.new_domain(definition)
        daemon.log(f"defined {definition['name']}")
        return {"name": definition["name"], "replaced": existing is not None}

    async def undefine(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        if domain.process is not None:
            raise DaemonError(f"domain {domain.name!r} is running; stop it first")
        await self.daemon.store.remove(domain.name)
        await self.daemon.store.set_migrated(domain.name, None)
        del self.daemon.domains[domain.name]
        self.daemon.log(f"undefined {domain.name}")
        return {}

    async def start(self, request: JSON) -> JSON:
        daemon = self.daemon
        domain = daemon.domain(request.get("name"))
        force = field(request, "force", bool, False)
        marker = daemon.store.migrated(domain.name)
        if marker is not None and domain.process is None:
            if not force:
                raise DaemonError(
                    f"domain {domain.name!r} was migrated to {marker.get('destination')} and runs there; "
                    f"start it here only if it does not (start --force)"
                )
            daemon.log(f"starting {domain.name} although it was migrated to {marker.get('destination')} (--force)")
        await daemon.start_guest(domain, paused=field(request, "paused", bool, False))
        if marker is not None:
            await daemon.store.set_migrated(domain.name, None)
        return {"state": await domain.state()}

    async def destroy(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        if domain.process is None:
            raise DaemonError(f"domain {domain.name!r} is not running")
        if domain.job is not None:
            raise DaemonError(f"domain {domain.name!r} is migrating; abort the job first")
        if domain.incoming is not None:
            raise DaemonError(f"domain {domain.name!r} is being migrated in; the source can abort it")
        await self.daemon.stop_guest(domain, reason="destroyed by a client")
        return {}

    async def list(self, request: JSON) -> JSON:
        rows = []
        for name in sorted(self.daemon.domains):
            domain = self.daemon.domains[name]
            rows.append(
                {
                    "name": name,
                    "state": await domain.state(),
                    "pid": domain.process.pid if domain.process is not None else None,
                    "persistent": domain.persistent,
                }
            )
            if domain.unconfirmed is not None:
                rows[-1]["unconfirmed_destination"] = domain.unconfirmed
            elif domain.process is None and (marker := self.daemon.store.migrated(name)) is not None:
                rows[-1]["migrated_to"] = marker.get("destination")
        return {"domains": rows}

    async def domain_info(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        reply = {
            "name": domain.name,
            "state": await domain.state(),
            "definition": domain.definition,
            "kind": "image" if domain.is_image else "qemu",
            "pid": domain.process.pid if domain.process is not None else None,
            "persistent": domain.persistent,
            "migrated_to": None,
        }
        if domain.process is None and (marker := self.daemon.store.migrated(domain.name)) is not None:
            reply["migrated_to"] = marker.get("destination")
        return reply

    # ------------------------------------------------------------------
    # Run state: suspend, resume, shutdown, reboot

    def _settled(self, request: JSON, what: str) -> Domain:
        """The running domain of *request*, refused while a migration decides where it runs (as MONITOR refuses)."""
        domain = self.daemon.domain(request.get("name"))
        if domain.process is None:
            raise DaemonError(f"domain {domain.name!r} is not running")
        if domain.job is not None or domain.unconfirmed is not None or domain.incoming is not None:
            raise DaemonError(f"domain {domain.name!r} is migrating: {what} would decide where it runs; wait, or abort the job")
        return domain

    async def suspend(self, request: JSON) -> JSON:
        domain = self._settled(request, "suspending it")
        if isinstance(domain.process, ImageGuest):
            await domain.process.pause()
        else:
            await self._qmp(domain, "stop")
        self.daemon.log(f"suspended {domain.name}", domain=domain.name, peer=str(self.identity))
        return {"state": await domain.state()}

    async def resume(self, request: JSON) -> JSON:
        domain = self._settled(request, "resuming it")
        if isinstance(domain.process, ImageGuest):
            domain.process.resume()
            await trio.lowlevel.checkpoint()
        else:
            await self._qmp(domain, "cont")
        self.daemon.log(f"resumed {domain.name}", domain=domain.name, peer=str(self.identity))
        return {"state": await domain.state()}

    async def reboot(self, request: JSON) -> JSON:
        domain = self._settled(request, "rebooting it")
        if isinstance(domain.process, ImageGuest):
            raise DaemonError(f"domain {domain.name!r} is a memory-image guest: it has no firmware to reboot")
        await self._qmp(domain, "system_reset")
        self.daemon.log(f"rebooted {domain.name} (reset)", domain=domain.name, peer=str(self.identity))
        return {"state": await domain.state()}

    async def shutdown(self, request: JSON) -> JSON:
        """ACPI power-down; if the guest is still running after ``timeout_s``, destroy it."""
        domain = self._settled(request, "shutting it down")
        timeout = field(request, "timeout_s", float, 60.0)
        if timeout < 0:
            raise DaemonError("the shutdown timeout must be >= 0 seconds")
        process = domain.process
        if isinstance(process, ImageGuest):  # no ACPI in a simulation: it stops at once
            await self.daemon.stop_guest(domain, reason=f"shut down by {self.identity}")
            return {"how": "stopped"}
        await self._qmp(domain, "system_powerdown")
        self.daemon.log(f"asked {domain.name} to power down (ACPI); destroying it if it still runs after {timeout:g} s",
                        domain=domain.name, peer=str(self.identity))
        with trio.move_on_after(timeout):
            while domain.process is process:
                await trio.sleep(0.1)
        if domain.process is not process:
            return {"how": "powered off"}
        if domain.job is not None or domain.incoming is not None:
            raise DaemonError(f"domain {domain.name!r} started migrating while it was asked to power down; it was not destroyed")
        await self.daemon.stop_guest(domain, reason=f"did not power down within {timeout:g} s; destroyed")
        return {"how": "destroyed"}

    async def _qmp(self, domain: Domain, command: str) -> None:
        try:
            await domain.qemu().qmp.execute(command)
        except QMPError as exc:
            raise DaemonError(f"QEMU refused {command} for {domain.name!r}: {getattr(exc, 'desc', exc)}") from None

    async def monitor(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        qemu = domain.qemu()
        command = check_qmp(field(request, "command", dict), run_dir=domain.guest_dir, allow_unsafe=self.daemon.allow_unsafe_monitor)
        execute = command["execute"]
        if execute in RUN_STATE_COMMANDS and (domain.job is not None or domain.unconfirmed is not None or domain.incoming is not None):
            raise DaemonError(f"domain {domain.name!r} is migrating: {execute!r} would decide where it runs; wait, or abort the job")
        arguments = command.get("arguments")
        try:
            result = await qemu.qmp.execute(execute, arguments)
        except QMPError as exc:
            return {"error": {"class": getattr(exc, "error_class", "GenericError"), "desc": getattr(exc, "desc", str(exc))}}
        return {"return": result}

    # ------------------------------------------------------------------
    # Jobs, on the source

    async def migrate(self, request: JSON) -> JSON:
        daemon = self.daemon
        if field(request, "postcopy_resume", bool, False):
            return await self._postcopy_resume(request)
        p2p = field(request, "p2p", bool, False)
        tunnelled = field(request, "tunnelled", bool, False)
        if tunnelled and not p2p:
            raise DaemonError("cannot perform tunnelled migration without using peer2peer flag")
        direct_uri = None
        direct_tls = False
        if not p2p:
            # Client-driven: the client prepared the destination and passes its QEMU endpoint.
            direct_uri = field(request, "uri", str, None)
            if direct_uri is None or not direct_uri.startswith(("unix:", "tcp:")):
                raise DaemonError("without --p2p the client drives the migration: it must pass the destination's 'uri'")
            direct_tls = field(request, "tls", bool, False)
            if direct_uri.startswith("tcp:") and not direct_tls and not daemon.insecure:
                raise DaemonError("refusing to send the migration over plain TCP: the destination must be reached over tls://")
        domain = daemon.domain(request.get("name"))
        dest = field(request, "destination", str)
        if p2p:
            daemon.parse_peer_uri(dest)
        dname = field(request, "dname", str, None)
        if dname is not None:
            validate_name(dname)
        bandwidth = field(request, "bandwidth_mib", int, 0)
        if bandwidth < 0:
            raise DaemonError("the bandwidth must be >= 0 MiB/s (0 for no limit)")
        if domain.incoming is not None:
            raise DaemonError(f"domain {domain.name!r} is still being migrated in")
        if domain.process is None:
            raise DaemonError(f"domain {domain.name!r} is not running")
        if domain.is_image and not tunnelled:
            raise DaemonError(f"domain {domain.name!r} is a memory-image guest: it migrates only tunnelled (--p2p --tunnelled)")
        timeout = field(request, "timeout_s", float, 0.0)
        if timeout < 0:
            raise DaemonError("the migration timeout must be >= 0 seconds (0 for none)")
        timeout_action = field(request, "timeout_action", str, "suspend")
        if timeout_action not in ("suspend", "postcopy"):
            raise DaemonError(f"unknown timeout action {timeout_action!r}: suspend or postcopy")
        auto_converge = field(request, "auto_converge", bool, False)
        if auto_converge and domain.is_image:
            raise DaemonError(f"domain {domain.name!r} is a memory-image guest: --auto-converge throttles QEMU's vCPUs and applies to QEMU guests only")
        compression = _compression(domain, field(request, "compressed", bool, False), field(request, "comp_methods", list, None))
        postcopy = field(request, "postcopy", bool, False)
        after_precopy = field(request, "postcopy_after_precopy", bool, False)
        retries = field(request, "retries", int, 0)
        if retries < 0 or field(request, "postcopy_bandwidth_mib", int, 0) < 0:
            raise DaemonError("--retries and --postcopy-bandwidth must be >= 0")
        if timeout_action == "postcopy" and not (postcopy and timeout > 0):
            raise DaemonError("--timeout-postcopy needs --postcopy and --timeout SECONDS")
        if postcopy or after_precopy:
            if domain.is_image:
                raise DaemonError(f"domain {domain.name!r} is a memory-image guest: it has no post-copy (pre-copy only)")
            if not p2p:
                raise DaemonError("post-copy needs --p2p: the source daemon must see it through, including a resume")
            if not field(request, "live", bool, False):
                raise DaemonError("post-copy needs --live: the guest must run while its memory moves")
        if domain.job is not None and domain.job.resolved.is_set():
            with trio.move_on_after(10):  # the last job is telling its destination to clean up
                await domain.job.done.wait()
        if domain.job is not None:
            raise DaemonError(f"domain {domain.name!r} already has a migration job")
        if domain.unconfirmed is not None:
            raise DaemonError(f"domain {domain.name!r} waits for {domain.unconfirmed} to confirm its last migration")
        job = SourceJob(
            daemon,
            domain,
            dest,
            live=field(request, "live", bool, False),
            tunnelled=tunnelled,
            bandwidth_mib=bandwidth,
            dname=dname,
            verify=field(request, "verify", bool, False),
            direct_uri=direct_uri,
            direct_tls=direct_tls,
            persistent=field(request, "persistent", bool, False),
            undefine_source=field(request, "undefine_source", bool, False),
            timeout_s=timeout,
            timeout_action=timeout_action,
            auto_converge=auto_converge,
            compression=compression,
            abort_on_error=field(request, "abort_on_error", bool, False),
            postcopy=postcopy,
            postcopy_after_precopy=after_precopy,
            retries=retries,
            postcopy_bandwidth_mib=field(request, "postcopy_bandwidth_mib", int, 0),
        )
        domain.job = domain.last_job = job
        assert daemon._nursery is not None
        daemon._nursery.start_soon(job.run)
        mode = "tunnelled p2p" if tunnelled else "native p2p" if p2p else "native, driven by the client"
        daemon.log(f"migrating {domain.name} to {dest} ({mode}) for {self.identity}", domain=domain.name, destination=dest,
                   peer=str(self.identity))
        if field(request, "detach", bool, False):
            await trio.lowlevel.checkpoint()
            return {"domain": domain.name, "status": "started", "destination": dest}
        return await self._outcome(job, "completed" if p2p else "performed")

    async def _outcome(self, job: SourceJob, expected: str) -> JSON:
        """Wait until where the guest runs is decided; the job's statistics, or its failure as one line."""
        await job.resolved.wait()
        info = await job.info()
        domain = job.domain
        if job.state == "postcopy-paused":
            raise DaemonError(
                f"migration of {domain.name!r} paused in post-copy: {job.error}; the guest runs on {job.dest} and waits for the "
                f"rest of its memory from here: resume it with migrate --postcopy-resume {domain.name} {job.dest}"
            )
        if job.state != expected:
            raise DaemonError(f"migration of {domain.name!r} {job.state}: {job.error}; {self.daemon.where_is(domain)}")
        info.update(job.summary)
        return info

    async def _postcopy_resume(self, request: JSON) -> JSON:
        """``migrate --postcopy-resume NAME DEST_URI``: one attempt to resume a paused post-copy migration, to its end."""
        domain = self.daemon.domain(request.get("name"))
        job = domain.job
        if job is None:
            raise DaemonError(f"domain {domain.name!r} has no migration to resume")
        resume = job.request_resume(field(request, "destination", str))
        self.daemon.log(f"resuming the post-copy migration of {domain.name} through {resume.destination}")
        await resume.done.wait()
        if resume.error is not None:
            raise DaemonError(f"migration of {domain.name!r} still paused in post-copy: {resume.error}")
        return await self._outcome(job, "completed")

    async def migrate_postcopy(self, request: JSON) -> JSON:
        """virsh migrate-postcopy: switch the running migration to post-copy."""
        job = self._job(request)
        await job.switch_to_postcopy()
        return {"status": job.state, "phase": job.postcopy.phase()}

    async def confirm(self, request: JSON) -> JSON:
        """Client-driven migration, last step: stop the source guest (ok) or resume it."""
        domain = self.daemon.domain(request.get("name"))
        job = domain.last_job
        if job is None or job.direct_uri is None:
            raise DaemonError(f"domain {domain.name!r} has no client-driven migration to confirm")
        await job.confirm(field(request, "ok", bool))
        return {"status": job.state}

    def _job(self, request: JSON) -> SourceJob:
        domain = self.daemon.domain(request.get("name"))
        if domain.job is None:
            raise DaemonError(f"no migration job is running for domain {domain.name!r}")
        return domain.job

    async def jobinfo(self, request: JSON) -> JSON:
        """The current job (outgoing or incoming), else the last; with ``completed``, the last that completed."""
        name = request.get("name")
        if field(request, "completed", bool, False):
            validate_name(name)
            assert isinstance(name, str)
            await trio.lowlevel.checkpoint()
            if name in self.daemon.completed_jobs:
                return self.daemon.completed_jobs[name]
            self.daemon.domain(name)  # an undefined name is an error; a defined one has no completed job
            return complete_jobinfo({"domain": name, "status": "none"})
        domain = self.daemon.domain(name)
        candidates = [j for j in (domain.incoming, domain.job, domain.last_job, domain.last_incoming) if j is not None]
        if not candidates:
            return complete_jobinfo({"domain": domain.name, "status": "none"})
        # the one under way, else the most recent
        job = candidates[0] if domain.incoming is not None or domain.job is not None else max(candidates, key=lambda j: j.started)
        return await job.info()

    async def abort(self, request: JSON) -> JSON:
        job = self._job(request)
        job.abort()
        with trio.move_on_after(30):  # the source guest runs again well within this: see SourceJob._recover
            await job.resolved.wait()
        return {"status": job.state, "where": self.daemon.where_is(job.domain)}

    async def set_speed(self, request: JSON) -> JSON:
        mib = field(request, "bandwidth_mib", int)
        if mib < 0:
            raise DaemonError("the bandwidth must be >= 0 MiB/s (0 for no limit)")
        job = self._job(request)
        try:
            await job.set_speed(mib)
        except QMPError as exc:
            raise DaemonError(f"cannot change the speed: {self.daemon.public(exc)}") from None
        return {"bandwidth_mib": mib}

    # ------------------------------------------------------------------
    # Incoming migrations, on the destination

    async def prepare(self, request: JSON) -> JSON:
        daemon = self.daemon
        # The same checks as a local definition: a compromised source cannot run code here.
        definition = daemon.check_definition(field(request, "definition", dict))
        migration_id = _migration_id(request)
        if migration_id in daemon.incoming or daemon.store.outcome(migration_id.hex()) is not None:
            raise DaemonError("malformed request: duplicate migration_id")
        name = definition["name"]
        existing = daemon.domains.get(name)
        if existing is not None and (existing.process is not None or existing.incoming is not None or existing.starting):
            raise DaemonError(f"domain {name!r} already exists and is active on the destination")
        persistent = field(request, "persistent", bool, False) or (existing is not None and existing.persistent)
        domain = daemon.new_domain(definition, persistent=persistent)
        tunnelled = field(request, "tunnelled", bool, False)
        if domain.is_image and not tunnelled:
            raise DaemonError(f"domain {name!r} is a memory-image guest: it migrates only tunnelled (--p2p --tunnelled)")
        incoming = Incoming(
            domain,
            migration_id,
            tunnelled=tunnelled,
            running=field(request, "running", bool, False),
            verify=field(request, "verify", bool, False),
            persistent=persistent,
            postcopy=field(request, "postcopy", bool, False),
            preempt=field(request, "postcopy_preempt", bool, False) and daemon.postcopy_preempt,
        )
        if incoming.postcopy and domain.is_image:
            raise DaemonError("a memory-image guest has no post-copy")
        incoming.owner = self
        incoming.previous = existing
        incoming.source = str(self.identity)
        incoming.live = field(request, "live", bool, False)
        domain.incoming = incoming
        daemon.domains[name] = domain
        daemon.incoming[migration_id] = incoming
        self.prepared[migration_id] = incoming
        try:
            if not domain.is_image:
                # Before QEMU starts: a restarted daemon finds an incoming QEMU it must discard.
                await daemon.store.set_runtime(
                    name, "migration", {"role": "destination", "migration_id": migration_id.hex(), "running": incoming.running}
                )
            await daemon.start_guest(domain, incoming=True)
            reply = await incoming.prepare(
                self.sockname,
                images_dir=daemon.store.images_dir,
                tls=daemon.tls if self.scheme == "tls" else None,
                owner=daemon.qemu_uid,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(incoming)
            raise
        if incoming.postcopy:
            assert daemon._nursery is not None
            daemon._nursery.start_soon(incoming.watch_switch, daemon)
        daemon.log(f"prepared incoming {name} from {self.identity}", domain=name, peer=str(self.identity))
        return reply

    async def on_stream(self, stream: TunnelStream) -> None:
        incoming = self.prepared.get(stream.migration_id)
        assert self.daemon._nursery is not None
        if incoming is not None and stream.label == PREEMPT_LABEL:  # post-copy's second channel, after the main one
            if not incoming.preempt or incoming.stream is None or incoming.sock is None or incoming.preempt_stream is not None:
                await stream.abort(reason="no tunnelled post-copy migration with this id waits for a preempt channel on this connection")
                return
            incoming.preempt_stream = stream
            self.daemon._nursery.start_soon(incoming.pump_preempt, stream)
            return
        if incoming is None or not incoming.tunnelled or incoming.stream is not None or incoming.stream_seen.is_set():
            await stream.abort(reason="no prepared tunnelled migration with this id on this connection")
            return
        incoming.stream = stream  # now, not when the pump starts: a preempt stream may follow at once
        self.daemon._nursery.start_soon(incoming.pump, stream)

    async def finish(self, request: JSON) -> JSON:
        migration_id = _migration_id(request)
        incoming = self.prepared.pop(migration_id, None)
        if incoming is None:
            raise DaemonError("no prepared migration with this id on this connection")
        daemon = self.daemon
        domain = incoming.domain
        if not field(request, "ok", bool):
            await self._discard(incoming)
            return {}
        try:
            state = await incoming.finish(daemon)
        except BaseException:
            with trio.CancelScope(shield=True):
                if incoming.switched:  # past the switch nothing is discarded: the source tries again
                    self.prepared[migration_id] = incoming
                else:
                    await self._discard(incoming)
            raise
        domain.incoming = None
        domain.last_incoming = incoming
        blocktime: JSON = {}
        with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(QemuError):
            # Before the end, so the completed job's statistics show it; a QEMU whose monitor went
            # away meanwhile (the guest powered off) must not skip the books kept below.
            blocktime = await incoming.blocktime()
        incoming.end("completed")
        daemon.completed_jobs[domain.name] = incoming.snapshot()
        daemon.incoming.pop(migration_id, None)
        # The guest runs here now (the outcome is recorded): keep its books even if the source hung up meanwhile.
        with trio.CancelScope(shield=True):
            if incoming.persistent:
                await daemon.store.save(domain.definition)
            await daemon.store.set_migrated(domain.name, None)  # it came back here
            if not domain.is_image:
                await daemon.store.set_runtime(domain.name, "domain", {"definition": domain.definition, "persistent": domain.persistent})
                await daemon.store.set_runtime(domain.name, "migration", None)
        daemon.log(f"incoming {domain.name} from {incoming.source} complete: {state}{'' if incoming.persistent else ' (transient)'}",
                   domain=domain.name, peer=incoming.source, outcome="completed")
        reply: JSON = {"state": state, **blocktime}
        if incoming.image_sha256 is not None:
            reply["image_sha256"] = incoming.image_sha256
        return reply

    async def postcopy_recover(self, request: JSON) -> JSON:
        """A source resumes a post-copy migration on this (new) connection: pair it by id, ready QEMU's new channel."""
        daemon = self.daemon
        migration_id = _migration_id(request)
        incoming = daemon.incoming.get(migration_id)
        if incoming is None:
            if daemon.store.outcome(migration_id.hex()) == "finished":
                return {"outcome": "finished", "state": "running"}
            raise DaemonError("no post-copy migration with this id here")
        if not incoming.switched:
            raise DaemonError(f"the incoming migration of {incoming.domain.name!r} is not in post-copy: it cannot be resumed")
        old = incoming.owner
        if old is not None and old is not self:
            old.prepared.pop(migration_id, None)
        incoming.owner = self
        self.prepared[migration_id] = incoming
        reply = await incoming.recover(
            field(request, "source_status", str),
            self.sockname,
            tls=daemon.tls if self.scheme == "tls" else None,
            owner=daemon.qemu_uid,
        )
        daemon.log(f"incoming {incoming.domain.name}: post-copy resumed by {self.identity} ({reply.get('state')})")
        return reply

    async def migration_outcome(self, request: JSON) -> JSON:
        """A source that lost the answer to FINISH asks how the migration ended here."""
        await trio.lowlevel.checkpoint()
        return outcome_reply(self.daemon, _migration_id(request).hex())

    async def _discard(self, incoming: Incoming) -> None:
        """Throw away a prepared destination: no QEMU left, nothing that looks complete.

        A definition the destination had before (of a guest that was not
        running) comes back as it was; otherwise the name disappears.  The
        outcome is recorded for a source that asks later.
        """
        daemon = self.daemon
        domain = incoming.domain
        self.prepared.pop(incoming.migration_id, None)
        incoming.end("cancelled", incoming.pump_error or "discarded: the source cancelled it, failed, or went away")
        await incoming.discard()
        await daemon.stop_guest(domain, reason="incoming migration discarded")
        domain.incoming = None
        if daemon.domains.get(domain.name) is domain:
            if incoming.previous is not None:
                daemon.domains[domain.name] = incoming.previous
            else:
                del daemon.domains[domain.name]
        await daemon.store.set_outcome(incoming.migration_id.hex(), "discarded")
        daemon.incoming.pop(incoming.migration_id, None)
        if not domain.is_image:
            await daemon.store.clear_guest_dir(domain.name)
        daemon.log(f"discarded incoming {domain.name} from {incoming.source}", "warning", domain=domain.name, peer=incoming.source,
                   outcome="discarded")

    async def close(self) -> None:
        for incoming in list(self.prepared.values()):
            if incoming.switched:
                # Past the switch: the guest runs here and needs the source's pages; wait for POSTCOPY_RECOVER.
                incoming.owner = None
                await incoming.detach_stream()
                self.daemon.log(f"incoming {incoming.domain.name}: connection lost in post-copy; kept, waiting for the source to resume")
                continue
            await self._discard(incoming)
        self.prepared.clear()
