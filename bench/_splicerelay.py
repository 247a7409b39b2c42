"""A relay that knows nothing: one connection in, one out, bytes spliced both ways.

``python bench/_splicerelay.py LISTEN_PATH TARGET_PATH`` listens on the unix
socket LISTEN_PATH, accepts one connection, connects to TARGET_PATH and
moves bytes both ways with ``os.splice`` through a 1 MiB pipe per direction,
one blocking thread per direction, until each side's EOF (passed on with
``shutdown(SHUT_WR)``).  No framing, no flow control, no event loop: the
least a process can do to carry QEMU's migration stream.

``bench/qemu.py`` chains two of them between two QEMUs (mode ``relay2``),
which is what two daemons relaying the stream cost at the very least: the
floor under the tunnel on this machine.  It prints ``ready`` once
listening, and its CPU seconds (user + system) when done.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
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


def main() -> None:
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
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"cpu {usage.ru_utime + usage.ru_stime:.6f}", flush=True)


if __name__ == "__main__":
    main()
