/* Lazy arithmetic flags.
 *
 * A flag-setting instruction only records its operation, size, operands and result
 * (set_cc); CF, PF, AF, ZF, SF and OF are computed from that record when something
 * reads them (compute_arith), which most never do: the next instruction usually
 * overwrites the record. cond() answers the common compare-and-branch pairs without
 * the full evaluation. Everything here is static inline so that the dispatcher
 * (exec.c), system.c, x87.c and pymod.c share one definition without calling into
 * each other.
 */
#ifndef KVMPY_FLAGS_H
#define KVMPY_FLAGS_H

#include "tcg.h"

static const uint8_t parity_table[256] = {
#define P2(n) n, n ^ 4, n ^ 4, n
#define P4(n) P2(n), P2(n ^ 4), P2(n ^ 4), P2(n)
#define P6(n) P4(n), P4(n ^ 4), P4(n ^ 4), P4(n)
    P6(4), P6(0), P6(0), P6(4)
#undef P6
#undef P4
#undef P2
};

static inline uint64_t szmask(unsigned s) { return s == 8 ? ~0ull : (1ull << (8 * s)) - 1; }
static inline uint64_t sbit(unsigned s) { return 1ull << (8 * s - 1); }
static inline int64_t sext(uint64_t v, unsigned s)
{
    switch (s) {
    case 1: return (int8_t)v;
    case 2: return (int16_t)v;
    case 4: return (int32_t)v;
    default: return (int64_t)v;
    }
}

static inline __attribute__((always_inline)) uint32_t szp(uint64_t r, unsigned sz)
{
    r &= szmask(sz);
    return (r == 0 ? F_ZF : 0) | ((r & sbit(sz)) ? F_SF : 0) | parity_table[r & 0xff];
}

static inline uint32_t compute_arith(CPU *c)
{
    unsigned sz = c->cc_size;
    uint64_t m, sb, r, a, b;
    uint32_t f = 0;
    if (c->cc_op == CC_EAGER)
        return (uint32_t)c->cc_res & F_ARITH;
    m = szmask(sz);
    sb = sbit(sz);
    r = c->cc_res & m;
    a = c->cc_a & m;
    b = c->cc_b & m;
    switch (c->cc_op) {
    case CC_ADD:
        f |= r < a ? F_CF : 0;
        f |= ((a ^ r) & (b ^ r) & sb) ? F_OF : 0;
        f |= (a ^ b ^ r) & F_AF;
        break;
    case CC_ADC:
        f |= (c->cc_c ? r <= a : r < a) ? F_CF : 0;
        f |= ((a ^ r) & (b ^ r) & sb) ? F_OF : 0;
        f |= (a ^ b ^ r) & F_AF;
        break;
    case CC_SUB:
        f |= a < b ? F_CF : 0;
        f |= ((a ^ b) & (a ^ r) & sb) ? F_OF : 0;
        f |= (a ^ b ^ r) & F_AF;
        break;
    case CC_SBB:
        f |= (c->cc_c ? a <= b : a < b) ? F_CF : 0;
        f |= ((a ^ b) & (a ^ r) & sb) ? F_OF : 0;
        f |= (a ^ b ^ r) & F_AF;
        break;
    case CC_LOGIC:
        break;
    case CC_INC:
        f |= c->cc_c ? F_CF : 0;
        f |= r == sb ? F_OF : 0;
        f |= (r & 0xf) == 0 ? F_AF : 0;
        break;
    case CC_DEC:
        f |= c->cc_c ? F_CF : 0;
        f |= r == sb - 1 ? F_OF : 0;
        f |= (r & 0xf) == 0xf ? F_AF : 0;
        break;
    case CC_SHL: {   /* cc_a = operand, cc_b = masked count (1..63); AF left 0 like QEMU */
        unsigned bits = sz * 8, n = (unsigned)c->cc_b;
        uint32_t cf = n <= bits ? (a >> (bits - n)) & 1 : 0;
        f |= cf | ((((r & sb) != 0) ^ cf) ? F_OF : 0);
        break;
    }
    case CC_SHR: {
        unsigned n = (unsigned)c->cc_b;
        f |= (a >> (n - 1)) & 1;
        f |= (n == 1 && (a & sb)) ? F_OF : 0;
        break;
    }
    case CC_SAR: {
        unsigned n = (unsigned)c->cc_b;
        f |= (uint64_t)(sext(a, sz) >> (n - 1)) & 1;
        break;
    }
    }
    f |= (r == 0 ? F_ZF : 0) | ((r & sb) ? F_SF : 0) | parity_table[r & 0xff];
    return f;
}

static inline uint64_t get_eflags(CPU *c)
{
    return (c->eflags & ~(uint64_t)F_ARITH) | compute_arith(c) | 2;
}

static inline void set_eflags(CPU *c, uint64_t v, uint64_t mask)
{
    uint64_t cur = get_eflags(c);
    uint64_t n = ((cur & ~mask) | (v & mask)) & 0x3f7fd7;
    c->cc_op = CC_EAGER;
    c->cc_res = n & F_ARITH;
    c->eflags = (n & ~(uint64_t)F_ARITH) | 2;
}

static inline __attribute__((always_inline)) void set_cc(CPU *c, int op, unsigned sz, uint64_t r, uint64_t a, uint64_t b)
{
    c->cc_op = op;
    c->cc_size = sz;
    c->cc_res = r;
    c->cc_a = a;
    c->cc_b = b;
}

static inline __attribute__((always_inline)) void set_flags(CPU *c, uint32_t f)
{
    c->cc_op = CC_EAGER;
    c->cc_res = f & F_ARITH;
}

static inline __attribute__((always_inline)) int get_cf(CPU *c)
{
    uint64_t m = szmask(c->cc_size);
    switch (c->cc_op) {
    case CC_SUB: return (c->cc_a & m) < (c->cc_b & m);
    case CC_ADD: return (c->cc_res & m) < (c->cc_a & m);
    case CC_LOGIC: return 0;
    case CC_EAGER: return c->cc_res & 1;
    }
    return compute_arith(c) & 1;
}

static inline __attribute__((always_inline)) int cond(CPU *c, int cc)
{
    int r;
    if (c->cc_op == CC_SUB || c->cc_op == CC_LOGIC) {
        /* compare / test followed by a branch: no full flag evaluation */
        unsigned sz = c->cc_size;
        uint64_t m = szmask(sz), a = c->cc_a & m, b = c->cc_b & m, res = c->cc_res & m;
        int logic = c->cc_op == CC_LOGIC;
        switch (cc >> 1) {
        case 1: r = logic ? 0 : a < b; return r ^ (cc & 1);
        case 2: r = res == 0; return r ^ (cc & 1);
        case 3: r = (logic ? 0 : a < b) || res == 0; return r ^ (cc & 1);
        case 6: if (!logic) { r = sext(a, sz) < sext(b, sz); return r ^ (cc & 1); }
                r = (res & sbit(sz)) != 0; return r ^ (cc & 1);
        case 7: if (!logic) { r = sext(a, sz) <= sext(b, sz); return r ^ (cc & 1); }
                r = res == 0 || (res & sbit(sz)) != 0; return r ^ (cc & 1);
        }
    }
    if (c->cc_op != CC_EAGER && ((cc >> 1) == 2 || (cc >> 1) == 4)) {
        uint64_t res = c->cc_res & szmask(c->cc_size);
        r = (cc >> 1) == 2 ? res == 0 : (res & sbit(c->cc_size)) != 0;
        return r ^ (cc & 1);
    }
    uint32_t f = compute_arith(c);
    switch (cc >> 1) {
    case 0: r = (f & F_OF) != 0; break;
    case 1: r = f & F_CF; break;
    case 2: r = (f & F_ZF) != 0; break;
    case 3: r = (f & (F_CF | F_ZF)) != 0; break;
    case 4: r = (f & F_SF) != 0; break;
    case 5: r = (f & F_PF) != 0; break;
    case 6: r = !!(f & F_SF) != !!(f & F_OF); break;
    default: r = (f & F_ZF) || (!!(f & F_SF) != !!(f & F_OF)); break;
    }
    return r ^ (cc & 1);
}

#endif
