"""QEMU's isa-debugcon as a kvmpy plug-in: a port the guest writes bytes to, which
land in a host file (the Bochs "port 0xE9 hack" firmware and test kernels use).

    kvmpy run --kernel guest.elf --device examples/plugins/debugcon.py:DebugCon,path=out.txt
    # or in vm.toml:   [[device]]
    #                  type = "examples/plugins/debugcon.py:DebugCon"
    #                  path = "out.txt"      # iobase = 0xE9, max_bytes = 1048576
"""

from kvmpy.devices.bus import PortSlot


class DebugCon:
    bus = "pio"

    @classmethod
    def place(cls, options):
        return (PortSlot(base=int(options.get("iobase", 0xE9)), length=1),)

    def __init__(self, ctx):
        self.readback = int(ctx.options.get("readback", 0xE9)) & 0xFF
        self.room = int(ctx.options.get("max_bytes", 1 << 20))   # a guest must not fill the host's disk
        self.out = open(ctx.options["path"], "ab", buffering=0)

    def read(self, offset, size):
        return self.readback          # what a guest probes to find the device

    def write(self, offset, size, value):
        if self.room > 0:
            self.room -= 1
            self.out.write(bytes([value & 0xFF]))

    def close(self):
        self.out.close()
