/* Operand access for the instruction handlers (insn_*.h, included by exec.c only):
 * registers by operand size, the ModRM operand E, the stack, address-size registers
 * for string and loop instructions, and the host atomics behind locked operations.
 * All inline: each handler compiles into the dispatch label that calls it.
 */
#ifndef KVMPY_OPERANDS_H
#define KVMPY_OPERANDS_H

#include "access.h"
#include "flags.h"

/* An instruction handler: inlined into its dispatch label in exec_block, so splitting
 * the semantics by instruction group costs no call. */
#define HANDLER static inline __attribute__((always_inline)) void

#define UD() RAISE(c, EXC_UD)
#define GP0() RAISE_ERR(c, EXC_GP, 0)
#define NEED_CPL0() do { if (c->cpl != 0) GP0(); } while (0)

/* ---- registers and the ModRM operand ---- */

static inline __attribute__((always_inline)) uint64_t getreg(CPU *c, Insn *i, int r, unsigned sz)
{
    switch (sz) {
    case 1:
        if (!i->rex && r >= 4 && r < 8)
            return (c->r[r - 4] >> 8) & 0xff;
        return c->r[r] & 0xff;
    case 2: return c->r[r] & 0xffff;
    case 4: return c->r[r] & 0xffffffff;
    default: return c->r[r];
    }
}

static inline __attribute__((always_inline)) void setreg(CPU *c, Insn *i, int r, unsigned sz, uint64_t v)
{
    switch (sz) {
    case 1:
        if (!i->rex && r >= 4 && r < 8)
            c->r[r - 4] = (c->r[r - 4] & ~0xff00ull) | ((v & 0xff) << 8);
        else
            c->r[r] = (c->r[r] & ~0xffull) | (v & 0xff);
        break;
    case 2: c->r[r] = (c->r[r] & ~0xffffull) | (v & 0xffff); break;
    case 4: c->r[r] = (uint32_t)v; break;
    default: c->r[r] = v; break;
    }
}


static inline __attribute__((always_inline)) uint64_t rdE(CPU *c, Insn *i, unsigned sz)
{
    if (i->mod == 3)
        return getreg(c, i, i->rm, sz);
    return ld(c, ea_lin(c, i), sz);
}

static inline __attribute__((always_inline)) void wrE(CPU *c, Insn *i, unsigned sz, uint64_t v)
{
    if (i->mod == 3)
        setreg(c, i, i->rm, sz, v);
    else
        st(c, ea_lin(c, i), sz, v);
}

/* ---- the stack: SS's size (16/32 bits) or flat 64-bit ---- */

static inline __attribute__((always_inline)) int stack_sz(CPU *c)
{
    if (c->long64)
        return 8;
    return c->seg[S_SS].db ? 4 : 2;
}

static inline __attribute__((always_inline)) uint64_t sp_add(CPU *c, uint64_t sp, int64_t d)
{
    int ss = stack_sz(c);
    if (ss == 8)
        return sp + d;
    if (ss == 4)
        return (uint32_t)(sp + d);
    return (sp & ~0xffffull) | (uint16_t)(sp + d);
}

static inline __attribute__((always_inline)) uint64_t sp_lin(CPU *c, uint64_t sp)
{
    int ss = stack_sz(c);
    if (ss == 8)
        return sp;
    return linear(c, S_SS, ss == 4 ? (uint32_t)sp : (uint16_t)sp);
}

static inline __attribute__((always_inline)) void push(CPU *c, unsigned sz, uint64_t v)
{
    uint64_t nsp = sp_add(c, c->r[R_SP], -(int64_t)sz);
    st(c, sp_lin(c, nsp), sz, v);
    c->r[R_SP] = nsp;
}

static inline __attribute__((always_inline)) uint64_t pop(CPU *c, unsigned sz)
{
    uint64_t v = ld(c, sp_lin(c, c->r[R_SP]), sz);
    c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
    return v;
}

static inline __attribute__((always_inline)) uint64_t peek(CPU *c, unsigned sz, unsigned off)
{
    return ld(c, sp_lin(c, sp_add(c, c->r[R_SP], off)), sz);
}

/* a branch target wraps at the operand size outside 64-bit mode */
static inline __attribute__((always_inline)) uint64_t ip_mask(CPU *c, Insn *i, uint64_t v)
{
    if (c->long64)
        return v;
    return i->osz == 2 ? (uint16_t)v : (uint32_t)v;
}

/* ---- locked operations ---- */

/* host pointer for a lock-prefixed read-modify-write, 0 without lock (or off plain RAM) */
static inline __attribute__((always_inline)) void *lock_ptr(CPU *c, Insn *i, uint64_t lin, unsigned sz)
{
    if (likely(!i->lock))
        return 0;
    return atomic_host(c, lin, sz);
}

static inline int cas(void *p, unsigned sz, uint64_t old, uint64_t nv)
{
    switch (sz) {
    case 1: { uint8_t e = old; return __atomic_compare_exchange_n((uint8_t *)p, &e, (uint8_t)nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    case 2: { uint16_t e = old; return __atomic_compare_exchange_n((uint16_t *)p, &e, (uint16_t)nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    case 4: { uint32_t e = old; return __atomic_compare_exchange_n((uint32_t *)p, &e, (uint32_t)nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    default: { uint64_t e = old; return __atomic_compare_exchange_n((uint64_t *)p, &e, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    }
}

static inline uint64_t atomic_ld(void *p, unsigned sz)
{
    switch (sz) {
    case 1: return __atomic_load_n((uint8_t *)p, __ATOMIC_SEQ_CST);
    case 2: return __atomic_load_n((uint16_t *)p, __ATOMIC_SEQ_CST);
    case 4: return __atomic_load_n((uint32_t *)p, __ATOMIC_SEQ_CST);
    default: return __atomic_load_n((uint64_t *)p, __ATOMIC_SEQ_CST);
    }
}

/* ---- address-size registers (string and loop instructions) ---- */

static inline __attribute__((always_inline)) uint64_t areg(CPU *c, int r, unsigned asz)
{
    return asz == 8 ? c->r[r] : asz == 4 ? (uint32_t)c->r[r] : (uint16_t)c->r[r];
}

static inline __attribute__((always_inline)) void areg_set(CPU *c, int r, unsigned asz, uint64_t v)
{
    if (asz == 8) c->r[r] = v;
    else if (asz == 4) c->r[r] = (uint32_t)v;
    else c->r[r] = (c->r[r] & ~0xffffull) | (uint16_t)v;
}

#endif
