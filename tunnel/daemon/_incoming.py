"""The destination side of a migration: one prepared incoming QEMU (or memory image) per migration id.

The incoming migration owns its QEMU socket (the daemon's end of the
socketpair, for TUNNELLED), the tunnel stream once it arrives, and the image
writer of a memory-image guest.  :meth:`Incoming.discard` releases all of
them on every path: it aborts the stream, wakes the pump waiting on the
socket before closing it, and aborts the writer so nothing that looks
complete is left behind.

With post-copy's preempt channel (:mod:`._qemusock`) QEMU listens on a
unix socket instead, the daemon connects to it for the main stream at once
and again for the preempt stream when that arrives, and discards, detaches
and recovers both.

A post-copy migration past the switch is never discarded (:mod:`._postcopy`):
:meth:`Incoming.watch_switch` resumes the guest here as soon as QEMU reports
``postcopy-active`` and records the outcome; a lost connection only closes
QEMU's socket (QEMU pauses), and :meth:`Incoming.recover` readies a new
channel for the source's next connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import TunnelError
from ..control import DaemonError, TLSFiles
from ..endpoints import EndpointError, MemoryImageWriter, receive_into
from ..qemu import (
    MigrationError,
    MigrationStatus,
    QemuError,
    QemuProcess,
    QMPConnectionClosed,
    QMPError,
    postcopy_capabilities,
    query_capabilities,
    query_migration,
    recover_incoming_fd,
    recover_incoming_uri,
    run_state,
    set_tls,
    start_incoming_fd,
    start_incoming_uri,
    wait_migration,
)
from ..transport import TunnelStream
from ._imageguest import PAGE as PAGE_SIZE
from ._jobstats import complete_jobinfo
from ._migration import (
    FINISH_TIMEOUT,
    POLL_INTERVAL,
    POSTCOPY_STREAM_WINDOW,
    RETURN_PATH,
    domain_state,
    postcopy_buffers,
    pump_socket,
    socketpair,
)
from ._qemusock import connect_qemu
from ._rpc import public_message

if TYPE_CHECKING:
    from ._daemon import Daemon, Domain
    from ._session import Session

__all__ = ["Incoming"]

MiB = 1024 * 1024
#: How long a recovering destination waits for its QEMU to notice the old channel is gone.
PAUSE_WAIT = 15.0


class Incoming:
    """One prepared incoming migration on the destination daemon."""

    def __init__(
        self,
        domain: Domain,
        migration_id: bytes,
        *,
        tunnelled: bool,
        running: bool,
        verify: bool = False,
        persistent: bool = False,
        postcopy: bool = False,
        preempt: bool = False,
    ) -> None:
        self.domain = domain
        #: Post-copy allowed (both QEMUs' capabilities); ``switched`` once QEMU reported it: from then on it is never discarded.
        self.postcopy = postcopy
        self.switched = False
        #: The source asked for post-copy's preempt channel; ``preempt`` once QEMU listens for it (a unix socket, _qemusock).
        self.preempt_wanted = preempt
        self.preempt = False
        self.preempt_stream: TunnelStream | None = None
        self.preempt_sock: socket.socket | None = None
        #: The connection (session) this migration belongs to; None between a lost connection and POSTCOPY_RECOVER.
        self.owner: Session | None = None
        self.legs = 0
        #: Keep the definition once the guest arrived (virsh --persistent); else it goes when the guest stops.
        self.persistent = persistent
        self.stream: TunnelStream | None = None
        self.verify = verify
        self.image_sha256: str | None = None
        self.migration_id = migration_id
        self.tunnelled = tunnelled
        self.running = running
        self.sock: socket.socket | None = None
        self.uri: str | None = None
        self.stream_seen = trio.Event()
        self.pump_done = trio.Event()
        self.pump_error: str | None = None
        #: The inactive definition of the same name the destination had before, restored if this fails.
        self.previous: Domain | None = None
        #: The image writer of a memory-image guest's migration.
        self.writer: MemoryImageWriter | None = None
        #: For JOBINFO on the destination: who sent it, since when, and how it is going.
        self.source: str | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.state = "setup"
        self.error: str | None = None
        self.live = False
        #: The incoming QEMU's migration status when last asked (JOBINFO), and its post-copy blocktime once reported.
        self.qemu_status: str | None = None
        self.blocktime_stats: dict[str, Any] = {}

    async def info(self) -> dict[str, Any]:
        """The incoming job's statistics, with the keys of the outgoing side's (what the destination cannot know is None).

        While it runs, a QEMU guest's incoming QEMU is asked for its status:
        the phase (pre-copy or post-copy), a pause after a break, and
        the blocktime, which QEMU 7.2 reports once the migration completed.
        """
        process = self.domain.process
        if self.ended is None and isinstance(process, QemuProcess):
            try:
                with trio.move_on_after(2):
                    self._note(await query_migration(process.qmp))
            except QMPError:
                pass
        await trio.lowlevel.checkpoint()
        return self.snapshot()

    def _note(self, status: MigrationStatus) -> None:
        self.qemu_status = status.status
        if status.blocktime_ms is not None:
            self.blocktime_stats = {"postcopy_blocktime_ms": status.blocktime_ms,
                                    "postcopy_vcpu_blocktime_ms": list(status.vcpu_blocktime_ms)}

    def snapshot(self) -> dict[str, Any]:
        end = self.ended if self.ended is not None else time.monotonic()
        info: dict[str, Any] = {
            "domain": self.domain.name,
            "operation": "incoming",
            "status": self.state,
            "source": self.source,
            "tunnelled": self.tunnelled,
            "live": self.live,
            "time_elapsed_ms": int((end - self.started) * 1000),
            "error": self.error,
        }
        if self.ended is None and self.qemu_status is not None:
            # Native migrations have no stream to mark them active; a broken connection pauses post-copy.
            if self.qemu_status in ("postcopy-paused", "postcopy-recover"):
                info["status"] = "postcopy-paused"
            elif self.qemu_status in ("active", "postcopy-active", "device"):
                info["status"] = "active"
        if self.postcopy:
            switched = self.switched or (self.qemu_status or "").startswith("postcopy")
            info.update(postcopy=True, phase="post-copy" if switched else "pre-copy", postcopy_preempt=self.preempt,
                        postcopy_blocktime_ms=None, postcopy_vcpu_blocktime_ms=None)
            info.update(self.blocktime_stats)
        if self.stream is not None:
            stats = self.stream.statistics()
            info["tunnel_bytes_sent"] = stats.bytes_sent
            info["tunnel_bytes_received"] = stats.bytes_received
            if self.domain.is_image:
                info["memory_processed"] = info["data_processed"] = stats.bytes_received
        if self.domain.is_image:
            total = self.domain.definition["image"]["size_mib"] * MiB
            info.update(memory_total=total, data_total=total, page_size=PAGE_SIZE)
        return complete_jobinfo(info)

    def end(self, state: str, error: str | None = None) -> None:
        if self.ended is None:
            self.state, self.error, self.ended = state, error, time.monotonic()

    async def prepare(
        self, peer_sockname: Any, *, images_dir: str, tls: TLSFiles | None = None, owner: int | None = None
    ) -> dict[str, Any]:
        """:meth:`_prepare`; QEMU's refusal of post-copy said with what the operator can do about it."""
        try:
            return await self._prepare(peer_sockname, images_dir=images_dir, tls=tls, owner=owner)
        except QMPError as exc:
            if self.postcopy and "Postcopy is not supported" in exc.desc:
                raise DaemonError(
                    "the destination QEMU cannot do post-copy: it needs userfaultfd, which the kernel gives a QEMU "
                    "run as an unprivileged user (--qemu-user) only with sysctl vm.unprivileged_userfaultfd=1"
                ) from None
            raise

    async def _prepare(
        self, peer_sockname: Any, *, images_dir: str, tls: TLSFiles | None, owner: int | None
    ) -> dict[str, Any]:
        """Ready the destination; for a native migration return QEMU's endpoint.

        The data channel is as private as the connection that prepared it: a
        unix socket beside ours, QEMU's own TLS with this daemon's certificate
        (``verify-peer``) when the source came over TLS, plain TCP only when
        it came over an ``--insecure`` TCP listener.  QEMU accepts one
        connection on it.
        """
        if self.domain.is_image:
            # Size and page size come from the definition this daemon checked, never from the peer's stream header.
            self.writer = MemoryImageWriter(
                os.path.join(images_dir, f"{self.domain.name}.img"),
                mode=0o600,
                size=self.domain.definition["image"]["size_mib"] * MiB,
                page_size=PAGE_SIZE,
            )
            await trio.lowlevel.checkpoint()
            return {}
        process = self.domain.process
        assert isinstance(process, QemuProcess)
        capabilities = postcopy_capabilities(blocktime=True) if self.postcopy else None
        if self.tunnelled and self.postcopy and self.preempt_wanted and "postcopy-preempt" in await query_capabilities(process.qmp):
            await start_incoming_uri(process.qmp, self._unix_uri(), capabilities=postcopy_capabilities(blocktime=True, preempt=True))
            self.preempt = True
            self._connect_main()
            return {"postcopy_preempt": True}
        if self.tunnelled:
            await self._socket_for_qemu(lambda fd: start_incoming_fd(process.qmp, fd, capabilities=capabilities or RETURN_PATH))
            return {}
        if isinstance(peer_sockname, str):  # the source reached us over a unix socket
            await start_incoming_uri(process.qmp, self._unix_uri(), capabilities=capabilities)
            return {"uri": self.uri}
        host = peer_sockname[0]
        if tls is not None:
            creds = await trio.to_thread.run_sync(
                lambda: tls.write_qemu_dir(os.path.join(self.domain.guest_dir, "tls"), "server", owner=owner)
            )
            await set_tls(process.qmp, creds, endpoint="server")
        await start_incoming_uri(process.qmp, f"tcp:{host}:0", capabilities=capabilities)
        return await self._tcp_endpoint(process, host, tls is not None)

    async def _socket_for_qemu(self, give: Callable[[int], Awaitable[None]]) -> None:
        """A socketpair: *give* hands one end to QEMU (which keeps its own copy), ours becomes :attr:`sock`."""
        ours, theirs = socketpair()
        try:
            await give(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if self.switched:  # a recovery's new channel: post-copy from the start
            postcopy_buffers(ours)
        self.sock = ours

    def _connect_main(self) -> None:
        """Our connection to QEMU's unix socket, for the main channel: QEMU takes the first one it accepts for it."""
        assert self.uri is not None
        sock = connect_qemu(self.uri.removeprefix("unix:"))
        if self.switched:  # a recovery's new channel: post-copy from the start
            postcopy_buffers(sock)
        self.sock = sock

    def _unix_uri(self) -> str:
        """QEMU's incoming unix socket in the guest's directory (a leftover from an earlier leg removed)."""
        path = os.path.join(self.domain.guest_dir, "incoming.sock")
        if os.path.lexists(path):
            os.unlink(path)
        self.uri = f"unix:{path}"
        return self.uri

    async def _tcp_endpoint(self, process: QemuProcess, host: str, tls: bool) -> dict[str, Any]:
        status = await process.qmp.execute("query-migrate")
        for address in status.get("socket-address", []):
            if address.get("type") == "inet":
                port = address["port"]
                self.uri = f"tcp:{host}:{port}"
                return {"uri": self.uri, "tls": tls}
        raise DaemonError("the destination QEMU did not report its incoming TCP port")

    def _postcopy_window(self) -> None:
        """With the preempt channel, past the switch: less of the main stream in flight ahead of the requested pages.

        Both streams share the daemons' connection, whose socket holds
        whatever the main stream's window lets the source send ahead: the
        requested pages on the preempt stream wait behind that.
        """
        if self.preempt and self.switched and self.stream is not None:
            self.stream.set_buffering(POSTCOPY_STREAM_WINDOW)

    async def pump(self, stream: TunnelStream) -> None:
        self.stream = stream
        self._postcopy_window()  # a recovery's new stream: post-copy from the start
        self.state = "active"
        self.stream_seen.set()
        hide = (self.domain.store.state_dir,)
        if self.writer is not None:
            try:
                await receive_into(stream, self.writer)  # commits only after the stream's digest matched
            except (TunnelError, EndpointError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.pump_error = public_message(exc, hide=hide)
            finally:
                self.pump_done.set()
            return
        sock = self.sock
        done = self.pump_done  # this leg's: a post-copy recovery starts a new one with its own socket
        if sock is None:  # discarded before the stream came
            await stream.abort(reason="the incoming migration was discarded")
            done.set()
            return
        try:
            await pump_socket(stream, sock)
        except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self.pump_done is done:
                self.pump_error = public_message(exc, hide=hide)
        finally:
            if self.sock is sock:
                self._close_main()
            done.set()

    async def pump_preempt(self, stream: TunnelStream) -> None:
        """Post-copy's preempt channel: a second connection to QEMU (after the main one), pumped as the main one."""
        self.preempt_stream = stream
        legs = self.legs
        hide = (self.domain.store.state_dir,)
        try:
            if self.sock is None or self.uri is None:
                raise DaemonError("the incoming migration has no main channel for this preempt channel")
            self.preempt_sock = connect_qemu(self.uri.removeprefix("unix:"))
            await pump_socket(stream, self.preempt_sock)
        except (DaemonError, TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(TunnelError, trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.abort(reason=public_message(exc, hide=hide))
            if self.legs == legs and self.pump_error is None:
                self.pump_error = public_message(exc, hide=hide)
        finally:
            if self.legs == legs:
                self._close_preempt()

    def _close_sock(self) -> None:
        """Close our ends of QEMU's sockets, waking any task waiting on one first (it then sees ClosedResourceError)."""
        self._close_main()
        self._close_preempt()

    def _close_main(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    def _close_preempt(self) -> None:
        """The preempt channel's end, on its own: it may carry the last requested pages after the main one ended."""
        sock, self.preempt_sock, self.preempt_stream = self.preempt_sock, None, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def discard(self) -> None:
        """Release what this migration holds: the streams (aborted), QEMU's sockets, an uncommitted image."""
        await self._abort_streams(self.stream, "the incoming migration was discarded")
        self._close_sock()
        if self.writer is not None and not self.writer.committed:
            await self.writer.abort("the incoming migration was discarded")

    async def _abort_streams(self, main: TunnelStream | None, reason: str) -> None:
        """Abort *main* and the preempt stream, each bounded: a broken connection cannot hang a clean-up."""
        for stream in (main, self.preempt_stream):
            if stream is not None:
                with trio.move_on_after(1), contextlib.suppress(TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.abort(reason=reason)

    async def finish(self, daemon: Daemon) -> str:
        """Wait until the guest is loaded; record that it arrived; resume it if it ran on the source; return its state.

        The outcome is on disk before the guest runs, so a source that lost
        our answer learns "finished" and never resumes its own copy.
        """
        if self.writer is not None:
            with trio.move_on_after(FINISH_TIMEOUT) as waited:
                await self.pump_done.wait()
            if waited.cancelled_caught or not self.stream_seen.is_set():
                raise DaemonError(f"the memory image of {self.domain.name!r} did not arrive")
            if self.pump_error is not None or not self.writer.committed:
                raise DaemonError(f"the memory image of {self.domain.name!r} was not committed: {self.pump_error}")
            if self.verify:
                self.image_sha256 = await trio.to_thread.run_sync(self.writer.digest)
            with trio.CancelScope(shield=True):  # past the point of no return: see below
                await daemon.store.set_outcome(self.migration_id.hex(), "finished")
                await daemon.start_incoming_image(self.domain, running=self.running)
            return "running" if self.running else "paused"
        process = self.domain.process
        if not isinstance(process, QemuProcess):
            raise DaemonError(f"the incoming QEMU of {self.domain.name!r} exited")
        with trio.move_on_after(FINISH_TIMEOUT) as waited:
            try:
                await wait_migration(process.qmp, poll=POLL_INTERVAL)
            except MigrationError as exc:
                raise DaemonError(f"the destination QEMU failed to load {self.domain.name!r}: {exc}") from None
            except QMPConnectionClosed:  # its monitor went away: the QEMU was killed or crashed while loading
                raise DaemonError(f"the incoming QEMU of {self.domain.name!r} exited while loading it") from None
            except QemuError as exc:
                raise DaemonError(f"could not ask the incoming QEMU of {self.domain.name!r} how loading went: {exc}") from None
        if waited.cancelled_caught:
            raise DaemonError(f"the destination QEMU did not finish loading {self.domain.name!r} within {FINISH_TIMEOUT:.0f} s")
        if self.pump_error is not None:
            raise DaemonError(f"the migration stream failed on the destination: {self.pump_error}")
        # Once "finished" is recorded the guest is ours: a source that lost the connection (which cancels
        # this handler) learns "finished" and stops its copy, so nothing from here may be undone.
        with trio.CancelScope(shield=True):
            await daemon.store.set_outcome(self.migration_id.hex(), "finished")
            if self.running and await run_state(process.qmp) != "running":
                await process.qmp.execute("cont")
            state = domain_state(await run_state(process.qmp))
        return state

    async def blocktime(self) -> dict[str, Any]:
        """QEMU's post-copy blocktime (reported once the incoming migration completed)."""
        process = self.domain.process
        if not self.switched or not isinstance(process, QemuProcess):
            await trio.lowlevel.checkpoint()
            return {}
        self._note(await query_migration(process.qmp))
        return dict(self.blocktime_stats)

    # ------------------------------------------------------------------
    # Post-copy

    async def watch_switch(self, daemon: Daemon) -> None:
        """Until the switch: poll QEMU; at ``postcopy-active`` record the outcome and resume the guest here.

        The outcome is written before the guest runs, so a source that asks
        later (MIGRATION_OUTCOME) never resumes its stale copy.
        """
        process = self.domain.process
        if not isinstance(process, QemuProcess):
            return
        try:
            while self.domain.incoming is self:
                status = await query_migration(process.qmp)
                if status.postcopy:
                    break
                if status.status in ("completed", "failed", "cancelled"):
                    return  # never switched: FINISH (or the discard) takes it from here
                await trio.sleep(0.01)
            else:
                return
        except QMPError:
            return  # QEMU went away: its watcher discards it
        self.switched = True
        if self.sock is not None:  # we send to QEMU: requested pages queue behind what we already wrote
            postcopy_buffers(self.sock)
        self._postcopy_window()
        with trio.CancelScope(shield=True):
            await daemon.store.set_outcome(self.migration_id.hex(), "finished")
            await daemon.store.set_runtime(
                self.domain.name,
                "migration",
                {"role": "destination", "migration_id": self.migration_id.hex(), "running": self.running, "postcopy": True,
                 "tunnelled": self.tunnelled},
            )
            if self.running:
                try:
                    await process.qmp.execute("cont")
                except QMPError as exc:
                    daemon.log(f"{self.domain.name}: cannot resume the guest at the switch to post-copy: {exc}")
        daemon.log(f"incoming {self.domain.name}: post-copy; the guest runs here")

    async def detach_stream(self) -> None:
        """The old channel is gone (or given up): abort its stream, close QEMU's socket so QEMU pauses."""
        stream, self.stream = self.stream, None
        await self._abort_streams(stream, "the source resumed this post-copy migration on another connection")
        self._close_sock()

    async def recover(self, source_status: str, peer_sockname: Any, *, tls: TLSFiles | None = None, owner: int | None = None) -> dict[str, Any]:
        """POSTCOPY_RECOVER: a source resumes on a new connection.  Ready a new channel if QEMU paused; return it.

        The source's QEMU state decides: ``postcopy-paused`` means the old
        channel is gone, so this QEMU pauses too (we close its socket; a
        native channel breaks on its own) and gets a new one with
        ``migrate-recover``; any other state needs no new channel.
        """
        process = self.domain.process
        if not isinstance(process, QemuProcess):
            raise DaemonError(f"the incoming QEMU of {self.domain.name!r} is gone")
        if source_status != "postcopy-paused":
            status = await query_migration(process.qmp)
            return {"state": status.status}
        if self.tunnelled:
            await self.detach_stream()
        with trio.move_on_after(PAUSE_WAIT):
            status = await query_migration(process.qmp)
            while status.status == "postcopy-active":
                await trio.sleep(0.02)
                status = await query_migration(process.qmp)
        if status.status != "postcopy-paused":
            raise DaemonError(f"the incoming QEMU of {self.domain.name!r} is {status.status}, not paused; try again")
        self.legs += 1
        self.stream = None
        self.stream_seen = trio.Event()
        self.pump_done = trio.Event()
        self.pump_error = None
        # The channels are as the migration started (a restarted daemon knows it from QEMU only).
        self.preempt = self.tunnelled and (await query_capabilities(process.qmp)).get("postcopy-preempt", False)
        if self.preempt:
            await recover_incoming_uri(process.qmp, self._unix_uri())
            self._connect_main()
            return {"state": "postcopy-recover"}
        if self.tunnelled:
            await self._socket_for_qemu(lambda fd: recover_incoming_fd(process.qmp, fd, fd_name=f"recover{self.legs}"))
            return {"state": "postcopy-recover"}
        if isinstance(peer_sockname, str):
            await recover_incoming_uri(process.qmp, self._unix_uri())
            return {"state": "postcopy-recover", "uri": self.uri}
        await recover_incoming_uri(process.qmp, f"tcp:{peer_sockname[0]}:0")
        reply = await self._tcp_endpoint(process, peer_sockname[0], tls is not None)
        return {"state": "postcopy-recover", **reply}
