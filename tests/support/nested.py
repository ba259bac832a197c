"""Shared by the nested-KVM tests: tests/test_nested_kvm.py boots one L1 (kvmpy/tools/nested.py)
and runs the suite in tests/nested/ inside it; those inner tests run only there."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

IN_L1 = os.environ.get("KVMPY_NESTED_L1") == "1"
NOT_IN_L1 = ("runs inside the nested-KVM L1 only: tests/test_nested_kvm.py boots it "
             "(kvmpy selftest nested) and runs tests/nested/ there")

# pytestmark for every inner module: visible as a skip on a normal run.
l1_only = pytest.mark.skipif(not IN_L1, reason=NOT_IN_L1)

# Inputs the outer fixture prepares on the host, under the share.
GUEST_SUBDIR = "guest"
INNER_XML = "inner.xml"


def share_dir() -> str:
    path = os.environ.get("KVMPY_NESTED_SHARE")
    if not path or not os.path.isdir(path):
        pytest.fail(f"KVMPY_NESTED_SHARE ({path!r}) is not a directory: not started by kvmpy/tools/nested.py?")
    return path


def linux_guest_files() -> dict[str, str]:
    """vmlinuz, initrd.img and disk.img of the default guest the host built (the L1 has no network)."""
    d = os.path.join(share_dir(), GUEST_SUBDIR)
    files = {name: os.path.join(d, name) for name in ("vmlinuz", "initrd.img", "disk.img")}
    missing = [p for p in files.values() if not os.path.exists(p)]
    if missing:
        pytest.fail(f"the host did not prepare the default guest: {missing} missing")
    return files


def nodeid_key(nodeid: str) -> tuple[str, str]:
    """tests/nested/test_x.py::test_y[p] -> (classname, name) as pytest's junit XML spells them."""
    path, _, name = nodeid.partition("::")
    classname = path[:-3].replace("/", ".") if path.endswith(".py") else path.replace("/", ".")
    if "::" in name:            # a test in a class
        cls, _, name = name.rpartition("::")
        classname = f"{classname}.{cls.replace('::', '.')}"
    return classname, name


def read_junit(path: str) -> dict[tuple[str, str], dict]:
    """(classname, name) -> {"outcome": passed|failed|error|skipped, "time", "text"}."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                text = "\n".join(t for t in (child.get("message", ""), child.text or "") if t)
                if child.tag != "skipped":
                    break
        results[(case.get("classname", ""), case.get("name", ""))] = {
            "outcome": outcome, "time": float(case.get("time") or 0), "text": text}
    return results
