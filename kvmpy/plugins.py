"""Devices from outside kvmpy, named in vm.toml (``[[device]]``) or by ``--device``.

A device ``type`` is found, in this order:
  1. the name of an entry point in the group ``kvmpy.devices`` (a package that
     installs a device declares it in its pyproject.toml);
  2. ``package.module:Class``, importable from Python's path;
  3. ``path/to/file.py:Class``, relative to the vm.toml's directory (or the
     current directory for ``--device``).
Every other key of the table is the device's options, handed to its constructor
as one dict; the class checks them (a ValueError or TypeError it raises is reported
as a configuration error naming the table). What the class must implement is in
kvmpy/devices/bus.py (port and MMIO devices) and kvmpy/devices/virtio/device.py
(virtio devices); docs/plugins.md walks through both.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Any, ClassVar, Mapping, Protocol

from .builder import DeviceEntry
from .config import DeviceConfig
from .devices.bus import AddressSlot, MmioSlot, PortSlot
from .devices.context import DeviceContext
from .errors import ConfigError

ENTRY_POINT_GROUP = "kvmpy.devices"

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_CLASS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


PLUGIN_BUSES = ("pio", "mmio", "virtio")


class PluginDevice(Protocol):
    """What a plug-in device class declares (see docs/plugins.md).

    bus: "pio" or "mmio" (the instance is a kvmpy.devices.bus.BusDevice) or
        "virtio" (the instance is a kvmpy.devices.virtio.device.VirtioDevice, which
        kvmpy puts on PCI behind its virtio transport).
    place(options): where a "pio"/"mmio" device sits (PortSlots / MmioSlots), from
        its options, so a user can move it as QEMU's ``iobase=`` does; () for "virtio".
    The constructor takes the DeviceContext (``ctx.options`` holds the options).
    """

    bus: ClassVar[str]

    @classmethod
    def place(cls, options: Mapping[str, Any]) -> tuple[AddressSlot, ...]: ...

    def __init__(self, ctx: DeviceContext) -> None: ...


def plugin_entry(dev: DeviceConfig, index: int) -> DeviceEntry:
    """The machine's table entry for one configured plug-in device; ConfigError
    naming the table for anything the class or its options get wrong."""
    cls = load_device_class(dev)
    # The class attribute as Python would find it (inherited too), read without
    # running a metaclass's or descriptor's code.
    bus = next((vars(k)["bus"] for k in cls.__mro__ if "bus" in vars(k)), None)
    if bus not in PLUGIN_BUSES:
        raise ConfigError(f"{dev.where}: {dev.type} declares no 'bus' (one of {', '.join(PLUGIN_BUSES)})")
    options = dict(dev.options)
    name = options.pop("id", None) or f"{cls.__name__.lower()}{index}"
    if not isinstance(name, str):
        raise ConfigError(f"{dev.where} key 'id': expected a string, got {name!r}")
    try:
        slots = tuple(cls.place(options))
    except KeyError as e:
        raise ConfigError(f"{dev.where}: missing option {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{dev.where}: {type(e).__name__}: {e}") from None
    want = {"pio": PortSlot, "mmio": MmioSlot}.get(bus)
    if want is None:
        if slots:
            raise ConfigError(f"{dev.where}: a virtio device is placed on PCI, not at {slots[0]}")
        return DeviceEntry(name, "pci", _virtio_factory(cls, dev), options=options)
    if not slots or not all(isinstance(s, want) for s in slots):
        raise ConfigError(f"{dev.where}: {dev.type}.place() must give {want.__name__}s for bus {bus!r}")
    try:
        return DeviceEntry(name, bus, _checked_factory(cls, dev), slots, options=options)
    except ConfigError as e:        # a place() out of range: name the table that asked for it
        raise ConfigError(f"{dev.where}: {e}") from None


def _checked_factory(cls: type, dev: DeviceConfig):
    def make(ctx: DeviceContext):
        try:
            return cls(ctx)
        except KeyError as e:
            raise ConfigError(f"{dev.where}: missing option {e}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{dev.where}: {type(e).__name__}: {e}") from None
        except OSError as e:
            raise ConfigError(f"{dev.where}: {e.filename or ''}: {e.strerror or e}") from None
    return make


def _virtio_factory(cls: type, dev: DeviceConfig):
    make_device = _checked_factory(cls, dev)

    def make(ctx: DeviceContext):
        from .devices.virtio.pci import VirtioPciTransport
        return VirtioPciTransport(ctx.platform, ctx.events, make_device(ctx))
    return make


def load_device_class(dev: DeviceConfig) -> type:
    """The class ``dev.type`` names; ConfigError (one line, naming dev.where) if it cannot be had."""
    where = f"{dev.where} key 'type'"
    spec = dev.type
    if ":" not in spec:
        from importlib.metadata import entry_points   # only here: it reads every installed package
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == spec:
                try:
                    return ep.load()
                except Exception as e:  # noqa: BLE001 - a broken plug-in is the user's error to see
                    raise ConfigError(f"{where}: entry point {spec!r} ({ep.value}) failed to load: "
                                      f"{type(e).__name__}: {e}") from None
        raise ConfigError(f"{where}: no device {spec!r}: expected an entry point of group "
                          f"{ENTRY_POINT_GROUP!r}, 'package.module:Class' or 'file.py:Class'")
    module_part, _, class_name = spec.rpartition(":")
    if not _CLASS_RE.fullmatch(class_name):
        raise ConfigError(f"{where}: {class_name!r} is not a class name")
    if module_part.endswith(".py"):
        module = _load_file(module_part, dev.base_dir or os.getcwd(), where)
    elif _MODULE_RE.fullmatch(module_part):
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ConfigError(f"{where}: cannot import {module_part!r}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{where}: importing {module_part!r} failed: {type(e).__name__}: {e}") from None
    else:
        raise ConfigError(f"{where}: {module_part!r} is neither a module name nor a .py file")
    cls = getattr(module, class_name, None)   # a name the user gave, not a hook
    if not isinstance(cls, type):
        raise ConfigError(f"{where}: {module_part!r} has no class {class_name!r}")
    return cls


def _load_file(path: str, base_dir: str, where: str):
    full = path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
    if not os.path.isfile(full):
        raise ConfigError(f"{where}: {full}: no such file")
    name = "kvmpy_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: {full}: cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        sys.modules.pop(name, None)
        raise ConfigError(f"{where}: {full}: {type(e).__name__}: {e}") from None
    return module


def parse_device_option(spec: str, base_dir: str | None = None) -> DeviceConfig:
    """``--device TYPE[,key=value...]`` as QEMU's -device: values are strings, except
    whole numbers (decimal or 0x...) and on/off, true/false."""
    parts = spec.split(",")
    if not parts[0]:
        raise ConfigError(f"--device {spec}: missing the device type")
    options: dict = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ConfigError(f"--device {spec}: expected key=value, got {part!r}")
        options[key] = _option_value(value)
    return DeviceConfig(type=parts[0], options=options, where=f"--device {spec}",
                        base_dir=base_dir or os.getcwd())


def _option_value(text: str):
    if text in ("on", "true"):
        return True
    if text in ("off", "false"):
        return False
    if re.fullmatch(r"[0-9]{1,20}", text):
        return int(text)
    if re.fullmatch(r"0[xX][0-9a-fA-F]{1,16}", text):
        return int(text, 16)
    return text
