/*
 * Raises #DE, #UD, #PF, #GP and #BP on purpose.  Each handler checks the vector,
 * error code, RIP (and CR2 for #PF), then resumes after the faulting instruction.
 * One line per exception, "fault: #XX ok ...", "fault: #XX FAILED ..." or, for names
 * listed in `skip=de,ud,pf,gp,bp`, "fault: #XX skipped".  (The project's
 * software-nested KVM cannot emulate INT3 in ring 0: run it there with skip=bp.)
 */
#include "guest.h"

#define UNMAPPED_ADDR 0x100001234ull        /* just above the 4 GiB identity map */
#define NONCANONICAL_ADDR 0x8000000000000000ull

static volatile uint64_t expected_vector;
static volatile uint64_t fault_rip;         /* address of the faulting instruction */
static volatile uint64_t resume_rip;        /* where the handler continues */
static volatile uint64_t seen_count, seen_vector, seen_error, seen_rip, seen_cr2;

static void recover(struct trap_frame *f)
{
    if (f->vector != expected_vector || !resume_rip) {
        printf("fault: unexpected vector %lu while expecting %lu\n", f->vector, expected_vector);
        trap_frame_print(f);
        guest_exit(GUEST_EXIT_FAIL);
    }
    seen_count++;
    seen_vector = f->vector;
    seen_error = f->error_code;
    seen_rip = f->rip;
    seen_cr2 = f->vector == 14 ? read_cr2() : 0;
    f->rip = resume_rip;
    resume_rip = 0;
}

static void arm(uint64_t vector)
{
    expected_vector = vector;
    seen_count = 0;
    seen_vector = seen_error = seen_rip = seen_cr2 = ~0ull;
    idt_set_handler((uint8_t)vector, recover);
}

static int failures;
static char skip_list[64];

/* True (and a "skipped" line printed) if key is in the comma-separated skip= list. */
static bool skipped(const char *key, const char *name)
{
    size_t klen = strlen(key);
    for (const char *p = skip_list; *p;) {
        const char *end = p;
        while (*end && *end != ',')
            end++;
        if ((size_t)(end - p) == klen && strncmp(p, key, klen) == 0) {
            printf("fault: %s skipped\n", name);
            return true;
        }
        p = *end ? end + 1 : end;
    }
    return false;
}

static void check(const char *name, bool ok, const char *detail)
{
    printf("fault: %s %s%s%s\n", name, ok ? "ok" : "FAILED", detail[0] ? " " : "", detail);
    if (!ok)
        failures++;
    idt_set_handler((uint8_t)expected_vector, NULL);
}

/* Emits "label: insn; resume:" and records both addresses before running insn. */
#define FAULTING(insn, ...)                                                          \
    __asm__ volatile("leaq 1f(%%rip), %%r11\n\t"                                     \
                     "movq %%r11, %[frip]\n\t"                                       \
                     "leaq 2f(%%rip), %%r11\n\t"                                     \
                     "movq %%r11, %[rrip]\n\t"                                       \
                     "1: " insn "\n"                                                 \
                     "2:"                                                            \
                     : [frip] "=m"(fault_rip), [rrip] "=m"(resume_rip)__VA_ARGS__)

int guest_main(const struct hvm_start_info *si)
{
    char detail[160];
    cmdline_get("skip", skip_list, sizeof(skip_list));

    /* #DE: divide by zero; a fault, so RIP is the div itself. */
    if (!skipped("de", "#DE")) {
        arm(0);
        FAULTING("divl %%ecx", : "a"(1), "d"(0), "c"(0) : "r11", "memory");
        snprintf(detail, sizeof(detail), "vector=%lu rip=0x%lx", seen_vector, seen_rip);
        check("#DE", seen_count == 1 && seen_rip == fault_rip, detail);
    }

    /* #UD: ud2. */
    if (!skipped("ud", "#UD")) {
        arm(6);
        FAULTING("ud2", : : "r11", "memory");
        snprintf(detail, sizeof(detail), "vector=%lu rip=0x%lx", seen_vector, seen_rip);
        check("#UD", seen_count == 1 && seen_rip == fault_rip, detail);
    }

    /* #PF: read of a not-present page; error code 0 (not present, read, supervisor). */
    if (!skipped("pf", "#PF")) {
        arm(14);
        FAULTING("movq (%%rax), %%rbx", : "a"(UNMAPPED_ADDR) : "rbx", "r11", "memory");
        snprintf(detail, sizeof(detail), "vector=%lu error=0x%lx rip=0x%lx cr2=0x%lx", seen_vector,
                 seen_error, seen_rip, seen_cr2);
        check("#PF", seen_count == 1 && seen_rip == fault_rip && seen_cr2 == UNMAPPED_ADDR &&
                         (seen_error & 0x7) == 0, detail);
    }

    /* #PF on a write: error code has W (bit 1). */
    if (!skipped("pf", "#PF(write)")) {
        arm(14);
        FAULTING("movq %%rbx, (%%rax)", : "a"(UNMAPPED_ADDR + 8), "b"(0) : "r11", "memory");
        snprintf(detail, sizeof(detail), "vector=%lu error=0x%lx rip=0x%lx cr2=0x%lx", seen_vector,
                 seen_error, seen_rip, seen_cr2);
        check("#PF(write)", seen_count == 1 && seen_rip == fault_rip && seen_cr2 == UNMAPPED_ADDR + 8 &&
                                (seen_error & 0x7) == 0x2, detail);
    }

    /* #GP: a non-canonical address; error code 0. */
    if (!skipped("gp", "#GP")) {
        arm(13);
        FAULTING("movq (%%rax), %%rbx", : "a"(NONCANONICAL_ADDR) : "rbx", "r11", "memory");
        snprintf(detail, sizeof(detail), "vector=%lu error=0x%lx rip=0x%lx", seen_vector, seen_error, seen_rip);
        check("#GP", seen_count == 1 && seen_rip == fault_rip && seen_error == 0, detail);
    }

    /* #BP: int3 is a trap, so RIP is the next instruction. */
    if (!skipped("bp", "#BP")) {
        arm(3);
        FAULTING("int3", : : "r11", "memory");
        snprintf(detail, sizeof(detail), "vector=%lu rip=0x%lx", seen_vector, seen_rip);
        check("#BP", seen_count == 1 && seen_rip == fault_rip + 1, detail);
    }

    if (failures) {
        printf("fault: %d checks failed\n", failures);
        return GUEST_EXIT_FAIL;
    }
    puts("fault: all exceptions handled");
    return 0;
}
