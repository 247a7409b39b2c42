"""The reference migration daemon: domains, QEMU supervision, RPC service.

Every connection, from a client or from another daemon, is a tunnel
connection: RPC calls go as tunnel calls of :data:`PROGRAM`, and the
migration streams of TUNNELLED migrations arrive on the same connection as
the calls that prepared them.  Jobs (migrations) run in the daemon's own
nursery, so they survive the client that started them and stop with the
daemon; guests are QEMU processes the daemon launched and watches.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .._errors import TunnelError
from ..qemu import QemuError, QemuProcess, QMPError, run_state
from ..transport import Handler, TunnelConnection, TunnelStream, open_connection
from ._domains import DomainStore, validate_definition, validate_name
from ._imageguest import ImageGuest
from ._limits import ConnectionLimits, Slot
from ._migration import Incoming, SourceJob, domain_state
from ._net import Identity, TLSFiles, accept_tls, listen, peer_identity
from ._rpc import PROGRAM, DaemonError, Procedure, field, json_handler
from ._uri import URI, URIError, parse_uri

__all__ = ["Daemon", "Domain", "parse_allow"]

JSON = dict[str, Any]


def parse_allow(entry: str) -> tuple[str, str]:
    """``cn:NAME`` or ``uid:N`` (``addr:HOST`` for peers on an ``--insecure`` TCP listener)."""
    kind, sep, value = entry.partition(":")
    if not sep or not value or kind not in ("cn", "uid", "addr"):
        raise DaemonError(f"bad --allow-peer {entry!r}: use cn:NAME, uid:N or addr:HOST")
    if kind == "uid" and not value.isdigit():
        raise DaemonError(f"bad --allow-peer {entry!r}: a uid is a number")
    return kind, value


class Domain:
    """A defined guest and, while it runs, its QEMU process and current job."""

    def __init__(self, definition: JSON, run_dir: str) -> None:
        self.definition = definition
        self.run_dir = run_dir
        self.process: QemuProcess | ImageGuest | None = None
        #: Cancels the task that notices QEMU exiting by itself (before the daemon stops it).
        self.watcher: trio.CancelScope | None = None
        self.job: SourceJob | None = None
        self.last_job: SourceJob | None = None
        self.incoming: Incoming | None = None
        self.persistent = True

    @property
    def name(self) -> str:
        name: str = self.definition["name"]
        return name

    @property
    def is_image(self) -> bool:
        return "image" in self.definition

    def qemu(self) -> QemuProcess:
        """The running QEMU, or a clear error for guests that have none."""
        if self.process is None:
            raise DaemonError(f"domain {self.name!r} is not running")
        if not isinstance(self.process, QemuProcess):
            raise DaemonError(f"domain {self.name!r} is a memory-image guest: it has no QEMU monitor")
        return self.process

    async def state(self) -> str:
        if self.incoming is not None:
            return "incoming"
        if self.process is None:
            return "shut off"
        if self.job is not None:
            return "migrating"
        if isinstance(self.process, ImageGuest):
            return "running" if self.process.running else "paused"
        try:
            with trio.move_on_after(2):
                return domain_state(await run_state(self.process.qmp))
        except QMPError:
            pass
        return "unknown"


class Daemon:
    def __init__(
        self,
        *,
        state_dir: str,
        listen: list[str],
        tls: TLSFiles | None = None,
        allow: list[str] = (),  # type: ignore[assignment]
        insecure: bool = False,
        log: Callable[[str], None] | None = None,
        max_clients: int = 5000,
        max_anonymous_clients: int = 20,
    ) -> None:
        self.store = DomainStore(state_dir)
        self.listen_uris = [parse_uri(u) for u in listen]
        if not self.listen_uris:
            raise DaemonError("nothing to listen on: give at least one --listen URI")
        for uri in self.listen_uris:
            if uri.scheme == "tls" and tls is None:
                raise DaemonError(f"cannot listen on {uri}: TLS needs --tls-cert, --tls-key and --tls-ca")
            if uri.scheme == "tcp" and not insecure:
                raise DaemonError(f"refusing to listen on {uri} without TLS: use tls://, or pass --insecure to accept that risk")
        self.tls = tls
        self.allow = [parse_allow(a) for a in allow] + [("uid", str(os.getuid()))]
        self.insecure = insecure
        self._log = log or (lambda line: None)
        self.limits = ConnectionLimits(max_clients=max_clients, max_anonymous_clients=max_anonymous_clients)
        self.domains: dict[str, Domain] = {
            name: Domain(definition, self.store.run_dir) for name, definition in self.store.load_all().items()
        }
        self.incoming: dict[bytes, Incoming] = {}
        self._nursery: trio.Nursery | None = None
        self._server_context = tls.server_context() if tls is not None else None
        self._unix_paths: list[str] = []

    def log(self, line: str) -> None:
        self._log(line)

    # ------------------------------------------------------------------
    # Running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; on the way out stop every guest and remove the sockets."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for uri in self.listen_uris:
                    listeners = await listen(uri)
                    if uri.scheme == "unix":
                        self._unix_paths.append(uri.path)
                    if uri.scheme == "tcp":
                        self.log(f"WARNING: listening on {uri} without TLS (--insecure): anyone who can reach it can drive this daemon")
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, uri)
                    self.log(f"listening on {uri}")
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _shutdown(self) -> None:
        for domain in list(self.domains.values()):
            if domain.process is not None:
                await self.stop_guest(domain, reason="daemon shutting down")
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.log("stopped")

    async def _accept_loop(self, listener: trio.SocketListener, uri: URI) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # e.g. out of file descriptors: wait, then go on accepting
                    self.log(f"{uri}: accept failed: {exc}")
                    await trio.sleep(0.5)
                    continue
                slot = self.limits.admit()
                if slot is None:
                    line = self.limits.refusal_message(trio.current_time())
                    if line is not None:
                        self.log(f"{uri}: {line}")
                    await trio.aclose_forcefully(stream)
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, stream, uri, slot)

    async def _serve(self, raw: trio.SocketStream, uri: URI, slot: Slot) -> None:
        try:
            with slot:
                await self._serve_connection(raw, uri, slot)
        except Exception as exc:  # noqa: BLE001 - a bug: drop this connection, keep the daemon serving
            self.log(f"internal error on a connection from {uri}: " + "".join(traceback.format_exception(exc)).rstrip())
            await trio.aclose_forcefully(raw)

    async def _serve_connection(self, raw: trio.SocketStream, uri: URI, slot: Slot) -> None:
        stream: trio.abc.Stream = raw
        if uri.scheme == "tls":
            assert self._server_context is not None
            tls_stream = await accept_tls(raw, self._server_context)
            if tls_stream is None:
                self.log(f"{uri}: a client failed the TLS handshake")
                return
            stream = tls_stream
        identity = peer_identity(stream)
        session = Session(self, identity, raw.socket.getsockname())
        try:
            async with open_connection(stream, client=False, handlers=session.handlers()) as conn:
                session.conn = conn
                slot.authenticated()
                while True:
                    incoming = await conn.accept_stream()
                    await session.on_stream(incoming)
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await session.close()

    # ------------------------------------------------------------------
    # Guests

    def domain(self, name: object) -> Domain:
        validate_name(name)
        assert isinstance(name, str)
        domain = self.domains.get(name)
        if domain is None:
            raise DaemonError(f"domain {name!r} is not defined")
        return domain

    async def start_guest(self, domain: Domain, *, paused: bool = False, incoming: bool = False) -> None:
        if domain.process is not None:
            raise DaemonError(f"domain {domain.name!r} is already running")
        assert self._nursery is not None
        if domain.is_image:
            if incoming:
                return  # the image writer creates it; finish starts the guest
            domain.process = await ImageGuest.start(
                domain.definition["image"],
                images_dir=self.store.images_dir,
                name=domain.name,
                paused=paused,
                nursery=self._nursery,
                create=True,
            )
            self.log(f"started memory-image guest {domain.name}{' (paused)' if paused else ''}")
            return
        log_path = os.path.join(self.store.run_dir, f"{domain.name}.log")
        try:
            process = await QemuProcess.start(
                domain.definition["qemu"],
                run_dir=self.store.run_dir,
                name=domain.name,
                incoming=incoming,
                paused=paused,
                log_path=log_path,
            )
        except (OSError, QemuError) as exc:
            raise DaemonError(f"cannot start domain {domain.name!r}: {exc}") from None
        domain.process = process
        self._nursery.start_soon(self._watch, domain, process)
        self.log(f"started {domain.name} (pid {process.pid}{', incoming' if incoming else ''}{', paused' if paused else ''})")

    async def start_incoming_image(self, domain: Domain, *, running: bool) -> None:
        """After a memory-image migration committed: run the guest on the new image."""
        assert self._nursery is not None
        domain.process = await ImageGuest.start(
            domain.definition["image"],
            images_dir=self.store.images_dir,
            name=domain.name,
            paused=not running,
            nursery=self._nursery,
            create=False,
        )

    async def _watch(self, domain: Domain, process: QemuProcess) -> None:
        with trio.CancelScope() as scope:
            domain.watcher = scope
            code = await process.wait()
            if domain.process is process:
                domain.process = None
                self.log(f"{domain.name}: QEMU exited with status {code}")

    async def stop_guest(self, domain: Domain, *, reason: str) -> None:
        process = domain.process
        if process is None:
            return
        domain.process = None
        if domain.watcher is not None:
            domain.watcher.cancel()
            domain.watcher = None
            await trio.lowlevel.checkpoint()  # let the watcher leave process.wait()
        await process.stop()
        self.log(f"stopped {domain.name} ({reason})")

    def parse_peer_uri(self, text: str) -> URI:
        try:
            uri = parse_uri(text)
        except URIError as exc:
            raise DaemonError(str(exc)) from None
        if uri.scheme == "tls" and self.tls is None:
            raise DaemonError(f"cannot migrate to {uri}: this daemon has no TLS identity (--tls-cert, --tls-key, --tls-ca)")
        return uri

    def authorized(self, identity: Identity) -> bool:
        kind = {"tcp": "addr"}.get(identity.kind, identity.kind)
        value = identity.value.rsplit(":", 1)[0] if identity.kind == "tcp" else identity.value
        return (kind, value) in self.allow


class Session:
    """One connection to the daemon, from a client or a peer daemon."""

    def __init__(self, daemon: Daemon, identity: Identity, sockname: Any) -> None:
        self.daemon = daemon
        self.identity = identity
        self.sockname = sockname
        self.conn: TunnelConnection | None = None
        self.prepared: dict[bytes, Incoming] = {}

    def handlers(self) -> dict[tuple[int, int], Handler]:
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
        }
        return {(PROGRAM, int(proc)): json_handler(fn) for proc, fn in table.items()}

    # ------------------------------------------------------------------
    # Domain management

    async def define(self, request: JSON) -> JSON:
        definition = validate_definition(field(request, "definition", dict))
        daemon = self.daemon
        existing = daemon.domains.get(definition["name"])
        if existing is not None and existing.process is not None:
            raise DaemonError(f"domain {definition['name']!r} is running; it cannot be redefined until it stops")
        daemon.store.save(definition)
        if existing is not None:
            existing.definition = definition
            existing.persistent = True
        else:
            daemon.domains[definition["name"]] = Domain(definition, daemon.store.run_dir)
        daemon.log(f"defined {definition['name']}")
        return {"name": definition["name"], "replaced": existing is not None}

    async def undefine(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        if domain.process is not None:
            raise DaemonError(f"domain {domain.name!r} is running; stop it first")
        self.daemon.store.remove(domain.name)
        del self.daemon.domains[domain.name]
        self.daemon.log(f"undefined {domain.name}")
        return {}

    async def start(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        await self.daemon.start_guest(domain, paused=field(request, "paused", bool, False))
        return {"state": await domain.state()}

    async def destroy(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        if domain.process is None:
            raise DaemonError(f"domain {domain.name!r} is not running")
        if domain.job is not None:
            raise DaemonError(f"domain {domain.name!r} is migrating; abort the job first")
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
        return {"domains": rows}

    async def domain_info(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        return {"name": domain.name, "state": await domain.state(), "definition": domain.definition}

    async def monitor(self, request: JSON) -> JSON:
        domain = self.daemon.domain(request.get("name"))
        command = field(request, "command", dict)
        execute = command.get("execute")
        if not isinstance(execute, str):
            raise DaemonError('bad QMP command: it must be a JSON object with "execute", as in {"execute": "query-status"}')
        if execute in ("getfd", "closefd", "add-fd", "remove-fd"):
            raise DaemonError(f"QMP command {execute!r} passes file descriptors and is not available here")
        qemu = domain.qemu()
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
        p2p = field(request, "p2p", bool, False)
        tunnelled = field(request, "tunnelled", bool, False)
        if tunnelled and not p2p:
            raise DaemonError("cannot perform tunnelled migration without using peer2peer flag")
        direct_uri = None
        if not p2p:
            # Client-driven: the client prepared the destination and passes its QEMU endpoint.
            direct_uri = field(request, "uri", str, None)
            if direct_uri is None or not direct_uri.startswith(("unix:", "tcp:")):
                raise DaemonError("without --p2p the client drives the migration: it must pass the destination's 'uri'")
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
            raise DaemonError(f"domain {domain.name!r} is a memory-image guest: it migrates only --tunnelled")
        if domain.job is not None:
            raise DaemonError(f"domain {domain.name!r} already has a migration job")
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
        )
        domain.job = domain.last_job = job
        assert daemon._nursery is not None
        daemon._nursery.start_soon(job.run)
        mode = "tunnelled p2p" if tunnelled else "native p2p" if p2p else "native, driven by the client"
        daemon.log(f"migrating {domain.name} to {dest} ({mode})")
        await job.done.wait()
        info = await job.info()
        if job.state != ("completed" if p2p else "performed"):
            raise DaemonError(f"migration of {domain.name!r} {job.state}: {job.error}")
        info.update(job.summary)
        return info

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
        domain = self.daemon.domain(request.get("name"))
        job = domain.job or domain.last_job
        if job is None:
            return {"domain": domain.name, "status": "none"}
        return await job.info()

    async def abort(self, request: JSON) -> JSON:
        job = self._job(request)
        job.abort()
        with trio.move_on_after(30):
            await job.done.wait()
        return {"status": job.state}

    async def set_speed(self, request: JSON) -> JSON:
        mib = field(request, "bandwidth_mib", int)
        if mib < 0:
            raise DaemonError("the bandwidth must be >= 0 MiB/s (0 for no limit)")
        job = self._job(request)
        try:
            await job.set_speed(mib)
        except QMPError as exc:
            raise DaemonError(f"cannot change the speed: {exc}") from None
        return {"bandwidth_mib": mib}

    # ------------------------------------------------------------------
    # Incoming migrations, on the destination

    async def prepare(self, request: JSON) -> JSON:
        daemon = self.daemon
        if not daemon.authorized(self.identity):
            daemon.log(f"refused a migration from {self.identity}: not on the allow list")
            raise DaemonError(f"the destination refuses migrations from {self.identity}: not on its allow list (--allow-peer)")
        definition = validate_definition(field(request, "definition", dict))
        try:
            migration_id = bytes.fromhex(field(request, "migration_id", str))
        except ValueError:
            raise DaemonError("malformed request: bad migration_id") from None
        if len(migration_id) != 16 or migration_id in daemon.incoming:
            raise DaemonError("malformed request: bad or duplicate migration_id")
        name = definition["name"]
        existing = daemon.domains.get(name)
        if existing is not None and (existing.process is not None or existing.incoming is not None):
            raise DaemonError(f"domain {name!r} already exists and is active on the destination")
        domain = Domain(definition, daemon.store.run_dir)
        domain.persistent = False  # becomes persistent once finish succeeds
        tunnelled = field(request, "tunnelled", bool, False)
        if domain.is_image and not tunnelled:
            raise DaemonError("a memory-image guest migrates only tunnelled")
        incoming = Incoming(
            domain,
            migration_id,
            tunnelled=tunnelled,
            running=field(request, "running", bool, False),
            verify=field(request, "verify", bool, False),
        )
        incoming.previous = existing
        domain.incoming = incoming
        daemon.domains[name] = domain
        try:
            await daemon.start_guest(domain, incoming=True)
            reply = await incoming.prepare(self.sockname, images_dir=daemon.store.images_dir)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(incoming)
            raise
        self.prepared[migration_id] = incoming
        daemon.incoming[migration_id] = incoming
        daemon.log(f"prepared incoming {name} from {self.identity}")
        return reply

    async def on_stream(self, stream: TunnelStream) -> None:
        incoming = self.prepared.get(stream.migration_id)
        if incoming is None or not incoming.tunnelled or incoming.stream_seen.is_set():
            await stream.abort(reason="no prepared tunnelled migration with this id on this connection")
            return
        assert self.daemon._nursery is not None
        self.daemon._nursery.start_soon(incoming.pump, stream)

    async def finish(self, request: JSON) -> JSON:
        try:
            migration_id = bytes.fromhex(field(request, "migration_id", str))
        except ValueError:
            raise DaemonError("malformed request: bad migration_id") from None
        incoming = self.prepared.pop(migration_id, None)
        if incoming is None:
            raise DaemonError("no prepared migration with this id on this connection")
        self.daemon.incoming.pop(migration_id, None)
        domain = incoming.domain
        if not field(request, "ok", bool):
            await self._discard(incoming)
            return {}
        try:
            state = await incoming.finish(self.daemon)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(incoming)
            raise
        domain.incoming = None
        domain.persistent = True
        self.daemon.store.save(domain.definition)
        self.daemon.log(f"incoming {domain.name} complete: {state}")
        reply: JSON = {"state": state}
        if incoming.image_sha256 is not None:
            reply["image_sha256"] = incoming.image_sha256
        return reply

    async def _discard(self, incoming: Incoming) -> None:
        """Throw away a prepared destination: no QEMU left, nothing that looks complete.

        A definition the destination had before (of a guest that was not
        running) comes back as it was; otherwise the name disappears.
        """
        domain = incoming.domain
        if incoming.sock is not None:
            incoming.sock.close()
        if incoming.writer is not None and not incoming.writer.committed:
            await incoming.writer.abort("the incoming migration was discarded")
        await self.daemon.stop_guest(domain, reason="incoming migration discarded")
        domain.incoming = None
        if self.daemon.domains.get(domain.name) is domain:
            if incoming.previous is not None:
                self.daemon.domains[domain.name] = incoming.previous
            else:
                del self.daemon.domains[domain.name]
        self.daemon.log(f"discarded incoming {domain.name}")

    async def close(self) -> None:
        for migration_id, incoming in list(self.prepared.items()):
            self.daemon.incoming.pop(migration_id, None)
            await self._discard(incoming)
        self.prepared.clear()
