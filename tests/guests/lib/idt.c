#include "guest.h"

struct idt_gate {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t zero;
} __attribute__((packed));

struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));

extern char isr_stubs[];
extern uint64_t boot_gdt[];
__attribute__((noreturn)) void user_return(uint64_t value);

static struct idt_gate idt[256] __attribute__((aligned(16)));
uint8_t idt_descriptor[10] __attribute__((aligned(16)));
static trap_handler_t handlers[256];
static struct tss64 tss __attribute__((aligned(16)));
static uint8_t trap_stack[TRAP_STACK_SIZE] __attribute__((aligned(16)));
static uint8_t df_stack[DF_STACK_SIZE] __attribute__((aligned(16)));

static const char *const names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
    "#SS", "#GP", "#PF", "res", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "res", "res",
    "res", "res", "res", "res", "#HV", "#VC", "#SX", "res",
};

const char *exception_name(uint64_t vector)
{
    return vector < 32 ? names[vector] : "irq";
}

static void set_gate(int vector, uint8_t type_attr, uint8_t ist)
{
    uint64_t addr = (uint64_t)(uintptr_t)(isr_stubs + 16 * vector);
    idt[vector] = (struct idt_gate){
        .offset_lo = (uint16_t)addr,
        .selector = SEL_CODE64,
        .ist = ist,
        .type_attr = type_attr,
        .offset_mid = (uint16_t)(addr >> 16),
        .offset_hi = (uint32_t)(addr >> 32),
    };
}

extern uint64_t syscall_kernel_rsp;
uint8_t user_entry_mode = USER_ENTRY_SYSCALL;
void syscall_entry(void);

uint64_t syscall_dispatch(uint64_t nr, uint64_t arg);
uint64_t syscall_dispatch(uint64_t nr, uint64_t arg)
{
    switch (nr) {
    case SYS_EXIT:
        user_return(arg);
    case SYS_PUTC: {
        char c = (char)arg;
        serial_write(&c, 1);
        return 0;
    }
    default:
        return (uint64_t)-1;
    }
}

static void int80_handler(struct trap_frame *f)
{
    f->rax = syscall_dispatch(f->rax, f->rdi);
}

/* USER_ENTRY_UD2: a ud2 executed in ring 3 is a system call. */
static void ud2_syscall_handler(struct trap_frame *f)
{
    const uint8_t *insn = (const uint8_t *)(uintptr_t)f->rip;
    if ((f->cs & 3) != 3 || insn[0] != 0x0F || insn[1] != 0x0B) {
        trap_frame_print(f);
        guest_exit(GUEST_EXIT_EXCEPTION);
    }
    f->rip += 2;
    f->rax = syscall_dispatch(f->rax, f->rdi);
}

void user_set_entry(enum user_entry how)
{
    user_entry_mode = (uint8_t)how;
}

uint64_t run_user_asm(uint64_t (*fn)(uint64_t), uint64_t arg, void *user_stack_top);

/* The SYSCALL MSRs are set up here rather than at boot so that guests which never
 * enter ring 3 do not touch them. */
uint64_t run_user(uint64_t (*fn)(uint64_t), uint64_t arg, void *user_stack_top)
{
    /* SYSCALL/SYSRET: kernel CS 0x10 (SS 0x18); SYSRET gives CS 0x28|3, SS 0x20|3. */
    syscall_kernel_rsp = tss.rsp[0];
    wrmsr(0xC0000080, rdmsr(0xC0000080) | 1);                  /* EFER.SCE */
    wrmsr(0xC0000081, ((uint64_t)(SEL_UDATA - 8) << 48) | ((uint64_t)SEL_CODE64 << 32));  /* STAR */
    wrmsr(0xC0000082, (uint64_t)(uintptr_t)syscall_entry);      /* LSTAR */
    wrmsr(0xC0000084, 0x700);                                   /* FMASK: TF, IF, DF */
    trap_handler_t saved_ud = handlers[6];
    if (user_entry_mode == USER_ENTRY_UD2)
        handlers[6] = ud2_syscall_handler;
    uint64_t result = run_user_asm(fn, arg, user_stack_top);
    handlers[6] = saved_ud;
    return result;
}

void idt_init(void)
{
    for (int v = 0; v < 256; v++)
        set_gate(v, 0x8E, v == 8 ? 1 : 0);     /* interrupt gates; #DF on IST1 */
    uint16_t limit = sizeof(idt) - 1;
    uint64_t base = (uint64_t)(uintptr_t)idt;
    memcpy(idt_descriptor, &limit, 2);
    memcpy(idt_descriptor + 2, &base, 8);
    __asm__ volatile("lidt %0" :: "m"(idt_descriptor));

    /* TSS: RSP0 for entries from ring 3, IST1 for #DF; no I/O bitmap. */
    tss.rsp[0] = (uint64_t)(uintptr_t)(trap_stack + sizeof(trap_stack));
    tss.ist[0] = (uint64_t)(uintptr_t)(df_stack + sizeof(df_stack));
    tss.iomap_base = sizeof(tss);
    uint64_t tb = (uint64_t)(uintptr_t)&tss;
    uint64_t tl = sizeof(tss) - 1;
    boot_gdt[SEL_TSS / 8] = (tl & 0xFFFF) | ((tb & 0xFFFFFF) << 16) | (0x89ull << 40) |
                            ((tl >> 16 & 0xF) << 48) | ((tb >> 24 & 0xFF) << 56);
    boot_gdt[SEL_TSS / 8 + 1] = tb >> 32;
    __asm__ volatile("ltr %w0" :: "r"(SEL_TSS));

    handlers[USER_SYSCALL_VECTOR] = int80_handler;
    idt_set_dpl(USER_SYSCALL_VECTOR, 3);
}

void idt_set_handler(uint8_t vector, trap_handler_t handler)
{
    handlers[vector] = handler;
}

void idt_set_dpl(uint8_t vector, int dpl)
{
    idt[vector].type_attr = (uint8_t)((idt[vector].type_attr & ~0x60) | ((dpl & 3) << 5));
}

void trap_frame_print(const struct trap_frame *f)
{
    char cr2[32] = "";
    if (f->vector == 14)
        snprintf(cr2, sizeof(cr2), " cr2=0x%lx", read_cr2());
    /* One printf: the line stays whole when several CPUs print. */
    printf("guest: exception %lu (%s) error=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx rsp=0x%lx%s\n",
           f->vector, exception_name(f->vector), f->error_code, f->rip, f->cs, f->rflags, f->rsp, cr2);
}

void trap_dispatch(struct trap_frame *f);
void trap_dispatch(struct trap_frame *f)
{
    trap_handler_t h = handlers[f->vector & 0xFF];
    if (h) {
        h(f);
        return;
    }
    /* Spurious vectors of the LAPIC and of the 8259s (IRQ7/IRQ15 at 0x20 base). */
    if (f->vector == LAPIC_SPURIOUS_VECTOR || f->vector == 0x27 || f->vector == 0x2F)
        return;
    trap_frame_print(f);
    guest_exit(GUEST_EXIT_EXCEPTION);
}
