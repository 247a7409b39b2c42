"""Settling migrations whose outcome the source does not know, and cancelling QEMU's side at once.

A source may lose the destination's answer to FINISH: the connection breaks,
the daemon is stopped, or it crashes and restarts.  By then QEMU has sent
everything (``completed``, the guest paused in ``postmigrate``), and the
destination may already run the guest.  Resuming the source on a guess
could run the guest twice; stopping it could lose it.  So the source asks
the destination (MIGRATION_OUTCOME, answered from the destination's
``migrations/ID.finished|discarded`` records) and acts only on its answer:

* ``finished``: the guest runs there; the source stops its copy;
* ``discarded`` or ``unknown`` (the destination never kept it): the source
  resumes the guest as it was;
* ``pending`` (the destination is still loading it) or no answer: the guest
  stays paused here, "migrated, unconfirmed", and the daemon asks again.

Past the switch to post-copy none of this applies: the destination runs the
guest and the source holds pages it has not fetched yet, so the source's
QEMU is never cancelled nor resumed (:func:`cancel_and_resume` leaves it as
it is), and a lost connection is recovered instead (:mod:`._postcopy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import RPCError, TunnelError
from ..control import PROGRAM, DaemonError, Procedure, connect, decode, encode
from ..qemu import (
    POSTCOPY_STATES,
    MigrationStatus,
    PostcopyError,
    QemuProcess,
    QMPClient,
    QMPError,
    cancel,
    query_migration,
    run_state,
)
from ..transport import TunnelConnection, open_connection
from ._imageguest import ImageGuest

if TYPE_CHECKING:
    from ._daemon import Daemon, Domain

__all__ = ["ACTIVE", "ask_outcome", "cancel_and_resume", "outcome_reply", "settle_source"]

#: QEMU migration states in which the source is still sending and may still be cancelled (post-copy states may not).
ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"})
#: Bound on cancelling QEMU's migration and resuming the guest.
CANCEL_TIMEOUT = 5.0
#: Bound on each attempt to ask the destination.
ASK_TIMEOUT = 5.0


async def cancel_and_resume(
    qmp: QMPClient, *, was_running: bool, note: Callable[[MigrationStatus], None] | None = None, discarded: bool = False
) -> str:
    """Cancel QEMU's outgoing migration if it is still going and resume the guest as it was.

    Returns QEMU's final migration status.  ``completed`` means QEMU had sent
    everything before the cancel reached it: the guest is then left paused,
    for the caller to settle with the destination, unless *discarded* says
    the destination threw its copy away.  A post-copy state is returned
    untouched: the guest runs on the destination and cannot come back.
    *note* gets QEMU's figures from just before the cancel.
    """
    status = "none"
    with trio.move_on_after(CANCEL_TIMEOUT):
        with contextlib.suppress(QMPError):
            current = await query_migration(qmp)
            status = current.status
            if note is not None:
                note(current)
            if status in POSTCOPY_STATES:
                return status
            if status in ACTIVE:
                try:
                    await cancel(qmp)
                except PostcopyError:  # switched just now: leave it
                    return (await query_migration(qmp)).status
                while status in ACTIVE:
                    await trio.sleep(0.01)
                    status = (await query_migration(qmp)).status
            if status == "completed" and not discarded:
                return status
            if was_running:
                # QEMU resumes a guest it stopped for the switch-over by itself; one it never stopped runs already.
                for _ in range(100):
                    state = await run_state(qmp)
                    if state not in ("finish-migrate",):
                        break
                    await trio.sleep(0.01)
                if state != "running":
                    await qmp.execute("cont")
    return status


async def _ask(peer: TunnelConnection, migration_id: str) -> str:
    try:
        reply = decode(await peer.call(PROGRAM, Procedure.MIGRATION_OUTCOME, encode({"migration_id": migration_id})))
    except RPCError as exc:
        raise DaemonError(exc.message) from None
    outcome = reply.get("outcome")
    if outcome not in ("finished", "discarded", "pending", "unknown"):
        raise DaemonError(f"the destination answered an unknown outcome {outcome!r}")
    return str(outcome)


async def ask_outcome(daemon: Daemon, destination: str, migration_id: str, *, peer: TunnelConnection | None = None) -> str | None:
    """How the destination says migration *migration_id* ended, or None if it cannot be asked now.

    Tries the migration's own connection first (if it still works), then a new one.
    """
    failures = (DaemonError, TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)
    if peer is not None:
        with trio.move_on_after(ASK_TIMEOUT):
            with contextlib.suppress(*failures):
                return await _ask(peer, migration_id)
    with trio.move_on_after(ASK_TIMEOUT):
        try:
            stream = await connect(daemon.parse_peer_uri(destination), daemon.tls)
            async with open_connection(stream, client=True) as conn:
                return await _ask(conn, migration_id)
        except failures as exc:
            daemon.log(f"cannot ask {destination} how migration {migration_id} ended: {daemon.public(exc)}")
    return None


def outcome_reply(daemon: Daemon, migration_id: str) -> dict[str, Any]:
    """The destination's answer to MIGRATION_OUTCOME."""
    if bytes.fromhex(migration_id) in daemon.incoming:
        return {"outcome": "pending"}
    return {"outcome": daemon.store.outcome(migration_id) or "unknown"}


async def settle_source(
    daemon: Daemon,
    domain: Domain,
    *,
    destination: str,
    migration_id: str,
    was_running: bool,
    peer: TunnelConnection | None = None,
    undefine: bool = False,
) -> str:
    """Act on the destination's word about a migration QEMU completed here.

    Returns ``migrated`` (our copy stopped), ``resumed`` (our copy runs again
    as it was) or ``unconfirmed`` (no answer yet: the guest stays paused).
    """
    process = domain.process
    outcome = await ask_outcome(daemon, destination, migration_id, peer=peer)
    if outcome == "finished":
        await daemon.migrated_away(domain, destination=destination, migration_id=migration_id, undefine=undefine)
        return "migrated"
    if outcome in ("discarded", "unknown"):
        domain.unconfirmed = None
        if isinstance(process, ImageGuest):
            if was_running:
                process.resume()
        elif isinstance(process, QemuProcess):
            await cancel_and_resume(process.qmp, was_running=was_running, discarded=True)
        await daemon.store.set_runtime(domain.name, "migration", None)
        return "resumed"
    domain.unconfirmed = destination
    return "unconfirmed"
