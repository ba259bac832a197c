"""kvmpy: a virtual machine monitor in Python over /dev/kvm, with a C translator fallback."""

from . import _codecache

__version__ = "0.1.0"

# Before any kvmpy module makes a dataclass: their methods' code comes from the build.
_codecache.install()
