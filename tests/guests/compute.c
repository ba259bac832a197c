/*
 * Deterministic CPU work: CRC-32 over a generated 4 KiB buffer, then a mixing loop
 * of `iters=N` rounds (default 100000).  `user=1` runs the same code in ring 3,
 * entering the kernel through ud2 (#UD) by default, or `sys=syscall` / `sys=int80`.
 * The result depends only on iters, so a host-side reference can check it
 * (tests/test_guests_qemu.py has one).
 */
#include "guest.h"

#define BUF_SIZE 4096
#define SEED 0x9E3779B97F4A7C15ull

struct job {
    uint64_t iters;
    uint32_t crc;
    uint64_t checksum;
    uint64_t cs;            /* code segment the work ran with: CPL in bits 0-1 */
};

static uint8_t buffer[BUF_SIZE];
static uint32_t crc_table[256];
static struct job job;
static uint8_t user_stack[16384] __attribute__((aligned(16)));

static uint64_t xorshift64(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static void user_print(const char *s)
{
    for (; *s; s++)
        user_syscall(SYS_PUTC, (uint8_t)*s);
}

/* Runs in ring 0 or ring 3; touches only this file's data. */
static uint64_t compute(uint64_t arg)
{
    struct job *j = (struct job *)(uintptr_t)arg;
    uint64_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    j->cs = cs;
    if ((cs & 3) == 3)
        user_print("compute: hello from ring 3\n");

    uint64_t x = SEED;
    for (int i = 0; i < BUF_SIZE; i += 8) {
        x = xorshift64(x);
        for (int b = 0; b < 8; b++)
            buffer[i + b] = (uint8_t)(x >> (8 * b));
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
    uint32_t crc = 0xFFFFFFFFu;
    for (int i = 0; i < BUF_SIZE; i++)
        crc = crc_table[(crc ^ buffer[i]) & 0xFF] ^ (crc >> 8);
    crc ^= 0xFFFFFFFFu;
    j->crc = crc;

    uint64_t h = crc;
    for (uint64_t i = 0; i < j->iters; i++) {
        x = xorshift64(x);
        h = (h ^ x) * 0x100000001B3ull;
        h ^= h >> 29;
        h += crc_table[h & 0xFF];
    }
    j->checksum = h;
    return h;
}

int guest_main(const struct hvm_start_info *si)
{
    job.iters = cmdline_get_u64("iters", 100000);
    bool user = cmdline_get_u64("user", 0) != 0;
    uint64_t start = rdtsc();
    uint64_t result;
    /* ud2 by default: on the project's software-nested KVM (where user=1 matters,
     * since only ring 3 runs natively) SYSCALL and INT n from ring 3 misbehave,
     * while exceptions are delivered properly. */
    char sys[16] = "ud2";
    cmdline_get("sys", sys, sizeof(sys));
    if (strcmp(sys, "syscall") == 0) {
        user_set_entry(USER_ENTRY_SYSCALL);
    } else if (strcmp(sys, "int80") == 0) {
        user_set_entry(USER_ENTRY_INT80);
    } else if (strcmp(sys, "ud2") == 0) {
        user_set_entry(USER_ENTRY_UD2);
    } else {
        printf("compute: unknown sys=%s (want ud2, syscall or int80)\n", sys);
        return GUEST_EXIT_FAIL;
    }
    if (user) {
        paging_set_user((uint64_t)(uintptr_t)__image_start, (uint64_t)(uintptr_t)__image_end, true);
        result = run_user(compute, (uint64_t)(uintptr_t)&job, user_stack + sizeof(user_stack));
        paging_set_user((uint64_t)(uintptr_t)__image_start, (uint64_t)(uintptr_t)__image_end, false);
    } else {
        result = compute((uint64_t)(uintptr_t)&job);
    }
    uint64_t cycles = rdtsc() - start;
    printf("mode: %s (cpl %lu)\n", user ? "user" : "kernel", job.cs & 3);
    if (user)
        printf("user entry: %s\n", sys);
    printf("crc32: 0x%08x\n", job.crc);
    printf("iters: %lu\n", job.iters);
    printf("checksum: 0x%016lx\n", result);
    printf("tsc cycles: %lu\n", cycles);
    if (result != job.checksum || (job.cs & 3) != (user ? 3u : 0u)) {
        printf("compute: inconsistent result (returned 0x%lx, stored 0x%lx, cs 0x%lx)\n", result,
               job.checksum, job.cs);
        return GUEST_EXIT_FAIL;
    }
    return 0;
}
