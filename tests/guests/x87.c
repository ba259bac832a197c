/*
 * x87 arithmetic end to end: series with fild/fsqrt/fdiv/fistp, the rounding and
 * precision controls, compares, fprem, fscale/fxtract, BCD, fisttp, the
 * environment, a masked stack underflow and a few transcendental results, all
 * printed as integers (or raw bits) so the translator, KVM and QEMU can be
 * compared line by line (tests/test_tcg_x87_guest.py).
 *
 * `user=1` (the default) runs the x87 code in ring 3: on the project's software
 * KVM only ring 3 runs on the CPU itself. The compiler never emits x87 code for
 * this file (no floating-point C types are used); all x87 work is inline asm.
 */
#include "guest.h"

#define NRES 40

struct results {
    int64_t v[NRES];
    uint8_t raw[3][10];
    int64_t underflow_sw, underflow_value;
};

static struct results res;
static uint8_t user_stack[16384] __attribute__((aligned(16)));

static void set_cw(uint16_t cw)
{
    __asm__ volatile("fninit\n\tfldcw %0" :: "m"(cw));
}

static uint16_t fsw(void)
{
    uint16_t sw;
    __asm__ volatile("fnstsw %0" : "=m"(sw));
    return sw;
}

/* sum of sqrt(k), k = 1..n, times `scale` */
static int64_t sum_sqrt(int32_t n, int32_t scale)
{
    int64_t out;
    __asm__ volatile("fldz");
    for (int32_t k = 1; k <= n; k++)
        __asm__ volatile("fildl %0\n\tfsqrt\n\tfaddp" :: "m"(k));
    __asm__ volatile("fimull %1\n\tfistpll %0" : "=m"(out) : "m"(scale));
    return out;
}

/* Leibniz series for pi with n terms, times 1e15 */
static int64_t leibniz(int32_t n)
{
    int64_t out, scale = 1000000000000000ll;
    __asm__ volatile("fldz");
    for (int32_t k = 0; k < n; k++) {
        int32_t d = 2 * k + 1;
        if (k & 1)
            __asm__ volatile("fld1\n\tfidivl %0\n\tfsubrp" :: "m"(d));   /* st1 - 1/d */
        else
            __asm__ volatile("fld1\n\tfidivl %0\n\tfaddp" :: "m"(d));
    }
    int32_t four = 4;
    __asm__ volatile("fimull %2\n\tfildll %1\n\tfmulp\n\tfistpll %0" : "=m"(out) : "m"(scale), "m"(four));
    return out;
}

/* harmonic number H(n) with fdivr from memory, times 1e12 */
static int64_t harmonic(int32_t n)
{
    int64_t out, scale = 1000000000000ll;
    double one = 1.0;   /* bit pattern only: no floating-point C arithmetic */
    __asm__ volatile("fldz");
    for (int32_t k = 1; k <= n; k++)
        __asm__ volatile("fildl %0\n\tfdivrl %1\n\tfaddp" :: "m"(k), "m"(one));
    __asm__ volatile("fildll %1\n\tfmulp\n\tfistpll %0" : "=m"(out) : "m"(scale));
    return out;
}

static uint64_t compute(uint64_t arg)
{
    struct results *r = (struct results *)(uintptr_t)arg;
    int n = 0;
    set_cw(0x37f);
    r->v[n++] = sum_sqrt(1000, 1000000);
    r->v[n++] = leibniz(200000);
    r->v[n++] = harmonic(100000);

    /* frndint and fistp of +-2.5 and +-3.5 in each rounding mode */
    static const int32_t halves[4] = { 5, -5, 7, -7 };
    for (int rc = 0; rc < 4; rc++) {
        set_cw(0x37f | rc << 10);
        for (int k = 0; k < 4; k++) {
            int32_t two = 2, a, b;
            __asm__ volatile("fildl %2\n\tfidivl %3\n\tfld %%st(0)\n\tfrndint\n\tfistpl %0\n\tfistpl %1"
                             : "=m"(a), "=m"(b) : "m"(halves[k]), "m"(two));
            r->v[n++] = (int64_t)a * 1000 + b;
        }
    }

    /* 1/3 at each precision, kept as raw 80-bit values */
    static const uint16_t pcs[3] = { 0x07f, 0x27f, 0x37f };
    for (int k = 0; k < 3; k++) {
        int32_t three = 3;
        set_cw(pcs[k]);
        __asm__ volatile("fld1\n\tfidivl %1\n\tfstpt %0" : "=m"(r->raw[k]) : "m"(three));
    }
    set_cw(0x37f);

    /* compares: sqrt(2)^2 against 2 with fcom (condition codes) and fcomi (EFLAGS) */
    {
        int32_t two = 2;
        uint16_t sw;
        uint64_t flags;
        __asm__ volatile("fildl %1\n\tfsqrt\n\tfmul %%st(0), %%st(0)\n\tficoml %1\n\tfnstsw %0"
                         : "=m"(sw) : "m"(two));
        r->v[n++] = sw & 0x4700;
        __asm__ volatile("fildl %1\n\tfcomip %%st(1), %%st(0)\n\tfstp %%st(0)\n\tpushfq\n\tpopq %0"
                         : "=r"(flags) : "m"(two) : "cc");
        r->v[n++] = flags & 0x45;
    }

    /* fprem: 1e10 mod pi, reduced until C2 clears, times 1e15 */
    {
        int64_t big = 10000000000ll, out, scale = 1000000000000000ll;
        int rounds = 0;
        __asm__ volatile("fldpi\n\tfildll %0" :: "m"(big));
        do {
            __asm__ volatile("fprem");
            rounds++;
        } while ((fsw() & 0x400) && rounds < 100);
        __asm__ volatile("fildll %1\n\tfmulp\n\tfistpll %0\n\tfstp %%st(0)" : "=m"(out) : "m"(scale));
        r->v[n++] = out;
        r->v[n++] = rounds;
    }

    /* fscale 1.5 * 2^10, then fxtract of it */
    {
        int32_t ten = 10, three = 3, two = 2, exp, sig;
        __asm__ volatile("fildl %2\n\tfildl %3\n\tfidivl %4\n\tfscale\n\tfstp %%st(1)\n\t"
                         "fxtract\n\tfimull %4\n\tfistpl %1\n\tfistpl %0"
                         : "=m"(exp), "=m"(sig) : "m"(ten), "m"(three), "m"(two));
        r->v[n++] = exp;
        r->v[n++] = sig;
    }

    /* BCD round trip and fisttp (SSE3) of -2.75 */
    {
        int64_t v = -123456789012345678ll;
        uint8_t bcd[10];
        int64_t back;
        int32_t num = -11, den = 4, t;
        __asm__ volatile("fildll %2\n\tfbstp %0\n\tfbld %0\n\tfistpll %1" : "+m"(bcd), "=m"(back) : "m"(v));
        r->v[n++] = back;
        r->v[n++] = (int64_t)bcd[0] | (int64_t)bcd[8] << 8 | (int64_t)bcd[9] << 16;
        __asm__ volatile("fildl %1\n\tfidivl %2\n\tfisttpl %0" : "=m"(t) : "m"(num), "m"(den));
        r->v[n++] = t;
    }

    /* masked stack underflow: IE and SF, C1 = 0, QNaN indefinite pushed through */
    {
        int64_t out;
        set_cw(0x37f);
        __asm__ volatile("fadd %st(1), %st(0)");
        r->underflow_sw = fsw();
        __asm__ volatile("fistpll %0" : "=m"(out));
        r->underflow_value = out;
    }

    /* environment: fnstenv after a push, fldenv back */
    {
        uint32_t env[7];
        set_cw(0x77f);
        __asm__ volatile("fld1\n\tfldz\n\tfnstenv %0\n\tfldenv %0" : "=m"(env));
        r->v[n++] = (env[0] & 0xffff) | (uint64_t)(env[1] & 0xffff) << 16 | (uint64_t)(env[2] & 0xffff) << 32;
        r->v[n++] = fsw();
        set_cw(0x37f);
    }

    /* transcendental results, times 1e9 (well inside the precision of every engine) */
    {
        int64_t scale = 1000000000ll, out;
        int32_t one = 1, ten = 10, two = 2;
        __asm__ volatile("fildl %1\n\tfsin\n\tfildll %2\n\tfmulp\n\tfistpll %0" : "=m"(out) : "m"(one), "m"(scale));
        r->v[n++] = out;
        __asm__ volatile("fildl %1\n\tfcos\n\tfildll %2\n\tfmulp\n\tfistpll %0" : "=m"(out) : "m"(one), "m"(scale));
        r->v[n++] = out;
        __asm__ volatile("fildl %1\n\tfptan\n\tfstp %%st(0)\n\tfildll %2\n\tfmulp\n\tfistpll %0"
                         : "=m"(out) : "m"(one), "m"(scale));
        r->v[n++] = out;
        __asm__ volatile("fildl %1\n\tfildl %1\n\tfpatan\n\tfildll %2\n\tfmulp\n\tfistpll %0"
                         : "=m"(out) : "m"(one), "m"(scale));
        r->v[n++] = out;
        __asm__ volatile("fld1\n\tfildl %1\n\tfyl2x\n\tfildll %2\n\tfmulp\n\tfistpll %0"
                         : "=m"(out) : "m"(ten), "m"(scale));
        r->v[n++] = out;
        __asm__ volatile("fld1\n\tfidivl %1\n\tf2xm1\n\tfildll %2\n\tfmulp\n\tfistpll %0"
                         : "=m"(out) : "m"(two), "m"(scale));
        r->v[n++] = out;
    }
    return (uint64_t)n;
}

int guest_main(const struct hvm_start_info *si)
{
    bool user = cmdline_get_u64("user", 1) != 0;
    /* x87 on, no emulation, no lazy switching, native #MF reporting */
    uint64_t cr0 = read_cr0();
    cr0 = (cr0 & ~((1ull << 2) | (1ull << 3))) | (1ull << 1) | (1ull << 5);
    __asm__ volatile("mov %0, %%cr0" :: "r"(cr0));
    uint64_t count;
    if (user) {
        user_set_entry(USER_ENTRY_UD2);
        paging_set_user((uint64_t)(uintptr_t)__image_start, (uint64_t)(uintptr_t)__image_end, true);
        count = run_user(compute, (uint64_t)(uintptr_t)&res, user_stack + sizeof(user_stack));
        paging_set_user((uint64_t)(uintptr_t)__image_start, (uint64_t)(uintptr_t)__image_end, false);
    } else {
        count = compute((uint64_t)(uintptr_t)&res);
    }
    for (uint64_t k = 0; k < count && k < NRES; k++)
        printf("x87 %lu: %ld\n", k, res.v[k]);
    /* a line of its own: QEMU does not model stack faults (see the test) */
    printf("x87 stack underflow: fsw 0x%04lx, stored %ld\n", res.underflow_sw, res.underflow_value);
    for (int k = 0; k < 3; k++) {
        printf("x87 third %d:", k);
        for (int b = 9; b >= 0; b--)
            printf(" %02x", res.raw[k][b]);
        printf("\n");
    }
    return count == 0 ? GUEST_EXIT_FAIL : 0;
}
