"""Exceptions of the QEMU layer.

They form their own small hierarchy under :class:`QemuError`, separate from
:class:`tunnel.TunnelError`: a failing hypervisor is not a failing tunnel, and
a daemon usually reports the two differently (a migration aborted by QEMU vs
a lost peer connection).  MigrationError lives in ``_migration``, beside the
MigrationStatus it carries.
"""

from __future__ import annotations

__all__ = ["PostcopyError", "QMPConnectionClosed", "QMPError", "QemuError", "QemuGone", "QemuStartError"]


class QemuError(Exception):
    """Base class of everything the QEMU layer raises on purpose."""


class QMPError(QemuError):
    """QEMU answered a QMP command with an ``error`` reply, or QMP itself failed.

    ``error_class`` is QEMU's class (``GenericError``, ``CommandNotFound``,
    ``DeviceNotFound``, ...) and ``desc`` its human-readable description.
    """

    def __init__(self, desc: str, *, error_class: str = "GenericError", command: str | None = None) -> None:
        self.error_class = error_class
        self.desc = desc
        self.command = command
        where = f" (in {command})" if command else ""
        super().__init__(f"{error_class}: {desc}{where}")


class QMPConnectionClosed(QMPError):
    """The QMP socket closed (QEMU exited or crashed) or was closed locally."""

    def __init__(self, desc: str = "QMP connection closed", *, command: str | None = None) -> None:
        super().__init__(desc, error_class="ConnectionClosed", command=command)


class QemuStartError(QemuError):
    """QEMU could not be started or exited before its QMP monitor answered.

    ``log_tail`` holds the end of QEMU's stderr/log (QEMU explains bad
    arguments there), ``returncode`` its exit status when it has exited.
    """

    def __init__(self, message: str, *, log_tail: str = "", returncode: int | None = None) -> None:
        self.log_tail = log_tail
        self.returncode = returncode
        text = message
        if returncode is not None:
            text += f" (exit status {returncode})"
        if log_tail.strip():
            text += ": " + log_tail.strip()
        super().__init__(text)


class QemuGone(QemuError):
    """A guest directory holds no QEMU to attach to.

    Its pidfile is missing, unreadable or stale (names a dead process or one
    that is not this guest's QEMU), or the QEMU there does not answer on QMP.
    """


class PostcopyError(QemuError):
    """Refused: the migration is past the switch to post-copy, so the guest can only run on the destination.

    QEMU 7.2 itself accepts ``migrate_cancel`` then: the source ends
    ``cancelled`` with a stale copy and the destination waits in
    ``postcopy-paused`` for pages that never come, so the guest is lost.
    """
