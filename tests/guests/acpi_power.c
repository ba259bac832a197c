/*
 * Handles the ACPI power button like an OS: finds the FADT's PM1 blocks and SCI,
 * the DSDT's \_S5 sleep type, routes the SCI through the IOAPIC, enables the
 * power-button event, prints "acpi: waiting for power button" and halts. On the
 * button it prints "acpi: power button pressed" and enters S5 (soft off).
 */
#include "guest.h"

#define VEC_SCI 0x42
#define PWRBTN (1u << 8)
#define SLP_EN (1u << 13)

static uint16_t pm1_evt, pm1_cnt, pm1_en;
static volatile uint32_t pressed;
static uintptr_t ioapic;

static void sci_irq(struct trap_frame *f)
{
    uint16_t sts = inw(pm1_evt);
    if (sts & PWRBTN) {
        outw(pm1_evt, PWRBTN);      /* write-1-to-clear */
        pressed = 1;
    }
    lapic_eoi();
}

/* \_S5 is "Name(_S5_, Package(){SLP_TYPa, ...})": 08 '_S5_' 12 len n <value> */
static int s5_sleep_type(const struct acpi_sdt_header *dsdt)
{
    const uint8_t *p = (const uint8_t *)dsdt, *end = p + dsdt->length;
    for (; p + 8 < end; p++) {
        if (memcmp(p, "_S5_", 4) != 0 || p[4] != 0x12)
            continue;
        const uint8_t *q = p + 5;
        q += 1 + (*q >> 6);         /* PkgLength: extra bytes in bits 7:6 */
        q += 1;                     /* NumElements */
        if (*q == 0x0A)             /* BytePrefix */
            return q[1];
        if (*q == 0x00 || *q == 0x01)
            return *q;              /* ZeroOp / OneOp */
        return *q;
    }
    return -1;
}

int guest_main(const struct hvm_start_info *si)
{
    struct madt_info madt;
    pic_disable();
    lapic_enable();
    const void *rsdp = acpi_find_rsdp(si);
    const struct acpi_sdt_header *fadt = rsdp ? acpi_find_table(rsdp, "FACP") : NULL;
    if (!fadt || !madt_parse(si, &madt, false)) {
        puts("acpi: no FADT/MADT");
        return 1;
    }
    const uint8_t *f = (const uint8_t *)fadt;
    uint16_t sci;
    uint32_t evt, cnt, dsdt_addr;
    memcpy(&sci, f + 46, 2);
    memcpy(&evt, f + 56, 4);
    memcpy(&cnt, f + 64, 4);
    memcpy(&dsdt_addr, f + 40, 4);
    uint8_t evt_len = f[88];
    pm1_evt = evt;
    pm1_cnt = cnt;
    pm1_en = evt + evt_len / 2;
    int slp_typ = s5_sleep_type((const struct acpi_sdt_header *)(uintptr_t)dsdt_addr);
    printf("acpi: pm1_evt 0x%x pm1_cnt 0x%x sci %u s5 %d\n", pm1_evt, pm1_cnt, sci, slp_typ);
    if (slp_typ < 0)
        return 1;
    ioapic = madt.ioapic_addr ? madt.ioapic_addr : IOAPIC_BASE;
    uint32_t pin = madt.isa_gsi[sci] - madt.ioapic_gsi_base;
    idt_set_handler(VEC_SCI, sci_irq);
    ioapic_route(ioapic, pin, VEC_SCI, lapic_id(), madt.isa_flags[sci]);
    outw(pm1_evt, 0xFFFF);          /* clear stale status */
    outw(pm1_en, PWRBTN);
    puts("acpi: waiting for power button");
    while (!pressed)
        irq_enable_and_halt();
    irq_disable();
    puts("acpi: power button pressed");
    outw(pm1_cnt, (uint16_t)((slp_typ << 10) | SLP_EN));
    puts("acpi: still running after S5");
    return 1;
}
