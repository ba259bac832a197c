"""vm.toml and command-line overrides -> a validated VmConfig.

Every error names the file and the key, and is a ConfigError (exit status 2).
Relative paths in vm.toml resolve against the file's directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import ConfigError
from .net.options import UserNetOptions, parse_user_options, split_netdev_options
from .pathcheck import refuse_special_file

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value, where: str, default_unit: str = "") -> int:
    """'512M', '4G', 1024 -> bytes. A bare number takes ``default_unit`` (QEMU's -m takes MiB)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size like 512M, got {value!r}")
    if isinstance(value, int):
        return value * _UNITS[default_unit]
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        # ASCII digits only (\d also matches other scripts' digits), and few enough
        # that int() takes them: Python refuses over 4300 digits with a ValueError.
        if m and m.group(1).isascii() and len(m.group(1)) <= 30:
            unit = m.group(2).upper() or default_unit
            return int(m.group(1)) * _UNITS[unit]
    raise ConfigError(f"{where}: expected a size like 512M or 4G, got {value!r}")


# What a disk does when a host I/O error fails a guest's request: QEMU's -drive
# werror=/rerror= and their defaults. "enospc" stops the VM on ENOSPC (space can be
# freed and the request retried) and reports every other error.
WERROR_POLICIES = ("enospc", "stop", "report", "ignore")
RERROR_POLICIES = ("stop", "report", "ignore")


@dataclass
class DiskConfig:
    """One [[disk]] (or --drive/-hda): the image and how the guest sees it."""

    path: str
    format: str | None = None
    readonly: bool = False
    serial: str = ""
    werror: str = "enospc"
    rerror: str = "report"
    # How the guest sees it: "virtio" (virtio-blk) or "ide" (PIIX IDE, QEMU's -hda/-cdrom),
    # and as a hard disk or a CD-ROM (read-only ATAPI; ide only)
    interface: str = "virtio"
    media: str = "disk"
    index: int | None = None          # IDE position 0-3 (primary master .. secondary slave)
    # virtio-blk on a raw image: "native" serves routine requests from a C thread per
    # queue (kvmpy/devices/virtio/dataplane.py), "python" keeps them all in the model
    dataplane: str = "native"
    # virtio-blk request queues (QEMU's num-queues): a guest with MQ spreads its CPUs'
    # requests over them; with the native data plane each has its own thread
    queues: int = 1
    # QEMU's iothread=: the native data plane serves the queues of every disk naming
    # the same iothread from one thread ("": a thread per queue)
    iothread: str = ""
    # QEMU's cache=: writeback, none, directsync, writethrough, unsafe (kvmpy/block/direct.py)
    cache: str = "writeback"


def check_error_policy(value, key: str, where: str) -> str:
    allowed = WERROR_POLICIES if key == "werror" else RERROR_POLICIES
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass
class NetConfig:
    """One [[net]] (or --net/-netdev): the NIC's backend and its options."""

    type: str = "tap"                 # "tap" or "user" (libslirp, kvmpy.net); see NO_NIC_TYPE
    ifname: str = ""
    bridge: str = ""
    mac: str = ""
    user: UserNetOptions | None = None    # type "user": its options
    # "native": a C thread per rx/tx pair moves a tap's frames (kvmpy/devices/virtio/netplane.py);
    # "python" keeps them all in the model
    dataplane: str = "native"
    # tap only: RX/TX queue pairs (virtio-net MQ, one IFF_MULTI_QUEUE tap queue each)
    queues: int = 1
    # tap only: the kernel's data plane (/dev/vhost-net), QEMU's spelling; "auto":
    # where /dev/vhost-net opens
    vhost: str = "auto"


@dataclass
class ShareConfig:
    """A ``[[share]]`` table or ``--share``: a host directory as virtio-fs."""
    path: str
    tag: str
    readonly: bool = False


SHARE_KEYS = {"path", "tag", "readonly"}
SHARE_TAG_BYTES = 36       # virtio-fs config's tag field


def check_share(share: ShareConfig, where: str) -> ShareConfig:
    raw = share.tag.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > SHARE_TAG_BYTES or "\0" in share.tag:
        raise ConfigError(f"{where}: tag must be 1-{SHARE_TAG_BYTES} bytes, got {share.tag!r}")
    if not os.path.isdir(share.path):
        raise ConfigError(f"{where}: {share.path} is not a directory")
    return share


def parse_share(spec: str) -> ShareConfig:
    """``--share path=/dir,tag=host[,readonly=on]``."""
    where = f"--share {spec}"
    opts: dict[str, str] = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep or k not in SHARE_KEYS:
            raise ConfigError(f"{where}: unknown option {part!r} (known: path=, tag=, readonly=on|off)")
        opts[k] = v
    for key in ("path", "tag"):
        if not opts.get(key):
            raise ConfigError(f"{where}: missing {key}=")
    share = ShareConfig(path=os.path.abspath(opts["path"]), tag=opts["tag"],
                        readonly=parse_on_off(opts.get("readonly", "off"), f"{where}: readonly"))
    return check_share(share, where)


@dataclass
class DeviceConfig:
    """A ``[[device]]`` table or ``--device``: a plug-in device (kvmpy.plugins)."""
    type: str
    options: dict = field(default_factory=dict)
    where: str = ""          # "vm.toml: [[device]] #1": where errors point
    base_dir: str = ""       # resolves a relative ``file.py:Class``


@dataclass
class DisplayConfig:
    """The screen: ``vga`` "std" (a PCI VGA as QEMU's -vga std) or "none"; ``vnc`` the
    VNC server's address (QEMU's -vnc spelling, parsed by kvmpy.display.vnc) or None;
    ``keymap`` the layout of the keysyms a viewer sends (QEMU's -k)."""

    vga: str = "none"
    vnc: str | None = None
    keymap: str = "en-us"
    keymaps_dir: str | None = None     # None: QEMU's (kvmpy.display.keymap.KEYMAP_DIRS)
    vnc_password: bool = False


@dataclass
class VmConfig:
    """A whole VM as vm.toml and the command line describe it, validated."""

    name: str = "kvmpy"
    source: str = "<command line>"
    accel: str = "tcg"                 # kvm | tcg | auto
    accel_force: bool = False          # "kvm,force=on": run Linux on a software-nested KVM anyway
    # the translator compiles hot blocks to host code; None: as KVMPY_TCG_NATIVE_THRESHOLD
    # says (a number, "off"), on when unset
    tcg_native: bool | None = None
    memory: int = 256 << 20
    cpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    serial: str = "stdio"
    no_reboot: bool = False
    disks: list[DiskConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    shares: list[ShareConfig] = field(default_factory=list)    # virtio-fs: [[share]], --share
    qmp: list[str] = field(default_factory=list)
    hmp: list[str] = field(default_factory=list)
    pidfile: str | None = None
    daemonize: bool = False
    runas: str | None = None
    # seccomp + NO_NEW_PRIVS once running (kvmpy.sandbox): True/False as asked
    # (vm.toml ``sandbox``, ``--sandbox on|off``), None: on where the host can
    sandbox: bool | None = None
    service: dict = field(default_factory=dict)
    enabled: bool = True
    trace: list[str] = field(default_factory=list)   # debug output: kvmpy.vcpu.trace.TRACE_EVENTS
    devices: list[DeviceConfig] = field(default_factory=list)   # plug-ins: kvmpy.plugins
    # QEMU's command line (kvmpy.qemu_cli): -L directories, -name ...,process=, -S, -D,
    # and a multiboot kernel's modules (path, command line) from -initrd "mod arg,mod2"
    firmware_path: list[str] = field(default_factory=list)
    process_name: str = ""
    start_paused: bool = False
    log_file: str | None = None
    multiboot_modules: list[tuple[str, str]] = field(default_factory=list)
    # What runs first: "none" (kvmpy loads --kernel itself), "bios" (SeaBIOS) or "uefi"
    # (OVMF); None picks "bios" without a kernel and "none" with one.
    firmware: str | None = None
    bios: str | None = None           # the firmware image (QEMU's -bios); None: Debian's
    # UEFI's variable store, a flash the guest writes (QEMU's second -drive if=pflash,
    # e.g. a copy of OVMF_VARS.fd beside OVMF_CODE.fd); None: OVMF keeps them in RAM
    firmware_vars: str | None = None
    boot_order: list[str] = field(default_factory=list)   # "cdrom", "disk", "net": -boot order=
    boot_menu: bool = False
    display: DisplayConfig = field(default_factory=DisplayConfig)
    # QEMU's default NIC: a front end (kvmpy run, QEMU's command line) adds a user-mode
    # NIC when nothing names one (add_default_nic). False once any NIC option or "none"
    # was given: vm.toml [[net]], --net, -net/-netdev/-nic, -nodefaults.
    default_nic: bool = True
    # QEMU's -object iothread / [[iothread]]: threads that exist from the start,
    # whether or not a disk names them (a disk's iothread= need not be listed here)
    iothreads: list[str] = field(default_factory=list)


FIRMWARES = ("none", "bios", "uefi")
BOOT_DEVICES = ("cdrom", "disk", "net")
DISK_INTERFACES = ("virtio", "ide")
DISK_DATAPLANES = ("native", "python")
DISK_CACHE_MODES = ("writeback", "none", "directsync", "writethrough", "unsafe")
MAX_DISK_QUEUES = 16
DISK_MEDIA = ("disk", "cdrom")


TOP_KEYS = {"name", "accel", "memory", "cpus", "kernel", "initrd", "cmdline", "append", "serial",
            "no_reboot", "disk", "net", "device", "monitor", "service", "enabled", "pidfile", "runas", "debug",
            "sandbox", "firmware", "bios", "firmware_vars", "boot", "boot_menu", "display", "tcg_native"}
DISK_KEYS = {"path", "format", "readonly", "serial", "werror", "rerror", "interface", "media", "index",
             "dataplane", "queues", "iothread", "cache"}
NET_KEYS = {"type", "ifname", "bridge", "mac", "dataplane", "queues", "vhost"}
NET_DATAPLANES = ("native", "python")
NET_VHOST = ("on", "off", "auto")
# QEMU's limit (and virtio-net's MAX_QUEUE_PAIRS)
MAX_NET_QUEUES = 16
NO_NIC_TYPE = "none"          # [[net]] type = "none", --net none: QEMU's -nic none
MONITOR_KEYS = {"qmp", "hmp"}
DEBUG_KEYS = {"trace"}
DISPLAY_KEYS = {"vga", "vnc", "keymap", "keymaps"}
VGA_KINDS = ("std", "none")
MAX_CPUS = 255
MIN_MEMORY = 16 << 20
TOP_KEYS |= {"share"}          # [[share]]: virtio-fs
TOP_KEYS |= {"iothread"}       # [[iothread]] id = "io0": QEMU's -object iothread,id=io0
IOTHREAD_KEYS = {"id"}


def _expect(value, types, where: str, what: str):
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return value


def _path(base_dir: str, value, where: str) -> str:
    _expect(value, str, where, "a path")
    if "\0" in value:
        raise ConfigError(f"{where}: a path cannot contain a NUL byte")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))


_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_name(name: str, where: str) -> str:
    """The VM name rule for vm.toml and --name alike: it ends up in QMP query-name,
    process titles and file names, so only a safe, short alphabet."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: use 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    return name


def check_disk_serial(serial: str, where: str) -> str:
    if len(serial.encode("utf-8", "surrogateescape")) > 20:
        raise ConfigError(f"{where}: at most 20 bytes (virtio-blk ID), got {serial!r}")
    return serial


def check_disk_queues(value, where: str) -> int:
    """A virtio-blk queue count: an integer 1..MAX_DISK_QUEUES (a string from --drive)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 4:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DISK_QUEUES:
        raise ConfigError(f"{where}: expected a number of queues from 1 to {MAX_DISK_QUEUES}, got {value!r}")
    return value


def check_iothread(name: str, where: str) -> str:
    """An iothread name: QEMU's id= alphabet, at most 64 characters."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"{where}: expected an iothread name (a letter, then letters, digits, '.', '_' "
                          f"or '-', at most 64), got {name!r}")
    return name


def _load_iothreads(cfg: VmConfig, data: dict, source: str) -> None:
    """``[[iothread]]`` tables: ``id``, as QEMU's ``-object iothread,id=``."""
    tables = _expect(data.get("iothread", []), list, f"{source}: key 'iothread'", "an array of tables ([[iothread]])")
    for i, d in enumerate(tables):
        where = f"{source}: [[iothread]] #{i + 1}"
        _expect(d, dict, where, "a table")
        _check_unknown(d, IOTHREAD_KEYS, where)
        if "id" not in d:
            raise ConfigError(f"{where}: missing key 'id'")
        name = check_iothread(_expect(d["id"], str, f"{where} key 'id'", "an iothread name"), f"{where} key 'id'")
        if name in cfg.iothreads:
            raise ConfigError(f"{where}: iothread {name} is already defined")
        cfg.iothreads.append(name)


def check_net_queues(value, where: str) -> int:
    """A NIC's queue pairs: an integer 1..MAX_NET_QUEUES (a string from --net)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 4:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_NET_QUEUES:
        raise ConfigError(f"{where}: expected a number of queue pairs from 1 to {MAX_NET_QUEUES}, got {value!r}")
    return value


def check_net_vhost(value, where: str) -> str:
    """vhost = "on" | "off" | "auto" (vm.toml may say true/false too)."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return _choice(value, NET_VHOST, where)


def check_mac(mac: str, where: str) -> str:
    if mac and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
        raise ConfigError(f"{where}: expected xx:xx:xx:xx:xx:xx, got {mac!r}")
    if mac and int(mac[:2], 16) & 1:
        raise ConfigError(f"{where}: {mac} is a multicast address")
    return mac


def _check_unknown(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")


MAX_CONFIG_BYTES = 1 << 20     # a vm.toml is a page or two; more is a wrong file, not a VM


def load_config(path: str) -> VmConfig:
    # A FIFO stays allowed: ``kvmpy run <(generate-config)`` hands us a pipe, and
    # waiting for its writer is what the user asked for. Character devices
    # (/dev/zero would be read forever), sockets and directories are refused.
    refuse_special_file(path, path, ConfigError, allow_fifo=True)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a vm.toml")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # TOML is UTF-8 by definition; point at the first bad byte so it can be found.
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start})") from None
    import tomllib      # only where a vm.toml is read: its parser costs every other start-up ~3 ms
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(data, path)


def config_from_dict(data: dict, source: str) -> VmConfig:
    base = os.path.dirname(os.path.abspath(source)) if source != "<command line>" else os.getcwd()
    cfg = VmConfig(source=source)
    _check_unknown(data, TOP_KEYS, source)
    w = lambda key: f"{source}: key '{key}'"  # noqa: E731
    if "name" in data:
        cfg.name = check_name(_expect(data["name"], str, w("name"), "a string"), w("name"))
    else:
        cfg.name = os.path.splitext(os.path.basename(source))[0] if source != "<command line>" else "kvmpy"
    if "accel" in data:
        cfg.accel, cfg.accel_force = parse_accel(_expect(data["accel"], str, w("accel"), "a string"),
                                                 w("accel"))
    if "memory" in data:
        cfg.memory = parse_size(data["memory"], w("memory"), "M")
    if "cpus" in data:
        cfg.cpus = _expect(data["cpus"], int, w("cpus"), "a whole number")
    if "kernel" in data:
        cfg.kernel = _path(base, data["kernel"], w("kernel"))
    if "initrd" in data:
        cfg.initrd = _path(base, data["initrd"], w("initrd"))
    for key in ("cmdline", "append"):
        if key in data:
            cfg.cmdline = _expect(data[key], str, w(key), "a string")
    if "serial" in data:
        cfg.serial = _expect(data["serial"], str, w("serial"), "a string such as \"stdio\"")
    if "tcg_native" in data:
        cfg.tcg_native = _expect(data["tcg_native"], bool, w("tcg_native"), "true or false")
    if "no_reboot" in data:
        cfg.no_reboot = _expect(data["no_reboot"], bool, w("no_reboot"), "true or false")
    if "enabled" in data:
        cfg.enabled = _expect(data["enabled"], bool, w("enabled"), "true or false")
    if "pidfile" in data:
        cfg.pidfile = _path(base, data["pidfile"], w("pidfile"))
    if "runas" in data:
        cfg.runas = _expect(data["runas"], str, w("runas"), "a user name")
    if "sandbox" in data:
        cfg.sandbox = _expect(data["sandbox"], bool, w("sandbox"), "true or false")
    if "firmware" in data:
        cfg.firmware = _choice(data["firmware"], FIRMWARES, w("firmware"))
    if "bios" in data:
        cfg.bios = _path(base, data["bios"], w("bios"))
    if "firmware_vars" in data:
        cfg.firmware_vars = _path(base, data["firmware_vars"], w("firmware_vars"))
    if "boot" in data:
        order = _expect(data["boot"], list, w("boot"), 'a list such as ["cdrom", "disk"]')
        cfg.boot_order = [_choice(b, BOOT_DEVICES, w("boot")) for b in order]
    if "boot_menu" in data:
        cfg.boot_menu = _expect(data["boot_menu"], bool, w("boot_menu"), "true or false")
    for i, d in enumerate(_expect(data.get("disk", []), list, w("disk"), "an array of tables ([[disk]])")):
        where = f"{source}: [[disk]] #{i + 1}"
        _expect(d, dict, where, "a table")
        _check_unknown(d, DISK_KEYS, where)
        if "path" not in d:
            raise ConfigError(f"{where}: missing key 'path'")
        disk = DiskConfig(path=_path(base, d["path"], f"{where} key 'path'"))
        if "format" in d:
            disk.format = _expect(d["format"], str, f"{where} key 'format'", "\"raw\" or \"qcow2\"")
            if disk.format not in ("raw", "qcow2"):
                raise ConfigError(f"{where} key 'format': must be \"raw\" or \"qcow2\", got {disk.format!r}")
        disk.readonly = _expect(d.get("readonly", False), bool, f"{where} key 'readonly'", "true or false")
        disk.serial = _expect(d.get("serial", ""), str, f"{where} key 'serial'", "a string")
        check_disk_serial(disk.serial, f"{where} key 'serial'")
        for key in ("werror", "rerror"):
            if key in d:
                setattr(disk, key, check_error_policy(d[key], key, f"{where} key '{key}'"))
        if "media" in d:
            disk.media = _choice(d["media"], DISK_MEDIA, f"{where} key 'media'")
            if disk.media == "cdrom":
                disk.interface, disk.readonly = "ide", True
        if "interface" in d:
            disk.interface = _choice(d["interface"], DISK_INTERFACES, f"{where} key 'interface'")
        if "index" in d:
            disk.index = _expect(d["index"], int, f"{where} key 'index'", "an IDE position 0-3")
        if "dataplane" in d:
            disk.dataplane = _choice(d["dataplane"], DISK_DATAPLANES, f"{where} key 'dataplane'")
        if "queues" in d:
            key = f"{where} key 'queues'"
            disk.queues = check_disk_queues(_expect(d["queues"], int, key, f"a number of queues from 1 to "
                                                    f"{MAX_DISK_QUEUES}"), key)
        if "iothread" in d:
            disk.iothread = check_iothread(_expect(d["iothread"], str, f"{where} key 'iothread'", "an iothread name"),
                                           f"{where} key 'iothread'")
        if "cache" in d:
            disk.cache = _choice(d["cache"], DISK_CACHE_MODES, f"{where} key 'cache'")
        check_disk(disk, where)
        cfg.disks.append(disk)
    nets = _expect(data.get("net", []), list, w("net"), "an array of tables ([[net]])")
    if nets:
        cfg.default_nic = False
    for i, n in enumerate(nets):
        where = f"{source}: [[net]] #{i + 1}"
        _expect(n, dict, where, "a table")
        if n.get("type") == NO_NIC_TYPE:
            _check_unknown(n, {"type"}, where)
            if len(nets) > 1:
                raise ConfigError(f"{where} key 'type': \"none\" (no NIC) cannot stand beside other [[net]] tables")
            continue
        if n.get("type") == "user":
            cfg.nets.append(parse_user_net_options(n, where))
            continue
        _check_unknown(n, NET_KEYS, where)
        n = dict(n)
        queues = n.pop("queues", 1)
        vhost = n.pop("vhost", "auto")
        net = NetConfig(**{k: _expect(v, str, f"{where} key '{k}'", "a string") for k, v in n.items()})
        key = f"{where} key 'queues'"
        net.queues = check_net_queues(_expect(queues, int, key, f"a number of queue pairs from 1 to "
                                              f"{MAX_NET_QUEUES}"), key)
        net.vhost = check_net_vhost(vhost, f"{where} key 'vhost'")
        if net.type != "tap":
            raise ConfigError(f"{where} key 'type': must be \"tap\", \"user\" or \"none\", got {net.type!r}")
        check_mac(net.mac, f"{where} key 'mac'")
        net.dataplane = _choice(net.dataplane, NET_DATAPLANES, f"{where} key 'dataplane'")
        cfg.nets.append(net)
    for i, d in enumerate(_expect(data.get("device", []), list, w("device"),
                                  "an array of tables ([[device]])")):
        where = f"{source}: [[device]] #{i + 1}"
        _expect(d, dict, where, "a table")
        if "type" not in d:
            raise ConfigError(f"{where}: missing key 'type' (e.g. \"package.module:Class\")")
        dtype = _expect(d["type"], str, f"{where} key 'type'", "a string")
        options = {k: v for k, v in d.items() if k != "type"}
        cfg.devices.append(DeviceConfig(type=dtype, options=options, where=where, base_dir=base))
    for i, d in enumerate(_expect(data.get("share", []), list, w("share"), "an array of tables ([[share]])")):
        where = f"{source}: [[share]] #{i + 1}"
        _expect(d, dict, where, "a table")
        _check_unknown(d, SHARE_KEYS, where)
        for key in ("path", "tag"):
            if key not in d:
                raise ConfigError(f"{where}: missing key '{key}'")
        share = ShareConfig(path=_path(base, d["path"], f"{where} key 'path'"),
                            tag=_expect(d["tag"], str, f"{where} key 'tag'", "a string"),
                            readonly=_expect(d.get("readonly", False), bool, f"{where} key 'readonly'",
                                             "true or false"))
        cfg.shares.append(check_share(share, where))
    _load_iothreads(cfg, data, source)
    mon = _expect(data.get("monitor", {}), dict, w("monitor"), "a table")
    _check_unknown(mon, MONITOR_KEYS, f"{source}: [monitor]")
    for key in ("qmp", "hmp"):
        if key in mon:
            v = mon[key]
            vals = [v] if isinstance(v, str) else _expect(v, list, f"{source}: [monitor] key '{key}'", "a string")
            getattr(cfg, key).extend(vals)
    debug = _expect(data.get("debug", {}), dict, w("debug"), "a table")
    _check_unknown(debug, DEBUG_KEYS, f"{source}: [debug]")
    if "trace" in debug:
        from .vcpu.trace import parse_trace
        cfg.trace = parse_trace(debug["trace"], f"{source}: [debug] key 'trace'")
    cfg.service = _expect(data.get("service", {}), dict, w("service"), "a table")
    display = _expect(data.get("display", {}), dict, w("display"), "a table")
    _check_unknown(display, DISPLAY_KEYS, f"{source}: [display]")
    if "keymaps" in display:
        cfg.display.keymaps_dir = _path(base, display["keymaps"], f"{source}: [display] key 'keymaps'")
    if "vga" in display:
        cfg.display.vga = _choice(display["vga"], VGA_KINDS, f"{source}: [display] key 'vga'")
    if "vnc" in display:
        set_vnc(cfg, _expect(display["vnc"], str, f"{source}: [display] key 'vnc'", 'a string such as ":1"'),
                f"{source}: [display] key 'vnc'")
    if "keymap" in display:
        set_keymap(cfg, _expect(display["keymap"], str, f"{source}: [display] key 'keymap'", 'a string such as "de"'),
                   f"{source}: [display] key 'keymap'")
    validate(cfg)
    return cfg


def set_vnc(cfg: VmConfig, spec: str, where: str) -> None:
    """``vnc`` / ``--vnc``: checked now (one line naming ``where``); a VNC server implies a VGA."""
    from .display.vnc import parse_vnc_spec
    address = parse_vnc_spec(spec, where)
    cfg.display.vnc = None if address is None else spec
    cfg.display.vnc_password = address is not None and address.password
    if address is not None and cfg.display.vga == "none":
        cfg.display.vga = "std"


def set_keymap(cfg: VmConfig, name: str, where: str) -> None:
    from .display.keymap import find_keymap
    find_keymap(name, cfg.display.keymaps_dir, where)
    cfg.display.keymap = name


def _choice(value, allowed: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_disk(disk: DiskConfig, where: str) -> None:
    """What no disk may be, however it was spelt (vm.toml, --drive, -hda, -cdrom)."""
    if disk.media == "cdrom" and disk.interface != "ide":
        raise ConfigError(f"{where}: a CD-ROM is an IDE (ATAPI) device, not {disk.interface}")
    if disk.media == "cdrom" and not disk.readonly:
        raise ConfigError(f"{where}: a CD-ROM is read-only")
    if disk.index is not None and not (disk.interface == "ide" and 0 <= disk.index <= 3):
        raise ConfigError(f"{where}: index must be 0-3 on an IDE disk, got {disk.index}")


def validate(cfg: VmConfig) -> None:
    src = cfg.source
    if not 1 <= cfg.cpus <= MAX_CPUS:
        raise ConfigError(f"{src}: key 'cpus': must be 1..{MAX_CPUS}, got {cfg.cpus}")
    if cfg.memory < MIN_MEMORY:
        raise ConfigError(f"{src}: key 'memory': at least {MIN_MEMORY >> 20}M, got {cfg.memory >> 20}M")
    if cfg.memory % (2 << 20):
        raise ConfigError(f"{src}: key 'memory': must be a multiple of 2M")
    if cfg.memory > (1 << 40):
        raise ConfigError(f"{src}: key 'memory': at most 1T")
    ide = [d for d in cfg.disks if d.interface == "ide"]
    if len(ide) > 4:
        raise ConfigError(f"{src}: at most 4 IDE disks and CD-ROMs (two channels, master and slave), "
                          f"got {len(ide)}")
    tags = [share.tag for share in cfg.shares]
    if len(tags) != len(set(tags)):
        raise ConfigError(f"{src}: two shares with tag {max(tags, key=tags.count)!r}")
    taken = [d.index for d in ide if d.index is not None]
    if len(taken) != len(set(taken)):
        raise ConfigError(f"{src}: two IDE disks at index {max(taken, key=taken.count)}")


ACCELS = ("kvm", "tcg", "auto")


def parse_accel(spec: str, where: str) -> tuple[str, bool]:
    """QEMU's -accel spelling: ``kvm``, ``tcg``, ``auto``, or ``kvm,force=on``
    (insist on KVM for a Linux kernel where KVM is software-nested) -> (name, force)."""
    name, *options = spec.split(",")
    force = False
    for opt in options:
        key, sep, value = opt.partition("=")
        if key != "force" or value not in ("on", "off"):
            raise ConfigError(f"{where}: unknown accelerator option {opt!r} in {spec!r} "
                              "(known: force=on|off)")
        force = value == "on"
    if name not in ACCELS:
        raise ConfigError(f"{where}: must be \"kvm\", \"tcg\" or \"auto\" (optionally \"kvm,force=on\"), "
                          f"got {spec!r}")
    if force and name != "kvm":
        raise ConfigError(f"{where}: force=on applies to kvm only, got {spec!r}")
    return name, force


def parse_on_off(value: str, where: str) -> bool:
    """QEMU's spelling of a switch: ``on`` or ``off``."""
    if value in ("on", "off"):
        return value == "on"
    raise ConfigError(f"{where}: expected on or off, got {value!r}")


def parse_drive(spec: str) -> DiskConfig:
    """QEMU-style ``--drive file=PATH,format=qcow2,readonly=on,serial=X,werror=stop,rerror=report``
    (and kvmpy's ``dataplane=native|python``, ``queues=N``, ``iothread=NAME``), or just a path."""
    if "=" not in spec.split(",")[0]:
        spec = "file=" + spec
    opts: dict[str, str] = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise ConfigError(f"--drive {spec}: expected key=value, got {part!r}")
        opts[k] = v
    if "file" not in opts:
        raise ConfigError(f"--drive {spec}: missing file=")
    unknown = set(opts) - {"file", "format", "readonly", "serial", "if", "werror", "rerror", "media", "index",
                           "dataplane", "queues", "iothread", "cache"}
    if unknown:
        raise ConfigError(f"--drive {spec}: unknown option '{sorted(unknown)[0]}'")
    fmt = opts.get("format")
    if fmt not in (None, "raw", "qcow2"):
        raise ConfigError(f"--drive {spec}: format must be raw or qcow2")
    ro = opts.get("readonly", "off")
    if ro not in ("on", "off", "true", "false"):
        raise ConfigError(f"--drive {spec}: readonly must be on or off")
    if not opts["file"]:
        raise ConfigError(f"--drive {spec}: empty file=")
    serial = check_disk_serial(opts.get("serial", ""), f"--drive {spec}: serial")
    policies = {key: check_error_policy(opts[key], key, f"--drive {spec}: {key}")
                for key in ("werror", "rerror") if key in opts}
    if "dataplane" in opts:
        policies["dataplane"] = _choice(opts["dataplane"], DISK_DATAPLANES, f"--drive {spec}: dataplane")
    if "queues" in opts:
        policies["queues"] = check_disk_queues(opts["queues"], f"--drive {spec}: queues")
    if "iothread" in opts:
        policies["iothread"] = check_iothread(opts["iothread"], f"--drive {spec}: iothread")
    if "cache" in opts:
        policies["cache"] = _choice(opts["cache"], DISK_CACHE_MODES, f"--drive {spec}: cache")
    disk = DiskConfig(path=os.path.abspath(opts["file"]), format=fmt, readonly=ro in ("on", "true"),
                      serial=serial, **policies)
    parse_drive_placement(disk, opts, f"--drive {spec}")
    return disk


def parse_drive_placement(disk: DiskConfig, opts: dict[str, str], where: str) -> None:
    """QEMU's if=ide|virtio, media=disk|cdrom and index=N of a -drive: media=cdrom is an
    IDE CD-ROM, read-only, and without if= a drive with an index is IDE, as on QEMU's pc."""
    if "media" in opts:
        disk.media = _choice(opts["media"], DISK_MEDIA, f"{where}: media")
        if disk.media == "cdrom":
            disk.interface, disk.readonly = "ide", True
    if "index" in opts:
        if not opts["index"].isdigit():
            raise ConfigError(f"{where}: index must be a number 0-3, got {opts['index']!r}")
        disk.index = int(opts["index"])
        if "if" not in opts:
            disk.interface = "ide"
    if "if" in opts:
        disk.interface = _choice(opts["if"], DISK_INTERFACES, f"{where}: if")
    check_disk(disk, where)


def parse_user_net_options(opts: dict, where: str) -> NetConfig:
    """A user-mode NIC (libslirp) from QEMU's ``-netdev user`` options as a dict:
    strings from a command line (``{"hostfwd": ["tcp::2222-:22"], "restrict": "on"}``)
    or typed vm.toml values (``restrict = true``); ``type`` and ``id`` are ignored.
    ``where`` starts every error ("vm.toml: [[net]] #1", "--net user,...")."""
    mac = opts.get("mac", "")
    if not isinstance(mac, str):
        raise ConfigError(f"{where}: mac: expected xx:xx:xx:xx:xx:xx, got {mac!r}")
    check_mac(mac, f"{where}: mac")
    user = parse_user_options({k: v for k, v in opts.items() if k != "mac"}, where)
    return NetConfig(type="user", mac=mac, user=user)


def parse_netdev(spec: str) -> NetConfig:
    """``--net tap,ifname=tap0,bridge=br0,mac=52:54:00:12:34:56`` or
    ``--net user[,hostfwd=tcp::2222-:22][,restrict=on]...``."""
    parts = spec.split(",")
    if parts[0] == "user":
        rest = spec[len("user"):].lstrip(",")
        return parse_user_net_options(split_netdev_options(rest, f"--net {spec}"), f"--net {spec}")
    if parts[0] != "tap":
        raise ConfigError(f"--net {spec}: must be 'tap' or 'user'")
    net = NetConfig()
    for part in parts[1:]:
        k, sep, v = part.partition("=")
        if not sep or k not in NET_KEYS - {"type"}:
            raise ConfigError(f"--net {spec}: unknown option {part!r}")
        if k == "queues":
            net.queues = check_net_queues(v, f"--net {spec}: queues")
        elif k == "vhost":
            net.vhost = check_net_vhost(v, f"--net {spec}: vhost")
        else:
            setattr(net, k, v)
    check_mac(net.mac, f"--net {spec}: mac")
    net.dataplane = _choice(net.dataplane, NET_DATAPLANES, f"--net {spec}: dataplane")
    return net


def add_default_nic(cfg: VmConfig) -> None:
    """QEMU's default NIC: with no NIC named and none refused, a user-mode NIC
    (``-nic user``) with QEMU's addresses. Where libslirp's module cannot be loaded
    (kvmpy built without libslirp-dev, or libslirp.so missing) the VM starts without
    a NIC and one warning line says why: a VM that asked for nothing must not fail."""
    if not cfg.default_nic or cfg.nets:
        return
    cfg.default_nic = False
    import logging
    try:
        from .net import slirp  # noqa: F401 - the native module is what may be missing
    except ImportError as e:
        logging.getLogger(__name__).warning(
            "no default NIC: user-mode networking is not available (%s); name one with --net tap,... "
            "or say --net none", e)
        return
    cfg.nets.append(parse_user_net_options({}, "the default NIC (--net user)"))
