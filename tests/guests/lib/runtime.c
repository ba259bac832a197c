#include "guest.h"

const struct hvm_start_info *start_info;

void idt_init(void);
void cmdline_init(const struct hvm_start_info *si);

/* Called from start.S on the boot stack, long mode, interrupts off. */
__attribute__((noreturn)) void guest_start(uint32_t start_info_paddr);
void guest_start(uint32_t start_info_paddr)
{
    serial_init();
    idt_init();
    start_info = (const struct hvm_start_info *)(uintptr_t)start_info_paddr;
    if (start_info_paddr == 0 || start_info->magic != PVH_START_MAGIC)
        panic("bad hvm_start_info at 0x%x (magic 0x%x, want 0x%x)", start_info_paddr,
              start_info_paddr ? start_info->magic : 0, PVH_START_MAGIC);
    cmdline_init(start_info);
    int rc = guest_main(start_info);
    if (rc == 0)
        puts("guest: done");
    else
        printf("guest: exit %d\n", rc);
    guest_exit((uint32_t)rc);
}

void guest_exit(uint32_t code)
{
    outl(GUEST_EXIT_PORT, code);
    /* Only reached where nothing listens on the exit port. */
    for (;;)
        __asm__ volatile("cli; hlt");
}

void panic(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printf("guest: panic: %s\n", buf);
    guest_exit(GUEST_EXIT_PANIC);
}

void spin_lock(spinlock_t *lock)
{
    while (__atomic_exchange_n(&lock->locked, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&lock->locked, __ATOMIC_RELAXED))
            cpu_relax();
}

void spin_unlock(spinlock_t *lock)
{
    __atomic_store_n(&lock->locked, 0, __ATOMIC_RELEASE);
}

void cpuid_vendor(char out[13])
{
    struct cpuid_regs r = cpuid(0, 0);
    memcpy(out, &r.ebx, 4);
    memcpy(out + 4, &r.edx, 4);
    memcpy(out + 8, &r.ecx, 4);
    out[12] = 0;
}

void delay_cycles(uint64_t cycles)
{
    /* Also bounded by iterations (each takes at least a cycle): an emulator whose
     * TSC does not advance must not hang here. */
    uint64_t start = rdtsc();
    for (uint64_t i = 0; i < cycles && rdtsc() - start < cycles; i++)
        cpu_relax();
}

void cpu_enable_sse(void)
{
    uint64_t cr0 = read_cr0();
    cr0 = (cr0 & ~(1ull << 2)) | (1ull << 1);   /* clear EM, set MP */
    __asm__ volatile("mov %0, %%cr0" :: "r"(cr0));
    uint64_t cr4 = read_cr4() | (1ull << 9) | (1ull << 10);    /* OSFXSR, OSXMMEXCPT */
    __asm__ volatile("mov %0, %%cr4" :: "r"(cr4));
}
