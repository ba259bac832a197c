"""kvmpy: a virtual machine monitor in Python over /dev/kvm, with a C translator fallback."""

__version__ = "0.1.0"
