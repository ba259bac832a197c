/* Shifts and rotates: group 2 (C0, C1, D0-D3), shld/shrd, and the decoder's
 * specialised register-immediate shifts. */
#ifndef KVMPY_INSN_SHIFT_H
#define KVMPY_INSN_SHIFT_H

#include "operands.h"

/* Rotates (kind 0-3: rol, ror, rcl, rcr) and shifts (4-7: shl, shr, sal, sar) with
 * eager flags; the common shifts take the lazy path in shift_group2 instead. */
static uint64_t shift_op(CPU *c, int kind, uint64_t a, unsigned cnt, unsigned sz)
{
    unsigned bits = sz * 8;
    uint64_t m = szmask(sz), r;
    a &= m;
    cnt &= sz == 8 ? 63 : 31;
    if (!cnt)
        return a;
    uint32_t f = kind < 4 ? compute_arith(c) : 0;
    uint32_t cf, of;
    switch (kind) {
    case 0: {
        unsigned n = cnt % bits;
        r = n ? ((a << n) | (a >> (bits - n))) & m : a;
        cf = r & 1;
        of = ((r >> (bits - 1)) & 1) ^ cf;
        f = (f & ~(F_CF | F_OF)) | cf | (of ? F_OF : 0);
        break;
    }
    case 1: {
        unsigned n = cnt % bits;
        r = n ? ((a >> n) | (a << (bits - n))) & m : a;
        cf = (r >> (bits - 1)) & 1;
        of = cf ^ ((r >> (bits - 2)) & 1);
        f = (f & ~(F_CF | F_OF)) | cf | (of ? F_OF : 0);
        break;
    }
    case 2: {
        unsigned n = cnt % (bits + 1);
        r = a;
        cf = f & 1;
        for (unsigned k = 0; k < n; k++) {
            uint32_t ncf = (r >> (bits - 1)) & 1;
            r = ((r << 1) | cf) & m;
            cf = ncf;
        }
        of = ((r >> (bits - 1)) & 1) ^ cf;
        f = (f & ~(F_CF | F_OF)) | cf | (of ? F_OF : 0);
        break;
    }
    case 3: {
        unsigned n = cnt % (bits + 1);
        r = a;
        cf = f & 1;
        for (unsigned k = 0; k < n; k++) {
            uint32_t ncf = r & 1;
            r = (r >> 1) | ((uint64_t)cf << (bits - 1));
            cf = ncf;
        }
        of = ((r >> (bits - 1)) ^ (r >> (bits - 2))) & 1;
        f = (f & ~(F_CF | F_OF)) | cf | (of ? F_OF : 0);
        break;
    }
    case 4: case 6:
        r = (a << cnt) & m;
        cf = cnt <= bits ? (a >> (bits - cnt)) & 1 : 0;
        of = ((r >> (bits - 1)) & 1) ^ cf;
        f = cf | szp(r, sz) | (of ? F_OF : 0);
        break;
    case 5:
        r = a >> cnt;
        cf = (a >> (cnt - 1)) & 1;
        of = cnt == 1 ? (a >> (bits - 1)) & 1 : 0;
        f = cf | szp(r, sz) | (of ? F_OF : 0);
        break;
    default: {
        int64_t sa = sext(a, sz);
        r = (uint64_t)(sa >> cnt) & m;
        cf = (sa >> (cnt - 1)) & 1;
        f = cf | szp(r, sz);
        break;
    }
    }
    set_flags(c, f);
    return r;
}

/* shld (left) / shrd */
static uint64_t shxd(CPU *c, int left, uint64_t dst, uint64_t src, unsigned cnt, unsigned sz)
{
    unsigned bits = sz * 8;
    uint64_t m = szmask(sz), r;
    cnt &= sz == 8 ? 63 : 31;
    dst &= m;
    src &= m;
    if (!cnt)
        return dst;
    uint32_t cf;
    if (sz == 2 && cnt > 16) {
        /* result undefined by the SDM: shift through the 48-bit dst:src:dst (left) or
         * dst:src:dst seen from the right, which is what hardware does */
        uint64_t w = (dst << 32) | (src << 16) | dst;
        if (left) {
            r = (w >> (48 - cnt)) & m;
            cf = (uint32_t)(w >> (48 - cnt + 16)) & 1;
        } else {
            r = (w >> cnt) & m;
            cf = (uint32_t)(w >> (cnt - 1)) & 1;
        }
    } else if (left) {
        r = ((dst << cnt) | (cnt < 64 ? (src >> (bits - cnt)) : 0)) & m;
        if (cnt == bits) r = src;
        cf = (dst >> (bits - cnt)) & 1;
    } else {
        r = ((dst >> cnt) | (src << (bits - cnt))) & m;
        cf = (dst >> (cnt - 1)) & 1;
    }
    uint32_t of = ((r ^ dst) >> (bits - 1)) & 1;
    set_flags(c, cf | szp(r, sz) | (of ? F_OF : 0));
    return r;
}

/* C0/C1 (count imm8), D0/D1 (count 1), D2/D3 (count CL); the kind in ModRM.reg */
HANDLER shift_group2(CPU *c, Insn *i, int op)
{
    unsigned s = (op & 1) ? i->osz : 1;
    unsigned cnt = op <= 0xc1 ? (unsigned)(i->imm & 0xff) : op <= 0xd1 ? 1 : (unsigned)(c->r[R_CX] & 0xff);
    int kind = i->reg & 7;
    uint64_t a, v, lin;
    if (kind >= 4) {
        /* shifts: inline, flags evaluated lazily from (operand, count, result) */
        unsigned n = cnt & (s == 8 ? 63 : 31);
        lin = 0;
        if (i->mod == 3) {
            a = getreg(c, i, i->rm, s);
        } else {
            lin = ea_lin(c, i);
            a = ld(c, lin, s);
        }
        if (n) {
            if (kind == 5)
                v = a >> n;
            else if (kind == 7)
                v = (uint64_t)(sext(a, s) >> n) & szmask(s);
            else
                v = (a << n) & szmask(s);
            set_cc(c, kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL, s, v, a, n);
        } else {
            v = a;
        }
        if (i->mod == 3)
            setreg(c, i, i->rm, s, v);
        else if (n)
            st(c, lin, s, v);
        return;
    }
    if (i->mod == 3) {
        a = getreg(c, i, i->rm, s);
        v = shift_op(c, kind, a, cnt, s);
        setreg(c, i, i->rm, s, v);
    } else {
        lin = ea_lin(c, i);
        a = ld(c, lin, s);
        v = shift_op(c, kind, a, cnt, s);
        st(c, lin, s, v);
    }
}

/* 0F A4/A5 shld, 0F AC/AD shrd: count imm8 (even opcode) or CL (odd) */
HANDLER shift_double(CPU *c, Insn *i, int op)
{
    unsigned sz = i->osz;
    unsigned cnt = (op & 1) ? (unsigned)(c->r[R_CX] & 0xff) : (unsigned)(i->imm & 0xff);
    int left = op < 0x1ac;
    uint64_t v;
    if (i->mod == 3) {
        v = shxd(c, left, getreg(c, i, i->rm, sz), getreg(c, i, i->reg, sz), cnt, sz);
        setreg(c, i, i->rm, sz, v);   /* even a zero count zero-extends a 32-bit register */
    } else {
        uint64_t lin = ea_lin(c, i);
        v = shxd(c, left, ld(c, lin, sz), getreg(c, i, i->reg, sz), cnt, sz);
        st(c, lin, sz, v);
    }
}

/* ---- specialised forms (specialize() in decode.c): shl/shr/sar reg, imm ---- */

HANDLER shift_ri64(CPU *c, Insn *i)
{
    unsigned n = i->imm & 63;
    uint64_t a = c->r[i->rm], v;
    if (n) {
        int kind = (int)i->imm2;
        v = kind == 5 ? a >> n : kind == 7 ? (uint64_t)((int64_t)a >> n) : a << n;
        set_cc(c, kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL, 8, v, a, n);
        c->r[i->rm] = v;
    }
}

HANDLER shift_ri32(CPU *c, Insn *i)
{
    unsigned n = i->imm & 31;
    uint64_t a = (uint32_t)c->r[i->rm], v;
    if (n) {
        int kind = (int)i->imm2;
        v = kind == 5 ? a >> n : kind == 7 ? (uint64_t)(uint32_t)((int32_t)a >> n) : (uint32_t)(a << n);
        set_cc(c, kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL, 4, v, a, n);
        a = v;
    }
    c->r[i->rm] = a;   /* a 32-bit destination is written even for count 0 */
}

#endif
