"""PCI: bus 0 with config mechanism #1 and ECAM, BARs, capabilities, MSI-X."""

from .bus import PciBus, PciConfigIo, PciEcam, PciHostBridge, Window
from .device import BAR_IO, BAR_MEM32, BAR_MEM64, PciDevice
from .msix import MsixCapability

__all__ = ["PciBus", "PciConfigIo", "PciEcam", "PciHostBridge", "Window", "PciDevice",
           "MsixCapability", "BAR_IO", "BAR_MEM32", "BAR_MEM64"]
