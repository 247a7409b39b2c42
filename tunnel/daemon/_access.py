"""Who may call what: roles, the allow lists that grant them, and the procedure table.

Theory of operation.  Every connection gets a set of roles when it is
accepted, from the listener it came in on and the identity the transport
proved (``SO_PEERCRED`` uid on a unix socket, the certificate's common name
on TLS, the address on an ``--insecure`` TCP listener):

* **admin** (define, start, destroy, monitor, migrate, ...): by default only
  the daemon's own uid on its read-write unix socket; others only when named
  with ``--allow-admin cn:NAME|uid:N``.  Never an address on plain TCP, whose
  "identity" anyone on the path can forge.
* **peer** (what a migration source calls on a destination: prepare,
  finish, the migration stream, and the outcome query of a restarted
  source): ``--allow-peer`` entries, plus the daemon's own uid.  A peer is
  not an admin: a compromised source host can send migrations here, nothing
  more.
* **read-only** (list, domain info, job info): every connection on a
  ``--listen-ro`` socket (that socket grants nothing else, whoever connects),
  and ``--allow-ro`` entries.

An admin also holds the other two roles (a client that drives a migration
without PEER2PEER prepares the destination itself).  The dispatcher checks
the procedure's role before its handler runs; a refusal is an RPC error
``PERMISSION_DENIED`` and the connection stays up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from ..control import DaemonError, Procedure

__all__ = ["GRANTED_BY", "PROCEDURE_ROLES", "AccessPolicy", "Listener", "Role", "describe", "parse_entry"]


class Role(Enum):
    READ_ONLY = "read-only"
    PEER = "peer"
    ADMIN = "admin"


#: The role each procedure needs; a procedure missing here is refused to everyone.
PROCEDURE_ROLES: dict[Procedure, Role] = {
    Procedure.LIST: Role.READ_ONLY,
    Procedure.DOMAIN_INFO: Role.READ_ONLY,
    Procedure.JOBINFO: Role.READ_ONLY,
    Procedure.DEFINE: Role.ADMIN,
    Procedure.UNDEFINE: Role.ADMIN,
    Procedure.START: Role.ADMIN,
    Procedure.DESTROY: Role.ADMIN,
    Procedure.MIGRATE: Role.ADMIN,
    Procedure.ABORT: Role.ADMIN,
    Procedure.SET_SPEED: Role.ADMIN,
    Procedure.MONITOR: Role.ADMIN,
    Procedure.CONFIRM: Role.ADMIN,
    Procedure.SUSPEND: Role.ADMIN,
    Procedure.RESUME: Role.ADMIN,
    Procedure.SHUTDOWN: Role.ADMIN,
    Procedure.REBOOT: Role.ADMIN,
    Procedure.MIGRATE_POSTCOPY: Role.ADMIN,
    Procedure.PREPARE: Role.PEER,
    Procedure.FINISH: Role.PEER,
    Procedure.MIGRATION_OUTCOME: Role.PEER,
    Procedure.POSTCOPY_RECOVER: Role.PEER,
}

#: The daemon option an operator uses to grant each role.
GRANTED_BY = {Role.ADMIN: "--allow-admin", Role.PEER: "--allow-peer", Role.READ_ONLY: "--allow-ro or --listen-ro"}

_KINDS = {
    # option: the identity kinds it accepts
    "--allow-admin": ("cn", "uid"),
    "--allow-peer": ("cn", "uid", "addr"),
    "--allow-ro": ("cn", "uid", "addr"),
}


def parse_entry(option: str, entry: str) -> tuple[str, str]:
    """``cn:NAME``, ``uid:N`` or (not for admins) ``addr:HOST``; a clear error otherwise."""
    kinds = _KINDS[option]
    kind, sep, value = entry.partition(":")
    if not sep or not value or kind not in kinds:
        forms = ", ".join({"cn": "cn:NAME", "uid": "uid:N", "addr": "addr:HOST"}[k] for k in kinds)
        extra = " (an address on plain TCP proves nothing, so it cannot make an admin)" if option == "--allow-admin" else ""
        raise DaemonError(f"bad {option} {entry!r}: use {forms}{extra}")
    if kind == "uid" and not value.isdigit():
        raise DaemonError(f"bad {option} {entry!r}: a uid is a number")
    return kind, value


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """What the daemon knows of the socket a connection came in on."""

    scheme: str  # unix, tls or tcp
    read_only: bool = False


class AccessPolicy:
    """The allow lists of one daemon, turned into roles per connection."""

    def __init__(
        self,
        *,
        admins: Iterable[str] = (),
        peers: Iterable[str] = (),
        read_only: Iterable[str] = (),
        own_uid: int | None = None,
    ) -> None:
        own = ("uid", str(os.getuid() if own_uid is None else own_uid))
        self.admins = {parse_entry("--allow-admin", e) for e in admins} | {own}
        self.peers = {parse_entry("--allow-peer", e) for e in peers} | {own}
        self.read_only = {parse_entry("--allow-ro", e) for e in read_only}

    def roles(self, kind: str, value: str, listener: Listener) -> frozenset[Role]:
        """The roles of a connection whose peer proved ``kind:value`` on *listener*.

        *kind* is ``uid`` (unix), ``cn`` (TLS) or ``addr`` (plain TCP, the host without the port).
        """
        if listener.read_only:
            return frozenset({Role.READ_ONLY})
        key = (kind, value)
        roles: set[Role] = set()
        if key in self.admins and kind != "addr":
            roles |= {Role.ADMIN, Role.PEER, Role.READ_ONLY}
        if key in self.peers:
            roles.add(Role.PEER)
        if key in self.read_only:
            roles.add(Role.READ_ONLY)
        return frozenset(roles)


def describe(roles: frozenset[Role]) -> str:
    if not roles:
        return "no role"
    return ", ".join(r.value for r in Role if r in roles)
