"""The core imports without trio and two cores complete a handshake."""

from __future__ import annotations

import subprocess
import sys

import tunnel


def test_core_does_not_import_trio() -> None:
    code = "import sys, tunnel; assert 'trio' not in sys.modules, sorted(m for m in sys.modules if 'trio' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_handshake() -> None:
    a, b = tunnel.Connection(client=True), tunnel.Connection(client=False)
    ev_b = b.receive_data(a.bytes_to_send())
    ev_a = a.receive_data(b.bytes_to_send())
    assert [type(e) for e in ev_a] == [tunnel.HandshakeComplete]
    assert [type(e) for e in ev_b] == [tunnel.HandshakeComplete]
    assert a.state is b.state is tunnel.ConnectionState.OPEN
