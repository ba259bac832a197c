"""Build kvmpy: the cffi bindings over <linux/kvm.h> (API mode) and the C translator."""

import glob

from setuptools import Extension, find_packages, setup

tcg_sources = sorted(glob.glob("c_ext/*.c"))
ext_modules = []
if tcg_sources:
    ext_modules.append(Extension(
        "kvmpy._tcg",
        sources=tcg_sources,
        include_dirs=["c_ext"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function",
                            "-fno-strict-aliasing"],
    ))

setup(
    name="kvmpy",
    version="0.1.0",
    description="A virtual machine monitor in Python over /dev/kvm, with a C translator fallback",
    packages=find_packages(include=["kvmpy", "kvmpy.*"]),
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15"],
    cffi_modules=["kvmpy/kvm/_build.py:ffibuilder"],
    ext_modules=ext_modules,
    entry_points={"console_scripts": ["kvmpy=kvmpy.cli:main"]},
)
