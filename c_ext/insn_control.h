/* Control flow: jumps, calls and returns (near and far), conditional jumps, loop and
 * jcxz, software interrupts, iret, and group 4/5 (FE/FF). A taken branch sets
 * next_rip; the decoder ends the block after every one of them. */
#ifndef KVMPY_INSN_CONTROL_H
#define KVMPY_INSN_CONTROL_H

#include "insn_alu.h"

/* 70-7F, 0F 80-8F */
HANDLER jump_if(CPU *c, Insn *i, int cc)
{
    if (cond(c, cc))
        c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
}

/* E9/EB */
HANDLER jump_rel(CPU *c, Insn *i)
{
    c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
}

/* E8 */
HANDLER call_rel(CPU *c, Insn *i)
{
    push(c, i->osz, c->next_rip);
    c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
}

/* C3, and C2 which releases imm16 more bytes of stack */
HANDLER ret_near(CPU *c, Insn *i, int op)
{
    uint64_t v = pop(c, i->osz);
    if (op == 0xc2)
        c->r[R_SP] = sp_add(c, c->r[R_SP], i->imm & 0xffff);
    c->next_rip = ip_mask(c, i, v);
}

/* E0 loopne, E1 loope, E2 loop: the counter is cx/ecx/rcx by address size */
HANDLER loop_cx(CPU *c, Insn *i, int op)
{
    uint64_t cx = areg(c, R_CX, i->asz) - 1;
    areg_set(c, R_CX, i->asz, cx);
    cx &= szmask(i->asz);
    int take = cx != 0;
    if (op == 0xe0) take = take && !(compute_arith(c) & F_ZF);
    if (op == 0xe1) take = take && (compute_arith(c) & F_ZF);
    if (take)
        c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
}

/* E3 */
HANDLER jump_if_cx_zero(CPU *c, Insn *i)
{
    if (areg(c, R_CX, i->asz) == 0)
        c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
}

/* 9A call far / EA jmp far to the ptr16:16/32 in the instruction */
HANDLER far_jump_imm(CPU *c, Insn *i, int call)
{
    do_far_jump(c, (uint16_t)i->imm2, i->imm & szmask(i->osz), call, i->osz);
}

/* CB, and CA which releases imm16 more bytes of stack */
HANDLER far_ret(CPU *c, Insn *i, int op)
{
    do_far_ret(c, i->osz, op == 0xca ? (uint32_t)(i->imm & 0xffff) : 0);
}

/* CC int3, CD int imm8, CE into, F1 int1 (icebp: delivered like a hardware #DB) */
HANDLER soft_interrupt(CPU *c, Insn *i, int op)
{
    int vec = op == 0xcc ? 3 : op == 0xcd ? (int)(i->imm & 0xff) : op == 0xce ? 4 : 1;
    if (op == 0xce && !(compute_arith(c) & F_OF))
        return;
    if ((c->eflags & F_VM) && op == 0xcd && ((c->eflags >> 12) & 3) != 3)
        GP0();
    c->delivering = vec;
    deliver_interrupt(c, vec, op != 0xf1, 0, 0, c->next_rip);
    c->delivering = -1;
    c->next_rip = c->rip;   /* the handler's entry, where delivery left rip */
}

/* FE (group 4: inc/dec of a byte) and FF (group 5: inc, dec, near call, far call,
 * near jmp, far jmp, push), by ModRM.reg */
HANDLER group4_5(CPU *c, Insn *i, int op)
{
    unsigned sz = i->osz;
    int r = i->reg & 7;
    if (op == 0xfe && r > 1) UD();
    if (r <= 1) {
        inc_dec_rm(c, i, op == 0xfe ? 1 : sz, r == 0);
        return;
    }
    uint64_t v;
    switch (r) {
    case 2:
        v = rdE(c, i, sz);
        push(c, sz, c->next_rip);
        c->next_rip = ip_mask(c, i, v);
        break;
    case 4:
        c->next_rip = ip_mask(c, i, rdE(c, i, sz));
        break;
    case 3: case 5: {   /* m16:16 / m16:32 / m16:64 */
        if (i->mod == 3) UD();
        uint64_t lin = ea_lin(c, i);
        v = ld(c, lin, sz);
        uint16_t sel = (uint16_t)ld(c, linear(c, i->seg, ea_off(c, i) + sz), 2);
        do_far_jump(c, sel, v, r == 3, sz);
        break;
    }
    case 6:
        push(c, sz, rdE(c, i, sz));
        break;
    default:
        UD();
    }
}

#endif
