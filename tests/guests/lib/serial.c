#include "guest.h"

static spinlock_t console_lock = SPINLOCK_INIT;

void serial_init(void)
{
    outb(COM1_BASE + UART_IER, 0x00);
    outb(COM1_BASE + UART_LCR, 0x80);   /* DLAB */
    outb(COM1_BASE + 0, 0x01);          /* divisor 1: 115200 baud */
    outb(COM1_BASE + 1, 0x00);
    outb(COM1_BASE + UART_LCR, 0x03);   /* 8N1 */
    /* FIFO on and cleared, RX trigger at 1 byte so each character interrupts
     * without relying on the character-timeout interrupt. */
    outb(COM1_BASE + UART_FCR, 0x07);
    outb(COM1_BASE + UART_MCR, 0x0B);   /* DTR, RTS, OUT2 (gates the IRQ line on PCs) */
}

void serial_putc(char c)
{
    /* Bounded: a UART that never reports THRE must not hang the guest. */
    for (int i = 0; i < 100000; i++) {
        if (inb(COM1_BASE + UART_LSR) & UART_LSR_THRE)
            break;
        cpu_relax();
    }
    outb(COM1_BASE + UART_THR, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
    spin_lock(&console_lock);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n')
            serial_putc('\r');
        serial_putc(s[i]);
    }
    spin_unlock(&console_lock);
}

int serial_getc_nowait(void)
{
    if (inb(COM1_BASE + UART_LSR) & UART_LSR_DR)
        return inb(COM1_BASE + UART_RBR);
    return -1;
}
