"""Hostile vm.toml documents and `kvmpy run` options: never a traceback, never a hang.

Everything a user can type reaches the run command's parsing (vm.toml bytes ->
load_config, options -> build_config, monitor addresses -> parse_address); the only
way out allowed is a VmConfig or one of kvmpy's UserError kinds (argparse's own
usage error, SystemExit(2), for options it refuses itself). In-process for speed,
then a few real `kvmpy run` processes. KVMPY_FUZZ=1 explores ten times more.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import ROOT, guest_path
from kvmpy.cli import build_parser
from kvmpy.config import DISK_KEYS, NET_KEYS, TOP_KEYS, VmConfig, config_from_dict, load_config
from kvmpy.errors import UserError
from kvmpy.monitor.server import parse_address
from kvmpy.runcmd import build_config

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
N = 10 if FUZZ else 1
FAST = settings(max_examples=150 * N, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])

# Values of every type TOML has (datetimes aside), nested a little.
scalars = (st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True)
           | st.text(max_size=30)
           | st.sampled_from(["512M", "2G", "0", "1T", "2T", "kvm", "tcg", "auto", "kvm,force=on", "stdio",
                              "none", "unix:", "tcp::1", "exits", "tap", "raw", "qcow2", "k", "", "bad name"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(sorted(DISK_KEYS | NET_KEYS)),
                                        inner, max_size=3), max_leaves=8)
keys = st.sampled_from(sorted(TOP_KEYS)) | st.text(max_size=10)
documents = st.dictionaries(keys, values, max_size=6)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)           # out of TOML's 64-bit range: tomllib refuses, a ConfigError
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)    # JSON escapes are TOML's, but for lone surrogates (refused: fine)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict) -> str:
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def _must_be_clean(fn, *args):
    """Run fn: a result, or a UserError with a one-line message; anything else fails."""
    try:
        return fn(*args)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), repr(msg)
        return None


@FAST
@given(documents)
def test_any_toml_table_is_a_config_or_one_line(doc):
    cfg = _must_be_clean(config_from_dict, doc, "/nowhere/vm.toml")
    assert cfg is None or isinstance(cfg, VmConfig)
    for spec in (cfg.qmp + cfg.hmp) if cfg else ():
        _must_be_clean(lambda s: parse_address(s, option="monitor"), spec)


@FAST
@given(st.one_of(documents.map(lambda d: to_toml(d).encode("utf-8", "surrogatepass")),
                 documents.map(lambda d: to_toml(d).encode("latin-1", "replace")),
                 st.binary(max_size=200),
                 st.text(max_size=200).map(lambda t: t.encode("utf-16"))))
def test_any_vm_toml_bytes_are_a_config_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("toml") / "vm.toml"
    path.write_bytes(data)
    _must_be_clean(load_config, str(path))


OPTIONS = ["-m", "--memory", "--smp", "--name", "--accel", "--serial", "--drive", "--net", "--trace",
           "--append", "--qmp", "--monitor", "--kernel", "--initrd", "--runas"]
OPTION_VALUES = (st.text(max_size=25)
                 | st.sampled_from(["512M", "900G", "2T", "0", "-1", "1", "256", "kvm,force=on", "auto",
                                    "file=", "file=x,format=qcow2", "file=x,serial=" + "s" * 21, "tap,mac=01:00:00:00:00:00",
                                    "tap,bogus", "exits", "help", "tcp:0.0.0.0:99999", "unix:", "bad name"]))
option_lists = st.lists(st.tuples(st.sampled_from(OPTIONS), OPTION_VALUES), max_size=5)


def _build(argv):
    try:
        args = build_parser().parse_args(["run", *argv])
    except SystemExit as e:
        assert e.code == 2      # argparse's own refusal (usage line + error), not a crash
        return None
    cfg = build_config(args)
    for spec in cfg.qmp + cfg.hmp:
        _must_be_clean(lambda s: parse_address(s, option="monitor"), spec)
    return cfg


@FAST
@given(option_lists)
@example([("--kernel", "\0")])     # found by this test: os.stat's ValueError
@example([("--accel", "\n")])      # found by this test: a two-line message
def test_any_run_options_are_a_config_or_one_line(capsys, pairs):
    argv = ["--kernel", guest_path("hello")]
    for opt, value in pairs:
        argv += [opt, value] if not value.startswith("-") else [f"{opt}={value}"]
    _must_be_clean(_build, argv)
    capsys.readouterr()


@pytest.mark.guest
@settings(max_examples=4 * N, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["-m", "--smp", "--name", "--accel", "--trace", "--append"]),
                          OPTION_VALUES), max_size=3),
       st.binary(max_size=60) | documents.map(lambda d: to_toml(d).encode("utf-8", "surrogatepass")))
def test_real_kvmpy_run_with_hostile_input(tmp_path_factory, pairs, toml_bytes):
    """The real process: exit 0 (the hello guest ran), 1 or 2, within the timeout, and
    no traceback. Options that create files, sockets or taps stay out: the process
    runs in a scratch directory, but nothing should be created on a shared host."""
    d = tmp_path_factory.mktemp("run")
    (d / "vm.toml").write_bytes(toml_bytes)
    argv = [sys.executable, "-m", "kvmpy", "run", "--accel", "tcg", "--kernel", guest_path("hello")]
    for opt, value in pairs:
        value = value.replace("\0", "")     # execve cannot pass a NUL; in-process tests cover it
        argv += [opt, value] if not value.startswith("-") else [f"{opt}={value}"]
    for config in ([], ["vm.toml"]):
        p = subprocess.run(argv + config, cwd=d, env=dict(os.environ, PYTHONPATH=ROOT),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        err = p.stderr.decode(errors="replace")
        assert "Traceback" not in err, err
        assert p.returncode in (0, 1, 2), (p.returncode, err)
