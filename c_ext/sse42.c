/* SSE4.2: crc32 (F2 0F 38 F0/F1, CRC-32C) and the string compares pcmpestrm/i,
 * pcmpistrm/i (66 0F 3A 60-63), after the SDM's "Packed Compare String" pseudo-code:
 * a comparison matrix of a (xmm1) against b (xmm2/m128), aggregated into IntRes1,
 * polarity into IntRes2, then an index in ECX or a mask in XMM0, and the flags.
 * (pcmpgtq, the rest of SSE4.2, is in sse41.c.) */
#include "simd.h"

int sse42_op(int op)
{
    return op == 0x2f0 || op == 0x2f1 || (op >= 0x360 && op <= 0x363);
}

/* CRC-32C (Castagnoli), reflected, over the low `bytes` bytes of v */
static uint32_t crc32c(uint32_t crc, uint64_t v, unsigned bytes)
{
    for (unsigned k = 0; k < bytes; k++) {
        crc ^= (uint8_t)(v >> (8 * k));
        for (int b = 0; b < 8; b++)
            crc = (crc >> 1) ^ (0x82F63B78u & -(crc & 1));
    }
    return crc;
}

static int64_t element(const X *x, int k, int words, int sign)
{
    if (words)
        return sign ? x->sw[k] : x->w[k];
    return sign ? x->sb[k] : x->b[k];
}

static int implicit_length(const X *x, int n, int words)
{
    for (int k = 0; k < n; k++)
        if (element(x, k, words, 0) == 0)
            return k;
    return n;
}

static int explicit_length(CPU *c, int reg, int n, int wide)
{
    int64_t v = wide ? (int64_t)c->r[reg] : (int64_t)(int32_t)c->r[reg];
    uint64_t mag = v < 0 ? -(uint64_t)v : (uint64_t)v;
    return mag > (uint64_t)n ? n : (int)mag;
}

static void pcmpstr(CPU *c, Insn *i, int op)
{
    if (i->pfx != 1)
        RAISE(c, EXC_UD);
    sse_check(c);
    X a, b;
    src128(c, i, &b, 0);   /* no alignment demanded */
    memcpy(&a, c->xmm[i->reg], 16);
    unsigned imm = (unsigned)(i->imm & 0xff);
    int words = imm & 1, sign = (imm >> 1) & 1, agg = (imm >> 2) & 3, pol = (imm >> 4) & 3;
    int n = words ? 8 : 16;
    int explicit_len = op <= 0x361;
    int la = explicit_len ? explicit_length(c, R_AX, n, i->rexw) : implicit_length(&a, n, words);
    int lb = explicit_len ? explicit_length(c, R_DX, n, i->rexw) : implicit_length(&b, n, words);
    uint32_t res1 = 0;
    for (int j = 0; j < n; j++) {
        int bit = 0;
        int64_t bj = element(&b, j, words, sign);
        switch (agg) {
        case 0:   /* equal any */
            if (j < lb)
                for (int k = 0; k < la && !bit; k++)
                    bit = element(&a, k, words, sign) == bj;
            break;
        case 1:   /* ranges: a holds [lo, hi] pairs */
            if (j < lb)
                for (int k = 0; k + 1 < la && !bit; k += 2)
                    bit = element(&a, k, words, sign) <= bj && bj <= element(&a, k + 1, words, sign);
            break;
        case 2:   /* equal each */
            if (j < la && j < lb)
                bit = element(&a, j, words, sign) == bj;
            else
                bit = j >= la && j >= lb;
            break;
        default:   /* equal ordered: a as a substring starting at b[j] */
            bit = 1;
            for (int k = 0; k < n - j && bit; k++) {
                if (k >= la)
                    break;                      /* a exhausted: matches */
                if (j + k >= lb)
                    bit = 0;                    /* b exhausted before a */
                else
                    bit = element(&a, k, words, sign) == element(&b, j + k, words, sign);
            }
            break;
        }
        res1 |= (uint32_t)bit << j;
    }
    uint32_t all = (1u << n) - 1;
    uint32_t res2 = res1;
    if (pol == 1)
        res2 = ~res1 & all;
    else if (pol == 3)
        res2 = res1 ^ ((1u << lb) - 1);   /* negated where b is valid */
    if (op & 1) {   /* index into ECX */
        int idx = n;
        if (res2)
            idx = (imm & 0x40) ? 31 - __builtin_clz(res2) : __builtin_ctz(res2);
        c->r[R_CX] = (uint32_t)idx;
    } else {        /* mask into XMM0 */
        X m;
        memset(&m, 0, sizeof m);
        if (imm & 0x40) {
            for (int k = 0; k < n; k++)
                if (res2 >> k & 1) {
                    if (words)
                        m.w[k] = 0xffff;
                    else
                        m.b[k] = 0xff;
                }
        } else {
            m.d[0] = res2;
        }
        memcpy(c->xmm[0], &m, 16);
    }
    c->cc_op = CC_EAGER;
    c->cc_res = (res2 ? F_CF : 0) | (lb < n ? F_ZF : 0) | (la < n ? F_SF : 0) | ((res2 & 1) ? F_OF : 0);
}

void sse42_exec(CPU *c, Insn *i, int op)
{
    if (op >= 0x360) {
        pcmpstr(c, i, op);
        return;
    }
    /* crc32 r32/r64, r/m8/16/32/64: F2 mandatory (without it 0F 38 F0/F1 is movbe) */
    if (i->pfx != 3)
        RAISE(c, EXC_UD);
    unsigned sz = op == 0x2f0 ? 1 : i->rexw ? 8 : i->osz == 2 ? 2 : 4;
    uint64_t v;
    if (i->mod == 3) {
        if (sz == 1 && !i->rex && i->rm >= 4 && i->rm < 8)
            v = c->r[i->rm - 4] >> 8;   /* ah ch dh bh */
        else
            v = c->r[i->rm];
    } else {
        v = ld(c, ea_lin(c, i), sz);
    }
    c->r[i->reg] = crc32c((uint32_t)c->r[i->reg], v, sz);
}
