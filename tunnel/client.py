"""Python client of the reference daemon, the API under the ``tunnel`` CLI.

    async with tunnel.client.connect("unix:///run/tunnel/src.sock") as c:
        await c.define({"name": "vm1", "qemu": [...]})
        await c.start("vm1")
        summary = await c.migrate("vm1", "unix:///run/tunnel/dst.sock", p2p=True, tunnelled=True, live=True)

Every failure the operator should read arrives as :class:`DaemonError`
with a one-line message.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import RPCError, TunnelError
from .control import PROGRAM, VERSION, DaemonError, Procedure, TLSFiles, URIError, decode, encode, error_of, parse_uri
from .control import connect as _connect
from .transport import TunnelConnection, open_connection

__all__ = ["Client", "DaemonError", "connect"]

JSON = dict[str, Any]


class Client:
    """Calls on one daemon connection; several may run at once (e.g. ``migrate`` and ``jobinfo``)."""

    def __init__(self, conn: TunnelConnection, uri: str, tls: TLSFiles | None = None) -> None:
        self._conn = conn
        self.uri = uri
        self._tls = tls

    async def _call(self, procedure: Procedure, request: JSON) -> JSON:
        try:
            return decode(await self._conn.call(PROGRAM, procedure, encode(request), version=VERSION))
        except RPCError as exc:
            raise error_of(exc) from None
        except (TunnelError, trio.BrokenResourceError) as exc:
            raise DaemonError(f"lost the connection to {self.uri}: {exc}") from None

    async def define(self, definition: JSON) -> JSON:
        return await self._call(Procedure.DEFINE, {"definition": definition})

    async def undefine(self, name: str) -> None:
        await self._call(Procedure.UNDEFINE, {"name": name})

    async def start(self, name: str, *, paused: bool = False, force: bool = False) -> str:
        state: str = (await self._call(Procedure.START, {"name": name, "paused": paused, "force": force}))["state"]
        return state

    async def destroy(self, name: str) -> None:
        await self._call(Procedure.DESTROY, {"name": name})

    async def list(self) -> list[JSON]:
        domains: list[JSON] = (await self._call(Procedure.LIST, {}))["domains"]
        return domains

    async def domain_info(self, name: str) -> JSON:
        return await self._call(Procedure.DOMAIN_INFO, {"name": name})

    async def migrate(
        self,
        name: str,
        destination: str,
        *,
        live: bool = False,
        p2p: bool = False,
        tunnelled: bool = False,
        bandwidth_mib: int = 0,
        dname: str | None = None,
        verify: bool = False,
        persistent: bool = False,
        undefine_source: bool = False,
        detach: bool = False,
        timeout_s: float = 0,
        timeout_action: str = "suspend",
        auto_converge: bool = False,
        compressed: bool = False,
        comp_methods: Sequence[str] | None = None,
        abort_on_error: bool = False,
        postcopy: bool = False,
        postcopy_after_precopy: bool = False,
        retries: int = 0,
        postcopy_bandwidth_mib: int = 0,
    ) -> JSON:
        """Run the migration to completion; returns the job's final statistics.

        *verify* (memory-image guests): both daemons digest the image at the
        switch-over and report ``source_image_sha256`` / ``destination_image_sha256``.
        *persistent*: the destination keeps the definition (else it is
        transient there, gone when the guest stops); *undefine_source*: the
        source forgets it (else it keeps it, marked as migrated away).
        *detach* (PEER2PEER only): return once the job started, as virsh's ``--async``.
        virsh's other flags: *timeout_s* with *timeout_action* ``suspend`` (pause the guest once
        the transfer ran that long), *auto_converge* (QEMU's capability), *compressed* with
        *comp_methods* (``xbzrle`` for QEMU guests, ``zstd`` for memory-image guests) and
        *abort_on_error* (cancel when the guest stops on an I/O error).
        *postcopy* (PEER2PEER, live): allow switching to post-copy (:meth:`migrate_postcopy`);
        *postcopy_after_precopy*: switch after the first pass; *retries*: automatic
        attempts to resume a post-copy migration after its connection broke;
        *postcopy_bandwidth_mib*: QEMU's cap once in post-copy (0: none).
        """
        options: JSON = {"timeout_s": timeout_s, "timeout_action": timeout_action, "auto_converge": auto_converge,
                         "compressed": compressed, "abort_on_error": abort_on_error}
        if comp_methods is not None:
            options["comp_methods"] = list(comp_methods)
        if tunnelled and not p2p:
            raise DaemonError("cannot perform tunnelled migration without using peer2peer flag")
        if (postcopy or postcopy_after_precopy) and not p2p:
            raise DaemonError("post-copy needs --p2p: the source daemon must see it through, including a resume")
        if not p2p:
            if detach:
                raise DaemonError("--detach needs --p2p: without it this client drives the migration and must stay")
            return await self._migrate_managed(
                name, destination, live=live, bandwidth_mib=bandwidth_mib, dname=dname, persistent=persistent,
                undefine_source=undefine_source, options=options,
            )
        request: JSON = {
            "name": name,
            "destination": destination,
            "live": live,
            "p2p": p2p,
            "tunnelled": tunnelled,
            "bandwidth_mib": bandwidth_mib,
            "persistent": persistent,
            "undefine_source": undefine_source,
            "detach": detach,
            **options,
        }
        if dname is not None:
            request["dname"] = dname
        if verify:
            request["verify"] = True
        if postcopy or postcopy_after_precopy:
            request.update(postcopy=postcopy, postcopy_after_precopy=postcopy_after_precopy, retries=retries,
                           postcopy_bandwidth_mib=postcopy_bandwidth_mib)
        return await self._call(Procedure.MIGRATE, request)

    async def migrate_postcopy(self, name: str) -> JSON:
        """Switch the running migration of *name* (started with ``postcopy``) to post-copy; returns ``status`` and ``phase``."""
        return await self._call(Procedure.MIGRATE_POSTCOPY, {"name": name})

    async def postcopy_resume(self, name: str, destination: str) -> JSON:
        """Resume a post-copy migration paused by a broken connection, over a new one to *destination*; returns as :meth:`migrate`."""
        return await self._call(Procedure.MIGRATE, {"name": name, "destination": destination, "postcopy_resume": True})

    async def _migrate_managed(
        self, name: str, destination: str, *, live: bool, bandwidth_mib: int, dname: str | None, persistent: bool, undefine_source: bool,
        options: JSON,
    ) -> JSON:
        """Without PEER2PEER the client drives: begin and perform on the source, prepare and finish on
        the destination (which authorizes the client's own identity), then confirm on the source."""
        info = await self.domain_info(name)
        definition = dict(info["definition"])
        if dname is not None:
            definition["name"] = dname
        if info["state"] not in ("running", "paused"):
            raise DaemonError(f"domain {name!r} is not running")
        migration_id = uuid.uuid4().hex
        async with connect(destination, tls=self._tls) as dest:
            prepared = await dest._call(
                Procedure.PREPARE,
                {"definition": definition, "migration_id": migration_id, "tunnelled": False, "live": live,
                 "running": info["state"] == "running", "persistent": persistent},
            )
            performed = False
            try:
                result = await self._call(
                    Procedure.MIGRATE,
                    {"name": name, "destination": destination, "uri": prepared["uri"], "tls": bool(prepared.get("tls")),
                     "live": live, "bandwidth_mib": bandwidth_mib, "p2p": False, "undefine_source": undefine_source, **options},
                )
                performed = True
                finished = await dest._call(Procedure.FINISH, {"migration_id": migration_id, "ok": True})
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(15):
                    try:
                        await dest._call(Procedure.FINISH, {"migration_id": migration_id, "ok": False})
                    except DaemonError:
                        pass
                    if performed:  # the source guest waits paused for our word: resume it
                        await self._call(Procedure.CONFIRM, {"name": name, "ok": False})
                raise
        await self._call(Procedure.CONFIRM, {"name": name, "ok": True})
        result.update(status="completed", destination_state=finished.get("state"), destination_name=definition["name"])
        return result

    async def jobinfo(self, name: str, *, completed: bool = False) -> JSON:
        """The current (or last) migration job's statistics; *completed*: the last job that completed, kept after it."""
        return await self._call(Procedure.JOBINFO, {"name": name, "completed": completed})

    async def suspend(self, name: str) -> str:
        state: str = (await self._call(Procedure.SUSPEND, {"name": name}))["state"]
        return state

    async def resume(self, name: str) -> str:
        state: str = (await self._call(Procedure.RESUME, {"name": name}))["state"]
        return state

    async def shutdown(self, name: str, *, timeout_s: float = 60.0) -> str:
        """ACPI power-down, destroyed if still running after *timeout_s*; returns how it ended (``powered off``, ``destroyed``, ``stopped``)."""
        how: str = (await self._call(Procedure.SHUTDOWN, {"name": name, "timeout_s": timeout_s}))["how"]
        return how

    async def reboot(self, name: str) -> None:
        await self._call(Procedure.REBOOT, {"name": name})

    async def abort(self, name: str) -> JSON:
        """Cancel the migration job of *name*; returns ``status`` and ``where`` the guest runs, once the source guest runs again."""
        return await self._call(Procedure.ABORT, {"name": name})

    async def set_speed(self, name: str, mib_per_s: int) -> None:
        await self._call(Procedure.SET_SPEED, {"name": name, "bandwidth_mib": mib_per_s})

    async def monitor(self, name: str, command: JSON) -> JSON:
        """One QMP command on the guest's QEMU; returns ``{"return": ...}`` or ``{"error": ...}``."""
        return await self._call(Procedure.MONITOR, {"name": name, "command": command})


@asynccontextmanager
async def connect(uri: str, *, tls: TLSFiles | None = None) -> AsyncIterator[Client]:
    """A :class:`Client` of the daemon at *uri* for the body of the ``async with``."""
    try:
        parsed = parse_uri(uri)
    except URIError as exc:
        raise DaemonError(str(exc)) from None
    stream = await _connect(parsed, tls)
    try:
        async with open_connection(stream, client=True) as conn:
            yield Client(conn, uri, tls)
    except (TunnelError, trio.BrokenResourceError) as exc:
        raise DaemonError(f"lost the connection to {uri}: {exc}") from None
