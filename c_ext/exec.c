/* Execution: lazy flags, the block cache, the run loop and the instruction
 * semantics (one switch over pre-decoded instructions). */
#include <stdio.h>
#include <stdlib.h>
#include <x86intrin.h>
#include "tcg.h"

void sse_exec(CPU *c, Insn *i);

static const uint8_t parity_table[256] = {
#define P2(n) n, n ^ 4, n ^ 4, n
#define P4(n) P2(n), P2(n ^ 4), P2(n ^ 4), P2(n)
#define P6(n) P4(n), P4(n ^ 4), P4(n ^ 4), P4(n)
    P6(4), P6(0), P6(0), P6(4)
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

static uint32_t compute_arith(CPU *c)
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

uint64_t get_eflags(CPU *c)
{
    return (c->eflags & ~(uint64_t)F_ARITH) | compute_arith(c) | 2;
}

void set_eflags(CPU *c, uint64_t v, uint64_t mask)
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

/* ---- registers and operands ---- */

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

static inline __attribute__((always_inline)) uint64_t ip_mask(CPU *c, Insn *i, uint64_t v)
{
    if (c->long64)
        return v;
    return i->osz == 2 ? (uint16_t)v : (uint32_t)v;
}

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

/* ---- ALU ---- */

static inline __attribute__((always_inline)) uint64_t alu(CPU *c, int op, uint64_t a, uint64_t b, unsigned sz)
{
    uint64_t r, cf;
    switch (op) {
    case 0: r = a + b; set_cc(c, CC_ADD, sz, r, a, b); return r;
    case 1: r = a | b; set_cc(c, CC_LOGIC, sz, r, 0, 0); return r;
    case 2: cf = get_cf(c); r = a + b + cf; c->cc_c = cf; set_cc(c, CC_ADC, sz, r, a, b); return r;
    case 3: cf = get_cf(c); r = a - b - cf; c->cc_c = cf; set_cc(c, CC_SBB, sz, r, a, b); return r;
    case 4: r = a & b; set_cc(c, CC_LOGIC, sz, r, 0, 0); return r;
    case 5: case 7: r = a - b; set_cc(c, CC_SUB, sz, r, a, b); return r;
    default: r = a ^ b; set_cc(c, CC_LOGIC, sz, r, 0, 0); return r;
    }
}

/* read-modify-write of operand E with a binary ALU op (lock-aware) */
static inline __attribute__((always_inline)) void alu_E(CPU *c, Insn *i, int op, uint64_t b, unsigned sz)
{
    if (i->mod == 3) {
        uint64_t r = alu(c, op, getreg(c, i, i->rm, sz), b, sz);
        if (op != 7)
            setreg(c, i, i->rm, sz, r);
        return;
    }
    uint64_t lin = ea_lin(c, i);
    void *p = lock_ptr(c, i, lin, sz);
    if (p && op != 7) {
        uint64_t a, r;
        uint32_t saved_op = c->cc_op, saved_sz = c->cc_size;
        uint64_t sr = c->cc_res, sa = c->cc_a, sb = c->cc_b, sc = c->cc_c;
        for (;;) {
            a = atomic_ld(p, sz);
            r = alu(c, op, a, b, sz);
            if (cas(p, sz, a, r))
                return;
            c->cc_op = saved_op; c->cc_size = saved_sz; c->cc_res = sr; c->cc_a = sa; c->cc_b = sb; c->cc_c = sc;
        }
    }
    uint64_t a = ld(c, lin, sz);
    uint64_t r = alu(c, op, a, b, sz);
    if (op != 7)
        st(c, lin, sz, r);
}

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

/* ---- string instructions ---- */

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

static void string_op(CPU *c, Insn *i)
{
    int op = i->op;
    unsigned sz = (op & 1) ? i->osz : 1;
    unsigned asz = i->asz;
    int64_t d = (c->eflags & F_DF) ? -(int64_t)sz : (int64_t)sz;
    int rep = i->rep;
    int kind = op & ~1;
    unsigned n = 0;
    for (;;) {
        if (rep && areg(c, R_CX, asz) == 0)
            break;
        uint64_t si = areg(c, R_SI, asz), di = areg(c, R_DI, asz);
        if (rep && d > 0 && (kind == 0xa4 || kind == 0xaa) && asz == 8) {
            /* rep movs/stos forward in RAM: whole page chunks with memmove/memset
             * once the first element has filled the TLB through the normal path */
            uint64_t cnt = c->r[R_CX];
            uint64_t dlin = linear(c, S_ES, di);
            uint64_t room = (4096 - (dlin & 0xfff)) / sz;
            uint64_t slin = 0;
            if (kind == 0xa4) {
                slin = linear(c, i->seg, si);
                uint64_t sroom = (4096 - (slin & 0xfff)) / sz;
                if (sroom < room) room = sroom;
            }
            uint64_t chunk = cnt < room ? cnt : room;
            if (chunk > 1) {
                uint8_t *dp = tlb_hit(c, dlin, (unsigned)(chunk * sz), 1);
                uint8_t *sp = kind == 0xa4 ? tlb_hit(c, slin, (unsigned)(chunk * sz), 0) : 0;
                if (dp && (kind == 0xaa || sp)) {
                    uint64_t bytes = chunk * sz;
                    if (kind == 0xaa) {
                        if (sz == 1) {
                            memset(dp, (int)(c->r[R_AX] & 0xff), bytes);
                        } else {
                            for (uint64_t k = 0; k < chunk; k++)
                                memcpy(dp + k * sz, &c->r[R_AX], sz);
                        }
                    } else if (dp <= sp || dp >= sp + bytes) {
                        memmove(dp, sp, bytes);   /* no forward-overlap: same result as element copies */
                    } else {
                        goto element;
                    }
                    c->r[R_DI] = di + bytes;
                    if (kind == 0xa4)
                        c->r[R_SI] = si + bytes;
                    c->r[R_CX] = cnt - chunk;
                    n += (unsigned)chunk;
                    goto check_request;
                }
            }
        }
    element:
        switch (kind) {
        case 0xa4: {
            uint64_t v = ld(c, linear(c, i->seg, si), sz);
            st(c, linear(c, S_ES, di), sz, v);
            areg_set(c, R_SI, asz, si + d);
            areg_set(c, R_DI, asz, di + d);
            break;
        }
        case 0xaa:
            st(c, linear(c, S_ES, di), sz, c->r[R_AX]);
            areg_set(c, R_DI, asz, di + d);
            break;
        case 0xac: {
            uint64_t v = ld(c, linear(c, i->seg, si), sz);
            setreg(c, i, R_AX, sz, v);
            areg_set(c, R_SI, asz, si + d);
            break;
        }
        case 0xa6: {
            uint64_t a = ld(c, linear(c, i->seg, si), sz);
            uint64_t b = ld(c, linear(c, S_ES, di), sz);
            alu(c, 7, a, b, sz);
            areg_set(c, R_SI, asz, si + d);
            areg_set(c, R_DI, asz, di + d);
            break;
        }
        default: {   /* 0xae scas */
            uint64_t b = ld(c, linear(c, S_ES, di), sz);
            alu(c, 7, c->r[R_AX] & szmask(sz), b, sz);
            areg_set(c, R_DI, asz, di + d);
            break;
        }
        }
        if (!rep)
            return;
        areg_set(c, R_CX, asz, areg(c, R_CX, asz) - 1);
        if (kind == 0xa6 || kind == 0xae) {
            int zf = (compute_arith(c) & F_ZF) != 0;
            if ((rep == 1 && !zf) || (rep == 2 && zf))
                return;
        }
        ++n;
    check_request:
        if (n >= 0x4000) {
            n = 0;
            if (atomic_load_explicit(&c->exit_request, memory_order_relaxed)) {
                if (areg(c, R_CX, asz) != 0) {
                    c->next_rip = c->rip;   /* resume the rep later, after the request */
                    c->stop_block |= STOP_BLOCK;   /* the rest of the block does not follow yet */
                }
                return;
            }
        }
    }
}

static int io_allowed(CPU *c)
{
    if (!(c->cr0 & CR0_PE))
        return 1;
    return (c->eflags & F_VM) ? 0 : c->cpl <= (int)((c->eflags >> 12) & 3);
}

static void string_io(CPU *c, Insn *i)
{
    int op = i->op;
    unsigned sz = (op & 1) ? (i->osz == 8 ? 4 : i->osz) : 1;
    unsigned asz = i->asz;
    int in = op < 0x6e;
    uint16_t port = (uint16_t)c->r[R_DX];
    int df = (c->eflags & F_DF) != 0;
    if (!io_allowed(c))
        RAISE_ERR(c, EXC_GP, 0);
    uint64_t count = 1;
    if (i->rep) {
        count = areg(c, R_CX, asz);
        if (count == 0)
            return;
        uint64_t addr = in ? areg(c, R_DI, asz) : areg(c, R_SI, asz);
        uint64_t lin = linear(c, in ? S_ES : i->seg, addr);
        uint64_t room = df ? 1 : (4096 - (lin & 0xfff)) / sz;
        if (room == 0) room = 1;
        if (count > room) count = room;
        if (count > IOBUF_SIZE / sz) count = IOBUF_SIZE / sz;
    }
    int fresh;
    Access *a = io_access_string(c, port, sz, !in, (unsigned)count, &fresh);
    if (fresh) {
        if (!in) {
            uint64_t si = areg(c, R_SI, asz);
            for (uint64_t k = 0; k < count; k++) {
                uint64_t v = ld(c, linear(c, i->seg, si + (df ? -(int64_t)(k * sz) : (int64_t)(k * sz))), sz);
                memcpy(a->data + k * sz, &v, sz);
            }
        } else {
            /* probe the destination so a fault comes before the device sees the read */
            uint64_t di = areg(c, R_DI, asz);
            ld(c, linear(c, S_ES, di), 1);
        }
        cpu_exit(c, EXIT_IO);
    }
    count = a->count;
    int64_t step = df ? -(int64_t)sz : (int64_t)sz;
    if (in) {
        uint64_t di = areg(c, R_DI, asz);
        for (uint64_t k = 0; k < count; k++) {
            uint64_t v = 0;
            memcpy(&v, a->data + k * sz, sz);
            st(c, linear(c, S_ES, (di + k * step) & szmask(asz)), sz, v);
        }
        areg_set(c, R_DI, asz, di + count * step);
    } else {
        areg_set(c, R_SI, asz, areg(c, R_SI, asz) + count * step);
    }
    if (i->rep) {
        areg_set(c, R_CX, asz, areg(c, R_CX, asz) - count);
        if (areg(c, R_CX, asz) != 0) {
            c->next_rip = c->rip;
            c->stop_block |= STOP_BLOCK;   /* the rest of the block does not follow yet */
        }
    }
}

/* ---- block cache ---- */

void block_cache_flush(CPU *c)
{
    /* the shared code bitmap stays as it is: other vCPUs may hold translations of those
     * pages, and a stale "code" mark only costs a slow-path write */
    /* Links and jump-cache entries may still point at these slots: a slot is only
     * trusted while valid, and it becomes valid again only once refilled whole. */
    for (int k = 0; k < c->nblocks; k++)
        c->blocks[k].valid = 0;
    c->nblocks = 0;
    c->ninsns = 0;
    memset(c->hash, 0, sizeof(Block *) * c->hash_size);
    memset(c->jc, 0, sizeof c->jc);
    memset(c->page_blocks, 0, sizeof c->page_blocks);
    c->cur_block = 0;
}

static inline uint32_t phash(CPU *c, uint64_t pa, uint32_t mode)
{
    return (uint32_t)((pa ^ (pa >> 13) ^ mode * 0x9e3779b9u) & (c->hash_size - 1));
}

static uint64_t fetch_phys(CPU *c, uint64_t lin, int fault, int *ok)
{
    TlbEnt *e = &c->tlb[c->mmu_idx][(lin >> 12) & (TLB_SIZE - 1)];
    *ok = 1;
    if (e->tag_x == (lin & ~0xfffull))
        return e->paddr | (lin & 0xfff);
    uint64_t pa;
    if (translate(c, lin, 2, c->mmu_idx == 1, &pa, fault) < 0) {
        *ok = 0;
        return 0;
    }
    /* fill the TLB through a read of the page */
    if (ram_ptr(c, pa & ~0xfffull, 4096)) {
        e->tag_r = e->tag_w = TLB_INVALID;
        e->paddr = pa & ~0xfffull;
        e->addend = (uintptr_t)ram_ptr(c, e->paddr, 4096) - (uintptr_t)(lin & ~0xfffull);
        e->tag_x = lin & ~0xfffull;
        e->global = 0;
    }
    return pa;
}

static Block *translate_block(CPU *c, uint64_t pc, uint64_t lin, uint64_t pa, uint32_t mode)
{
    uint64_t t0 = now_ns();
    if (c->nblocks >= c->max_blocks || c->ninsns + BLOCK_MAX_INSNS > c->max_insns)
        block_cache_flush(c);
    uint8_t *p1 = ram_ptr(c, pa & ~0xfffull, 4096);
    if (!p1) {
        snprintf(c->errmsg, sizeof c->errmsg, "instruction fetch outside RAM at rip %#llx (gpa %#llx)",
                 (unsigned long long)pc, (unsigned long long)pa);
        cpu_exit(c, EXIT_INTERNAL_ERROR);
    }
    /* marked before decoding: a write after this point (on any vCPU) invalidates us */
    code_page_mark(c, pa & ~0xfffull);
    Block *b = &c->blocks[c->nblocks];
    b->insns = &c->insn_pool[c->ninsns];
    b->phys = pa & ~0xfffull;
    b->start = pa;
    b->phys2 = ~0ull;
    b->pc = pc;
    b->cs_base = c->seg[S_CS].base;
    b->mode = mode;
    b->link[0] = b->link[1] = 0;
    unsigned cur = pa & 0xfff;
    int n = 0;
    uint8_t *p2 = 0;
    uint64_t pa2 = ~0ull;
    int p2_tried = 0;
    uint64_t lin_page2 = (lin & ~0xfffull) + 4096;
    if (!c->long64)
        lin_page2 = (uint32_t)lin_page2;
    while (n < BLOCK_MAX_INSNS) {
        uint8_t buf[16];
        const uint8_t *src;
        int avail;
        if (cur + 15 <= 4096) {
            src = p1 + cur;
            avail = 15;
        } else {
            int in1 = 4096 - cur;
            memcpy(buf, p1 + cur, in1);
            if (!p2_tried) {
                int ok;
                p2_tried = 1;
                uint64_t q = fetch_phys(c, lin_page2, 0, &ok);
                if (ok) {
                    p2 = ram_ptr(c, q & ~0xfffull, 4096);
                    if (p2) {
                        pa2 = q & ~0xfffull;
                        code_page_mark(c, pa2);
                    }
                }
            }
            if (p2) {
                memcpy(buf + in1, p2, 15 - in1);
                avail = 15;
            } else {
                avail = in1;
            }
            src = buf;
        }
        Insn *i = &b->insns[n];
        int ends;
        int len = decode_insn_bytes(src, avail, mode, i, &ends);
        if (len == 0) {
            if (n == 0) {
                int ok;
                fetch_phys(c, lin_page2, 1, &ok);   /* raises the #PF for the second page */
                snprintf(c->errmsg, sizeof c->errmsg, "instruction fetch outside RAM at rip %#llx",
                         (unsigned long long)pc);
                cpu_exit(c, EXIT_INTERNAL_ERROR);
            }
            break;
        }
        if (len < 0) {
            if (n == 0)
                RAISE_ERR(c, EXC_GP, 0);
            break;
        }
        n++;
        cur += len;
        i->end = (uint16_t)(cur - (pa & 0xfff));
        if (cur > 4096) {
            b->phys2 = pa2;
            break;
        }
        if (ends || cur == 4096)
            break;
    }
    b->n = n;
    b->valid = 1;
    c->nblocks++;
    c->ninsns += n;
    uint32_t h = phash(c, pa, mode);
    b->hnext = c->hash[h];
    c->hash[h] = b;
    /* a block on two pages colliding in one list is linked there once, through pnext[0] */
    unsigned s1 = page_list_slot(b->phys);
    b->pnext[0] = c->page_blocks[s1];
    c->page_blocks[s1] = b;
    b->pnext[1] = 0;
    if (b->phys2 != ~0ull && page_list_slot(b->phys2) != s1) {
        unsigned s2 = page_list_slot(b->phys2);
        b->pnext[1] = c->page_blocks[s2];
        c->page_blocks[s2] = b;
    }
    c->st_translated++;
    c->st_decoded_insns += n;
    c->st_decode_ns += now_ns() - t0;
    return b;
}

/* Is b the translation of the code at the current cs:pc, as this CPU maps and may
 * execute it now? Cached block pointers (jump cache, links) are only hints and
 * must pass this first. Checking the fetch mapping through the TLB (tag_x is
 * per privilege level and only set for executable pages) means TLB flushes and
 * INVLPG need not clear the hints; invalidated or recycled blocks fail "valid". */
static inline __attribute__((always_inline)) int block_fits(CPU *c, Block *b, uint64_t pc, uint64_t csb,
                                                           uint32_t mode)
{
    if (!(b->valid && b->pc == pc && b->cs_base == csb && b->mode == mode))
        return 0;
    uint64_t lin = linear(c, S_CS, pc);
    TlbEnt *e = &c->tlb[c->mmu_idx][(lin >> 12) & (TLB_SIZE - 1)];
    if (e->tag_x != (lin & ~0xfffull) || e->paddr != b->phys)
        return 0;
    if (unlikely(b->phys2 != ~0ull)) {
        /* the block's tail lies on the next virtual page: same mapping required */
        uint64_t l2 = (lin & ~0xfffull) + 4096;
        if (!c->long64)
            l2 = (uint32_t)l2;
        TlbEnt *e2 = &c->tlb[c->mmu_idx][(l2 >> 12) & (TLB_SIZE - 1)];
        if (e2->tag_x != l2 || e2->paddr != b->phys2)
            return 0;
    }
    return 1;
}

static Block *find_block(CPU *c)
{
    uint64_t pc = c->rip;
    uint64_t csb = c->seg[S_CS].base;
    uint32_t mode = c->code_mode;
    unsigned j = (unsigned)(pc ^ (pc >> 10)) & 4095;
    Block *b = c->jc[j];
    if (likely(b && block_fits(c, b, pc, csb, mode)))
        return b;
    uint64_t lin = linear(c, S_CS, pc);
    int ok;
    uint64_t pa = fetch_phys(c, lin, 1, &ok);
    uint32_t h = phash(c, pa, mode);
    /* invalidate_local_blocks() leaves invalid blocks in the chains: drop them here */
    for (Block **pp = &c->hash[h]; (b = *pp) != 0; pp = &b->hnext) {
        while (b && !b->valid)
            b = *pp = b->hnext;
        if (!b)
            break;
        if (b->start == pa && b->mode == mode) {
            if (b->phys2 != ~0ull) {
                /* the block's tail lies on the next virtual page: same mapping required */
                uint64_t l2 = (lin & ~0xfffull) + 4096;
                if (!c->long64) l2 = (uint32_t)l2;
                int ok2;
                uint64_t q = fetch_phys(c, l2, 0, &ok2);
                if (!ok2 || (q & ~0xfffull) != b->phys2)
                    continue;
            }
            break;
        }
    }
    if (!b)
        b = translate_block(c, pc, lin, pa, mode);
    c->jc[j] = b;
    return b;
}

/* The block to run after prev (0 when unknown): prev's links first, they stay in
 * the cache lines just used; the jump cache and hash table otherwise. */
static inline __attribute__((always_inline)) Block *next_block(CPU *c, Block *prev)
{
    if (likely(prev != 0)) {
        uint64_t pc = c->rip;
        uint64_t csb = c->seg[S_CS].base;
        uint32_t mode = c->code_mode;
        Block *n = prev->link[0];
        if (likely(n && block_fits(c, n, pc, csb, mode)))
            return n;
        n = prev->link[1];
        if (n && block_fits(c, n, pc, csb, mode))
            return n;
    }
    Block *b = find_block(c);
    /* translate_block may have flushed the cache: prev is then a recycled slot and
     * its links mere hints like any other, so writing them is harmless */
    if (prev && b != prev->link[0]) {
        prev->link[1] = prev->link[0];
        prev->link[0] = b;
    }
    return b;
}

/* ---- interrupts and async requests ---- */

static int irq_highest(CPU *c)
{
    for (int w = 3; w >= 0; w--) {
        uint64_t v = atomic_load(&c->irq_pending[w]);
        if (v)
            return w * 64 + 63 - __builtin_clzll(v);
    }
    return -1;
}

static int async_wanted(CPU *c)
{
    return atomic_load(&c->kicked) || irq_highest(c) >= 0 || c->ninval ||
           atomic_load(&c->life_request) || (atomic_load(&c->nmi_pending) && !c->nmi_blocked) ||
           atomic_load(&c->want_irq_window);
}

static void recompute_request(CPU *c)
{
    int req = async_wanted(c);
    atomic_store(&c->exit_request, req);
    /* a request raced with the store above must not be lost */
    if (!req && async_wanted(c))
        atomic_store(&c->exit_request, 1);
}

/* any thread: INIT. Supersedes a SIPI not yet applied (the CPU ends up waiting). */
void request_init(CPU *c)
{
    atomic_store(&c->life_request, LIFE_INIT);
    atomic_store(&c->exit_request, 1);
}

/* any thread: SIPI; applied after a pending INIT, ignored unless the CPU waits for it */
void request_sipi(CPU *c, int vector)
{
    uint32_t old = atomic_load(&c->life_request), nv;
    do
        nv = (old & LIFE_INIT) | ((uint32_t)(vector & 0xff) + 1);
    while (!atomic_compare_exchange_weak(&c->life_request, &old, nv));
    atomic_store(&c->exit_request, 1);
}

void request_nmi(CPU *c)
{
    atomic_store(&c->nmi_pending, 1);
    atomic_store(&c->exit_request, 1);
}

/* run() leaves with EXIT_INTR once IF=1 and no interrupt shadow (KVM's
 * request_interrupt_window); the request ends with that exit or cpu_reset */
void request_irq_window(CPU *c)
{
    atomic_store(&c->want_irq_window, 1);
    atomic_store(&c->exit_request, 1);
}

/* an external interrupt handed over now would be delivered before the next instruction */
int cpu_interruptible(CPU *c)
{
    return (c->eflags & F_IF) && !c->shadow && c->nacc == 0 && !c->wait_sipi;
}

/* Power-on state (wait_sipi: an AP after INIT, which keeps its APIC base MSR).
 * RAM, CPUID, translations and statistics stay. vCPU thread, or run() not executing. */
void cpu_reset(CPU *c, int wait_sipi)
{
    uint64_t apic_base = c->apic_base;
    cpu_init(c);
    if (wait_sipi)
        c->apic_base = apic_base;
    for (int w = 0; w < 4; w++)
        atomic_store(&c->irq_pending[w], 0);
    atomic_store(&c->nmi_pending, 0);
    atomic_store(&c->want_irq_window, 0);
    c->nmi_blocked = 0;
    c->shadow = 0;
    c->nacc = c->acc_pos = 0;
    c->delivering = -1;
    c->cur_block = 0;
    c->stop_block = 0;
    c->wait_sipi = wait_sipi;
    c->halted = wait_sipi;
    recompute_request(c);
}

/* vCPU thread: apply INIT / SIPI requests */
static void apply_life_requests(CPU *c)
{
    uint32_t req = atomic_exchange(&c->life_request, 0);
    if (req & LIFE_INIT)
        cpu_reset(c, 1);
    if ((req & LIFE_SIPI_MASK) && c->wait_sipi) {
        int vector = (int)(req & LIFE_SIPI_MASK) - 1;
        /* what KVM's in-kernel LAPIC does: real mode at vector:0000 */
        c->seg[S_CS].sel = (uint16_t)(vector << 8);
        c->seg[S_CS].base = (uint64_t)vector << 12;
        c->rip = 0;
        /* what was sent to the CPU while it waited is lost, as on hardware */
        for (int w = 0; w < 4; w++)
            atomic_store(&c->irq_pending[w], 0);
        atomic_store(&c->nmi_pending, 0);
        c->wait_sipi = 0;
        c->halted = 0;
        update_mode(c);
    }
}

/* any thread: queue a range of guest RAM whose translations must go */
void request_invalidate(CPU *c, uint64_t gpa, uint64_t size)
{
    while (atomic_flag_test_and_set_explicit(&c->inval_lock, memory_order_acquire))
        ;
    if (c->ninval < (int)(sizeof c->inval / sizeof c->inval[0])) {
        c->inval[c->ninval].gpa = gpa;
        c->inval[c->ninval].size = size;
        c->ninval++;
    } else {
        c->inval_overflow = 1;
    }
    atomic_flag_clear_explicit(&c->inval_lock, memory_order_release);
    atomic_store(&c->exit_request, 1);
}

/* vCPU thread: apply queued invalidations */
static void apply_invalidations(CPU *c)
{
    while (atomic_flag_test_and_set_explicit(&c->inval_lock, memory_order_acquire))
        ;
    int n = c->ninval, overflow = c->inval_overflow;
    uint64_t gpa[64], size[64];
    for (int k = 0; k < n; k++) {
        gpa[k] = c->inval[k].gpa;
        size[k] = c->inval[k].size;
    }
    c->ninval = 0;
    c->inval_overflow = 0;
    atomic_flag_clear_explicit(&c->inval_lock, memory_order_release);
    if (overflow) {
        block_cache_flush(c);
        return;
    }
    /* The shared "code" marks stay: another vCPU may have translated the page again
     * since the request was queued, and a stale mark only costs a slow-path write. */
    for (int k = 0; k < n; k++)
        for (uint64_t p = gpa[k] & ~0xfffull; p < gpa[k] + size[k]; p += 4096)
            if (ram_ptr(c, p, 1))
                invalidate_local_blocks(c, p);
}

static int check_async(CPU *c)
{
    if (c->ninval || c->inval_overflow)
        apply_invalidations(c);
    if (atomic_load(&c->life_request)) {
        apply_life_requests(c);
        recompute_request(c);
    }
    if (atomic_load(&c->kicked)) {
        atomic_store(&c->kicked, 0);
        recompute_request(c);
        return EXIT_INTR;
    }
    if (c->wait_sipi)
        return EXIT_HLT;   /* nothing runs before the SIPI; NMIs and interrupts wait */
    if (c->nacc == 0 && !c->nmi_blocked && atomic_load(&c->nmi_pending)) {
        atomic_store(&c->nmi_pending, 0);
        c->nmi_blocked = 1;          /* until the next IRET */
        recompute_request(c);
        c->halted = 0;
        c->delivering = 2;
        deliver_interrupt(c, 2, 0, 0, 0, c->rip);
        c->delivering = -1;
    }
    int v = irq_highest(c);
    if (v >= 0 && (c->eflags & F_IF) && !c->shadow && c->nacc == 0) {
        atomic_fetch_and(&c->irq_pending[v / 64], ~(1ull << (v % 64)));
        recompute_request(c);
        c->halted = 0;
        c->delivering = v;
        deliver_interrupt(c, v, 0, 0, 0, c->rip);
        c->delivering = -1;
    }
    if (atomic_load(&c->want_irq_window) && cpu_interruptible(c)) {
        atomic_store(&c->want_irq_window, 0);
        recompute_request(c);
        return EXIT_INTR;
    }
    if (c->halted)
        return EXIT_HLT;
    return 0;
}

static Block *exec_block(CPU *c, Block *b);

static int exc_class(int v)
{
    if (v == EXC_PF) return 2;
    if (v == 0 || (v >= 10 && v <= 13)) return 1;
    return 0;
}

int cpu_run(CPU *c)
{
    uint64_t t0 = now_ns();
    uint64_t d0 = c->st_decode_ns;
    c->acc_pos = 0;   /* the first instruction replays the accesses the VMM completed */
    if (c->nacc)
        c->stop_block |= STOP_REPLAY;   /* ... and its end clears the access log (NEXT) */
    int r = setjmp(c->jb);
    if (r == 2) {
        c->cur_block = 0;
        c->st_exec_ns += (now_ns() - t0) - (c->st_decode_ns - d0);
        return c->exit_reason;
    }
    if (r == 1) {
        c->cur_block = 0;
        c->stop_block = 0;
        c->nacc = c->acc_pos = 0;
        update_mode(c);
        int vec = c->exc_vec;
        uint32_t err = c->exc_err;
        int has_err = c->exc_has_err;
        if (c->delivering >= 0) {
            int prev = c->delivering;
            if (prev == EXC_DF) {
                c->delivering = -1;
                c->st_exec_ns += (now_ns() - t0) - (c->st_decode_ns - d0);
                return EXIT_SHUTDOWN;
            }
            int pc = exc_class(prev), nc = exc_class(vec);
            if ((pc == 1 && nc == 1) || (pc == 2 && nc != 0)) {
                vec = EXC_DF;
                err = 0;
                has_err = 1;
            }
        }
        if (!(c->cr0 & CR0_PE))
            has_err = 0;
        c->delivering = vec;
        deliver_interrupt(c, vec, 0, err, has_err, c->rip);
        c->delivering = -1;
    }
    /* the block that just ran, for next_block(); declared after setjmp, so an
     * exception (longjmp) restarts the chain from nothing */
    Block *last = 0;
    for (;;) {
        if (unlikely(c->seen_code_epoch != atomic_load_explicit(&code_epoch, memory_order_relaxed)))
            drop_code_write_tags(c);
        if (unlikely(atomic_load_explicit(&c->exit_request, memory_order_relaxed) || c->halted)) {
            int rr = check_async(c);
            if (rr) {
                c->st_exec_ns += (now_ns() - t0) - (c->st_decode_ns - d0);
                return rr;
            }
            last = 0;   /* an interrupt entry is no successor worth linking */
        }
        last = exec_block(c, next_block(c, last));
    }
}

void cpu_init(CPU *c)
{
    memset(c, 0, offsetof(CPU, nram));
    for (int s = 0; s < 8; s++) {
        c->seg[s].limit = 0xffff;
        c->seg[s].present = 1;
        c->seg[s].s = 1;
        c->seg[s].type = 3;
    }
    c->seg[S_CS].type = 0xb;
    c->seg[S_CS].sel = 0xf000;
    c->seg[S_CS].base = 0xffff0000;
    c->seg[S_TR].s = 0;
    c->seg[S_TR].type = 0xb;
    c->seg[S_LDT].s = 0;
    c->seg[S_LDT].type = 2;
    c->gdt_limit = c->idt_limit = 0xffff;
    c->rip = 0xfff0;
    c->eflags = 2;
    c->cc_op = CC_EAGER;
    c->cr0 = 0x60000010;
    c->xcr0 = 1;
    c->mxcsr = 0x1f80;
    fpu_reset(c);
    c->pat = 0x0007040600070406ull;
    c->apic_base = 0xfee00000ull | (c->cpu_index == 0 ? 0x900 : 0x800);
    c->delivering = -1;
    for (int m = 0; m < 2; m++)
        for (int k = 0; k < TLB_SIZE; k++)
            c->tlb[m][k].tag_r = c->tlb[m][k].tag_w = c->tlb[m][k].tag_x = TLB_INVALID;
    update_mode(c);
}

/* ---- instruction semantics ---- */

#define UD() RAISE(c, EXC_UD)
#define GP0() RAISE_ERR(c, EXC_GP, 0)
#define NEED_CPL0() do { if (c->cpl != 0) GP0(); } while (0)

static void exec_system_0f01(CPU *c, Insn *i);
static void exec_system_0f00(CPU *c, Insn *i);

static void do_mul(CPU *c, Insn *i, int sgn, uint64_t src, unsigned sz)
{
    uint64_t lo, hi;
    uint32_t ovf;
    if (sz == 8) {
        if (sgn) {
            __int128 p = (__int128)(int64_t)c->r[R_AX] * (int64_t)src;
            lo = (uint64_t)p;
            hi = (uint64_t)(p >> 64);
            ovf = p != (__int128)(int64_t)lo;
        } else {
            unsigned __int128 p = (unsigned __int128)c->r[R_AX] * src;
            lo = (uint64_t)p;
            hi = (uint64_t)(p >> 64);
            ovf = hi != 0;
        }
        c->r[R_AX] = lo;
        c->r[R_DX] = hi;
    } else {
        uint64_t a = c->r[R_AX] & szmask(sz);
        int64_t p;
        uint64_t up;
        unsigned bits = sz * 8;
        if (sgn) {
            p = sext(a, sz) * sext(src, sz);
            lo = (uint64_t)p & szmask(sz);
            hi = ((uint64_t)p >> bits) & szmask(sz);
            ovf = p != sext(lo, sz);
        } else {
            up = a * (src & szmask(sz));
            lo = up & szmask(sz);
            hi = (up >> bits) & szmask(sz);
            ovf = hi != 0;
        }
        if (sz == 1) {
            setreg(c, i, R_AX, 2, lo | (hi << 8));
        } else {
            setreg(c, i, R_AX, sz, lo);
            setreg(c, i, R_DX, sz, hi);
        }
    }
    set_flags(c, (ovf ? F_CF | F_OF : 0) | szp(lo, sz));
}

static void do_div(CPU *c, Insn *i, int sgn, uint64_t src, unsigned sz)
{
    src &= szmask(sz);
    if (src == 0)
        RAISE(c, EXC_DE);
    if (sz == 8) {
        if (sgn) {
            __int128 n = (__int128)(((unsigned __int128)c->r[R_DX] << 64) | c->r[R_AX]);
            int64_t d = (int64_t)src;
            if (n == ((__int128)1 << 127) && d == -1)
                RAISE(c, EXC_DE);
            __int128 q = n / d, rem = n % d;
            if (q != (__int128)(int64_t)q)
                RAISE(c, EXC_DE);
            c->r[R_AX] = (uint64_t)q;
            c->r[R_DX] = (uint64_t)rem;
        } else {
            unsigned __int128 n = ((unsigned __int128)c->r[R_DX] << 64) | c->r[R_AX];
            if (c->r[R_DX] >= src)
                RAISE(c, EXC_DE);
            c->r[R_AX] = (uint64_t)(n / src);
            c->r[R_DX] = (uint64_t)(n % src);
        }
        return;
    }
    unsigned bits = sz * 8;
    uint64_t n = sz == 1 ? (c->r[R_AX] & 0xffff)
                         : ((c->r[R_DX] & szmask(sz)) << bits) | (c->r[R_AX] & szmask(sz));
    uint64_t q, rem;
    if (sgn) {
        int64_t sn = sext(n, sz * 2 > 8 ? 8 : sz * 2);
        int64_t sd = sext(src, sz);
        int64_t sq = sn / sd, sr = sn % sd;
        if (sq != sext((uint64_t)sq & szmask(sz), sz))
            RAISE(c, EXC_DE);
        q = (uint64_t)sq & szmask(sz);
        rem = (uint64_t)sr & szmask(sz);
    } else {
        q = n / src;
        rem = n % src;
        if (q > szmask(sz))
            RAISE(c, EXC_DE);
    }
    if (sz == 1) {
        setreg(c, i, R_AX, 2, q | (rem << 8));
    } else {
        setreg(c, i, R_AX, sz, q);
        setreg(c, i, R_DX, sz, rem);
    }
}

static void bit_op(CPU *c, Insn *i, int kind, uint64_t bitoff, int imm_form)
{
    unsigned sz = i->osz;
    unsigned bits = sz * 8;
    uint64_t v, nv, lin = 0;
    unsigned bit;
    if (i->mod == 3) {
        bit = bitoff & (bits - 1);
        v = getreg(c, i, i->rm, sz);
    } else {
        int64_t off;
        if (imm_form) {
            off = 0;
            bit = bitoff & (bits - 1);
        } else {
            int64_t sb = sext(bitoff, sz);
            off = (sb >> (sz == 8 ? 6 : sz == 4 ? 5 : 4)) * (int64_t)sz;
            bit = (uint64_t)sb & (bits - 1);
        }
        uint64_t eo = ea_off(c, i) + off;
        if (i->asz == 4) eo = (uint32_t)eo;
        else if (i->asz == 2) eo = (uint16_t)eo;
        lin = linear(c, i->seg, eo);
        void *p = kind ? lock_ptr(c, i, lin, sz) : 0;
        if (p) {
            for (;;) {
                v = atomic_ld(p, sz);
                nv = kind == 1 ? v | (1ull << bit) : kind == 2 ? v & ~(1ull << bit) : v ^ (1ull << bit);
                if (cas(p, sz, v, nv))
                    break;
            }
            set_flags(c, (compute_arith(c) & ~F_CF) | ((v >> bit) & 1));
            return;
        }
        v = ld(c, lin, sz);
    }
    uint32_t cf = (v >> bit) & 1;
    if (kind) {
        nv = kind == 1 ? v | (1ull << bit) : kind == 2 ? v & ~(1ull << bit) : v ^ (1ull << bit);
        if (i->mod == 3)
            setreg(c, i, i->rm, sz, nv);
        else
            st(c, lin, sz, nv);
    }
    set_flags(c, (compute_arith(c) & ~F_CF) | cf);
}

static void load_far_ptr(CPU *c, Insn *i, int sreg)
{
    if (i->mod == 3)
        UD();
    unsigned sz = i->osz;
    uint64_t lin = ea_lin(c, i);
    uint64_t off = ld(c, lin, sz);
    uint16_t sel = (uint16_t)ld(c, linear(c, i->seg, ea_off(c, i) + sz), 2);
    load_seg(c, sreg, sel);
    setreg(c, i, i->reg, sz, off);
}

/* LAR / LSL: access rights or limit of a descriptor the current privilege may see */
static void lar_lsl(CPU *c, Insn *i, int lsl)
{
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM))
        UD();
    uint16_t sel = (uint16_t)rdE(c, i, 2);
    uint32_t d[4];
    int ok = (sel & ~3) && read_descriptor(c, sel, d, 0) == 0;
    if (ok) {
        int s_bit = (d[1] >> 12) & 1, type = (d[1] >> 8) & 0xf, dpl = (d[1] >> 13) & 3;
        int conforming = s_bit && (type & 0xc) == 0xc;
        if (!s_bit) {
            /* system descriptors: TSS and LDT for both; gates only for LAR (not in long mode) */
            ok = type == 1 || type == 2 || type == 3 || type == 9 || type == 11 ||
                 (!lsl && !(c->efer & EFER_LMA) && (type == 4 || type == 5 || type == 12));
        }
        if (ok && !conforming && (dpl < c->cpl || dpl < (sel & 3)))
            ok = 0;
    }
    uint32_t f = compute_arith(c) & ~F_ZF;
    if (ok) {
        uint64_t v;
        if (lsl) {
            v = (d[0] & 0xffff) | (d[1] & 0xf0000);
            if (d[1] & (1u << 23))
                v = (v << 12) | 0xfff;
        } else {
            v = d[1] & 0x00f0ff00;
        }
        setreg(c, i, i->reg, i->osz, v);
        f |= F_ZF;
    }
    set_flags(c, f);
}

/* May the block after this one start without a trip through cpu_run? Only when
 * none of the run loop's per-block checks (cpu_run) would act: keep the two in step. */
static inline __attribute__((always_inline)) int chain_ok(CPU *c)
{
    return !atomic_load_explicit(&c->exit_request, memory_order_relaxed) && !c->halted &&
           c->seen_code_epoch == atomic_load_explicit(&code_epoch, memory_order_relaxed);
}

/* the most blocks run back to back through links before cpu_run has control again */
#define CHAIN_MAX 64

/* Runs b, then its linked successors while chain_ok(); returns the last block run. */
static Block *exec_block(CPU *c, Block *b)
{
    Insn *i, *end;
    uint64_t entry_rip, ip_wrap;
    int chain = CHAIN_MAX;
enter:
    i = b->insns;
    end = i + b->n;
    /* next_rip comes from the block's entry rip and the instruction's end offset, not
     * from the previous rip: no store-to-load dependency chain through c->rip from one
     * instruction to the next. Valid because anything that moves rip other than to the
     * next instruction ends the block (ends_block() in decode.c, or stop_block). */
    entry_rip = c->rip;
    ip_wrap = c->long64 ? ~0ull : 0xffffffffull;
    if (unlikely(c->shadow)) {
        end = i + 1;
        c->shadow = 0;
    }
    c->cur_block = b;
    /* Threaded dispatch: every handler ends with its own indirect jump to the next
     * instruction's handler (NEXT), which predicts far better than one shared switch.
     * Table entries and op_ labels must match: tests/test_tcg_build.py checks that. */
    static void *const dispatch[DISPATCH_SIZE] = {
        [0 ... DISPATCH_SIZE - 1] = &&op_default,
        [P_MOV_RM_R64] = &&op_P_MOV_RM_R64,
        [P_MOV_RM_R32] = &&op_P_MOV_RM_R32,
        [P_MOV_R_RM64] = &&op_P_MOV_R_RM64,
        [P_MOV_R_RM32] = &&op_P_MOV_R_RM32,
        [P_LOAD64] = &&op_P_LOAD64,
        [P_LOAD32] = &&op_P_LOAD32,
        [P_STORE64] = &&op_P_STORE64,
        [P_STORE32] = &&op_P_STORE32,
        [P_ALU_RR64] = &&op_P_ALU_RR64,
        [P_ALU_RR32] = &&op_P_ALU_RR32,
        [P_ALU_RI64] = &&op_P_ALU_RI64,
        [P_ALU_RI32] = &&op_P_ALU_RI32,
        [P_SHIFT_RI64] = &&op_P_SHIFT_RI64,
        [P_SHIFT_RI32] = &&op_P_SHIFT_RI32,
        [P_LEA64] = &&op_P_LEA64,
        [P_TEST_RR64] = &&op_P_TEST_RR64,
        [P_TEST_RR32] = &&op_P_TEST_RR32,
        [P_LOAD_ALU64] = &&op_P_LOAD_ALU64,
        [P_LOAD_ALU32] = &&op_P_LOAD_ALU32,
        [P_ADD_RR64] = &&op_P_ADD_RR64,
        [P_OR_RR64] = &&op_P_OR_RR64,
        [P_AND_RR64] = &&op_P_AND_RR64,
        [P_SUB_RR64] = &&op_P_SUB_RR64,
        [P_XOR_RR64] = &&op_P_XOR_RR64,
        [P_CMP_RR64] = &&op_P_CMP_RR64,
        [P_ADD_RR32] = &&op_P_ADD_RR32,
        [P_OR_RR32] = &&op_P_OR_RR32,
        [P_AND_RR32] = &&op_P_AND_RR32,
        [P_SUB_RR32] = &&op_P_SUB_RR32,
        [P_XOR_RR32] = &&op_P_XOR_RR32,
        [P_CMP_RR32] = &&op_P_CMP_RR32,
        [P_ADD_RI64] = &&op_P_ADD_RI64,
        [P_OR_RI64] = &&op_P_OR_RI64,
        [P_AND_RI64] = &&op_P_AND_RI64,
        [P_SUB_RI64] = &&op_P_SUB_RI64,
        [P_XOR_RI64] = &&op_P_XOR_RI64,
        [P_CMP_RI64] = &&op_P_CMP_RI64,
        [P_ADD_RI32] = &&op_P_ADD_RI32,
        [P_OR_RI32] = &&op_P_OR_RI32,
        [P_AND_RI32] = &&op_P_AND_RI32,
        [P_SUB_RI32] = &&op_P_SUB_RI32,
        [P_XOR_RI32] = &&op_P_XOR_RI32,
        [P_CMP_RI32] = &&op_P_CMP_RI32,
        [0x00] = &&op_0x00,
        [0x08] = &&op_0x08,
        [0x10] = &&op_0x10,
        [0x18] = &&op_0x18,
        [0x20] = &&op_0x20,
        [0x28] = &&op_0x28,
        [0x30] = &&op_0x30,
        [0x38] = &&op_0x38,
        [0x01] = &&op_0x01,
        [0x09] = &&op_0x09,
        [0x11] = &&op_0x11,
        [0x19] = &&op_0x19,
        [0x21] = &&op_0x21,
        [0x29] = &&op_0x29,
        [0x31] = &&op_0x31,
        [0x39] = &&op_0x39,
        [0x02] = &&op_0x02,
        [0x0a] = &&op_0x0a,
        [0x12] = &&op_0x12,
        [0x1a] = &&op_0x1a,
        [0x22] = &&op_0x22,
        [0x2a] = &&op_0x2a,
        [0x32] = &&op_0x32,
        [0x3a] = &&op_0x3a,
        [0x03] = &&op_0x03,
        [0x0b] = &&op_0x0b,
        [0x13] = &&op_0x13,
        [0x1b] = &&op_0x1b,
        [0x23] = &&op_0x23,
        [0x2b] = &&op_0x2b,
        [0x33] = &&op_0x33,
        [0x3b] = &&op_0x3b,
        [0x04] = &&op_0x04,
        [0x0c] = &&op_0x0c,
        [0x14] = &&op_0x14,
        [0x1c] = &&op_0x1c,
        [0x24] = &&op_0x24,
        [0x2c] = &&op_0x2c,
        [0x34] = &&op_0x34,
        [0x3c] = &&op_0x3c,
        [0x05] = &&op_0x05,
        [0x0d] = &&op_0x0d,
        [0x15] = &&op_0x15,
        [0x1d] = &&op_0x1d,
        [0x25] = &&op_0x25,
        [0x2d] = &&op_0x2d,
        [0x35] = &&op_0x35,
        [0x3d] = &&op_0x3d,
        [0x06] = &&op_0x06,
        [0x0e] = &&op_0x0e,
        [0x16] = &&op_0x16,
        [0x1e] = &&op_0x1e,
        [0x07] = &&op_0x07,
        [0x17] = &&op_0x17,
        [0x1f] = &&op_0x1f,
        [0x40] = &&op_0x40,
        [0x41] = &&op_0x41,
        [0x42] = &&op_0x42,
        [0x43] = &&op_0x43,
        [0x44] = &&op_0x44,
        [0x45] = &&op_0x45,
        [0x46] = &&op_0x46,
        [0x47] = &&op_0x47,
        [0x48] = &&op_0x48,
        [0x49] = &&op_0x49,
        [0x4a] = &&op_0x4a,
        [0x4b] = &&op_0x4b,
        [0x4c] = &&op_0x4c,
        [0x4d] = &&op_0x4d,
        [0x4e] = &&op_0x4e,
        [0x4f] = &&op_0x4f,
        [0x50] = &&op_0x50,
        [0x51] = &&op_0x51,
        [0x52] = &&op_0x52,
        [0x53] = &&op_0x53,
        [0x54] = &&op_0x54,
        [0x55] = &&op_0x55,
        [0x56] = &&op_0x56,
        [0x57] = &&op_0x57,
        [0x58] = &&op_0x58,
        [0x59] = &&op_0x59,
        [0x5a] = &&op_0x5a,
        [0x5b] = &&op_0x5b,
        [0x5c] = &&op_0x5c,
        [0x5d] = &&op_0x5d,
        [0x5e] = &&op_0x5e,
        [0x5f] = &&op_0x5f,
        [0x60] = &&op_0x60,
        [0x61] = &&op_0x61,
        [0x63] = &&op_0x63,
        [0x68] = &&op_0x68,
        [0x6a] = &&op_0x6a,
        [0x69] = &&op_0x69,
        [0x6b] = &&op_0x6b,
        [0x1af] = &&op_0x1af,
        [0x6c] = &&op_0x6c,
        [0x6d] = &&op_0x6d,
        [0x6e] = &&op_0x6e,
        [0x6f] = &&op_0x6f,
        [0x70] = &&op_0x70,
        [0x71] = &&op_0x71,
        [0x72] = &&op_0x72,
        [0x73] = &&op_0x73,
        [0x74] = &&op_0x74,
        [0x75] = &&op_0x75,
        [0x76] = &&op_0x76,
        [0x77] = &&op_0x77,
        [0x78] = &&op_0x78,
        [0x79] = &&op_0x79,
        [0x7a] = &&op_0x7a,
        [0x7b] = &&op_0x7b,
        [0x7c] = &&op_0x7c,
        [0x7d] = &&op_0x7d,
        [0x7e] = &&op_0x7e,
        [0x7f] = &&op_0x7f,
        [0x180] = &&op_0x180,
        [0x181] = &&op_0x181,
        [0x182] = &&op_0x182,
        [0x183] = &&op_0x183,
        [0x184] = &&op_0x184,
        [0x185] = &&op_0x185,
        [0x186] = &&op_0x186,
        [0x187] = &&op_0x187,
        [0x188] = &&op_0x188,
        [0x189] = &&op_0x189,
        [0x18a] = &&op_0x18a,
        [0x18b] = &&op_0x18b,
        [0x18c] = &&op_0x18c,
        [0x18d] = &&op_0x18d,
        [0x18e] = &&op_0x18e,
        [0x18f] = &&op_0x18f,
        [0x80] = &&op_0x80,
        [0x82] = &&op_0x82,
        [0x81] = &&op_0x81,
        [0x83] = &&op_0x83,
        [0x84] = &&op_0x84,
        [0x85] = &&op_0x85,
        [0x86] = &&op_0x86,
        [0x87] = &&op_0x87,
        [0x88] = &&op_0x88,
        [0x89] = &&op_0x89,
        [0x8a] = &&op_0x8a,
        [0x8b] = &&op_0x8b,
        [0x8c] = &&op_0x8c,
        [0x8d] = &&op_0x8d,
        [0x8e] = &&op_0x8e,
        [0x8f] = &&op_0x8f,
        [0x90] = &&op_0x90,
        [0x91] = &&op_0x91,
        [0x92] = &&op_0x92,
        [0x93] = &&op_0x93,
        [0x94] = &&op_0x94,
        [0x95] = &&op_0x95,
        [0x96] = &&op_0x96,
        [0x97] = &&op_0x97,
        [0x98] = &&op_0x98,
        [0x99] = &&op_0x99,
        [0x9a] = &&op_0x9a,
        [0x9b] = &&op_0x9b,
        [0x9c] = &&op_0x9c,
        [0x9d] = &&op_0x9d,
        [0x9e] = &&op_0x9e,
        [0x9f] = &&op_0x9f,
        [0xa0] = &&op_0xa0,
        [0xa1] = &&op_0xa1,
        [0xa2] = &&op_0xa2,
        [0xa3] = &&op_0xa3,
        [0xa4] = &&op_0xa4,
        [0xa5] = &&op_0xa5,
        [0xa6] = &&op_0xa6,
        [0xa7] = &&op_0xa7,
        [0xaa] = &&op_0xaa,
        [0xab] = &&op_0xab,
        [0xac] = &&op_0xac,
        [0xad] = &&op_0xad,
        [0xae] = &&op_0xae,
        [0xaf] = &&op_0xaf,
        [0xa8] = &&op_0xa8,
        [0xa9] = &&op_0xa9,
        [0xb0] = &&op_0xb0,
        [0xb1] = &&op_0xb1,
        [0xb2] = &&op_0xb2,
        [0xb3] = &&op_0xb3,
        [0xb4] = &&op_0xb4,
        [0xb5] = &&op_0xb5,
        [0xb6] = &&op_0xb6,
        [0xb7] = &&op_0xb7,
        [0xb8] = &&op_0xb8,
        [0xb9] = &&op_0xb9,
        [0xba] = &&op_0xba,
        [0xbb] = &&op_0xbb,
        [0xbc] = &&op_0xbc,
        [0xbd] = &&op_0xbd,
        [0xbe] = &&op_0xbe,
        [0xbf] = &&op_0xbf,
        [0xc0] = &&op_0xc0,
        [0xc1] = &&op_0xc1,
        [0xd0] = &&op_0xd0,
        [0xd1] = &&op_0xd1,
        [0xd2] = &&op_0xd2,
        [0xd3] = &&op_0xd3,
        [0xc2] = &&op_0xc2,
        [0xc3] = &&op_0xc3,
        [0xc4] = &&op_0xc4,
        [0xc5] = &&op_0xc5,
        [0xc6] = &&op_0xc6,
        [0xc7] = &&op_0xc7,
        [0xc8] = &&op_0xc8,
        [0xc9] = &&op_0xc9,
        [0xca] = &&op_0xca,
        [0xcb] = &&op_0xcb,
        [0xcc] = &&op_0xcc,
        [0xcd] = &&op_0xcd,
        [0xce] = &&op_0xce,
        [0xf1] = &&op_0xf1,
        [0xcf] = &&op_0xcf,
        [0xd4] = &&op_0xd4,
        [0xd5] = &&op_0xd5,
        [0xd6] = &&op_0xd6,
        [0xd7] = &&op_0xd7,
        [0xd8] = &&op_0xd8,
        [0xd9] = &&op_0xd9,
        [0xda] = &&op_0xda,
        [0xdb] = &&op_0xdb,
        [0xdc] = &&op_0xdc,
        [0xdd] = &&op_0xdd,
        [0xde] = &&op_0xde,
        [0xdf] = &&op_0xdf,
        [0xe0] = &&op_0xe0,
        [0xe1] = &&op_0xe1,
        [0xe2] = &&op_0xe2,
        [0xe3] = &&op_0xe3,
        [0xe4] = &&op_0xe4,
        [0xe5] = &&op_0xe5,
        [0xec] = &&op_0xec,
        [0xed] = &&op_0xed,
        [0xe6] = &&op_0xe6,
        [0xe7] = &&op_0xe7,
        [0xee] = &&op_0xee,
        [0xef] = &&op_0xef,
        [0xe8] = &&op_0xe8,
        [0xe9] = &&op_0xe9,
        [0xeb] = &&op_0xeb,
        [0xea] = &&op_0xea,
        [0xf4] = &&op_0xf4,
        [0xf5] = &&op_0xf5,
        [0xf6] = &&op_0xf6,
        [0xf7] = &&op_0xf7,
        [0xf8] = &&op_0xf8,
        [0xf9] = &&op_0xf9,
        [0xfa] = &&op_0xfa,
        [0xfb] = &&op_0xfb,
        [0xfc] = &&op_0xfc,
        [0xfd] = &&op_0xfd,
        [0xfe] = &&op_0xfe,
        [0xff] = &&op_0xff,
        [0x100] = &&op_0x100,
        [0x102] = &&op_0x102,
        [0x103] = &&op_0x103,
        [0x101] = &&op_0x101,
        [0x105] = &&op_0x105,
        [0x106] = &&op_0x106,
        [0x107] = &&op_0x107,
        [0x108] = &&op_0x108,
        [0x109] = &&op_0x109,
        [0x10b] = &&op_0x10b,
        [0x10d] = &&op_0x10d,
        [0x118] = &&op_0x118,
        [0x119] = &&op_0x119,
        [0x11a] = &&op_0x11a,
        [0x11b] = &&op_0x11b,
        [0x11c] = &&op_0x11c,
        [0x11d] = &&op_0x11d,
        [0x11e] = &&op_0x11e,
        [0x11f] = &&op_0x11f,
        [0x120] = &&op_0x120,
        [0x122] = &&op_0x122,
        [0x121] = &&op_0x121,
        [0x123] = &&op_0x123,
        [0x130] = &&op_0x130,
        [0x131] = &&op_0x131,
        [0x132] = &&op_0x132,
        [0x140] = &&op_0x140,
        [0x141] = &&op_0x141,
        [0x142] = &&op_0x142,
        [0x143] = &&op_0x143,
        [0x144] = &&op_0x144,
        [0x145] = &&op_0x145,
        [0x146] = &&op_0x146,
        [0x147] = &&op_0x147,
        [0x148] = &&op_0x148,
        [0x149] = &&op_0x149,
        [0x14a] = &&op_0x14a,
        [0x14b] = &&op_0x14b,
        [0x14c] = &&op_0x14c,
        [0x14d] = &&op_0x14d,
        [0x14e] = &&op_0x14e,
        [0x14f] = &&op_0x14f,
        [0x190] = &&op_0x190,
        [0x191] = &&op_0x191,
        [0x192] = &&op_0x192,
        [0x193] = &&op_0x193,
        [0x194] = &&op_0x194,
        [0x195] = &&op_0x195,
        [0x196] = &&op_0x196,
        [0x197] = &&op_0x197,
        [0x198] = &&op_0x198,
        [0x199] = &&op_0x199,
        [0x19a] = &&op_0x19a,
        [0x19b] = &&op_0x19b,
        [0x19c] = &&op_0x19c,
        [0x19d] = &&op_0x19d,
        [0x19e] = &&op_0x19e,
        [0x19f] = &&op_0x19f,
        [0x1a0] = &&op_0x1a0,
        [0x1a8] = &&op_0x1a8,
        [0x1a1] = &&op_0x1a1,
        [0x1a9] = &&op_0x1a9,
        [0x1a2] = &&op_0x1a2,
        [0x1a3] = &&op_0x1a3,
        [0x1ab] = &&op_0x1ab,
        [0x1b3] = &&op_0x1b3,
        [0x1bb] = &&op_0x1bb,
        [0x1ba] = &&op_0x1ba,
        [0x1a4] = &&op_0x1a4,
        [0x1a5] = &&op_0x1a5,
        [0x1ac] = &&op_0x1ac,
        [0x1ad] = &&op_0x1ad,
        [0x1ae] = &&op_0x1ae,
        [0x1b0] = &&op_0x1b0,
        [0x1b1] = &&op_0x1b1,
        [0x1b2] = &&op_0x1b2,
        [0x1b4] = &&op_0x1b4,
        [0x1b5] = &&op_0x1b5,
        [0x1b6] = &&op_0x1b6,
        [0x1b7] = &&op_0x1b7,
        [0x1be] = &&op_0x1be,
        [0x1bf] = &&op_0x1bf,
        [0x1b8] = &&op_0x1b8,
        [0x1bc] = &&op_0x1bc,
        [0x1bd] = &&op_0x1bd,
        [0x1c0] = &&op_0x1c0,
        [0x1c1] = &&op_0x1c1,
        [0x1c7] = &&op_0x1c7,
        [0x1c8] = &&op_0x1c8,
        [0x1c9] = &&op_0x1c9,
        [0x1ca] = &&op_0x1ca,
        [0x1cb] = &&op_0x1cb,
        [0x1cc] = &&op_0x1cc,
        [0x1cd] = &&op_0x1cd,
        [0x1ce] = &&op_0x1ce,
        [0x1cf] = &&op_0x1cf,
        [0x177] = &&op_0x177,
        [OP_UD] = &&op_OP_UD,
    };
    unsigned sz;
    int op;
    uint64_t a, v, lin;
#define PROLOGUE()                                          \
    do {                                                    \
        c->next_rip = (entry_rip + i->end) & ip_wrap;       \
        sz = i->osz;                                        \
        op = i->op;                                         \
    } while (0)
#define NEXT                                                \
    do {                                                    \
        c->rip = c->next_rip;                               \
        if (unlikely(c->stop_block)) {                      \
            int why = c->stop_block;                        \
            c->stop_block = 0;                              \
            if (why & STOP_REPLAY)                          \
                c->nacc = c->acc_pos = 0;                   \
            if (why & STOP_BLOCK) {                         \
                i++;                                        \
                goto out;                                   \
            }                                               \
        }                                                   \
        if (++i >= end)                                     \
            goto out;                                       \
        PROLOGUE();                                         \
        goto *dispatch[op];                                 \
    } while (0)
    if (i >= end)
        goto out;
    PROLOGUE();
    goto *dispatch[op];
    {
        /* ALU forms */
        op_0x00: op_0x08: op_0x10: op_0x18: op_0x20: op_0x28: op_0x30: op_0x38:
            alu_E(c, i, op >> 3, getreg(c, i, i->reg, 1), 1);
            NEXT;
        op_0x01: op_0x09: op_0x11: op_0x19: op_0x21: op_0x29: op_0x31: op_0x39:
            alu_E(c, i, op >> 3, getreg(c, i, i->reg, sz), sz);
            NEXT;
        op_0x02: op_0x0a: op_0x12: op_0x1a: op_0x22: op_0x2a: op_0x32: op_0x3a:
            v = alu(c, op >> 3, getreg(c, i, i->reg, 1), rdE(c, i, 1), 1);
            if ((op >> 3) != 7) setreg(c, i, i->reg, 1, v);
            NEXT;
        op_0x03: op_0x0b: op_0x13: op_0x1b: op_0x23: op_0x2b: op_0x33: op_0x3b:
            v = alu(c, op >> 3, getreg(c, i, i->reg, sz), rdE(c, i, sz), sz);
            if ((op >> 3) != 7) setreg(c, i, i->reg, sz, v);
            NEXT;
        op_0x04: op_0x0c: op_0x14: op_0x1c: op_0x24: op_0x2c: op_0x34: op_0x3c:
            v = alu(c, op >> 3, c->r[R_AX] & 0xff, i->imm & 0xff, 1);
            if ((op >> 3) != 7) setreg(c, i, R_AX, 1, v);
            NEXT;
        op_0x05: op_0x0d: op_0x15: op_0x1d: op_0x25: op_0x2d: op_0x35: op_0x3d:
            v = alu(c, op >> 3, c->r[R_AX] & szmask(sz), i->imm & szmask(sz), sz);
            if ((op >> 3) != 7) setreg(c, i, R_AX, sz, v);
            NEXT;
        op_0x06: op_0x0e: op_0x16: op_0x1e:
            push(c, sz, c->seg[op >> 3].sel);
            NEXT;
        op_0x07: op_0x17: op_0x1f:
            v = peek(c, sz, 0);
            load_seg(c, op >> 3, (uint16_t)v);
            c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
            if (op == 0x17)
                c->shadow = 1;
            NEXT;
        op_0x40: op_0x41: op_0x42: op_0x43: op_0x44: op_0x45: op_0x46: op_0x47:
            a = getreg(c, i, op & 7, sz);
            c->cc_c = get_cf(c);
            set_cc(c, CC_INC, sz, a + 1, 0, 0);
            setreg(c, i, op & 7, sz, a + 1);
            NEXT;
        op_0x48: op_0x49: op_0x4a: op_0x4b: op_0x4c: op_0x4d: op_0x4e: op_0x4f:
            a = getreg(c, i, op & 7, sz);
            c->cc_c = get_cf(c);
            set_cc(c, CC_DEC, sz, a - 1, 0, 0);
            setreg(c, i, op & 7, sz, a - 1);
            NEXT;
        op_0x50: op_0x51: op_0x52: op_0x53: op_0x54: op_0x55: op_0x56: op_0x57:
            push(c, sz, getreg(c, i, i->reg, sz));
            NEXT;
        op_0x58: op_0x59: op_0x5a: op_0x5b: op_0x5c: op_0x5d: op_0x5e: op_0x5f:
            v = pop(c, sz);
            setreg(c, i, i->reg, sz, v);
            NEXT;
        op_0x60: {   /* pusha */
            uint64_t osp = c->r[R_SP];
            uint64_t sp = c->r[R_SP];
            for (int r = 0; r < 8; r++) {
                sp = sp_add(c, sp, -(int64_t)sz);
                st(c, sp_lin(c, sp), sz, r == R_SP ? osp : c->r[r]);
            }
            c->r[R_SP] = sp;
            NEXT;
        }
        op_0x61: {   /* popa */
            uint64_t vals[8];
            for (int r = 7; r >= 0; r--)
                vals[r] = peek(c, sz, (7 - r) * sz);
            for (int r = 0; r < 8; r++)
                if (r != R_SP)
                    setreg(c, i, r, sz, vals[r]);
            c->r[R_SP] = sp_add(c, c->r[R_SP], 8 * sz);
            NEXT;
        }
        op_0x63:
            if (c->long64) {   /* movsxd */
                v = (uint64_t)(int64_t)(int32_t)rdE(c, i, 4);
                setreg(c, i, i->reg, sz, v);
            } else {
                UD();   /* arpl: not used by anything we run */
            }
            NEXT;
        op_0x68: op_0x6a:
            push(c, sz, i->imm);
            NEXT;
        op_0x69: op_0x6b: op_0x1af: {
            int64_t x = sext(rdE(c, i, sz), sz);
            int64_t y = op == 0x1af ? sext(getreg(c, i, i->reg, sz), sz) : (int64_t)i->imm;
            uint64_t r;
            uint32_t ovf;
            if (sz == 8) {
                __int128 p = (__int128)x * y;
                r = (uint64_t)p;
                ovf = p != (__int128)(int64_t)r;
            } else {
                int64_t p = x * sext((uint64_t)y, sz);
                r = (uint64_t)p & szmask(sz);
                ovf = p != sext(r, sz);
            }
            setreg(c, i, i->reg, sz, r);
            set_flags(c, (ovf ? F_CF | F_OF : 0) | szp(r, sz));
            NEXT;
        }
        op_0x6c: op_0x6d: op_0x6e: op_0x6f:
            string_io(c, i);
            NEXT;
        op_0x70: op_0x71: op_0x72: op_0x73: op_0x74: op_0x75: op_0x76: op_0x77:
        op_0x78: op_0x79: op_0x7a: op_0x7b: op_0x7c: op_0x7d: op_0x7e: op_0x7f:
            if (cond(c, op & 15))
                c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
            NEXT;
        op_0x180: op_0x181: op_0x182: op_0x183: op_0x184: op_0x185: op_0x186: op_0x187:
        op_0x188: op_0x189: op_0x18a: op_0x18b: op_0x18c: op_0x18d: op_0x18e: op_0x18f:
            if (cond(c, op & 15))
                c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
            NEXT;
        op_0x80: op_0x82:
            alu_E(c, i, i->reg & 7, i->imm & 0xff, 1);
            NEXT;
        op_0x81: op_0x83:
            alu_E(c, i, i->reg & 7, i->imm & szmask(sz), sz);
            NEXT;
        op_0x84:
            alu(c, 4, rdE(c, i, 1), getreg(c, i, i->reg, 1), 1);
            NEXT;
        op_0x85:
            alu(c, 4, rdE(c, i, sz), getreg(c, i, i->reg, sz), sz);
            NEXT;
        op_0x86: op_0x87: {
            unsigned s = op == 0x86 ? 1 : sz;
            if (i->mod == 3) {
                a = getreg(c, i, i->rm, s);
                v = getreg(c, i, i->reg, s);
                setreg(c, i, i->rm, s, v);
                setreg(c, i, i->reg, s, a);
            } else {
                lin = ea_lin(c, i);
                v = getreg(c, i, i->reg, s);
                void *p = atomic_host(c, lin, s);   /* xchg with memory is always locked */
                if (p) {
                    switch (s) {
                    case 1: a = __atomic_exchange_n((uint8_t *)p, (uint8_t)v, __ATOMIC_SEQ_CST); break;
                    case 2: a = __atomic_exchange_n((uint16_t *)p, (uint16_t)v, __ATOMIC_SEQ_CST); break;
                    case 4: a = __atomic_exchange_n((uint32_t *)p, (uint32_t)v, __ATOMIC_SEQ_CST); break;
                    default: a = __atomic_exchange_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); break;
                    }
                } else {
                    a = ld(c, lin, s);
                    st(c, lin, s, v);
                }
                setreg(c, i, i->reg, s, a);
            }
            NEXT;
        }
        op_0x88:
            wrE(c, i, 1, getreg(c, i, i->reg, 1));
            NEXT;
        op_0x89:
            wrE(c, i, sz, getreg(c, i, i->reg, sz));
            NEXT;
        op_0x8a:
            setreg(c, i, i->reg, 1, rdE(c, i, 1));
            NEXT;
        op_0x8b:
            setreg(c, i, i->reg, sz, rdE(c, i, sz));
            NEXT;
        op_0x8c:
            if ((i->reg & 7) > 5) UD();
            if (i->mod == 3)
                setreg(c, i, i->rm, sz, c->seg[i->reg & 7].sel);
            else
                st(c, ea_lin(c, i), 2, c->seg[i->reg & 7].sel);
            NEXT;
        op_0x8d:
            if (i->mod == 3) UD();
            setreg(c, i, i->reg, sz, ea_off(c, i));
            NEXT;
        op_0x8e: {
            int s = i->reg & 7;
            if (s == S_CS || s > 5) UD();
            load_seg(c, s, (uint16_t)rdE(c, i, 2));
            if (s == S_SS)
                c->shadow = 1;
            NEXT;
        }
        op_0x8f: {
            v = peek(c, sz, 0);
            if (i->mod == 3) {
                c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
                setreg(c, i, i->rm, sz, v);
            } else {
                uint64_t osp = c->r[R_SP];
                c->r[R_SP] = sp_add(c, osp, sz);   /* the address uses the incremented rsp */
                lin = ea_lin(c, i);
                c->r[R_SP] = osp;
                st(c, lin, sz, v);
                c->r[R_SP] = sp_add(c, osp, sz);
            }
            NEXT;
        }
        op_0x90:
            if (i->reg == 0)   /* nop / pause (xchg eax,eax would zero-extend: not with 0x90) */
                NEXT;
            /* fallthrough: REX.B 90 is xchg r8, rax */
        op_0x91: op_0x92: op_0x93: op_0x94: op_0x95: op_0x96: op_0x97:
            a = getreg(c, i, i->reg, sz);
            v = getreg(c, i, R_AX, sz);
            setreg(c, i, R_AX, sz, a);
            setreg(c, i, i->reg, sz, v);
            NEXT;
        op_0x98:
            if (sz == 2) setreg(c, i, R_AX, 2, (uint64_t)(int64_t)(int8_t)c->r[R_AX]);
            else if (sz == 4) setreg(c, i, R_AX, 4, (uint64_t)(int64_t)(int16_t)c->r[R_AX]);
            else c->r[R_AX] = (uint64_t)(int64_t)(int32_t)c->r[R_AX];
            NEXT;
        op_0x99:
            v = (c->r[R_AX] & sbit(sz)) ? ~0ull : 0;
            setreg(c, i, R_DX, sz, v);
            NEXT;
        op_0x9a:
            do_far_jump(c, (uint16_t)i->imm2, i->imm & szmask(sz), 1, sz);
            NEXT;
        op_0x9b:   /* fwait */
            x87_fwait(c);
            NEXT;
        op_0x9c:
            if ((c->eflags & F_VM) && ((c->eflags >> 12) & 3) != 3) GP0();
            push(c, sz, get_eflags(c) & ~(uint64_t)(F_VM | F_RF));
            NEXT;
        op_0x9d: {
            if ((c->eflags & F_VM) && ((c->eflags >> 12) & 3) != 3) GP0();
            v = peek(c, sz, 0);
            uint64_t mask = F_ARITH | F_TF | F_DF | F_NT | F_OF;
            if (sz >= 4) mask |= F_AC | F_ID;
            if (c->cpl == 0) mask |= F_IOPL;
            if (c->cpl <= (int)((c->eflags >> 12) & 3)) mask |= F_IF;
            int was_if = (c->eflags & F_IF) != 0;
            set_eflags(c, v, mask);
            c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
            (void)was_if;
            NEXT;
        }
        op_0x9e: {
            uint32_t f = compute_arith(c);
            f = (f & F_OF) | ((c->r[R_AX] >> 8) & (F_SF | F_ZF | F_AF | F_PF | F_CF));
            set_flags(c, f);
            NEXT;
        }
        op_0x9f:
            setreg(c, i, 4, 1, (get_eflags(c) & 0xd5) | 2);   /* AH */
            NEXT;
        op_0xa0: op_0xa1: {
            unsigned s = op == 0xa0 ? 1 : sz;
            v = ld(c, linear(c, i->seg, (uint64_t)i->disp & szmask(i->asz)), s);
            setreg(c, i, R_AX, s, v);
            NEXT;
        }
        op_0xa2: op_0xa3: {
            unsigned s = op == 0xa2 ? 1 : sz;
            st(c, linear(c, i->seg, (uint64_t)i->disp & szmask(i->asz)), s, c->r[R_AX]);
            NEXT;
        }
        op_0xa4: op_0xa5: op_0xa6: op_0xa7: op_0xaa: op_0xab: op_0xac: op_0xad:
        op_0xae: op_0xaf:
            string_op(c, i);
            NEXT;
        op_0xa8:
            alu(c, 4, c->r[R_AX] & 0xff, i->imm & 0xff, 1);
            NEXT;
        op_0xa9:
            alu(c, 4, c->r[R_AX] & szmask(sz), i->imm & szmask(sz), sz);
            NEXT;
        op_0xb0: op_0xb1: op_0xb2: op_0xb3: op_0xb4: op_0xb5: op_0xb6: op_0xb7:
            setreg(c, i, i->reg, 1, i->imm);
            NEXT;
        op_0xb8: op_0xb9: op_0xba: op_0xbb: op_0xbc: op_0xbd: op_0xbe: op_0xbf:
            setreg(c, i, i->reg, sz, i->imm);
            NEXT;
        op_0xc0: op_0xc1: op_0xd0: op_0xd1: op_0xd2: op_0xd3: {
            unsigned s = (op & 1) ? sz : 1;
            unsigned cnt = op <= 0xc1 ? (unsigned)(i->imm & 0xff) : op <= 0xd1 ? 1 : (unsigned)(c->r[R_CX] & 0xff);
            int kind = i->reg & 7;
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
                NEXT;
            }
            if (i->mod == 3) {
                a = getreg(c, i, i->rm, s);
                v = shift_op(c, i->reg & 7, a, cnt, s);
                setreg(c, i, i->rm, s, v);
            } else {
                lin = ea_lin(c, i);
                a = ld(c, lin, s);
                v = shift_op(c, i->reg & 7, a, cnt, s);
                st(c, lin, s, v);
            }
            NEXT;
        }
        op_0xc2: op_0xc3:
            v = pop(c, sz);
            if (op == 0xc2)
                c->r[R_SP] = sp_add(c, c->r[R_SP], i->imm & 0xffff);
            c->next_rip = ip_mask(c, i, v);
            NEXT;
        op_0xc4: op_0xc5:
            load_far_ptr(c, i, op == 0xc4 ? S_ES : S_DS);
            NEXT;
        op_0xc6:
            if ((i->reg & 7) != 0) UD();
            wrE(c, i, 1, i->imm);
            NEXT;
        op_0xc7:
            if ((i->reg & 7) != 0) UD();
            wrE(c, i, sz, i->imm);
            NEXT;
        op_0xc8: {   /* enter */
            unsigned level = i->imm2 & 31;
            uint64_t frame_sz = i->imm & 0xffff;
            uint64_t sp = sp_add(c, c->r[R_SP], -(int64_t)sz);
            st(c, sp_lin(c, sp), sz, c->r[R_BP]);
            uint64_t frame = sp;
            uint64_t bp = c->r[R_BP];
            for (unsigned k = 1; k < level; k++) {
                bp = sp_add(c, bp, -(int64_t)sz);
                v = ld(c, sp_lin(c, bp), sz);
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
            NEXT;
        }
        op_0xc9: {   /* leave */
            int ss = stack_sz(c);
            uint64_t nsp = ss == 8 ? c->r[R_BP] : ss == 4 ? (uint32_t)c->r[R_BP]
                                                          : ((c->r[R_SP] & ~0xffffull) | (uint16_t)c->r[R_BP]);
            v = ld(c, sp_lin(c, nsp), sz);   /* a fault here leaves rsp untouched */
            c->r[R_SP] = sp_add(c, nsp, sz);
            setreg(c, i, R_BP, sz, v);
            NEXT;
        }
        op_0xca: op_0xcb:
            do_far_ret(c, sz, op == 0xca ? (uint32_t)(i->imm & 0xffff) : 0);
            NEXT;
        op_0xcc: op_0xcd: op_0xce: op_0xf1: {
            int vec = op == 0xcc ? 3 : op == 0xcd ? (int)(i->imm & 0xff) : op == 0xce ? 4 : 1;
            if (op == 0xce && !(compute_arith(c) & F_OF))
                NEXT;
            if ((c->eflags & F_VM) && op == 0xcd && ((c->eflags >> 12) & 3) != 3)
                GP0();
            c->delivering = vec;
            deliver_interrupt(c, vec, op != 0xf1, 0, 0, c->next_rip);
            c->delivering = -1;
            c->next_rip = c->rip;
            NEXT;
        }
        op_0xcf:
            do_iret(c, sz);
            NEXT;
        op_0xd4: {   /* aam */
            unsigned base = i->imm & 0xff;
            if (!base) RAISE(c, EXC_DE);
            unsigned al = c->r[R_AX] & 0xff;
            v = ((al / base) << 8) | (al % base);
            setreg(c, i, R_AX, 2, v);
            set_flags(c, szp(v & 0xff, 1));
            NEXT;
        }
        op_0xd5: {   /* aad */
            unsigned base = i->imm & 0xff;
            v = ((c->r[R_AX] & 0xff) + ((c->r[R_AX] >> 8) & 0xff) * base) & 0xff;
            setreg(c, i, R_AX, 2, v);
            set_flags(c, szp(v, 1));
            NEXT;
        }
        op_0xd6:
            setreg(c, i, R_AX, 1, get_cf(c) ? 0xff : 0);
            NEXT;
        op_0xd7: {
            uint64_t off = (areg(c, R_BX, i->asz) + (c->r[R_AX] & 0xff)) & szmask(i->asz);
            setreg(c, i, R_AX, 1, ld(c, linear(c, i->seg, off), 1));
            NEXT;
        }
        op_0xd8: op_0xd9: op_0xda: op_0xdb: op_0xdc: op_0xdd: op_0xde: op_0xdf:
            x87_exec(c, i);
            NEXT;
        op_0xe0: op_0xe1: op_0xe2: {
            uint64_t cx = areg(c, R_CX, i->asz) - 1;
            areg_set(c, R_CX, i->asz, cx);
            cx &= szmask(i->asz);
            int take = cx != 0;
            if (op == 0xe0) take = take && !(compute_arith(c) & F_ZF);
            if (op == 0xe1) take = take && (compute_arith(c) & F_ZF);
            if (take)
                c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
            NEXT;
        }
        op_0xe3:
            if (areg(c, R_CX, i->asz) == 0)
                c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
            NEXT;
        op_0xe4: op_0xe5: op_0xec: op_0xed: {
            unsigned s = (op & 1) ? (sz == 8 ? 4 : sz) : 1;
            uint16_t port = op < 0xe8 ? (uint16_t)(i->imm & 0xff) : (uint16_t)c->r[R_DX];
            if (!io_allowed(c)) GP0();
            v = io_access(c, port, s, 0, 0);
            setreg(c, i, R_AX, s, v);
            NEXT;
        }
        op_0xe6: op_0xe7: op_0xee: op_0xef: {
            unsigned s = (op & 1) ? (sz == 8 ? 4 : sz) : 1;
            uint16_t port = op < 0xe8 ? (uint16_t)(i->imm & 0xff) : (uint16_t)c->r[R_DX];
            if (!io_allowed(c)) GP0();
            io_access(c, port, s, 1, c->r[R_AX] & szmask(s));
            NEXT;
        }
        op_0xe8:
            push(c, sz, c->next_rip);
            c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
            NEXT;
        op_0xe9: op_0xeb:
            c->next_rip = ip_mask(c, i, c->next_rip + i->imm);
            NEXT;
        op_0xea:
            do_far_jump(c, (uint16_t)i->imm2, i->imm & szmask(sz), 0, sz);
            NEXT;
        op_0xf4:
            NEED_CPL0();
            c->halted = 1;
            NEXT;
        op_0xf5:
            set_flags(c, compute_arith(c) ^ F_CF);
            NEXT;
        op_0xf6: op_0xf7: {
            unsigned s = op == 0xf6 ? 1 : sz;
            switch (i->reg & 7) {
            case 0: case 1:
                alu(c, 4, rdE(c, i, s), i->imm & szmask(s), s);
                break;
            case 2:
                if (i->mod == 3) {
                    setreg(c, i, i->rm, s, ~getreg(c, i, i->rm, s));
                } else {
                    lin = ea_lin(c, i);
                    void *p = lock_ptr(c, i, lin, s);
                    if (p) {
                        do a = atomic_ld(p, s); while (!cas(p, s, a, ~a));
                    } else {
                        st(c, lin, s, ~ld(c, lin, s));
                    }
                }
                break;
            case 3:
                if (i->mod == 3) {
                    a = getreg(c, i, i->rm, s);
                    set_cc(c, CC_SUB, s, 0 - a, 0, a);
                    setreg(c, i, i->rm, s, 0 - a);
                } else {
                    lin = ea_lin(c, i);
                    void *p = lock_ptr(c, i, lin, s);
                    if (p) {
                        do a = atomic_ld(p, s); while (!cas(p, s, a, 0 - a));
                    } else {
                        a = ld(c, lin, s);
                        st(c, lin, s, 0 - a);
                    }
                    set_cc(c, CC_SUB, s, 0 - a, 0, a);
                }
                break;
            case 4: do_mul(c, i, 0, rdE(c, i, s), s); break;
            case 5: do_mul(c, i, 1, rdE(c, i, s), s); break;
            case 6: do_div(c, i, 0, rdE(c, i, s), s); break;
            default: do_div(c, i, 1, rdE(c, i, s), s); break;
            }
            NEXT;
        }
        op_0xf8: set_flags(c, compute_arith(c) & ~F_CF); NEXT;
        op_0xf9: set_flags(c, compute_arith(c) | F_CF); NEXT;
        op_0xfa:
            if ((c->cr0 & CR0_PE) && c->cpl > (int)((c->eflags >> 12) & 3)) GP0();
            c->eflags &= ~(uint64_t)F_IF;
            NEXT;
        op_0xfb:
            if ((c->cr0 & CR0_PE) && c->cpl > (int)((c->eflags >> 12) & 3)) GP0();
            if (!(c->eflags & F_IF))
                c->shadow = 1;
            c->eflags |= F_IF;
            NEXT;
        op_0xfc: c->eflags &= ~(uint64_t)F_DF; NEXT;
        op_0xfd: c->eflags |= F_DF; NEXT;
        op_0xfe: op_0xff: {
            unsigned s = op == 0xfe ? 1 : sz;
            int r = i->reg & 7;
            if (op == 0xfe && r > 1) UD();
            if (r <= 1) {
                int inc = r == 0;
                uint64_t cf = get_cf(c);
                if (i->mod == 3) {
                    a = getreg(c, i, i->rm, s);
                    v = inc ? a + 1 : a - 1;
                    setreg(c, i, i->rm, s, v);
                } else {
                    lin = ea_lin(c, i);
                    void *p = lock_ptr(c, i, lin, s);
                    if (p) {
                        do { a = atomic_ld(p, s); v = inc ? a + 1 : a - 1; } while (!cas(p, s, a, v));
                    } else {
                        a = ld(c, lin, s);
                        v = inc ? a + 1 : a - 1;
                        st(c, lin, s, v);
                    }
                }
                c->cc_c = cf;
                set_cc(c, inc ? CC_INC : CC_DEC, s, v, 0, 0);
                NEXT;
            }
            switch (r) {
            case 2:
                v = rdE(c, i, sz);
                push(c, sz, c->next_rip);
                c->next_rip = ip_mask(c, i, v);
                break;
            case 4:
                c->next_rip = ip_mask(c, i, rdE(c, i, sz));
                break;
            case 3: case 5: {
                if (i->mod == 3) UD();
                unsigned fs = sz;   /* m16:16 / m16:32 / m16:64 */
                lin = ea_lin(c, i);
                v = ld(c, lin, fs);
                uint16_t sel = (uint16_t)ld(c, linear(c, i->seg, ea_off(c, i) + fs), 2);
                do_far_jump(c, sel, v, r == 3, sz);
                break;
            }
            case 6:
                push(c, sz, rdE(c, i, sz));
                break;
            default:
                UD();
            }
            NEXT;
        }

        /* ---- 0F xx ---- */
        op_0x100: exec_system_0f00(c, i); NEXT;
        op_0x102: op_0x103: lar_lsl(c, i, op == 0x103); NEXT;
        op_0x101: exec_system_0f01(c, i); NEXT;
        op_0x105: do_syscall(c); NEXT;
        op_0x106: NEED_CPL0(); c->cr0 &= ~(uint64_t)CR0_TS; NEXT;
        op_0x107: do_sysret(c, sz); NEXT;
        op_0x108: op_0x109: NEED_CPL0(); NEXT;
        op_0x10b: UD(); NEXT;
        op_0x10d: op_0x118: op_0x119: op_0x11a: op_0x11b: op_0x11c: op_0x11d: op_0x11e: op_0x11f:
            NEXT;   /* prefetch / hint nops */
        op_0x120: {
            NEED_CPL0();
            int cr = i->reg;
            switch (cr) {
            case 0: v = c->cr0; break;
            case 2: v = c->cr2; break;
            case 3: v = c->cr3; break;
            case 4: v = c->cr4; break;
            case 8: v = c->cr8; break;
            default: UD();
            }
            c->r[i->rm] = c->long64 ? v : (uint32_t)v;
            NEXT;
        }
        op_0x122: {
            NEED_CPL0();
            v = c->long64 ? c->r[i->rm] : (uint32_t)c->r[i->rm];
            switch (i->reg) {
            case 0: set_cr0(c, v); break;
            case 2: c->cr2 = v; break;
            case 3: set_cr3(c, v); break;
            case 4: set_cr4(c, v); break;
            case 8: c->cr8 = v & 15; break;
            default: UD();
            }
            NEXT;
        }
        op_0x121: {
            NEED_CPL0();
            int dr = i->reg & 7;
            if (dr == 4 || dr == 5) dr += 2;
            v = dr == 6 ? (c->dr[6] | 0xffff0ff0ull) : dr == 7 ? (c->dr[7] | 0x400) : c->dr[dr];
            c->r[i->rm] = c->long64 ? v : (uint32_t)v;
            NEXT;
        }
        op_0x123: {
            NEED_CPL0();
            int dr = i->reg & 7;
            if (dr == 4 || dr == 5) dr += 2;
            c->dr[dr] = c->r[i->rm];
            NEXT;
        }
        op_0x130: {
            NEED_CPL0();
            uint64_t val = (c->r[R_DX] << 32) | (uint32_t)c->r[R_AX];
            if (msr_write(c, (uint32_t)c->r[R_CX], val) < 0) GP0();
            NEXT;
        }
        op_0x131: {
            uint64_t t = __rdtsc() + c->tsc_offset;
            c->r[R_AX] = (uint32_t)t;
            c->r[R_DX] = t >> 32;
            NEXT;
        }
        op_0x132: {
            NEED_CPL0();
            uint64_t val;
            if (msr_read(c, (uint32_t)c->r[R_CX], &val) < 0) GP0();
            c->r[R_AX] = (uint32_t)val;
            c->r[R_DX] = val >> 32;
            NEXT;
        }
        op_0x140: op_0x141: op_0x142: op_0x143: op_0x144: op_0x145: op_0x146: op_0x147:
        op_0x148: op_0x149: op_0x14a: op_0x14b: op_0x14c: op_0x14d: op_0x14e: op_0x14f:
            v = rdE(c, i, sz);
            if (cond(c, op & 15))
                setreg(c, i, i->reg, sz, v);
            else if (sz == 4)
                c->r[i->reg] = (uint32_t)c->r[i->reg];
            NEXT;
        op_0x190: op_0x191: op_0x192: op_0x193: op_0x194: op_0x195: op_0x196: op_0x197:
        op_0x198: op_0x199: op_0x19a: op_0x19b: op_0x19c: op_0x19d: op_0x19e: op_0x19f:
            wrE(c, i, 1, cond(c, op & 15));
            NEXT;
        op_0x1a0: op_0x1a8:
            push(c, sz, c->seg[op == 0x1a0 ? S_FS : S_GS].sel);
            NEXT;
        op_0x1a1: op_0x1a9:
            v = peek(c, sz, 0);
            load_seg(c, op == 0x1a1 ? S_FS : S_GS, (uint16_t)v);
            c->r[R_SP] = sp_add(c, c->r[R_SP], sz);
            NEXT;
        op_0x1a2:
            do_cpuid(c);
            NEXT;
        op_0x1a3: bit_op(c, i, 0, getreg(c, i, i->reg, sz), 0); NEXT;
        op_0x1ab: bit_op(c, i, 1, getreg(c, i, i->reg, sz), 0); NEXT;
        op_0x1b3: bit_op(c, i, 2, getreg(c, i, i->reg, sz), 0); NEXT;
        op_0x1bb: bit_op(c, i, 3, getreg(c, i, i->reg, sz), 0); NEXT;
        op_0x1ba:
            if ((i->reg & 7) < 4) UD();
            bit_op(c, i, (i->reg & 7) - 4, i->imm & 0xff, 1);
            NEXT;
        op_0x1a4: op_0x1a5: op_0x1ac: op_0x1ad: {
            unsigned cnt = (op & 1) ? (unsigned)(c->r[R_CX] & 0xff) : (unsigned)(i->imm & 0xff);
            int left = op < 0x1ac;
            if (i->mod == 3) {
                v = shxd(c, left, getreg(c, i, i->rm, sz), getreg(c, i, i->reg, sz), cnt, sz);
                setreg(c, i, i->rm, sz, v);   /* even a zero count zero-extends a 32-bit register */
            } else {
                lin = ea_lin(c, i);
                v = shxd(c, left, ld(c, lin, sz), getreg(c, i, i->reg, sz), cnt, sz);
                st(c, lin, sz, v);
            }
            NEXT;
        }
        op_0x1ae:
            if (i->mod == 3) {
                /* lfence / mfence / sfence; rdfsbase & co need CR4.FSGSBASE */
                if ((i->reg & 7) >= 5)
                    NEXT;
                if (!c->long64 || !(c->cr4 & CR4_FSGSBASE) || i->pfx != 2) UD();
                switch (i->reg & 7) {
                case 0: setreg(c, i, i->rm, sz, c->seg[S_FS].base); break;
                case 1: setreg(c, i, i->rm, sz, c->seg[S_GS].base); break;
                case 2: c->seg[S_FS].base = getreg(c, i, i->rm, sz); break;
                default: c->seg[S_GS].base = getreg(c, i, i->rm, sz); break;
                }
                NEXT;
            }
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
            NEXT;
        op_0x1b0: op_0x1b1: {
            unsigned s = op == 0x1b0 ? 1 : sz;
            uint64_t acc = c->r[R_AX] & szmask(s);
            uint64_t src = getreg(c, i, i->reg, s);
            if (i->mod == 3) {
                a = getreg(c, i, i->rm, s);
                alu(c, 7, acc, a, s);
                /* the destination is always written (a 32-bit one zero-extends) */
                if (a == acc) {
                    setreg(c, i, i->rm, s, src);
                } else {
                    setreg(c, i, i->rm, s, a);
                    setreg(c, i, R_AX, s, a);
                }
            } else {
                lin = ea_lin(c, i);
                void *p = atomic_host(c, lin, s);
                if (p) {
                    int ok;
                    switch (s) {
                    case 1: { uint8_t e = acc; ok = __atomic_compare_exchange_n((uint8_t *)p, &e, (uint8_t)src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
                    case 2: { uint16_t e = acc; ok = __atomic_compare_exchange_n((uint16_t *)p, &e, (uint16_t)src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
                    case 4: { uint32_t e = acc; ok = __atomic_compare_exchange_n((uint32_t *)p, &e, (uint32_t)src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
                    default: { uint64_t e = acc; ok = __atomic_compare_exchange_n((uint64_t *)p, &e, src, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); a = e; break; }
                    }
                    (void)ok;
                } else {
                    a = ld(c, lin, s);
                    st(c, lin, s, a == acc ? src : a);
                }
                alu(c, 7, acc, a, s);
                if (a != acc)
                    setreg(c, i, R_AX, s, a);
            }
            NEXT;
        }
        op_0x1b2: load_far_ptr(c, i, S_SS); NEXT;
        op_0x1b4: load_far_ptr(c, i, S_FS); NEXT;
        op_0x1b5: load_far_ptr(c, i, S_GS); NEXT;
        op_0x1b6: setreg(c, i, i->reg, sz, rdE(c, i, 1)); NEXT;
        op_0x1b7: setreg(c, i, i->reg, sz, rdE(c, i, 2)); NEXT;
        op_0x1be: setreg(c, i, i->reg, sz, (uint64_t)(int64_t)(int8_t)rdE(c, i, 1)); NEXT;
        op_0x1bf: setreg(c, i, i->reg, sz, (uint64_t)(int64_t)(int16_t)rdE(c, i, 2)); NEXT;
        op_0x1b8: {
            if (i->pfx != 2) UD();
            v = rdE(c, i, sz);
            uint64_t cnt = __builtin_popcountll(v);
            setreg(c, i, i->reg, sz, cnt);
            set_flags(c, v == 0 ? F_ZF : 0);
            NEXT;
        }
        op_0x1bc: op_0x1bd: {
            v = rdE(c, i, sz);
            unsigned bits = sz * 8;
            if (i->pfx == 2) {   /* tzcnt / lzcnt */
                uint64_t cnt;
                if (op == 0x1bc) cnt = v ? (uint64_t)__builtin_ctzll(v) : bits;
                else cnt = v ? (uint64_t)(__builtin_clzll(v) - (64 - bits)) : bits;
                setreg(c, i, i->reg, sz, cnt);
                set_flags(c, (compute_arith(c) & ~(F_CF | F_ZF)) | (v == 0 ? F_CF : 0) | (cnt == 0 ? F_ZF : 0));
            } else {
                if (v == 0) {
                    /* destination "undefined": kept, but a 32-bit one is zero-extended as on Intel */
                    if (sz == 4)
                        c->r[i->reg] = (uint32_t)c->r[i->reg];
                    set_flags(c, (compute_arith(c)) | F_ZF);
                } else {
                    uint64_t idx = op == 0x1bc ? (uint64_t)__builtin_ctzll(v) : (uint64_t)(63 - __builtin_clzll(v));
                    setreg(c, i, i->reg, sz, idx);
                    set_flags(c, compute_arith(c) & ~F_ZF);
                }
            }
            NEXT;
        }
        op_0x1c0: op_0x1c1: {
            unsigned s = op == 0x1c0 ? 1 : sz;
            uint64_t src = getreg(c, i, i->reg, s);
            if (i->mod == 3) {
                a = getreg(c, i, i->rm, s);
                v = alu(c, 0, a, src, s);
                setreg(c, i, i->reg, s, a);
                setreg(c, i, i->rm, s, v);
            } else {
                lin = ea_lin(c, i);
                void *p = lock_ptr(c, i, lin, s);
                if (p) {
                    do { a = atomic_ld(p, s); v = a + src; } while (!cas(p, s, a, v));
                    alu(c, 0, a, src, s);
                } else {
                    a = ld(c, lin, s);
                    v = alu(c, 0, a, src, s);
                    st(c, lin, s, v);
                }
                setreg(c, i, i->reg, s, a);
            }
            NEXT;
        }
        op_0x1c7: {
            int r = i->reg & 7;
            if (r == 1 && i->mod != 3) {
                lin = ea_lin(c, i);
                if (sz == 8) {
                    if (lin & 15) GP0();
                    uint32_t f = compute_arith(c) & ~F_ZF;
                    uint64_t *p16 = atomic_host(c, lin, 16);
                    if (p16) {
                        /* RAM: the host's own lock cmpxchg16b keeps it atomic against other vCPUs */
                        uint64_t lo = c->r[R_AX], hi = c->r[R_DX];
                        uint8_t ok;
                        __asm__ volatile("lock cmpxchg16b %1; sete %0"
                                         : "=q"(ok), "+m"(*(volatile unsigned __int128 *)p16), "+a"(lo), "+d"(hi)
                                         : "b"(c->r[R_BX]), "c"(c->r[R_CX])
                                         : "memory", "cc");
                        if (ok) {
                            f |= F_ZF;
                        } else {
                            c->r[R_AX] = lo;
                            c->r[R_DX] = hi;
                        }
                        set_flags(c, f);
                        NEXT;
                    }
                    uint64_t lo = ld(c, lin, 8), hi = ld(c, lin + 8, 8);
                    if (lo == c->r[R_AX] && hi == c->r[R_DX]) {
                        st(c, lin, 8, c->r[R_BX]);
                        st(c, lin + 8, 8, c->r[R_CX]);
                        f |= F_ZF;
                    } else {
                        st(c, lin, 8, lo);
                        c->r[R_AX] = lo;
                        c->r[R_DX] = hi;
                    }
                    set_flags(c, f);
                } else {
                    uint64_t cmp = ((c->r[R_DX] & 0xffffffffull) << 32) | (uint32_t)c->r[R_AX];
                    uint64_t nv = ((c->r[R_CX] & 0xffffffffull) << 32) | (uint32_t)c->r[R_BX];
                    uint32_t f = compute_arith(c) & ~F_ZF;
                    void *p = atomic_host(c, lin, 8);
                    uint64_t old;
                    int ok;
                    if (p) {
                        old = cmp;
                        ok = __atomic_compare_exchange_n((uint64_t *)p, &old, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
                    } else {
                        old = ld(c, lin, 8);
                        ok = old == cmp;
                        st(c, lin, 8, ok ? nv : old);
                    }
                    if (ok) {
                        f |= F_ZF;
                    } else {
                        c->r[R_AX] = (uint32_t)old;
                        c->r[R_DX] = old >> 32;
                    }
                    set_flags(c, f);
                }
            } else {
                UD();   /* rdrand/rdseed/vmptrld: not advertised */
            }
            NEXT;
        }
        op_0x1c8: op_0x1c9: op_0x1ca: op_0x1cb: op_0x1cc: op_0x1cd: op_0x1ce: op_0x1cf:
            if (sz == 8) c->r[i->reg] = __builtin_bswap64(c->r[i->reg]);
            else if (sz == 4) c->r[i->reg] = __builtin_bswap32((uint32_t)c->r[i->reg]);
            else setreg(c, i, i->reg, 2, 0);   /* 16-bit bswap: undefined, hardware gives 0 */
            NEXT;
        op_0x177:   /* emms */
            c->ftw = 0xffff;
            NEXT;
        op_OP_UD:
            UD();
            NEXT;

        /* ---- specialised forms (see specialize() in decode.c) ---- */
        op_P_MOV_RM_R64: c->r[i->rm] = c->r[i->reg]; NEXT;
        op_P_MOV_RM_R32: c->r[i->rm] = (uint32_t)c->r[i->reg]; NEXT;
        op_P_MOV_R_RM64: c->r[i->reg] = c->r[i->rm]; NEXT;
        op_P_MOV_R_RM32: c->r[i->reg] = (uint32_t)c->r[i->rm]; NEXT;
        op_P_LOAD64: c->r[i->reg] = ld(c, ea_lin(c, i), 8); NEXT;
        op_P_LOAD32: c->r[i->reg] = ld(c, ea_lin(c, i), 4); NEXT;
        op_P_STORE64: st(c, ea_lin(c, i), 8, c->r[i->reg]); NEXT;
        op_P_STORE32: st(c, ea_lin(c, i), 4, c->r[i->reg]); NEXT;
        op_P_ALU_RR64:
            v = alu(c, (int)i->imm2, c->r[i->rm], c->r[i->reg], 8);
            if (i->imm2 != 7) c->r[i->rm] = v;
            NEXT;
        op_P_ALU_RR32:
            v = alu(c, (int)i->imm2, (uint32_t)c->r[i->rm], (uint32_t)c->r[i->reg], 4);
            if (i->imm2 != 7) c->r[i->rm] = (uint32_t)v;
            NEXT;
        op_P_ALU_RI64:
            v = alu(c, (int)i->imm2, c->r[i->rm], i->imm, 8);
            if (i->imm2 != 7) c->r[i->rm] = v;
            NEXT;
        op_P_ALU_RI32:
            v = alu(c, (int)i->imm2, (uint32_t)c->r[i->rm], (uint32_t)i->imm, 4);
            if (i->imm2 != 7) c->r[i->rm] = (uint32_t)v;
            NEXT;
        /* per-operation ALU forms (P_ALUX): alu() folds to the one operation */
#define ALU_RR64(o) v = alu(c, o, c->r[i->rm], c->r[i->reg], 8); if (o != 7) c->r[i->rm] = v; NEXT
#define ALU_RR32(o) v = alu(c, o, (uint32_t)c->r[i->rm], (uint32_t)c->r[i->reg], 4); if (o != 7) c->r[i->rm] = (uint32_t)v; NEXT
#define ALU_RI64(o) v = alu(c, o, c->r[i->rm], i->imm, 8); if (o != 7) c->r[i->rm] = v; NEXT
#define ALU_RI32(o) v = alu(c, o, (uint32_t)c->r[i->rm], (uint32_t)i->imm, 4); if (o != 7) c->r[i->rm] = (uint32_t)v; NEXT
        op_P_ADD_RR64: ALU_RR64(0); op_P_OR_RR64: ALU_RR64(1); op_P_AND_RR64: ALU_RR64(4);
        op_P_SUB_RR64: ALU_RR64(5); op_P_XOR_RR64: ALU_RR64(6); op_P_CMP_RR64: ALU_RR64(7);
        op_P_ADD_RR32: ALU_RR32(0); op_P_OR_RR32: ALU_RR32(1); op_P_AND_RR32: ALU_RR32(4);
        op_P_SUB_RR32: ALU_RR32(5); op_P_XOR_RR32: ALU_RR32(6); op_P_CMP_RR32: ALU_RR32(7);
        op_P_ADD_RI64: ALU_RI64(0); op_P_OR_RI64: ALU_RI64(1); op_P_AND_RI64: ALU_RI64(4);
        op_P_SUB_RI64: ALU_RI64(5); op_P_XOR_RI64: ALU_RI64(6); op_P_CMP_RI64: ALU_RI64(7);
        op_P_ADD_RI32: ALU_RI32(0); op_P_OR_RI32: ALU_RI32(1); op_P_AND_RI32: ALU_RI32(4);
        op_P_SUB_RI32: ALU_RI32(5); op_P_XOR_RI32: ALU_RI32(6); op_P_CMP_RI32: ALU_RI32(7);
#undef ALU_RR64
#undef ALU_RR32
#undef ALU_RI64
#undef ALU_RI32
        op_P_LOAD_ALU64: {
            /* reg <- reg op E (E a register for sub/cmp, else memory) */
            int aop = (int)(i->imm2 & 0xff);
            uint64_t src = (i->imm2 & 0x100) ? c->r[i->rm] : ld(c, ea_lin(c, i), 8);
            v = alu(c, aop, c->r[i->reg], src, 8);
            if (aop != 7) c->r[i->reg] = v;
            NEXT;
        }
        op_P_LOAD_ALU32: {
            int aop = (int)(i->imm2 & 0xff);
            uint64_t src = (i->imm2 & 0x100) ? (uint32_t)c->r[i->rm] : ld(c, ea_lin(c, i), 4);
            v = alu(c, aop, (uint32_t)c->r[i->reg], src, 4);
            if (aop != 7) c->r[i->reg] = (uint32_t)v;
            NEXT;
        }
        op_P_SHIFT_RI64: {
            unsigned n = i->imm & 63;
            a = c->r[i->rm];
            if (n) {
                int kind = (int)i->imm2;
                v = kind == 5 ? a >> n : kind == 7 ? (uint64_t)((int64_t)a >> n) : a << n;
                set_cc(c, kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL, 8, v, a, n);
                c->r[i->rm] = v;
            }
            NEXT;
        }
        op_P_SHIFT_RI32: {
            unsigned n = i->imm & 31;
            a = (uint32_t)c->r[i->rm];
            if (n) {
                int kind = (int)i->imm2;
                v = kind == 5 ? a >> n : kind == 7 ? (uint64_t)(uint32_t)((int32_t)a >> n) : (uint32_t)(a << n);
                set_cc(c, kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL, 4, v, a, n);
                a = v;
            }
            c->r[i->rm] = a;   /* a 32-bit destination is written even for count 0 */
            NEXT;
        }
        op_P_LEA64: c->r[i->reg] = ea_off(c, i); NEXT;
        op_P_TEST_RR64: set_cc(c, CC_LOGIC, 8, c->r[i->rm] & c->r[i->reg], 0, 0); NEXT;
        op_P_TEST_RR32: set_cc(c, CC_LOGIC, 4, (uint32_t)(c->r[i->rm] & c->r[i->reg]), 0, 0); NEXT;
        op_default:
            if ((op >= 0x110 && op <= 0x117) || (op >= 0x128 && op <= 0x12f) ||
                (op >= 0x150 && op <= 0x17f) || (op >= 0x1c2 && op <= 0x1c6) ||
                (op >= 0x1d0 && op <= 0x1ff) || op >= 0x200)
                sse_exec(c, i);
            else
                UD();
            NEXT;
    }
out:
#undef NEXT
#undef PROLOGUE
    c->st_insns += i - b->insns;
    /* Block chaining: the successor is taken from b's links (see next_block) without
     * returning to cpu_run, whose per-block work (call, checks, lookup) costs about
     * as much as a short block. Links that miss or need translating go through cpu_run. */
    if (likely(--chain > 0 && chain_ok(c))) {
        uint64_t pc = c->rip, csb = c->seg[S_CS].base;
        uint32_t mode = c->code_mode;
        Block *n = b->link[0];
        if (likely(n && block_fits(c, n, pc, csb, mode))) {
            b = n;
            goto enter;
        }
        n = b->link[1];
        if (n && block_fits(c, n, pc, csb, mode)) {
            b = n;
            goto enter;
        }
    }
    c->cur_block = 0;
    return b;
}

static void exec_system_0f00(CPU *c, Insn *i)
{
    int r = i->reg & 7;
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM)) UD();
    switch (r) {
    case 0: case 1: {
        uint16_t sel = c->seg[r == 0 ? S_LDT : S_TR].sel;
        if (i->mod == 3) setreg(c, i, i->rm, i->osz, sel);
        else st(c, ea_lin(c, i), 2, sel);
        break;
    }
    case 2: case 3: {
        NEED_CPL0();
        uint16_t sel = (uint16_t)rdE(c, i, 2);
        int sreg = r == 2 ? S_LDT : S_TR;
        Seg *s = &c->seg[sreg];
        if ((sel & ~3) == 0) {
            if (r == 3) GP0();
            s->sel = sel;
            s->unusable = 1;
            s->base = 0;
            s->limit = 0;
            break;
        }
        if (sel & 4) GP0();
        uint32_t d[4];
        int wide = (c->efer & EFER_LMA) != 0;
        if (read_descriptor(c, sel, d, wide) < 0) GP0();
        Seg ns;
        seg_from_desc(&ns, sel, d);
        if (ns.s) GP0();
        if (r == 2 && ns.type != 2) GP0();
        if (r == 3 && ns.type != 9 && ns.type != 1) GP0();
        if (!ns.present) RAISE_ERR(c, EXC_NP, sel & ~3u);
        if (wide)
            ns.base |= (uint64_t)d[2] << 32;
        if (r == 3) {
            /* mark the TSS busy in the GDT */
            uint64_t dl = c->gdt_base + (sel & ~7u);
            int saved = c->mmu_idx;
            c->mmu_idx = 0;
            st(c, dl + 5, 1, ((d[1] >> 8) & 0xff) | 2);
            c->mmu_idx = saved;
            ns.type |= 2;
        }
        *s = ns;
        break;
    }
    case 4: case 5: {   /* verr / verw: report accessible for flat data and code */
        uint16_t sel = (uint16_t)rdE(c, i, 2);
        uint32_t d[4];
        int ok = (sel & ~3) && read_descriptor(c, sel, d, 0) == 0 && ((d[1] >> 12) & 1);
        uint32_t f = compute_arith(c) & ~F_ZF;
        set_flags(c, f | (ok ? F_ZF : 0));
        break;
    }
    default:
        UD();
    }
}

static void exec_system_0f01(CPU *c, Insn *i)
{
    int r = i->reg & 7;
    if (i->mod == 3) {
        switch (r * 8 + (i->rm & 7)) {
        case 8 * 1 + 0: case 8 * 1 + 1:   /* monitor / mwait: not advertised */
            UD();
        case 8 * 1 + 2: case 8 * 1 + 3:   /* clac / stac */
            NEED_CPL0();
            if ((i->rm & 7) == 2) c->eflags &= ~(uint64_t)F_AC;
            else c->eflags |= F_AC;
            return;
        case 8 * 2 + 0: {   /* xgetbv */
            if (!(c->cr4 & (1u << 18))) UD();
            if ((uint32_t)c->r[R_CX] != 0) GP0();
            c->r[R_AX] = (uint32_t)c->xcr0;
            c->r[R_DX] = c->xcr0 >> 32;
            return;
        }
        case 8 * 2 + 1: {   /* xsetbv */
            if (!(c->cr4 & (1u << 18))) UD();
            NEED_CPL0();
            uint64_t v = (c->r[R_DX] << 32) | (uint32_t)c->r[R_AX];
            if ((uint32_t)c->r[R_CX] != 0 || !(v & 1) || (v & ~7ull) || ((v & 4) && !(v & 2))) GP0();
            c->xcr0 = v;
            return;
        }
        case 8 * 7 + 0:   /* swapgs */
            if (!c->long64) UD();
            NEED_CPL0();
            {
                uint64_t t = c->seg[S_GS].base;
                c->seg[S_GS].base = c->kernel_gs_base;
                c->kernel_gs_base = t;
            }
            return;
        case 8 * 7 + 1: {   /* rdtscp */
            uint64_t t = __rdtsc() + c->tsc_offset;
            c->r[R_AX] = (uint32_t)t;
            c->r[R_DX] = t >> 32;
            c->r[R_CX] = (uint32_t)c->tsc_aux;
            return;
        }
        }
        if (r == 4) {
            setreg(c, i, i->rm, i->osz, c->cr0 & (i->osz == 2 ? 0xffff : ~0ull));
            return;
        }
        if (r == 6) {
            NEED_CPL0();
            uint64_t v = getreg(c, i, i->rm, 2);
            set_cr0(c, (c->cr0 & ~0xeull) | (v & 0xf) | (c->cr0 & 1));
            return;
        }
        UD();
    }
    uint64_t lin = ea_lin(c, i);
    switch (r) {
    case 0: case 1: {
        uint64_t base = r == 0 ? c->gdt_base : c->idt_base;
        uint32_t limit = r == 0 ? c->gdt_limit : c->idt_limit;
        st(c, lin, 2, limit);
        if (c->long64) st(c, lin + 2, 8, base);
        else st(c, linear(c, i->seg, ea_off(c, i) + 2), 4, i->osz == 2 ? base & 0xffffff : base);
        return;
    }
    case 2: case 3: {
        NEED_CPL0();
        uint32_t limit = (uint32_t)ld(c, lin, 2);
        uint64_t base;
        if (c->long64) base = ld(c, lin + 2, 8);
        else {
            base = ld(c, linear(c, i->seg, ea_off(c, i) + 2), 4);
            if (i->osz == 2) base &= 0xffffff;
        }
        if (r == 2) { c->gdt_base = base; c->gdt_limit = limit; }
        else { c->idt_base = base; c->idt_limit = limit; }
        return;
    }
    case 4:
        st(c, lin, 2, c->cr0);
        return;
    case 6: {
        NEED_CPL0();
        uint64_t v = ld(c, lin, 2);
        set_cr0(c, (c->cr0 & ~0xeull) | (v & 0xf) | (c->cr0 & 1));
        return;
    }
    case 7:
        NEED_CPL0();
        tlb_flush_page(c, lin);
        return;
    }
    UD();
}
