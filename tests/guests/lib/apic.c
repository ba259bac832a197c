#include "guest.h"

uint32_t lapic_id(void)
{
    return lapic_read(LAPIC_ID) >> 24;
}

void lapic_enable(void)
{
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | LAPIC_SPURIOUS_VECTOR);
}

void lapic_eoi(void)
{
    lapic_write(LAPIC_EOI, 0);
}

static bool lapic_wait_idle(void)
{
    for (int i = 0; i < 100000; i++) {
        if (!(lapic_read(LAPIC_ICR_LO) & (1u << 12)))    /* delivery status: send pending */
            return true;
        cpu_relax();
    }
    return false;
}

bool lapic_send_ipi(uint32_t apic_id, uint32_t icr_low)
{
    if (!lapic_wait_idle())
        return false;
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr_low);     /* the low write sends */
    return lapic_wait_idle();
}

bool lapic_start_ap(uint32_t apic_id, uint32_t start_paddr)
{
    if (start_paddr & 0xFFF || start_paddr >= 0x100000)
        panic("lapic_start_ap: start address 0x%x is not a page below 1 MiB", start_paddr);
    /* The MP spec's 10 ms / 200 us waits matter to real hardware only; a short pause
     * keeps the sequence recognisable without slowing emulated runs down. */
    if (!lapic_send_ipi(apic_id, 0x00004500))           /* INIT, level assert */
        return false;
    delay_cycles(100000);
    for (int i = 0; i < 2; i++) {
        if (!lapic_send_ipi(apic_id, 0x00004600 | (start_paddr >> 12)))   /* STARTUP */
            return false;
        delay_cycles(20000);
    }
    return true;
}

uint32_t ioapic_read(uintptr_t base, uint32_t reg)
{
    mmio_write32(base, reg);
    return mmio_read32(base + 0x10);
}

void ioapic_write(uintptr_t base, uint32_t reg, uint32_t v)
{
    mmio_write32(base, reg);
    mmio_write32(base + 0x10, v);
}

uint32_t ioapic_max_redirect(uintptr_t base)
{
    return (ioapic_read(base, 0x01) >> 16) & 0xFF;
}

void ioapic_route(uintptr_t base, uint32_t pin, uint8_t vector, uint32_t dest_apic_id, uint16_t flags)
{
    uint32_t lo = vector;                       /* fixed delivery, physical destination */
    if ((flags & 3) == 3)
        lo |= 1u << 13;                         /* active low */
    if (((flags >> 2) & 3) == 3)
        lo |= 1u << 15;                         /* level triggered */
    ioapic_write(base, 0x10 + 2 * pin, lo | (1u << 16));   /* masked while half written */
    ioapic_write(base, 0x11 + 2 * pin, dest_apic_id << 24);
    ioapic_write(base, 0x10 + 2 * pin, lo);
}

void ioapic_mask(uintptr_t base, uint32_t pin, bool masked)
{
    uint32_t lo = ioapic_read(base, 0x10 + 2 * pin);
    lo = masked ? (lo | (1u << 16)) : (lo & ~(1u << 16));
    ioapic_write(base, 0x10 + 2 * pin, lo);
}

void pic_disable(void)
{
    /* Reinitialise so a stray or spurious 8259 interrupt lands on 0x20-0x2f rather
     * than on an exception vector, then mask every line. */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 0x20);
    outb(0xA1, 0x28);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}
