"""``kvmpy run``: build a machine from vm.toml and/or options, and run it."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

from .config import (VGA_KINDS, VmConfig, _choice, add_default_nic, check_name, config_from_dict, load_config,
                     parse_accel, parse_drive, parse_netdev, parse_on_off, parse_size, set_keymap, set_vnc,
                     validate)
from .errors import ConfigError
from .events import EventLoop
from .pathcheck import require_file
from .plugins import parse_device_option

log = logging.getLogger(__name__)

SIGTERM_POWERDOWN_TIMEOUT = 30.0


def register(sub) -> None:
    p = sub.add_parser("run", help="boot a VM", description="Boot a VM from vm.toml and/or options "
                       "(like qemu-system-x86_64 -kernel ... -append ...). QEMU's own spelling works too "
                       "(kvmpy run -enable-kvm -m 512 -hda disk.img): see docs/qemu-cli.md.")
    p.add_argument("config", nargs="?", help="vm.toml")
    p.add_argument("--enable-kvm", action="store_true", help="use KVM (default: the translator, as QEMU)")
    p.add_argument("--accel", metavar="kvm|tcg|auto[,force=on]",
                   help="accelerator (overrides vm.toml); kvm,force=on boots a Linux kernel on a "
                        "software-nested KVM (kvm_pvm) anyway")
    p.add_argument("--tcg-native", choices=("on", "off"),
                   help="the translator compiles hot blocks to host code (default on; overrides vm.toml)")
    p.add_argument("--kernel", help="kernel: bzImage or PVH ELF")
    p.add_argument("--initrd", help="initial ramdisk")
    p.add_argument("--append", help="kernel command line")
    p.add_argument("--bios", help="firmware image (QEMU's -bios; default: Debian's SeaBIOS or OVMF)")
    p.add_argument("--firmware-vars", metavar="FILE",
                   help="UEFI variable store the guest writes (a copy of OVMF_VARS.fd; QEMU's second "
                        "-drive if=pflash); give --bios OVMF_CODE.fd with it")
    p.add_argument("--firmware", metavar="bios|uefi|none",
                   help="what runs first: SeaBIOS (default without --kernel), OVMF, or none "
                        "(kvmpy loads --kernel itself: the default with --kernel)")
    p.add_argument("-m", "--memory", help="RAM size (e.g. 512M, 2G; a bare number is MiB)")
    p.add_argument("--smp", type=int, help="number of vCPUs")
    p.add_argument("--serial", help="console: stdio, file:PATH, unix:PATH, none")
    p.add_argument("--drive", action="append", default=[], help="disk: file=PATH[,format=raw|qcow2][,readonly=on][,serial=ID]"
                   "[,werror=enospc|stop|report|ignore][,rerror=stop|report|ignore]"
                   "[,if=virtio|ide][,media=disk|cdrom][,index=0-3][,dataplane=native|python][,queues=N][,iothread=NAME]"
                   "[,cache=writeback|none|directsync|writethrough|unsafe]")
    p.add_argument("--net", action="append", default=[], help="network: tap[,ifname=N][,bridge=BR][,mac=M][,dataplane=native|python] or user[,hostfwd=tcp::2222-:22]"
                   "[,restrict=on][,net=10.0.2.0/24]... (QEMU's -netdev user options), or none")
    p.add_argument("--share", action="append", default=[], metavar="path=DIR,tag=TAG[,readonly=on]",
                   help="a host directory as virtio-fs: mount -t virtiofs TAG /mnt in the guest")
    p.add_argument("--device", action="append", default=[], metavar="TYPE[,KEY=VALUE...]",
                   help="a plug-in device: an entry point name, package.module:Class or file.py:Class "
                        "(see docs/plugins.md)")
    p.add_argument("--name", help="VM name")
    p.add_argument("--qmp", action="append", default=[], help="QMP server: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--monitor", action="append", default=[], help="human monitor server: unix:PATH or tcp:HOST:PORT")
    p.add_argument("--pidfile", help="write the pid here (created exclusively, removed on exit)")
    p.add_argument("--daemonize", action="store_true", help="detach once the VM is running")
    p.add_argument("--runas", help="drop to this user after opening devices and images")
    p.add_argument("--no-reboot", action="store_true", help="exit instead of rebooting")
    p.add_argument("--sandbox", metavar="on|off",
                   help="seccomp filter and NO_NEW_PRIVS once the VM is set up (default: on where the "
                        "host supports it; KVMPY_SANDBOX_AUDIT=1 logs forbidden calls instead)")
    p.add_argument("--vga", metavar="std|none", help="display adapter (default: none; std with --vnc)")
    p.add_argument("--vnc", metavar=":N|HOST:N|unix:PATH[,password=on][,websocket=PORT]",
                   help="VNC server on port 5900+N (QEMU's -vnc: ':N' listens on every address)")
    p.add_argument("-k", "--keymap", metavar="LANG", help="keyboard layout of the VNC viewer (QEMU's -k: de, fr, ...)")
    p.add_argument("--trace", action="append", default=[], metavar="ITEM[,ITEM...]",
                   help="debug output on stderr, like QEMU's -d: 'exits' logs every vCPU exit with "
                        "the instruction at RIP; '--trace help' lists the items")
    p.set_defaults(func=run_command)


def build_config(args) -> VmConfig:
    cfg = load_config(args.config) if args.config else config_from_dict({}, "<command line>")
    if args.kernel:
        cfg.kernel = os.path.abspath(args.kernel)
    if args.initrd:
        cfg.initrd = os.path.abspath(args.initrd)
    if args.append is not None:
        cfg.cmdline = args.append
    if args.memory:
        cfg.memory = parse_size(args.memory, "-m", "M")
    if args.smp is not None:
        cfg.cpus = args.smp
    if args.serial:
        cfg.serial = args.serial
    if args.name is not None:
        cfg.name = check_name(args.name, "--name")
    if args.accel:
        cfg.accel, cfg.accel_force = parse_accel(args.accel, f"--accel {args.accel}")
    if args.enable_kvm:
        cfg.accel = "kvm"
    if args.no_reboot:
        cfg.no_reboot = True
    if args.tcg_native:
        cfg.tcg_native = args.tcg_native == "on"
    cfg.disks += [parse_drive(d) for d in args.drive]
    if "none" in args.net:      # QEMU's -nic none: no NIC, whatever the vm.toml has
        cfg.nets = []
    cfg.nets += [parse_netdev(n) for n in args.net if n != "none"]
    if args.net:
        cfg.default_nic = False
    cfg.devices += [parse_device_option(d) for d in args.device]
    if args.share:
        from .config import parse_share
        cfg.shares += [parse_share(s) for s in args.share]
    cfg.qmp += args.qmp
    cfg.hmp += args.monitor
    if args.vga:
        cfg.display.vga = _choice(args.vga, VGA_KINDS, f"--vga {args.vga}")
    if args.vnc:
        set_vnc(cfg, args.vnc, f"--vnc {args.vnc}")
    if args.keymap:
        set_keymap(cfg, args.keymap, f"-k {args.keymap}")
    if args.pidfile:
        cfg.pidfile = os.path.abspath(args.pidfile)
    if args.runas:
        cfg.runas = args.runas
    if args.sandbox is not None:
        cfg.sandbox = parse_on_off(args.sandbox, f"--sandbox {args.sandbox}")
    cfg.daemonize = args.daemonize
    for spec in args.trace:
        from .vcpu.trace import parse_trace
        for name in parse_trace(spec, f"--trace {spec}"):
            if name not in cfg.trace:
                cfg.trace.append(name)
    apply_firmware_options(cfg, args)
    add_default_nic(cfg)
    if not cfg.kernel and cfg.firmware == "none":
        raise ConfigError("no kernel: give --kernel FILE or a vm.toml with key 'kernel' "
                          "(or boot firmware: --firmware bios)")
    if cfg.kernel:
        require_file(cfg.kernel, f"kernel {cfg.kernel}", ConfigError)
    if cfg.initrd:
        require_file(cfg.initrd, f"initrd {cfg.initrd}", ConfigError)
    validate(cfg)
    return cfg


def apply_firmware_options(cfg: VmConfig, args) -> None:
    """--firmware and --bios over vm.toml's keys."""
    from .config import FIRMWARES
    if args.firmware is not None:
        if args.firmware not in FIRMWARES:
            raise ConfigError(f"--firmware {args.firmware}: expected one of {', '.join(FIRMWARES)}")
        cfg.firmware = args.firmware
    if args.bios:
        cfg.bios = os.path.abspath(args.bios)
        require_file(cfg.bios, f"--bios {args.bios}", ConfigError)
    elif cfg.bios:
        require_file(cfg.bios, f"{cfg.source}: key 'bios' {cfg.bios}", ConfigError)
    if args.firmware_vars:
        cfg.firmware_vars = os.path.abspath(args.firmware_vars)
        require_file(cfg.firmware_vars, f"--firmware-vars {args.firmware_vars}", ConfigError)
    elif cfg.firmware_vars:
        require_file(cfg.firmware_vars, f"{cfg.source}: key 'firmware_vars' {cfg.firmware_vars}", ConfigError)


def end_vm_process(status: int) -> NoReturn:
    """The end of a VM process (``python3 -m kvmpy run``, the kvmpy script), as QEMU's
    ends: without the interpreter's teardown, which clears every module and frees every
    object one by one (15 ms of ``kvmpy run hello.elf`` on the host, about 0.9 s of its
    5.5 s in the nested L1). Nothing of that reaches anyone: by now the machine has
    flushed and closed its images, taps and sockets, and the console put the terminal
    back. What an exit still owes is done first: the atexit handlers (the terminal, the
    logs, a pidfile; CPython's ``atexit._run_exitfuncs``, as its own exit runs them) and
    the standard streams' buffers. A failing handler is reported as Python's exit reports
    it. Where a thread Python's exit would wait for is still alive, or a stream cannot be
    flushed, it is Python's own exit after all."""
    import atexit
    quick = not any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate())
    if quick:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:   # noqa: BLE001 - a closed pipe: Python's exit reports it
            quick = False
    if not quick:
        sys.exit(status)
    os._exit(status)


def run_command(args) -> int:
    if "help" in args.trace:
        from .vcpu.trace import trace_help
        print(trace_help())
        return 0
    return run_config(build_config(args))


def run_config(cfg: VmConfig) -> int:
    """Run a finished VmConfig (from ``kvmpy run``'s options or QEMU's: kvmpy.qemu_cli)."""
    _check_linux_on_software_nested_kvm(cfg)
    if cfg.daemonize:
        from .lifecycle import daemonize
        return daemonize(lambda notify_running: _run(cfg, notify_running))
    return _run(cfg, None)


def finish_config(cfg: VmConfig) -> None:
    """The end of a QEMU command line (kvmpy.qemu_cli): its files exist and the whole is
    valid. Without -kernel the firmware boots (-hda, -cdrom): only firmware "none" needs one."""
    if not cfg.kernel and cfg.firmware == "none":
        raise ConfigError("no kernel: give -kernel FILE (or let the firmware boot a disk)")
    for path, what in ((cfg.kernel, "kernel"), (cfg.initrd, "initrd"), (cfg.bios, "bios")):
        if path:
            require_file(path, f"{what} {path}", ConfigError)
    for path, _ in cfg.multiboot_modules:
        require_file(path, f"multiboot module {path} (-initrd)", ConfigError)
    validate(cfg)


SOFTWARE_NESTED_LINUX = ("KVM here is software-nested (kvm_pvm): Linux will run slowly or fail; "
                         "use the translator (--accel tcg) or --accel auto")


def _check_linux_on_software_nested_kvm(cfg: VmConfig) -> None:
    """kvm_pvm emulates guest kernel code: a Linux kernel spins for minutes at 100% CPU
    and then fails, silently. Refuse unless the user insisted (kvm,force=on). Tiny
    PVH guests run fine there, so only a bzImage is refused."""
    if cfg.accel != "kvm" or not cfg.kernel:
        return
    from .boot.loader import kernel_kind
    from .hv.select import software_nested_kvm
    if kernel_kind(cfg.kernel) != "bzimage" or not software_nested_kvm():
        return
    if not cfg.accel_force:
        raise ConfigError(SOFTWARE_NESTED_LINUX + " (to insist: --accel kvm,force=on, "
                          "or accel = \"kvm,force=on\" in vm.toml)")
    print(f"kvmpy: {SOFTWARE_NESTED_LINUX} (going on: force=on)", file=sys.stderr, flush=True)


def _run(cfg: VmConfig, notify_running) -> int:
    """The VM process (the daemonized child with --daemonize): its one event loop
    serves the console, the monitors, the signals and the machine's devices."""
    if cfg.accel != "kvm":      # the translator may run it: its TSC calibration overlaps the imports
        from .hv.tcg.vcpu import start_tsc_calibration
        start_tsc_calibration()
    from .console import open_console
    from .machine import Machine
    from .monitor import console_monitor, start_servers

    machine_ref: list = []
    monitor_ref: list = []      # the console's Ctrl-A c interpreter, once the machine exists

    def on_quit() -> None:
        if machine_ref:
            machine_ref[0].request_shutdown(0, guest=False, reason="host-ui")

    def on_monitor():
        return monitor_ref[0] if monitor_ref else None

    sandbox = _sandbox_possible(cfg)
    events = EventLoop()
    serial_spec = "none" if cfg.daemonize and cfg.serial == "stdio" else cfg.serial
    try:
        console = open_console(serial_spec, on_quit=on_quit, on_monitor=on_monitor, events=events)
    except BaseException:
        events.close()
        raise
    pidfile = None
    machine = None
    finish_cleanup = None
    try:
        if cfg.pidfile:
            from .lifecycle import Pidfile
            pidfile = Pidfile(cfg.pidfile)
        machine = Machine(cfg, console=console, events=events)
        machine_ref.append(machine)
        monitor_ref.append(console_monitor(machine))
        servers = start_servers(machine, cfg.qmp, cfg.hmp, events=events)
        if cfg.runas or sandbox:
            # Neither a dropped nor a sandboxed process may remove these at exit.
            finish_cleanup = _start_cleanup_helper(machine, pidfile, servers, console)
        if cfg.runas:
            from .lifecycle import drop_privileges
            drop_privileges(cfg.runas)
        _install_signal_handlers(machine, events)
        console.start()
        if sandbox:
            _enter_sandbox(cfg)
        if cfg.start_paused:        # QEMU's -S: the vCPUs wait for `cont` from their first instruction
            machine.pause()
        machine.start()
        if notify_running is not None:
            notify_running()
        return machine.wait()
    except BaseException:
        if machine is not None:   # taps, sockets and images are released on every path
            machine.close()
        raise
    finally:
        console.close()
        events.close()          # after everything that subscribed to it
        if pidfile is not None:
            pidfile.remove()
        if finish_cleanup is not None:
            finish_cleanup()    # the root helper removes what we no longer may


def _start_cleanup_helper(machine, pidfile, servers, console):
    from .console import UnixSocketConsole
    from .lifecycle import start_cleanup_helper
    sockets = [(srv.address.path, srv._socket_identity) for srv in servers if srv.address.kind == "unix"]
    if isinstance(console, UnixSocketConsole):
        sockets.append((console.path, console.socket_identity))
    vnc = machine.display.vnc if machine.display is not None else None
    if vnc is not None and vnc.socket_identity is not None:
        sockets.append((vnc.address.path, vnc.socket_identity))
    bridges = []
    if machine.cfg.nets:        # the tap module (and what it loads) only where there are NICs
        from .tap import TapNetwork
        bridges = [p.backend.hand_over_bridge_cleanup() for p in machine.devices.placed
                   if isinstance(p.backend, TapNetwork)]
        bridges = [b for b in bridges if b is not None]
    if pidfile is None and not sockets and not bridges:
        return None
    return start_cleanup_helper(pidfile, sockets, bridges)


def _sandbox_where(cfg: VmConfig) -> str:
    return f"{cfg.source}: sandbox (--sandbox on or key 'sandbox')"


def _sandbox_possible(cfg: VmConfig) -> bool:
    """Whether the VM process will be sandboxed: asked for (an error here if the
    host cannot), or by default where the host can."""
    if cfg.sandbox is False:
        return False
    from .sandbox import SandboxUnavailable, unavailable_reason
    reason = unavailable_reason()
    if reason is None:
        return True
    if cfg.sandbox:
        raise SandboxUnavailable(f"{_sandbox_where(cfg)}: {reason}")
    log.debug("running without the sandbox: %s", reason)
    return False


# What the running VM imports only when first needed (starting the vCPUs, a
# register dump, the console's monitor): a sandboxed process cannot open a module.
_LATE_IMPORTS = ("kvmpy.vcpu.runner", "kvmpy.vcpu.trace", "kvmpy.monitor.hmp")


def _enter_sandbox(cfg: VmConfig) -> None:
    import importlib
    from .sandbox import SandboxUnavailable, install
    for name in _LATE_IMPORTS:
        importlib.import_module(name)
    if cfg.trace:
        from .vcpu.trace import _load_capstone
        _load_capstone()
    try:
        install(user_network=any(net.type == "user" for net in cfg.nets), file_share=bool(cfg.shares))
    except SandboxUnavailable as e:
        if cfg.sandbox:
            raise SandboxUnavailable(f"{_sandbox_where(cfg)}: {e}") from None
        log.debug("running without the sandbox: %s", e)


def _install_signal_handlers(machine, events: EventLoop):
    """SIGTERM: ACPI powerdown, then quit after a timeout; SIGINT: quit."""
    if threading.current_thread() is not threading.main_thread():
        return None
    from .lifecycle import SignalActions
    actions = SignalActions(machine, powerdown_timeout=SIGTERM_POWERDOWN_TIMEOUT, events=events).install()
    machine.on_close(actions.close)
    return actions
