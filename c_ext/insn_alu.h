/* ALU instructions: the eight binary operations (add, or, adc, sbb, and, sub, xor,
 * cmp) in all their operand forms, test, inc/dec, group 3 (not, neg, mul, imul, div,
 * idiv), three-operand imul, the flag instructions and the BCD leftovers. */
#ifndef KVMPY_INSN_ALU_H
#define KVMPY_INSN_ALU_H

#include "operands.h"

/* the operation number in opcode bits 3-5 (00-3F) and in ModRM.reg of 80-83 */
enum { ALU_ADD, ALU_OR, ALU_ADC, ALU_SBB, ALU_AND, ALU_SUB, ALU_XOR, ALU_CMP };

static inline __attribute__((always_inline)) uint64_t alu(CPU *c, int op, uint64_t a, uint64_t b, unsigned sz)
{
    uint64_t r, cf;
    switch (op) {
    case ALU_ADD: r = a + b; set_cc(c, CC_ADD, sz, r, a, b); return r;
    case ALU_OR: r = a | b; set_cc(c, CC_LOGIC, sz, r, 0, 0); return r;
    case ALU_ADC: cf = get_cf(c); r = a + b + cf; c->cc_c = cf; set_cc(c, CC_ADC, sz, r, a, b); return r;
    case ALU_SBB: cf = get_cf(c); r = a - b - cf; c->cc_c = cf; set_cc(c, CC_SBB, sz, r, a, b); return r;
    case ALU_AND: r = a & b; set_cc(c, CC_LOGIC, sz, r, 0, 0); return r;
    case ALU_SUB: case ALU_CMP: r = a - b; set_cc(c, CC_SUB, sz, r, a, b); return r;
    default: r = a ^ b; set_cc(c, CC_LOGIC, sz, r, 0, 0); return r;
    }
}

/* read-modify-write of operand E with a binary ALU op (lock-aware) */
static inline __attribute__((always_inline)) void alu_E(CPU *c, Insn *i, int op, uint64_t b, unsigned sz)
{
    if (i->mod == 3) {
        uint64_t r = alu(c, op, getreg(c, i, i->rm, sz), b, sz);
        if (op != ALU_CMP)
            setreg(c, i, i->rm, sz, r);
        return;
    }
    uint64_t lin = ea_lin(c, i);
    void *p = lock_ptr(c, i, lin, sz);
    if (p && op != ALU_CMP) {
        uint64_t a, r;
        uint32_t saved_op = c->cc_op, saved_sz = c->cc_size;
        uint64_t sr = c->cc_res, sa = c->cc_a, sb = c->cc_b, sc = c->cc_c;
        for (;;) {
            a = atomic_ld(p, sz);
            r = alu(c, op, a, b, sz);
            if (cas(p, sz, a, r))
                return;
            /* another vCPU changed the operand: retry from the flags as they were */
            c->cc_op = saved_op; c->cc_size = saved_sz; c->cc_res = sr; c->cc_a = sa; c->cc_b = sb; c->cc_c = sc;
        }
    }
    uint64_t a = ld(c, lin, sz);
    uint64_t r = alu(c, op, a, b, sz);
    if (op != ALU_CMP)
        st(c, lin, sz, r);
}

/* 00/01 and the rest of 00-3F with the ModRM operand as destination */
HANDLER alu_rm_reg(CPU *c, Insn *i, int op, unsigned sz)
{
    alu_E(c, i, op, getreg(c, i, i->reg, sz), sz);
}

/* 02/03 and the rest of 00-3F with the register as destination */
HANDLER alu_reg_rm(CPU *c, Insn *i, int op, unsigned sz)
{
    uint64_t v = alu(c, op, getreg(c, i, i->reg, sz), rdE(c, i, sz), sz);
    if (op != ALU_CMP)
        setreg(c, i, i->reg, sz, v);
}

/* 04/05 and the rest of 00-3F with AL/eAX and an immediate */
HANDLER alu_acc_imm(CPU *c, Insn *i, int op, unsigned sz)
{
    uint64_t v = alu(c, op, c->r[R_AX] & szmask(sz), i->imm & szmask(sz), sz);
    if (op != ALU_CMP)
        setreg(c, i, R_AX, sz, v);
}

/* 80-83: the operation in ModRM.reg, an immediate source */
HANDLER alu_rm_imm(CPU *c, Insn *i, unsigned sz)
{
    alu_E(c, i, i->reg & 7, i->imm & szmask(sz), sz);
}

HANDLER test_rm_reg(CPU *c, Insn *i, unsigned sz)
{
    alu(c, ALU_AND, rdE(c, i, sz), getreg(c, i, i->reg, sz), sz);
}

HANDLER test_acc_imm(CPU *c, Insn *i, unsigned sz)
{
    alu(c, ALU_AND, c->r[R_AX] & szmask(sz), i->imm & szmask(sz), sz);
}

/* 40-4F outside 64-bit mode (there they are REX prefixes) */
HANDLER inc_dec_reg(CPU *c, Insn *i, int r, int inc)
{
    unsigned sz = i->osz;
    uint64_t a = getreg(c, i, r, sz);
    uint64_t v = inc ? a + 1 : a - 1;
    c->cc_c = get_cf(c);   /* inc and dec keep CF */
    set_cc(c, inc ? CC_INC : CC_DEC, sz, v, 0, 0);
    setreg(c, i, r, sz, v);
}

/* FE/FF /0 /1 (lock-aware) */
HANDLER inc_dec_rm(CPU *c, Insn *i, unsigned s, int inc)
{
    uint64_t a, v;
    uint64_t cf = get_cf(c);
    if (i->mod == 3) {
        a = getreg(c, i, i->rm, s);
        v = inc ? a + 1 : a - 1;
        setreg(c, i, i->rm, s, v);
    } else {
        uint64_t lin = ea_lin(c, i);
        void *p = lock_ptr(c, i, lin, s);
        if (p) {
            do { a = atomic_ld(p, s); v = inc ? a + 1 : a - 1; } while (!cas(p, s, a, v));
        } else {
            a = ld(c, lin, s);
            v = inc ? a + 1 : a - 1;
            st(c, lin, s, v);
        }
    }
    c->cc_c = cf;
    set_cc(c, inc ? CC_INC : CC_DEC, s, v, 0, 0);
}

static void do_mul(CPU *c, Insn *i, int sgn, uint64_t src, unsigned sz)
{
    uint64_t lo, hi;
    uint32_t ovf;
    if (sz == 8) {
        if (sgn) {
            __int128 p = (__int128)(int64_t)c->r[R_AX] * (int64_t)src;
            lo = (uint64_t)p;
            hi = (uint64_t)(p >> 64);
            ovf = p != (__int128)(int64_t)lo;
        } else {
            unsigned __int128 p = (unsigned __int128)c->r[R_AX] * src;
            lo = (uint64_t)p;
            hi = (uint64_t)(p >> 64);
            ovf = hi != 0;
        }
        c->r[R_AX] = lo;
        c->r[R_DX] = hi;
    } else {
        uint64_t a = c->r[R_AX] & szmask(sz);
        int64_t p;
        uint64_t up;
        unsigned bits = sz * 8;
        if (sgn) {
            p = sext(a, sz) * sext(src, sz);
            lo = (uint64_t)p & szmask(sz);
            hi = ((uint64_t)p >> bits) & szmask(sz);
            ovf = p != sext(lo, sz);
        } else {
            up = a * (src & szmask(sz));
            lo = up & szmask(sz);
            hi = (up >> bits) & szmask(sz);
            ovf = hi != 0;
        }
        if (sz == 1) {
            setreg(c, i, R_AX, 2, lo | (hi << 8));
        } else {
            setreg(c, i, R_AX, sz, lo);
            setreg(c, i, R_DX, sz, hi);
        }
    }
    set_flags(c, (ovf ? F_CF | F_OF : 0) | szp(lo, sz));
}

static void do_div(CPU *c, Insn *i, int sgn, uint64_t src, unsigned sz)
{
    src &= szmask(sz);
    if (src == 0)
        RAISE(c, EXC_DE);
    if (sz == 8) {
        if (sgn) {
            __int128 n = (__int128)(((unsigned __int128)c->r[R_DX] << 64) | c->r[R_AX]);
            int64_t d = (int64_t)src;
            if (n == ((__int128)1 << 127) && d == -1)
                RAISE(c, EXC_DE);
            __int128 q = n / d, rem = n % d;
            if (q != (__int128)(int64_t)q)
                RAISE(c, EXC_DE);
            c->r[R_AX] = (uint64_t)q;
            c->r[R_DX] = (uint64_t)rem;
        } else {
            unsigned __int128 n = ((unsigned __int128)c->r[R_DX] << 64) | c->r[R_AX];
            if (c->r[R_DX] >= src)
                RAISE(c, EXC_DE);
            c->r[R_AX] = (uint64_t)(n / src);
            c->r[R_DX] = (uint64_t)(n % src);
        }
        return;
    }
    unsigned bits = sz * 8;
    uint64_t n = sz == 1 ? (c->r[R_AX] & 0xffff)
                         : ((c->r[R_DX] & szmask(sz)) << bits) | (c->r[R_AX] & szmask(sz));
    uint64_t q, rem;
    if (sgn) {
        int64_t sn = sext(n, sz * 2 > 8 ? 8 : sz * 2);
        int64_t sd = sext(src, sz);
        int64_t sq = sn / sd, sr = sn % sd;
        if (sq != sext((uint64_t)sq & szmask(sz), sz))
            RAISE(c, EXC_DE);
        q = (uint64_t)sq & szmask(sz);
        rem = (uint64_t)sr & szmask(sz);
    } else {
        q = n / src;
        rem = n % src;
        if (q > szmask(sz))
            RAISE(c, EXC_DE);
    }
    if (sz == 1) {
        setreg(c, i, R_AX, 2, q | (rem << 8));
    } else {
        setreg(c, i, R_AX, sz, q);
        setreg(c, i, R_DX, sz, rem);
    }
}

/* F6/F7: test, not, neg, mul, imul, div, idiv by ModRM.reg */
HANDLER alu_group3(CPU *c, Insn *i, unsigned s)
{
    uint64_t a, lin;
    switch (i->reg & 7) {
    case 0: case 1:
        alu(c, ALU_AND, rdE(c, i, s), i->imm & szmask(s), s);
        break;
    case 2:
        if (i->mod == 3) {
            setreg(c, i, i->rm, s, ~getreg(c, i, i->rm, s));
        } else {
            lin = ea_lin(c, i);
            void *p = lock_ptr(c, i, lin, s);
            if (p) {
                do a = atomic_ld(p, s); while (!cas(p, s, a, ~a));
            } else {
                st(c, lin, s, ~ld(c, lin, s));
            }
        }
        break;
    case 3:
        if (i->mod == 3) {
            a = getreg(c, i, i->rm, s);
            set_cc(c, CC_SUB, s, 0 - a, 0, a);
            setreg(c, i, i->rm, s, 0 - a);
        } else {
            lin = ea_lin(c, i);
            void *p = lock_ptr(c, i, lin, s);
            if (p) {
                do a = atomic_ld(p, s); while (!cas(p, s, a, 0 - a));
            } else {
                a = ld(c, lin, s);
                st(c, lin, s, 0 - a);
            }
            set_cc(c, CC_SUB, s, 0 - a, 0, a);
        }
        break;
    case 4: do_mul(c, i, 0, rdE(c, i, s), s); break;
    case 5: do_mul(c, i, 1, rdE(c, i, s), s); break;
    case 6: do_div(c, i, 0, rdE(c, i, s), s); break;
    default: do_div(c, i, 1, rdE(c, i, s), s); break;
    }
}

/* 69, 6B (reg = E * immediate) and 0F AF (reg = reg * E) */
HANDLER imul_reg_rm(CPU *c, Insn *i, int op)
{
    unsigned sz = i->osz;
    int64_t x = sext(rdE(c, i, sz), sz);
    int64_t y = op == 0x1af ? sext(getreg(c, i, i->reg, sz), sz) : (int64_t)i->imm;
    uint64_t r;
    uint32_t ovf;
    if (sz == 8) {
        __int128 p = (__int128)x * y;
        r = (uint64_t)p;
        ovf = p != (__int128)(int64_t)r;
    } else {
        int64_t p = x * sext((uint64_t)y, sz);
        r = (uint64_t)p & szmask(sz);
        ovf = p != sext(r, sz);
    }
    setreg(c, i, i->reg, sz, r);
    set_flags(c, (ovf ? F_CF | F_OF : 0) | szp(r, sz));
}

/* ---- flag instructions ---- */

HANDLER cmc(CPU *c) { set_flags(c, compute_arith(c) ^ F_CF); }
HANDLER clc(CPU *c) { set_flags(c, compute_arith(c) & ~F_CF); }
HANDLER stc(CPU *c) { set_flags(c, compute_arith(c) | F_CF); }
HANDLER cld(CPU *c) { c->eflags &= ~(uint64_t)F_DF; }
HANDLER std(CPU *c) { c->eflags |= F_DF; }

HANDLER sahf(CPU *c)
{
    uint32_t f = compute_arith(c);
    f = (f & F_OF) | ((c->r[R_AX] >> 8) & (F_SF | F_ZF | F_AF | F_PF | F_CF));
    set_flags(c, f);
}

HANDLER lahf(CPU *c, Insn *i)
{
    setreg(c, i, 4, 1, (get_eflags(c) & 0xd5) | 2);   /* AH */
}

/* ---- BCD leftovers (not in 64-bit mode) ---- */

HANDLER aam(CPU *c, Insn *i)
{
    unsigned base = i->imm & 0xff;
    if (!base) RAISE(c, EXC_DE);
    unsigned al = c->r[R_AX] & 0xff;
    uint64_t v = ((al / base) << 8) | (al % base);
    setreg(c, i, R_AX, 2, v);
    set_flags(c, szp(v & 0xff, 1));
}

HANDLER aad(CPU *c, Insn *i)
{
    unsigned base = i->imm & 0xff;
    uint64_t v = ((c->r[R_AX] & 0xff) + ((c->r[R_AX] >> 8) & 0xff) * base) & 0xff;
    setreg(c, i, R_AX, 2, v);
    set_flags(c, szp(v, 1));
}

/* D6: AL = CF ? FF : 00 */
HANDLER salc(CPU *c, Insn *i)
{
    setreg(c, i, R_AX, 1, get_cf(c) ? 0xff : 0);
}

/* ---- specialised forms (specialize() in decode.c): 32/64-bit registers, no size switch ---- */

HANDLER alu_rr64(CPU *c, Insn *i, int op)
{
    uint64_t v = alu(c, op, c->r[i->rm], c->r[i->reg], 8);
    if (op != ALU_CMP) c->r[i->rm] = v;
}

HANDLER alu_rr32(CPU *c, Insn *i, int op)
{
    uint64_t v = alu(c, op, (uint32_t)c->r[i->rm], (uint32_t)c->r[i->reg], 4);
    if (op != ALU_CMP) c->r[i->rm] = (uint32_t)v;
}

HANDLER alu_ri64(CPU *c, Insn *i, int op)
{
    uint64_t v = alu(c, op, c->r[i->rm], i->imm, 8);
    if (op != ALU_CMP) c->r[i->rm] = v;
}

HANDLER alu_ri32(CPU *c, Insn *i, int op)
{
    uint64_t v = alu(c, op, (uint32_t)c->r[i->rm], (uint32_t)i->imm, 4);
    if (op != ALU_CMP) c->r[i->rm] = (uint32_t)v;
}

/* reg <- reg op E (E a register for sub/cmp, else memory) */
HANDLER load_alu64(CPU *c, Insn *i)
{
    int op = (int)(i->imm2 & 0xff);
    uint64_t src = (i->imm2 & 0x100) ? c->r[i->rm] : ld(c, ea_lin(c, i), 8);
    uint64_t v = alu(c, op, c->r[i->reg], src, 8);
    if (op != ALU_CMP) c->r[i->reg] = v;
}

HANDLER load_alu32(CPU *c, Insn *i)
{
    int op = (int)(i->imm2 & 0xff);
    uint64_t src = (i->imm2 & 0x100) ? (uint32_t)c->r[i->rm] : ld(c, ea_lin(c, i), 4);
    uint64_t v = alu(c, op, (uint32_t)c->r[i->reg], src, 4);
    if (op != ALU_CMP) c->r[i->reg] = (uint32_t)v;
}

HANDLER test_rr64(CPU *c, Insn *i) { set_cc(c, CC_LOGIC, 8, c->r[i->rm] & c->r[i->reg], 0, 0); }
HANDLER test_rr32(CPU *c, Insn *i) { set_cc(c, CC_LOGIC, 4, (uint32_t)(c->r[i->rm] & c->r[i->reg]), 0, 0); }

#endif
