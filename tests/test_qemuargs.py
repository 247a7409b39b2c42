"""The definition allow list: one case per attack class, the project's own guests, and a real QEMU start.

Each refused case names the words the one-line error must contain, so a
message that stops naming the option or the property fails the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from qemu_fixtures import RandomRam, base_args, loader_args, random_ram, requires_qemu, run_dir

from tunnel.control import DaemonError
from tunnel.daemon._qemuargs import check_qemu_args
from tunnel.daemon._qemuopts import KEY_RE, OptsSyntaxError, join_opts, parse_opts
from tunnel.qemu import QemuProcess, run_state

__all__ = ["random_ram", "run_dir"]  # fixtures, imported for pytest

SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


@pytest.fixture
def dirs() -> Iterator[tuple[str, str]]:
    """(run_dir, allowed_dir): the run dir holds a symlink to /etc/passwd, the allowed dir one to /etc."""
    root = tempfile.mkdtemp(prefix="tqa-", dir="/tmp")
    run, allowed = os.path.join(root, "run"), os.path.join(root, "allowed")
    os.makedirs(run)
    os.makedirs(allowed)
    os.symlink("/etc/passwd", os.path.join(run, "escape"))
    os.symlink("/etc", os.path.join(allowed, "etc"))
    try:
        yield run, allowed
    finally:
        shutil.rmtree(root)


def check(args: list[str], dirs: tuple[str, str]) -> list[str]:
    run, allowed = dirs
    return check_qemu_args([a.replace("@A", allowed).replace("@R", run) for a in args], run_dir=run, allowed_dirs=[allowed])


ACCEPTED = {
    "standard": ["-machine", "q35", "-accel", "tcg", "-m", "128", "-nodefaults", "-display", "none"],
    "loader": ["-device", "loader,file=@A/ram.bin,addr=0x1000000,force-raw=on", "-mem-prealloc"],
    "kernel-debugcon": ["-kernel", "@A/bzImage", "-debugcon", "file:out.log"],
    "relative-in-run-dir": ["-chardev", "file,id=c0,path=serial.log", "-serial", "chardev:c0"],
    "absolute-in-run-dir": ["-chardev", "file,id=c0,path=@R/serial.log"],
    "user-net": ["-netdev", "user,id=n0,restrict=on,tftp=@A,bootfile=pxelinux.0", "-device", "virtio-net-pci,netdev=n0"],
    "tap-script-no-in-nic": ["-nic", "user,model=e1000"],
    "unix-socket": ["-chardev", "socket,id=s,path=@A/console.sock,server=on,wait=off"],
    "raw-drive": ["-drive", "if=none,id=d0,file=@A/disk.img,format=raw", "-device", "virtio-blk-pci,drive=d0"],
    "qcow2-no-backing": ["-blockdev", "driver=qcow2,node-name=d0,backing=,file.driver=file,file.filename=@A/d.qcow2"],
    "memory-backend-file": ["-object", "memory-backend-file,id=m0,size=128M,mem-path=@A/ram,share=on"],
    "rng-urandom": ["-object", "rng-random,id=r0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=r0"],
    "cpu-hotplug": ["-smp", "1,maxcpus=2", "-device", "qemu64-x86_64-cpu,socket-id=1,core-id=0,thread-id=0"],
    "global-and-flags": ["-global", "ICH9-LPC.disable_s3=1", "-no-reboot", "--no-shutdown", "-rtc", "base=utc"],
    "escaped-comma": ["-chardev", "file,id=c0,path=@A/a,,b.log"],
    "romfile-empty": ["-device", "virtio-net-pci,romfile="],
}


@pytest.mark.parametrize("args", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted(args: list[str], dirs: tuple[str, str]) -> None:
    expected = [a.replace("@A", dirs[1]).replace("@R", dirs[0]).replace("--no-", "-no-") for a in args]
    assert check(args, dirs) == expected


REFUSED = {
    # programs
    "bridge-helper": (["-netdev", "bridge,id=n0,helper=/tmp/x -c id"], ["-netdev bridge", "'helper'", "runs a host program"]),
    "bridge-default": (["-netdev", "bridge,id=n0,br=br0"], ["-netdev bridge is not allowed", "helper"]),
    "tap-script": (["-netdev", "tap,id=n0,script=/tmp/x"], ["-netdev tap", "'script'", "host program"]),
    "tap": (["-netdev", "tap,id=n0,script=no,downscript=no"], ["-netdev tap is not allowed"]),
    "smb": (["-netdev", "user,id=n0,smb=/"], ["'smb'", "smbd"]),
    "guestfwd": (["-netdev", "user,id=n0,guestfwd=tcp:10.0.2.1:80-cmd:sh"], ["'guestfwd'"]),
    "hostfwd": (["-nic", "user,hostfwd=tcp::2222-:22"], ["-nic user", "'hostfwd'", "ports"]),
    "exec-value": (["-device", "virtio-net-pci,romfile=exec:sh"], ["exec:"]),
    "plugin": (["-plugin", "file=/tmp/x.so"], ["-plugin", "shared object"]),
    # configuration that bypasses the checks
    "readconfig": (["-readconfig", "/tmp/x.cfg"], ["option -readconfig is not allowed"]),
    "set": (["-set", "drive.d0.file=/etc/shadow"], ["option -set is not allowed"]),
    "add-fd": (["-add-fd", "fd=3,set=1"], ["-add-fd", "file descriptors"]),
    "fd-property": (["-chardev", "socket,id=s,fd=3"], ["'fd'", "file descriptor"]),
    "json-value": (["-device", '{"driver":"loader","file":"/etc/shadow"}'], ["-device", "JSON"]),
    "unknown-option": (["-no-such-option"], ["-no-such-option", "allow list"]),
    "stray-image": (["/etc/shadow"], ["not an option", "disk image"]),
    # daemon options
    "monitor": (["--monitor", "stdio"], ["-monitor is added by the daemon"]),
    "sandbox": (["-sandbox", "off"], ["-sandbox is added by the daemon"]),
    "incoming": (["-incoming", "exec:sh"], ["-incoming is added by the daemon"]),
    # host files
    "chardev-file-outside": (["-chardev", "file,id=c,path=/etc/passwd"], ["-chardev file", "'/etc/passwd'", "--allow-path"]),
    "chardev-pipe-outside": (["-chardev", "pipe,id=c,path=/etc/x"], ["-chardev pipe", "outside"]),
    "serial-pipe": (["-serial", "pipe:/tmp/fifo"], ["-serial", "not allowed"]),
    "serial-dev": (["-serial", "/dev/ttyS0"], ["-serial", "not allowed"]),
    "serial-tcp": (["-serial", "tcp::4444,server=on"], ["-serial", "not allowed"]),
    "serial-mon": (["-serial", "mon:stdio"], ["mon:", "monitor"]),
    "debugcon-outside": (["-debugcon", "file:/etc/cron.d/x"], ["-debugcon", "outside"]),
    "dotdot": (["-chardev", "file,id=c,path=../../etc/passwd"], ["'..'"]),
    "symlink-run-dir": (["-kernel", "escape"], ["-kernel", "symlink"]),
    "symlink-allowed-dir": (["-kernel", "@A/etc/shadow"], ["-kernel", "resolves to '/etc/shadow'"]),
    "json-filename": (["-drive", 'if=none,format=raw,file=json:{"driver":"nbd"}'], ["-drive", "json:", "protocol"]),
    "nbd-filename": (["-drive", "if=none,format=raw,file=nbd:localhost:10809"], ["protocol"]),
    "nested-filename": (["-blockdev", "driver=raw,node-name=d,file.driver=file,file.filename=/etc/shadow"], ["file.filename"]),
    "host-device": (["-blockdev", "driver=host_device,node-name=d,filename=/dev/sda"], ["block driver 'host_device'"]),
    "probing": (["-drive", "if=none,file=@A/disk.img"], ["format="]),
    "qcow2-backing": (["-drive", "if=none,file=@A/d.qcow2,format=qcow2"], ["qcow2", "backing="]),
    "hda": (["-hda", "@A/disk.img"], ["-hda", "format"]),
    "loader-outside": (["-device", "loader,file=/etc/shadow,addr=0x1000000,force-raw=on"], ["-device loader", "outside"]),
    "romfile-outside": (["-global", "virtio-net-pci.romfile=/etc/shadow"], ["-global virtio-net-pci", "romfile"]),
    "mem-path-outside": (["-object", "memory-backend-file,id=m,size=1M,mem-path=/etc/x"], ["mem-path"]),
    "rng-dev-mem": (["-object", "rng-random,id=r,filename=/dev/mem"], ["rng-random", "'/dev/mem'"]),
    "dumpdtb": (["-machine", "q35,dumpdtb=/etc/x"], ["-machine q35", "dumpdtb"]),
    "keymap-traversal": (["-k", "../../../etc/shadow"], ["-k"]),
    "multiboot-initrd": (["-initrd", "@A/a,/etc/shadow"], ["-initrd", "one file"]),
    "acpitable-list": (["-acpitable", "file=@A/a.aml:/etc/shadow"], ["-acpitable", "'/etc/shadow'"]),
    # host devices and sockets
    "vfio": (["-device", "vfio-pci,host=0000:01:00.0"], ["-device vfio-pci is not allowed", "host device"]),
    "vhost-user": (["-device", "vhost-user-fs-pci,chardev=c"], ["vhost"]),
    "tcp-chardev": (["-chardev", "socket,id=s,host=0.0.0.0,port=4444,server=on"], ["'host'", "TCP"]),
    "abstract-socket": (["-chardev", "socket,id=s,path=x,abstract=on"], ["abstract"]),
    "tty": (["-chardev", "tty,id=t,path=/dev/ttyS0"], ["-chardev tty is not allowed"]),
    "vnc": (["-vnc", ":0"], ["-vnc"]),
    "gdb": (["-s"], ["-s", "debugger"]),
    "display": (["-display", "gtk"], ["-display", "none"]),
    "audiodev": (["-audiodev", "wav,id=a,path=/etc/x"], ["-audiodev wav is not allowed"]),
    "input-linux": (["-object", "input-linux,id=i,evdev=/dev/input/event0"], ["input-linux", "input device"]),
    # syntax
    "bare-flag": (["-chardev", "socket,id=s,path=x,server,nowait"], ["'server'", "server=on"]),
    "duplicate": (["-chardev", "file,id=c,path=ok.log,path=/etc/passwd"], ["'path' is given twice"]),
    "missing-value": (["-m"], ["-m needs a value"]),
    "nul": (["-append", "a\0b"], ["NUL"]),
}


@pytest.mark.parametrize(("args", "words"), REFUSED.values(), ids=REFUSED.keys())
def test_refused(args: list[str], words: list[str], dirs: tuple[str, str]) -> None:
    with pytest.raises(DaemonError) as info:
        check(args, dirs)
    message = info.value.message
    assert message.startswith("bad definition: ")
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ---------------------------------------------------------------------- parse_opts


@pytest.mark.parametrize(
    ("value", "implied", "pairs"),
    [
        ("user,id=n0", "type", [("type", "user"), ("id", "n0")]),
        ("type=user,id=n0", "type", [("type", "user"), ("id", "n0")]),
        ("file,id=c,path=a,,b", "backend", [("backend", "file"), ("id", "c"), ("path", "a,b")]),
        # QEMU: the first element is implied when ',' (even an escaped one) comes before any '='.
        ("a,,b=c", "type", [("type", "a,b=c")]),
        ("file.driver=file,file.filename=x", "driver", [("file.driver", "file"), ("file.filename", "x")]),
        ("x=", None, [("x", "")]),
    ],
)
def test_parse_opts(value: str, implied: str | None, pairs: list[tuple[str, str]]) -> None:
    assert parse_opts(value, implied) == pairs


@pytest.mark.parametrize("value", ["", "a=b,", "a=b,,,", "a=b,c", ",a=b", "=x", "a b=c"])
def test_parse_opts_refuses(value: str) -> None:
    with pytest.raises(OptsSyntaxError):
        parse_opts(value)


keys = st.from_regex(KEY_RE, fullmatch=True).filter(lambda k: len(k) < 20)
values = st.text(max_size=20)


@given(
    pairs=st.lists(st.tuples(keys, values), min_size=1, max_size=6),
    implied=st.one_of(st.none(), keys),
    first=values,
)
def test_parse_opts_round_trip(pairs: list[tuple[str, str]], implied: str | None, first: str) -> None:
    if implied is not None:
        pairs = [(implied, first), *pairs]
    text = join_opts(pairs, implied)
    assert parse_opts(text, implied) == pairs
    assert ",," in text or not any("," in v for _, v in pairs)


# ---------------------------------------------------------------------- real QEMU


@requires_qemu
async def test_checked_definition_starts_sandboxed(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """The standard test guest (loader + -mem-prealloc), as checked, starts under the daemon's sandbox and answers QMP."""
    ram = random_ram(1 << 20)
    args = [*base_args(), "-mem-prealloc", *loader_args(ram)]
    checked = check_qemu_args(args, run_dir=run_dir, allowed_dirs=[os.path.dirname(ram.path)])
    assert checked == args
    with trio.fail_after(30):
        async with await QemuProcess.start([*checked, *SANDBOX], run_dir=run_dir, name="vm", paused=True) as vm:
            assert await run_state(vm.qmp) == "prelaunch"
            await vm.qmp.execute("cont")
            assert await run_state(vm.qmp) == "running"
