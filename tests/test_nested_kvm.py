"""Linux and the test guests under real KVM, on any host: one L1 (Debian's standard
kernel under QEMU's TCG with emulated AMD SVM, kvmpy/tools/nested.py) boots once and runs
the suite in tests/nested/ inside; each test here is one of those inner checks and
shows its failure text. The host's own KVM may be software-nested (kvm_pvm) and
unable to run Linux: this is where kvmpy meets kvm-amd."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from support.nested import GUEST_SUBDIR, IN_L1, INNER_XML, nodeid_key, read_junit

# one L1 boot for the module, on one xdist worker
pytestmark = [pytest.mark.guest, pytest.mark.xdist_group("nested")]

INNER_DIR = "tests/nested"
# The L1 boot (~10 s) plus the inner suite (a few minutes on 2 loaded cores).
INNER_TIMEOUT = 720
# The inner pytest prints a dot per check (the longest, a Linux boot, takes about
# 30 s); silence this long means the L1 is stuck (kvmpy/tools/nested.py NestedStalled).
INNER_IDLE_TIMEOUT = 240


def _inner_ids() -> list[str]:
    """The inner suite's test ids, collected on the host (cheap: nothing runs; the
    variable lets conftest collect tests/nested/ here)."""
    if IN_L1:
        return []
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", INNER_DIR],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", KVMPY_NESTED_L1="1"))
    ids = [line.strip() for line in r.stdout.splitlines() if "::" in line]
    if r.returncode != 0 or not ids:
        return [f"{INNER_DIR}::collection-failed: {(r.stdout + r.stderr).strip()[-500:]}"]
    return ids


INNER_IDS = _inner_ids()


def l1_or_skip():
    """The L1 kernel and initramfs (built or cached), or a skip naming what is missing."""
    from kvmpy.tools import nested
    reason = nested.missing_tools()
    if reason:
        pytest.skip(f"nested KVM: {reason}")
    try:
        return nested.build_l1()
    except nested.NestedUnavailable as e:
        pytest.skip(f"nested KVM: {e}")


@pytest.fixture(scope="module")
def inner(tmp_path_factory):
    if IN_L1:
        pytest.skip("already inside the nested-KVM L1")
    from kvmpy.tools import guestbuild, nested
    l1_or_skip()
    if not shutil.which("make"):
        pytest.skip("make is needed to build tests/guests")
    r = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "tests", "guests")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    share = tmp_path_factory.mktemp("nested-share")
    try:
        # Built here: the L1 has no network to fetch the Debian packages.
        guestbuild.build(out_dir=str(share / GUEST_SUBDIR), disk_size="64M")
    except guestbuild.GuestBuildError as e:
        pytest.skip(f"the default Linux guest cannot be built here: {e}")
    # The L1 reads the tree read-only: byte-compile it here so each of the inner
    # suite's many Python processes does not compile kvmpy again under TCG.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "kvmpy", "tests"], cwd=ROOT, capture_output=True)
    start = time.monotonic()
    inner_cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra",
                 "--junitxml", f"{nested.SHARE_IN_L1}/{INNER_XML}", INNER_DIR]
    for attempt in (1, 2):
        try:
            result = nested.run_nested(inner_cmd, cwd=ROOT, timeout=INNER_TIMEOUT, share_dir=str(share),
                                       idle_timeout=INNER_IDLE_TIMEOUT,
                                       # Plugin discovery reads every installed distribution's
                                       # metadata over 9p; the inner suite needs none of them.
                                       env={"PY_COLORS": "0", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
            break
        except nested.NestedStalled as e:
            if attempt == 2:
                pytest.fail(f"{e} (twice)\n--- L1 console (tail) ---\n{e.console[-4000:]}")
            print(f"nested KVM: the L1 stalled ({e}); booting a new one")
        except nested.NestedError as e:
            pytest.fail(f"{e}\n--- L1 console (tail) ---\n{e.console[-4000:]}")
    xml = share / INNER_XML
    if not xml.exists():
        pytest.fail(f"the inner pytest wrote no {INNER_XML} (exit {result.status}):\n{result.output[-4000:]}")
    print(f"nested KVM: L1 ready in {result.ready_seconds:.1f} s, inner suite done and L1 off after "
          f"{result.seconds:.1f} s (fixture {time.monotonic() - start:.1f} s)")
    return {"results": read_junit(str(xml)), "output": result.output, "status": result.status}


@pytest.mark.parametrize("nodeid", INNER_IDS, ids=lambda n: n.split("/")[-1])
def test_inner_check(inner, nodeid):
    found = inner["results"].get(nodeid_key(nodeid))
    if found is None:
        pytest.fail(f"{nodeid} did not run in the L1 (inner pytest exit {inner['status']}):\n"
                    f"{inner['output'][-4000:]}")
    if found["outcome"] == "skipped":
        pytest.skip(f"skipped inside the L1: {found['text']}")
    assert found["outcome"] == "passed", f"{nodeid} {found['outcome']} in the L1 after {found['time']:.1f} s:\n" \
                                         f"{found['text'][-6000:]}"


def _selftest(args: list[str], path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "kvmpy", "selftest", "nested", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_missing_qemu_is_one_line_naming_the_package(tmp_path):
    """Nothing on PATH: the first missing tool is QEMU, and the line says how to get it."""
    p = _selftest(["--", "true"], path=str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip() == "kvmpy: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"


@pytest.mark.parametrize("args,needle", [
    ([], "no command given"),
    (["--mem", "2X", "--", "true"], "--mem"),
    (["--scratch-size", "lots", "--", "true"], "--scratch-size"),
    (["--timeout", "0", "--", "true"], "--timeout"),
    (["--idle-timeout", "-1", "--", "true"], "--idle-timeout"),
])
def test_bad_options_are_one_line_and_exit_2(args, needle):
    p = _selftest(args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


def test_a_silent_l1_is_killed_as_stalled():
    """The watchdog behind the fixture's one retry: an L1 whose console stays silent
    past idle_timeout is killed and reported as stalled, long before its timeout."""
    from kvmpy.tools import nested
    l1_or_skip()
    start = time.monotonic()
    with pytest.raises(nested.NestedStalled) as stalled:
        nested.run_nested(["sleep", "600"], cwd=ROOT, timeout=300, idle_timeout=3)
    assert time.monotonic() - start < 120
    assert "no console output for 3 s" in str(stalled.value)
