/*
 * The standard VGA (PCI 1234:1111) as a driver without a BIOS drives it, in the
 * phase the command line names (tests/test_vga.py computes the expected pictures
 * from the same rules):
 *
 *   phase=text  80x25 text at 0xB8000: cell i holds character 0x20 + i % 95 with
 *               attribute (i * 13) & 0xff; the cursor at row 5 column 10, scan
 *               lines 14-15. Prints "vga: text ready".
 *   phase=vbe   finds the VGA on PCI bus 0, checks the dispi ID through ports
 *               0x1CE/0x1CF and through BAR2's MMIO copy, sets 640x480x32 with the
 *               linear framebuffer and draws pixel (x, y) = R x & 0xff, G y & 0xff,
 *               B (x + y) & 0xff in BAR0. Prints "vga: vbe ready".
 *   phase=kbd   draws the text of phase=text, then reads count=N bytes from the
 *               i8042 (polling, translation on as a PC boots) and prints each as
 *               "kbd: XX".
 *   phase=anim  the VBE mode of phase=vbe, then a new frame forever (the pattern
 *               moved one pixel a frame): what bench/display.py watches a viewer
 *               receive. Prints "vga: anim running".
 *   phase=mouse enables the AUX port and the mouse's streaming, then prints
 *               count=N AUX bytes as "aux: XX".
 *
 * After "ready" the display phases wait (halted) until the test has looked.
 */
#include "guest.h"
#include "lib/virtio_pci.h"

#define VBE_INDEX 0x1ce
#define VBE_DATA  0x1cf

static void vbe_write(uint16_t index, uint16_t value) { outw(VBE_INDEX, index); outw(VBE_DATA, value); }
static uint16_t vbe_read(uint16_t index) { outw(VBE_INDEX, index); return inw(VBE_DATA); }

static void wait_forever(void)
{
    for (;;)
        cpu_halt();
}

static int find_vga(void)
{
    for (int slot = 0; slot < 32; slot++)
        if (pci_read32(slot, 0) == 0x11111234u)
            return slot;
    return -1;
}

static void draw_text(void)
{
    volatile uint16_t *text = (volatile uint16_t *)0xb8000;
    for (int i = 0; i < 80 * 25; i++)
        text[i] = (uint16_t)((0x20 + i % 95) | (((i * 13) & 0xff) << 8));
    uint16_t cursor = 5 * 80 + 10;
    outb(0x3d4, 0x0a); outb(0x3d5, 14);
    outb(0x3d4, 0x0b); outb(0x3d5, 15);
    outb(0x3d4, 0x0e); outb(0x3d5, cursor >> 8);
    outb(0x3d4, 0x0f); outb(0x3d5, cursor & 0xff);
}

static int phase_text(void)
{
    volatile uint16_t *text = (volatile uint16_t *)0xb8000;
    draw_text();
    if (text[0] != (0x20 | (0 << 8)) || text[81] != ((0x20 + 81 % 95) | (((81 * 13) & 0xff) << 8))) {
        printf("vga: text memory reads back wrong: %x %x\n", text[0], text[81]);
        return 1;
    }
    printf("vga: text ready\n");
    wait_forever();
    return 0;
}

static volatile uint32_t *setup_vbe(void)
{
    int slot = find_vga();
    if (slot < 0)
        return 0;
    pci_write32(slot, 0x04, pci_read32(slot, 0x04) | 0x3);
    vbe_write(4, 0);
    vbe_write(1, 640);
    vbe_write(2, 480);
    vbe_write(3, 32);
    vbe_write(4, 0x41);
    return (volatile uint32_t *)(uintptr_t)(pci_read32(slot, 0x10) & ~0xfu);
}

static int phase_anim(void)
{
    volatile uint32_t *pixels = setup_vbe();
    if (!pixels)
        return 1;
    printf("vga: anim running\n");
    for (uint32_t frame = 0;; frame++)
        for (uint32_t y = 0; y < 480; y++)
            for (uint32_t x = 0; x < 640; x++)
                pixels[y * 640 + x] = (((x + frame) & 0xff) << 16) | ((y & 0xff) << 8) | ((x + y + frame) & 0xff);
    return 0;
}

static int phase_vbe(void)
{
    int slot = find_vga();
    if (slot < 0) {
        printf("vga: no 1234:1111 on PCI bus 0\n");
        return 1;
    }
    pci_write32(slot, 0x04, pci_read32(slot, 0x04) | 0x3);      /* I/O and memory decoding */
    uintptr_t fb = pci_read32(slot, 0x10) & ~0xfu;
    uintptr_t mmio = pci_read32(slot, 0x18) & ~0xfu;
    vbe_write(0, 0xb0c5);
    uint16_t id = vbe_read(0);
    uint16_t mmio_id = r16(mmio + 0x500);
    printf("vga: slot %d fb %lx mmio %lx id %x mmio-id %x\n", slot, (unsigned long)fb, (unsigned long)mmio,
           id, mmio_id);
    if (id != 0xb0c5 || mmio_id != 0xb0c5)
        return 1;
    vbe_write(4, 0);                     /* disabled while the mode changes */
    vbe_write(1, 640);
    vbe_write(2, 480);
    w16(mmio + 0x500 + 2 * 3, 32);       /* bpp through the MMIO registers */
    vbe_write(4, 0x41);                  /* enabled, linear framebuffer */
    if (vbe_read(1) != 640 || vbe_read(3) != 32 || vbe_read(4) != 0x41) {
        printf("vga: mode reads back %u x %u x %u enable %x\n", vbe_read(1), vbe_read(2), vbe_read(3), vbe_read(4));
        return 1;
    }
    volatile uint32_t *pixels = (volatile uint32_t *)fb;
    for (uint32_t y = 0; y < 480; y++)
        for (uint32_t x = 0; x < 640; x++)
            pixels[y * 640 + x] = ((x & 0xff) << 16) | ((y & 0xff) << 8) | ((x + y) & 0xff);
    if (pixels[479 * 640 + 639] != ((639u & 0xff) << 16 | (479u & 0xff) << 8 | ((639u + 479u) & 0xff))) {
        printf("vga: framebuffer reads back %x\n", pixels[479 * 640 + 639]);
        return 1;
    }
    printf("vga: vbe ready\n");
    wait_forever();
    return 0;
}

static int read_i8042(bool aux)
{
    for (uint64_t spins = 0; spins < 4000000000ull; spins++) {
        uint8_t status = inb(0x64);
        if (status & 1) {
            uint8_t value = inb(0x60);
            if (!!(status & 0x20) == aux)
                return value;
        }
        cpu_relax();
    }
    return -1;
}

static int phase_kbd(void)
{
    uint64_t count = cmdline_get_u64("count", 1);
    draw_text();                            /* something to look at meanwhile */
    printf("kbd: listening\n");
    for (uint64_t i = 0; i < count; i++) {
        int value = read_i8042(false);
        if (value < 0)
            return 1;
        printf("kbd: %02x\n", value);
    }
    return 0;
}

static int phase_mouse(void)
{
    uint64_t count = cmdline_get_u64("count", 3);
    outb(0x64, 0xa8);                       /* AUX interface on */
    outb(0x64, 0xd4); outb(0x60, 0xf4);     /* the mouse: start streaming */
    if (read_i8042(true) != 0xfa) {
        printf("aux: no acknowledge\n");
        return 1;
    }
    printf("aux: listening\n");
    for (uint64_t i = 0; i < count; i++) {
        int value = read_i8042(true);
        if (value < 0)
            return 1;
        printf("aux: %02x\n", value);
    }
    return 0;
}

int guest_main(const struct hvm_start_info *si)
{
    char phase[16];
    if (!cmdline_get("phase", phase, sizeof phase))
        memcpy(phase, "text", 5);
    if (!strcmp(phase, "text"))
        return phase_text();
    if (!strcmp(phase, "vbe"))
        return phase_vbe();
    if (!strcmp(phase, "kbd"))
        return phase_kbd();
    if (!strcmp(phase, "mouse"))
        return phase_mouse();
    if (!strcmp(phase, "anim"))
        return phase_anim();
    printf("vga: unknown phase %s\n", phase);
    return 1;
}
