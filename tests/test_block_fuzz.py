"""Random operation sequences on qcow2/raw images against a bytearray model of the disk.

After every sequence the bytes must match the model and `qemu-img check` must call
the image clean. KVMPY_FUZZ=1 runs many more examples.
"""

import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmpy.block import open_image
from kvmpy.block.imgcli import create_image
from kvmpy.cli import main as kvmpy_main

QEMU_IMG = shutil.which("qemu-img")
if not QEMU_IMG:
    pytest.skip("qemu-img not installed (apt-get install qemu-utils)", allow_module_level=True)

FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
KiB = 1024


class ImageMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvmpy-fuzz-")
        self.drv = None

    @initialize(fmt=st.sampled_from(["qcow2", "qcow2", "qcow2-backed", "raw"]),
                cluster=st.sampled_from([512, 4096, 65536]),
                version=st.sampled_from(["1.1", "1.1", "0.10"]),
                size_kib=st.integers(64, 1024))
    def setup(self, fmt, cluster, version, size_kib):
        self.size = size_kib * KiB
        self.path = os.path.join(self.dir, "disk.img")
        self.fmt = "raw" if fmt == "raw" else "qcow2"
        self.model = bytearray(self.size)
        self.backed = fmt == "qcow2-backed"
        if self.backed:
            base = os.path.join(self.dir, "base0.raw")
            content = os.urandom(self.size // 2)
            with open(base, "wb") as f:
                f.write(content)
            self.model[:len(content)] = content
            create_image(self.path, "qcow2", self.size, {"cluster_size": str(cluster), "compat": version},
                         backing="base0.raw", backing_fmt="raw")
        else:
            opts = {} if self.fmt == "raw" else {"cluster_size": str(cluster), "compat": version}
            create_image(self.path, self.fmt, self.size, opts)
        self.rebases = 0
        self.drv = open_image(self.path, self.fmt)

    def _range(self, data):
        off = data.draw(st.integers(0, self.size - 1), label="off")
        n = data.draw(st.integers(1, min(self.size - off, 200 * KiB)), label="len")
        return off, n

    @rule(data=st.data(), byte=st.integers(0, 255), random_bytes=st.booleans())
    def write(self, data, byte, random_bytes):
        off, n = self._range(data)
        payload = os.urandom(n) if random_bytes else bytes([byte]) * n
        # Split into several iovecs like a virtio request.
        cut = data.draw(st.integers(0, n), label="cut")
        mv = memoryview(bytearray(payload))
        self.drv.pwritev([mv[:cut], mv[cut:]], off)
        self.model[off:off + n] = payload

    @rule(data=st.data())
    def discard(self, data):
        off, n = self._range(data)
        self.drv.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data, may_unmap):
        off, n = self._range(data)
        self.drv.write_zeroes(off, n, may_unmap=may_unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def read(self, data):
        off, n = self._range(data)
        buf = bytearray(n)
        cut = data.draw(st.integers(0, n), label="cut")
        mv = memoryview(buf)
        self.drv.preadv([mv[:cut], mv[cut:]], off)
        assert buf == self.model[off:off + n]

    @rule()
    def flush(self):
        self.drv.flush()

    @rule()
    def reopen(self):
        self.drv.close()
        self.drv = open_image(self.path, self.fmt)

    @rule(new_kib=st.integers(64, 1536))
    def resize(self, new_kib):
        new = new_kib * KiB
        self.drv.close()
        args = ["img", "resize", "-q", "-f", self.fmt]
        if new < self.size:
            args.append("--shrink")
        assert kvmpy_main(args + [self.path, str(new)]) == 0
        self.drv = open_image(self.path, self.fmt)
        assert self.drv.size == new
        if new < self.size:
            del self.model[new:]
        else:
            self.model.extend(bytes(new - self.size))
        self.size = new

    @precondition(lambda self: self.drv is not None and self.fmt == "qcow2")
    @rule(to_none=st.booleans())
    def rebase(self, to_none):
        """Safe rebase onto a different backing file must not change guest-visible bytes."""
        self.drv.close()
        self.rebases += 1
        if to_none:
            args = ["img", "rebase", "-b", "", self.path]
        else:
            name = f"base{self.rebases}.raw"
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(os.urandom(max(512, self.size // 3 // 512 * 512)))
            args = ["img", "rebase", "-b", name, "-F", "raw", self.path]
        assert kvmpy_main(args) == 0
        self.drv = open_image(self.path, self.fmt)

    @invariant()
    def size_matches(self):
        if self.drv is not None:
            assert self.drv.size == len(self.model)

    def teardown(self):
        try:
            if self.drv is not None:
                assert self.drv.pread(self.size, 0) == self.model
                self.drv.close()
                self.drv = None
                if self.fmt == "qcow2":
                    r = subprocess.run([QEMU_IMG, "check", self.path], capture_output=True, text=True)
                    assert r.returncode == 0, r.stdout + r.stderr
                    out = os.path.join(self.dir, "out.raw")
                    subprocess.run([QEMU_IMG, "convert", "-O", "raw", self.path, out], check=True)
                    with open(out, "rb") as f:
                        assert f.read() == self.model
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


ImageMachine.TestCase.settings = settings(
    max_examples=400 if FUZZ else 60, stateful_step_count=40 if FUZZ else 20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestImageFuzz = ImageMachine.TestCase
