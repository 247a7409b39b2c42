"""The QEMU layer of the reference migration daemon, on trio.

* :class:`QMPClient`: QEMU's monitor protocol (commands from several tasks,
  bounded event buffer, fd passing with ``getfd``).
* :class:`QemuProcess`: a QEMU in its own guest directory, sandboxed, that
  outlives the daemon that started it: a restarted daemon attaches to it again.
* migration helpers: start outgoing/incoming migrations on fds or URIs,
  poll them (:class:`MigrationStatus`), cap their bandwidth, cancel them,
  switch them to post-copy and recover a paused post-copy on a new fd.

It does not import the tunnel protocol: the daemon joins the two, handing a
QEMU one end of a socketpair and the tunnel stream the other.
"""

from __future__ import annotations

from ._errors import PostcopyError, QemuError, QemuGone, QemuStartError, QMPConnectionClosed, QMPError
from ._migration import (
    ACTIVE_STATES,
    POSTCOPY,
    POSTCOPY_STATES,
    MigrationError,
    MigrationStatus,
    cancel,
    pause,
    postcopy_capabilities,
    query_capabilities,
    query_migration,
    query_parameters,
    recover_incoming_fd,
    recover_incoming_uri,
    resume_outgoing_fd,
    resume_outgoing_uri,
    run_state,
    set_capabilities,
    set_max_bandwidth,
    set_parameters,
    set_tls,
    start_incoming_fd,
    start_incoming_uri,
    start_outgoing_fd,
    start_outgoing_uri,
    start_postcopy,
    wait_migration,
    wait_run_state,
    wait_status,
)
from ._process import SANDBOX, GuestFiles, QemuProcess, qemu_binary
from ._qmp import QMPClient, QMPEvent

__all__ = [
    "ACTIVE_STATES",
    "POSTCOPY",
    "POSTCOPY_STATES",
    "SANDBOX",
    "GuestFiles",
    "MigrationError",
    "MigrationStatus",
    "PostcopyError",
    "QMPClient",
    "QMPConnectionClosed",
    "QMPError",
    "QMPEvent",
    "QemuError",
    "QemuGone",
    "QemuProcess",
    "QemuStartError",
    "cancel",
    "pause",
    "postcopy_capabilities",
    "qemu_binary",
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
