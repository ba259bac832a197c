/*
 * Exit-path benchmark: n=N byte writes to port=P (default 0x300, claimed by no
 * device on a PC), each of which leaves the guest (a KVM_EXIT_IO handled by the
 * VMM), then mmio=N reads of an MMIO
 * address with no RAM behind it (0xFEBFF000, inside the PCI hole, unclaimed), or
 * with testdev=1 of pci-testdev's BAR0 (a device's register: its test header with
 * no test selected, which answers 0 in QEMU's model and in kvmpy's).
 * With console=N, first N bytes of console output the way Linux's console
 * writes them (LSR polled for THRE before each THR write; the THR writes are
 * queued by KVM's coalesced PIO under kvmpy), framed by "console<" and ">console".
 * Prints the TSC cycles each loop took. With spin=1 it then spins for good with no
 * exit: the last byte it printed is a queued write nothing but the VMM's own drain
 * of the ring can deliver.
 */
#include "guest.h"
#include "virtio_pci.h"

static volatile uint32_t *pci_testdev_bar0(void)
{
    for (int slot = 0; slot < 32; slot++) {
        if (pci_read32(slot, 0) != (0x0005u << 16 | 0x1b36))
            continue;
        pci_write32(slot, 0x04, (pci_read32(slot, 0x04) & 0xffff) | 0x2);   /* memory space */
        return (volatile uint32_t *)(uintptr_t)(pci_read32(slot, 0x10) & ~0xfu);
    }
    return 0;
}

int guest_main(const struct hvm_start_info *si)
{
    uint64_t n = cmdline_get_u64("n", 1000);
    uint64_t m = cmdline_get_u64("mmio", 0);
    uint16_t port = (uint16_t)cmdline_get_u64("port", 0x300);
    volatile uint32_t *hole = (volatile uint32_t *)(uintptr_t)0xFEBFF000u;
    if (cmdline_get_u64("testdev", 0)) {
        hole = pci_testdev_bar0();
        if (hole == 0) {
            printf("exitloop: no pci-testdev\n");
            return 3;
        }
    }
    uint64_t c = cmdline_get_u64("console", 0);
    if (c) {
        static const char line[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-=+*";
        serial_write("console<", 8);
        uint64_t c0 = rdtsc();
        for (uint64_t i = 0; i < c; i += 64)
            serial_write(line, c - i < 64 ? (size_t)(c - i) : 64);
        uint64_t c1 = rdtsc();
        printf(">console\nexitloop: console %lu in %lu cycles\n", c, c1 - c0);
    }
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++)
        outb(port, (uint8_t)i);
    uint64_t t1 = rdtsc();
    uint32_t sink = 0;
    for (uint64_t i = 0; i < m; i++)
        sink += *hole;
    uint64_t t2 = rdtsc();
    printf("exitloop: pio %lu in %lu cycles, mmio %lu in %lu cycles (sink %u)\n", n, t1 - t0, m, t2 - t1, sink);
    if (cmdline_get_u64("spin", 0))
        for (;;)
            cpu_relax();
    return 0;
}
