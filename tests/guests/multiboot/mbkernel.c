/*
 * A multiboot (v1) test kernel, 32-bit and freestanding (kvm-unit-tests style): it
 * checks what the loader handed over (EAX magic, protected mode without paging or
 * interrupts, the boot information: memory, command line, modules,
 * memory map, loader name), prints it on COM1 and leaves through the debug-exit port
 * 0xf4 with `code=N` from its command line plus the number of failed checks.
 */
#include <stdint.h>

#define MB_BOOTLOADER_MAGIC 0x2BADB002u
#define COM1 0x3f8
#define EXIT_PORT 0xf4

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name;
};

struct mb_module {
    uint32_t mod_start, mod_end, string, reserved;
};

struct mb_mmap {
    uint32_t size;
    uint64_t addr, len;
    uint32_t type;
} __attribute__((packed));

extern uint32_t entry_eax, entry_ebx, entry_eflags, entry_cr0;
extern uint16_t entry_cs, entry_ds;
extern char __load_start[], __bss_end[];

static int failures;

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc(char c)
{
    if (c == '\n')
        putc('\r');
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void putu(uint32_t v)
{
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do {
        buf[--i] = '0' + v % 10;
        v /= 10;
    } while (v);
    puts(buf + i);
}

static void putx(uint32_t v)
{
    puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

static void check(int ok, const char *what)
{
    if (!ok) {
        puts("multiboot: FAIL ");
        puts(what);
        putc('\n');
        failures++;
    }
}

static uint32_t cmdline_code(const char *s)
{
    for (; *s; s++) {
        if ((s[0] == ' ' || s == (const char *)0) && s[1] == 'c' && s[2] == 'o' && s[3] == 'd' && s[4] == 'e' &&
            s[5] == '=') {
            uint32_t v = 0;
            for (s += 6; *s >= '0' && *s <= '9'; s++)
                v = v * 10 + (*s - '0');
            return v;
        }
    }
    return 0;
}

void mb_main(void)
{
    const struct mb_info *mbi = (const struct mb_info *)entry_ebx;

    outb(COM1 + 3, 0x80);        /* 115200 8N1 */
    outb(COM1 + 0, 1);
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03);
    puts("multiboot: magic ");
    putx(entry_eax);
    putc('\n');
    check(entry_eax == MB_BOOTLOADER_MAGIC, "EAX is not 0x2badb002");
    puts("multiboot: cr0.pe ");
    putu(entry_cr0 & 1);
    puts(" cr0.pg ");
    putu(entry_cr0 >> 31);
    puts(" eflags.if ");
    putu((entry_eflags >> 9) & 1);
    puts(" eflags.vm ");
    putu((entry_eflags >> 17) & 1);
    putc('\n');
    check((entry_cr0 & 1) && !(entry_cr0 >> 31) && !(entry_eflags & (1u << 9 | 1u << 17)), "machine state");

    uint32_t want = 1u << 0 | 1u << 2 | 1u << 3 | 1u << 6;      /* memory, cmdline, mods, mmap */
    puts("multiboot: info flags have memory, cmdline, mods, mmap: ");
    putu((mbi->flags & want) == want);
    putc('\n');
    check((mbi->flags & want) == want, "info flags");
    puts("multiboot: mem_lower in 639..640 ");
    putu(mbi->mem_lower == 639 || mbi->mem_lower == 640);
    puts(" mem_upper ");
    putu(mbi->mem_upper);
    putc('\n');
    const char *cmdline = (const char *)mbi->cmdline;
    puts("multiboot: cmdline \"");
    puts(cmdline);
    puts("\"\n");
    puts("multiboot: modules ");
    putu(mbi->mods_count);
    putc('\n');
    const struct mb_module *mods = (const struct mb_module *)mbi->mods_addr;
    for (uint32_t i = 0; i < mbi->mods_count && i < 16; i++) {
        uint32_t size = mods[i].mod_end - mods[i].mod_start;
        puts("multiboot: module ");
        putu(i);
        puts(" page-aligned ");
        putu((mods[i].mod_start & 0xfff) == 0);
        puts(" after the kernel ");
        putu(mods[i].mod_start >= (uint32_t)__bss_end);
        puts(" size ");
        putu(size);
        puts(" cmdline \"");
        puts((const char *)mods[i].string);
        puts("\" data \"");
        const char *data = (const char *)mods[i].mod_start;
        for (uint32_t j = 0; j < size && j < 40; j++)
            putc(data[j] >= ' ' && data[j] < 127 ? data[j] : '.');
        puts("\"\n");
        check((mods[i].mod_start & 0xfff) == 0 && mods[i].mod_start >= (uint32_t)__bss_end, "module placement");
    }
    int covered = 0;
    uint32_t ram_kb = 0;
    for (uint32_t off = 0; off < mbi->mmap_length;) {
        const struct mb_mmap *e = (const struct mb_mmap *)(mbi->mmap_addr + off);
        if (e->type == 1 && e->addr <= (uint32_t)__load_start && e->addr + e->len >= (uint32_t)__bss_end)
            covered = 1;
        if (e->type == 1 && e->addr >= 0x100000 && e->addr < 0x100000000ull)
            ram_kb += (uint32_t)(e->len >> 10);
        off += e->size + 4;
    }
    puts("multiboot: mmap has RAM under the kernel ");
    putu(covered);
    puts(", RAM above 1 MiB (KiB, rounded to MiB) ");
    putu(ram_kb >> 10 << 10);
    putc('\n');
    check(covered, "memory map");
    if (mbi->flags & (1u << 9)) {
        puts("multiboot: loader ");
        puts((const char *)mbi->boot_loader_name);
        putc('\n');
    }
    uint32_t code = cmdline_code(cmdline) + failures;
    puts("multiboot: exit ");
    putu(code);
    putc('\n');
    outl(EXIT_PORT, code);
}
