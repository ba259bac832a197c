/* The native tier: hot blocks compiled to host x86-64 code.
 *
 * A compiled block is a plain SysV function `void f(CPU *c)` in the CPU's code arena.
 * Instructions with a native form become host code over the CPU struct (guest
 * registers live in memory, c->r[]; up to eight of a block's most used ones live in
 * host registers (native.c cache_regs) within the block and are written back to c->r[]
 * before anything else can read it: a helper call or slow path, a byte or word form, a
 * block exit); every other
 * instruction becomes a call to the
 * `step` function the caller passes in (exec.c's native_step), which runs the
 * interpreter's handler for that one Insn, so a block is always covered whole.
 *
 * Invariants the generated code keeps, so the interpreter can take over anywhere:
 *  - c->rip is the guest rip of an instruction before anything of it can fault or
 *    exit (the step helper stores it; native forms cannot fault), and the next rip
 *    when the block function returns;
 *  - the lazy flags (cc_op, cc_size, cc_res, cc_a, cc_b, cc_c) are written as the
 *    interpreter's handler writes them wherever something can read them (but for what
 *    no reader looks at, flags.h: the operands of the logic, inc and dec kinds are not
 *    written, and a 32-bit record's fields may differ above bit 31, as every reader
 *    masks them to cc_size): before
 *    every helper call, slow path, possible fault and block exit. Within a block the
 *    guest's flags also live in the host flags (every native producer ends with the
 *    host operation at the guest's size), so jcc, setcc, cmovcc, adc/sbb, inc/dec and
 *    rol/ror read them there; a producer whose flags only such consumers read before
 *    the next producer skips the lazy record (flags_dead_after). Where the host flags
 *    were clobbered (a TLB check, a slow path), a consumer rebuilds them by running
 *    the recorded operation again (emit_remat) rather than calling cond();
 *  - the code uses the block's entry rip (Block.pc) as a constant: exec.c enters it
 *    only when c->rip == b->pc.
 * Faults leave through the interpreter's longjmp, which needs no unwinding of the
 * native frame (it saves rbx, rbp and r12-r15, callee-saved registers setjmp
 * restores; r9-r11 hold nothing across a call out).
 *
 * Layering (see tcg.h): native.c calls nothing of exec.c; exec.c passes its helper in.
 */
#ifndef KVMPY_NATIVE_H
#define KVMPY_NATIVE_H

#include <stddef.h>
#include "tcg.h"

/* runs one instruction of c->cur_block through the interpreter, rip = its guest rip;
 * nonzero when the block must end after it (the interpreter's stop_block) */
typedef int (*NativeStepFn)(CPU *c, Insn *i, uint64_t rip);

/* the executions of a block before it is compiled, unless KVMPY_TCG_NATIVE_THRESHOLD
 * says otherwise (a number, or "off") */
#define NATIVE_DEFAULT_THRESHOLD 50
#define NATIVE_OFF (-1)
int native_threshold_from_env(void);

/* The arena is mapped when the CPU is made, before the seccomp sandbox closes. */
int native_arena_init(CPU *c);
void native_arena_free(CPU *c);
/* every compiled block is dropped with the block cache (block_cache_flush) */
static inline void native_arena_reset(CPU *c)
{
    c->nat_used = 0;
    c->nat_full = 0;
}

/* host code for b, or 0 (arena full, or no arena): b then stays interpreted */
void *native_compile(CPU *c, Block *b, NativeStepFn step);

/* Does instruction i have a native form? (the differential test picks its ops here) */
int native_has_form(const Insn *i);

/* Direct chaining: a block ending in a direct jmp/jcc/call (or running into its
 * 64-instruction or page limit) leaves through an exit that jumps straight to the
 * compiled successor recorded in its Block.nat_succ slot, when at that moment
 *  - no asynchronous request, halt, interrupt shadow, stop or replay is pending
 *    (what cpu_run and native_ready would look at between the two blocks),
 *  - this CPU has seen every code-page mark (code_epoch),
 *  - the successor is valid and its page is still what this CPU fetches from there
 *    (block_fits' TLB test: tag_x and paddr).
 * Otherwise the exit returns as before, leaving CPU.nat_exit_slot at its slot, and
 * exec.c fills the slot once it has found the successor through the usual lookup. A
 * successor must match the block's mode and cs base and lie on one page. */
static inline int native_chain_fits(const Block *from, const Block *to)
{
    return to->native && to->phys2 == ~0ull && to->mode == from->mode && to->cs_base == from->cs_base;
}

static inline void native_run(CPU *c, void *code)
{
    ((void (*)(CPU *))code)(c);
}

#endif
