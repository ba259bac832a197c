/*
 * Exit-path benchmark: n=N byte writes to port=P (default 0x300, claimed by no
 * device on a PC), each of which leaves the guest (a KVM_EXIT_IO handled by the
 * VMM), then mmio=N reads of an MMIO
 * address with no RAM behind it (0xFEBFF000, inside the PCI hole, unclaimed).
 * Prints the TSC cycles each loop took.
 */
#include "guest.h"

int guest_main(const struct hvm_start_info *si)
{
    uint64_t n = cmdline_get_u64("n", 1000);
    uint64_t m = cmdline_get_u64("mmio", 0);
    uint16_t port = (uint16_t)cmdline_get_u64("port", 0x300);
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++)
        outb(port, (uint8_t)i);
    uint64_t t1 = rdtsc();
    volatile uint32_t *hole = (volatile uint32_t *)(uintptr_t)0xFEBFF000u;
    uint32_t sink = 0;
    for (uint64_t i = 0; i < m; i++)
        sink += *hole;
    uint64_t t2 = rdtsc();
    printf("exitloop: pio %lu in %lu cycles, mmio %lu in %lu cycles (sink %u)\n", n, t1 - t0, m, t2 - t1, sink);
    return 0;
}
