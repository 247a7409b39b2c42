"""Finding readers and writers by name: built-ins, then installed plug-ins.

A plug-in package (a hypervisor driver, a storage backend) adds its own
without changing ``tunnel`` by declaring entry points::

    [project.entry-points."tunnel.sources"]
    xen-save = "xen_tunnel:SaveFileReader"

    [project.entry-points."tunnel.writers"]
    xen-restore = "xen_tunnel:RestoreWriter"

The object an entry point names is a *factory*: called with keyword options
it returns a :class:`SourceReader` or :class:`DestinationWriter` (a class is
the usual factory).  Built-in names win over plug-ins, so an installed
package cannot silently replace ``file``; :func:`register_source` and
:func:`register_writer` add factories at run time (tests, embedding).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, cast

from ._api import DestinationWriter, SourceReader, UnknownEndpoint

__all__ = [
    "BUILTIN_SOURCES",
    "BUILTIN_WRITERS",
    "SOURCE_GROUP",
    "WRITER_GROUP",
    "available_sources",
    "available_writers",
    "destination_writer",
    "register_source",
    "register_writer",
    "source_reader",
]

SOURCE_GROUP = "tunnel.sources"
WRITER_GROUP = "tunnel.writers"

#: Built-ins as entry-point values, imported on first use (pyproject.toml declares the same).
BUILTIN_SOURCES = {
    "bytestream": "tunnel.endpoints.bytestream:ByteStreamReader",
    "file": "tunnel.endpoints.file:FileReader",
    "memory-image": "tunnel.endpoints.image:MemoryImageReader",
}
BUILTIN_WRITERS = {
    "bytestream": "tunnel.endpoints.bytestream:ByteStreamWriter",
    "file": "tunnel.endpoints.file:FileWriter",
    "memory-image": "tunnel.endpoints.image_writer:MemoryImageWriter",
}

SourceFactory = Callable[..., SourceReader]
WriterFactory = Callable[..., DestinationWriter]

_runtime: dict[str, dict[str, Callable[..., Any]]] = {SOURCE_GROUP: {}, WRITER_GROUP: {}}
_BUILTINS = {SOURCE_GROUP: BUILTIN_SOURCES, WRITER_GROUP: BUILTIN_WRITERS}


def _load(value: str) -> Callable[..., Any]:
    module, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return cast(Callable[..., Any], obj)


def _plugins(group: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)  # the first distribution on sys.path wins, as importing would
    return found


def _lookup(group: str, name: str, what: str) -> Callable[..., Any]:
    builtin = _BUILTINS[group].get(name)
    if builtin is not None:
        return _load(builtin)
    if name in _runtime[group]:
        return _runtime[group][name]
    ep = _plugins(group).get(name)
    if ep is not None:
        return cast(Callable[..., Any], ep.load())
    known = ", ".join(_names(group)) or "none"
    raise UnknownEndpoint(
        f"no {what} named {name!r}; available: {known} (plug-ins register under the {group!r} entry-point group)"
    )


def _names(group: str) -> list[str]:
    return sorted({*_BUILTINS[group], *_runtime[group], *_plugins(group)})


def source_reader(name: str) -> SourceFactory:
    """The factory of the source reader called *name*; raises :class:`UnknownEndpoint`."""
    return cast(SourceFactory, _lookup(SOURCE_GROUP, name, "source reader"))


def destination_writer(name: str) -> WriterFactory:
    """The factory of the destination writer called *name*; raises :class:`UnknownEndpoint`."""
    return cast(WriterFactory, _lookup(WRITER_GROUP, name, "destination writer"))


def available_sources() -> list[str]:
    return _names(SOURCE_GROUP)


def available_writers() -> list[str]:
    return _names(WRITER_GROUP)


def register_source(name: str, factory: SourceFactory) -> None:
    """Add a reader factory for this process (built-in names cannot be replaced)."""
    _register(SOURCE_GROUP, name, factory)


def register_writer(name: str, factory: WriterFactory) -> None:
    """Add a writer factory for this process (built-in names cannot be replaced)."""
    _register(WRITER_GROUP, name, factory)


def _register(group: str, name: str, factory: Callable[..., Any]) -> None:
    if name in _BUILTINS[group]:
        raise ValueError(f"{name!r} is a built-in and cannot be replaced")
    _runtime[group][name] = factory
