"""A plain blocking-socket sender and receiver, the simplest copy a user would write (bench helper).

Run as a process: ``_sockcopy.py send PORT BYTES`` connects to 127.0.0.1:PORT
(retrying while nothing listens yet, so a relay may start behind it), notes
``time.monotonic()``, sends BYTES of random data with ``sendall`` of 1 MiB,
shuts down its side and prints ``{"start": T}``.  ``_sockcopy.py recv FD``
prints ``ready``, accepts one connection on the listening socket FD, reads with ``recv_into``
of 1 MiB until EOF and prints ``{"end": T, "bytes": N}``.  CLOCK_MONOTONIC
is one clock for every process on the machine, so ``end - start`` is the
transfer time.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

CHUNK = 1024 * 1024


def send(port: int, total: int) -> dict[str, float]:
    block = memoryview(os.urandom(16 * CHUNK))
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with sock:
        start = time.monotonic()
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            off = sent % len(block)
            n = min(n, len(block) - off)
            sock.sendall(block[off : off + n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the far end closes once it has everything
    return {"start": start}


def receive(fd: int) -> dict[str, float]:
    listener = socket.socket(fileno=fd)
    print("ready", flush=True)
    conn, _ = listener.accept()
    listener.close()
    buf = bytearray(CHUNK)
    got = 0
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        end = time.monotonic()
    return {"end": end, "bytes": got}


def main() -> None:
    role = sys.argv[1]
    result = send(int(sys.argv[2]), int(sys.argv[3])) if role == "send" else receive(int(sys.argv[2]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
