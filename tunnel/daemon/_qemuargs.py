"""The allow list of QEMU options a guest definition may use.

Definitions come from clients (DEFINE) and from source daemons (PREPARE),
and QEMU runs as root, so a definition must not be able to make QEMU run a
program, open host devices or sockets, or read and write files outside the
places the operator chose.  Theory of operation:

* Every argument must be an option on the allow list below (``--opt`` is
  read as ``-opt``, as QEMU does); anything else is refused, with a reason
  where the option is a known danger.  A stray argument is refused because
  QEMU would open it as a disk image.
* ``key=value`` values are parsed with :func:`._qemuopts.parse_opts`, the
  way QEMU reads them (``,,`` escapes a comma, the first element may be an
  implied key such as the netdev type).  JSON values (``-device {...}``)
  are refused: they would need a second parser.
* Then, for every property: one that passes a host file descriptor or runs
  a program is refused; one of the allowed *types* (device driver, netdev
  type, chardev backend, object type, block driver) is required; one that
  names a file must satisfy the host-path rule of :mod:`._hostpaths`.
* The returned arguments are the input with ``--opt`` spelled ``-opt``;
  values are kept verbatim, so a definition migrates as it was written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from ..control import DaemonError
from ._hostpaths import HostPathError, PathPolicy
from ._qemuopts import OptsSyntaxError, parse_opts

__all__ = ["check_qemu_args"]

PREFIX = "bad definition: "

# --------------------------------------------------------------------------- properties, whatever the option

#: Properties that name a host file or directory QEMU opens (matched on the last dotted component).
PATH_KEYS = frozenset(
    {
        "file", "filename", "path", "in", "romfile", "kernel", "initrd", "dtb", "dumpdtb", "firmware", "bios",
        "mem-path", "tftp", "bootfile", "splash", "logfile", "dir", "data-file", "rrfile", "config", "events",
        "sock", "rootdir", "hidraw", "sysfsdev", "socket",
    }
)  # fmt: skip
#: Properties holding an inherited file descriptor number: the daemon passes none, any number is one of its own.
FD_KEYS = frozenset({"fd", "fds", "vhostfd", "vhostfds", "sock_fd"})
#: Properties that run a host program unless they say "none" ("no" or empty).
SCRIPT_KEYS = frozenset({"script", "downscript"})
#: Properties refused whatever their value, with why.
HOST_ACCESS_KEYS = {
    "helper": "runs a host program",
    "smb": "runs a host program (smbd)",
    "guestfwd": "connects guest traffic to host sockets or programs (cmd:)",
    "hostfwd": "opens listening ports on the host",
}
NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")

# --------------------------------------------------------------------------- allowed types

#: Emulated devices with no host resources of their own; their backends (drive=, chardev=, netdev=, memdev=) are checked where defined.
DEVICES = frozenset(
    {
        # buses and bridges
        "pcie-root-port", "pci-bridge", "pcie-pci-bridge", "ioh3420", "x3130-upstream", "xio3130-downstream",
        "i82801b11-bridge", "pxb", "pxb-pcie", "usb-hub",
        # USB controllers and devices
        "qemu-xhci", "nec-usb-xhci", "usb-ehci", "ich9-usb-ehci1", "ich9-usb-ehci2", "ich9-usb-uhci1", "ich9-usb-uhci2",
        "ich9-usb-uhci3", "ich9-usb-uhci4", "ich9-usb-uhci5", "ich9-usb-uhci6", "piix3-usb-uhci", "piix4-usb-uhci",
        "pci-ohci", "usb-kbd", "usb-mouse", "usb-tablet", "usb-storage", "usb-bot", "usb-uas", "usb-serial", "usb-net",
        # storage
        "virtio-blk-pci", "virtio-blk-pci-non-transitional", "virtio-blk-pci-transitional", "virtio-blk-device",
        "virtio-scsi-pci", "virtio-scsi-pci-non-transitional", "virtio-scsi-pci-transitional", "virtio-scsi-device",
        "scsi-hd", "scsi-cd", "ide-hd", "ide-cd", "ich9-ahci", "piix3-ide", "piix4-ide", "isa-ide", "nvme", "nvme-ns",
        "lsi53c895a", "megasas", "megasas-gen2", "pvscsi", "floppy", "isa-fdc",
        # network
        "virtio-net-pci", "virtio-net-pci-non-transitional", "virtio-net-pci-transitional", "virtio-net-device",
        "e1000", "e1000-82544gc", "e1000-82545em", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci", "pcnet", "tulip",
        # serial, console, input
        "isa-serial", "pci-serial", "pci-serial-2x", "pci-serial-4x", "isa-parallel", "isa-debugcon",
        "virtio-serial-pci", "virtio-serial-pci-non-transitional", "virtio-serial-pci-transitional",
        "virtio-serial-device", "virtconsole", "virtserialport", "i8042", "vmmouse",
        "virtio-keyboard-pci", "virtio-mouse-pci", "virtio-tablet-pci",
        "virtio-keyboard-device", "virtio-mouse-device", "virtio-tablet-device",
        # display and sound (-display and -audiodev only allow "none")
        "VGA", "virtio-vga", "virtio-gpu-pci", "virtio-gpu-device", "bochs-display", "cirrus-vga", "qxl-vga", "qxl",
        "ramfb", "secondary-vga", "isa-vga", "vmware-svga", "ati-vga",
        "ich9-intel-hda", "intel-hda", "hda-duplex", "hda-output", "hda-micro", "AC97", "ES1370",
        # memory, platform, misc
        "loader", "pc-dimm", "virtio-mem-pci", "virtio-balloon-pci", "virtio-balloon-pci-non-transitional",
        "virtio-balloon-pci-transitional", "virtio-balloon-device", "virtio-rng-pci", "virtio-rng-pci-non-transitional",
        "virtio-rng-pci-transitional", "virtio-rng-device", "virtio-iommu-pci", "intel-iommu", "amd-iommu",
        "isa-debug-exit", "pvpanic", "pvpanic-pci", "i6300esb", "ib700", "vmcoreinfo", "vmgenid", "sga",
    }
)  # fmt: skip
#: CPU models, for -device hotplug of CPUs.
CPU_DEVICE_RE = re.compile(r"[A-Za-z0-9_.-]+-x86_64-cpu")
#: Why well-known devices are refused, by name prefix.
DEVICE_REASONS = {
    "vfio": "it passes a host device through",
    "vhost": "it hands the device to a host vhost backend (a kernel device or another process)",
    "usb-host": "it passes a host USB device through",
    "usb-redir": "it redirects a USB device from outside the guest's sandbox",
    "u2f-passthru": "it passes a host security key through",
    "ivshmem": "it shares memory with other host processes",
    "virtio-9p": "it exports a host directory to the guest",
    "usb-mtp": "it exports a host directory to the guest",
    "scsi-generic": "it passes SCSI commands through to a host device",
    "scsi-block": "it passes SCSI commands through to a host device",
    "virtio-input-host": "it reads a host input device",
    "tpm": "it needs a host TPM (-tpmdev is not allowed)",
    "x-pci-proxy-dev": "it talks to another host process",
    "ipmi-bmc-extern": "it talks to a host process",
    "pvrdma": "it uses host RDMA devices",
}

#: Block drivers: plain files and formats whose metadata cannot name other host files (qcow2's backing is pinned below).
BLOCK_DRIVERS = frozenset({"file", "raw", "qcow2", "null-co", "null-aio", "throttle"})

OBJECT_REASONS = {
    "input-linux": "it reads a host input device",
    "pr-manager-helper": "it connects to a host helper program",
    "cryptodev-vhost-user": "it connects to another host process",
    "dbus-vmstate": "it connects to the host's D-Bus",
    "x-remote-object": "it talks to another host process",
    "can-host-socketcan": "it opens a host CAN interface",
    "secret_keyring": "it reads the host kernel's keyring",
    "rng-egd": "it talks to an entropy daemon over a chardev",
    "filter-dump": "it writes guest traffic to a host file",
    "colo-compare": "it opens host sockets through chardevs",
}
#: The host's entropy sources, which rng-random may read although they are outside every allowed directory.
ENTROPY_DEVICES = frozenset({"/dev/urandom", "/dev/random"})

NETDEV_REASONS = {
    "tap": "it creates a host TAP interface and runs host scripts; use user networking",
    "bridge": "it runs QEMU's bridge helper, a host program, as root; use user networking",
    "socket": "it opens network sockets on the host",
    "stream": "it opens network sockets on the host",
    "dgram": "it opens network sockets on the host",
    "l2tpv3": "it opens network sockets on the host",
    "vde": "it connects to another host process",
    "vhost-user": "it connects to another host process",
    "vhost-vdpa": "it opens a host device",
}

CHARDEV_REASONS = {
    "tty": "it opens a host device",
    "serial": "it opens a host device",
    "parallel": "it opens a host device",
    "parport": "it opens a host device",
    "udp": "it opens network sockets on the host",
    "pty": "it creates a host pseudo-terminal",
    "braille": "it connects to a host service",
    "mux": "it is internal to QEMU; use mux=on on another backend",
    "spicevmc": "it needs a SPICE server",
    "spiceport": "it needs a SPICE server",
    "qemu-vdagent": "it needs a display",
    "dbus": "it connects to the host's D-Bus",
}
#: A TCP chardev socket listens on or connects to host ports; a unix one is a checked path.
TCP_SOCKET_KEYS = frozenset({"host", "port", "to", "ipv4", "ipv6", "localaddr", "localport", "numeric", "keep-alive"})

# --------------------------------------------------------------------------- options

#: Options refused outright, with why (the daemon's own options say so).
REFUSED = {
    "-readconfig": "it reads a configuration file that these checks never see",
    "-writeconfig": "it writes a host file",
    "-add-fd": "it passes host file descriptors",
    "-set": "it changes properties after they are checked",
    "-plugin": "it loads a shared object into QEMU",
    "-chroot": "the daemon decides where QEMU runs",
    "-runas": "the daemon decides the user QEMU runs as",
    "-gdb": "it opens a debugger port",
    "-s": "it opens a debugger port",
    "-vnc": "it opens a display server port",
    "-spice": "it opens a display server port",
    "-trace": "it reads and writes host files",
    "-D": "QEMU's log already goes to the guest's log file",
    "-loadvm": "the daemon owns the guest's state",
    "-dump-vmstate": "it writes a host file",
    "-semihosting": "it gives the guest access to host files",
    "-semihosting-config": "it gives the guest access to host files",
    "-tpmdev": "it opens a host TPM or talks to a host emulator",
    "-fsdev": "it exports a host directory to the guest",
    "-virtfs": "it exports a host directory to the guest",
    "-usbdevice": "it can pass host USB devices through",
    "-net": "use -netdev or -nic, which are checked",
    "-nographic": "it puts a monitor on QEMU's standard streams; use -display none",
    "-iscsi": "it configures connections to host storage",
    "-hda": "QEMU guesses its format (a guest can turn a raw image into one naming host files); use -drive with format=",
    "-hdb": "QEMU guesses its format; use -drive with format=",
    "-hdc": "QEMU guesses its format; use -drive with format=",
    "-hdd": "QEMU guesses its format; use -drive with format=",
    "-cdrom": "QEMU guesses its format; use -drive with media=cdrom and format=",
    "-fda": "QEMU guesses its format; use -drive with if=floppy and format=",
    "-fdb": "QEMU guesses its format; use -drive with if=floppy and format=",
    "-pflash": "QEMU guesses its format; use -drive with if=pflash and format=",
    "-mtdblock": "QEMU guesses its format; use -drive with format=",
    "-sd": "QEMU guesses its format; use -drive with format=",
    "-async-teardown": "it starts a second process, which the sandbox forbids",
    "-audio": "use -audiodev none and a sound device",
    "-preconfig": "the daemon starts and drives QEMU itself",
    "-xen-domid": "Xen is not supported",
    "-xen-attach": "Xen is not supported",
    "-xen-domid-restrict": "Xen is not supported",
}
#: Options the daemon adds itself.
DAEMON_OPTIONS = frozenset({"-qmp", "-qmp-pretty", "-monitor", "-mon", "-incoming", "-S", "-daemonize", "-pidfile", "-sandbox"})

FLAGS = frozenset(
    {
        "-nodefaults", "-no-user-config", "-no-reboot", "-no-shutdown", "-enable-kvm", "-mem-prealloc", "-snapshot",
        "-no-hpet", "-no-acpi", "-no-fd-bootchk", "-usb", "-only-migratable",
    }
)  # fmt: skip

Extra = Callable[[PathPolicy, str, dict[str, str]], frozenset[str]]
"""An option- or type-specific check: (policy, label, properties) -> properties it checked itself."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyValue:
    """How to check an option whose value is ``key=value,...``."""

    implied: str | None = None
    #: The properties QEMU knows for the option, where they are few; None: any (the property rules still apply).
    keys: frozenset[str] | None = None
    #: Allowed values of the implied key (the type), each with its extra check; None: any type.
    types: Mapping[str, Extra | None] | None = None
    #: More allowed types, by pattern (CPU models for -device).
    type_pattern: re.Pattern[str] | None = None
    type_reasons: Mapping[str, str] = field(default_factory=dict)
    extra: Extra | None = None

    def __call__(self, policy: PathPolicy, option: str, value: str) -> None:
        if value.lstrip().startswith("{"):
            _refuse(f"{option}: JSON values are not accepted; write key=value,...")
        try:
            pairs = parse_opts(value, self.implied)
        except OptsSyntaxError as exc:
            _refuse(f"{option} {value!r}: {exc}")
        props: dict[str, str] = {}
        for key, text in pairs:
            if key in props:
                _refuse(f"{option}: property '{key}' is given twice")
            props[key] = text
        kind = props.get(self.implied) if self.implied is not None else None
        label = f"{option} {kind}" if kind else option
        if self.keys is not None:
            unknown = sorted(set(props) - self.keys)
            if unknown:
                _refuse(f"{label}: property '{unknown[0]}' is not allowed (allowed: {', '.join(sorted(self.keys))})")
        _check_host_access(label, props)
        checked: frozenset[str] = frozenset()
        if self.types is not None:
            assert self.implied is not None
            if kind is None:
                _refuse(f"{option}: give the {self.implied} first, as in {option} {next(iter(self.types))},...")
            if kind not in self.types and not (self.type_pattern is not None and self.type_pattern.fullmatch(kind)):
                reason = self.type_reasons.get(kind) or _prefix_reason(kind, self.type_reasons) or "it is not on the allow list"
                _refuse(f"{label} is not allowed: {reason}")
            type_extra = self.types.get(kind)
            if type_extra is not None:
                checked |= type_extra(policy, label, props)
        if self.extra is not None:
            checked |= self.extra(policy, label, props)
        for key, text in props.items():
            if key not in checked and key.rsplit(".", 1)[-1] in PATH_KEYS:
                _check_path(policy, label, key, text)


def check_qemu_args(args: list[str], *, run_dir: str, allowed_dirs: Sequence[str]) -> list[str]:
    """Return *args* (``--opt`` spelled ``-opt``) if every option is allowed; else raise :class:`DaemonError`."""
    policy = PathPolicy.of(run_dir, allowed_dirs)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if "\0" in arg:
            _refuse(f"argument {i + 1} contains a NUL byte")
        if not arg.startswith("-") or arg == "-":
            _refuse(f"argument {arg!r} is not an option (QEMU would open it as a disk image); use -drive with format=")
        option = arg[1:] if arg.startswith("--") else arg
        if option in DAEMON_OPTIONS:
            _refuse(f"{option} is added by the daemon; remove it from 'qemu'")
        if option in REFUSED:
            _refuse(f"option {option} is not allowed in a definition: {REFUSED[option]}")
        if option in FLAGS:
            out.append(option)
            i += 1
            continue
        check = OPTIONS.get(option)
        if check is None:
            _refuse(f"option {option} is not allowed in a definition (it is not on the daemon's allow list of QEMU options)")
        if i + 1 == len(args):
            _refuse(f"{option} needs a value")
        value = args[i + 1]
        if "\0" in value:
            _refuse(f"the value of {option} contains a NUL byte")
        check(policy, option, value)
        out += [option, value]
        i += 2
    return out


# --------------------------------------------------------------------------- shared rules


def _refuse(message: str) -> NoReturn:
    raise DaemonError(PREFIX + message)


def _prefix_reason(name: str, reasons: Mapping[str, str]) -> str | None:
    for prefix, reason in reasons.items():
        if name.startswith(prefix):
            return reason
    return None


def _check_host_access(label: str, props: Mapping[str, str]) -> None:
    for key, value in props.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in FD_KEYS:
            _refuse(f"{label}: property '{key}' passes a host file descriptor and is not allowed")
        if leaf in SCRIPT_KEYS and value not in ("no", ""):
            _refuse(f"{label}: property '{key}' runs a host program and is not allowed (only {key}=no is)")
        if leaf in HOST_ACCESS_KEYS:
            _refuse(f"{label}: property '{key}' {HOST_ACCESS_KEYS[leaf]} and is not allowed")
        if value.startswith("exec:"):
            _refuse(f"{label}: property '{key}' runs a host program (exec:) and is not allowed")


def _check_path(policy: PathPolicy, label: str, key: str, value: str) -> None:
    if value == "":
        return  # QEMU reads an empty name as "none" (romfile=, backing=) or fails to open it
    try:
        policy.resolve(value)
    except HostPathError as exc:
        _refuse(f"{label}: {key} {value!r} {exc}")


def _path_value(policy: PathPolicy, option: str, value: str) -> None:
    _check_path(policy, option, "file", value)


def _initrd(policy: PathPolicy, option: str, value: str) -> None:
    # Multiboot kernels read -initrd as "file args,file args": one plain file name only.
    if "," in value or " " in value:
        _refuse(f"{option} {value!r}: give one file name, without ',' or spaces")
    _check_path(policy, option, "file", value)


def _matching(pattern: str, what: str) -> Callable[[PathPolicy, str, str], None]:
    regex = re.compile(pattern)

    def check(policy: PathPolicy, option: str, value: str) -> None:
        if not regex.fullmatch(value):
            _refuse(f"{option} {value!r} is not {what}")

    return check


def _one_of(*choices: str) -> Callable[[PathPolicy, str, str], None]:
    def check(policy: PathPolicy, option: str, value: str) -> None:
        if value not in choices:
            _refuse(f"{option} {value!r} is not allowed (allowed: {', '.join(choices)})")

    return check


def _global(policy: PathPolicy, option: str, value: str) -> None:
    # QEMU reads "driver.property=value" with sscanf and takes the value verbatim (no ',,'), else driver=,property=,value=.
    m = re.fullmatch(r"([^.=]{1,63})\.([^=]{1,63})=(.*)", value, re.DOTALL)
    if m is not None:
        driver, prop, text = m.groups()
    else:
        KeyValue(keys=frozenset({"driver", "property", "value"}))(policy, option, value)
        props = dict(parse_opts(value))
        driver, prop, text = props.get("driver", ""), props.get("property", ""), props.get("value", "")
    _check_host_access(f"{option} {driver}", {prop: text})
    if prop in PATH_KEYS:
        _check_path(policy, f"{option} {driver}", prop, text)


def _serial(policy: PathPolicy, option: str, value: str) -> None:
    # The legacy chardev spelling of -serial, -parallel and -debugcon (qemu_chr_parse_compat).
    if value in ("none", "null", "stdio"):
        return
    if value.startswith("chardev:") and NODE_NAME_RE.fullmatch(value[len("chardev:") :]):
        return
    if value.startswith("file:"):
        _check_path(policy, option, "file", value[len("file:") :])
        return
    if value.startswith("mon:"):
        _refuse(f"{option} {value!r}: mon: puts a human monitor on the port, which bypasses the monitor allow list")
    _refuse(f"{option} {value!r} is not allowed (allowed: none, null, stdio, file:PATH, chardev:ID)")


# --------------------------------------------------------------------------- type-specific rules


def _block(policy: PathPolicy, label: str, props: dict[str, str]) -> frozenset[str]:
    for key, value in props.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("driver", "format"):
            if value not in BLOCK_DRIVERS:
                _refuse(f"{label}: block driver {value!r} ({key}=) is not allowed (allowed: {', '.join(sorted(BLOCK_DRIVERS))})")
            prefix = key[: -len(leaf)]
            # A qcow2 header can name a backing file anywhere on the host: the definition must name the backing itself.
            if value == "qcow2" and prefix + "backing" not in props and not any(k.startswith(prefix + "backing.") for k in props):
                _refuse(f"{label}: qcow2 needs an explicit {prefix}backing= (empty for none, or a node name)")
        if leaf == "backing" and value != "" and not NODE_NAME_RE.fullmatch(value):
            _refuse(f"{label}: {key}={value!r} must be empty or a node name")
    return frozenset()


def _drive(policy: PathPolicy, label: str, props: dict[str, str]) -> frozenset[str]:
    opens_file = any((k == "file" and v) or k.startswith("file.") for k, v in props.items())
    if opens_file and "format" not in props and "driver" not in props:
        # Probing lets whoever writes the image choose its format, and a qcow2 header names host files.
        _refuse(f"{label}: give format= (raw or qcow2); QEMU would guess the format from the image's contents")
    return _block(policy, label, props)


def _rng_random(policy: PathPolicy, label: str, props: dict[str, str]) -> frozenset[str]:
    if props.get("filename") in ENTROPY_DEVICES:
        return frozenset({"filename"})
    return frozenset()


def _chardev_pipe(policy: PathPolicy, label: str, props: dict[str, str]) -> frozenset[str]:
    # QEMU opens PATH.in and PATH.out when both exist, else PATH.
    path = props.get("path", "")
    if path:
        for suffix in (".in", ".out"):
            _check_path(policy, label, "path", path + suffix)
    return frozenset()


def _chardev_socket(policy: PathPolicy, label: str, props: dict[str, str]) -> frozenset[str]:
    tcp = sorted(TCP_SOCKET_KEYS & set(props))
    if tcp or "path" not in props:
        what = f"property '{tcp[0]}'" if tcp else "without path="
        _refuse(f"{label}: {what} makes a TCP socket, which opens host ports; use path= for a unix socket")
    if props.get("abstract") == "on":
        _refuse(f"{label}: abstract=on names a socket outside the file system; use a plain path=")
    return frozenset()


def _acpitable(policy: PathPolicy, label: str, props: dict[str, str]) -> frozenset[str]:
    # file= and data= are ':'-separated lists of files.
    for key in ("file", "data"):
        if key in props:
            for name in props[key].split(":"):
                _check_path(policy, label, key, name)
    return frozenset({"file", "data"})


ACCEL_KEYS = frozenset(
    {
        "accel", "thread", "tb-size", "split-wx", "one-insn-per-tb", "kernel-irqchip", "kvm-shadow-mem", "dirty-ring-size",
        "notify-vmexit", "notify-window",
    }
)  # fmt: skip
NET_TYPES: Mapping[str, Extra | None] = {"user": None}

OPTIONS: dict[str, Callable[[PathPolicy, str, str], None]] = {
    "-machine": KeyValue(implied="type"),
    "-accel": KeyValue(
        implied="accel",
        keys=ACCEL_KEYS,
        types={"tcg": None, "kvm": None},
    ),
    "-cpu": _matching(r"[A-Za-z0-9_.+=,-]+", "a CPU model with features (letters, digits and _.+=,-)"),
    "-m": KeyValue(implied="size", keys=frozenset({"size", "slots", "maxmem"})),
    "-smp": KeyValue(
        implied="cpus", keys=frozenset({"cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads", "books", "drawers"})
    ),
    "-name": KeyValue(implied="guest", keys=frozenset({"guest", "process", "debug-threads"})),
    "-uuid": _matching(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}", "a UUID"),
    "-display": _one_of("none"),
    "-vga": _one_of("none", "std", "cirrus", "virtio", "qxl", "vmware"),
    "-rtc": KeyValue(keys=frozenset({"base", "clock", "driftfix"})),
    "-boot": KeyValue(
        implied="order", keys=frozenset({"order", "once", "menu", "splash", "splash-time", "reboot-timeout", "strict"})
    ),
    # QEMU looks the keymap up by name in its data directory: no '/' or '..'.
    "-k": _matching(r"[A-Za-z0-9_-]+", "a keyboard layout name such as en-us"),
    "-global": _global,
    "-device": KeyValue(
        implied="driver",
        types=dict.fromkeys(DEVICES),
        type_pattern=CPU_DEVICE_RE,
        type_reasons=DEVICE_REASONS,
    ),
    "-drive": KeyValue(extra=_drive),
    "-blockdev": KeyValue(implied="driver", extra=_block),
    "-object": KeyValue(
        implied="qom-type",
        types={
            "memory-backend-ram": None,
            "memory-backend-memfd": None,
            "memory-backend-file": None,
            "iothread": None,
            "main-loop": None,
            "thread-context": None,
            "rng-builtin": None,
            "rng-random": _rng_random,
            "throttle-group": None,
            "secret": None,
        },
        type_reasons=OBJECT_REASONS,
    ),
    "-numa": KeyValue(implied="type", types={t: None for t in ("node", "dist", "cpu", "hmat-lb", "hmat-cache")}),
    "-netdev": KeyValue(implied="type", types={**NET_TYPES, "hubport": None}, type_reasons=NETDEV_REASONS),
    "-nic": KeyValue(implied="type", types={**NET_TYPES, "none": None}, type_reasons=NETDEV_REASONS),
    "-chardev": KeyValue(
        implied="backend",
        types={
            "null": None,
            "ringbuf": None,
            "memory": None,
            "stdio": None,
            "file": None,
            "pipe": _chardev_pipe,
            "socket": _chardev_socket,
        },
        type_reasons=CHARDEV_REASONS,
    ),
    "-serial": _serial,
    "-parallel": _serial,
    "-debugcon": _serial,
    "-kernel": _path_value,
    "-initrd": _initrd,
    "-bios": _path_value,
    "-dtb": _path_value,
    "-L": _path_value,
    "-mem-path": _path_value,
    "-append": lambda policy, option, value: None,  # the guest kernel's command line: text for the guest only
    "-option-rom": KeyValue(implied="romfile", keys=frozenset({"romfile", "bootindex"})),
    "-fw_cfg": KeyValue(implied="name", keys=frozenset({"name", "file", "string", "gen_id"})),
    "-smbios": KeyValue(),
    "-acpitable": KeyValue(
        keys=frozenset(
            {"sig", "rev", "oem_id", "oem_table_id", "oem_rev", "asl_compiler_id", "asl_compiler_rev", "file", "data"}
        ),
        extra=_acpitable,
    ),
    "-overcommit": KeyValue(keys=frozenset({"mem-lock", "cpu-pm"})),
    "-msg": KeyValue(keys=frozenset({"timestamp", "guest-name"})),
    "-action": KeyValue(keys=frozenset({"reboot", "shutdown", "panic", "watchdog"})),
    "-compat": KeyValue(keys=frozenset({"deprecated-input", "deprecated-output", "unstable-input", "unstable-output"})),
    "-icount": KeyValue(implied="shift", keys=frozenset({"shift", "align", "sleep", "rr", "rrfile", "rrsnapshot"})),
    "-watchdog-action": _one_of("reset", "shutdown", "poweroff", "inject-nmi", "pause", "debug", "none"),
    "-audiodev": KeyValue(implied="driver", types={"none": None}),
    "-d": _matching(r"[A-Za-z0-9_,:*-]+", "a list of log items"),
    "-seed": _matching(r"[0-9]+", "a number"),
}
OPTIONS["-M"] = OPTIONS["-machine"]
