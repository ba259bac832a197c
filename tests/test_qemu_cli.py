"""QEMU's command line (kvmpy.qemu_cli), the test device models (kvmpy.devices.testdev)
and the telnet console's input filter: unit tests, plus a few real `python3 -m kvmpy`
processes for the one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.config import DiskConfig, NetConfig
from kvmpy.console import IAC, TELNET_GREETING, TcpConsole, TelnetInput, open_console
from kvmpy.devices.testdev import (DATAMATCH, IsaDebugExit, PcTestdevIomem, PcTestdevIomemState, PcTestdevPorts,
                                   PcTestdevPortsState, PciTestdev, PciTestdevState)
from kvmpy.errors import ConfigError, UserError
from kvmpy.qemu_cli import (ISA_DEBUG_EXIT, OPTIONS, PC_TESTDEV_IOMEM, PC_TESTDEV_PORTS, PCI_TESTDEV,
                            QemuOptionError, config_from_qemu_args, split_options, split_suboptions,
                            wants_qemu_parser)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.environ.get("KVMPY_FUZZ") == "1"
# Whether this kvmpy has its display (VGA + VNC): QEMU's -vnc/-k/-vga then map onto it.


def parse(line: str, **kw):
    cfg, topic = config_from_qemu_args(line.split(), **kw)
    assert topic is None
    return cfg


def refuse(line: str, needle: str, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_qemu_args(line.split() if isinstance(line, str) else line, **kw)
    text = str(e.value)
    assert "\n" not in text and needle in text, text
    return text


# ------------------------------------------------------------------ QemuOpts grammar

def test_suboptions_escaping_and_implied_key():
    assert split_suboptions("kvm,force=on", "-accel", "accel") == [("accel", "kvm"), ("force", "on")]
    assert split_suboptions("file=a,,b.img,format=raw", "-drive", "file") == [("file", "a,b.img"),
                                                                             ("format", "raw")]
    assert split_suboptions("telnet:h:1,server,nowait", "-x", "path") == [
        ("path", "telnet:h:1"), ("server", "on"), ("nowait", "on")]
    with pytest.raises(QemuOptionError, match="empty parameter"):
        split_suboptions("a=1,,,", "-drive", None)


@given(st.lists(st.tuples(st.text("abcxyz-", min_size=1, max_size=6),
                          st.text("abc,=.:/ 0123", max_size=8)), min_size=1, max_size=5))
@settings(max_examples=300 if FUZZ else 60)
def test_suboptions_roundtrip(pairs):
    """Whatever the values hold, QEMU's ,, escaping brings them back."""
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)
    assert split_suboptions(text, "-o") == pairs


def test_options_take_their_argument_whole():
    assert split_options(["-hda", "-weird-name.img", "-enable-kvm", "-m", "512"]) == [
        ("hda", "-weird-name.img", False), ("enable-kvm", None, False), ("m", "512", False)]
    # two dashes are QEMU's one dash, except kvmpy's own options in `kvmpy run`
    assert split_options(["--enable-kvm", "--drive", "file=x"], kvmpy_options=False) == [
        ("enable-kvm", None, False), ("drive", "file=x", False)]
    assert split_options(["--drive", "file=x", "--sandbox=off"]) == [
        ("drive", "file=x", True), ("sandbox", "off", True)]


@pytest.mark.parametrize("args,needle", [
    (["-hda"], "qemu option -hda: requires an argument"),
    (["-m"], "qemu option -m: requires an argument"),
    (["-enable-kvm=on"], "-enable-kvm: takes no argument"),
    (["-foo"], "qemu option -foo: not supported by kvmpy"),
    (["-m=512"], "qemu option -m=512: not supported"),
    (["--frobnicate"], "qemu option --frobnicate: not supported"),
])
def test_malformed_argv(args, needle):
    refuse(args, needle)


# ------------------------------------------------------------------ options -> VmConfig

def test_archwiki_service_line():
    cfg = parse("-name vm1 -pidfile /run/q/vm1.pid -daemonize -nographic -enable-kvm -m 512 -hda /srv/vm1.img "
                "-net nic,macaddr=DE:AD:BE:EF:E0:00 -net tap,ifname=tap0 "
                "-serial telnet:localhost:7000,server,nowait,nodelay "
                "-monitor telnet:localhost:7100,server,nowait,nodelay")
    assert (cfg.name, cfg.pidfile, cfg.daemonize, cfg.accel, cfg.memory) == ("vm1", "/run/q/vm1.pid", True, "kvm",
                                                                             512 << 20)
    assert cfg.disks == [DiskConfig(path="/srv/vm1.img", interface="ide", index=0)]
    assert cfg.nets == [NetConfig(ifname="tap0", mac="DE:AD:BE:EF:E0:00", vhost="off")]
    assert cfg.serial == "telnet:localhost:7000,server,nowait"
    assert cfg.hmp == ["telnet:localhost:7100,server,nowait,nodelay"]
    assert parse("-vnc :0 -k de").display.vnc == ":0"
    cfg, _ = config_from_qemu_args(["-vnc", ":0", "-k", "de"], ignore_display=True)   # service mode


@pytest.mark.parametrize("line,accel,force", [
    ("-enable-kvm", "kvm", False), ("-accel kvm", "kvm", False), ("-accel tcg", "tcg", False),
    ("-accel kvm -cpu host", "kvm", False),
    ("-accel tcg,thread=multi", "tcg", False), ("-accel kvm,force=on", "kvm", True),
    ("-machine pc,accel=kvm", "kvm", False), ("-M pc-i440fx-7.2,accel=kvm:tcg", "auto", False),
    ("-accel kvm -accel tcg", "auto", False), ("", "tcg", False),
])
def test_accelerators(line, accel, force):
    cfg = parse(line)
    assert (cfg.accel, cfg.accel_force) == (accel, force)


@pytest.mark.parametrize("line,needle", [
    ("-accel hvf", "-accel hvf: not supported"), ("-machine q35", "-machine q35: not supported"),
    ("-M pc-q35-7.2", "-machine pc-q35-7.2: not supported"), ("-M virt", "-machine virt"),
    ("-machine pc,usb=on", "-machine usb=on"), ("-accel tcg,force=on", "force=on applies to kvm only"),
    ("-accel kvm,thread=multi", "thread=single|multi applies to tcg only"),
    ("-machine pc,nvdimm=on", "parameter 'nvdimm' is not supported"),
])
def test_accelerator_and_machine_refusals(line, needle):
    refuse(line, needle)


@pytest.mark.parametrize("line,memory,cpus", [
    ("-m 512", 512 << 20, 1), ("-m size=1G", 1 << 30, 1), ("-m 64M -smp 4", 64 << 20, 4),
    ("-smp cpus=2,sockets=1,cores=2,threads=1", 256 << 20, 2), ("-smp sockets=2,cores=2", 256 << 20, 4),
    ("-smp 2,maxcpus=2", 256 << 20, 2),
])
def test_memory_and_smp(line, memory, cpus):
    cfg = parse(line)
    assert (cfg.memory, cfg.cpus) == (memory, cpus)


@pytest.mark.parametrize("line,needle", [
    ("-m 1G,slots=2,maxmem=4G", "memory hotplug"), ("-m lots", "qemu option -m lots"),
    ("-smp 2,maxcpus=4", "CPU hotplug"), ("-smp x", "expected a number"), ("-smp 0", "at least 1"),
    ("-smp cpus=4,sockets=1,cores=2", "less than cpus"), ("-cpu qemu64", "-cpu qemu64: not supported"),
    ("-cpu host,+avx", "CPU feature flags"),
])
def test_memory_smp_cpu_refusals(line, needle):
    refuse(line, needle)


def test_cpu_models_accepted():
    parse("-enable-kvm -cpu host")
    parse("-cpu max")
    refuse("-cpu host", "-cpu host: needs KVM")
    refuse("-accel tcg -cpu host", "-cpu host: needs KVM")


@pytest.mark.parametrize("text,size", [("512", 512 << 20), ("1.5G", 3 << 29), ("1536M", 1536 << 20),
                                       ("2g", 2 << 30), ("262144k", 256 << 20), ("1GB", 1 << 30)])
def test_memory_sizes_as_qemu(text, size):
    assert parse(f"-m {text}").memory == size


@pytest.mark.parametrize("text", ["x", "-1", "1.5.5G", "0.0000001K", "1e3M", ""])
def test_memory_size_refusals(text):
    refuse(["-m", text], f"qemu option -m {text}")


def test_ide_disks_and_cdrom():
    cfg = parse("-hda a.img -hdb b.img -hdd d.img -cdrom cd.iso")
    assert [(os.path.basename(d.path), d.interface, d.media, d.index, d.readonly) for d in cfg.disks] == [
        ("a.img", "ide", "disk", 0, False), ("b.img", "ide", "disk", 1, False),
        ("d.img", "ide", "disk", 3, False), ("cd.iso", "ide", "cdrom", 2, True)]
    # -cdrom takes index 2 unless -hdc has it
    cfg = parse("-hdc c.img -cdrom cd.iso")
    assert [(d.media, d.index) for d in cfg.disks] == [("disk", 2), ("cdrom", 0)]
    # the bare argument is -hda, as in QEMU
    assert [d.index for d in parse("disk.img").disks] == [0]
    refuse("-hda a.img -hda b.img", "IDE index 0 is already taken")
    refuse("-hda a -hdb b -hdc c -hdd d -cdrom e", "all four IDE positions are taken")


def test_drive():
    cfg = parse("-drive file=a,,b.qcow2,format=qcow2,if=virtio,cache=none,werror=stop,rerror=ignore,serial=s1 "
                "-drive file=c.iso,media=cdrom -drive file=d.img,if=ide,index=3,readonly=on,format=raw")
    a, c, d = cfg.disks
    assert (os.path.basename(a.path), a.format, a.interface, a.werror, a.rerror, a.serial, a.index) == (
        "a,b.qcow2", "qcow2", "virtio", "stop", "ignore", "s1", None)
    assert (c.interface, c.media, c.readonly, c.index) == ("ide", "cdrom", True, 0)
    assert (d.interface, d.index, d.readonly, d.format) == ("ide", 3, True, "raw")
    # QEMU's -drive is IDE unless told otherwise
    assert parse("-drive file=x.img").disks[0].interface == "ide"
    # QEMU's cache modes reach the disk as they are (kvmpy/block/direct.py)
    for mode in ("writeback", "none", "unsafe", "directsync", "writethrough"):
        assert parse(f"-drive file=x,if=virtio,cache={mode}").disks[0].cache == mode
    assert parse("-drive file=x,if=virtio").disks[0].cache == "writeback"


@pytest.mark.parametrize("line,needle", [
    ("-drive file=x,snapshot=maybe", "snapshot: expected on or off"),
    ("-drive file=x,if=scsi", "-drive if=scsi: not supported"),
    ("-drive file=x,cache=bogus", "-drive cache=bogus"),
    ("-drive file=x,format=vmdk", "-drive format=vmdk"),
    ("-drive format=raw", "missing file="),
    ("-drive file=x,media=floppy", "media must be disk or cdrom"),
    ("-drive file=x,if=virtio,media=cdrom", "CD-ROM is an IDE"),
    ("-drive file=x,if=virtio,index=1", "index= applies to if=ide only"),
    ("-drive file=x,index=7", "index must be 0-3"),
    ("-drive file=x,werror=panic", "werror"),
    ("-drive file=x,aio=io_uring", "-drive aio=io_uring"),
    ("-drive file=x,readonly=maybe", "expected on or off"),
    ("-drive file=x,serial=" + "s" * 21, "at most 20 bytes"),
    ("-drive file=x,if=none", "if=none needs id="),
    ("-drive file=x,bogus=1", "parameter 'bogus' is not supported"),
])
def test_drive_refusals(line, needle):
    refuse(line, needle)


def test_snapshot_marks_writable_disks():
    from kvmpy.qemu_cli import parse_qemu_args
    line = parse_qemu_args("-snapshot -hda a.img -cdrom c.iso -drive file=r.img,if=virtio,readonly=on".split())
    line.finish()
    assert [os.path.basename(d.path) for d in line.snapshot_disks] == ["a.img"]
    line = parse_qemu_args("-hda a.img -drive file=b.img,if=virtio,snapshot=on".split())
    line.finish()
    assert [os.path.basename(d.path) for d in line.snapshot_disks] == ["b.img"]


def test_drive_if_none_with_device():
    cfg = parse("-drive file=d.img,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0,serial=x "
                "-drive file=c.iso,if=none,id=cd,media=cdrom -device ide-cd,drive=cd,bus=ide.1,unit=0")
    blk, cd = cfg.disks
    assert (blk.interface, blk.serial, blk.index) == ("virtio", "x", None)
    assert (cd.interface, cd.media, cd.index, cd.readonly) == ("ide", "cdrom", 2, True)
    refuse("-device virtio-blk-pci,drive=nope", "drive=nope names no -drive")
    refuse("-drive file=a,if=none,id=a -drive file=b,if=none,id=a", "id=a already exists")


def test_boot():
    cfg = parse("-boot order=cd,menu=on")
    assert (cfg.boot_order, cfg.boot_menu) == (["disk", "cdrom"], True)
    assert parse("-boot d").boot_order == ["cdrom"]
    assert parse("-boot once=d,order=c").boot_order == ["cdrom", "disk"]
    assert parse("-boot ncd,strict=on,reboot-timeout=1000").boot_order == ["net", "disk", "cdrom"]
    refuse("-boot a", "boot device 'a'")
    refuse("-boot menu=maybe", "expected on or off")
    refuse("-boot splash=x.bmp", "splash")


def test_kernel_initrd_append_bios(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 4096)
    (tmp_path / "fw").mkdir()
    (tmp_path / "fw" / "my.bin").write_bytes(b"\xff" * 65536)
    cfg = parse(f"-kernel {kernel} -initrd {tmp_path}/i.img -append console=ttyS0 -bios {tmp_path}/b.bin "
                f"-L {tmp_path}")
    assert (cfg.kernel, cfg.initrd, cfg.cmdline) == (str(kernel), f"{tmp_path}/i.img", "console=ttyS0")
    assert cfg.bios == f"{tmp_path}/b.bin" and cfg.firmware_path == [str(tmp_path)]
    # a bare name: here, then in -L directories (given before or after), then QEMU's own
    assert parse(f"-bios my.bin -L {tmp_path}/fw").bios == f"{tmp_path}/fw/my.bin"
    refuse("-bios no-such-firmware.bin", "-bios no-such-firmware.bin: not found here, in -L directories")
    assert parse(f"-bios my.bin -L {tmp_path}/fw").firmware == "bios"
    assert parse(f"-kernel {kernel}").firmware is None            # direct boot stays the default
    for seabios in ("/usr/share/qemu/bios-256k.bin", "/usr/share/seabios/bios-256k.bin"):
        if os.path.isfile(seabios):
            assert parse("-bios bios-256k.bin").bios == seabios
            break
    if os.path.isfile("/usr/share/OVMF/OVMF_CODE.fd"):        # Debian's ovmf: a UEFI firmware volume
        assert parse("-bios /usr/share/OVMF/OVMF_CODE.fd").firmware == "uefi"
        cfg = parse("-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd")
        assert (cfg.bios, cfg.firmware, cfg.disks) == ("/usr/share/OVMF/OVMF_CODE.fd", "uefi", [])
    cfg = parse(f"-drive if=pflash,readonly=on,file={kernel} -drive if=pflash,file=vars.fd")
    assert (cfg.bios, cfg.firmware_vars) == (str(kernel), os.path.abspath("vars.fd"))     # the variable store
    refuse(f"-drive if=pflash,readonly=on,file={kernel} -drive if=pflash,file=vars.fd -drive if=pflash,file=x",
           "two flashes")
    refuse("-drive if=pflash,format=qcow2,file=x", "a flash image is raw")
    refuse(f"-kernel {kernel} -initrd a,b", "several initrds are for multiboot kernels only")
    assert parse(f"-kernel {kernel} -initrd {tmp_path}/i,,1.img").initrd == f"{tmp_path}/i,1.img"


@pytest.mark.parametrize("value,serial", [
    ("stdio", "stdio"), ("mon:stdio", "stdio"), ("none", "none"), ("null", "none"),
    ("telnet:localhost:7000,server,nowait,nodelay", "telnet:localhost:7000,server,nowait"),
    ("tcp::4444,server,nowait", "tcp::4444,server,nowait"), ("tcp:127.0.0.1:5,server=on,wait=off",
                                                           "tcp:127.0.0.1:5,server,nowait"),
])
def test_serial(value, serial):
    assert parse(f"-serial {value}").serial == serial


def test_serial_paths_are_absolute():
    assert parse("-serial file:log.txt").serial == "file:" + os.path.abspath("log.txt")
    assert parse("-serial unix:c.sock,server,nowait").serial == "unix:" + os.path.abspath("c.sock")


@pytest.mark.parametrize("line,needle", [
    ("-serial telnet:localhost:7000", "a client connection"), ("-serial unix:/tmp/c", "a client connection"),
    ("-machine pc,kernel-irqchip=off", "always in the kernel"),
    ("-serial tcp:h:1,server,reconnect=1", "option 'reconnect=1'"),
    ("-serial pty", "-serial pty: not supported"), ("-serial vc", "-serial vc"),
    ("-serial stdio -serial null", "one serial port"), ("-serial udp::1", "-serial udp"),
    ("-serial tcp:h:99999,server", "out of range"),
    ("-monitor tcp:h:1,nowait", "a client connection"), ("-monitor bogus:x", "unknown address type"),
    ("-qmp unix:", "no socket path"), ("-monitor stdio -serial none", "-monitor stdio: not supported"),
    ("-display gtk", "-display gtk: not supported by kvmpy ("),
    ("-vga cirrus", "-vga cirrus: not supported"), ("-no-shutdown", "-no-shutdown: not supported"),
    ("-rtc base=localtime", "-rtc base=localtime"), ("-rtc base=utc,clock=vm", "clock=vm"),
    ("-d in_asm", "-d in_asm: not supported"),
])
def test_chardev_display_misc_refusals(line, needle):
    refuse(line, needle)


def test_monitors_process_and_debug():
    cfg = parse("-monitor unix:/tmp/m.sock,server,nowait -qmp tcp:127.0.0.1:4444,server,nowait -monitor stdio "
                "-monitor none -name guest=vm2,process=qemu-vm2,debug-threads=on -pidfile p.pid -runas kvm "
                "-no-reboot -S -D log.txt -d exits -rtc base=utc,driftfix=none -usb -vga none -display none "
                "-nographic")
    assert cfg.hmp == ["unix:/tmp/m.sock,server,nowait"] and cfg.qmp == ["tcp:127.0.0.1:4444,server,nowait"]
    assert (cfg.name, cfg.process_name, cfg.runas, cfg.no_reboot, cfg.start_paused) == (
        "vm2", "qemu-vm2", "kvm", True, True)
    assert cfg.pidfile == os.path.abspath("p.pid") and cfg.log_file == os.path.abspath("log.txt")
    assert cfg.trace == ["exits"]
    refuse(["-name", "bad name"], "-name bad name")


def test_kvm_unit_tests_command_line(tmp_path):
    """x86/run's line: the test is a multiboot kernel, the environment a module."""
    kernel = tmp_path / "msr.flat"
    kernel.write_bytes(bytes(64) + struct.pack("<III", 0x1BADB002, 3, -(0x1BADB002 + 3) & 0xFFFFFFFF))
    (tmp_path / "env").write_text("KVM_UNIT_TESTS=1\n")
    cfg, _ = config_from_qemu_args(
        ["-nodefaults", "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-vnc", "none",
         "-serial", "stdio", "-device", "pci-testdev", "-machine", "accel=kvm", "-kernel", str(kernel), "-smp", "1",
         "-initrd", str(tmp_path / "env"), "-no-user-config"])
    assert (cfg.serial, cfg.accel, cfg.initrd) == ("stdio", "kvm", None)
    assert cfg.multiboot_modules == [(str(tmp_path / "env"), str(tmp_path / "env"))]
    assert parse("-nodefaults").serial == "none"          # no -serial: QEMU has no serial port then


def test_chardevs():
    cfg = parse("-chardev socket,id=mon0,path=/tmp/m.sock,server=on,wait=off -mon chardev=mon0,mode=control "
                "-chardev socket,id=s0,host=127.0.0.1,port=4555,server=on,wait=off,telnet=on "
                "-serial chardev:s0 -chardev socket,id=h,port=4556,server=on,wait=off -monitor chardev:h "
                "-chardev null,id=unused")
    assert cfg.qmp == ["unix:/tmp/m.sock,server,nowait"] and cfg.hmp == ["tcp::4556,server,nowait"]
    assert cfg.serial == "telnet:127.0.0.1:4555,server,nowait"
    # the mux'ed stdio of `-nographic`: the serial port and the human monitor on one terminal
    cfg = parse("-serial chardev:c -mon chardev=c -chardev stdio,mux=on,id=c")
    assert cfg.serial == "stdio" and cfg.hmp == []
    assert parse("-chardev file,id=f,path=/tmp/out -serial chardev:f").serial == "file:/tmp/out"


@pytest.mark.parametrize("line,needle", [
    ("-serial chardev:x", "no -chardev with id=x"), ("-chardev pty,id=p", "-chardev pty: not supported"),
    ("-chardev socket,id=s,path=/x", "a client connection"), ("-chardev stdio", "missing id="),
    ("-chardev null,id=a -chardev null,id=a", "id=a already exists"),
    ("-chardev socket,id=s,server=on", "needs path= or host=,port="),
    ("-mon chardev=c,mode=json", "mode must be readline or control"),
    ("-chardev stdio,id=c -mon chardev=c,mode=control", "QMP on stdio"),
    ("-chardev socket,id=s,path=/x,server=on,reconnect=1", "parameter 'reconnect' is not supported"),
])
def test_chardev_refusals(line, needle):
    refuse(line, needle)


def test_legacy_net_pairs_per_vlan():
    cfg = parse("-net nic,macaddr=52:54:00:00:00:01,model=virtio -net tap,ifname=tap0,script=no,downscript=no "
                "-net nic,vlan=1 -net tap,vlan=1,ifname=tap1,br=br0 -net none")
    assert cfg.nets == [NetConfig(ifname="tap0", mac="52:54:00:00:00:01", vhost="off"),
                        NetConfig(ifname="tap1", bridge="br0", vhost="off")]


@pytest.mark.parametrize("line,needle", [
    ("-net nic", "vlan 0 has 1 nic(s) and 0 backend(s)"),
    ("-net tap,ifname=t", "vlan 0 has 0 nic(s) and 1 backend(s)"),
    ("-net nic -net nic -net tap", "vlan 0 has 2 nic(s)"),
    ("-net nic -net tap -net tap", "vlan 0 has 1 nic(s) and 2 backend(s)"),
    ("-net nic,model=e1000 -net tap", "not supported; use model=virtio"),
    ("-net socket", "-net socket"),
    ("-net tap,script=/etc/qemu-ifup -net nic", "kvmpy runs no ifup scripts"),
    ("-net tap,vhost=maybe -net nic", "vhost=maybe: must be on or off"),
    ("-net nic,macaddr=01:00:00:00:00:01 -net tap", "multicast"),
    ("-net nic,macaddr=zz -net tap", "expected xx:xx"),
])
def test_legacy_net_refusals(line, needle):
    refuse(line, needle)


def test_netdev_device_and_nic():
    cfg = parse("-netdev tap,id=n0,ifname=tap5,script=no,downscript=no "
                "-device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc -nic tap,ifname=tap6,model=virtio "
                "-netdev bridge,id=n1,br=br9 -device virtio-net-pci,netdev=n1")
    assert cfg.nets == [NetConfig(ifname="tap5", mac="52:54:00:aa:bb:cc", vhost="off"),
                        NetConfig(ifname="tap6", vhost="off"), NetConfig(bridge="br9", vhost="off")]
    # QEMU's vhost=on and queues=N
    cfg = parse("-netdev tap,id=n0,ifname=tap5,vhost=on,queues=4 -device virtio-net-pci,netdev=n0 "
                "-nic tap,ifname=tap6,queues=2")
    assert [(n.vhost, n.queues) for n in cfg.nets] == [("on", 4), ("off", 2)]
    refuse("-netdev tap,id=n0,queues=99 -device virtio-net-pci,netdev=n0", "queues")
    refuse("-netdev tap,id=n0", "no -device virtio-net-pci,netdev=n0 uses it")
    refuse("-netdev tap,ifname=t", "missing id=")
    refuse("-device virtio-net-pci,netdev=x", "netdev=x names no -netdev")
    refuse("-netdev tap,id=a -device virtio-net-pci,netdev=a -device virtio-net-pci,netdev=a", "already used")

    refuse("-device e1000,netdev=a", "-device e1000: not supported by kvmpy (use virtio-net-pci)")
    refuse("-nic tap,model=e1000", "not supported; use model=virtio")


def test_test_devices():
    cfg = parse("-device isa-debug-exit,iobase=0xf4,iosize=0x04 -device pc-testdev -device pci-testdev")
    assert [(d.type, d.options) for d in cfg.devices] == [
        (ISA_DEBUG_EXIT, {"iobase": 0xF4, "iosize": 4}), (PC_TESTDEV_PORTS, {}), (PC_TESTDEV_IOMEM, {}),
        (PCI_TESTDEV, {})]
    assert parse("-device isa-debug-exit").devices[0].options == {"iobase": 0x501, "iosize": 2}
    refuse("-device isa-debug-exit,iobase=x", "iobase: expected a number")
    refuse("-device isa-debug-exit,port=1", "parameter 'port' is not supported")
    refuse("-device usb-tablet", "qemu option -device usb-tablet: not supported by kvmpy")


def test_kvmpy_options_mixed_in(tmp_path):
    toml = tmp_path / "vm.toml"
    toml.write_text('memory = "64M"\ncpus = 2\n')
    cfg = parse(f"{toml} -enable-kvm --sandbox off --trace exits --drive file=v.img --net tap,bridge=br0 "
                "--device examples/plugins/debugcon.py:DebugCon,path=x --memory 128M", allow_config=True)
    assert (cfg.memory, cfg.cpus, cfg.accel, cfg.sandbox, cfg.trace) == (128 << 20, 2, "kvm", False, ["exits"])
    assert cfg.disks[0].interface == "virtio" and cfg.nets == [NetConfig(bridge="br0")]
    # kvmpy-system-x86_64 takes QEMU's spelling only: --sandbox is not QEMU's
    refuse("--sandbox off", "qemu option --sandbox: not supported")


def test_help_and_version():
    for args, topic in ((["-version"], "version"), (["-h"], "help"), (["-machine", "help"], "machine"),
                        (["-device", "help"], "device"), (["-d", "help"], "trace")):
        assert config_from_qemu_args(args)[1] == topic


def test_wants_qemu_parser():
    assert wants_qemu_parser(["-enable-kvm", "-m", "512", "-hda", "disk.img"])
    assert wants_qemu_parser(["vm.toml", "-S"])
    assert not wants_qemu_parser(["vm.toml", "-m", "512", "--smp", "2"])
    assert not wants_qemu_parser(["--append", "-foo", "vm.toml"])      # a value, not an option
    assert not wants_qemu_parser(["--kernel", "k", "--", "-hda"])


OPTION_WORDS = sorted("-" + o for o in OPTIONS) + ["--sandbox", "--trace", "--drive", "--net", "-foo", "--"]
VALUE_WORDS = ["chardev:c", "socket,id=c,path=/tmp/x,server=on,wait=off", "chardev=c,mode=control", "kvm", "tcg", "pc", "q35", "512", "0", "-1", "file=x,if=ide", "nic", "tap", "tap,id=n0",
               "virtio-net-pci,netdev=n0", "isa-debug-exit,iobase=0xf4", "telnet::7,server,nowait", "order=cd",
               "", ",", ",,", "=", "a=b", "help", "stdio", "unix:", "\x00", "é"]


@given(st.lists(st.one_of(st.sampled_from(OPTION_WORDS), st.sampled_from(VALUE_WORDS),
                          st.text(max_size=12)), max_size=12),
       st.booleans())
@settings(max_examples=2000 if FUZZ else 300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_argv_never_tracebacks(argv, kvmpy_run):
    try:
        config_from_qemu_args(argv, allow_config=kvmpy_run, ignore_display=kvmpy_run)
    except UserError as e:
        assert "\n" not in str(e)


# ------------------------------------------------------------------ real processes

def kvmpy(*args, module="kvmpy", timeout=60):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["run", "-enable-kvm", "-m", "512", "-hda"], "kvmpy: qemu option -hda: requires an argument"),
    (["run", "-enable-kvm", "-vnc", "bogus"], "kvmpy: qemu option -vnc bogus: "),
    (["run", "-enable-kvm", "-machine", "q35"], "kvmpy: qemu option -machine q35: not supported"),
    (["run", "-enable-kvm", "-frobnicate"], "kvmpy: qemu option -frobnicate: not supported by kvmpy"),
    (["run", "-enable-kvm", "-m", "64", "-kernel", "/nonexistent/k"], "kvmpy: kernel /nonexistent/k: no such file"),
])
def test_kvmpy_run_errors_are_one_line(args, needle):
    r = kvmpy(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and needle in r.stderr, r.stderr


def test_kvmpy_system_x86_64_entry_point():
    r = kvmpy("-version", module="kvmpy.qemu_cli")
    assert r.returncode == 0 and r.stdout.startswith("kvmpy-system-x86_64 "), r
    r = kvmpy("--sandbox", "off", module="kvmpy.qemu_cli")
    assert r.returncode == 2 and r.stderr.strip() == "kvmpy: qemu option --sandbox: not supported by kvmpy"
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'kvmpy-system-x86_64 = "kvmpy.qemu_cli:main_process"' in f.read()


# ------------------------------------------------------------------ test devices

class FakePower:
    def __init__(self):
        self.status = []

    def guest_power_off(self, status):
        self.status.append(status)


class Ctx:
    def __init__(self, options=None, base=0x501, length=2):
        from kvmpy.devices.bus import PortSlot
        self.options = options or {}
        self.power = FakePower()
        self.slot = PortSlot(base=base, length=length)
        self.levels = {}

    def irq_line(self, n):
        return lambda level: self.levels.__setitem__(n, level)


@given(st.integers(0, 3), st.sampled_from([1, 2, 4]), st.integers(0, (1 << 32) - 1))
def test_isa_debug_exit_status_is_qemus(offset, size, value):
    ctx = Ctx({"iobase": 0x501, "iosize": 4}, length=4)
    dev = IsaDebugExit(ctx)
    dev.write(offset, size, value)
    assert ctx.power.status == [((value & ((1 << 8 * size) - 1)) << 1) | 1]


def test_isa_debug_exit_placement():
    assert IsaDebugExit.place({"iobase": 0xF4, "iosize": 4})[0].base == 0xF4
    for bad in ({"iosize": 3}, {"iobase": 0xFFFF, "iosize": 2}, {"iobase": "x"}, {"iobase": True}):
        with pytest.raises(ValueError):
            IsaDebugExit.place(bad)
    with pytest.raises(ValueError):
        IsaDebugExit(Ctx({"bogus": 1}))


def test_pc_testdev_ports():
    ctx = Ctx()
    dev = PcTestdevPorts(ctx)
    dev.write(0, 4, 0x12345678)
    dev.write(2, 1, 0xAB)
    assert dev.read(0, 4) == 0x12AB5678 and dev.read(1, 2) == 0xAB56
    dev.write(8 + 2, 2, 0x4321)          # the byte port: a byte at a time
    assert dev.read(0, 4) == 0x43215678 and dev.read(8, 4) == 0x43215678
    dev.write(0x2000 - 0xE0 + 5, 1, 1)
    assert ctx.levels == {5: True}
    dev.write(0x2000 - 0xE0 + 5, 1, 0)
    assert ctx.levels == {5: False}
    dev.write(4, 4, 0x12345FFF)
    assert dev.last_flush_page == 0x12345000
    state = dev.state()
    again = PcTestdevPorts.from_state(state, Ctx())
    assert again.state() == state == PcTestdevPortsState(0x43215678, 0)


@given(st.lists(st.tuples(st.integers(0, 0x2020 - 0xE0), st.sampled_from([1, 2, 4, 8, 3]),
                          st.integers(0, (1 << 64) - 1)), max_size=40))
def test_pc_testdev_hostile(writes):
    ctx = Ctx()
    dev = PcTestdevPorts(ctx)
    iomem = PcTestdevIomem()
    for offset, size, value in writes:
        dev.write(offset, size, value)
        dev.read(offset, size)
        iomem.write(offset * 31, size, value)
        iomem.read(offset * 31, size)
        iomem.write(0xFFFF, size, value)
    assert 0 <= dev.ioport_data < 1 << 32 and set(ctx.levels) <= set(range(24))
    PcTestdevPorts.from_state(dev.state(), Ctx())
    assert PcTestdevIomem.from_state(iomem.state()).state() == iomem.state()


def test_pc_testdev_iomem():
    mem = PcTestdevIomem()
    mem.write(0x100, 4, 0xDEADBEEF)
    assert mem.read(0x101, 2) == 0xADBE and mem.read(0xFFFF, 2) == 0xFFFF
    with pytest.raises(Exception):
        PcTestdevIomem().restore(PcTestdevIomemState(b"short"))


def pci_test(dev, bar, test, writes, size=1, value=None):
    dev.bar_write(bar, 0, 1, test)
    offset, data = dev.bar_read(bar, 4, 4), dev.bar_read(bar, 8, 4)
    for _ in range(writes):
        dev.bar_write(bar, offset, size, data if value is None else value)
    return dev.bar_read(bar, 12, 4)


def test_pci_testdev_tests_as_qemu():
    dev = PciTestdev()
    assert dev.get16(0) == 0x1B36 and dev.get16(2) == 0x0005 and dev.config[0x3D] == 0
    assert dev.bars[0].size == 4096 and dev.bars[1].size == 256 and dev.bars[1].is_io
    dev.bar_write(0, 0, 1, 0)
    name = bytes(dev.bar_read(0, 16 + i, 1) for i in range(16)).split(b"\0")[0]
    assert name == b"mmio-no-eventfd" and dev.bar_read(0, 1, 1) == 1 and dev.bar_read(0, 8, 4) == DATAMATCH
    assert pci_test(dev, 0, 0, 16) == 16           # no-eventfd: every matching write counted
    assert pci_test(dev, 0, 0, 5, value=0x11) == 0  # datamatch: another value is not
    assert pci_test(dev, 1, 0, 3) == 3
    assert pci_test(dev, 0, 1, 16) == 0             # the ioeventfd takes them
    assert pci_test(dev, 1, 1, 4, size=2) == 4      # but not a write of another size (split in bytes)
    assert pci_test(dev, 1, 2, 16) == 0
    dev.bar_write(1, 0, 1, 3)                       # past the last test: nothing runs
    assert dev.bar_read(1, 1, 1) == 0 and dev.bar_read(1, 0, 4) == 0
    dev.bar_write(1, 0, 1, 0)
    pci_test(dev, 1, 0, 2)
    state = dev.state()
    again = PciTestdev()
    again.restore(state)
    assert again.state() == state and state.current == 3 and state.count == 2
    dev.reset()
    assert dev.state().current == -1


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 0x1000), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1)), max_size=50))
def test_pci_testdev_hostile(ops):
    dev = PciTestdev()
    for bar, offset, size, value in ops:
        dev.bar_write(bar, offset, size, value)
        assert 0 <= dev.bar_read(bar, offset, size) < 1 << (8 * size)
    PciTestdev().restore(dev.state())


@given(st.integers(0, 1), st.integers(0, 5), st.integers(0, 40), st.integers(0, 0x1000),
       st.sampled_from([1, 2, 4, 8]))
def test_pci_testdev_wide_reads_are_its_header_bytes(bar, test, writes, offset, size):
    """A read of any width is the header's bytes from ``offset``, little-endian, each
    0 past the header's last character (QEMU's byte-wide region, read byte by byte)."""
    dev = PciTestdev()
    dev.bar_read(bar, offset, size)     # a header seen before the test starts must not stay
    dev.bar_write(bar, 0, 1, test)
    dev.bar_read(bar, offset, size)     # nor one seen before the count moves
    if dev.current is not None:
        for _ in range(writes):
            dev.bar_write(bar, dev.current.offset, 1, dev.current.data & 0xFF)
    header = dev.current.header(dev.count) if dev.current is not None else b""
    expected = sum((header[i] if i < len(header) - 1 else 0) << (8 * (i - offset))
                   for i in range(offset, offset + size))
    assert dev.bar_read(bar, offset, size) == expected


def test_pci_testdev_state_checked():
    dev = PciTestdev()
    with pytest.raises(Exception):
        dev.restore(PciTestdevState(dev.state().pci, 9, 0))


# ------------------------------------------------------------------ telnet console

def telnet_escape(data: bytes) -> bytes:
    return data.replace(bytes([IAC]), bytes([IAC, IAC]))


@given(st.binary(max_size=200), st.lists(st.integers(1, 20), max_size=10))
def test_telnet_input_unescapes_across_reads(data, cuts):
    """The client's 0xff is IAC IAC; a CR NUL is CR; commands vanish; reads may split anywhere."""
    data = data.replace(b"\r\0", b"\r")
    stream = bytes([IAC, 251, 1]) + telnet_escape(data).replace(b"\r", b"\r\0") + bytes([IAC, 250, 24, 0, IAC, 240])
    filt, out, pos = TelnetInput(), b"", 0
    for cut in cuts:
        out += filt.feed(stream[pos:pos + cut])
        pos += cut
    out += filt.feed(stream[pos:])
    assert out == data


def test_telnet_console_real_socket():
    from kvmpy.devices.serial import Serial16550
    con = open_console("telnet:127.0.0.1:0,server,nowait,nodelay", lambda: None)
    assert isinstance(con, TcpConsole) and con.telnet and con.nodelay
    uart = Serial16550(lambda level: None, con.write, on_rx_space=con.rx_space_available)
    uart.write(2, 1, 0x01)
    con.attach(uart)
    con.start()
    try:
        for b in b"boot":
            uart.write(0, 1, b)          # before any client: kept, as QEMU's nowait
        client = socket.create_connection(con.address, timeout=5)
        got = b""
        while len(got) < len(TELNET_GREETING) + 4:
            got += client.recv(100)
        assert got == TELNET_GREETING + b"boot"
        client.sendall(bytes([IAC, 253, 1]) + b"a\r\0" + bytes([IAC, IAC]))
        received = bytearray()
        end = time.monotonic() + 5
        while len(received) < 3 and time.monotonic() < end:
            while uart.read(5, 1) & 1:
                received.append(uart.read(0, 1))
            time.sleep(0.01)
        assert bytes(received) == b"a\r\xff"
        client.close()
    finally:
        con.close()


def test_tcp_console_bad_specs():
    for spec, needle in (("tcp:1234", "tcp:HOST:PORT"), ("telnet::70000", "0-65535"),
                         ("tcp::1,reconnect=2", "unsupported option")):
        with pytest.raises(ConfigError, match=needle):
            open_console(spec, lambda: None)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            open_console(f"tcp:127.0.0.1:{busy.getsockname()[1]},server,nowait", lambda: None)
    finally:
        busy.close()


# ------------------------------------------------------------------ service: qemu.conf

def write_conf(tmp_path, text):
    conf = tmp_path / "etc"
    conf.mkdir(exist_ok=True)
    (conf / "qemu.conf").write_text(text)
    return str(conf)


def test_service_qemu_conf(tmp_path):
    from kvmpy.service import run_argv, select_entries
    conf = write_conf(tmp_path, 'QEMU_MACHINES=(b !a)\nqemu_a="-m 64 \\\n  -kernel k -vnc :1"  # trailing\n'
                                "qemu_b='-enable-kvm -kernel k2 -display none -k de'\nqemu_b_haltcmd=\"ssh b poweroff\"\n"
                                'qemu_b_type="system-x86_64"\n')
    (tmp_path / "etc" / "c.toml").write_text('kernel = "k"\n')
    entries = select_entries(conf, [])
    assert [e.name for e in entries] == ["c", "b", "a"]
    c, b, a = entries
    # kvmpy serves -vnc and -k itself: the line is kept whole
    assert a.qemu_args == ["-m", "64", "-kernel", "k", "-vnc", ":1"]
    assert b.qemu_args[-2:] == ["-k", "de"]
    b.qemu_args = b.qemu_args[:-2]
    assert (a.enabled, b.halt, b.halt_command) == (False, "command", "ssh b poweroff")
    assert b.qemu_args == ["-enable-kvm", "-kernel", "k2", "-display", "none"]
    argv = run_argv(b, "/run/k")
    assert argv[3:] == ["run", "-enable-kvm", "-kernel", "k2", "-display", "none", "-name", "b", "-pidfile",
                        "/run/k/b.pid", "-daemonize", "-qmp", "unix:/run/k/b.qmp,server,nowait"]
    assert [e.name for e in select_entries(conf, ["a"])] == ["a"]
    with pytest.raises(ConfigError, match="no qemu_zz"):
        select_entries(conf, ["zz"])


@pytest.mark.parametrize("text,needle", [
    ('qemu_a="-m 64 -foo"\n', "key 'qemu_a': qemu option -foo: not supported by kvmpy"),
    ('qemu_a="-m $MEM"\n', "key 'qemu_a': shell expansion"),
    ('qemu_a="-m 64\n', "not shell assignments"),
    ('foo="bar"\n', "unknown key 'foo'"),
    ('echo hi\n', "is not an assignment"),
    ('qemu_a="-m 64"\nqemu_a_type="system-arm"\n', "system-x86_64 only, got type 'system-arm'"),
    ('QEMU_MACHINES=(b)\nqemu_a="-m 64"\n', "no qemu_b line"),
    ('QEMU_MACHINES=(a\n', "array without ')'"),
    ('qemu_a="-hda"\n', "-hda: requires an argument"),
])
def test_service_qemu_conf_errors(tmp_path, text, needle):
    from kvmpy.service import select_entries
    conf = write_conf(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        select_entries(conf, [])
    assert needle in str(e.value) and "qemu.conf" in str(e.value) and "\n" not in str(e.value)


def test_service_name_in_toml_and_conf_is_refused(tmp_path):
    from kvmpy.service import select_entries
    conf = write_conf(tmp_path, 'qemu_a="-m 64"\n')
    (tmp_path / "etc" / "a.toml").write_text('kernel = "k"\n')
    with pytest.raises(ConfigError, match="also defined in"):
        select_entries(conf, [])


# ------------------------------------------------------------------ multiboot loader

import struct  # noqa: E402

from kvmpy.boot import layout  # noqa: E402
from kvmpy.boot.loader import kernel_kind, load_kernel  # noqa: E402
from kvmpy.boot.multiboot import (BOOTLOADER_MAGIC, FLAG_AOUT_KLUDGE, HEADER_MAGIC, INFO_ADDR,  # noqa: E402
                                  find_header)
from kvmpy.errors import BootError  # noqa: E402
from kvmpy.memory import GuestMemory  # noqa: E402


def aout_kernel(flags=FLAG_AOUT_KLUDGE | 3, load=0x100000, header_offset=0x40, size=0x2000, bss=0x1000,
                entry=0x100080, checksum=None):
    image = bytearray(size)
    checksum = -(HEADER_MAGIC + flags) & 0xFFFFFFFF if checksum is None else checksum
    struct.pack_into("<8I", image, header_offset, HEADER_MAGIC, flags, checksum, load + header_offset, load,
                     load + size, load + size + bss, entry)
    image[0x80:0x84] = b"\xf4\xeb\xfd\x90"
    return bytes(image)


@pytest.fixture
def memory():
    mem = GuestMemory.anonymous(layout.ram_layout(64 << 20))
    yield mem
    mem.close()


def test_multiboot_aout_load_and_boot_information(memory, tmp_path):
    kernel = tmp_path / "mb.bin"
    kernel.write_bytes(aout_kernel())
    (tmp_path / "m1").write_bytes(b"one")
    (tmp_path / "m2").write_bytes(b"two" * 2000)
    assert kernel_kind(str(kernel)) == "multiboot"
    # mem_size as the machine passes it: -m, not the RAM mapped (the VGA window is a hole)
    state = load_kernel(memory, str(kernel), "a b", modules=[(str(tmp_path / "m1"), "m1 x y"),
                                                             (str(tmp_path / "m2"), "m2")], mem_size=64 << 20)
    assert (state.regs.rax, state.regs.rbx, state.regs.rip) == (BOOTLOADER_MAGIC, INFO_ADDR, 0x100080)
    assert state.sregs.cr0 & 1 and not state.sregs.cr0 >> 31 and not state.regs.rflags & 0x200
    assert memory.read(0x100080, 4) == b"\xf4\xeb\xfd\x90"
    assert memory.read(0x102000, 0x1000) == bytes(0x1000)          # bss zeroed
    flags, lower, upper, dev, cmd, count, mods = struct.unpack("<7I", memory.read(INFO_ADDR, 28))
    assert flags & 0x24F == 0x24F and (lower, upper, count) == (639, (64 << 10) - 1024, 2)
    assert memory.read(cmd, 200).split(b"\0")[0] == f"{kernel} a b".encode()
    m1 = struct.unpack("<4I", memory.read(mods, 16))
    m2 = struct.unpack("<4I", memory.read(mods + 16, 16))
    assert m1[0] == 0x103000 and m1[1] - m1[0] == 3 and memory.read(m1[0], 3) == b"one"
    assert m2[0] == 0x104000 and memory.read(m2[0], 6000) == b"two" * 2000
    assert memory.read(m1[2], 7) == b"m1 x y\0"
    mmap_len, mmap_addr = struct.unpack("<II", memory.read(INFO_ADDR + 44, 8))
    entries = [struct.unpack_from("<IQQI", memory.read(mmap_addr, mmap_len), off) for off in range(0, mmap_len, 24)]
    assert (20, 0x100000, (64 << 20) - 0x100000, 1) in entries


@pytest.mark.parametrize("kwargs,needle", [
    ({"flags": FLAG_AOUT_KLUDGE | 1 << 5}, "features kvmpy does not offer"),
    ({"load": 0x1000}, "overlaps the boot area below 1 MiB"),
    ({"load": 0x7000000}, "outside guest RAM"),
    ({"bss": 0x10000000}, "outside guest RAM"),
    ({"header_offset": 0x10, "load": 0x100000, "size": 0x2000}, None),
])
def test_multiboot_aout_refusals(memory, tmp_path, kwargs, needle):
    kernel = tmp_path / "mb.bin"
    kernel.write_bytes(aout_kernel(**kwargs))
    if needle is None:
        load_kernel(memory, str(kernel))
        return
    with pytest.raises(BootError, match=needle):
        load_kernel(memory, str(kernel))


def test_multiboot_header_rules(tmp_path):
    assert find_header(aout_kernel()) is not None
    assert find_header(aout_kernel(checksum=0)) is None                 # a bad checksum is no header
    assert find_header(b"\0" * 2 + aout_kernel()) is None               # not 32-bit aligned
    assert find_header(bytes(8192) + aout_kernel()) is None             # past the first 8 KiB
    elf64 = bytearray(aout_kernel(flags=3))
    elf64[:5] = b"\x7fELF\x02"
    (tmp_path / "k64").write_bytes(bytes(elf64))
    mem = GuestMemory.anonymous(layout.ram_layout(64 << 20))
    try:
        with pytest.raises(BootError, match="64-bit ELF multiboot kernel"):
            load_kernel(mem, str(tmp_path / "k64"))
        (tmp_path / "mod").write_bytes(b"x")
        with pytest.raises(BootError, match="not multiboot"):
            load_kernel(mem, os.path.join(ROOT, "tests/guests/build/hello.elf"), modules=[(str(tmp_path / "mod"), "mod")])
    finally:
        mem.close()


@given(st.binary(max_size=300), st.integers(0, 0x1FFFF), st.integers(0, 0xFFFFF), st.integers(0, 0x3FFFFF),
       st.integers(0, 0x3FFFFF), st.integers(0, (1 << 32) - 1))
@settings(max_examples=400 if FUZZ else 80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_multiboot_hostile_headers(tail, flags, header_addr, load_end, bss_end, entry):
    """Whatever the header's fields say: a BootState or one BootError, never a write outside RAM."""
    flags |= FLAG_AOUT_KLUDGE
    image = struct.pack("<8I", HEADER_MAGIC, flags, -(HEADER_MAGIC + flags) & 0xFFFFFFFF, 0x100000 + header_addr,
                        0x100000, 0x100000 + load_end if load_end else 0, 0x100000 + bss_end if bss_end else 0,
                        entry) + tail
    from kvmpy.boot.multiboot import load_multiboot
    try:
        load_multiboot(HOSTILE_MEMORY, "k", image, find_header(image), "", [], 8 << 20)
    except BootError as e:
        assert "\n" not in str(e)


HOSTILE_MEMORY = GuestMemory.anonymous([(0, 8 << 20)])    # reserved, not committed: one for every example


def test_qemu_initrd_is_multiboot_modules(tmp_path):
    kernel = tmp_path / "mb.bin"
    kernel.write_bytes(aout_kernel())
    cfg, _ = config_from_qemu_args(["-kernel", str(kernel), "-initrd", f"{tmp_path}/m1,,x arg,{tmp_path}/m2"])
    assert cfg.initrd is None and cfg.multiboot_modules == [(f"{tmp_path}/m1,x", f"{tmp_path}/m1,x arg"),
                                                            (f"{tmp_path}/m2", f"{tmp_path}/m2")]


def test_service_qemu_d_files(tmp_path):
    """The page's systemd form: DIR/qemu.d/NAME with type=, args=, haltcmd=."""
    from kvmpy.service import select_entries
    conf = tmp_path / "etc"
    (conf / "qemu.d").mkdir(parents=True)
    (conf / "qemu.d" / "vm1").write_text('type="system-x86_64"\n\nargs="-enable-kvm -m 512 -kernel k \\\n'
                                         ' -vnc :0"\n\nhaltcmd="echo \'system_powerdown\' | nc localhost 7100" '
                                         '# or netcat/ncat\n')
    (vm1,) = select_entries(str(conf), [])
    assert (vm1.name, vm1.qemu_args[:5], vm1.halt) == ("vm1", ["-enable-kvm", "-m", "512", "-kernel", "k"], "command")
    assert vm1.qemu_args[-2:] == ["-vnc", ":0"]
    assert vm1.halt_command == "echo 'system_powerdown' | nc localhost 7100"
    (conf / "qemu.d" / "vm2").write_text('args="-m 64"\nmemory=1\n')
    with pytest.raises(ConfigError, match="vm2: unknown key 'memory'"):
        select_entries(str(conf), [])
    (conf / "qemu.d" / "vm2").write_text('type="system-x86_64"\n')
    with pytest.raises(ConfigError, match="missing key 'args'"):
        select_entries(str(conf), [])


def test_user_networking_goes_to_kvmpys_parser():
    """-nic user / -netdev user / -net user go to kvmpy.config.parse_user_net_options
    (the user-networking work)."""
    lines = ["-nic user,model=virtio,hostfwd=tcp::2222-:22,hostfwd=udp::6000-:6000",
             "-netdev user,id=u0,restrict=on -device virtio-net-pci,netdev=u0,mac=52:54:00:00:00:09",
             "-net nic,macaddr=52:54:00:00:00:08 -net user,hostfwd=tcp::2223-:22"]
    nic = parse(lines[0]).nets[0]
    assert nic.type == "user" and [f.spec for f in nic.user.hostfwd] == ["tcp::2222-:22", "udp::6000-:6000"]
    dev = parse(lines[1]).nets[0]
    assert dev.type == "user" and dev.user.restrict and dev.mac == "52:54:00:00:00:09"
    legacy = parse(lines[2]).nets[0]
    assert legacy.type == "user" and legacy.mac == "52:54:00:00:00:08"
    refuse("-nic user,hostfwd=bogus", "qemu option -nic user,hostfwd=bogus")
