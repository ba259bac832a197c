"""Which accelerator runs the guest here, and what the host's KVM is.

The one place that probes the host: whether KVM can be used at all
(``kvm_usable``), whether it is the software-nested kvm_pvm (``software_nested_kvm``:
``--accel auto`` passes it over and ``kvmpy run`` refuses a Linux kernel on it
without ``--accel kvm,force=on``), the full report of ``kvmpy info kvm``
(``probe_kvm``), and the choice itself (``make_accel``).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from typing import TYPE_CHECKING

from ..errors import ConfigError, UserError
from . import exits

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import Accel, AccelHost

KVM_PVM_MODULE = "/sys/module/kvm_pvm"


class KvmUnavailable(UserError):
    exit_status = 1


def software_nested_kvm() -> bool:
    """Is /dev/kvm the software-nested kvm_pvm? It emulates guest kernel code: small
    guests run, an unmodified Linux kernel runs for minutes and then fails."""
    return os.path.isdir(KVM_PVM_MODULE)


def kvm_device_present() -> bool:
    from .kvm.api import KVM_DEVICE
    return os.path.exists(KVM_DEVICE)


def kvm_usable() -> tuple[bool, str]:
    """Can a KVM VM be created here? (False, reason) when not."""
    from .kvm.api import KVM_DEVICE, Kvm
    if not os.path.exists(KVM_DEVICE):
        return False, f"{KVM_DEVICE} does not exist (no KVM module loaded, or not exposed to this container)"
    try:
        k = Kvm()
        k.close()
    except OSError as e:
        return False, f"{KVM_DEVICE}: {e.strerror or e}"
    return True, ""


def make_accel(name: str, host: AccelHost) -> Accel:
    """The accelerator ``name`` ("kvm", "tcg" or "auto") for ``host``'s RAM and buses."""
    if name == "auto":
        # KVM when it can run a general guest; on kvm_pvm the translator is better.
        ok, _ = kvm_usable()
        name = "kvm" if ok and not software_nested_kvm() else "tcg"
    if name == "kvm":
        ok, why = kvm_usable()
        if not ok:
            raise KvmUnavailable(f"--enable-kvm: KVM is not usable: {why}")
        from .kvm.accel import KvmAccel
        return KvmAccel(host)
    if name == "tcg":
        from .tcg.accel import TcgAccel
        return TcgAccel(host)
    raise ConfigError(f"unknown accelerator {name!r}")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _backend(flags: set[str]) -> str:
    mods = set(os.listdir("/sys/module")) if os.path.isdir("/sys/module") else set()
    nested = "hypervisor" in flags
    if software_nested_kvm():
        return ("software-nested (kvm_pvm: no VT-x/SVM; guest kernel code is emulated, "
                "unmodified Linux kernels may fail with emulation failures)")
    if "kvm_intel" in mods:
        return "nested VT-x (kvm_intel inside a VM)" if nested else "hardware VT-x (kvm_intel)"
    if "kvm_amd" in mods:
        return "nested SVM (kvm_amd inside a VM)" if nested else "hardware SVM (kvm_amd)"
    if "kvm" in mods:
        return "kvm module without a known vendor module"
    return "none"


def _smoke_test(kvm) -> tuple[bool, str]:
    """Run two real-mode instructions (mov al, 42; out 0xf4, al) and expect that port exit."""
    import mmap
    from .kvm._kvm_cffi import ffi
    vm = kvm.create_vm()
    mm = mmap.mmap(-1, 0x10000)
    try:
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.set_user_memory_region(0, 0, len(mm), int(ffi.cast("uintptr_t", ffi.from_buffer(mm))))
        mm[0x1000:0x1006] = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4, 0x90])  # mov al,42; out 0xf4,al; hlt
        v = vm.create_vcpu(0)
        s = v.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        v.set_sregs(s)
        r = v.get_regs()
        r.rip, r.rflags = 0x1000, 2
        v.set_regs(r)
        kind = v.run()
        if kind == exits.EXIT_IO and v.io_port == 0xF4 and bytes(v.io_data) == b"\x2a":
            return True, "passed (a real-mode guest ran and wrote port 0xf4)"
        return False, f"failed: unexpected exit {exits.NAMES.get(kind, kind)} {v.internal_error}"
    finally:
        vm.close()
        mm.close()


def probe_kvm(path: str | None = None) -> dict:
    """The report of ``kvmpy info kvm`` (also its --json output)."""
    from .kvm.api import CAPABILITIES, KVM_DEVICE, Kvm
    path = path or KVM_DEVICE
    flags = _cpu_flags()
    report: dict = {
        "device": {"present": os.path.exists(path), "path": path},
        "api_version": None,
        "cpu": {"vmx": "vmx" in flags, "svm": "svm" in flags, "hypervisor": "hypervisor" in flags},
        "backend": _backend(flags),
        "max_vcpus": None,
        "capabilities": {},
        "smoke_test": "not run",
        "usable": False,
    }
    dev = report["device"]
    if dev["present"]:
        st = os.stat(path)
        dev["mode"] = stat.filemode(st.st_mode)
        dev["owner"] = _name(pwd.getpwuid, st.st_uid)
        dev["group"] = _name(grp.getgrgid, st.st_gid)
        dev["accessible"] = os.access(path, os.R_OK | os.W_OK)
    problems = []
    if not dev["present"]:
        problems.append(f"{path} does not exist")
    elif not dev["accessible"]:
        problems.append(f"{path} is not read-write for uid {os.getuid()} (add the user to group {dev['group']})")
    else:
        try:
            kvm = Kvm(path)
        except OSError as e:
            problems.append(f"{path}: {e}")
        else:
            try:
                report["api_version"] = kvm.api_version
                report["max_vcpus"] = kvm.max_vcpus()
                for short, (cname, use, required) in CAPABILITIES.items():
                    present = bool(kvm.check_extension(cname))
                    report["capabilities"][short] = {"present": present, "required": required, "use": use}
                    if required and not present:
                        problems.append(f"missing required capability {short}")
                if not problems:
                    ok, text = _smoke_test(kvm)
                    report["smoke_test"] = text
                    if not ok:
                        problems.append("the smoke-test guest did not run")
            except OSError as e:
                problems.append(str(e))
                report["smoke_test"] = f"failed: {e}"
            finally:
                kvm.close()
    report["usable"] = not problems
    if problems:
        report["verdict"] = "KVM is NOT usable: " + "; ".join(problems) + " (kvmpy run without --enable-kvm uses the translator)"
    elif software_nested_kvm():
        report["verdict"] = ("KVM is usable for small guests (run --enable-kvm works), but this is a "
                             "software-nested backend: expect slow kernel-mode code and failures on "
                             "unmodified Linux; the translator is the better choice for Linux here")
    else:
        report["verdict"] = "KVM is usable: kvmpy run --enable-kvm will work"
    return report


def _name(fn, ident: int) -> str:
    try:
        return fn(ident)[0]
    except KeyError:
        return str(ident)
