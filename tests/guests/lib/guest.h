/*
 * Support library for kvmpy's test guests.  A guest is one tests/guests/NAME.c
 * that includes "guest.h" and defines
 *
 *     int guest_main(const struct hvm_start_info *si);
 *
 * which runs in 64-bit long mode, ring 0, interrupts off, on a 64 KiB stack, with
 * COM1 initialised, an IDT installed (unexpected vectors print and exit with
 * GUEST_EXIT_EXCEPTION) and the first 4 GiB identity mapped.  Returning 0 prints
 * "guest: done" and exits 0; returning N prints "guest: exit N" and exits N.
 */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "layout.h"

/* ---- exit codes (QEMU's isa-debug-exit turns code N into process status 2N+1) */
#define GUEST_EXIT_OK        0
#define GUEST_EXIT_FAIL      1   /* the guest's own check failed */
#define GUEST_EXIT_PANIC     2   /* panic(): broken environment (bad start info, ...) */
#define GUEST_EXIT_EXCEPTION 3   /* unexpected exception or interrupt */

#define GUEST_EXIT_PORT 0xf4

/* ---- PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h) */
struct hvm_start_info {
    uint32_t magic;             /* PVH_START_MAGIC */
    uint32_t version;           /* 0 or 1; memmap_* exist from version 1 */
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;     /* NUL-terminated, 0 if none */
    uint64_t rsdp_paddr;        /* 0 if the loader did not say */
    uint64_t memmap_paddr;
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;              /* E820 numbering: 1 ram, 2 reserved, 3 acpi, 4 nvs, 5 unusable, 7 pmem */
    uint32_t reserved;
};

struct hvm_modlist_entry {
    uint64_t paddr;
    uint64_t size;
    uint64_t cmdline_paddr;
    uint64_t reserved;
};

extern const struct hvm_start_info *start_info;   /* as handed over in %ebx */

int guest_main(const struct hvm_start_info *si);

/* ---- exit */
__attribute__((noreturn)) void guest_exit(uint32_t code);
__attribute__((noreturn, format(printf, 1, 2))) void panic(const char *fmt, ...);
#define GUEST_ASSERT(cond) do { if (!(cond)) panic("assertion failed: %s (%s:%d)", #cond, __FILE__, __LINE__); } while (0)

/* ---- port I/O and CPU primitives */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void mmio_write32(uintptr_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint32_t mmio_read32(uintptr_t addr) { return *(volatile uint32_t *)addr; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }
/* sti's one-instruction shadow means an interrupt pending here wakes the hlt. */
static inline void irq_enable_and_halt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void cpu_halt(void) { __asm__ volatile("hlt" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t rdmsr(uint32_t msr) {
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v) {
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}
static inline uint64_t read_cr0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr2(void) { uint64_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr3(uint64_t v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static inline uint64_t read_rflags(void) { uint64_t v; __asm__ volatile("pushfq; popq %0" : "=r"(v)); return v; }

struct cpuid_regs { uint32_t eax, ebx, ecx, edx; };
static inline struct cpuid_regs cpuid(uint32_t leaf, uint32_t subleaf) {
    struct cpuid_regs r;
    __asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(subleaf));
    return r;
}
/* Writes the 12-character vendor string and a NUL into out[13]. */
void cpuid_vendor(char out[13]);

/* ---- spinlock (xchg based; safe to use from any CPU) */
typedef struct { volatile uint32_t locked; } spinlock_t;
#define SPINLOCK_INIT { 0 }
void spin_lock(spinlock_t *lock);
void spin_unlock(spinlock_t *lock);

/* ---- string/memory (gcc may emit calls to the first four itself) */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* ---- serial console: COM1 0x3f8, 115200 8N1, FIFO with 1-byte RX trigger, polled TX.
 * '\n' goes out as "\r\n". */
#define COM1_BASE 0x3f8
#define UART_RBR 0  /* DLAB=0, read */
#define UART_THR 0  /* DLAB=0, write */
#define UART_IER 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_LSR_DR   0x01
#define UART_LSR_THRE 0x20
void serial_init(void);
void serial_putc(char c);               /* no locking, no "\n" translation */
void serial_write(const char *s, size_t n);  /* under the console lock */
int serial_getc_nowait(void);           /* -1 if nothing received */

/* ---- printf: %d %i %u %x %X %o %s %c %p %%, length l/ll/z, flags '-' '0', width,
 * precision for %s only (%.4s, %.*s).
 * One call's output is written atomically with respect to other CPUs. */
__attribute__((format(printf, 1, 2))) int printf(const char *fmt, ...);
int vprintf(const char *fmt, va_list ap);
__attribute__((format(printf, 3, 4))) int snprintf(char *buf, size_t size, const char *fmt, ...);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int puts(const char *s);                /* appends "\n" */

/* ---- PVH command line: space separated "key=value" or bare "key" tokens. */
const char *cmdline(void);              /* copy made at boot, "" if none */
/* Copies the value of key into buf (bare key: ""); false if key is absent. */
bool cmdline_get(const char *key, char *buf, size_t size);
bool cmdline_has(const char *key);
/* Decimal or 0x-hex value of key; bare key counts as 1; absent or malformed: dflt. */
uint64_t cmdline_get_u64(const char *key, uint64_t dflt);
bool parse_u64(const char *s, uint64_t *out);

/* ---- PVH memory map */
const char *memmap_type_name(uint32_t type);
void memmap_print(void);                /* one line per entry, e820 style */
uint64_t memmap_total_ram(void);        /* sum of type-1 entries */
bool memmap_is_ram(uint64_t addr, uint64_t len);

/* ---- interrupts and exceptions */
struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;   /* pushed by the CPU */
};
typedef void (*trap_handler_t)(struct trap_frame *frame);
/* Handlers may change frame->rip (to skip a faulting instruction) or any register. */
void idt_set_handler(uint8_t vector, trap_handler_t handler);
void idt_set_dpl(uint8_t vector, int dpl);      /* 3 lets ring 3 use "int vector" */
const char *exception_name(uint64_t vector);
void trap_frame_print(const struct trap_frame *frame);
extern uint8_t idt_descriptor[10];             /* for lidt on APs */

/* ---- paging: identity map of [0, 4 GiB) in 2 MiB pages, top GiB uncached. */
/* Sets or clears U on every 2 MiB page overlapping [start, end) below 4 GiB. */
void paging_set_user(uint64_t start, uint64_t end, bool user);
/* Maps one 2 MiB page anywhere in the lower canonical half (tables from a small pool). */
void paging_map_2m(uint64_t virt, uint64_t phys, uint64_t flags);
void paging_flush(void);
extern char __image_start[], __image_end[];

/* ---- ring 3.  run_user() calls fn(arg) in ring 3 (IF=0) on user_stack_top (which,
 * fn and everything fn touches must be in pages paging_set_user() made accessible)
 * and returns fn's result once it returns.  In ring 3, user_syscall(SYS_PUTC, c)
 * prints a character.  How ring 3 enters the kernel (user_set_entry):
 *   USER_ENTRY_SYSCALL  SYSCALL/SYSRET (default)
 *   USER_ENTRY_INT80    "int $0x80" through a DPL-3 interrupt gate
 *   USER_ENTRY_UD2      ud2, i.e. the #UD exception: works where a (software) KVM
 *                       mishandles SYSCALL or INT n from ring 3 */
#define USER_SYSCALL_VECTOR 0x80
#define SYS_EXIT 0
#define SYS_PUTC 1
enum user_entry { USER_ENTRY_SYSCALL = 0, USER_ENTRY_INT80 = 1, USER_ENTRY_UD2 = 2 };
uint64_t run_user(uint64_t (*fn)(uint64_t), uint64_t arg, void *user_stack_top);
void user_set_entry(enum user_entry how);
extern uint8_t user_entry_mode;
static inline uint64_t user_syscall(uint64_t nr, uint64_t arg) {
    uint64_t ret;
    if (user_entry_mode == USER_ENTRY_INT80)
        __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "D"(arg) : "memory");
    else if (user_entry_mode == USER_ENTRY_UD2)
        __asm__ volatile("ud2" : "=a"(ret) : "a"(nr), "D"(arg) : "memory");
    else
        __asm__ volatile("syscall" : "=a"(ret), "+D"(arg)
                         : "a"(nr) : "rcx", "rsi", "rdx", "r8", "r9", "r10", "r11", "memory");
    return ret;
}

/* ---- local APIC (xAPIC MMIO) and IOAPIC */
#define LAPIC_BASE   0xFEE00000u
#define IOAPIC_BASE  0xFEC00000u
#define LAPIC_ID     0x020
#define LAPIC_VER    0x030
#define LAPIC_TPR    0x080
#define LAPIC_EOI    0x0B0
#define LAPIC_SVR    0x0F0
#define LAPIC_ESR    0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR  0x390
#define LAPIC_TIMER_DIV  0x3E0
#define LAPIC_SPURIOUS_VECTOR 0xFF
static inline uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
uint32_t lapic_id(void);
void lapic_enable(void);                /* SVR: software enable, spurious vector 0xFF; TPR 0 */
void lapic_eoi(void);
/* Sends an IPI; false if the ICR stayed busy (delivery status) too long. */
bool lapic_send_ipi(uint32_t apic_id, uint32_t icr_low);
/* INIT, SIPI, SIPI to apic_id, starting it in real mode at page-aligned start_paddr < 1 MiB. */
bool lapic_start_ap(uint32_t apic_id, uint32_t start_paddr);

uint32_t ioapic_read(uintptr_t base, uint32_t reg);
void ioapic_write(uintptr_t base, uint32_t reg, uint32_t v);
uint32_t ioapic_max_redirect(uintptr_t base);   /* number of pins - 1 */
/* flags: ACPI MPS INTI flags (polarity bits 0-1, trigger bits 2-3; 0 = bus default,
 * which for ISA is edge, active high). */
void ioapic_route(uintptr_t base, uint32_t pin, uint8_t vector, uint32_t dest_apic_id, uint16_t flags);
void ioapic_mask(uintptr_t base, uint32_t pin, bool masked);

/* Remaps the 8259s to vectors 0x20-0x2f and masks every line, so only the IOAPIC delivers. */
void pic_disable(void);

/* ---- ACPI */
struct acpi_sdt_header {
    char signature[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem_id[6];
    char oem_table_id[8];
    uint32_t oem_revision;
    uint32_t creator_id;
    uint32_t creator_revision;
} __attribute__((packed));

/* hvm_start_info.rsdp_paddr, else a scan of the EBDA and 0xE0000-0xFFFFF; NULL if none
 * (problems are printed with an "acpi:" prefix). */
const void *acpi_find_rsdp(const struct hvm_start_info *si);
/* Through the XSDT (RSDT if no XSDT); checks checksums; NULL if not found. */
const struct acpi_sdt_header *acpi_find_table(const void *rsdp, const char sig[4]);

struct madt_info {
    uint32_t lapic_addr;
    uint32_t ncpus;                     /* enabled local APICs (flags bit 0) */
    uint32_t apic_ids[64];
    uint32_t acpi_ids[64];
    uint32_t cpu_flags[64];
    uint32_t ioapic_addr;               /* first IOAPIC, 0 if none */
    uint32_t ioapic_id;
    uint32_t ioapic_gsi_base;
    uint32_t isa_gsi[16];               /* ISA IRQ -> GSI after source overrides */
    uint16_t isa_flags[16];             /* MPS INTI flags of the override, 0 if none */
    uint32_t noverrides;
};
/* Parses the MADT; verbose prints one line per entry.  False (and a printed reason)
 * if there is no valid RSDP/MADT. */
bool madt_parse(const struct hvm_start_info *si, struct madt_info *out, bool verbose);

/* ---- SMP: real-mode trampoline at TRAMPOLINE_BASE switching an AP to long mode
 * on the BSP's page tables, GDT and IDT, then calling entry(arg) on stack_top. */
void ap_trampoline_install(void);
void ap_trampoline_set(void (*entry)(uint64_t), uint64_t arg, void *stack_top);

/* For a guest built with GUEST_SIMD := -msse2 (see Makefile): call before any SSE code. */
void cpu_enable_sse(void);

/* ---- delays without a calibrated clock: TSC cycles (host rate under KVM and QEMU). */
void delay_cycles(uint64_t cycles);

#endif
