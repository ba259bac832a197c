/*
 * The vCPU exit loop's checks (tests/test_exitloop_kvm.py), where what answers an
 * access (a device model, or the loop's "nothing is here") must follow the map
 * the guest itself changes:
 *
 *  barmove=1  finds pci-testdev, reads header byte 1 (the test's width: 1, 2 or 4)
 *             through BAR1 (ports) and BAR0 (memory), moves both BARs to newio= /
 *             newmem=, reads at the old and the new places, then reads=N times at the
 *             old places (nothing there: all ones), then moves them back.
 *  sweep=N    one byte write and one read at each of N ports from 0x2000, and one
 *             read at each of N MMIO addresses from 0xFEB10000 (claimed by nothing):
 *             a hostile guest probing everything.
 *  cmos=N     N rounds of: the memory size above 16 MiB from CMOS 0x34/0x35, and a
 *             byte written to NVRAM 0x50 and read back, through the index port
 *             0x70 (whose writes KVM queues) and the data port 0x71.
 *  echo=N     N rounds of writes and reads of every size at port= (default 0x300) and
 *             at MMIO mmioecho= (default 0xFEB20000), where the test places a device
 *             whose every read answers its last value plus one (sized to the read);
 *             then a rep outsb and a rep insb of 16 bytes at the port. Counts the
 *             wrong answers; the test checks the writes the device saw.
 */
#include "guest.h"
#include "virtio_pci.h"

static uint8_t mem8(uint64_t addr) { return *(volatile uint8_t *)addr; }

static void barmove(void)
{
    uint16_t newio = (uint16_t)cmdline_get_u64("newio", 0xff00);
    uint32_t newmem = (uint32_t)cmdline_get_u64("newmem", 0xfeb00000u);
    uint64_t reads = cmdline_get_u64("reads", 1000);
    int slot;
    for (slot = 0; slot < 32; slot++)
        if (pci_read32(slot, 0) == (0x0005u << 16 | 0x1b36))
            break;
    if (slot == 32) {
        printf("barmove: no pci-testdev\n");
        return;
    }
    pci_write32(slot, 0x04, (pci_read32(slot, 0x04) & 0xffff) | 0x3);   /* I/O + memory */
    uint32_t bar0 = pci_read32(slot, 0x10), bar1 = pci_read32(slot, 0x14);
    uint16_t oldio = (uint16_t)(bar1 & ~0x3u);
    uint32_t oldmem = bar0 & ~0xfu;
    outb(oldio, 0);                                   /* select test 0 on both BARs */
    *(volatile uint8_t *)(uintptr_t)oldmem = 0;
    printf("barmove: io %x mem %x before: io %02x mem %02x\n", oldio, oldmem, inb(oldio + 1), mem8(oldmem + 1));
    pci_write32(slot, 0x14, newio);
    pci_write32(slot, 0x10, newmem);
    /* The first accesses right after the BAR writes: the map must be current already. */
    uint8_t old_io = inb(oldio + 1), old_mem = mem8(oldmem + 1);
    uint8_t new_io = inb(newio + 1), new_mem = mem8(newmem + 1);
    printf("barmove: moved: old io %02x mem %02x, new io %02x mem %02x\n", old_io, old_mem, new_io, new_mem);
    uint64_t ones = 0;
    for (uint64_t i = 0; i < reads; i++) {
        ones += inb(oldio + 1) == 0xff;
        ones += mem8(oldmem + 1) == 0xff;
    }
    printf("barmove: %lu of %lu reads at the old places were all ones\n", ones, 2 * reads);
    pci_write32(slot, 0x14, bar1);
    pci_write32(slot, 0x10, bar0);
    printf("barmove: back: io %02x mem %02x, new places io %02x mem %02x\n",
           inb(oldio + 1), mem8(oldmem + 1), inb(newio + 1), mem8(newmem + 1));
}

static void sweep(uint64_t n)
{
    uint64_t ones = 0;
    for (uint64_t i = 0; i < n; i++) {
        outb((uint16_t)(0x2000 + i), (uint8_t)i);
        ones += inb((uint16_t)(0x2000 + i)) == 0xff;
        ones += *(volatile uint32_t *)(uintptr_t)(0xFEB10000u + 4 * i) == 0xffffffffu;
    }
    printf("sweep: %lu of %lu reads were all ones\n", ones, 2 * n);
}

static uint8_t cmos_read(uint8_t index)
{
    outb(0x70, index);
    return inb(0x71);
}

static void cmos(uint64_t n)
{
    uint64_t bad = 0;
    uint32_t size = 0;
    for (uint64_t i = 0; i < n; i++) {
        size = cmos_read(0x34) | (uint32_t)cmos_read(0x35) << 8;
        outb(0x70, 0x50);
        outb(0x71, (uint8_t)i);
        bad += cmos_read(0x50) != (uint8_t)i;
    }
    printf("cmos: above 16M %u x 64K, %lu of %lu NVRAM read-backs wrong\n", size, bad, n);
}

static void echo(uint64_t n)
{
    uint16_t port = (uint16_t)cmdline_get_u64("port", 0x300);
    uintptr_t mem = (uintptr_t)cmdline_get_u64("mmioecho", 0xFEB20000u);
    uint64_t bad = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = i * 0x9E3779B97F4A7C15ull;
        outb(port, (uint8_t)v);
        bad += inb(port) != (uint8_t)(v + 1);
        outw(port, (uint16_t)v);
        bad += inw(port) != (uint16_t)(v + 1);
        outl(port, (uint32_t)v);
        bad += inl(port) != (uint32_t)(v + 1);
        *(volatile uint8_t *)mem = (uint8_t)v;
        bad += *(volatile uint8_t *)mem != (uint8_t)(v + 1);
        *(volatile uint16_t *)mem = (uint16_t)v;
        bad += *(volatile uint16_t *)mem != (uint16_t)(v + 1);
        *(volatile uint32_t *)mem = (uint32_t)v;
        bad += *(volatile uint32_t *)mem != (uint32_t)(v + 1);
        *(volatile uint64_t *)mem = v;
        bad += *(volatile uint64_t *)mem != v + 1;
    }
    uint8_t buf[16];
    for (int i = 0; i < 16; i++)
        buf[i] = (uint8_t)(0xA0 + i);
    const uint8_t *src = buf;
    uint64_t count = 16;
    __asm__ volatile("rep outsb" : "+S"(src), "+c"(count) : "d"(port) : "memory");
    uint8_t *dst = buf;
    count = 16;
    __asm__ volatile("rep insb" : "+D"(dst), "+c"(count) : "d"(port) : "memory");
    for (int i = 0; i < 16; i++)            /* the device's last value was 0xAF */
        bad += buf[i] != (uint8_t)(0xB0 + i);
    printf("echo: %lu rounds, %lu wrong answers\n", n, bad);
}

int guest_main(const struct hvm_start_info *si)
{
    uint64_t rounds = cmdline_get_u64("cmos", 0);
    if (rounds)
        cmos(rounds);
    if (cmdline_get_u64("barmove", 0))
        barmove();
    uint64_t echoes = cmdline_get_u64("echo", 0);
    if (echoes)
        echo(echoes);
    uint64_t n = cmdline_get_u64("sweep", 0);
    if (n)
        sweep(n);
    return 0;
}
