"""Probe the host's KVM: device, API, backend module, capabilities, and a real guest run."""

from __future__ import annotations

import grp
import os
import pwd
import stat


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
    if "kvm_pvm" in mods:
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
    from .vcpu import exits
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
    elif "kvm_pvm" in report["backend"]:
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
