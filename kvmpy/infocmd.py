"""``kvmpy info kvm``: can this host run guests under KVM, and how?"""

from __future__ import annotations

import json

from .hv.select import probe_kvm


def register(sub) -> None:
    p = sub.add_parser("info", help="host information", description="Report on the host.")
    isub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    k = isub.add_parser("kvm", help="KVM availability, backend and capabilities")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(func=info_kvm)


def info_kvm(args) -> int:
    report = probe_kvm()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["usable"] else 1


def format_report(r: dict) -> str:
    lines = []
    dev = r["device"]
    if dev["present"]:
        lines.append(f"/dev/kvm: present, mode {dev['mode']}, owner {dev['owner']}:{dev['group']}, "
                     f"{'read-write for us' if dev['accessible'] else 'NOT accessible to us'}")
    else:
        lines.append("/dev/kvm: absent")
    lines.append(f"api version: {r['api_version'] if r['api_version'] is not None else '-'}")
    lines.append(f"cpu flags: vmx={'yes' if r['cpu']['vmx'] else 'no'} svm={'yes' if r['cpu']['svm'] else 'no'}"
                 f" hypervisor={'yes' if r['cpu']['hypervisor'] else 'no'}")
    lines.append(f"backend: {r['backend']}")
    lines.append(f"max vcpus: {r['max_vcpus'] if r['max_vcpus'] is not None else '-'}")
    if r["capabilities"]:
        lines.append("capabilities:")
        for name, c in r["capabilities"].items():
            mark = "yes" if c["present"] else "no "
            need = "required" if c["required"] else "optional"
            lines.append(f"  {mark} {name:<26} {need:<8} {c['use']}")
    smoke = r["smoke_test"]
    lines.append(f"smoke test: {smoke}")
    lines.append(f"verdict: {r['verdict']}")
    return "\n".join(lines)

