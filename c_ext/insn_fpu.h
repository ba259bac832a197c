/* x87 and SSE: dispatch into x87.c and sse.c, and the instructions on their state
 * that the dispatcher handles itself (fwait, emms, 0F AE on memory). */
#ifndef KVMPY_INSN_FPU_H
#define KVMPY_INSN_FPU_H

#include "operands.h"

/* 0F 77 */
HANDLER emms(CPU *c)
{
    mmx_check(c);
    c->ftw = 0xffff;
}

/* 0F AE on memory: fxsave, fxrstor, ldmxcsr, stmxcsr, clflush by ModRM.reg */
HANDLER fpu_state_mem(CPU *c, Insn *i)
{
    switch (i->reg & 7) {
    case 0: fxsave(c, ea_lin(c, i), i->rexw); break;
    case 1: fxrstor(c, ea_lin(c, i), i->rexw); break;
    case 2: {
        uint32_t m = (uint32_t)ld(c, ea_lin(c, i), 4);
        if (m & 0xffff0000u) GP0();
        c->mxcsr = m;
        break;
    }
    case 3: st(c, ea_lin(c, i), 4, c->mxcsr); break;
    case 7: ld(c, ea_lin(c, i), 1); break;   /* clflush: coherent memory, probe only */
    default: UD();
    }
}

/* Opcodes without their own dispatch entry: the SSE ranges go to sse.c, the rest is #UD */
HANDLER sse_or_ud(CPU *c, Insn *i, int op)
{
    if ((op >= 0x110 && op <= 0x117) || (op >= 0x128 && op <= 0x12f) ||
        (op >= 0x150 && op <= 0x17f) || (op >= 0x1c2 && op <= 0x1c6) ||
        (op >= 0x1d0 && op <= 0x1ff) || op >= 0x200)
        sse_exec(c, i);
    else
        UD();
}

#endif
