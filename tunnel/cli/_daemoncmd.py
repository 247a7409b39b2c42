"""``tunnel daemon``: checks made before anything is created, the log writer, and the run itself.

A daemon that cannot start leaves nothing behind: its listen addresses are
checked before the state directory is touched, and directories it created
on the way to a failure are removed again (only while still empty).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import signal
import socket
import ssl
import sys
import time
from typing import Any, TextIO

import trio

from ..daemon import LOG_LEVELS, Daemon, DaemonError, TLSFiles, URIError, parse_uri
from ._errors import tls_reason

__all__ = ["LogWriter", "check_tls", "run_daemon"]


class LogWriter:
    """The daemon's log on stderr: ``--log-level`` filters, ``--log-format`` is text or one JSON object a line."""

    def __init__(self, level: str = "info", fmt: str = "text", out: TextIO | None = None) -> None:
        self.threshold = LOG_LEVELS[level]
        self.json = fmt == "json"
        self.out = out

    def __call__(self, line: str) -> None:
        self.emit("info", line, {})

    def emit(self, level: str, message: str, fields: dict[str, Any]) -> None:
        if LOG_LEVELS[level] < self.threshold:
            return
        now = time.time()
        if self.json:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
                      "level": level, "pid": os.getpid(), "message": message}
            record.update({k: v for k, v in fields.items() if k not in record})
            text = json.dumps(record, default=str)
        else:
            text = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))} tunnel[{os.getpid()}]: {level.upper()}: {message}"
        out = self.out or sys.stderr
        out.write(text + "\n")
        out.flush()


def check_tls(cert: str | None, key: str | None, ca: str | None, what: str, *, server: bool) -> TLSFiles | None:
    """The TLS files, checked now (present, PEM, key matching certificate) so that a mistake is one clear line."""
    given = [x for x in (cert, key, ca) if x]
    if not given:
        return None
    if len(given) != 3:
        raise DaemonError(f"{what}: --tls-cert, --tls-key and --tls-ca go together")
    assert cert is not None and key is not None and ca is not None
    for path in (cert, key, ca):
        if not os.path.isfile(path):
            raise DaemonError(f"{what}: no such file: {path}")
    files = TLSFiles(cert=cert, key=key, ca=ca)
    try:
        files.server_context() if server else files.client_context()
    except ssl.SSLError as exc:
        raise DaemonError(f"{what}: cannot use TLS certificate {cert} with key {key} and CA {ca}: {tls_reason(exc)}") from None
    except OSError as exc:
        raise DaemonError(f"{what}: cannot read the TLS files: {exc.strerror or exc}") from None
    return files


def _check_listen(text: str) -> None:
    """Refuse a listen URI that cannot work, before the state directory is created."""
    try:
        uri = parse_uri(text)
    except URIError as exc:
        raise DaemonError(f"bad --listen: {exc}") from None
    if uri.scheme != "unix":
        return
    directory = os.path.dirname(uri.path)
    if not os.path.isdir(directory):
        raise DaemonError(f"cannot listen on {uri}: the directory {directory} does not exist; create it or choose another path")
    if os.path.lexists(uri.path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(uri.path)
        except OSError:
            return  # a stale socket (the daemon replaces it) or not a socket (the daemon says so)
        finally:
            probe.close()
        raise DaemonError(f"cannot listen on {uri}: another daemon is listening there; stop it or choose another path")


def _missing_dirs(path: str) -> list[str]:
    """*path* and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(created: list[str]) -> None:
    """Undo the directories a failed start created: empty ones only, deepest first."""
    if not created:
        return
    for root, _dirs, _files in os.walk(created[0], topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    for path in created[1:]:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _make_daemon(args: argparse.Namespace, tls: TLSFiles | None, log: LogWriter) -> Daemon:
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise DaemonError(f"bad --socket-mode {args.socket_mode!r}: use octal permission bits such as 600 or 660") from None
    group = None
    if args.socket_group is not None:
        import grp

        try:
            group = grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            if not args.socket_group.isdigit():
                raise DaemonError(f"bad --socket-group {args.socket_group!r}: no such group") from None
            group = int(args.socket_group)
    try:
        return Daemon(
            state_dir=args.state_dir,
            listen=args.listen,
            listen_ro=args.listen_ro,
            tls=tls,
            allow=args.allow_peer,
            allow_admin=args.allow_admin,
            allow_ro=args.allow_ro,
            socket_mode=mode,
            socket_group=group,
            max_image_mib=args.max_image_mib,
            allow_paths=args.allow_path,
            allow_unsafe_monitor=args.allow_unsafe_monitor,
            qemu_user=args.qemu_user,
            shutdown_guests_on_exit=args.shutdown_guests_on_exit,
            max_clients=args.max_clients,
            max_anonymous_clients=args.max_anonymous_clients,
            insecure=args.insecure,
            postcopy_preempt=not args.no_postcopy_preempt,
            log=log,
        )
    except URIError as exc:
        raise DaemonError(str(exc)) from None
    except OSError as exc:
        where = exc.filename or args.state_dir
        what = {errno.EACCES: "it is not writable", errno.EPERM: "it is not writable", errno.EROFS: "it is on a read-only file system",
                errno.ENOTDIR: "a part of the path is not a directory"}.get(exc.errno or 0, exc.strerror or str(exc))
        raise DaemonError(f"cannot use --state-dir {args.state_dir}: {where}: {what}") from None


async def run_daemon(args: argparse.Namespace) -> int:
    log = LogWriter(args.log_level, args.log_format)
    tls = check_tls(args.d_tls_cert, args.d_tls_key, args.d_tls_ca, "daemon", server=True)
    for uri in args.listen + args.listen_ro:
        _check_listen(uri)
    # Each connection is an fd: let --max-clients, not a 1024 default, be the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    created = _missing_dirs(args.state_dir)
    started = False
    try:
        daemon = _make_daemon(args, tls, log)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                started = True

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        log(f"{signal.Signals(signum).name}: shutting down")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
    except BaseException:
        if not started:
            _remove_empty(created)
        raise
    return 0
