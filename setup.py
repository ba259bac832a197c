"""The native parts of kvmpy; everything else is declared in pyproject.toml.

- kvmpy.hv.kvm._kvm_cffi: cffi bindings over <linux/kvm.h> in API mode, so the
  compiler checks every struct kvmpy uses against the host's kernel headers;
- kvmpy.net._slirp_cffi: libslirp (user-mode networking) through cffi in API mode,
  with its per-packet glue in C (needs libslirp-dev);
- kvmpy.devices.virtio._dataplane_cffi: the virtio-blk data plane (c_ext/dataplane/),
  cffi API mode too, apart from the KVM module because device models may not import it;
- kvmpy.devices.virtio._netplane_cffi: the virtio-net data plane (same directory, the
  ring walker vring.c shared with the blk one);
- kvmpy._tcg: the translator, a CPython extension built from c_ext/*.c;
- kvmpy.vcpu._claimed: the vCPU loop's claimed accesses served in C
  (c_ext/exitpath/claimed.c), a CPython extension: it calls the devices' methods.
"""

import compileall
import glob
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class build_ext_and_bytecode(build_ext):
    """An in-place build (the checkout's `python3 -m kvmpy`) also compiles kvmpy's
    modules to bytecode: where bytecode is not written at import time
    (PYTHONDONTWRITEBYTECODE, a read-only checkout) every `kvmpy run` would otherwise
    compile all of them again, about half of its start-up; and records the code of
    the methods dataclasses would compile at every start (kvmpy/_codecache.py). An
    installed kvmpy gets its bytecode from pip, and compiles those methods."""

    def run(self):
        super().run()
        if self.inplace:
            compileall.compile_dir("kvmpy", quiet=1)
            # The code of the methods @dataclass writes at import (kvmpy/_codecache.py),
            # recorded in a fresh interpreter.
            subprocess.run([sys.executable, "-c", "import kvmpy._codecache as c; c.build('kvmpy')"], check=True)


setup(
    cmdclass={"build_ext": build_ext_and_bytecode},
    cffi_modules=["kvmpy/hv/kvm/_build.py:ffibuilder", "kvmpy/net/_slirp_build.py:ffibuilder",
                  "kvmpy/devices/virtio/_dataplane_build.py:ffibuilder",
                  "kvmpy/devices/virtio/_netplane_build.py:ffibuilder"],
    ext_modules=[Extension(
        "kvmpy.vcpu._claimed",
        sources=["c_ext/exitpath/claimed.c"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    ), Extension(
        "kvmpy._tcg",
        sources=sorted(glob.glob("c_ext/*.c")) + sorted(glob.glob("c_ext/native/*.c")),
        depends=sorted(glob.glob("c_ext/*.h")) + sorted(glob.glob("c_ext/native/*.h")),
        include_dirs=["c_ext"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function",
                            "-fno-strict-aliasing"],
    )],
)
