#include "guest.h"

extern const char ap_trampoline_start[], ap_trampoline_end[], ap_trampoline_params[];

struct ap_params {
    uint32_t cr3;
    uint32_t efer;
    uint64_t stack;
    uint64_t entry;
    uint64_t arg;
};

static volatile struct ap_params *params_in_copy(void)
{
    return (volatile struct ap_params *)(uintptr_t)(TRAMPOLINE_BASE + (ap_trampoline_params - ap_trampoline_start));
}

void ap_trampoline_install(void)
{
    size_t size = (size_t)(ap_trampoline_end - ap_trampoline_start);
    if (size > 4096)
        panic("ap trampoline is %lu bytes, more than a page", (uint64_t)size);
    if (!memmap_is_ram(TRAMPOLINE_BASE, 4096))
        printf("smp: warning: trampoline page 0x%x is not RAM in the memory map\n", TRAMPOLINE_BASE);
    memcpy((void *)(uintptr_t)TRAMPOLINE_BASE, ap_trampoline_start, size);
    volatile struct ap_params *p = params_in_copy();
    uint64_t cr3 = read_cr3();
    if (cr3 >= (1ull << 32))
        panic("page tables at 0x%lx are out of the trampoline's reach", cr3);
    p->cr3 = (uint32_t)cr3;
    p->efer = (uint32_t)rdmsr(0xC0000080) & 0x900;  /* LME | NXE */
}

void ap_trampoline_set(void (*entry)(uint64_t), uint64_t arg, void *stack_top)
{
    volatile struct ap_params *p = params_in_copy();
    p->stack = (uint64_t)(uintptr_t)stack_top;
    p->entry = (uint64_t)(uintptr_t)entry;
    p->arg = arg;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
