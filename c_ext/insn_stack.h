/* Stack instructions: push/pop of registers, immediates, segment registers, flags
 * and memory, pusha/popa, enter/leave. (call/ret are control flow: insn_control.h.) */
#ifndef KVMPY_INSN_STACK_H
#define KVMPY_INSN_STACK_H

#include "operands.h"

/* 50-57 */
HANDLER push_reg(CPU *c, Insn *i)
{
    push(c, i->osz, getreg(c, i, i->reg, i->osz));
}

/* 58-5F */
HANDLER pop_reg(CPU *c, Insn *i)
{
    uint64_t v = pop(c, i->osz);
    setreg(c, i, i->reg, i->osz, v);
}

/* 68/6A (the decoder sign-extended the immediate) */
HANDLER push_imm(CPU *c, Insn *i)
{
    push(c, i->osz, i->imm);
}

/* 06/0E/16/1E, 0F A0/A8 */
HANDLER push_seg(CPU *c, Insn *i, int sreg)
{
    push(c, i->osz, c->seg[sreg].sel);
}

/* 07/17/1F, 0F A1/A9. rsp moves only once the segment load has not faulted. */
HANDLER pop_seg(CPU *c, Insn *i, int sreg)
{
    unsigned sz = i->osz;
    uint64_t v = peek(c, sz, 0);
    load_seg(c, sreg, (uint16_t)v);
    c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
    if (sreg == S_SS)
        c->shadow = 1;   /* no interrupt before the next instruction (which sets rsp) */
}

/* 8F /0. The address uses the incremented rsp, the store must fault with rsp intact. */
HANDLER pop_rm(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    uint64_t v = peek(c, sz, 0);
    if (i->mod == 3) {
        c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
        setreg(c, i, i->rm, sz, v);
        return;
    }
    uint64_t osp = c->r[R_SP];
    c->r[R_SP] = sp_add(c, osp, sz);
    uint64_t lin = ea_lin(c, i);
    c->r[R_SP] = osp;
    st(c, lin, sz, v);
    c->r[R_SP] = sp_add(c, osp, sz);
}

/* 60 */
HANDLER pusha(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    uint64_t osp = c->r[R_SP];
    uint64_t sp = c->r[R_SP];
    for (int r = 0; r < 8; r++) {
        sp = sp_add(c, sp, -(int64_t)sz);
        st(c, sp_lin(c, sp), sz, r == R_SP ? osp : c->r[r]);
    }
    c->r[R_SP] = sp;
}

/* 61: every load before the first register write, so a fault changes nothing */
HANDLER popa(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    uint64_t vals[8];
    for (int r = 7; r >= 0; r--)
        vals[r] = peek(c, sz, (7 - r) * sz);
    for (int r = 0; r < 8; r++)
        if (r != R_SP)
            setreg(c, i, r, sz, vals[r]);
    c->r[R_SP] = sp_add(c, c->r[R_SP], 8 * sz);
}

/* 9C: #GP in V86 mode below IOPL 3 (no VME) */
HANDLER pushf(CPU *c, Insn *i)
{
    if ((c->eflags & F_VM) && ((c->eflags >> 12) & 3) != 3) GP0();
    push(c, i->osz, get_eflags(c) & ~(uint64_t)(F_VM | F_RF));
}

/* 9D: which flags it may change depends on the operand size, CPL and IOPL */
HANDLER popf(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    if ((c->eflags & F_VM) && ((c->eflags >> 12) & 3) != 3) GP0();
    uint64_t v = peek(c, sz, 0);
    uint64_t mask = F_ARITH | F_TF | F_DF | F_NT | F_OF;
    if (sz >= 4) mask |= F_AC | F_ID;
    if (c->cpl == 0) mask |= F_IOPL;
    if (c->cpl <= (int)((c->eflags >> 12) & 3)) mask |= F_IF;
    set_eflags(c, v, mask);
    c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
}

/* C8: enter frame_size, nesting level */
HANDLER enter(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    unsigned level = i->imm2 & 31;
    uint64_t frame_sz = i->imm & 0xffff;
    uint64_t sp = sp_add(c, c->r[R_SP], -(int64_t)sz);
    st(c, sp_lin(c, sp), sz, c->r[R_BP]);
    uint64_t frame = sp;
    uint64_t bp = c->r[R_BP];
    for (unsigned k = 1; k < level; k++) {
        bp = sp_add(c, bp, -(int64_t)sz);
        uint64_t v = ld(c, sp_lin(c, bp), sz);
        sp = sp_add(c, sp, -(int64_t)sz);
        st(c, sp_lin(c, sp), sz, v);
    }
    if (level) {
        sp = sp_add(c, sp, -(int64_t)sz);
        st(c, sp_lin(c, sp), sz, frame);
    }
    sp = sp_add(c, sp, -(int64_t)frame_sz);
    setreg(c, i, R_BP, sz, frame);
    c->r[R_SP] = sp;
}

/* C9 */
HANDLER leave(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    int ss = stack_sz(c);
    uint64_t nsp = ss == 8 ? c->r[R_BP] : ss == 4 ? (uint32_t)c->r[R_BP]
                                                  : ((c->r[R_SP] & ~0xffffull) | (uint16_t)c->r[R_BP]);
    uint64_t v = ld(c, sp_lin(c, nsp), sz);   /* a fault here leaves rsp untouched */
    c->r[R_SP] = sp_add(c, nsp, sz);
    setreg(c, i, R_BP, sz, v);
}

#endif
