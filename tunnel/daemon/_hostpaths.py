"""The host-path rule: which files a remote party may make QEMU open.

A guest definition (and a few QMP commands) name host files that QEMU opens
as root.  A name is accepted when it is

* relative, without ``..`` components, and still inside the guest's run
  directory once symlinks are resolved (QEMU runs with that directory as its
  working directory), or
* absolute and, after :func:`os.path.realpath`, inside the run directory or
  one of the directories the operator allowed (``--allow-path``).

Anything with a ``:`` is refused: QEMU reads ``json:``, ``nbd:``, ``file:``
and friends as protocols rather than files, and multiboot ``-initrd`` or
``-acpitable`` lists use ``:`` as a separator.

The check looks at the file system when it runs.  A symlink created later in
an allowed directory is not seen, so the daemon checks again right before it
starts QEMU, and the allowed directories must not be writable by the parties
the check protects against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HostPathError", "PathPolicy"]


class HostPathError(ValueError):
    """A name the policy refuses; the message completes "path 'X' ..." and says what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PathPolicy:
    run_dir: str
    allowed_dirs: tuple[str, ...] = ()
    #: Part of the refusal: which option widens the policy (empty when none does).
    widen_hint: str = " and the allowed directories (--allow-path)"

    @classmethod
    def of(cls, run_dir: str, allowed_dirs: Sequence[str] = ()) -> PathPolicy:
        return cls(run_dir=run_dir, allowed_dirs=tuple(allowed_dirs))

    def resolve(self, name: str) -> str:
        """The real absolute path QEMU would open for *name*; :class:`HostPathError` if the rule refuses it."""
        if "\0" in name:
            raise HostPathError("contains a NUL byte")
        if ":" in name:
            raise HostPathError("contains ':' (QEMU would read it as a protocol such as json: or nbd:); name a plain file")
        run_dir = os.path.realpath(self.run_dir)
        if not os.path.isabs(name):
            if ".." in name.split("/"):
                raise HostPathError("is relative and uses '..'; name a file inside the guest's run directory")
            real = os.path.realpath(os.path.join(run_dir, name))
            if not _inside(real, run_dir):
                raise HostPathError("leaves the guest's run directory through a symlink")
            return real
        real = os.path.realpath(name)
        if _inside(real, run_dir) or any(_inside(real, os.path.realpath(d)) for d in self.allowed_dirs):
            return real
        where = "" if real == os.path.normpath(name) else f" (it resolves to {real!r})"
        raise HostPathError(f"is outside the guest's run directory{self.widen_hint}{where}")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")
