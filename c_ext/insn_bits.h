/* Bit instructions: bt/bts/btr/btc, bsf/bsr, tzcnt/lzcnt, popcnt, bswap. */
#ifndef KVMPY_INSN_BITS_H
#define KVMPY_INSN_BITS_H

#include "operands.h"

/* bt (kind 0), bts (1), btr (2), btc (3). A register bit offset addresses memory
 * beyond the operand (signed, in operand-size steps); an immediate one wraps. */
static void bit_op(CPU *c, Insn *i, int kind, uint64_t bitoff, int imm_form)
{
    unsigned sz = i->osz;
    unsigned bits = sz * 8;
    uint64_t v, nv, lin = 0;
    unsigned bit;
    if (i->mod == 3) {
        bit = bitoff & (bits - 1);
        v = getreg(c, i, i->rm, sz);
    } else {
        int64_t off;
        if (imm_form) {
            off = 0;
            bit = bitoff & (bits - 1);
        } else {
            int64_t sb = sext(bitoff, sz);
            off = (sb >> (sz == 8 ? 6 : sz == 4 ? 5 : 4)) * (int64_t)sz;
            bit = (uint64_t)sb & (bits - 1);
        }
        uint64_t eo = ea_off(c, i) + off;
        if (i->asz == 4) eo = (uint32_t)eo;
        else if (i->asz == 2) eo = (uint16_t)eo;
        lin = linear(c, i->seg, eo);
        void *p = kind ? lock_ptr(c, i, lin, sz) : 0;
        if (p) {
            for (;;) {
                v = atomic_ld(p, sz);
                nv = kind == 1 ? v | (1ull << bit) : kind == 2 ? v & ~(1ull << bit) : v ^ (1ull << bit);
                if (cas(p, sz, v, nv))
                    break;
            }
            set_flags(c, (compute_arith(c) & ~F_CF) | ((v >> bit) & 1));
            return;
        }
        v = ld(c, lin, sz);
    }
    uint32_t cf = (v >> bit) & 1;
    if (kind) {
        nv = kind == 1 ? v | (1ull << bit) : kind == 2 ? v & ~(1ull << bit) : v ^ (1ull << bit);
        if (i->mod == 3)
            setreg(c, i, i->rm, sz, nv);
        else
            st(c, lin, sz, nv);
    }
    set_flags(c, (compute_arith(c) & ~F_CF) | cf);
}

/* 0F A3 bt, AB bts, B3 btr, BB btc with the bit offset in a register */
HANDLER bit_test_reg(CPU *c, Insn *i, int kind)
{
    bit_op(c, i, kind, getreg(c, i, i->reg, i->osz), 0);
}

/* 0F BA: bt/bts/btr/btc with an immediate bit offset, kind in ModRM.reg 4-7 */
HANDLER bit_test_imm(CPU *c, Insn *i)
{
    if ((i->reg & 7) < 4) UD();
    bit_op(c, i, (i->reg & 7) - 4, i->imm & 0xff, 1);
}

/* 0F BC/BD: bsf/bsr, or tzcnt/lzcnt with an F3 prefix */
HANDLER bit_scan(CPU *c, Insn *i, int op)
{
    unsigned sz = i->osz;
    uint64_t v = rdE(c, i, sz);
    unsigned bits = sz * 8;
    if (i->pfx == 2) {   /* tzcnt / lzcnt */
        uint64_t cnt;
        if (op == 0x1bc) cnt = v ? (uint64_t)__builtin_ctzll(v) : bits;
        else cnt = v ? (uint64_t)(__builtin_clzll(v) - (64 - bits)) : bits;
        setreg(c, i, i->reg, sz, cnt);
        set_flags(c, (compute_arith(c) & ~(F_CF | F_ZF)) | (v == 0 ? F_CF : 0) | (cnt == 0 ? F_ZF : 0));
    } else {
        if (v == 0) {
            /* destination "undefined": kept, but a 32-bit one is zero-extended as on Intel */
            if (sz == 4)
                c->r[i->reg] = (uint32_t)c->r[i->reg];
            set_flags(c, (compute_arith(c)) | F_ZF);
        } else {
            uint64_t idx = op == 0x1bc ? (uint64_t)__builtin_ctzll(v) : (uint64_t)(63 - __builtin_clzll(v));
            setreg(c, i, i->reg, sz, idx);
            set_flags(c, compute_arith(c) & ~F_ZF);
        }
    }
}

/* F3 0F B8 */
HANDLER popcnt(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    if (i->pfx != 2) UD();
    uint64_t v = rdE(c, i, sz);
    uint64_t cnt = __builtin_popcountll(v);
    setreg(c, i, i->reg, sz, cnt);
    set_flags(c, v == 0 ? F_ZF : 0);
}

/* 0F C8-CF */
HANDLER bswap(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    if (sz == 8) c->r[i->reg] = __builtin_bswap64(c->r[i->reg]);
    else if (sz == 4) c->r[i->reg] = __builtin_bswap32((uint32_t)c->r[i->reg]);
    else setreg(c, i, i->reg, 2, 0);   /* 16-bit bswap: undefined, hardware gives 0 */
}

#endif
