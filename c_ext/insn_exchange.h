/* Exchanges: xchg, xadd, cmpxchg, cmpxchg8b/16b. On RAM they use the host's own
 * atomics, so a guest lock (or xchg's implicit one) holds against other vCPUs. */
#ifndef KVMPY_INSN_EXCHANGE_H
#define KVMPY_INSN_EXCHANGE_H

#include "insn_alu.h"

/* 86/87 */
HANDLER xchg_rm_reg(CPU *c, Insn *i, unsigned s)
{
    uint64_t a, v;
    if (i->mod == 3) {
        a = getreg(c, i, i->rm, s);
        v = getreg(c, i, i->reg, s);
        setreg(c, i, i->rm, s, v);
        setreg(c, i, i->reg, s, a);
        return;
    }
    uint64_t lin = ea_lin(c, i);
    v = getreg(c, i, i->reg, s);
    void *p = atomic_host(c, lin, s);   /* xchg with memory is always locked */
    if (p) {
        switch (s) {
        case 1: a = __atomic_exchange_n((uint8_t *)p, (uint8_t)v, __ATOMIC_SEQ_CST); break;
        case 2: a = __atomic_exchange_n((uint16_t *)p, (uint16_t)v, __ATOMIC_SEQ_CST); break;
        case 4: a = __atomic_exchange_n((uint32_t *)p, (uint32_t)v, __ATOMIC_SEQ_CST); break;
        default: a = __atomic_exchange_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); break;
        }
    } else {
        a = ld(c, lin, s);
        st(c, lin, s, v);
    }
    setreg(c, i, i->reg, s, a);
}

/* 91-97, and 90 with REX.B (xchg r8, rax) */
HANDLER xchg_acc_reg(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    uint64_t a = getreg(c, i, i->reg, sz);
    uint64_t v = getreg(c, i, R_AX, sz);
    setreg(c, i, R_AX, sz, a);
    setreg(c, i, i->reg, sz, v);
}

/* 90: nop / pause; xchg eax,eax would zero-extend, 90 does not */
HANDLER nop_or_xchg(CPU *c, Insn *i)
{
    if (i->reg != 0)
        xchg_acc_reg(c, i);
}

/* 0F C0/C1 */
HANDLER xadd(CPU *c, Insn *i, unsigned s)
{
    uint64_t a, v;
    uint64_t src = getreg(c, i, i->reg, s);
    if (i->mod == 3) {
        a = getreg(c, i, i->rm, s);
        v = alu(c, ALU_ADD, a, src, s);
        setreg(c, i, i->reg, s, a);
        setreg(c, i, i->rm, s, v);
        return;
    }
    uint64_t lin = ea_lin(c, i);
    void *p = lock_ptr(c, i, lin, s);
    if (p) {
        do { a = atomic_ld(p, s); v = a + src; } while (!cas(p, s, a, v));
        alu(c, ALU_ADD, a, src, s);
    } else {
        a = ld(c, lin, s);
        v = alu(c, ALU_ADD, a, src, s);
        st(c, lin, s, v);
    }
    setreg(c, i, i->reg, s, a);
}

/* 0F B0/B1 */
HANDLER cmpxchg(CPU *c, Insn *i, unsigned s)
{
    uint64_t a;
    uint64_t acc = c->r[R_AX] & szmask(s);
    uint64_t src = getreg(c, i, i->reg, s);
    if (i->mod == 3) {
        a = getreg(c, i, i->rm, s);
        alu(c, ALU_CMP, acc, a, s);
        /* the destination is always written (a 32-bit one zero-extends) */
        if (a == acc) {
            setreg(c, i, i->rm, s, src);
        } else {
            setreg(c, i, i->rm, s, a);
            setreg(c, i, R_AX, s, a);
        }
        return;
    }
    uint64_t lin = ea_lin(c, i);
    void *p = atomic_host(c, lin, s);
    if (p) {
        /* on failure the builtin leaves the value found in e */
        switch (s) {
        case 1: { uint8_t e = acc; __atomic_compare_exchange_n((uint8_t *)p, &e, (uint8_t)src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
        case 2: { uint16_t e = acc; __atomic_compare_exchange_n((uint16_t *)p, &e, (uint16_t)src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
        case 4: { uint32_t e = acc; __atomic_compare_exchange_n((uint32_t *)p, &e, (uint32_t)src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
        default: { uint64_t e = acc; __atomic_compare_exchange_n((uint64_t *)p, &e, src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
        }
    } else {
        a = ld(c, lin, s);
        st(c, lin, s, a == acc ? src : a);
    }
    alu(c, ALU_CMP, acc, a, s);
    if (a != acc)
        setreg(c, i, R_AX, s, a);
}

static void cmpxchg16b(CPU *c, uint64_t lin)
{
    if (lin & 15) GP0();
    uint32_t f = compute_arith(c) & ~F_ZF;
    uint64_t *p16 = atomic_host(c, lin, 16);
    if (p16) {
        /* RAM: the host's own lock cmpxchg16b keeps it atomic against other vCPUs */
        uint64_t lo = c->r[R_AX], hi = c->r[R_DX];
        uint8_t ok;
        __asm__ volatile("lock cmpxchg16b %1; sete %0"
                         : "=q"(ok), "+m"(*(volatile unsigned __int128 *)p16), "+a"(lo), "+d"(hi)
                         : "b"(c->r[R_BX]), "c"(c->r[R_CX])
                         : "memory", "cc");
        if (ok) {
            f |= F_ZF;
        } else {
            c->r[R_AX] = lo;
            c->r[R_DX] = hi;
        }
        set_flags(c, f);
        return;
    }
    uint64_t lo = ld(c, lin, 8), hi = ld(c, lin + 8, 8);
    if (lo == c->r[R_AX] && hi == c->r[R_DX]) {
        st(c, lin, 8, c->r[R_BX]);
        st(c, lin + 8, 8, c->r[R_CX]);
        f |= F_ZF;
    } else {
        st(c, lin, 8, lo);
        c->r[R_AX] = lo;
        c->r[R_DX] = hi;
    }
    set_flags(c, f);
}

static void cmpxchg8b(CPU *c, uint64_t lin)
{
    uint64_t cmp = ((c->r[R_DX] & 0xffffffffull) << 32) | (uint32_t)c->r[R_AX];
    uint64_t nv = ((c->r[R_CX] & 0xffffffffull) << 32) | (uint32_t)c->r[R_BX];
    uint32_t f = compute_arith(c) & ~F_ZF;
    void *p = atomic_host(c, lin, 8);
    uint64_t old;
    int ok;
    if (p) {
        old = cmp;
        ok = __atomic_compare_exchange_n((uint64_t *)p, &old, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    } else {
        old = ld(c, lin, 8);
        ok = old == cmp;
        st(c, lin, 8, ok ? nv : old);
    }
    if (ok) {
        f |= F_ZF;
    } else {
        c->r[R_AX] = (uint32_t)old;
        c->r[R_DX] = old >> 32;
    }
    set_flags(c, f);
}

/* 0F C7 (group 9): only /1 on memory, cmpxchg8b, or cmpxchg16b with REX.W */
HANDLER exchange_group9(CPU *c, Insn *i)
{
    if ((i->reg & 7) != 1 || i->mod == 3)
        UD();   /* vmptrld & co.; the register forms (rdrand/rdseed) go to insn_bmi.h */
    uint64_t lin = ea_lin(c, i);
    if (i->osz == 8)
        cmpxchg16b(c, lin);
    else
        cmpxchg8b(c, lin);
}

#endif
