/* The general-purpose-register extensions after SSE4.2: BMI1 and BMI2 (VEX-encoded,
 * op P_VEX with the instruction in imm2: decode.c's vex_kind), ADX (adcx/adox),
 * MOVBE and RDRAND/RDSEED. Semantics and flags as the SDM Vol. 2 pages of each;
 * flags the SDM leaves undefined get what a Haswell computes where that is cheap to
 * say (parity and AF of the result are not promised to anyone). */
#ifndef KVMPY_INSN_BMI_H
#define KVMPY_INSN_BMI_H

#include <errno.h>
#include <sys/random.h>
#include "operands.h"

/* ZF and SF of a result, CF as given; OF cleared (what every BMI1 flag writer does) */
static inline __attribute__((always_inline)) void bmi_flags(CPU *c, uint64_t r, unsigned sz, int cf)
{
    set_flags(c, szp(r, sz) | (cf ? F_CF : 0));
}

static inline uint64_t pdep(uint64_t src, uint64_t mask)
{
    uint64_t out = 0;
    for (uint64_t bit = 1; mask; bit <<= 1) {
        uint64_t lowest = mask & -mask;
        if (src & bit)
            out |= lowest;
        mask &= mask - 1;
    }
    return out;
}

static inline uint64_t pext(uint64_t src, uint64_t mask)
{
    uint64_t out = 0;
    for (uint64_t bit = 1; mask; bit <<= 1) {
        uint64_t lowest = mask & -mask;
        if (src & lowest)
            out |= bit;
        mask &= mask - 1;
    }
    return out;
}

/* P_VEX: reg is ModRM.reg, vreg VEX.vvvv, E the r/m operand; 32 or 64 bits by VEX.W */
HANDLER vex_bmi(CPU *c, Insn *i)
{
    unsigned sz = i->osz, bits = sz * 8;
    uint64_t m = szmask(sz);
    int vreg = VEX_VREG(i);
    uint64_t e = rdE(c, i, sz);   /* the only memory access: everything after it commits */
    uint64_t v = getreg(c, i, vreg, sz);
    switch (VEX_KIND(i)) {
    case VX_ANDN: {
        uint64_t r = ~v & e & m;
        setreg(c, i, i->reg, sz, r);
        bmi_flags(c, r, sz, 0);
        break;
    }
    case VX_BLSR: {            /* reset the lowest set bit */
        uint64_t r = e & (e - 1) & m;
        setreg(c, i, vreg, sz, r);
        bmi_flags(c, r, sz, e == 0);
        break;
    }
    case VX_BLSMSK: {          /* mask up to the lowest set bit; ZF always clear */
        uint64_t r = (e ^ (e - 1)) & m;
        setreg(c, i, vreg, sz, r);
        bmi_flags(c, r, sz, e == 0);
        break;
    }
    case VX_BLSI: {            /* isolate the lowest set bit */
        uint64_t r = e & -e & m;
        setreg(c, i, vreg, sz, r);
        bmi_flags(c, r, sz, e != 0);
        break;
    }
    case VX_BZHI: {            /* zero the bits from index vvvv[7:0] up */
        unsigned n = v & 0xff;
        uint64_t r = n < bits ? e & ((1ull << n) - 1) : e;
        setreg(c, i, i->reg, sz, r);
        bmi_flags(c, r, sz, n >= bits);
        break;
    }
    case VX_PDEP:
        setreg(c, i, i->reg, sz, pdep(v, e) & m);
        break;
    case VX_PEXT:
        setreg(c, i, i->reg, sz, pext(v, e));
        break;
    case VX_MULX: {            /* rdx * E unsigned; low half to vvvv, then high to reg (wins if equal) */
        uint64_t d = getreg(c, i, R_DX, sz), lo, hi;
        if (sz == 8) {
            unsigned __int128 p = (unsigned __int128)d * e;
            lo = (uint64_t)p;
            hi = (uint64_t)(p >> 64);
        } else {
            uint64_t p = d * e;
            lo = (uint32_t)p;
            hi = p >> 32;
        }
        setreg(c, i, vreg, sz, lo);
        setreg(c, i, i->reg, sz, hi);
        break;
    }
    case VX_BEXTR: {           /* E[start +: len] with start = vvvv[7:0], len = vvvv[15:8] */
        unsigned start = v & 0xff, len = (v >> 8) & 0xff;
        uint64_t r = start < bits ? e >> start : 0;
        if (len < bits)
            r &= (1ull << len) - 1;
        setreg(c, i, i->reg, sz, r);
        set_flags(c, r == 0 ? F_ZF : 0);   /* CF OF cleared; AF SF PF undefined */
        break;
    }
    case VX_SHLX:
        setreg(c, i, i->reg, sz, e << (v & (bits - 1)));
        break;
    case VX_SHRX:
        setreg(c, i, i->reg, sz, e >> (v & (bits - 1)));
        break;
    case VX_SARX:
        setreg(c, i, i->reg, sz, (uint64_t)(sext(e, sz) >> (v & (bits - 1))));
        break;
    case VX_RORX: {
        unsigned n = i->imm & (bits - 1);
        setreg(c, i, i->reg, sz, n ? (e >> n | e << (bits - n)) : e);
        break;
    }
    default:
        UD();
    }
}

/* 0F 38 F6: 66 = adcx (carry in and out through CF), F3 = adox (through OF); the other
 * flags stay. 32 bits, or 64 with REX.W: the 66 is the mandatory prefix, no size. */
HANDLER adx(CPU *c, Insn *i)
{
    if ((i->pfx != 1 && i->pfx != 2) || i->lock)
        UD();
    unsigned sz = i->rexw ? 8 : 4;
    uint32_t f = compute_arith(c), carry_flag = i->pfx == 1 ? F_CF : F_OF;
    uint64_t a = getreg(c, i, i->reg, sz), b = rdE(c, i, sz), cin = (f & carry_flag) != 0;
    uint64_t r = (a + b + cin) & szmask(sz);
    int cout = cin ? r <= a : r < a;
    setreg(c, i, i->reg, sz, r);
    set_flags(c, (f & ~carry_flag) | (cout ? carry_flag : 0));
}

static inline uint64_t byte_swap(uint64_t v, unsigned sz)
{
    return sz == 8 ? __builtin_bswap64(v) : sz == 4 ? __builtin_bswap32((uint32_t)v)
                                                    : __builtin_bswap16((uint16_t)v);
}

/* 0F 38 F0/F1: movbe r, m / movbe m, r without a prefix or with 66 (16 bits); with F2
 * they are SSE4.2's crc32 (sse.c); F3 and register operands are #UD */
HANDLER movbe_or_crc32(CPU *c, Insn *i, int op)
{
    if (i->pfx == 3) {
        sse_exec(c, i);
        return;
    }
    if (i->pfx == 2 || i->mod == 3 || i->lock)
        UD();
    unsigned sz = i->osz;
    if (op == 0x2f0)
        setreg(c, i, i->reg, sz, byte_swap(ld(c, ea_lin(c, i), sz), sz));
    else
        st(c, ea_lin(c, i), sz, byte_swap(getreg(c, i, i->reg, sz), sz));
}

/* 0F C7 /6 rdrand, /7 rdseed (register forms): the host kernel's random bytes;
 * CF=1 with a value, CF=0 and a zero destination when none is at hand (as the
 * hardware does when its entropy runs dry, which guests retry); OF SF ZF AF PF clear */
HANDLER rdrand_rdseed(CPU *c, Insn *i)
{
    if (((i->reg & 7) != 6 && (i->reg & 7) != 7) || i->lock || i->rep)
        UD();
    unsigned sz = i->osz;
    uint64_t v = 0;
    ssize_t got;
    do
        got = getrandom(&v, sz, GRND_NONBLOCK);
    while (got < 0 && errno == EINTR);
    int ok = got == (ssize_t)sz;
    setreg(c, i, i->rm, sz, ok ? v : 0);
    set_flags(c, ok ? F_CF : 0);
}

#endif
