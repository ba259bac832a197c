/*
 * Makes the VMM report an internal error, for its register dump and Code= line.
 * mode=straddle (default): jumps to an instruction whose first two bytes (48 b8,
 * movabs $imm64, %rax) are the last two bytes of low RAM, so fetching the rest
 * reaches a guest-physical address with nothing behind it: neither KVM's
 * emulator nor the translator can execute that.
 * mode=hole: jumps into unclaimed MMIO in the PCI hole (0xFEBFF000).
 * Before the jump it writes and reads unclaimed MMIO once (0xFEBFF000), so a
 * trace of its exits shows an MMIO write and read too.
 * If the jump ever returns, prints "internal_error: survived" and exits 5.
 */
#include "guest.h"

#define PCI_HOLE_UNCLAIMED 0xFEBFF000ull

/* End of the RAM entry below 4 GiB that holds this image: RAM ends there. */
static uint64_t low_ram_end(const struct hvm_start_info *si)
{
    const struct hvm_memmap_table_entry *e = (const void *)(uintptr_t)si->memmap_paddr;
    uint64_t image = (uint64_t)(uintptr_t)__image_start;
    for (uint32_t i = 0; si->version >= 1 && i < si->memmap_entries; i++)
        if (e[i].type == 1 && e[i].addr <= image && image < e[i].addr + e[i].size)
            return e[i].addr + e[i].size;
    panic("internal_error: no RAM entry holds the image");
}

int guest_main(const struct hvm_start_info *si)
{
    char mode[16] = "straddle";
    cmdline_get("mode", mode, sizeof(mode));
    uint64_t target;
    if (strcmp(mode, "hole") == 0) {
        target = PCI_HOLE_UNCLAIMED;
    } else if (strcmp(mode, "straddle") == 0) {
        uint64_t end = low_ram_end(si);
        if (end >= (1ull << 32))
            panic("internal_error: low RAM ends above 4 GiB");
        target = end - 2;
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)target;
        p[0] = 0x48;
        p[1] = 0xb8;
    } else {
        printf("internal_error: unknown mode %s\n", mode);
        return GUEST_EXIT_FAIL;
    }
    mmio_write32(PCI_HOLE_UNCLAIMED, 0x1234abcd);
    printf("internal_error: mmio read 0x%x\n", mmio_read32(PCI_HOLE_UNCLAIMED));
    printf("internal_error: jumping to 0x%lx (%s)\n", target, mode);
    __asm__ volatile("call *%0" :: "r"(target) : "memory");
    puts("internal_error: survived");
    return 5;
}
