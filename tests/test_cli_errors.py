"""Every user error of the ``tunnel`` command is one line on stderr and exit 1, never a traceback.

Each case runs the command as a process, as an operator would.  A daemon
that fails to start leaves no state directory behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import trustme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def run(*args: str, timeout: float = 30, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnel", *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=ENV, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]


def assert_one_line(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


@pytest.fixture
def tmp() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tcli-") as d:  # short: unix socket paths are limited
        yield d


@pytest.fixture
def live_daemon(tmp: str) -> Iterator[str]:
    sock = f"{tmp}/live.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tunnel", "daemon", "--listen", f"unix://{sock}", "--state-dir", f"{tmp}/live"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            assert proc.poll() is None
            subprocess.run(["sleep", "0.05"], check=True)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_listen_on_a_live_daemons_socket(tmp: str, live_daemon: str) -> None:
    done = run("daemon", "--listen", f"unix://{live_daemon}", "--state-dir", f"{tmp}/second")
    assert_one_line(done, "another daemon is listening there")
    assert not os.path.exists(f"{tmp}/second")  # nothing left behind


@pytest.mark.parametrize(
    ("uri", "needle"),
    [("unix:///nonexistent-dir/x.sock", "/nonexistent-dir does not exist"), ("foo://", "bad URI 'foo://'"),
     ("unix:relative.sock", "absolute path"), ("tls://127.0.0.1:0", "host and a port")],
)
def test_bad_listen_uris(tmp: str, uri: str, needle: str) -> None:
    assert_one_line(run("daemon", "--listen", uri, "--state-dir", f"{tmp}/s"), needle)
    assert os.listdir(tmp) == []


def test_state_dir_that_cannot_be_created(tmp: str) -> None:
    with open(f"{tmp}/file", "w") as f:
        f.write("x")
    done = run("daemon", "--listen", f"unix://{tmp}/d.sock", "--state-dir", f"{tmp}/file/state")
    assert_one_line(done, "cannot use --state-dir", "not a directory")


def test_state_dir_that_is_not_writable(tmp: str) -> None:
    if os.geteuid() == 0:  # root writes anywhere but in sysfs
        locked = "/sys/tunnel-test"
    else:
        locked = f"{tmp}/locked"
        os.mkdir(locked, 0o500)
    done = run("daemon", "--listen", f"unix://{tmp}/d.sock", "--state-dir", f"{locked}/state")
    assert_one_line(done, "cannot use --state-dir", "not writable")


def test_state_dir_whose_parent_cannot_exist(tmp: str) -> None:
    done = run("daemon", "--listen", f"unix://{tmp}/d.sock", "--state-dir", "/proc/no-such-dir/state")
    assert_one_line(done, "cannot use --state-dir /proc/no-such-dir/state")


def test_a_daemon_whose_listener_fails_removes_the_state_dir_it_created(tmp: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run("daemon", "--insecure", "--listen", f"tcp://127.0.0.1:{port}", "--state-dir", f"{tmp}/a/b/state")
    assert_one_line(done, f"cannot listen on tcp://127.0.0.1:{port}")
    assert os.listdir(tmp) == []


def test_client_tls_certificate_and_key_that_do_not_match(tmp: str) -> None:
    ca = trustme.CA()
    one, two = ca.issue_cert("one.test"), ca.issue_cert("two.test")
    one.cert_chain_pems[0].write_to_path(f"{tmp}/one.pem")
    two.private_key_pem.write_to_path(f"{tmp}/two.key")
    ca.cert_pem.write_to_path(f"{tmp}/ca.pem")
    done = run("--connect", "tls://127.0.0.1:1", "--tls-cert", f"{tmp}/one.pem", "--tls-key", f"{tmp}/two.key",
               "--tls-ca", f"{tmp}/ca.pem", "list")
    assert_one_line(done, "do not belong together")
    done = run("daemon", "--listen", "tls://127.0.0.1:16999", "--state-dir", f"{tmp}/s", "--tls-cert", f"{tmp}/one.pem",
               "--tls-key", f"{tmp}/two.key", "--tls-ca", f"{tmp}/ca.pem")
    assert_one_line(done, "do not belong together")


@pytest.mark.parametrize("command", [["list", "--all"], ["jobinfo", "vm1"]])
def test_a_reader_that_goes_away_is_no_error_and_no_traceback(tmp: str, live_daemon: str, command: list[str]) -> None:
    """``tunnel list | head -1``: the pipe closes before we write."""
    with open(f"{tmp}/vm1.json", "w") as f:
        f.write('{"name": "vm1", "image": {"size_mib": 16, "random_mib": 1}}')
    assert run("--connect", f"unix://{live_daemon}", "define", f"{tmp}/vm1.json").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "tunnel", "--connect", f"unix://{live_daemon}", *command],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and err == "", err


def test_usage_errors_show_the_subcommands_usage() -> None:
    done = run("list", "--bogus")
    assert done.returncode == 2 and done.stderr.startswith("usage: tunnel list") and "unrecognized arguments: --bogus" in done.stderr
    done = run("migrate", "vm1")
    assert done.returncode == 2 and done.stderr.startswith("usage: tunnel migrate")


def test_an_internal_error_prints_one_line_and_the_log_with_its_traceback(tmp: str) -> None:
    code = (
        "import sys, tunnel.cli._main as m\n"
        "async def boom(args):\n"
        "    raise RuntimeError('something nobody expected')\n"
        "m._client_command = boom\n"
        "sys.exit(m.main(['list']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False,
                          env={**ENV, "TUNNEL_LOG_DIR": tmp})
    assert_one_line(done, "internal error (RuntimeError: something nobody expected)", "the traceback is in")
    path = done.stderr.rsplit("the traceback is in ", 1)[1].strip()
    assert path.startswith(tmp)
    with open(path) as f:
        assert "Traceback" in f.read()


def test_every_command_and_argument_has_help() -> None:
    import argparse

    from tunnel.cli._main import _parsers

    parsers = _parsers()
    for name, parser in parsers.commands.items():
        assert parser.description, name
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.dest)
    for action in parsers.sub._choices_actions:
        assert action.help, action.dest
