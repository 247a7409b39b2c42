"""``tunnel migrate``: the flags virsh users know, progress while it runs, Ctrl-C to cancel."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from ..client import Client
from ..control import DaemonError
from ._progress import ProgressBar, ProgressLines, format_bytes, format_duration

__all__ = ["migrate"]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    methods = None
    if args.comp_methods is not None:
        methods = [m.strip() for m in args.comp_methods.split(",") if m.strip()]
    return {
        "live": args.live, "p2p": args.p2p, "tunnelled": args.tunnelled, "bandwidth_mib": args.bandwidth, "dname": args.dname,
        "persistent": args.persistent, "undefine_source": args.undefinesource, "timeout_s": args.timeout,
        "timeout_action": "postcopy" if args.timeout_postcopy else "suspend",
        "auto_converge": args.auto_converge, "compressed": args.compressed, "comp_methods": methods,
        "abort_on_error": args.abort_on_error, "postcopy": args.postcopy, "postcopy_after_precopy": args.postcopy_after_precopy,
        "retries": args.retries, "postcopy_bandwidth_mib": args.postcopy_bandwidth,
    }


async def migrate(client: Client, args: argparse.Namespace) -> int:
    options = _options(args)
    if args.postcopy_resume:
        reply = await client.postcopy_resume(args.name, args.dest)
        print(json.dumps(reply, sort_keys=True) if args.json else f"Migration of {args.name} to {args.dest} resumed and completed")
        return 0
    if args.detach:
        reply = await client.migrate(args.name, args.dest, detach=True, **options)
        print(json.dumps(reply, sort_keys=True) if args.json else
              f"Migration of {args.name} to {args.dest} started; follow it with: tunnel jobinfo {args.name}")
        return 0
    progress: ProgressBar | ProgressLines | None = None
    if not args.json and sys.stderr.isatty():
        progress = ProgressBar()
    elif args.verbose and not args.json:
        progress = ProgressLines()
    result: dict[str, Any] = {}
    started = time.monotonic()
    interrupted: list[str] = []

    async def poll() -> None:
        assert progress is not None
        try:
            while True:
                await trio.sleep(0.5)
                info = await client.jobinfo(args.name)
                if info.get("status") == "active" and info.get("operation") == "outgoing":
                    progress.update(info)
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
                if progress is not None:
                    nursery.start_soon(poll)
                try:
                    result = await client.migrate(args.name, args.dest, **options)
                except DaemonError as exc:
                    error = exc
                nursery.cancel_scope.cancel()
    finally:
        if progress is not None:
            progress.close()
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
        rate = (result.get("data_processed") or 0) / max((result.get("time_elapsed_ms") or 0) / 1000, 1e-9)
        extras = []
        if result.get("tunnel_bytes_sent") is not None:
            extras.append(f"{format_bytes(result['tunnel_bytes_sent'])} through the tunnel")
        if result.get("timeout_suspended"):
            extras.append(f"guest suspended after --timeout {args.timeout:g} s")
        if result.get("timeout_postcopy"):
            extras.append(f"switched to post-copy after --timeout {args.timeout:g} s")
        print(
            f"Migration of {args.name} to {args.dest} completed in {format_duration(result.get('time_elapsed_ms'))}: "
            f"{format_bytes(result.get('data_processed'))} at {format_bytes(rate)}/s" + "".join(f", {e}" for e in extras)
        )
    return 0
