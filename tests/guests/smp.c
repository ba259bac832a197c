/*
 * Brings up every CPU in the ACPI MADT: INIT-SIPI-SIPI through the LAPIC ICR into
 * the real-mode trampoline at TRAMPOLINE_BASE, one AP at a time.  Each AP prints
 * "cpu N online" (N = APIC ID) and bumps a shared counter; the BSP prints
 * "cpus online: N" and exits 0 if N is the MADT's count.
 * `ap_timeout=CYCLES` bounds the wait per AP in TSC cycles (default 10^10).
 */
#include "guest.h"

#define MAX_CPUS 32
#define AP_STACK_SIZE 8192

static struct madt_info madt;
static volatile uint32_t online;
static uint8_t ap_stacks[MAX_CPUS][AP_STACK_SIZE] __attribute__((aligned(16)));

static void ap_main(uint64_t index)
{
    printf("cpu %u online\n", lapic_id());
    __atomic_fetch_add(&online, 1, __ATOMIC_SEQ_CST);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static bool wait_online(uint32_t want, uint64_t timeout)
{
    uint64_t start = rdtsc();
    for (uint64_t i = 0; i < timeout; i++) {
        if (__atomic_load_n(&online, __ATOMIC_SEQ_CST) >= want)
            return true;
        if (rdtsc() - start >= timeout)
            break;
        cpu_relax();
    }
    return __atomic_load_n(&online, __ATOMIC_SEQ_CST) >= want;
}

int guest_main(const struct hvm_start_info *si)
{
    if (!madt_parse(si, &madt, true))
        return GUEST_EXIT_FAIL;
    printf("madt: %u cpus\n", madt.ncpus);
    uint64_t timeout = cmdline_get_u64("ap_timeout", 10000000000ull);

    lapic_enable();
    uint32_t bsp = lapic_id();
    printf("cpu %u online\n", bsp);
    online = 1;

    bool bsp_listed = false;
    for (uint32_t i = 0; i < madt.ncpus; i++)
        bsp_listed |= madt.apic_ids[i] == bsp;
    if (!bsp_listed)
        printf("smp: bsp apic id %u is not in the MADT\n", bsp);

    ap_trampoline_install();
    for (uint32_t i = 0; i < madt.ncpus; i++) {
        uint32_t id = madt.apic_ids[i];
        if (id == bsp)
            continue;
        if (i >= MAX_CPUS) {
            printf("smp: apic id %u skipped: more than %d cpus\n", id, MAX_CPUS);
            continue;
        }
        uint32_t want = online + 1;
        ap_trampoline_set(ap_main, i, ap_stacks[i] + AP_STACK_SIZE);
        if (!lapic_start_ap(id, TRAMPOLINE_BASE))
            printf("smp: ICR stayed busy starting apic id %u\n", id);
        if (!wait_online(want, timeout))
            printf("smp: apic id %u did not come online (timeout after %lu cycles)\n", id, timeout);
    }

    uint32_t n = __atomic_load_n(&online, __ATOMIC_SEQ_CST);
    printf("cpus online: %u\n", n);
    if (n != madt.ncpus) {
        printf("smp: %u cpus online, MADT lists %u\n", n, madt.ncpus);
        return GUEST_EXIT_FAIL;
    }
    return 0;
}
