"""A relay that knows nothing: one connection in, one out, bytes spliced both ways.

``python bench/_splicerelay.py LISTEN_PATH TARGET_PATH`` listens on the unix
socket LISTEN_PATH, accepts one connection, connects to TARGET_PATH and
moves bytes both ways with ``os.splice`` through a 1 MiB pipe per direction,
one blocking thread per direction, until each side's EOF (passed on with
``shutdown(SHUT_WR)``).  No framing, no flow control, no event loop: the
least a process can do to carry QEMU's migration stream.

``bench/qemu.py`` and ``bench/postcopy.py`` chain two of them between two
QEMUs (mode ``relay2``, :func:`start_relays`), which is what two daemons
relaying the stream cost at the very least: the floor under the tunnel on
this machine.  A relay prints ``ready`` once listening, and dies with the
process that started it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading

PIPE_SIZE = 1024 * 1024


def pump(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        while True:
            n = os.splice(src.fileno(), w, PIPE_SIZE)
            if not n:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass  # the other side went away: the migration says why
    finally:
        os.close(r)
        os.close(w)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


async def start_relays(run_dir: str, target: str, procs: list[subprocess.Popen[bytes]]) -> str:
    """Two relays (added to *procs*) in a chain ending at the unix socket *target*; returns the path to connect to."""
    import trio

    for name in ("relay-b", "relay-a"):  # from the destination's side: each one's target must listen first
        listen = os.path.join(run_dir, f"{name}.sock")
        if os.path.lexists(listen):
            os.unlink(listen)
        # Popen returns at once; the relay says "ready" on its stdout, read in a thread.
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), listen, target], stdout=subprocess.PIPE)  # noqa: ASYNC220
        procs.append(proc)
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"splice relay {name} did not start: {line!r}")
        target = listen
    return target


def stop_relays(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: never outlive the benchmark
    listen_path, target_path = sys.argv[1], sys.argv[2]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen_path)
    server.listen(1)
    print("ready", flush=True)
    inbound, _ = server.accept()
    server.close()
    outbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outbound.connect(target_path)
    threads = [threading.Thread(target=pump, args=pair) for pair in ((inbound, outbound), (outbound, inbound))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
