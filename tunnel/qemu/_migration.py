"""Migration helpers over a :class:`QMPClient`.

The calls a migration daemon makes, in order:

* source: :func:`set_capabilities` (optional), :func:`set_max_bandwidth`,
  then :func:`start_outgoing_fd` (the fd is passed with ``getfd`` and QEMU
  writes the stream to it) or :func:`start_outgoing_uri`;
* destination (started with ``-incoming defer``): the *same* capabilities,
  then :func:`start_incoming_fd` / :func:`start_incoming_uri`;
* both: :func:`wait_migration` until ``completed`` (or an error), then
  ``cont`` on the destination; :func:`cancel` aborts on the source.

Post-copy: both sides set :data:`POSTCOPY` (:func:`postcopy_capabilities`)
before the start; once pre-copy has run a while, :func:`start_postcopy` on
the source switches: the source stops its guest, sends the device state,
and the destination (``postcopy-active``) can run the guest (``cont``: it
was started with ``-S``) while its missing pages are requested over the
return path and sent ahead of the background copy.  From then on the only
copy of the guest that can run is the destination's: a cancel is refused by
QEMU.  If the channel breaks, both sides pause (``postcopy-paused``) with
their memory intact; :func:`recover_incoming_fd` on the destination and
then :func:`resume_outgoing_fd` on the source go on over a new channel
(``postcopy-recover``, then ``postcopy-active`` again).  With
``postcopy-preempt`` (on both sides, :func:`postcopy_capabilities`) the source sends the
pages the destination asks for on a second connection, so they do not
queue behind the background copy: QEMU 7.2 opens it at the switch (and again
after each resume), after the main one, to the same ``unix:``/``tcp:``
address, so it needs a socket URI on both sides (``fd:`` has one channel).
On the destination,
the ``postcopy-blocktime`` capability makes ``query-migrate`` report how
long the vCPUs waited for pages (:attr:`MigrationStatus.blocktime_ms`).

Capabilities that change the stream (``return-path``, ``postcopy-ram``,
``multifd``...) must be equal on both sides, and set before the migration
starts.  ``return-path`` needs a two-way channel: a socket (a socketpair
end passed as the fd works), never a pipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from ._errors import PostcopyError, QemuError, QMPError
from ._qmp import QMPClient

__all__ = [
    "ACTIVE_STATES",
    "POSTCOPY",
    "POSTCOPY_STATES",
    "MigrationError",
    "MigrationStatus",
    "cancel",
    "pause",
    "postcopy_capabilities",
    "query_capabilities",
    "query_migration",
    "query_parameters",
    "recover_incoming_fd",
    "recover_incoming_uri",
    "resume_outgoing_fd",
    "resume_outgoing_uri",
    "run_state",
    "set_capabilities",
    "set_max_bandwidth",
    "set_parameters",
    "set_tls",
    "start_incoming_fd",
    "start_incoming_uri",
    "start_outgoing_fd",
    "start_outgoing_uri",
    "start_postcopy",
    "wait_migration",
    "wait_run_state",
    "wait_status",
]

#: query-migrate states in which a migration is still under way.
ACTIVE_STATES = frozenset(
    {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling",
     "postcopy-active", "postcopy-paused", "postcopy-recover"}
)  # fmt: skip
#: States of a migration past the switch to post-copy: the guest can only run on the destination.
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: The capabilities of a post-copy capable migration, equal on both sides (post-copy needs the return path).
POSTCOPY = {"return-path": True, "postcopy-ram": True}
#: The fd name used when the caller does not give one.
DEFAULT_FD_NAME = "migrate"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationStatus:
    """A snapshot of ``query-migrate``; keys QEMU leaves out are None (times) or 0 (counters)."""

    status: str
    total_time_ms: int | None = None
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    #: RAM bytes sent so far (``ram.transferred``).
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    normal_bytes: int = 0
    #: Throughput QEMU measured over its last interval, in Mbit/s.
    mbps: float = 0.0
    #: Dirty-bitmap syncs, i.e. the iteration number.
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    pages_per_second: int = 0
    postcopy_requests: int = 0
    #: Destination with ``postcopy-blocktime``: total time vCPUs waited for pages, and per vCPU (ms).
    blocktime_ms: int | None = None
    vcpu_blocktime_ms: tuple[int, ...] = ()
    error_desc: str | None = None
    #: The reply as QEMU sent it, for fields not parsed above.
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_qmp(cls, reply: Mapping[str, Any]) -> MigrationStatus:
        ram: Mapping[str, Any] = reply.get("ram") or {}

        def opt(key: str) -> int | None:
            value = reply.get(key)
            return int(value) if value is not None else None

        return cls(
            status=str(reply.get("status", "none")),
            total_time_ms=opt("total-time"),
            expected_downtime_ms=opt("expected-downtime"),
            downtime_ms=opt("downtime"),
            setup_time_ms=opt("setup-time"),
            transferred=int(ram.get("transferred", 0)),
            remaining=int(ram.get("remaining", 0)),
            total=int(ram.get("total", 0)),
            duplicate=int(ram.get("duplicate", 0)),
            normal=int(ram.get("normal", 0)),
            normal_bytes=int(ram.get("normal-bytes", 0)),
            mbps=float(ram.get("mbps", 0.0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            pages_per_second=int(ram.get("pages-per-second", 0)),
            postcopy_requests=int(ram.get("postcopy-requests", 0)),
            blocktime_ms=opt("postcopy-blocktime"),
            vcpu_blocktime_ms=tuple(int(v) for v in reply.get("postcopy-vcpu-blocktime") or ()),
            error_desc=reply.get("error-desc"),
            raw=dict(reply),
        )

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    @property
    def postcopy(self) -> bool:
        """Past the switch to post-copy (active, paused or recovering): there is no going back."""
        return self.status in POSTCOPY_STATES


class MigrationError(QemuError):
    """A migration ended in ``failed`` or ``cancelled`` instead of ``completed`` (here, beside the status it carries)."""

    def __init__(self, status: MigrationStatus) -> None:
        self.status = status
        detail = f": {status.error_desc}" if status.error_desc else ""
        super().__init__(f"migration {status.status}{detail}")


async def query_migration(qmp: QMPClient) -> MigrationStatus:
    return MigrationStatus.from_qmp(await qmp.execute("query-migrate"))


async def set_capabilities(qmp: QMPClient, capabilities: Mapping[str, bool]) -> None:
    """``migrate-set-capabilities``, e.g. ``{"return-path": True}``; set the same on both sides."""
    if not capabilities:
        await trio.lowlevel.checkpoint()
        return
    caps = [{"capability": name, "state": bool(state)} for name, state in capabilities.items()]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})


async def query_capabilities(qmp: QMPClient) -> dict[str, bool]:
    """``query-migrate-capabilities`` as ``{name: state}``: what this QEMU knows, and how each is set now."""
    reply = await qmp.execute("query-migrate-capabilities")
    return {str(item["capability"]): bool(item["state"]) for item in reply}


async def set_parameters(qmp: QMPClient, parameters: Mapping[str, Any]) -> None:
    """``migrate-set-parameters`` with QEMU's own key names (``max-bandwidth``, ``downtime-limit``...)."""
    await qmp.execute("migrate-set-parameters", dict(parameters))


async def query_parameters(qmp: QMPClient) -> dict[str, Any]:
    result: dict[str, Any] = await qmp.execute("query-migrate-parameters")
    return result


async def set_max_bandwidth(qmp: QMPClient, bytes_per_s: int) -> None:
    """Cap the migration rate in bytes/s; applies at once to a migration in progress.

    QEMU 7.2 defaults to 128 MiB/s: raise it for anything fast.
    """
    await set_parameters(qmp, {"max-bandwidth": int(bytes_per_s)})


async def _prepare(qmp: QMPClient, max_bandwidth: int | None, capabilities: Mapping[str, bool] | None) -> None:
    if capabilities:
        await set_capabilities(qmp, capabilities)
    if max_bandwidth is not None:
        await set_max_bandwidth(qmp, max_bandwidth)


async def start_outgoing_fd(
    qmp: QMPClient,
    fd: int,
    *,
    max_bandwidth: int | None = None,
    capabilities: Mapping[str, bool] | None = None,
    fd_name: str = DEFAULT_FD_NAME,
) -> None:
    """Start migrating into *fd* (a socket or pipe), passed to QEMU with ``getfd``.

    QEMU holds its own duplicate: the caller may close *fd* when this returns.
    Returns once the migration has started; see :func:`wait_migration`.
    """
    await _prepare(qmp, max_bandwidth, capabilities)
    await qmp.send_fd(fd_name, fd)
    await qmp.execute("migrate", {"uri": f"fd:{fd_name}"})


async def start_outgoing_uri(
    qmp: QMPClient,
    uri: str,
    *,
    max_bandwidth: int | None = None,
    capabilities: Mapping[str, bool] | None = None,
) -> None:
    """Start migrating to *uri* (``unix:PATH``, ``tcp:HOST:PORT``, ``exec:...``)."""
    await _prepare(qmp, max_bandwidth, capabilities)
    await qmp.execute("migrate", {"uri": uri})


async def start_incoming_fd(
    qmp: QMPClient,
    fd: int,
    *,
    capabilities: Mapping[str, bool] | None = None,
    fd_name: str = DEFAULT_FD_NAME,
) -> None:
    """Make a QEMU started with ``-incoming defer`` read the migration from *fd*."""
    await _prepare(qmp, None, capabilities)
    await qmp.send_fd(fd_name, fd)
    await qmp.execute("migrate-incoming", {"uri": f"fd:{fd_name}"})


async def start_incoming_uri(qmp: QMPClient, uri: str, *, capabilities: Mapping[str, bool] | None = None) -> None:
    """Make a QEMU started with ``-incoming defer`` listen on *uri* (``unix:PATH``, ``tcp:...``)."""
    await _prepare(qmp, None, capabilities)
    await qmp.execute("migrate-incoming", {"uri": uri})


#: The id of the ``tls-creds-x509`` object :func:`set_tls` adds.
TLS_OBJECT_ID = "tunnel-migration-tls"


async def set_tls(qmp: QMPClient, creds_dir: str | None, *, endpoint: str = "client", hostname: str | None = None) -> None:
    """Make the next migration use TLS with the x509 files in *creds_dir*, or plain (None).

    *creds_dir* holds ``ca-cert.pem`` and ``ENDPOINT-cert.pem`` / ``ENDPOINT-key.pem``
    (QEMU's layout); the peer must present a certificate signed by that CA
    (``verify-peer``).  On the client *hostname* is the name the server's
    certificate must carry.  Call it with the same kind on both sides.
    """
    with contextlib.suppress(QMPError):  # a previous migration's object: replace it
        await qmp.execute("object-del", {"id": TLS_OBJECT_ID})
    if creds_dir is None:
        await set_parameters(qmp, {"tls-creds": "", "tls-hostname": ""})
        return
    await qmp.execute(
        "object-add",
        {"qom-type": "tls-creds-x509", "id": TLS_OBJECT_ID, "dir": creds_dir, "endpoint": endpoint, "verify-peer": True},
    )
    await set_parameters(qmp, {"tls-creds": TLS_OBJECT_ID, "tls-hostname": hostname or ""})


def postcopy_capabilities(*, blocktime: bool = False, preempt: bool | None = None) -> dict[str, bool]:
    """:data:`POSTCOPY`, plus ``postcopy-blocktime`` (destination statistics; it does not change the stream).

    *preempt* sets ``postcopy-preempt`` either way (a QEMU keeps it from its
    last migration); None leaves it out, for a QEMU that may not know it.
    """
    capabilities = dict(POSTCOPY)
    if preempt is not None:
        capabilities["postcopy-preempt"] = preempt
    if blocktime:
        capabilities["postcopy-blocktime"] = True
    return capabilities


async def start_postcopy(qmp: QMPClient) -> None:
    """``migrate-start-postcopy`` on the source: switch a running pre-copy to post-copy.

    The switch happens at QEMU's next iteration; :func:`wait_status` for
    ``postcopy-active``.  QEMU refuses it unless ``postcopy-ram`` was set on both sides.
    """
    await qmp.execute("migrate-start-postcopy")


async def pause(qmp: QMPClient) -> None:
    """``migrate-pause``: break a post-copy channel on purpose (either side); both then pause."""
    await qmp.execute("migrate-pause")


async def recover_incoming_fd(qmp: QMPClient, fd: int, *, fd_name: str = DEFAULT_FD_NAME) -> None:
    """Destination in ``postcopy-paused``: take *fd* as the new channel (``migrate-recover``); call before the source resumes."""
    await qmp.send_fd(fd_name, fd)
    await qmp.execute("migrate-recover", {"uri": f"fd:{fd_name}"})


async def resume_outgoing_fd(qmp: QMPClient, fd: int, *, fd_name: str = DEFAULT_FD_NAME) -> None:
    """Source in ``postcopy-paused``: go on over *fd* (``migrate`` with ``resume``), once the destination recovers."""
    await qmp.send_fd(fd_name, fd)
    await qmp.execute("migrate", {"uri": f"fd:{fd_name}", "resume": True})


async def recover_incoming_uri(qmp: QMPClient, uri: str) -> None:
    """Destination in ``postcopy-paused``: listen on *uri* for the source's resumed channel (``migrate-recover``)."""
    await qmp.execute("migrate-recover", {"uri": uri})


async def resume_outgoing_uri(qmp: QMPClient, uri: str) -> None:
    """Source in ``postcopy-paused``: go on over a new connection to *uri* (``migrate`` with ``resume``)."""
    await qmp.execute("migrate", {"uri": uri, "resume": True})


async def cancel(qmp: QMPClient) -> None:
    """``migrate_cancel``: the source goes back to the run state it had before.

    Raises :class:`PostcopyError` past the switch to post-copy, which QEMU
    7.2 would accept and lose the guest (see there).  The check is not
    atomic with the cancel: the caller must not switch to post-copy meanwhile.
    """
    status = await query_migration(qmp)
    if status.postcopy:
        raise PostcopyError(f"the migration is in {status.status}: the guest runs on the destination and cannot come back")
    await qmp.execute("migrate_cancel")


async def wait_migration(qmp: QMPClient, *, poll: float = 0.1) -> MigrationStatus:
    """Poll ``query-migrate`` until ``completed``; raise :class:`MigrationError` on ``failed``/``cancelled``.

    Works on both sides: a destination reports its incoming migration.
    States before the start (``none``) are waited through, so callers
    bound the wait themselves (``trio.fail_after``).
    """
    while True:
        status = await query_migration(qmp)
        if status.status == "completed":
            return status
        if status.status in ("failed", "cancelled"):
            raise MigrationError(status)
        await trio.sleep(poll)


async def wait_status(qmp: QMPClient, *states: str, poll: float = 0.05) -> MigrationStatus:
    """Poll ``query-migrate`` until its status is one of *states*; raise :class:`MigrationError` on ``failed``/``cancelled``
    (unless asked for).  Bound the wait with ``trio.fail_after``."""
    while True:
        status = await query_migration(qmp)
        if status.status in states:
            return status
        if status.status in ("failed", "cancelled"):
            raise MigrationError(status)
        await trio.sleep(poll)


async def run_state(qmp: QMPClient) -> str:
    """The guest's run state from ``query-status``: running, paused, postmigrate, inmigrate, prelaunch, ..."""
    result = await qmp.execute("query-status")
    return str(result["status"])


async def wait_run_state(qmp: QMPClient, *states: str, poll: float = 0.05) -> str:
    """Poll ``query-status`` until the run state is one of *states*; return it."""
    while True:
        state = await run_state(qmp)
        if state in states:
            return state
        await trio.sleep(poll)
