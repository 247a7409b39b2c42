"""``tunnel``: the daemon, the demo and a virsh-style client in one command.

Exit status: 0 on success, 1 when the daemon refuses or fails a request or
anything else goes wrong (one line on stderr says why; an internal error's
traceback goes to a log file the line names), 2 for bad command-line usage
(the subcommand's usage is shown), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from typing import Any

import trio

from ..client import connect
from ..control import DaemonError
from ._daemoncmd import check_tls, run_daemon
from ._errors import crash_log, is_broken_pipe, silence_stdout, user_message
from ._migrate import migrate
from ._progress import format_bytes, format_jobinfo

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
$TUNNEL_QEMU names the QEMU binary the daemon runs (default: qemu-system-x86_64 on $PATH).
virsh's names work too: domjobinfo, domjobabort, migrate-setspeed, qemu-monitor-command.
"""

DEFINE_HELP = """\
FILE is a JSON object in one of two forms.

A QEMU guest: QEMU's arguments without the binary, -qmp, -incoming, -S,
-pidfile or -sandbox (the daemon adds those):

  {"name": "vm1", "qemu": ["-machine", "q35", "-accel", "tcg", "-m", "512",
                           "-nodefaults", "-display", "none"]}

A memory-image guest (a simulation for machines without QEMU: a sparse
image with RANDOM_MIB of random data that a simulated guest dirties; it
migrates --p2p --tunnelled only):

  {"name": "vm1", "image": {"size_mib": 256, "random_mib": 64, "dirty_pages_per_s": 500}}

Both take an optional "description". Defining an existing name replaces
its definition (not while it runs).
"""


def _version() -> str:
    try:
        return metadata.version("tunnel")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Parsers:
    """The top-level parser and one per command, so that usage errors show the command's own usage."""

    def __init__(self) -> None:
        self.top = argparse.ArgumentParser(
            prog="tunnel",
            description="Migrate QEMU guests between daemons, with the migration data tunnelled over the daemons' RPC connection.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.sub = self.top.add_subparsers(dest="command", metavar="COMMAND", required=True)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def add(self, name: str, text: str, description: str | None = None, aliases: tuple[str, ...] = (), *,
            raw: bool = False) -> argparse.ArgumentParser:
        parser = self.sub.add_parser(
            name, aliases=list(aliases), help=text, description=description or text[:1].upper() + text[1:] + ".",
            formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter,
        )
        parser.set_defaults(cmd=name)
        for key in (name, *aliases):
            self.commands[key] = parser
        return parser


def _name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the domain's name, as in its definition")


def _json(parser: argparse.ArgumentParser, what: str = "print JSON instead of aligned text") -> None:
    parser.add_argument("--json", action="store_true", help=what)


def _parsers() -> _Parsers:
    ps = _Parsers()
    p = ps.top
    p.add_argument("--version", action="version", version=f"tunnel {_version()}", help="print the version and exit")
    p.add_argument("-c", "--connect", metavar="URI", default=os.environ.get("TUNNEL_URI", DEFAULT_URI),
                   help="daemon to talk to: unix:///abs/path.sock, tls://host:port or tcp://host:port")
    p.add_argument("--tls-cert", metavar="FILE", default=os.environ.get("TUNNEL_TLS_CERT"), help="client certificate (PEM) for tls://")
    p.add_argument("--tls-key", metavar="FILE", default=os.environ.get("TUNNEL_TLS_KEY"), help="its private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("TUNNEL_TLS_CA"), help="CA certificate that signed the daemon's")

    d = ps.add("daemon", "run a migration daemon",
               "Run a migration daemon until SIGTERM or SIGINT. Guests outlive it: a stopped daemon "
               "leaves its QEMUs running, and the next one started on the same --state-dir reattaches "
               "to them. A migration still transferring when the daemon stops is cancelled and its "
               "guest resumes on this host. The log goes to stderr.")
    d.add_argument("--listen", metavar="URI", action="append", default=[],
                   help="unix:///abs/path.sock (mode 0600), tls://host:port (mutual TLS) or tcp://host:port (needs --insecure); repeatable")
    d.add_argument("--state-dir", metavar="DIR", required=True,
                   help="where definitions, guest directories and QEMU logs live (created if missing)")
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
    d.add_argument("--no-postcopy-preempt", action="store_true",
                   help="carry a tunnelled post-copy migration on one stream, where the pages the destination asks "
                        "for wait behind the background copy (default: those pages go on a second stream, QEMU's "
                        "postcopy-preempt channel, when both daemons and both QEMUs have it); applies to migrations "
                        "from and to this daemon")
    d.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="least severe log lines written (default info; debug adds connection ends)")
    d.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines, or one JSON object per line for log collectors (time, level, pid, message and fields)")

    df = ps.add("define", "define (or redefine) a domain from a JSON file", DEFINE_HELP, raw=True)
    df.add_argument("file", metavar="FILE", help="the definition (JSON; see above)")
    _name(ps.add("undefine", "forget a stopped domain's definition"))
    st = ps.add("start", "start a defined domain")
    _name(st)
    st.add_argument("--paused", action="store_true", help="start with the CPUs stopped (resume starts them)")
    st.add_argument("--force", action="store_true",
                    help="start a guest that was migrated away (it must no longer run on the destination)")
    _name(ps.add("destroy", "stop a running domain's QEMU at once (no guest shutdown)"))
    _name(ps.add("suspend", "pause a running domain's CPUs"))
    _name(ps.add("resume", "run a paused domain's CPUs again"))
    sh = ps.add("shutdown", "power a domain down (ACPI), destroying it if it does not stop in time",
                "Ask the guest to power down (an ACPI power button press, as virsh shutdown). A guest that still runs "
                "after --timeout seconds (a guest without an OS never reacts) is destroyed. A memory-image guest "
                "stops at once.")
    _name(sh)
    sh.add_argument("--timeout", metavar="SECONDS", type=float, default=60.0,
                    help="how long the guest may take to power down before it is destroyed (default 60)")
    _name(ps.add("reboot", "reset a running QEMU guest (as a reset button)"))

    ls = ps.add("list", "list running domains (as virsh list)")
    which = ls.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="list every defined or running domain")
    which.add_argument("--inactive", action="store_true", help="list only domains that are not running")
    _json(ls)
    info = ps.add("dominfo", "a domain's state, kind, memory, pid and where it was migrated")
    _name(info)
    _json(info)
    _name(ps.add("domstate", "a domain's state in one word or two (running, paused, shut off, ...)"))
    _name(ps.add("dumpdef", "print a domain's definition as JSON (as virsh dumpxml)"))

    m = ps.add("migrate", "migrate a domain to another daemon",
               "Migrate NAME to the daemon at DEST_URI. With --p2p the source daemon drives the migration "
               "(without it, this client does); with --tunnelled (which needs --p2p) QEMU's migration data "
               "travels inside the daemons' connection. Ctrl-C cancels the migration (exit 130).")
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
    m.add_argument("--timeout", metavar="SECONDS", type=float, default=0,
                   help="once the transfer ran this long, make a live migration that does not converge complete: "
                        "suspend the guest (--timeout-suspend, the default; it resumes on the destination) or switch "
                        "to post-copy (--timeout-postcopy)")
    m.add_argument("--timeout-suspend", action="store_true", help="what --timeout does (the default)")
    m.add_argument("--timeout-postcopy", action="store_true",
                   help="at --timeout, switch to post-copy instead of suspending the guest (needs --postcopy)")
    m.add_argument("--auto-converge", action="store_true",
                   help="QEMU's auto-converge: throttle the guest's vCPUs while it dirties memory faster than it migrates")
    m.add_argument("--compressed", action="store_true",
                   help="compress the memory: QEMU's XBZRLE for QEMU guests, the tunnel's zstd for memory-image guests")
    m.add_argument("--comp-methods", metavar="LIST",
                   help="comma-separated methods for --compressed: xbzrle (QEMU guests) or zstd (memory-image guests)")
    m.add_argument("--abort-on-error", action="store_true",
                   help="cancel the migration if the guest stops on an I/O error meanwhile")
    m.add_argument("--detach", "--async", action="store_true",
                   help="return once the migration started and leave it running (needs --p2p); follow it with jobinfo")
    m.add_argument("--verbose", action="store_true",
                   help="show progress even when stderr is not a terminal (a bar on a terminal, one line a second otherwise)")
    m.add_argument("--postcopy", action="store_true", help="allow switching to post-copy (migrate-postcopy NAME); needs --p2p --live")
    m.add_argument("--postcopy-after-precopy", action="store_true", help="switch to post-copy after the first pre-copy pass")
    m.add_argument("--postcopy-resume", action="store_true",
                   help="resume NAME's post-copy migration, paused by a broken connection, over a new one to DEST_URI")
    m.add_argument("--retries", metavar="N", type=int, default=0,
                   help="post-copy: try to resume N times by itself (bounded backoff) when the connection breaks")
    m.add_argument("--postcopy-bandwidth", metavar="MIB_PER_S", type=int, default=0, help="post-copy's limit in MiB/s (default: none)")
    _json(m, "print one JSON summary instead of progress")
    _name(m)
    m.add_argument("dest", metavar="DEST_URI", help="the destination daemon: unix:///abs/path.sock, tls://host:port or tcp://host:port")
    mp = ps.add("migrate-postcopy", "switch the domain's running migration (started with --postcopy) to post-copy",
                "Switch NAME's running migration, started with --postcopy, to post-copy: the guest runs on the "
                "destination from now on and fetches the pages it lacks from the source. It cannot be aborted after this.")
    _name(mp)

    j = ps.add("jobinfo", "statistics of the domain's current (or last) migration job, either direction", aliases=("domjobinfo",))
    _name(j)
    j.add_argument("--completed", action="store_true", help="the last job that completed (kept after the guest left)")
    _json(j, "print JSON: every key always present, null when unknown; bytes, milliseconds, bytes per second")
    _name(ps.add("abort", "abort the domain's migration job; the source guest stays as it was", aliases=("domjobabort",)))
    s = ps.add("set-speed", "change the bandwidth limit of a running migration", aliases=("migrate-setspeed",))
    _name(s)
    s.add_argument("mib", metavar="MIB_PER_S", type=int, help="new limit in MiB/s, 0 for none")
    _name(ps.add("migrate-getspeed", "print the bandwidth limit of the domain's migration in MiB/s (0: none)"))
    mo = ps.add("monitor", "pass one QMP command to the domain's QEMU and print the reply", aliases=("qemu-monitor-command",))
    _name(mo)
    mo.add_argument("qmp", metavar="JSON", help='the QMP command, e.g. \'{"execute": "query-status"}\'')

    demo = ps.add("demo", "migrate a guest between two throw-away daemons and verify it",
                  "Start two daemons on unix sockets in a temporary directory, migrate a guest "
                  "PEER2PEER + TUNNELLED between them, verify the destination's memory and clean up.")
    demo.add_argument("--memory-mib", type=int, default=256, metavar="MIB",
                      help="MiB of random data in the guest's memory (default 256)")
    demo.add_argument("--guest", choices=("auto", "qemu", "image"), default="auto",
                      help="a real QEMU guest, a memory-image guest, or (auto) QEMU when installed")
    demo.add_argument("--native", action="store_true", help="also run a native (untunnelled) PEER2PEER migration to compare")
    _json(demo, "print one JSON summary")
    return ps


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ps = _parsers()
    args, extra = ps.top.parse_known_args(argv)
    if extra:
        ps.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _read_inputs(args: argparse.Namespace) -> None:
    """Read and check the files and JSON a command needs, before any connection."""
    args.definition = args.qmp_command = None
    if args.cmd == "migrate":
        if args.tunnelled and not args.p2p:
            raise DaemonError("cannot perform tunnelled migration without using peer2peer flag")
        if args.timeout_suspend and args.timeout_postcopy:
            raise DaemonError("--timeout-suspend and --timeout-postcopy exclude each other: pick what --timeout does")
        if (args.timeout_suspend or args.timeout_postcopy) and not args.timeout:
            raise DaemonError(f"--timeout-{'postcopy' if args.timeout_postcopy else 'suspend'} needs --timeout SECONDS")
        if args.timeout_postcopy and not args.postcopy:
            raise DaemonError("--timeout-postcopy needs --postcopy (both QEMUs must allow post-copy from the start)")
        if args.timeout < 0:
            raise DaemonError("--timeout must be >= 0 seconds")
        if args.comp_methods is not None and not args.compressed:
            raise DaemonError("--comp-methods needs --compressed")
    if args.cmd == "define":
        try:
            with open(args.file, encoding="utf-8") as f:
                args.definition = json.load(f)
        except OSError as exc:
            raise DaemonError(f"cannot read {args.file}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DaemonError(f"{args.file} is not valid JSON: {exc}") from None
    if args.cmd == "monitor":
        try:
            args.qmp_command = json.loads(args.qmp)
        except json.JSONDecodeError as exc:
            raise DaemonError(f"the QMP command is not valid JSON: {exc}") from None
        if not isinstance(args.qmp_command, dict):
            raise DaemonError('the QMP command must be a JSON object, as in {"execute": "query-status"}')


def _memory_mib(definition: dict[str, Any]) -> int | None:
    if "image" in definition:
        return int(definition["image"]["size_mib"])
    args = definition.get("qemu") or []
    for i, arg in enumerate(args[:-1]):
        if arg == "-m":
            value = args[i + 1].split(",")[0].removeprefix("size=")
            try:
                if value[-1:].upper() == "G":
                    return int(float(value[:-1]) * 1024)
                return int(float(value.rstrip("Mm")))
            except ValueError:
                return None
    return 128  # QEMU's default


def _print_dominfo(info: dict[str, Any]) -> None:
    definition = info.get("definition") or {}
    memory = _memory_mib(definition)
    rows = [
        ("Name", info["name"]),
        ("State", info["state"]),
        ("Kind", "memory-image guest" if info.get("kind") == "image" else "QEMU guest"),
        ("PID", info.get("pid") if info.get("pid") is not None else "-"),
        ("Memory", format_bytes(memory * 1024 * 1024) if memory is not None else "-"),
        ("Persistent", "yes" if info.get("persistent") else "no"),
    ]
    if info.get("migrated_to"):
        rows.append(("Migrated to", info["migrated_to"]))
    if definition.get("description"):
        rows.append(("Description", definition["description"]))
    print("\n".join(f"{key + ':':<16}{value}" for key, value in rows))


async def _client_command(args: argparse.Namespace) -> int:
    tls = check_tls(args.tls_cert, args.tls_key, args.tls_ca, "client", server=False)
    cmd = args.cmd
    async with connect(args.connect, tls=tls) as client:
        if cmd == "define":
            reply = await client.define(args.definition)
            print(f"Domain '{reply['name']}' {'redefined' if reply['replaced'] else 'defined'} from {args.file}")
        elif cmd == "undefine":
            await client.undefine(args.name)
            print(f"Domain '{args.name}' has been undefined")
        elif cmd == "start":
            state = await client.start(args.name, paused=args.paused, force=args.force)
            print(f"Domain '{args.name}' started ({state})")
        elif cmd == "destroy":
            await client.destroy(args.name)
            print(f"Domain '{args.name}' destroyed")
        elif cmd == "suspend":
            await client.suspend(args.name)
            print(f"Domain '{args.name}' suspended")
        elif cmd == "resume":
            await client.resume(args.name)
            print(f"Domain '{args.name}' resumed")
        elif cmd == "shutdown":
            how = await client.shutdown(args.name, timeout_s=args.timeout)
            print(f"Domain '{args.name}' {'is shut off' if how != 'destroyed' else f'did not power down within {args.timeout:g} s: destroyed'}")
        elif cmd == "reboot":
            await client.reboot(args.name)
            print(f"Domain '{args.name}' is being rebooted")
        elif cmd == "list":
            domains = await client.list()
            if args.inactive:
                domains = [d for d in domains if d["state"] == "shut off"]
            elif not args.all:
                domains = [d for d in domains if d["state"] != "shut off"]
            if args.json:
                print(json.dumps(domains))
            else:
                lines = [f"{'Name':<24} {'State':<12} PID", "-" * 44]
                lines += [f"{d['name']:<24} {d['state']:<12} {d['pid'] if d['pid'] is not None else '-'}" for d in domains]
                print("\n".join(lines))
        elif cmd == "dominfo":
            info = await client.domain_info(args.name)
            if args.json:
                print(json.dumps(info, sort_keys=True))
            else:
                _print_dominfo(info)
        elif cmd == "domstate":
            print((await client.domain_info(args.name))["state"])
        elif cmd == "dumpdef":
            print(json.dumps((await client.domain_info(args.name))["definition"], indent=2))
        elif cmd == "migrate":
            return await migrate(client, args)
        elif cmd == "jobinfo":
            info = await client.jobinfo(args.name, completed=args.completed)
            print(json.dumps(info, sort_keys=True) if args.json else format_jobinfo(info))
        elif cmd == "migrate-postcopy":
            await client.migrate_postcopy(args.name)
            print(f"Migration of '{args.name}' switched to post-copy")
        elif cmd == "abort":
            reply = await client.abort(args.name)
            print(f"Migration job of '{args.name}' {reply['status']}; {reply.get('where', '')}".rstrip("; "))
        elif cmd == "set-speed":
            await client.set_speed(args.name, args.mib)
            print(f"Bandwidth of the migration of '{args.name}' set to {args.mib or 'unlimited'}{' MiB/s' if args.mib else ''}")
        elif cmd == "migrate-getspeed":
            info = await client.jobinfo(args.name)
            limit = info.get("bandwidth_limit_bytes_per_s") if info.get("status") != "none" else None
            print(int(limit) // (1024 * 1024) if limit else 0)
        elif cmd == "monitor":
            print(json.dumps(await client.monitor(args.name, args.qmp_command), indent=2))
    return 0


async def _amain(args: argparse.Namespace) -> int:
    if args.cmd == "daemon":
        return await run_daemon(args)
    if args.cmd == "demo":
        from ._demo import run_demo

        return await run_demo(args)
    return await _client_command(args)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        _read_inputs(args)
        code = trio.run(_amain, args)
        sys.stdout.flush()  # a closed pipe shows here, while we can still say so quietly
        return code
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # every failure ends as one line (G in the style guide)
        if isinstance(exc, SystemExit):
            raise
        if is_broken_pipe(exc):
            # The reader went away (``tunnel list | head -1``): nothing to tell it, and nothing wrong here.
            silence_stdout()
            return 1
        message = user_message(exc)
        if message is None:
            try:
                where = f"the traceback is in {crash_log(exc)}"
            except OSError as log_error:
                where = f"and its traceback could not be written ({log_error.strerror})"
            message = f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); {where}"
        print(f"error: {message}", file=sys.stderr)
        return 1
