"""The reference migration daemon: domains, QEMU supervision, listeners.

Every connection, from a client or from another daemon, is a tunnel
connection served by a :class:`~._session.Session`: RPC calls go as tunnel
calls of :data:`PROGRAM`, and the migration streams of TUNNELLED migrations
arrive on the same connection as the calls that prepared them.  Jobs
(migrations) run in the daemon's own nursery, so they survive the client
that started them.

Guests outlive the daemon.  Each QEMU runs in its own session, sandboxed,
in its guest directory (``STATE_DIR/run/NAME``) beside a ``domain.json``
record; when the daemon stops it cancels the migrations still transferring
(their guests resume where they were), lets those past the point of no
return finish, and detaches from its guests.  The next daemon reattaches to
every QEMU it finds and settles what a migration left half-done
(:mod:`._recovery`); a migration past the switch to post-copy is kept on
both sides, paused, to be resumed (:mod:`._postcopy`).  ``shutdown_guests_on_exit`` restores the old
behaviour of stopping guests with the daemon.  Memory-image guests are
simulations inside the daemon and stop with it.
"""

from __future__ import annotations

import os
import pwd
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .. import TunnelError
from ..control import URI, DaemonError, TLSFiles, URIError, parse_uri
from ..qemu import POSTCOPY_STATES, QemuError, QemuGone, QemuProcess, QMPError, query_migration, run_state
from ..transport import open_connection
from ._access import AccessPolicy, Listener, Role, describe, parse_entry
from ._domains import DomainStore, validate_definition, validate_name
from ._imageguest import ImageGuest
from ._incoming import Incoming
from ._limits import ConnectionLimits, Slot
from ._log import LogSink, emit
from ._migration import domain_state
from ._net import Identity, accept_tls, listen, peer_identity
from ._qemuargs import check_qemu_args
from ._recovery import ACTIVE, cancel_and_resume, settle_source
from ._rpc import public_message
from ._session import Session
from ._source import SourceJob

__all__ = ["Daemon", "Domain", "parse_allow"]

JSON = dict[str, Any]
#: How often a source asks a destination that has not confirmed a migration.
SETTLE_INTERVAL = 2.0


def _address(raw: trio.SocketStream) -> str:
    """The peer's address for the log: host:port, or the socket path of a unix peer (usually empty)."""
    try:
        name = raw.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name) or "unix"


def parse_allow(entry: str) -> tuple[str, str]:
    """``cn:NAME``, ``uid:N`` or ``addr:HOST``, as ``--allow-peer`` takes them."""
    return parse_entry("--allow-peer", entry)


def host_memory_mib() -> int:
    """MemTotal: the default bound on a memory-image guest (its dirty bitmap and image scale with it)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 16384


class Domain:
    """A defined guest and, while it runs, its QEMU process and current job."""

    def __init__(self, definition: JSON, store: DomainStore, *, persistent: bool = True) -> None:
        self.definition = definition
        self.store = store
        self.process: QemuProcess | ImageGuest | None = None
        #: Cancels the task that notices QEMU exiting by itself (before the daemon stops it).
        self.watcher: trio.CancelScope | None = None
        self.job: SourceJob | None = None
        self.last_job: SourceJob | None = None
        self.incoming: Incoming | None = None
        #: The incoming migration that brought this guest here (JOBINFO on the destination).
        self.last_incoming: Incoming | None = None
        #: A transient domain (arrived by migration without --persistent) is forgotten when it stops.
        self.persistent = persistent
        #: Set while a start is under way, so a concurrent start cannot launch a second QEMU.
        self.starting = False
        #: The destination of a migration that completed here but that the destination has not confirmed:
        #: the guest stays paused until it does.
        self.unconfirmed: str | None = None
        self.settling = False

    @property
    def name(self) -> str:
        name: str = self.definition["name"]
        return name

    @property
    def is_image(self) -> bool:
        return "image" in self.definition

    @property
    def guest_dir(self) -> str:
        return self.store.guest_dir(self.name)

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
        if self.unconfirmed is not None:
            return "migrated, unconfirmed"
        if self.job is not None and (not self.job.resolved.is_set() or (self.job.postcopy.active and not self.job.done.is_set())):
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
        listen: Sequence[str],
        listen_ro: Sequence[str] = (),
        tls: TLSFiles | None = None,
        allow: Sequence[str] = (),
        allow_admin: Sequence[str] = (),
        allow_ro: Sequence[str] = (),
        socket_mode: int = 0o600,
        socket_group: int | None = None,
        max_image_mib: int | None = None,
        allow_paths: Sequence[str] = (),
        allow_unsafe_monitor: bool = False,
        qemu_user: str | None = None,
        shutdown_guests_on_exit: bool = False,
        insecure: bool = False,
        postcopy_preempt: bool = True,
        log: Callable[[str], None] | LogSink | None = None,
        max_clients: int = 5000,
        max_anonymous_clients: int = 20,
    ) -> None:
        self.store = DomainStore(state_dir)
        self.listen_uris = [parse_uri(u) for u in listen]
        self.listen_ro_uris = [parse_uri(u) for u in listen_ro]
        if not self.listen_uris and not self.listen_ro_uris:
            raise DaemonError("nothing to listen on: give at least one --listen URI")
        for uri in self.listen_uris:
            if uri.scheme == "tls" and tls is None:
                raise DaemonError(f"cannot listen on {uri}: TLS needs --tls-cert, --tls-key and --tls-ca")
            if uri.scheme == "tcp" and not insecure:
                raise DaemonError(f"refusing to listen on {uri} without TLS: use tls://, or pass --insecure to accept that risk")
        for uri in self.listen_ro_uris:
            if uri.scheme != "unix":
                raise DaemonError(f"bad --listen-ro {uri}: the read-only socket is a unix socket (use --allow-ro for TLS clients)")
        if socket_mode & ~0o777:
            raise DaemonError(f"bad --socket-mode {socket_mode:o}: use permission bits such as 600 or 660")
        for path in allow_paths:
            if not os.path.isabs(path) or not os.path.isdir(path):
                raise DaemonError(f"bad --allow-path {path!r}: it must be an absolute path to a directory")
        self.allow_paths = [os.path.realpath(p) for p in allow_paths]
        self.allow_unsafe_monitor = allow_unsafe_monitor
        self.qemu_user = qemu_user
        self.qemu_uid: int | None = None
        if qemu_user is not None:
            try:
                self.qemu_uid = pwd.getpwnam(qemu_user).pw_uid
            except KeyError:
                raise DaemonError(f"bad --qemu-user {qemu_user!r}: no such user") from None
            if os.getuid() != 0:
                raise DaemonError("--qemu-user needs the daemon to run as root (it switches QEMU to that user)")
        self.shutdown_guests_on_exit = shutdown_guests_on_exit
        self.socket_mode = socket_mode
        self.max_image_mib = max_image_mib if max_image_mib is not None else host_memory_mib()
        self.socket_group = socket_group
        self.tls = tls
        self.access = AccessPolicy(admins=allow_admin, peers=allow, read_only=allow_ro)
        self.insecure = insecure
        #: Tunnelled post-copy asks for QEMU's preempt channel (a second stream; see _qemusock).
        self.postcopy_preempt = postcopy_preempt
        self._log: Callable[[str], None] | LogSink = log or (lambda line: None)
        if self.qemu_uid is not None:
            # QEMU, as that user, must reach its own guest directory (which it owns) below these.
            for path in (self.store.state_dir, self.store.run_dir):
                os.chmod(path, 0o711)
        self.limits = ConnectionLimits(max_clients=max_clients, max_anonymous_clients=max_anonymous_clients)
        self.domains: dict[str, Domain] = {name: Domain(definition, self.store) for name, definition in self.store.load_all().items()}
        self.incoming: dict[bytes, Incoming] = {}
        #: Statistics of each domain's last completed migration job, either direction (JOBINFO ``completed``).
        self.completed_jobs: dict[str, JSON] = {}
        self._nursery: trio.Nursery | None = None
        self._server_context = tls.server_context() if tls is not None else None
        self._unix_paths: list[str] = []
        self._serving = False

    def log(self, line: str, level: str = "info", **fields: Any) -> None:
        """One log line at *level* (debug, info, warning, error); *fields* go to structured sinks."""
        emit(self._log, level, line, fields)

    def public(self, exc: BaseException) -> str:
        """*exc* as a client may read it (see :func:`public_message`)."""
        return public_message(exc, hide=(self.store.state_dir,))

    def check_definition(self, obj: object) -> JSON:
        """A definition from a client (define) or a source daemon (prepare), checked against this daemon's rules."""
        definition = validate_definition(obj)
        if "image" in definition:
            size = definition["image"]["size_mib"]
            if size > self.max_image_mib:
                raise DaemonError(
                    f"bad definition: image size_mib {size} is above this daemon's limit of {self.max_image_mib} MiB (--max-image-mib)"
                )
        else:
            definition["qemu"] = self.check_args(definition["name"], definition["qemu"])
        return definition

    def new_domain(self, definition: JSON, *, persistent: bool = True) -> Domain:
        return Domain(definition, self.store, persistent=persistent)

    def check_args(self, name: str, args: list[str]) -> list[str]:
        return check_qemu_args(args, run_dir=self.store.guest_dir(name), allowed_dirs=self.allow_paths)

    # ------------------------------------------------------------------
    # Running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; on the way out settle jobs, leave (or stop) the guests and remove the sockets."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._reattach_all()
                for uri, read_only in [(u, False) for u in self.listen_uris] + [(u, True) for u in self.listen_ro_uris]:
                    if read_only:
                        listeners = await listen(uri, mode=0o666)
                    else:
                        listeners = await listen(uri, mode=self.socket_mode, group=self.socket_group)
                    if uri.scheme == "unix":
                        self._unix_paths.append(uri.path)
                    if uri.scheme == "tcp":
                        self.log(f"listening on {uri} without TLS (--insecure): anyone who can reach it can migrate into this daemon", "warning")
                    place = Listener(scheme=uri.scheme, read_only=read_only)
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, uri, place)
                    self.log(f"listening on {uri}{' (read-only)' if read_only else ''}")
                self._serving = True
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _shutdown(self) -> None:
        # Jobs and incoming migrations were cancelled with the nursery: their guests already run where they were.
        for domain in list(self.domains.values()):
            if domain.process is None:
                continue
            if self.shutdown_guests_on_exit or isinstance(domain.process, ImageGuest):
                await self.stop_guest(domain, reason="daemon shutting down")
            else:
                await self._detach(domain)
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self._serving:  # a daemon that never served says only why it could not start (its caller's error)
            self.log("stopped")

    async def _accept_loop(self, listener: trio.SocketListener, uri: URI, place: Listener) -> None:
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
                self._nursery.start_soon(self._serve, stream, uri, place, slot)

    async def _serve(self, raw: trio.SocketStream, uri: URI, place: Listener, slot: Slot) -> None:
        try:
            with slot:
                await self._serve_connection(raw, uri, place, slot)
        except Exception as exc:  # noqa: BLE001 - a bug: drop this connection, keep the daemon serving
            self.log(f"internal error on a connection from {uri}: " + "".join(traceback.format_exception(exc)).rstrip())
            await trio.aclose_forcefully(raw)

    async def _serve_connection(self, raw: trio.SocketStream, uri: URI, place: Listener, slot: Slot) -> None:
        stream: trio.abc.Stream = raw
        if uri.scheme == "tls":
            assert self._server_context is not None
            failure: list[str] = []
            peer = _address(raw)  # now: a failed handshake closes the socket
            tls_stream = await accept_tls(raw, self._server_context, failure=failure)
            if tls_stream is None:
                self.log(f"{uri}: TLS handshake with {peer} failed: {failure[0] if failure else 'unknown reason'}", "warning",
                         peer_address=peer, reason=failure[0] if failure else None)
                return
            stream = tls_stream
        identity = peer_identity(stream)
        roles = self.roles_of(identity, place)
        session = Session(self, identity, raw.socket.getsockname(), roles, scheme=uri.scheme)
        self.log(f"connection from {identity} on {uri}: {describe(roles)}", peer=str(identity), address=_address(raw),
                 roles=describe(roles))
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
            self.log(f"connection from {identity} closed", "debug", peer=str(identity))

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
        if domain.starting:
            raise DaemonError(f"domain {domain.name!r} is already starting")
        if domain.process is not None:
            raise DaemonError(f"domain {domain.name!r} is already running")
        domain.starting = True
        try:
            await self._start_guest(domain, paused=paused, incoming=incoming)
        finally:
            domain.starting = False

    async def _start_guest(self, domain: Domain, *, paused: bool, incoming: bool) -> None:
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
                on_io_error=self._image_io_error(domain),
            )
            self.log(f"started memory-image guest {domain.name}{' (paused)' if paused else ''}")
            return
        # Checked again now: a definition on disk may predate the rules, and a symlink may have moved since define.
        args = self.check_args(domain.name, domain.definition["qemu"])
        await self.store.set_runtime(domain.name, "domain", {"definition": domain.definition, "persistent": domain.persistent})
        try:
            process = await QemuProcess.start(
                args, guest_dir=domain.guest_dir, name=domain.name, incoming=incoming, paused=paused, user=self.qemu_user
            )
        except (OSError, QemuError) as exc:
            self.log(f"cannot start {domain.name}: {' '.join(str(exc).split())}", "error", domain=domain.name)
            await self.store.clear_guest_dir(domain.name)
            raise DaemonError(f"cannot start domain {domain.name!r}: {self.public(exc)}") from None
        self._adopt(domain, process)
        self.log(f"started {domain.name} (pid {process.pid}{', incoming' if incoming else ''}{', paused' if paused else ''})")

    def _adopt(self, domain: Domain, process: QemuProcess) -> None:
        assert self._nursery is not None
        domain.process = process
        self._nursery.start_soon(self._watch, domain, process)

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
            on_io_error=self._image_io_error(domain),
        )

    def _image_io_error(self, domain: Domain) -> Callable[[OSError], None]:
        def paused(exc: OSError) -> None:
            self.log(f"{domain.name}: paused: its memory image cannot be written: {exc.strerror or exc}; `resume` retries",
                     "error", domain=domain.name)
        return paused

    async def _watch(self, domain: Domain, process: QemuProcess) -> None:
        with trio.CancelScope() as scope:
            domain.watcher = scope
            try:
                code = await process.wait()
            except QemuError:
                return  # detached
            if domain.process is process:
                domain.process = None
                if domain.incoming is not None:
                    # A dead incoming QEMU can load nothing: fail the stream now, so the source resumes at once
                    # instead of pumping into a socket nobody reads (a spliced receive may never notice).
                    await domain.incoming.discard()
                lines = [line for line in process.log_tail().splitlines() if line.strip()]
                await process.stop()  # closes our handles, removes the socket and pidfile
                await self.store.clear_guest_dir(domain.name)
                failed = code not in (0, None)
                self.log(f"{domain.name}: QEMU exited" + (f" with status {code}" if code is not None else "")
                         + (f": {lines[-1].strip()}" if failed and lines else ""),
                         "warning" if failed else "info", domain=domain.name, exit_status=code)
                self._forget_if_transient(domain)

    async def _unwatch(self, domain: Domain) -> None:
        if domain.watcher is not None:
            domain.watcher.cancel()
            domain.watcher = None
            await trio.lowlevel.checkpoint()  # let the watcher leave process.wait()

    async def stop_guest(self, domain: Domain, *, reason: str) -> None:
        process = domain.process
        if process is None:
            return
        domain.process = None
        await self._unwatch(domain)
        await process.stop()
        if isinstance(process, QemuProcess):
            await self.store.clear_guest_dir(domain.name)
        self.log(f"stopped {domain.name} ({reason})", domain=domain.name)
        self._forget_if_transient(domain)

    async def _detach(self, domain: Domain) -> None:
        """Leave the guest running without us (daemon exit); the next daemon reattaches."""
        process = domain.process
        assert isinstance(process, QemuProcess)
        domain.process = None
        await self._unwatch(domain)
        await process.detach()
        self.log(f"left {domain.name} running (pid {process.pid})")

    def _forget_if_transient(self, domain: Domain) -> None:
        if not domain.persistent and domain.incoming is None and self.domains.get(domain.name) is domain:
            del self.domains[domain.name]

    def where_is(self, domain: Domain) -> str:
        """One phrase for logs and clients: where the guest runs after a migration ended."""
        if domain.unconfirmed is not None:
            return f"the guest is paused here until {domain.unconfirmed} confirms"
        if domain.job is not None and domain.job.postcopy.active and not domain.job.done.is_set():
            return f"the guest runs on {domain.job.dest} (post-copy) with part of its memory still here"
        if domain.process is not None:
            return "the guest runs here"
        marker = self.store.migrated(domain.name)
        if marker is not None:
            return f"the guest runs on {marker['destination']}"
        return "the guest is not running here"

    async def migrated_away(self, domain: Domain, *, destination: str, migration_id: str, undefine: bool) -> None:
        """The destination runs the guest now: stop our copy and remember where it went (or forget it)."""
        domain.unconfirmed = None
        await self.stop_guest(domain, reason=f"migrated to {destination}")
        if undefine or not domain.persistent:
            await self.store.remove(domain.name)
            await self.store.set_migrated(domain.name, None)
            if self.domains.get(domain.name) is domain:
                del self.domains[domain.name]
        else:
            await self.store.set_migrated(domain.name, {"destination": destination, "migration_id": migration_id, "at": time.time()})

    def settle_later(self, domain: Domain, *, destination: str, migration_id: str, was_running: bool) -> None:
        """Keep asking *destination* how the migration ended until it answers; the guest stays paused meanwhile."""
        domain.unconfirmed = destination
        if domain.settling or self._nursery is None:
            return
        domain.settling = True

        async def settle() -> None:
            try:
                while domain.unconfirmed is not None and domain.process is not None:
                    await trio.sleep(SETTLE_INTERVAL)
                    outcome = await settle_source(
                        self, domain, destination=destination, migration_id=migration_id, was_running=was_running
                    )
                    if outcome != "unconfirmed":
                        self.log(f"migration of {domain.name} to {destination} settled: {outcome}; {self.where_is(domain)}")
            finally:
                domain.settling = False

        self._nursery.start_soon(settle)

    # ------------------------------------------------------------------
    # Reattaching after a restart

    async def _reattach_all(self) -> None:
        for name in self.store.running_guests():
            try:
                await self._reattach(name)
            except (QemuError, QMPError, OSError, DaemonError) as exc:
                self.log(f"cannot reattach {name}: {exc}")

    async def _reattach(self, name: str) -> None:
        record = self.store.runtime(name, "domain")
        migration = self.store.runtime(name, "migration")
        try:
            process = await QemuProcess.attach(guest_dir=self.store.guest_dir(name), name=name)
        except QemuGone as exc:
            self.log(f"{name}: no QEMU to reattach ({exc})")
            if migration is not None and migration.get("role") == "destination":
                await self.store.set_outcome(migration["migration_id"], "discarded")
            await self.store.clear_guest_dir(name)
            return
        domain = self.domains.get(name)
        if domain is None:
            if record is None:
                self.log(f"{name}: a running QEMU without a definition; stopping it")
                await process.stop()
                await self.store.clear_guest_dir(name)
                return
            domain = Domain(validate_definition(record["definition"]), self.store, persistent=bool(record.get("persistent")))
            self.domains[name] = domain
        self._adopt(domain, process)
        self.log(f"reattached {name} (pid {process.pid})")
        if migration is None:
            return
        role, migration_id = migration.get("role"), str(migration.get("migration_id"))
        if migration.get("postcopy") and await self._reattach_postcopy(domain, process, migration):
            return
        if role == "destination":
            if self.store.outcome(migration_id) == "finished":
                if migration.get("running") and await run_state(process.qmp) != "running":
                    await process.qmp.execute("cont")
                await self.store.set_runtime(name, "migration", None)
                self.log(f"{name}: its incoming migration had finished; it stays here")
            else:
                await self.store.set_outcome(migration_id, "discarded")
                await self.stop_guest(domain, reason="an incoming migration that never finished")
            return
        # The source of a migration the previous daemon did not see through.
        destination, was_running = str(migration.get("destination")), bool(migration.get("was_running"))
        status = (await query_migration(process.qmp)).status
        if status in ACTIVE or status != "completed":
            await cancel_and_resume(process.qmp, was_running=was_running)
            await self.store.set_runtime(name, "migration", None)
            self.log(f"{name}: cancelled the migration to {destination} that the previous daemon left; {self.where_is(domain)}")
            return
        outcome = await settle_source(self, domain, destination=destination, migration_id=migration_id, was_running=was_running)
        if outcome == "unconfirmed":
            self.settle_later(domain, destination=destination, migration_id=migration_id, was_running=was_running)
        self.log(f"{name}: the migration to {destination} had completed in QEMU: {outcome}; {self.where_is(domain)}")

    async def _reattach_postcopy(self, domain: Domain, process: QemuProcess, migration: JSON) -> bool:
        """A migration the previous daemon left past the switch to post-copy: keep it, paused, to be resumed.

        Decided on QEMU's own state, never on the record alone: a source QEMU
        still in pre-copy is settled as any other (cancelled and resumed).
        """
        status = (await query_migration(process.qmp)).status
        migration_id = str(migration["migration_id"])
        if migration.get("role") == "destination":
            if status not in POSTCOPY_STATES:
                return False  # it completed (FINISH follows the usual path) or never switched
            incoming = Incoming(
                domain,
                bytes.fromhex(migration_id),
                tunnelled=bool(migration.get("tunnelled")),
                running=bool(migration.get("running")),
                persistent=domain.persistent,
                postcopy=True,
            )
            incoming.switched = True
            domain.incoming = incoming
            self.incoming[incoming.migration_id] = incoming
            self.log(f"{domain.name}: its incoming post-copy migration is {status}; kept, waiting for the source to resume it")
            return True
        if status not in POSTCOPY_STATES and status != "completed":
            return False
        assert self._nursery is not None
        job = SourceJob(
            self,
            domain,
            str(migration["destination"]),
            live=True,
            tunnelled=bool(migration.get("tunnelled")),
            bandwidth_mib=0,
            dname=migration.get("dest_name"),
            undefine_source=bool(migration.get("undefine_source")),
            postcopy=True,
            retries=int(migration.get("retries") or 0),
        )
        job.migration_id = bytes.fromhex(migration_id)
        job.was_running = bool(migration.get("was_running"))
        job.postcopy.switched = job.postcopy.active = True
        job.phase = "postcopy"
        job._note_break(DaemonError(f"the previous daemon stopped; QEMU is {status}"))
        domain.job = domain.last_job = job
        self._nursery.start_soon(job.run, process)
        self.log(f"{domain.name}: its post-copy migration to {job.dest} is {status}; kept, resuming it")
        return True

    def parse_peer_uri(self, text: str) -> URI:
        try:
            uri = parse_uri(text)
        except URIError as exc:
            raise DaemonError(str(exc)) from None
        if uri.scheme == "tls" and self.tls is None:
            raise DaemonError(f"cannot migrate to {uri}: this daemon has no TLS identity (--tls-cert, --tls-key, --tls-ca)")
        if uri.scheme == "tcp" and not self.insecure:
            raise DaemonError(f"refusing to migrate to {uri} without TLS: use tls://, or start this daemon with --insecure")
        return uri

    def roles_of(self, identity: Identity, place: Listener) -> frozenset[Role]:
        if identity.kind == "tcp":
            return self.access.roles("addr", identity.value.rsplit(":", 1)[0], place)
        return self.access.roles(identity.kind, identity.value, place)
