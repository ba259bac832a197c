/* Leaving an instruction before its end: a guest exception (raise_exc) or a VM
 * exit (cpu_exit). Both unwind to cpu_run's setjmp; instructions write back only
 * after their last memory access (tcg.h), so the instruction restarts cleanly.
 * Every other file calls these, so they sit in a unit of their own that calls
 * nothing. */
#include "tcg.h"

void raise_exc(CPU *c, int vec, uint32_t err, int has_err)
{
    c->exc_vec = vec;
    c->exc_err = err;
    c->exc_has_err = has_err;
    longjmp(c->jb, 1);
}

void cpu_exit(CPU *c, int reason)
{
    c->exit_reason = reason;
    longjmp(c->jb, 2);
}
