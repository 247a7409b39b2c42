"""``tunnel``: the daemon, the demo and a virsh-style client in one command.

Exit status: 0 on success, 1 when the daemon refuses or fails a request (one
line on stderr says why), 2 for bad command-line usage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from ..client import Client, connect
from ..daemon import Daemon, DaemonError, TLSFiles
from ._progress import ProgressBar, format_bytes, format_duration, format_jobinfo

__all__ = ["main"]

DEFAULT_URI = "unix:///run/tunnel/tunnel.sock"

EPILOG = f"""\
examples:
  tunnel daemon --listen unix:///run/tunnel/src.sock --state-dir /var/lib/tunnel/src
  tunnel --connect unix:///run/tunnel/src.sock define vm1.json
  tunnel --connect unix:///run/tunnel/src.sock start vm1
  tunnel --connect unix:///run/tunnel/src.sock migrate --live --p2p --tunnelled vm1 unix:///run/tunnel/dst.sock
  tunnel demo

The client's connection defaults to $TUNNEL_URI, else {DEFAULT_URI}.
TLS files for tls:// URIs default to $TUNNEL_TLS_CERT, $TUNNEL_TLS_KEY and $TUNNEL_TLS_CA.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel",
        description="Migrate QEMU guests between daemons, with the migration data tunnelled over the daemons' RPC connection.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--connect", metavar="URI", default=os.environ.get("TUNNEL_URI", DEFAULT_URI),
                   help="daemon to talk to: unix:///abs/path.sock, tls://host:port or tcp://host:port")
    p.add_argument("--tls-cert", metavar="FILE", default=os.environ.get("TUNNEL_TLS_CERT"), help="client certificate (PEM) for tls://")
    p.add_argument("--tls-key", metavar="FILE", default=os.environ.get("TUNNEL_TLS_KEY"), help="its private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("TUNNEL_TLS_CA"), help="CA certificate that signed the daemon's")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("daemon", help="run a migration daemon",
                       description="Run a migration daemon until SIGTERM or SIGINT. Guests outlive it: a stopped daemon "
                                   "leaves its QEMUs running, and the next one started on the same --state-dir reattaches "
                                   "to them. A migration still transferring when the daemon stops is cancelled and its "
                                   "guest resumes on this host.")
    d.add_argument("--listen", metavar="URI", action="append", default=[],
                   help="unix:///abs/path.sock (mode 0600), tls://host:port (mutual TLS) or tcp://host:port (needs --insecure); repeatable")
    d.add_argument("--state-dir", metavar="DIR", required=True, help="where definitions, QMP sockets and QEMU logs live")
    d.add_argument("--tls-cert", dest="d_tls_cert", metavar="FILE", help="this daemon's certificate (PEM), also its identity as a migration source")
    d.add_argument("--tls-key", dest="d_tls_key", metavar="FILE", help="its private key (PEM)")
    d.add_argument("--tls-ca", dest="d_tls_ca", metavar="FILE", help="CA whose signature peers' and clients' certificates must carry")
    d.add_argument("--listen-ro", metavar="URI", action="append", default=[],
                   help="unix:///abs/path.sock: a read-only socket (mode 0666) where anyone may list domains and read "
                        "job info, and nothing else; repeatable")
    d.add_argument("--allow-admin", metavar="ID", action="append", default=[],
                   help="grant the admin role (define, start, destroy, monitor, migrate, ...) to cn:NAME (TLS certificate "
                        "common name) or uid:N (unix peer); this daemon's own uid on its unix socket always has it; repeatable")
    d.add_argument("--allow-peer", metavar="ID", action="append", default=[],
                   help="accept incoming migrations (the peer role) from cn:NAME, uid:N, or addr:HOST on an --insecure "
                        "tcp:// listener; this daemon's own uid is always allowed; a peer is not an admin; repeatable")
    d.add_argument("--allow-ro", metavar="ID", action="append", default=[],
                   help="grant the read-only role (list, dominfo, jobinfo) to cn:NAME, uid:N or addr:HOST; repeatable")
    d.add_argument("--socket-mode", metavar="OCTAL", default="600",
                   help="permission bits of the --listen unix sockets (default 600); with --socket-group, 660 lets the "
                        "group's users connect, and SO_PEERCRED still decides their role")
    d.add_argument("--socket-group", metavar="GROUP", help="group owning the --listen unix sockets")
    d.add_argument("--allow-path", metavar="DIR", action="append", default=[],
                   help="a directory whose files guest definitions may name (disk images, kernels, loader files); "
                        "anything else outside the guest's own run directory is refused; repeatable")
    d.add_argument("--allow-unsafe-monitor", action="store_true",
                   help="pass every QMP command of 'monitor' to QEMU (default: queries, stop/cont, reset, memory dumps "
                        "into the guest's directory); with it, admins can make QEMU run host programs")
    d.add_argument("--qemu-user", metavar="USER", help="run QEMU as this unprivileged user (the daemon must run as root)")
    d.add_argument("--shutdown-guests-on-exit", action="store_true",
                   help="stop every guest when the daemon stops (default: guests keep running and the next daemon "
                        "reattaches to them)")
    d.add_argument("--max-image-mib", metavar="MIB", type=int,
                   help="largest memory-image guest accepted from a client or a peer (default: the host's memory)")
    d.add_argument("--max-clients", metavar="N", type=int, default=5000,
                   help="most connections at once; more are closed at once (default 5000, as libvirt)")
    d.add_argument("--max-anonymous-clients", metavar="N", type=int, default=20,
                   help="most connections still in their TLS or tunnel handshake (default 20, as libvirt)")
    d.add_argument("--insecure", action="store_true",
                   help="allow tcp:// listeners without TLS and migrations to tcp:// peers (logged as a warning)")

    df = sub.add_parser("define", help="define (or redefine) a domain from a JSON file")
    df.add_argument("file", metavar="FILE", help='JSON: {"name": "vm1", "qemu": ["-machine", "q35", "-m", "512", ...]}')
    for name, text in (("undefine", "forget a stopped domain"), ("destroy", "stop a running domain's QEMU at once")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("name", metavar="NAME")
    st = sub.add_parser("start", help="start a defined domain")
    st.add_argument("name", metavar="NAME")
    st.add_argument("--paused", action="store_true", help="start with the CPUs stopped")
    st.add_argument("--force", action="store_true",
                    help="start a guest that was migrated away (it must no longer run on the destination)")
    ls = sub.add_parser("list", help="list domains and their states")
    ls.add_argument("--json", action="store_true", help="print JSON")

    m = sub.add_parser("migrate", help="migrate a domain to another daemon",
                       description="Migrate NAME to the daemon at DEST_URI. With --p2p the source daemon drives the migration "
                                   "(without it, this client does); "
                                   "with --tunnelled (which needs --p2p) QEMU's migration data travels inside the daemons' connection.")
    m.add_argument("--live", action="store_true", help="keep the guest running while its memory is copied")
    m.add_argument("--p2p", action="store_true",
                   help="peer to peer: the source daemon talks to the destination itself (without it, this client drives "
                        "the migration, talking to both daemons)")
    m.add_argument("--tunnelled", "--tunneled", action="store_true", help="carry the data over the daemons' RPC connection")
    m.add_argument("--bandwidth", metavar="MIB_PER_S", type=int, default=0, help="limit in MiB/s (default: none)")
    m.add_argument("--dname", metavar="NEW", help="name of the domain on the destination")
    m.add_argument("--persistent", action="store_true",
                   help="keep the definition on the destination (default: transient there, gone when the guest stops)")
    m.add_argument("--undefinesource", action="store_true",
                   help="forget the definition on the source (default: kept, marked as migrated away: start refuses it)")
    m.add_argument("--detach", "--async", action="store_true",
                   help="return once the migration started and leave it running (needs --p2p); follow it with jobinfo")
    m.add_argument("--json", action="store_true", help="print one JSON summary instead of progress")
    m.add_argument("--postcopy", action="store_true", help="allow switching to post-copy (migrate-postcopy NAME); needs --p2p --live")
    m.add_argument("--postcopy-after-precopy", action="store_true", help="switch to post-copy after the first pre-copy pass")
    m.add_argument("--postcopy-resume", action="store_true",
                   help="resume NAME's post-copy migration, paused by a broken connection, over a new one to DEST_URI")
    m.add_argument("--retries", metavar="N", type=int, default=0,
                   help="post-copy: try to resume N times by itself (bounded backoff) when the connection breaks")
    m.add_argument("--postcopy-bandwidth", metavar="MIB_PER_S", type=int, default=0, help="post-copy's limit in MiB/s (default: none)")
    m.add_argument("name", metavar="NAME")
    m.add_argument("dest", metavar="DEST_URI")
    mp = sub.add_parser("migrate-postcopy", help="switch the domain's running migration (started with --postcopy) to post-copy")
    mp.add_argument("name", metavar="NAME")

    j = sub.add_parser("jobinfo", help="statistics of the domain's current (or last) migration job")
    j.add_argument("name", metavar="NAME")
    j.add_argument("--json", action="store_true", help="print JSON")
    a = sub.add_parser("abort", help="abort the domain's migration job; the source guest stays as it was")
    a.add_argument("name", metavar="NAME")
    s = sub.add_parser("set-speed", help="change the bandwidth limit of a running migration")
    s.add_argument("name", metavar="NAME")
    s.add_argument("mib", metavar="MIB_PER_S", type=int, help="new limit in MiB/s, 0 for none")
    mo = sub.add_parser("monitor", help="pass one QMP command to the domain's QEMU and print the reply")
    mo.add_argument("name", metavar="NAME")
    mo.add_argument("qmp", metavar="JSON", help='e.g. \'{"execute": "query-status"}\'')

    demo = sub.add_parser("demo", help="migrate a guest between two throw-away daemons and verify it",
                          description="Start two daemons on unix sockets in a temporary directory, migrate a guest "
                                      "PEER2PEER + TUNNELLED between them, verify the destination's memory and clean up.")
    demo.add_argument("--memory-mib", type=int, default=256, help="MiB of random data in the guest's RAM (default 256)")
    demo.add_argument("--guest", choices=("auto", "qemu", "image"), default="auto",
                      help="a real QEMU guest, a memory-image guest, or (auto) QEMU when installed")
    demo.add_argument("--native", action="store_true", help="also run a native (untunnelled) PEER2PEER migration to compare")
    demo.add_argument("--json", action="store_true", help="print one JSON summary")
    return p


def _tls(cert: str | None, key: str | None, ca: str | None, what: str) -> TLSFiles | None:
    given = [x for x in (cert, key, ca) if x]
    if not given:
        return None
    if len(given) != 3:
        raise DaemonError(f"{what}: --tls-cert, --tls-key and --tls-ca go together")
    for path in (cert, key, ca):
        assert path is not None
        if not os.path.isfile(path):
            raise DaemonError(f"{what}: no such file: {path}")
    return TLSFiles(cert=cert, key=key, ca=ca)  # type: ignore[arg-type]


def _log(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} tunnel[{os.getpid()}]: {line}\n")
    sys.stderr.flush()


async def _run_daemon(args: argparse.Namespace) -> int:
    tls = _tls(args.d_tls_cert, args.d_tls_key, args.d_tls_ca, "daemon")
    # Each connection is an fd: let --max-clients, not a 1024 default, be the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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
    daemon = Daemon(
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
        log=_log,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    _log(f"{signal.Signals(signum).name}: shutting down")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
    return 0


async def _migrate(client: Client, args: argparse.Namespace) -> int:
    postcopy = {"postcopy": args.postcopy, "postcopy_after_precopy": args.postcopy_after_precopy, "retries": args.retries,
                "postcopy_bandwidth_mib": args.postcopy_bandwidth}
    if args.postcopy_resume:
        reply = await client.postcopy_resume(args.name, args.dest)
        print(json.dumps(reply, sort_keys=True) if args.json else f"Migration of {args.name} to {args.dest} resumed and completed")
        return 0
    if args.detach:
        reply = await client.migrate(
            args.name, args.dest, live=args.live, p2p=args.p2p, tunnelled=args.tunnelled, bandwidth_mib=args.bandwidth,
            dname=args.dname, persistent=args.persistent, undefine_source=args.undefinesource, detach=True, **postcopy,
        )
        print(json.dumps(reply, sort_keys=True) if args.json else
              f"Migration of {args.name} to {args.dest} started; follow it with: tunnel jobinfo {args.name}")
        return 0
    show_bar = not args.json and sys.stderr.isatty()
    bar = ProgressBar() if show_bar else None
    result: dict[str, Any] = {}
    started = time.monotonic()
    interrupted: list[str] = []

    async def poll() -> None:
        try:
            while True:
                await trio.sleep(0.5)
                info = await client.jobinfo(args.name)
                if bar is not None and info.get("status") == "active":
                    bar.update(info)
        except DaemonError:
            return  # the migrate call reports what went wrong

    async def cancel_on_ctrl_c(signals: AsyncIterator[int]) -> None:
        """Ctrl-C cancels the migration this command started (the daemon's job goes on otherwise)."""
        async for _ in signals:
            if interrupted:
                continue
            try:
                reply = await client.abort(args.name)
                interrupted.append(reply.get("where") or "")
            except DaemonError as exc:
                interrupted.append("")
                print(f"cannot cancel: {exc.message}", file=sys.stderr)

    error: DaemonError | None = None
    try:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_ctrl_c, signals)
                if bar is not None:
                    nursery.start_soon(poll)
                try:
                    result = await client.migrate(
                        args.name, args.dest, live=args.live, p2p=args.p2p, tunnelled=args.tunnelled,
                        bandwidth_mib=args.bandwidth, dname=args.dname, persistent=args.persistent,
                        undefine_source=args.undefinesource, **postcopy,
                    )
                except DaemonError as exc:
                    error = exc
                nursery.cancel_scope.cancel()
    finally:
        if bar is not None:
            bar.close()
    if interrupted and error is not None:
        where = interrupted[0] or "the guest stays on the source"
        print(f"error: migration of {args.name} to {args.dest} cancelled (Ctrl-C); {where}", file=sys.stderr)
        return 130
    if error is not None:
        raise error
    result["client_seconds"] = round(time.monotonic() - started, 3)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        rate = (result.get("data_processed") or 0) / max(result.get("time_elapsed_ms", 0) / 1000, 1e-9)
        print(
            f"Migration of {args.name} to {args.dest} completed in {format_duration(result.get('time_elapsed_ms'))}: "
            f"{format_bytes(result.get('data_processed'))} at {format_bytes(rate)}/s"
            + (f", {format_bytes(result['tunnel_bytes_sent'])} through the tunnel" if "tunnel_bytes_sent" in result else "")
        )
    return 0


def _read_inputs(args: argparse.Namespace) -> None:
    """Read and check the files and JSON a command needs, before any connection."""
    args.definition = args.qmp_command = None
    if args.command == "migrate" and args.tunnelled and not args.p2p:
        raise DaemonError("cannot perform tunnelled migration without using peer2peer flag")
    if args.command == "define":
        try:
            with open(args.file, encoding="utf-8") as f:
                args.definition = json.load(f)
        except OSError as exc:
            raise DaemonError(f"cannot read {args.file}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise DaemonError(f"{args.file} is not valid JSON: {exc}") from None
    if args.command == "monitor":
        try:
            args.qmp_command = json.loads(args.qmp)
        except json.JSONDecodeError as exc:
            raise DaemonError(f"the QMP command is not valid JSON: {exc}") from None
        if not isinstance(args.qmp_command, dict):
            raise DaemonError('the QMP command must be a JSON object, as in {"execute": "query-status"}')


async def _client_command(args: argparse.Namespace) -> int:
    tls = _tls(args.tls_cert, args.tls_key, args.tls_ca, "client")
    definition, command = args.definition, args.qmp_command
    async with connect(args.connect, tls=tls) as client:
        if args.command == "define":
            reply = await client.define(definition)
            print(f"Domain '{reply['name']}' {'redefined' if reply['replaced'] else 'defined'} from {args.file}")
        elif args.command == "undefine":
            await client.undefine(args.name)
            print(f"Domain '{args.name}' has been undefined")
        elif args.command == "start":
            state = await client.start(args.name, paused=args.paused, force=args.force)
            print(f"Domain '{args.name}' started ({state})")
        elif args.command == "destroy":
            await client.destroy(args.name)
            print(f"Domain '{args.name}' destroyed")
        elif args.command == "list":
            domains = await client.list()
            if args.json:
                print(json.dumps(domains))
            else:
                print(f"{'Name':<24} {'State':<12} PID")
                print("-" * 44)
                for d in domains:
                    print(f"{d['name']:<24} {d['state']:<12} {d['pid'] if d['pid'] is not None else '-'}")
        elif args.command == "migrate":
            return await _migrate(client, args)
        elif args.command == "jobinfo":
            info = await client.jobinfo(args.name)
            print(json.dumps(info, sort_keys=True) if args.json else format_jobinfo(info))
        elif args.command == "migrate-postcopy":
            await client.migrate_postcopy(args.name)
            print(f"Migration of '{args.name}' switched to post-copy")
        elif args.command == "abort":
            reply = await client.abort(args.name)
            print(f"Migration job of '{args.name}' {reply['status']}; {reply.get('where', '')}".rstrip("; "))
        elif args.command == "set-speed":
            await client.set_speed(args.name, args.mib)
            print(f"Bandwidth of the migration of '{args.name}' set to {args.mib or 'unlimited'}{' MiB/s' if args.mib else ''}")
        elif args.command == "monitor":
            print(json.dumps(await client.monitor(args.name, command), indent=2))
    return 0


async def _amain(args: argparse.Namespace) -> int:
    if args.command == "daemon":
        return await _run_daemon(args)
    if args.command == "demo":
        from ._demo import run_demo

        return await run_demo(args)
    return await _client_command(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _read_inputs(args)
        return trio.run(_amain, args)
    except DaemonError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
