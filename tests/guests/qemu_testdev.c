/*
 * Drives QEMU's test devices as kvm-unit-tests does: pc-testdev's scratch port and
 * MMIO scratch memory, pci-testdev's I/O tests on both BARs, then leaves through an
 * isa-debug-exit at `exitport=` (default QEMU's 0x501) with `code=` plus the number of
 * failed checks: the VMM then exits with (code << 1) | 1. `pc=0` / `pci=0` skip a device
 * that is not there.
 */
#include "guest.h"
#include "virtio_pci.h"

#define PC_TESTDEV_IOMEM 0xff000000ul

static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("FAIL: %s\n", what);
        failures++;
    }
}

static void pc_testdev(void)
{
    outl(0xe0, 0x12345678);
    check(inl(0xe0) == 0x12345678, "pc-testdev 32-bit scratch");
    outb(0xe2, 0xab);
    check(inl(0xe0) == 0x12ab5678, "pc-testdev byte write into the scratch");
    check(inw(0xe1) == 0xab56, "pc-testdev unaligned word read");
    check(inb(0xe9) == 0x56, "pc-testdev byte port");
    outw(0xea, 0x4321);            /* the byte port takes it a byte at a time */
    check(inl(0xe8) == (0x4321u << 16 | 0x5678), "pc-testdev byte port, word write");
    printf("pc-testdev ioport %08x\n", inl(0xe0));
    mmio_write32(PC_TESTDEV_IOMEM + 0x100, 0xdeadbeef);
    *(volatile uint8_t *)(PC_TESTDEV_IOMEM + 0xfffe) = 0x5a;
    check(mmio_read32(PC_TESTDEV_IOMEM + 0x100) == 0xdeadbeef, "pc-testdev iomem word");
    check(*(volatile uint16_t *)(PC_TESTDEV_IOMEM + 0x101) == 0xadbe, "pc-testdev iomem unaligned");
    check(*(volatile uint8_t *)(PC_TESTDEV_IOMEM + 0xfffe) == 0x5a, "pc-testdev iomem top");
    printf("pc-testdev iomem %08x\n", mmio_read32(PC_TESTDEV_IOMEM + 0x100));
}

/* One BAR's header accessors: port I/O (BAR1) or memory (BAR0). */
static uint8_t hdr_r8(int io, uint64_t base, uint32_t off)
{
    return io ? inb((uint16_t)(base + off)) : *(volatile uint8_t *)(base + off);
}

static uint32_t hdr_r32(int io, uint64_t base, uint32_t off)
{
    return io ? inl((uint16_t)(base + off)) : *(volatile uint32_t *)(base + off);
}

static void hdr_w8(int io, uint64_t base, uint32_t off, uint8_t v)
{
    if (io)
        outb((uint16_t)(base + off), v);
    else
        *(volatile uint8_t *)(base + off) = v;
}

static void pci_testdev(void)
{
    int slot;
    for (slot = 0; slot < 32; slot++)
        if (pci_read32(slot, 0) == (0x0005u << 16 | 0x1b36))
            break;
    if (slot == 32) {
        check(0, "pci-testdev 1b36:0005 not found");
        return;
    }
    check((pci_read32(slot, 0x08) >> 8) == 0x00ff00, "pci-testdev class code 00ff00 as QEMU's");
    pci_write32(slot, 0x04, (pci_read32(slot, 0x04) & 0xffff) | 0x3);   /* I/O + memory */
    uint32_t bar0 = pci_read32(slot, 0x10), bar1 = pci_read32(slot, 0x14);
    check(!(bar0 & 1) && (bar1 & 1), "pci-testdev BAR0 memory, BAR1 I/O");
    uint64_t bases[2] = { bar0 & ~0xful, bar1 & ~0x3ul };
    for (int io = 0; io < 2; io++) {
        for (int test = 0;; test++) {
            hdr_w8(io, bases[io], 0, test);
            uint8_t width = hdr_r8(io, bases[io], 1);
            if (width != 1 && width != 2 && width != 4)
                break;
            uint32_t count0 = hdr_r32(io, bases[io], 12);
            uint32_t offset = hdr_r32(io, bases[io], 4), data = hdr_r32(io, bases[io], 8);
            char name[32];
            unsigned n = 0;
            for (; n < sizeof(name) - 1; n++)
                if (!(name[n] = hdr_r8(io, bases[io], 16 + n)))
                    break;
            name[n] = 0;
            for (int i = 0; i < 16; i++)
                hdr_w8(io, bases[io], offset, data);
            uint32_t count = hdr_r32(io, bases[io], 12);
            check(count0 == 0, "pci-testdev count starts at 0");
            check(count == 0 || count == 16, "pci-testdev count is 0 (ioeventfd) or every write");
            printf("pci-testdev %s: offset %u data 0x%x width %u count %u\n", name, offset, data, width, count);
        }
    }
}

int guest_main(const struct hvm_start_info *si)
{
    uint16_t port = (uint16_t)cmdline_get_u64("exitport", 0x501);
    uint32_t code = (uint32_t)cmdline_get_u64("code", 0);
    if (cmdline_get_u64("pc", 1))
        pc_testdev();
    if (cmdline_get_u64("pci", 1))
        pci_testdev();
    printf("testdev: %d failures, exit %u through port 0x%x\n", failures, code + failures, port);
    outw(port, (uint16_t)(code + failures));
    /* Reached only without an isa-debug-exit at `port`: kvmpy's own exit port then ends it. */
    guest_exit(code + failures);
}
