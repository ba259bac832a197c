/*
 * External interrupts through the IOAPIC to the BSP's LAPIC.
 *  default: COM1 (ISA IRQ 4) receive interrupts; prints "irq: ready", then echoes
 *           every received character as "got: X" (non-printables as "got: 0xNN")
 *           and exits 0 on 'q'.
 *  pit=1:   PIT channel 0 at 100 Hz on ISA IRQ 0 (IOAPIC pin 2 on PCs); counts 10
 *           ticks, prints "pit ticks: 10", exits 0.
 *  tx=N:    interrupt-driven transmit as Linux's 8250 tty does: N lines
 *           "tx NNNN abc...xyz" handed to THR up to 16 bytes per THRE interrupt; with
 *           txloop=1 (default) the handler reads IIR again until it reports nothing,
 *           as Linux's does; txloop=0 leaves after one round and waits in hlt.
 * ISA IRQ -> GSI comes from the MADT's source overrides; without a MADT the PC
 * defaults (IRQ0 -> pin 2, others identity) and IOAPIC_BASE are assumed.
 */
#include "guest.h"

#define VEC_COM1 0x40
#define VEC_PIT 0x41
#define PIT_HZ 100
#define PIT_TICKS 10

static struct madt_info madt;
static uintptr_t ioapic;
static uint32_t pit_pin;
static volatile uint32_t ticks;
static volatile uint32_t uart_irqs;
static volatile uint8_t rx[256];
static volatile uint32_t rx_head, rx_tail;

static void com1_irq(struct trap_frame *f)
{
    int c;
    while ((c = serial_getc_nowait()) >= 0) {
        if (rx_head - rx_tail < sizeof(rx))
            rx[rx_head++ % sizeof(rx)] = (uint8_t)c;
    }
    uart_irqs++;
    lapic_eoi();
}

static void pit_irq(struct trap_frame *f)
{
    /* Stop at exactly PIT_TICKS however late the main loop looks. */
    if (ticks < PIT_TICKS && ++ticks == PIT_TICKS)
        ioapic_mask(ioapic, pit_pin, true);
    lapic_eoi();
}

static uint32_t isa_pin(uint32_t irq, uint16_t *flags);

static char tx_buf[64 * 1024];
static volatile uint32_t tx_len, tx_pos;
static int tx_loop = 1;

/* One THRE round: up to a FIFO's worth of bytes; THRI off once all are out. */
static void com1_tx_irq(struct trap_frame *f)
{
    for (;;) {
        uint8_t iir = inb(COM1_BASE + UART_IIR);
        if (iir & 0x01)
            break;
        if ((iir & 0x0E) == 0x02) {
            for (int i = 0; i < 16 && tx_pos < tx_len; i++)
                outb(COM1_BASE + UART_THR, (uint8_t)tx_buf[tx_pos++]);
            if (tx_pos == tx_len)
                outb(COM1_BASE + UART_IER, 0x00);
        }
        if (!tx_loop)
            break;
    }
    uart_irqs++;
    lapic_eoi();
}

static int tx_test(uint32_t bsp, uint32_t lines)
{
    uint16_t flags;
    uint32_t pin = isa_pin(4, &flags);
    tx_loop = (int)cmdline_get_u64("txloop", 1);
    uint32_t len = 0;
    for (uint32_t i = 0; i < lines && len + 40 < sizeof(tx_buf); i++)
        len += (uint32_t)snprintf(tx_buf + len, sizeof(tx_buf) - len, "tx %04u abcdefghijklmnopqrstuvwxyz\r\n", i);
    tx_len = len;
    idt_set_handler(VEC_COM1, com1_tx_irq);
    ioapic_route(ioapic, pin, VEC_COM1, bsp, flags);
    uint64_t start = rdtsc();
    outb(COM1_BASE + UART_IER, 0x02);   /* THRI: the interrupt comes at once, THR being empty */
    irq_disable();
    while (tx_pos < tx_len)
        irq_enable_and_halt();
    irq_disable();
    ioapic_mask(ioapic, pin, true);
    printf("irq: tx %u bytes in %u interrupts, %lu tsc cycles\n", tx_len, uart_irqs, rdtsc() - start);
    return 0;
}

static uint32_t isa_pin(uint32_t irq, uint16_t *flags)
{
    *flags = madt.isa_flags[irq];
    return madt.isa_gsi[irq] - madt.ioapic_gsi_base;
}

static int pit_test(uint32_t bsp)
{
    uint16_t flags;
    pit_pin = isa_pin(0, &flags);
    printf("irq: pit on ioapic pin %u vector 0x%x\n", pit_pin, VEC_PIT);
    idt_set_handler(VEC_PIT, pit_irq);
    uint32_t divisor = (1193182 + PIT_HZ / 2) / PIT_HZ;
    outb(0x43, 0x34);                   /* channel 0, lo/hi byte, mode 2, binary */
    outb(0x40, divisor & 0xFF);
    outb(0x40, divisor >> 8);
    uint64_t start = rdtsc();
    ioapic_route(ioapic, pit_pin, VEC_PIT, bsp, flags);
    while (ticks < PIT_TICKS)
        irq_enable_and_halt();
    irq_disable();
    printf("pit ticks: %u\n", ticks);
    printf("irq: %lu tsc cycles for %u ticks\n", rdtsc() - start, PIT_TICKS);
    return 0;
}

static int echo_test(uint32_t bsp)
{
    uint16_t flags;
    uint32_t pin = isa_pin(4, &flags);
    printf("irq: com1 on ioapic pin %u vector 0x%x\n", pin, VEC_COM1);
    idt_set_handler(VEC_COM1, com1_irq);
    ioapic_route(ioapic, pin, VEC_COM1, bsp, flags);
    outb(COM1_BASE + UART_IER, 0x01);   /* received data available */
    puts("irq: ready");
    for (;;) {
        irq_disable();
        while (rx_tail != rx_head) {
            uint8_t c = rx[rx_tail++ % sizeof(rx)];
            if (c >= 0x20 && c < 0x7F)
                printf("got: %c\n", c);
            else
                printf("got: 0x%02x\n", c);
            if (c == 'q') {
                outb(COM1_BASE + UART_IER, 0x00);
                ioapic_mask(ioapic, pin, true);
                printf("irq: %u uart interrupts\n", uart_irqs);
                return 0;
            }
        }
        irq_enable_and_halt();
    }
}

int guest_main(const struct hvm_start_info *si)
{
    pic_disable();
    lapic_enable();
    uint32_t bsp = lapic_id();
    if (!madt_parse(si, &madt, false) || !madt.ioapic_addr) {
        printf("irq: no usable MADT, assuming IOAPIC at 0x%x and PC ISA routing\n", IOAPIC_BASE);
        madt.ioapic_addr = IOAPIC_BASE;
        madt.ioapic_gsi_base = 0;
        for (uint32_t irq = 0; irq < 16; irq++)
            madt.isa_gsi[irq] = irq;
        madt.isa_gsi[0] = 2;
    }
    ioapic = madt.ioapic_addr;
    uint32_t pins = ioapic_max_redirect(ioapic) + 1;
    printf("irq: ioapic at 0x%lx with %u pins, bsp apic id %u\n", (uint64_t)ioapic, pins, bsp);
    if (cmdline_get_u64("pit", 0))
        return pit_test(bsp);
    uint64_t lines = cmdline_get_u64("tx", 0);
    if (lines)
        return tx_test(bsp, (uint32_t)lines);
    return echo_test(bsp);
}
