/* Data movement: mov in its forms, movzx/movsx/movsxd, lea, cmovcc, setcc, xlat,
 * cbw/cwd and their wider forms, and the decoder's specialised mov/load/store/lea. */
#ifndef KVMPY_INSN_MOVE_H
#define KVMPY_INSN_MOVE_H

#include "operands.h"

/* 88/89 */
HANDLER mov_rm_reg(CPU *c, Insn *i, unsigned sz)
{
    wrE(c, i, sz, getreg(c, i, i->reg, sz));
}

/* 8A/8B */
HANDLER mov_reg_rm(CPU *c, Insn *i, unsigned sz)
{
    setreg(c, i, i->reg, sz, rdE(c, i, sz));
}

/* C6/C7 /0 */
HANDLER mov_rm_imm(CPU *c, Insn *i, unsigned sz)
{
    if ((i->reg & 7) != 0) UD();
    wrE(c, i, sz, i->imm);
}

/* B0-BF */
HANDLER mov_reg_imm(CPU *c, Insn *i, unsigned sz)
{
    setreg(c, i, i->reg, sz, i->imm);
}

/* A0/A1: AL/eAX from the absolute offset in the instruction */
HANDLER mov_acc_moffs(CPU *c, Insn *i, unsigned sz)
{
    uint64_t v = ld(c, linear(c, i->seg, (uint64_t)i->disp & szmask(i->asz)), sz);
    setreg(c, i, R_AX, sz, v);
}

/* A2/A3 */
HANDLER mov_moffs_acc(CPU *c, Insn *i, unsigned sz)
{
    st(c, linear(c, i->seg, (uint64_t)i->disp & szmask(i->asz)), sz, c->r[R_AX]);
}

/* 8D */
HANDLER lea(CPU *c, Insn *i)
{
    if (i->mod == 3) UD();
    setreg(c, i, i->reg, i->osz, ea_off(c, i));
}

/* 0F B6/B7 (zero-extending) and 0F BE/BF (sign-extending) from a byte or word */
HANDLER movzx(CPU *c, Insn *i, unsigned from)
{
    setreg(c, i, i->reg, i->osz, rdE(c, i, from));
}

HANDLER movsx(CPU *c, Insn *i, unsigned from)
{
    setreg(c, i, i->reg, i->osz, (uint64_t)sext(rdE(c, i, from), from));
}

/* 63: movsxd in 64-bit mode; arpl elsewhere, which nothing we run uses */
HANDLER movsxd(CPU *c, Insn *i)
{
    if (!c->long64)
        UD();
    setreg(c, i, i->reg, i->osz, (uint64_t)(int64_t)(int32_t)rdE(c, i, 4));
}

/* 0F 40-4F. The source is read (and may fault) whatever the condition. */
HANDLER cmov(CPU *c, Insn *i, int cc)
{
    unsigned sz = i->osz;
    uint64_t v = rdE(c, i, sz);
    if (cond(c, cc))
        setreg(c, i, i->reg, sz, v);
    else if (sz == 4)
        c->r[i->reg] = (uint32_t)c->r[i->reg];   /* a 32-bit destination is zero-extended either way */
}

/* 0F 90-9F */
HANDLER setcc(CPU *c, Insn *i, int cc)
{
    wrE(c, i, 1, cond(c, cc));
}

/* D7: AL = [seg:(e/r)BX + AL] */
HANDLER xlat(CPU *c, Insn *i)
{
    uint64_t off = (areg(c, R_BX, i->asz) + (c->r[R_AX] & 0xff)) & szmask(i->asz);
    setreg(c, i, R_AX, 1, ld(c, linear(c, i->seg, off), 1));
}

/* 98: cbw / cwde / cdqe */
HANDLER sign_extend_acc(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    if (sz == 2) setreg(c, i, R_AX, 2, (uint64_t)(int64_t)(int8_t)c->r[R_AX]);
    else if (sz == 4) setreg(c, i, R_AX, 4, (uint64_t)(int64_t)(int16_t)c->r[R_AX]);
    else c->r[R_AX] = (uint64_t)(int64_t)(int32_t)c->r[R_AX];
}

/* 99: cwd / cdq / cqo */
HANDLER sign_fill_dx(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    setreg(c, i, R_DX, sz, (c->r[R_AX] & sbit(sz)) ? ~0ull : 0);
}

/* ---- specialised forms (specialize() in decode.c): 32/64-bit, no size switch ---- */

HANDLER mov_rr64(CPU *c, uint8_t dst, uint8_t src) { c->r[dst] = c->r[src]; }
HANDLER mov_rr32(CPU *c, uint8_t dst, uint8_t src) { c->r[dst] = (uint32_t)c->r[src]; }
HANDLER load64(CPU *c, Insn *i) { c->r[i->reg] = ld(c, ea_lin(c, i), 8); }
HANDLER load32(CPU *c, Insn *i) { c->r[i->reg] = ld(c, ea_lin(c, i), 4); }
HANDLER store64(CPU *c, Insn *i) { st(c, ea_lin(c, i), 8, c->r[i->reg]); }
HANDLER store32(CPU *c, Insn *i) { st(c, ea_lin(c, i), 4, c->r[i->reg]); }
HANDLER lea64(CPU *c, Insn *i) { c->r[i->reg] = ea_off(c, i); }

#endif
