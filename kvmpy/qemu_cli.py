"""QEMU's own command line (``qemu-system-x86_64 -enable-kvm -m 512 -hda disk.img``)
into a VmConfig.

QEMU's grammar is not argparse's: every option is one dash and a word, followed by
exactly one argument when the option takes one (``-hda`` is not ``-h da``);
arguments are ``key=value,key=value`` lists where ``,,`` is a literal comma and the
first element may be a bare value for the option's implied key (``-accel kvm``,
``-boot d``, ``-m 512``); a bare ``flag`` is ``flag=on``. So it is parsed by hand
here, as QEMU's vl.c and QemuOpts do. ``--opt`` is accepted as ``-opt``, as in QEMU,
and kvmpy's own double-dash options (``--sandbox``, ``--trace``, kvmpy's ``--drive``
and ``--net``) keep kvmpy's meaning when mixed in. Everything kvmpy does not do is one
line naming the option (exit status 2), never silently dropped.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from .config import (DISK_CACHE_MODES, DeviceConfig, DiskConfig, NetConfig, VmConfig, add_default_nic, check_disk,
                     check_disk_queues,
                     check_disk_serial, check_error_policy, check_iothread,
                     check_mac, check_name, config_from_dict, load_config, parse_accel, parse_drive,
                     parse_netdev, parse_on_off, parse_size, parse_user_net_options, set_keymap, set_vnc,
                     VGA_KINDS)
from .errors import ConfigError
from .qemu_spelling import wants_qemu_parser  # noqa: F401 - kvmpy.qemu_cli's name for it too

log = logging.getLogger(__name__)

# The device types that are kvmpy's implementation of a QEMU device of that name.
ISA_DEBUG_EXIT = "kvmpy.devices.testdev:IsaDebugExit"
PC_TESTDEV_PORTS = "kvmpy.devices.testdev:PcTestdevPorts"
PC_TESTDEV_IOMEM = "kvmpy.devices.testdev:PcTestdevIomem"
PCI_TESTDEV = "pci-testdev"

IDE_INDEX = {"-hda": 0, "-hdb": 1, "-hdc": 2, "-hdd": 3}
CDROM_INDEX = 2
BOOT_LETTERS = {"c": "disk", "d": "cdrom", "n": "net"}


class QemuOptionError(ConfigError):
    """A QEMU option kvmpy does not take, or takes differently: one line naming it."""


def _unsupported(option: str, why: str = "") -> QemuOptionError:
    return QemuOptionError(f"qemu option {option}: not supported by kvmpy" + (f" ({why})" if why else ""))


# ------------------------------------------------------------------ QemuOpts

def split_suboptions(text: str, option: str, implied: str | None = None) -> list[tuple[str, str]]:
    """``a=1,b,,c=2,flag`` -> [("a", "1"), ("b,c", "2"), ("flag", "on")] in QEMU's spelling: ``,,`` is a
    literal comma, a bare first element is the ``implied`` key's value, a bare later
    element ``x`` is ``x=on`` (``nox`` is not ``x=off`` here: nothing kvmpy takes needs it)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    result = []
    for n, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if n == 0 and implied is not None:
                key, value = implied, part
            elif part:
                key, value = part, "on"
            else:
                raise QemuOptionError(f"qemu option {option} {text}: empty parameter")
        if not key:
            raise QemuOptionError(f"qemu option {option} {text}: parameter {part!r} has no name")
        result.append((key, value))
    return result


def _opts_dict(pairs: list[tuple[str, str]], option: str, text: str, allowed: set[str]) -> dict[str, str]:
    """Pairs as a dict (the last of a repeated key wins, as in QemuOpts); an unknown key is one line."""
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise QemuOptionError(f"qemu option {option} {text}: parameter '{key}' is not supported by kvmpy "
                                  f"(known: {', '.join(sorted(allowed))})")
        out[key] = value
    return out


def _on_off(value: str, where: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise QemuOptionError(f"{where}: expected on or off, got {value!r}")


def _number(value: str, where: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise QemuOptionError(f"{where}: expected a number, got {value!r}") from None


# ------------------------------------------------------------------ the option table
# name -> takes an argument. The handlers are QemuCommandLine methods named
# opt_<name with '-' as '_'>.
OPTIONS: dict[str, bool] = {
    "enable-kvm": False, "accel": True, "machine": True, "M": True, "m": True, "smp": True, "cpu": True,
    "hda": True, "hdb": True, "hdc": True, "hdd": True, "cdrom": True, "drive": True, "boot": True,
    "kernel": True, "initrd": True, "append": True, "bios": True, "L": True,
    "nographic": False, "display": True, "serial": True, "monitor": True, "qmp": True,
    "name": True, "pidfile": True, "daemonize": False, "runas": True, "no-reboot": False,
    "no-shutdown": False, "net": True, "netdev": True, "nic": True, "device": True,
    "vnc": True, "k": True, "S": False, "D": True, "d": True, "rtc": True, "usb": False, "vga": True,
    "version": False, "h": False, "help": False, "nodefaults": False, "no-user-config": False,
    "chardev": True, "mon": True, "snapshot": False,
}
OPTIONS["object"] = True        # -object iothread,id=NAME (the virtio-blk data plane's iothreads)

# kvmpy's own `kvmpy run` options whose meaning differs from QEMU's option of that
# name (or that QEMU lacks): spelt with two dashes in a `kvmpy run` command line they
# keep kvmpy's meaning. Every other `--opt` is QEMU's `-opt`, as QEMU itself reads it.
KVMPY_OPTIONS: dict[str, bool] = {
    "sandbox": True, "trace": True, "memory": True, "drive": True, "net": True, "device": True,
    "serial": True, "accel": True, "smp": True,
}


def split_options(argv: list[str], kvmpy_options: bool = True) -> list[tuple[str, str | None, bool]]:
    """argv -> [(name, argument or None, kvmpy's meaning)]; a bare word is ("", word, False)
    (QEMU's positional argument: the first hard disk). Missing arguments are one line."""
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if not a.startswith("-") or a == "-":
            out.append(("", a, False))
            continue
        double = a.startswith("--")
        name, eq, inline = (a[2:] if double else a[1:]).partition("=")
        if double and kvmpy_options and name in KVMPY_OPTIONS:
            takes, kvmpy = KVMPY_OPTIONS[name], True
        elif name in OPTIONS:
            takes, kvmpy = OPTIONS[name], False
        else:
            raise _unsupported(a.partition("=")[0])
        if not takes:
            if eq:
                raise QemuOptionError(f"qemu option -{name}: takes no argument")
            out.append((name, None, kvmpy))
            continue
        if eq:
            if not double:      # -m=512 is not QEMU's spelling; --m=512 is argparse's
                raise _unsupported(a)
            value = inline
        else:
            if i >= len(argv):
                raise QemuOptionError(f"qemu option -{name}: requires an argument")
            value = argv[i]
            i += 1
        out.append((name, value, kvmpy))
    return out


@dataclass
class _LegacyNet:
    """One ``-net`` part (nic or tap) on its QEMU "vlan" (hub)."""
    kind: str
    vlan: int
    opts: dict
    text: str


@dataclass
class QemuCommandLine:
    """The parse of one QEMU command line; ``cfg`` is the result."""
    cfg: VmConfig
    ignore_display: bool = False      # service mode: -vnc/-k are warned about, not refused
    warnings: list[str] = field(default_factory=list)
    _drives_by_id: dict = field(default_factory=dict)
    _unattached: dict = field(default_factory=dict)      # if=none drives waiting for a -device
    _netdevs: dict = field(default_factory=dict)
    _iothreads: set = field(default_factory=set)        # -object iothread ids
    _legacy_net: list = field(default_factory=list)
    _serial_given: bool = False
    _accel_given: list = field(default_factory=list)
    _initrd_spec: str | None = None
    _monitor_stdio: bool = False
    _nodefaults: bool = False
    _cpu_model: str = ""
    _bios_name: str | None = None
    _snapshot_all: bool = False
    # Disks whose writes go to a temporary overlay (-snapshot, -drive snapshot=on): see
    # make_snapshot_overlays, which run_qemu calls just before the VM starts.
    snapshot_disks: list = field(default_factory=list)
    _chardevs: dict = field(default_factory=dict)           # id -> the old spelling (unix:PATH,server)
    _chardev_uses: list = field(default_factory=list)       # (option, chardev id, text), resolved at the end
    wants_help: str | None = None

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s", text)

    # --- machine ------------------------------------------------------------------
    def opt_enable_kvm(self, value, text) -> None:
        self._accel_given.append("kvm")

    def opt_accel(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-accel", "accel"), "-accel", value,
                          {"accel", "thread", "force", "kernel-irqchip"})
        name = opts.get("accel", "")
        if name not in ("kvm", "tcg"):
            raise _unsupported(f"-accel {name or value}", "kvm or tcg")
        if opts.get("kernel-irqchip", "on") not in ("on", "split") and name == "kvm":
            raise _unsupported(f"-accel {value}", "kernel-irqchip is always on")
        if "thread" in opts and (name != "tcg" or opts["thread"] not in ("single", "multi")):
            raise QemuOptionError(f"qemu option -accel {value}: thread=single|multi applies to tcg only")
        if "force" in opts:     # kvmpy's own: boot Linux on a software-nested KVM anyway
            self.cfg.accel_force = parse_on_off(opts["force"], f"qemu option -accel {value}: force")
        self._accel_given.append(name)

    def opt_machine(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-machine", "type"), "-machine", value,
                          {"type", "accel", "usb", "vmport", "dump-guest-core", "mem-merge", "hpet",
                           "kernel-irqchip", "kernel_irqchip"})
        mtype = opts.get("type", "pc")
        if mtype == "help":
            self.wants_help = "machine"
            return
        if mtype == "q35" or mtype.startswith("pc-q35"):
            raise _unsupported(f"-machine {mtype}", "only the i440FX PC, -machine pc")
        if not (mtype == "pc" or mtype.startswith("pc-i440fx") or mtype.startswith("pc-")):
            raise _unsupported(f"-machine {mtype}", "only -machine pc")
        for accel in filter(None, opts.get("accel", "").split(":")):
            if accel not in ("kvm", "tcg"):
                raise _unsupported(f"-machine accel={accel}", "kvm or tcg")
            self._accel_given.append(accel)
        for key in ("kernel-irqchip", "kernel_irqchip"):    # kvmpy's KVM irqchip is in the kernel
            if opts.get(key, "on") not in ("on", "split"):
                raise _unsupported(f"-machine {key}={opts[key]}", "the irqchip is always in the kernel")
        for key in ("usb", "vmport", "hpet"):      # absent from kvmpy's PC: off is what it is
            if key in opts and _on_off(opts[key], f"qemu option -machine {key}"):
                raise _unsupported(f"-machine {key}=on")

    opt_M = opt_machine

    def opt_m(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-m", "size"), "-m", value, {"size", "slots", "maxmem"})
        if "slots" in opts or "maxmem" in opts:
            raise _unsupported(f"-m {value}", "memory hotplug: slots=/maxmem=")
        self.cfg.memory = qemu_size(opts.get("size", ""), f"qemu option -m {value}")

    def opt_smp(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-smp", "cpus"), "-smp", value,
                          {"cpus", "sockets", "cores", "threads", "dies", "maxcpus"})
        where = f"qemu option -smp {value}"
        nums = {k: _number(v, where) for k, v in opts.items()}
        if any(n < 1 for n in nums.values()):
            raise QemuOptionError(f"{where}: every count must be at least 1")
        topology = nums.get("sockets", 1) * nums.get("dies", 1) * nums.get("cores", 1) * nums.get("threads", 1)
        cpus = nums.get("cpus", topology)
        if "cpus" in nums and any(k in nums for k in ("sockets", "cores", "threads", "dies")) and topology < cpus:
            raise QemuOptionError(f"{where}: sockets*cores*threads ({topology}) is less than cpus ({cpus})")
        if nums.get("maxcpus", cpus) != cpus:
            raise _unsupported(f"-smp {value}", "CPU hotplug: maxcpus= must equal cpus")
        self.cfg.cpus = cpus

    def opt_cpu(self, value, text) -> None:
        model = value.split(",")[0]
        self._cpu_model = model
        if model not in ("host", "max"):
            raise _unsupported(f"-cpu {model}", "only host and max: kvmpy gives the guest the host's CPUID "
                               "under KVM and its translator's own model otherwise")
        if value != model:
            raise _unsupported(f"-cpu {value}", "CPU feature flags")

    # --- disks ------------------------------------------------------------------
    def _ide_disk(self, option, path, media="disk") -> None:
        if not path:
            raise QemuOptionError(f"qemu option {option}: empty file name")
        if media == "cdrom":
            index = self._free_ide_index(CDROM_INDEX, option)
            disk = DiskConfig(path=os.path.abspath(path), interface="ide", media="cdrom", readonly=True,
                              index=index)
        else:
            index = IDE_INDEX[option]
            disk = DiskConfig(path=os.path.abspath(path), interface="ide", index=index)
        self._add_disk(disk, f"qemu option {option} {path}")

    def _free_ide_index(self, preferred: int, option: str) -> int:
        taken = {d.index for d in self.cfg.disks if d.interface == "ide"}
        for index in (preferred, *range(4)):
            if index not in taken:
                return index
        raise QemuOptionError(f"qemu option {option}: all four IDE positions are taken")

    def _add_disk(self, disk: DiskConfig, where: str) -> None:
        check_disk(disk, where)
        if disk.interface == "ide" and disk.index is not None and any(
                d.interface == "ide" and d.index == disk.index for d in self.cfg.disks):
            raise QemuOptionError(f"{where}: IDE index {disk.index} is already taken")
        self.cfg.disks.append(disk)

    def opt_hda(self, value, text) -> None:
        self._ide_disk(text, value)

    opt_hdb = opt_hdc = opt_hdd = opt_hda

    def opt_cdrom(self, value, text) -> None:
        self._ide_disk("-cdrom", value, media="cdrom")

    def opt_drive(self, value, text) -> None:
        where = f"qemu option -drive {value}"
        opts = _opts_dict(split_suboptions(value, "-drive", "file"), "-drive", value,
                          {"file", "format", "if", "media", "index", "readonly", "snapshot", "cache", "werror",
                           "rerror", "id", "serial", "aio", "discard", "detect-zeroes"})
        iface = opts.get("if", "ide")         # QEMU's default for -drive on a PC
        if iface == "pflash":
            self._pflash(opts, where)
            return
        if iface not in ("ide", "virtio", "none"):
            raise _unsupported(f"-drive if={iface}", "if=ide, if=virtio or if=none")
        snapshot = "snapshot" in opts and _on_off(opts["snapshot"], f"{where}: snapshot")
        cache = opts.get("cache", "writeback")
        if cache not in DISK_CACHE_MODES:
            raise _unsupported(f"-drive cache={cache}", ", ".join(DISK_CACHE_MODES))
        if opts.get("aio", "threads") not in ("threads",):
            raise _unsupported(f"-drive aio={opts['aio']}", "kvmpy does its I/O on worker threads")
        if opts.get("discard", "ignore") not in ("ignore", "off", "unmap", "on"):
            raise QemuOptionError(f"{where}: discard must be ignore or unmap")
        if opts.get("detect-zeroes", "off") != "off":
            raise _unsupported(f"-drive detect-zeroes={opts['detect-zeroes']}")
        path = opts.get("file", "")
        if not path:
            raise QemuOptionError(f"{where}: missing file= (kvmpy has no empty drives)")
        fmt = opts.get("format")
        if fmt not in (None, "raw", "qcow2"):
            raise _unsupported(f"-drive format={fmt}", "raw or qcow2")
        media = opts.get("media", "disk")
        if media not in ("disk", "cdrom"):
            raise QemuOptionError(f"{where}: media must be disk or cdrom, got {media!r}")
        readonly = _on_off(opts.get("readonly", "off"), f"{where}: readonly")
        disk = DiskConfig(path=os.path.abspath(path), format=fmt, readonly=readonly or media == "cdrom",
                          media=media, interface="ide" if media == "cdrom" else ("virtio" if iface == "virtio"
                                                                                  else "ide"))
        if media == "cdrom" and iface == "virtio":
            raise QemuOptionError(f"{where}: a CD-ROM is an IDE (ATAPI) device, not if=virtio")
        disk.cache = cache
        disk.serial = check_disk_serial(opts.get("serial", ""), f"{where}: serial")
        for key in ("werror", "rerror"):
            if key in opts:
                setattr(disk, key, check_error_policy(opts[key], key, f"{where}: {key}"))
        if "index" in opts:
            index = _number(opts["index"], f"{where}: index")
            if iface != "ide":
                raise QemuOptionError(f"{where}: index= applies to if=ide only")
            disk.index = index
        elif iface == "ide":
            disk.index = self._free_ide_index(0, "-drive")
        drive_id = opts.get("id")
        if drive_id is not None:
            if drive_id in self._drives_by_id:
                raise QemuOptionError(f"{where}: a drive with id={drive_id} already exists")
            self._drives_by_id[drive_id] = disk
        if snapshot and not disk.readonly:
            self.snapshot_disks.append(disk)
        if iface == "none":
            if drive_id is None:
                raise QemuOptionError(f"{where}: if=none needs id= (for -device ...,drive=ID)")
            self._unattached[drive_id] = disk
            return
        self._add_disk(disk, where)

    def _pflash(self, opts: dict, where: str) -> None:
        """UEFI as QEMU's users start it: the first -drive if=pflash is the firmware code
        (as -bios), the second the variable store the guest writes (firmware_vars)."""
        if not opts.get("file"):
            raise QemuOptionError(f"{where}: missing file=")
        if opts.get("format", "raw") != "raw":
            raise QemuOptionError(f"{where}: a flash image is raw")
        if self._bios_name is None:
            self._bios_name = opts["file"]
        elif self.cfg.firmware_vars is None:
            if opts.get("readonly") in ("on", "true", "yes"):
                raise QemuOptionError(f"{where}: the variable store is written by the guest; drop readonly=on")
            self.cfg.firmware_vars = os.path.abspath(opts["file"])
        else:
            raise _unsupported("-drive if=pflash", "two flashes: the firmware code and its variable store")

    # --- boot ------------------------------------------------------------------
    def opt_boot(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-boot", "order"), "-boot", value,
                          {"order", "once", "menu", "strict", "splash", "splash-time", "reboot-timeout"})
        where = f"qemu option -boot {value}"
        order = []
        # once= is the first boot's order; kvmpy has one order for every boot, so it leads.
        for letters in (opts.get("once", ""), opts.get("order", "")):
            for letter in letters:
                if letter not in BOOT_LETTERS:
                    raise QemuOptionError(f"{where}: boot device {letter!r} is not one of c (disk), d (cdrom), "
                                          "n (net)")
                if BOOT_LETTERS[letter] not in order:
                    order.append(BOOT_LETTERS[letter])
        if "once" in opts:
            self.warn(f"{where}: once= is the order of every boot under kvmpy, not only the first")
        if order:
            self.cfg.boot_order = order
        if "menu" in opts:
            self.cfg.boot_menu = _on_off(opts["menu"], f"{where}: menu")
        if "strict" in opts:
            _on_off(opts["strict"], f"{where}: strict")
        for key in ("splash-time", "reboot-timeout"):
            if key in opts:
                _number(opts[key], f"{where}: {key}")
        if "splash" in opts:
            raise _unsupported("-boot splash=", "the firmware gets no boot splash image from kvmpy")

    def opt_kernel(self, value, text) -> None:
        self.cfg.kernel = os.path.abspath(value)

    def opt_initrd(self, value, text) -> None:
        self._initrd_spec = value

    def opt_append(self, value, text) -> None:
        self.cfg.cmdline = value

    def opt_bios(self, value, text) -> None:
        if not value:
            raise QemuOptionError("qemu option -bios: empty file name")
        self._bios_name = value          # found at the end: -L may come after it

    def opt_L(self, value, text) -> None:
        self.cfg.firmware_path.append(os.path.abspath(value))

    # --- display and character devices -------------------------------------------
    def opt_nographic(self, value, text) -> None:
        pass       # kvmpy's serial console is on stdio unless -serial says otherwise: -nographic's own

    def opt_display(self, value, text) -> None:
        kind, _, rest = value.partition(",")
        if kind == "none":
            return
        if kind.startswith("vnc="):
            self.opt_vnc(value[4:], "-vnc")
            return
        self._display(f"-display {value}")

    def opt_vnc(self, value, text) -> None:
        set_vnc(self.cfg, value, f"qemu option -vnc {value}")      # QEMU's -vnc spelling is kvmpy's own

    def opt_nodefaults(self, value, text) -> None:
        # QEMU then has no serial port on stdio unless -serial puts one there (kvm-unit-tests does)
        self._nodefaults = True

    def opt_no_user_config(self, value, text) -> None:
        pass        # kvmpy reads no user configuration files

    def opt_k(self, value, text) -> None:
        set_keymap(self.cfg, value, f"qemu option -k {value}")

    def opt_vga(self, value, text) -> None:
        if value in VGA_KINDS:
            self.cfg.display.vga = value
        else:
            self._display(f"-vga {value}", f"kvmpy's display adapters: {', '.join(VGA_KINDS)}")

    def _display(self, option: str, why: str = "") -> None:
        why = why or "kvmpy's display is VNC: -vnc, -k, -vga std"
        if self.ignore_display:
            self.warn(f"{option} ignored: {why}")
            return
        raise _unsupported(option, why)

    def opt_serial(self, value, text) -> None:
        if self._serial_given:
            raise _unsupported(f"-serial {value}", "one serial port (COM1) only")
        self._serial_given = True
        if value.startswith("chardev:"):
            self._chardev_uses.append(("-serial", value[8:], ""))
            return
        self.cfg.serial = qemu_chardev_to_serial(value)

    def opt_chardev(self, value, text) -> None:
        """``-chardev BACKEND,id=ID,...``: remembered in the old spelling (``unix:PATH,server``)
        for the ``-serial chardev:ID``, ``-monitor chardev:ID`` or ``-mon chardev=ID`` using it."""
        where = f"qemu option -chardev {value}"
        pairs = split_suboptions(value, "-chardev", "backend")
        backend = pairs[0][1] if pairs and pairs[0][0] == "backend" else ""
        allowed = {"stdio": {"id", "mux", "signal"}, "null": {"id"}, "file": {"id", "path"},
                   "socket": {"id", "path", "host", "port", "server", "wait", "telnet", "nodelay"}}.get(backend)
        if allowed is None:
            raise _unsupported(f"-chardev {backend or value}", "stdio, null, file or socket")
        opts = _opts_dict(pairs[1:], "-chardev", value, allowed)
        if not opts.get("id"):
            raise QemuOptionError(f"{where}: missing id=")
        if opts["id"] in self._chardevs:
            raise QemuOptionError(f"{where}: a chardev with id={opts['id']} already exists")
        if backend == "stdio":
            spec = "stdio"
        elif backend == "null":
            spec = "none"
        elif backend == "file":
            if not opts.get("path"):
                raise QemuOptionError(f"{where}: missing path=")
            spec = "file:" + opts["path"]
        else:
            if not _on_off(opts.get("server", "off"), f"{where}: server"):
                raise _unsupported(f"-chardev {value}", "a client connection; kvmpy listens: add server=on,wait=off")
            if "path" in opts:
                spec = f"unix:{opts['path']}"
            elif "port" in opts:
                kind = "telnet" if _on_off(opts.get("telnet", "off"), f"{where}: telnet") else "tcp"
                spec = f"{kind}:{opts.get('host', '')}:{opts['port']}"
            else:
                raise QemuOptionError(f"{where}: socket needs path= or host=,port=")
            spec += ",server"
            if not _on_off(opts.get("wait", "on"), f"{where}: wait"):
                spec += ",nowait"
            if _on_off(opts.get("nodelay", "off"), f"{where}: nodelay"):
                spec += ",nodelay"
        self._chardevs[opts["id"]] = spec

    def opt_mon(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-mon", "chardev"), "-mon", value, {"chardev", "mode", "pretty"})
        mode = opts.get("mode", "readline")
        if mode not in ("readline", "control"):
            raise QemuOptionError(f"qemu option -mon {value}: mode must be readline or control")
        if not opts.get("chardev"):
            raise QemuOptionError(f"qemu option -mon {value}: missing chardev=")
        self._chardev_uses.append(("-qmp" if mode == "control" else "-monitor", opts["chardev"], value))

    def _resolve_chardevs(self) -> None:
        for option, chardev_id, text in self._chardev_uses:
            spec = self._chardevs.get(chardev_id)
            if spec is None:
                raise QemuOptionError(f"qemu option {option} {text or 'chardev:' + chardev_id}: no -chardev "
                                      f"with id={chardev_id}")
            if option == "-serial":
                self.cfg.serial = qemu_chardev_to_serial(spec)
            elif option == "-qmp" and spec == "stdio":
                raise _unsupported(f"-mon {text}", "QMP on stdio; use a socket chardev")
            else:
                getattr(self, "opt_" + option[1:])(spec, option)

    def opt_monitor(self, value, text) -> None:
        if value.startswith("chardev:"):
            self._chardev_uses.append(("-monitor", value[8:], ""))
            return
        kind = value.split(",")[0]
        if kind in ("stdio", "mon:stdio"):
            self._monitor_stdio = True
            return
        if kind in ("none", "vc"):       # vc: the display's monitor tab, and there is no display
            return
        self.cfg.hmp.append(_monitor_address(value, "-monitor"))

    def opt_qmp(self, value, text) -> None:
        if value.startswith("chardev:"):
            self._chardev_uses.append(("-qmp", value[8:], ""))
            return
        self.cfg.qmp.append(_monitor_address(value, "-qmp"))

    # --- process --------------------------------------------------------------------
    def opt_name(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-name", "guest"), "-name", value,
                          {"guest", "process", "debug-threads"})
        if "guest" in opts:
            self.cfg.name = check_name(opts["guest"], f"qemu option -name {value}")
        if "process" in opts:
            self.cfg.process_name = opts["process"]

    def opt_pidfile(self, value, text) -> None:
        self.cfg.pidfile = os.path.abspath(value)

    def opt_daemonize(self, value, text) -> None:
        self.cfg.daemonize = True

    def opt_runas(self, value, text) -> None:
        self.cfg.runas = value

    def opt_no_reboot(self, value, text) -> None:
        self.cfg.no_reboot = True

    def opt_no_shutdown(self, value, text) -> None:
        raise _unsupported("-no-shutdown", "a guest power-off ends kvmpy")

    def opt_snapshot(self, value, text) -> None:
        self._snapshot_all = True

    def opt_S(self, value, text) -> None:
        self.cfg.start_paused = True

    def opt_D(self, value, text) -> None:
        self.cfg.log_file = os.path.abspath(value)

    def opt_d(self, value, text) -> None:
        from .vcpu.trace import TRACE_EVENTS
        for item in value.split(","):
            if item == "help":
                self.wants_help = "trace"
            elif item in TRACE_EVENTS:
                if item not in self.cfg.trace:
                    self.cfg.trace.append(item)
            else:
                raise _unsupported(f"-d {item}", f"kvmpy's items: {', '.join(sorted(TRACE_EVENTS))}")

    def opt_rtc(self, value, text) -> None:
        opts = _opts_dict(split_suboptions(value, "-rtc", "base"), "-rtc", value, {"base", "clock", "driftfix"})
        if opts.get("base", "utc") != "utc":
            raise _unsupported(f"-rtc base={opts['base']}", "the RTC runs in UTC")
        if opts.get("clock", "host") != "host":
            raise _unsupported(f"-rtc clock={opts['clock']}", "the RTC follows the host clock")
        if opts.get("driftfix", "none") != "none":
            raise _unsupported(f"-rtc driftfix={opts['driftfix']}")

    def opt_usb(self, value, text) -> None:
        self.warn("-usb: kvmpy's PC has no USB controller; the option is ignored")

    def opt_version(self, value, text) -> None:
        self.wants_help = "version"

    def opt_h(self, value, text) -> None:
        self.wants_help = "help"

    opt_help = opt_h

    # --- network ---------------------------------------------------------------------
    def opt_net(self, value, text) -> None:
        self.cfg.default_nic = False      # QEMU: any -net/-netdev/-nic, "none" too
        pairs = split_suboptions(value, "-net", "type")
        kind = pairs[0][1] if pairs and pairs[0][0] == "type" else ""
        where = f"qemu option -net {value}"
        if kind == "none":
            return
        if kind == "nic":
            opts = _opts_dict(pairs[1:], "-net", value, {"macaddr", "model", "vlan", "name", "netdev", "id"})
            _check_model(opts.get("model", "virtio"), "-net nic")
        elif kind == "tap":
            opts = _opts_dict(pairs[1:], "-net", value, {"ifname", "script", "downscript", "vlan", "name", "id",
                                                         "br", "vhost"})
            _check_scripts(opts, "-net tap")
        elif kind == "user":
            vlan = _number(dict(pairs[1:]).get("vlan", "0"), f"{where}: vlan")
            net = _user_network([p for p in pairs[1:] if p[0] not in ("vlan", "name", "id")], "-net", value)
            self._legacy_net.append(_LegacyNet("user", vlan, {"net": net}, value))
            return
        else:
            raise _unsupported(f"-net {kind or value}", "nic, tap, user or none")
        if "netdev" in opts:
            raise _unsupported("-net nic,netdev=", "use -device virtio-net-pci,netdev=ID")
        vlan = _number(opts.pop("vlan", "0"), f"{where}: vlan")
        self._legacy_net.append(_LegacyNet(kind, vlan, opts, value))

    def opt_netdev(self, value, text) -> None:
        self.cfg.default_nic = False
        pairs = split_suboptions(value, "-netdev", "type")
        kind = pairs[0][1] if pairs and pairs[0][0] == "type" else ""
        if kind == "user":
            ids = [v for k, v in pairs[1:] if k == "id"]
            if not ids:
                raise QemuOptionError(f"qemu option -netdev {value}: missing id=")
            if ids[-1] in self._netdevs:
                raise QemuOptionError(f"qemu option -netdev {value}: a netdev with id={ids[-1]} already exists")
            self._netdevs[ids[-1]] = [_user_network([p for p in pairs[1:] if p[0] != "id"], "-netdev", value),
                                      False, value]
            return
        if kind not in ("tap", "bridge"):
            raise _unsupported(f"-netdev {kind or value}", "tap or bridge")
        allowed = {"id", "ifname", "script", "downscript", "br", "vhost", "queues"} if kind == "tap" else {
            "id", "br", "helper"}
        opts = _opts_dict(pairs[1:], "-netdev", value, allowed)
        if "id" not in opts:
            raise QemuOptionError(f"qemu option -netdev {value}: missing id=")
        if opts["id"] in self._netdevs:
            raise QemuOptionError(f"qemu option -netdev {value}: a netdev with id={opts['id']} already exists")
        if kind == "bridge" and "helper" in opts:
            raise _unsupported("-netdev bridge,helper=", "kvmpy attaches the tap to the bridge itself")
        _check_scripts(opts, f"-netdev {kind}")
        net = NetConfig(ifname=opts.get("ifname", ""), bridge=opts.get("br", ""),
                        **_tap_extras(opts, f"-netdev {value}"))
        self._netdevs[opts["id"]] = [net, False, value]

    def opt_nic(self, value, text) -> None:
        self.cfg.default_nic = False
        pairs = split_suboptions(value, "-nic", "type")
        kind = pairs[0][1] if pairs and pairs[0][0] == "type" else ""
        if kind == "none":
            return
        if kind == "user":
            model = dict(pairs[1:]).get("model", "virtio")
            _check_model(model, "-nic")
            self.cfg.nets.append(_user_network([p for p in pairs[1:] if p[0] not in ("model", "id")], "-nic",
                                               value))
            return
        if kind not in ("tap", "bridge"):
            raise _unsupported(f"-nic {kind or value}", "tap, bridge or none")
        opts = _opts_dict(pairs[1:], "-nic", value, {"id", "ifname", "script", "downscript", "br", "vhost", "mac",
                                                     "model", "queues"})
        _check_model(opts.get("model", "virtio"), "-nic")
        _check_scripts(opts, "-nic")
        self.cfg.nets.append(NetConfig(ifname=opts.get("ifname", ""), bridge=opts.get("br", ""),
                                       mac=check_mac(opts.get("mac", ""), f"qemu option -nic {value}: mac"),
                                       **_tap_extras(opts, f"-nic {value}")))

    def _finish_legacy_net(self) -> None:
        """QEMU connects every -net part on one vlan (a hub); kvmpy's NIC is one tap for
        one virtio-net, so a vlan must hold exactly one nic and one tap."""
        vlans: dict[int, list[_LegacyNet]] = {}
        for part in self._legacy_net:
            vlans.setdefault(part.vlan, []).append(part)
        for vlan, parts in sorted(vlans.items()):
            nics = [p for p in parts if p.kind == "nic"]
            taps = [p for p in parts if p.kind in ("tap", "user")]
            if len(nics) != 1 or len(taps) != 1:
                first = (nics or taps)[0]
                raise _unsupported(f"-net {first.text}", f"each vlan (hub) needs one -net nic and one -net tap or "
                                   f"user; vlan {vlan} has {len(nics)} nic(s) and {len(taps)} backend(s)")
            nic, tap = nics[0].opts, taps[0].opts
            if taps[0].kind == "user":
                tap["net"].mac = check_mac(nic.get("macaddr", ""), f"qemu option -net {nics[0].text}: macaddr")
                self.cfg.nets.append(tap["net"])
                continue
            self.cfg.nets.append(NetConfig(
                ifname=tap.get("ifname", ""), bridge=tap.get("br", ""), vhost=tap.get("vhost", "off"),
                mac=check_mac(nic.get("macaddr", ""), f"qemu option -net {nics[0].text}: macaddr")))

    # --- objects ---------------------------------------------------------------------
    def opt_object(self, value, text) -> None:
        """``-object iothread,id=NAME``: a virtio-blk-pci with ``iothread=NAME`` has the
        native data plane serve its queues from that one thread (QEMU's polling
        knobs are accepted and have no effect)."""
        pairs = split_suboptions(value, "-object", "qom-type")
        qom_type = pairs[0][1] if pairs and pairs[0][0] == "qom-type" else ""
        if qom_type != "iothread":
            raise _unsupported(f"-object {qom_type or value}", "only -object iothread,id=NAME")
        opts = _opts_dict(pairs[1:], "-object", value, {"id", "poll-max-ns", "poll-grow", "poll-shrink",
                                                         "aio-max-batch"})
        where = f"qemu option -object {value}"
        if "id" not in opts:
            raise QemuOptionError(f"{where}: missing id=")
        name = check_iothread(opts["id"], f"{where}: id")
        if name in self._iothreads:
            raise QemuOptionError(f"{where}: iothread {name} is already defined")
        self._iothreads.add(name)
        self.cfg.iothreads.append(name)

    # --- devices ---------------------------------------------------------------------
    def opt_device(self, value, text) -> None:
        pairs = split_suboptions(value, "-device", "driver")
        driver = pairs[0][1] if pairs and pairs[0][0] == "driver" else ""
        where = f"qemu option -device {value}"
        common = {"id", "bus", "addr"}
        if driver == "isa-debug-exit":
            opts = _opts_dict(pairs[1:], "-device", value, common | {"iobase", "iosize"})
            iobase = _number(opts.get("iobase", "0x501"), f"{where}: iobase")
            iosize = _number(opts.get("iosize", "2"), f"{where}: iosize")
            self._device(ISA_DEBUG_EXIT, where, iobase=iobase, iosize=iosize)
        elif driver == "pc-testdev":
            _opts_dict(pairs[1:], "-device", value, common)
            self._device(PC_TESTDEV_PORTS, where)
            self._device(PC_TESTDEV_IOMEM, where)
        elif driver == "pci-testdev":
            _opts_dict(pairs[1:], "-device", value, common | {"membar"})
            self._device(PCI_TESTDEV, where)
        elif driver in ("virtio-blk-pci", "virtio-blk", "ide-hd", "ide-cd", "ide-drive"):
            extra = {"iothread", "num-queues"} if driver.startswith("virtio") else set()
            opts = _opts_dict(pairs[1:], "-device", value, common | {"drive", "serial", "unit", "bootindex"} | extra)
            self._attach_drive(driver, opts, where)
        elif driver in ("virtio-net-pci", "virtio-net"):
            opts = _opts_dict(pairs[1:], "-device", value, common | {"netdev", "mac", "bootindex"})
            netdev = opts.get("netdev")
            if netdev is None or netdev not in self._netdevs:
                raise QemuOptionError(f"{where}: netdev={netdev} names no -netdev given before it")
            entry = self._netdevs[netdev]
            if entry[1]:
                raise QemuOptionError(f"{where}: netdev {netdev} is already used by another NIC")
            entry[1] = True
            entry[0].mac = check_mac(opts.get("mac", ""), f"{where}: mac")
            self.cfg.nets.append(entry[0])
        elif driver in ("e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet"):
            raise _unsupported(f"-device {driver}", "use virtio-net-pci")
        elif driver == "help":
            self.wants_help = "device"
        else:
            raise _unsupported(f"-device {driver or value}")

    def _device(self, dtype: str, where: str, **options) -> None:
        self.cfg.devices.append(DeviceConfig(type=dtype, options=options, where=where, base_dir=os.getcwd()))

    def _attach_drive(self, driver: str, opts: dict, where: str) -> None:
        drive_id = opts.get("drive")
        if drive_id is None or drive_id not in self._unattached:
            raise QemuOptionError(f"{where}: drive={drive_id} names no -drive if=none,id=... given before it")
        disk = self._unattached.pop(drive_id)
        if driver.startswith("virtio"):
            if disk.media == "cdrom":
                raise QemuOptionError(f"{where}: drive {drive_id} is a CD-ROM: use ide-cd")
            disk.interface, disk.index = "virtio", None
            if "iothread" in opts:
                if opts["iothread"] not in self._iothreads:
                    raise QemuOptionError(f"{where}: iothread={opts['iothread']} names no -object iothread "
                                          "given before it")
                disk.iothread = opts["iothread"]
            if "num-queues" in opts:
                disk.queues = check_disk_queues(opts["num-queues"], f"{where}: num-queues")
        else:
            disk.interface = "ide"
            disk.media = "cdrom" if driver == "ide-cd" else disk.media
            disk.readonly = disk.readonly or disk.media == "cdrom"
            unit = _number(opts["unit"], f"{where}: unit") if "unit" in opts else None
            bus = opts.get("bus")
            if bus is not None and bus not in ("ide.0", "ide.1"):
                raise QemuOptionError(f"{where}: bus must be ide.0 or ide.1, got {bus!r}")
            if bus is not None or unit is not None:
                disk.index = (int(bus[-1]) if bus else 0) * 2 + (unit or 0)
            else:
                disk.index = self._free_ide_index(0, "-device")
        if "serial" in opts:
            disk.serial = check_disk_serial(opts["serial"], f"{where}: serial")
        self._add_disk(disk, where)

    # --- the positional argument ------------------------------------------------------
    def positional(self, value: str) -> None:
        """QEMU's bare argument is the first hard disk (-hda); `kvmpy run` keeps its vm.toml."""
        self._ide_disk("-hda", value)

    def finish(self) -> VmConfig:
        self._resolve_chardevs()
        self._finish_legacy_net()
        for drive_id, disk in self._unattached.items():
            self.warn(f"qemu option -drive id={drive_id}: if=none and no -device uses it; the guest does not see it")
        for netdev_id, (net, used, text) in self._netdevs.items():
            if not used:
                raise QemuOptionError(f"qemu option -netdev {text}: no -device virtio-net-pci,netdev={netdev_id} "
                                      "uses it")
        if self._accel_given:
            # QEMU tries the accelerators in order: "kvm then tcg" is kvmpy's auto.
            first = self._accel_given[0]
            self.cfg.accel = "auto" if first == "kvm" and "tcg" in self._accel_given[1:] else first
            if self.cfg.accel_force and self.cfg.accel != "kvm":
                raise QemuOptionError("qemu option -accel: force=on applies to kvm only")
        if self._cpu_model == "host" and self.cfg.accel == "tcg":
            raise QemuOptionError("qemu option -cpu host: needs KVM (-enable-kvm or -accel kvm); the translator "
                                  "has its own model: -cpu max")
        if self._nodefaults and not self._serial_given:
            self.cfg.serial = "none"
        if self._monitor_stdio and self.cfg.serial != "stdio":
            raise _unsupported("-monitor stdio", "the human monitor on stdio is Ctrl-A c on the stdio serial "
                               "console; use -monitor telnet:HOST:PORT,server,nowait or unix:PATH,server,nowait")
        if self._initrd_spec is not None:
            self._finish_initrd()
        if self._snapshot_all:
            self.snapshot_disks = [d for d in self.cfg.disks if not d.readonly]
        else:
            self.snapshot_disks = [d for d in self.snapshot_disks if any(d is c for c in self.cfg.disks)]
        if self._bios_name is not None:
            self.cfg.bios = find_firmware_file(self._bios_name, self.cfg.firmware_path)
            if self.cfg.firmware is None:
                # QEMU runs the -bios image it is given, -kernel or not, and OVMF is UEFI.
                self.cfg.firmware = "uefi" if is_uefi_image(self.cfg.bios) else "bios"
        if self._nodefaults:
            self.cfg.default_nic = False
        add_default_nic(self.cfg)       # after the firmware is known: not under UEFI
        return self.cfg

    def _finish_initrd(self) -> None:
        spec = self._initrd_spec
        # QEMU's -initrd for a multiboot kernel: "mod1 arg arg,mod2" (",," a literal comma).
        modules = _split_commas(spec)
        if not (self.cfg.kernel and os.path.isfile(self.cfg.kernel)):
            self.cfg.initrd = os.path.abspath(spec)     # the missing kernel is the error to report
            return
        from .boot.loader import kernel_kind
        multiboot = kernel_kind(self.cfg.kernel) == "multiboot"
        if multiboot:
            self.cfg.multiboot_modules = []
            for m in modules:
                path, _, args = m.strip().partition(" ")
                if not path:
                    raise QemuOptionError(f"qemu option -initrd {spec}: an empty module")
                self.cfg.multiboot_modules.append((os.path.abspath(path), m.strip()))
            return
        if len(modules) != 1:
            raise _unsupported(f"-initrd {spec}", "several initrds are for multiboot kernels only")
        self.cfg.initrd = os.path.abspath(modules[0])


_QEMU_SIZE_RE = re.compile(r"([0-9]{1,15})(?:\.([0-9]{1,9}))?([kKmMgGtT]?)[bB]?")


def qemu_size(text: str, where: str) -> int:
    """QEMU's -m size: MiB when bare, a K/M/G/T suffix, a fraction allowed (``1.5G``)."""
    m = _QEMU_SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise QemuOptionError(f"{where}: expected a size like 512, 512M or 1.5G, got {text!r}")
    unit = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(3).lower()]
    whole, fraction = int(m.group(1)), m.group(2) or ""
    size = whole * unit + int(fraction or "0") * unit // 10 ** len(fraction)
    if fraction and int(fraction) * unit % 10 ** len(fraction):
        raise QemuOptionError(f"{where}: {text!r} is not a whole number of bytes")
    return size


def _split_commas(text: str) -> list[str]:
    return [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]


# Where QEMU (Debian's qemu-system-data, seabios, ovmf) keeps firmware, after -L's directories.
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/share/OVMF", "/usr/share/ovmf")
UEFI_VOLUME_SIGNATURE = b"_FVH"       # a UEFI firmware volume header's, at offset 40 (PI spec)


def is_uefi_image(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head[40:44] == UEFI_VOLUME_SIGNATURE


def find_firmware_file(name: str, search: list[str]) -> str:
    """QEMU's lookup of a -bios name: the name itself (from the current directory),
    then each -L directory, then QEMU's data directories."""
    if os.path.isfile(name) or os.sep in name:
        return os.path.abspath(name)
    for directory in (*search, *FIRMWARE_DIRS):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise QemuOptionError(f"qemu option -bios {name}: not found here, in -L directories or in "
                          f"{', '.join(FIRMWARE_DIRS)}")


def _user_network(pairs: list[tuple[str, str]], option: str, text: str) -> NetConfig:
    """A user-mode (libslirp) NIC from QEMU's options, through kvmpy.config's parser for them."""
    opts: dict = {}
    for key, value in pairs:
        if key in ("hostfwd", "guestfwd"):         # QEMU takes these several times
            opts.setdefault(key, []).append(value)
        else:
            opts[key] = value
    return parse_user_net_options(opts, f"qemu option {option} {text}")


def _check_model(model: str, option: str) -> None:
    if model in ("virtio", "virtio-net-pci"):
        return
    if model == "e1000" or model in ("e1000e", "rtl8139", "ne2k_pci", "pcnet", "i82559er"):
        raise _unsupported(f"{option},model={model}", "not supported; use model=virtio")
    raise _unsupported(f"{option},model={model}", "use model=virtio")


def _check_scripts(opts: dict, option: str) -> None:
    # kvmpy sets the tap up itself (and attaches it to br=); it runs no scripts.
    for key in ("script", "downscript"):
        if opts.get(key, "no") != "no":
            raise _unsupported(f"{option},{key}={opts[key]}", "kvmpy runs no ifup scripts; use script=no "
                               "and br=BRIDGE, or set the tap up beforehand")
    if opts.get("vhost", "off") not in ("on", "off"):
        raise QemuOptionError(f"qemu option {option},vhost={opts['vhost']}: must be on or off")


def _tap_extras(opts: dict, option: str) -> dict:
    """vhost= and queues= of a tap backend, as NetConfig fields: vhost is off unless
    asked for, as in QEMU (kvmpy's own default is auto)."""
    from .config import check_net_queues
    return {"vhost": opts.get("vhost", "off"),
            "queues": check_net_queues(opts.get("queues", "1"), f"qemu option {option}: queues")}


def _monitor_address(value: str, option: str) -> str:
    """A monitor's chardev address, checked now so that the error names the option."""
    from .monitor.server import parse_address
    head, _, opts = value.partition(",")
    if head.startswith(("tcp:", "telnet:")) and opts and "server" not in opts.split(","):
        raise _unsupported(f"{option} {value}", "a client connection; kvmpy listens: add ,server,nowait")
    try:
        parse_address(value, option=f"qemu option {option}")
    except ConfigError as e:
        raise QemuOptionError(str(e)) from None
    return value


def qemu_chardev_to_serial(value: str) -> str:
    """A QEMU ``-serial`` chardev in kvmpy's console spelling (kvmpy.console.open_console)."""
    where = f"qemu option -serial {value}"
    head, _, rest = value.partition(",")
    options = [o for o in rest.split(",") if o] if rest else []
    if head in ("stdio", "mon:stdio"):
        return "stdio"
    if head in ("none", "null"):
        return "none"
    if head.startswith("file:") and len(head) > 5:
        if options:
            raise _unsupported(f"-serial {value}", "file:PATH takes no options")
        return "file:" + os.path.abspath(head[5:])
    if head.startswith(("unix:", "tcp:", "telnet:")):
        kind = head.partition(":")[0]
        known = {"server", "server=on", "nowait", "wait=off", "wait", "wait=on", "nodelay", "nodelay=on",
                 "telnet", "telnet=on"}
        for o in options:
            if o not in known:
                raise _unsupported(f"-serial {value}", f"option {o!r}")
        if not any(o.startswith("server") for o in options):
            raise _unsupported(f"-serial {value}", "a client connection; kvmpy listens: add ,server,nowait")
        if kind != "unix":
            from .monitor.server import parse_address
            try:
                parse_address(head, option=where)
            except ConfigError as e:
                raise QemuOptionError(str(e)) from None
        if not any(o in ("nowait", "wait=off") for o in options):
            log.warning("%s: kvmpy starts the guest without waiting for a client (as with nowait)", where)
        path = head if kind != "unix" else "unix:" + os.path.abspath(head[5:])
        return path + ("" if kind == "unix" else ",server,nowait")
    if head in ("vc", "pty", "msmouse", "braille") or head.startswith(("udp:", "pipe:", "chardev:", "/dev/")):
        raise _unsupported(f"-serial {head}", "stdio, none, file:, unix:, tcp: or telnet: (as a server)")
    raise _unsupported(f"-serial {value}")


# ------------------------------------------------------------------ entry points

def parse_qemu_args(argv: list[str], *, allow_config: bool = False,
                    ignore_display: bool = False) -> QemuCommandLine:
    """QEMU argv -> QemuCommandLine (its ``cfg`` not yet finished: see ``finish``).
    ``allow_config`` (``kvmpy run``): a bare ``*.toml`` argument is a vm.toml and kvmpy's
    own ``--options`` keep their meaning; else (kvmpy-system-x86_64) only QEMU's spelling,
    and a bare argument is the first hard disk, as in QEMU."""
    items = split_options(argv, kvmpy_options=allow_config)
    cfg = None
    if allow_config:
        tomls = [v for n, v, k in items if n == "" and v.endswith(".toml")]
        if len(tomls) > 1:
            raise QemuOptionError(f"two vm.toml files: {tomls[0]} and {tomls[1]}")
        if tomls:
            cfg = load_config(tomls[0])
    if cfg is None:
        cfg = config_from_dict({}, "<command line>")
    line = QemuCommandLine(cfg, ignore_display=ignore_display)
    for name, value, kvmpy in items:
        if name == "":
            if allow_config and value.endswith(".toml"):
                continue
            line.positional(value)
        elif kvmpy:
            _kvmpy_option(line, name, value)
        else:
            getattr(line, "opt_" + name.replace("-", "_"))(value, f"-{name}")
    return line


def _kvmpy_option(line: QemuCommandLine, name: str, value: str | None) -> None:
    """kvmpy's own ``--option`` in a QEMU command line: kvmpy's meaning, as in ``kvmpy run``."""
    cfg = line.cfg
    if name == "sandbox":
        cfg.sandbox = parse_on_off(value, f"--sandbox {value}")
    elif name == "trace":
        from .vcpu.trace import parse_trace
        if value == "help":
            line.wants_help = "trace"
            return
        for item in parse_trace(value, f"--trace {value}"):
            if item not in cfg.trace:
                cfg.trace.append(item)
    elif name == "memory":
        cfg.memory = parse_size(value, "--memory", "M")
    elif name == "drive":
        cfg.disks.append(parse_drive(value))
    elif name == "net":
        cfg.default_nic = False
        if value == "none":         # as `kvmpy run --net none`: no NIC, whatever the vm.toml has
            cfg.nets.clear()
        else:
            cfg.nets.append(parse_netdev(value))
    elif name == "device":
        from .plugins import parse_device_option
        cfg.devices.append(parse_device_option(value))
    elif name == "accel":
        cfg.accel, cfg.accel_force = parse_accel(value, f"--accel {value}")
        line._accel_given.clear()
    elif name == "smp":
        line.opt_smp(value, "--smp")
    elif name == "serial":
        cfg.serial = value
        line._serial_given = True
    else:
        getattr(line, "opt_" + name.replace("-", "_"))(value, f"--{name}")


def config_from_qemu_args(argv: list[str], *, allow_config: bool = False, ignore_display: bool = False,
                          ) -> tuple[VmConfig, str | None]:
    """The finished VmConfig and what to print instead of running (help, version), if anything."""
    line = parse_qemu_args(argv, allow_config=allow_config, ignore_display=ignore_display)
    cfg = line.finish()
    return cfg, line.wants_help


# Not "QEMU emulator version ...": a script that parses that would assume QEMU's features.
VERSION_TEXT = "kvmpy-system-x86_64 {version}: QEMU's command line for what kvmpy supports\n"


def help_text(topic: str) -> str:
    from . import __version__
    if topic == "version":
        return VERSION_TEXT.format(version=__version__)
    if topic == "machine":
        return "Supported machines are:\npc                   Standard PC (i440FX + PIIX, 1996) (default)\n"
    if topic == "device":
        return ("isa-debug-exit (iobase=, iosize=), pc-testdev, pci-testdev, virtio-blk-pci (drive=), "
                "virtio-net-pci (netdev=, mac=), ide-hd/ide-cd (drive=)\n")
    if topic == "trace":
        from .vcpu.trace import trace_help
        return trace_help() + "\n"
    return ("usage: kvmpy-system-x86_64 [options] [disk_image]\n"
            "QEMU's options kvmpy supports: " + " ".join("-" + o for o in OPTIONS) + "\n"
            "Anything else is refused with one line naming it.\n")


def make_snapshot_overlays(disks: list[DiskConfig]) -> None:
    """QEMU's -snapshot: each disk's writes go to a temporary qcow2 overlay over it, gone
    when kvmpy ends. As QEMU does, the overlay (in $TMPDIR) is unlinked as soon as it is
    open; kvmpy reaches it through /proc/self/fd, which its children (-daemonize) inherit,
    so nothing is left behind however kvmpy ends."""
    if not disks:
        return      # its imports (19 modules) took 0.4 s of a 6 s start in the nested L1, profiled
    import tempfile
    from .block import open_image, probe_format
    from .block.qcow2 import create_qcow2
    for disk in disks:
        backing_format = disk.format or probe_format(disk.path)
        driver = open_image(disk.path, backing_format, read_only=True)
        try:
            size = driver.size
        finally:
            driver.close()
        fd, path = tempfile.mkstemp(prefix="kvmpy-snapshot-", suffix=".qcow2")
        os.close(fd)
        try:
            create_qcow2(path, (size + 511) & ~511, backing_file=disk.path, backing_format=backing_format)
            fd = os.open(path, os.O_RDWR)
        finally:
            os.unlink(path)
        log.info("-snapshot: %s's writes go to a temporary overlay", disk.path)
        disk.path, disk.format = f"/proc/self/fd/{fd}", "qcow2"


def run_qemu(argv: list[str], *, allow_config: bool) -> int:
    """Parse a QEMU command line and run the VM (`kvmpy run` in QEMU's spelling and
    kvmpy-system-x86_64)."""
    from .runcmd import finish_config, run_config
    line = parse_qemu_args(argv, allow_config=allow_config)
    cfg, topic = line.finish(), line.wants_help
    if topic is not None:
        sys.stdout.write(help_text(topic))
        return 0
    finish_config(cfg)
    make_snapshot_overlays(line.snapshot_disks)
    if cfg.process_name:
        set_process_name(cfg.process_name)
    if cfg.log_file is None:
        return run_config(cfg)
    return _run_logging_to(cfg, run_config)


def set_process_name(name: str) -> None:
    """QEMU's -name ...,process=NAME: the name ps and top show (the main thread's)."""
    from .threadname import name_this_thread
    name_this_thread(name)


def _run_logging_to(cfg: VmConfig, run) -> int:
    """QEMU's -D: the log (kvmpy's warnings and --trace/-d lines) goes to the file,
    errors that end kvmpy still to stderr."""
    try:
        log_stream = open(cfg.log_file, "a", buffering=1)
    except OSError as e:
        raise QemuOptionError(f"qemu option -D {cfg.log_file}: {e.strerror}") from None
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(logging.Formatter("kvmpy: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_handlers, saved_stderr = root.handlers[:], sys.stderr
    root.handlers = [handler]
    sys.stderr = log_stream          # the exit tracer writes to sys.stderr as it is at each line
    try:
        return run(cfg)
    finally:
        sys.stderr = saved_stderr
        root.handlers = saved_handlers
        log_stream.close()


def main(argv: list[str] | None = None) -> int:
    """``kvmpy-system-x86_64``: QEMU's spelling only."""
    from .errors import UserError
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="kvmpy: %(levelname)s %(name)s: %(message)s")
    try:
        return run_qemu(args, allow_config=False)
    except UserError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


def main_process() -> NoReturn:
    """``kvmpy-system-x86_64``'s process: main(), then a VM process's end (runcmd.end_vm_process)
    once the run's module was loaded (not for -version or -help)."""
    status = main()
    runcmd = sys.modules.get("kvmpy.runcmd")
    if runcmd is not None:
        runcmd.end_vm_process(status)
    sys.exit(status)


if __name__ == "__main__":
    main_process()
