/* SSE/SSE2/SSE3: the integer and data-movement subset x86-64 userspace relies on
 * (glibc string functions, memcpy/memset, struct copies) and the floating point.
 * x87 and fxsave/fxrstor live in x87.c.
 * SSE/SSE2 floating point runs on the host's own SSE unit with the guest's MXCSR
 * (rounding, FTZ/DAZ) loaded, so results, NaN propagation and status flags are
 * exactly the hardware's. CPUID advertises up to SSSE3 (ssse3.h), MMX (mmx.h) too. */
#include <emmintrin.h>
#include "simd.h"


/* ---- SSE/SSE2 floating point ---- */

static __m128 xps(const X *x) { __m128 v; memcpy(&v, x, 16); return v; }
static __m128d xpd(const X *x) { __m128d v; memcpy(&v, x, 16); return v; }

/* source operand of a scalar (4/8 bytes) or packed (16 bytes) op */
static void fp_src(CPU *c, Insn *i, X *x, unsigned scalar_bytes)
{
    if (i->mod == 3) {
        memcpy(x, c->xmm[i->rm], 16);
        return;
    }
    if (scalar_bytes) {
        memset(x, 0, 16);
        uint64_t v = ld(c, ea_lin(c, i), scalar_bytes);
        memcpy(x, &v, scalar_bytes);
        return;
    }
    uint64_t lin = ea_lin(c, i);
    if (lin & 15)
        RAISE_ERR(c, EXC_GP, 0);
    x->q[0] = ld(c, lin, 8);
    x->q[1] = ld(c, lin + 8, 8);
}

static __m128 cmp_ps(__m128 a, __m128 b, int p, int scalar)
{
    if (scalar) {
        switch (p & 7) {
        case 0: return _mm_cmpeq_ss(a, b);
        case 1: return _mm_cmplt_ss(a, b);
        case 2: return _mm_cmple_ss(a, b);
        case 3: return _mm_cmpunord_ss(a, b);
        case 4: return _mm_cmpneq_ss(a, b);
        case 5: return _mm_cmpnlt_ss(a, b);
        case 6: return _mm_cmpnle_ss(a, b);
        default: return _mm_cmpord_ss(a, b);
        }
    }
    switch (p & 7) {
    case 0: return _mm_cmpeq_ps(a, b);
    case 1: return _mm_cmplt_ps(a, b);
    case 2: return _mm_cmple_ps(a, b);
    case 3: return _mm_cmpunord_ps(a, b);
    case 4: return _mm_cmpneq_ps(a, b);
    case 5: return _mm_cmpnlt_ps(a, b);
    case 6: return _mm_cmpnle_ps(a, b);
    default: return _mm_cmpord_ps(a, b);
    }
}

static __m128d cmp_pd(__m128d a, __m128d b, int p, int scalar)
{
    if (scalar) {
        switch (p & 7) {
        case 0: return _mm_cmpeq_sd(a, b);
        case 1: return _mm_cmplt_sd(a, b);
        case 2: return _mm_cmple_sd(a, b);
        case 3: return _mm_cmpunord_sd(a, b);
        case 4: return _mm_cmpneq_sd(a, b);
        case 5: return _mm_cmpnlt_sd(a, b);
        case 6: return _mm_cmpnle_sd(a, b);
        default: return _mm_cmpord_sd(a, b);
        }
    }
    switch (p & 7) {
    case 0: return _mm_cmpeq_pd(a, b);
    case 1: return _mm_cmplt_pd(a, b);
    case 2: return _mm_cmple_pd(a, b);
    case 3: return _mm_cmpunord_pd(a, b);
    case 4: return _mm_cmpneq_pd(a, b);
    case 5: return _mm_cmpnlt_pd(a, b);
    case 6: return _mm_cmpnle_pd(a, b);
    default: return _mm_cmpord_pd(a, b);
    }
}

/* GCC treats vector float add and multiply as commutative and may swap the
   operands, but x86 picks the *first* source's NaN when both are NaNs: force the
   guest's operand order with the instruction itself. */
#define FP_ASM(insn, type, a, b) ({ type _v = (a); __asm__(insn " %1, %0" : "+x"(_v) : "x"(b)); _v; })

/* Returns 1 when the instruction was an SSE floating-point one. */
static int sse_fp(CPU *c, Insn *i)
{
    int op = i->op & 0xff, pfx = i->pfx;
    int ps = pfx == 0, pd = pfx == 1, ss = pfx == 2, sd = pfx == 3;
    switch (op) {
    case 0x51: case 0x58: case 0x59: case 0x5c: case 0x5d: case 0x5e: case 0x5f:
    case 0x52: case 0x53: case 0x5a: case 0x5b: case 0xe6: case 0xc2:
    case 0x2a: case 0x2c: case 0x2d: case 0x2e: case 0x2f:
        break;
    default:
        return 0;
    }
    if ((op == 0x52 || op == 0x53) && (pd || sd))
        return 0;
    if (op == 0xe6 && ps)
        return 0;
    if ((op == 0x2a || op == 0x2c || op == 0x2d) && !(ss || sd))
        return 0;   /* MMX conversions */
    if ((op == 0x2e || op == 0x2f) && !(ps || pd))
        return 0;
    X s, d, r;
    uint8_t *dst = c->xmm[i->reg];
    unsigned sbytes = ss ? 4 : sd ? 8 : 0;
    /* operand fetches first: a fault must not leave the host MXCSR switched */
    if (op == 0x2a) {
        unsigned isz = i->rexw ? 8 : 4;
        uint64_t v = i->mod == 3 ? (isz == 8 ? c->r[i->rm] : (uint32_t)c->r[i->rm]) : ld(c, ea_lin(c, i), isz);
        memset(&s, 0, 16);
        memcpy(&s, &v, 8);
    } else if (op == 0x2e || op == 0x2f) {
        fp_src(c, i, &s, ps ? 4 : 8);
    } else if (op == 0x5a && (ps || ss || sd)) {
        fp_src(c, i, &s, ps ? 8 : sbytes);   /* cvtps2pd reads 64 bits */
    } else if (op == 0xe6 && ss) {
        fp_src(c, i, &s, 8);                  /* cvtdq2pd reads 64 bits */
    } else if (op == 0xe6 || op == 0x5b) {
        fp_src(c, i, &s, 0);                  /* packed despite an F2/F3 prefix */
    } else {
        fp_src(c, i, &s, (op == 0x2c || op == 0x2d) ? (ss ? 4 : 8) : sbytes);
    }
    memcpy(&d, dst, 16);
    memset(&r, 0, sizeof r);
    unsigned host = _mm_getcsr();
    _mm_setcsr((c->mxcsr & ~0x3fu) | 0x1f80u);   /* guest rounding/FTZ/DAZ, all exceptions masked */
    int write = 1;
    uint64_t gpr = 0;
    int to_gpr = 0;
    uint32_t eflags_set = 0;
    int set_eflags_cmp = 0;
    switch (op) {
    case 0x58: case 0x59: case 0x5c: case 0x5d: case 0x5e: case 0x5f: {
        if (ps || ss) {
            __m128 a = xps(&d), b = xps(&s), v;
            switch (op) {
            case 0x58: v = ss ? FP_ASM("addss", __m128, a, b) : FP_ASM("addps", __m128, a, b); break;
            case 0x59: v = ss ? FP_ASM("mulss", __m128, a, b) : FP_ASM("mulps", __m128, a, b); break;
            case 0x5c: v = ss ? _mm_sub_ss(a, b) : _mm_sub_ps(a, b); break;
            case 0x5d: v = ss ? _mm_min_ss(a, b) : _mm_min_ps(a, b); break;
            case 0x5e: v = ss ? _mm_div_ss(a, b) : _mm_div_ps(a, b); break;
            default: v = ss ? _mm_max_ss(a, b) : _mm_max_ps(a, b); break;
            }
            memcpy(&r, &v, 16);
        } else {
            __m128d a = xpd(&d), b = xpd(&s), v;
            switch (op) {
            case 0x58: v = sd ? FP_ASM("addsd", __m128d, a, b) : FP_ASM("addpd", __m128d, a, b); break;
            case 0x59: v = sd ? FP_ASM("mulsd", __m128d, a, b) : FP_ASM("mulpd", __m128d, a, b); break;
            case 0x5c: v = sd ? _mm_sub_sd(a, b) : _mm_sub_pd(a, b); break;
            case 0x5d: v = sd ? _mm_min_sd(a, b) : _mm_min_pd(a, b); break;
            case 0x5e: v = sd ? _mm_div_sd(a, b) : _mm_div_pd(a, b); break;
            default: v = sd ? _mm_max_sd(a, b) : _mm_max_pd(a, b); break;
            }
            memcpy(&r, &v, 16);
        }
        break;
    }
    case 0x51: {
        if (ps || ss) {
            __m128 v = ss ? _mm_move_ss(xps(&d), _mm_sqrt_ss(xps(&s))) : _mm_sqrt_ps(xps(&s));
            memcpy(&r, &v, 16);
        } else {
            __m128d v = sd ? _mm_sqrt_sd(xpd(&d), xpd(&s)) : _mm_sqrt_pd(xpd(&s));
            memcpy(&r, &v, 16);
        }
        break;
    }
    case 0x52: case 0x53: {
        __m128 v;
        if (op == 0x52)
            v = ss ? _mm_move_ss(xps(&d), _mm_rsqrt_ss(xps(&s))) : _mm_rsqrt_ps(xps(&s));
        else
            v = ss ? _mm_move_ss(xps(&d), _mm_rcp_ss(xps(&s))) : _mm_rcp_ps(xps(&s));
        memcpy(&r, &v, 16);
        break;
    }
    case 0xc2: {
        int p = (int)(i->imm & 7);
        if (ps || ss) {
            __m128 v = cmp_ps(xps(&d), xps(&s), p, ss);
            memcpy(&r, &v, 16);
        } else {
            __m128d v = cmp_pd(xpd(&d), xpd(&s), p, sd);
            memcpy(&r, &v, 16);
        }
        break;
    }
    case 0x5a: {
        if (ps) { __m128d v = _mm_cvtps_pd(xps(&s)); memcpy(&r, &v, 16); }
        else if (pd) { __m128 v = _mm_cvtpd_ps(xpd(&s)); memcpy(&r, &v, 16); }
        else if (ss) { __m128d v = _mm_cvtss_sd(xpd(&d), xps(&s)); memcpy(&r, &v, 16); }
        else { __m128 v = _mm_cvtsd_ss(xps(&d), xpd(&s)); memcpy(&r, &v, 16); }
        break;
    }
    case 0x5b: {
        __m128i si;
        memcpy(&si, &s, 16);
        if (ps) { __m128 v = _mm_cvtepi32_ps(si); memcpy(&r, &v, 16); }
        else if (pd) { __m128i v = _mm_cvtps_epi32(xps(&s)); memcpy(&r, &v, 16); }
        else if (ss) { __m128i v = _mm_cvttps_epi32(xps(&s)); memcpy(&r, &v, 16); }
        else { _mm_setcsr(host); return 0; }
        break;
    }
    case 0xe6: {
        __m128i si;
        memcpy(&si, &s, 16);
        if (pd) { __m128i v = _mm_cvttpd_epi32(xpd(&s)); memcpy(&r, &v, 16); }
        else if (ss) { __m128d v = _mm_cvtepi32_pd(si); memcpy(&r, &v, 16); }
        else { __m128i v = _mm_cvtpd_epi32(xpd(&s)); memcpy(&r, &v, 16); }
        break;
    }
    case 0x2a: {
        int64_t v;
        memcpy(&v, &s, 8);
        if (ss) {
            __m128 x = i->rexw ? _mm_cvtsi64_ss(xps(&d), v) : _mm_cvtsi32_ss(xps(&d), (int32_t)v);
            memcpy(&r, &x, 16);
        } else {
            __m128d x = i->rexw ? _mm_cvtsi64_sd(xpd(&d), v) : _mm_cvtsi32_sd(xpd(&d), (int32_t)v);
            memcpy(&r, &x, 16);
        }
        break;
    }
    case 0x2c: case 0x2d: {
        int trunc = op == 0x2c;
        to_gpr = 1;
        write = 0;
        if (ss) {
            __m128 x = xps(&s);
            gpr = i->rexw ? (uint64_t)(trunc ? _mm_cvttss_si64(x) : _mm_cvtss_si64(x))
                          : (uint32_t)(trunc ? _mm_cvttss_si32(x) : _mm_cvtss_si32(x));
        } else {
            __m128d x = xpd(&s);
            gpr = i->rexw ? (uint64_t)(trunc ? _mm_cvttsd_si64(x) : _mm_cvtsd_si64(x))
                          : (uint32_t)(trunc ? _mm_cvttsd_si32(x) : _mm_cvtsd_si32(x));
        }
        break;
    }
    case 0x2e: case 0x2f: {
        /* ZF PF CF from the compare; the comi/ucomi intrinsic raises the right status flag */
        write = 0;
        set_eflags_cmp = 1;
        int unord, lt, eq;
        if (ps) {
            __m128 a = xps(&d), b = xps(&s);
            float fa, fb;
            memcpy(&fa, &d, 4);
            memcpy(&fb, &s, 4);
            if (op == 0x2f) (void)_mm_comieq_ss(a, b); else (void)_mm_ucomieq_ss(a, b);
            unord = fa != fa || fb != fb;
            lt = fa < fb;
            eq = fa == fb;
        } else {
            __m128d a = xpd(&d), b = xpd(&s);
            double fa, fb;
            memcpy(&fa, &d, 8);
            memcpy(&fb, &s, 8);
            if (op == 0x2f) (void)_mm_comieq_sd(a, b); else (void)_mm_ucomieq_sd(a, b);
            unord = fa != fa || fb != fb;
            lt = fa < fb;
            eq = fa == fb;
        }
        eflags_set = unord ? (F_ZF | F_PF | F_CF) : lt ? F_CF : eq ? F_ZF : 0;
        break;
    }
    }
    c->mxcsr |= _mm_getcsr() & 0x3f;
    _mm_setcsr(host);
    if (write)
        memcpy(dst, &r, 16);
    if (to_gpr)
        c->r[i->reg] = gpr;
    if (set_eflags_cmp) {
        c->cc_op = CC_EAGER;
        c->cc_res = eflags_set;
    }
    return 1;
}

/* SSE3. Returns 1 when the instruction was one. The arithmetic runs as the
 * instruction itself (operand order decides which NaN wins). */
static int sse3(CPU *c, Insn *i)
{
    int op = i->op & 0x1ff, pfx = i->pfx;
    uint8_t *dst = c->xmm[i->reg];
    X s, d, r;
    switch (op) {
    case 0x112: case 0x116:
        if (pfx == 2) {                                   /* movsldup / movshdup */
            src128(c, i, &s, 1);
            int hi = op == 0x116;
            r.d[0] = r.d[1] = s.d[hi];
            r.d[2] = r.d[3] = s.d[2 + hi];
            memcpy(dst, &r, 16);
            return 1;
        }
        if (pfx == 3 && op == 0x112) {                    /* movddup */
            uint64_t v = i->mod == 3 ? ((X *)c->xmm[i->rm])->q[0] : ld(c, ea_lin(c, i), 8);
            r.q[0] = r.q[1] = v;
            memcpy(dst, &r, 16);
            return 1;
        }
        return 0;
    case 0x1f0:                                           /* lddqu */
        if (pfx != 3 || i->mod == 3)
            RAISE(c, EXC_UD);
        src128(c, i, &s, 0);
        memcpy(dst, &s, 16);
        return 1;
    case 0x1d0: case 0x17c: case 0x17d:
        if (pfx != 1 && pfx != 3)
            RAISE(c, EXC_UD);
        break;
    default:
        return 0;
    }
    src128(c, i, &s, 1);
    memcpy(&d, dst, 16);
    unsigned host = _mm_getcsr();
    _mm_setcsr((c->mxcsr & ~0x3fu) | 0x1f80u);   /* guest rounding/FTZ/DAZ, all exceptions masked */
    if (pfx == 1) {
        __m128d a = xpd(&d), b = xpd(&s), v;
        v = op == 0x1d0 ? FP_ASM("addsubpd", __m128d, a, b)
          : op == 0x17c ? FP_ASM("haddpd", __m128d, a, b) : FP_ASM("hsubpd", __m128d, a, b);
        memcpy(&r, &v, 16);
    } else {
        __m128 a = xps(&d), b = xps(&s), v;
        v = op == 0x1d0 ? FP_ASM("addsubps", __m128, a, b)
          : op == 0x17c ? FP_ASM("haddps", __m128, a, b) : FP_ASM("hsubps", __m128, a, b);
        memcpy(&r, &v, 16);
    }
    c->mxcsr |= _mm_getcsr() & 0x3f;
    _mm_setcsr(host);
    memcpy(dst, &r, 16);
    return 1;
}

void sse_exec(CPU *c, Insn *i)
{
    int op = i->op & 0xff;
    int pfx = i->pfx;   /* 0 none, 1 66, 2 F3, 3 F2 */
    X s, d;
    uint8_t *dst = c->xmm[i->reg];
    if (i->op >= 0x200) {   /* 0F38 / 0F3A: SSSE3, SSE4.1, SSE4.2 */
        if (sse42_op(i->op)) {
            sse42_exec(c, i, i->op);
            return;
        }
        if (sse41_op(i->op)) {
            sse41_exec(c, i, i->op);
            return;
        }
        if (!ssse3_op(i->op))
            RAISE(c, EXC_UD);
        ssse3_exec(c, i, i->op, pfx);
        return;
    }
    if (pfx == 0 && mmx_op(op)) {
        mmx_exec(c, i, op);
        return;
    }
    if ((op == 0x2a || op == 0x2c || op == 0x2d) && pfx <= 1) {
        mmx_cvt_exec(c, i);
        return;
    }
    if (op == 0xc3) {   /* movnti m, r: a plain store for us */
        if (i->mod == 3 || pfx)
            RAISE(c, EXC_UD);
        unsigned sz = i->rexw ? 8 : 4;
        st(c, ea_lin(c, i), sz, c->r[i->reg]);
        return;
    }
    sse_check(c);
    if (sse_fp(c, i) || sse3(c, i))
        return;
    switch (op) {
    case 0x10: case 0x11: {   /* movups/movupd/movss/movsd */
        if (pfx == 2 || pfx == 3) {
            unsigned n = pfx == 2 ? 4 : 8;
            if (op == 0x10) {
                if (i->mod == 3) {
                    memcpy(dst, c->xmm[i->rm], n);
                } else {
                    uint64_t v = ld(c, ea_lin(c, i), n);
                    memset(dst, 0, 16);
                    memcpy(dst, &v, n);
                }
            } else {
                if (i->mod == 3) {
                    memcpy(c->xmm[i->rm], dst, n);
                } else {
                    uint64_t v = 0;
                    memcpy(&v, dst, n);
                    st(c, ea_lin(c, i), n, v);
                }
            }
            return;
        }
        if (op == 0x10) {
            src128(c, i, &s, 0);
            memcpy(dst, &s, 16);
        } else if (i->mod == 3) {
            memcpy(c->xmm[i->rm], dst, 16);
        } else {
            memcpy(&s, dst, 16);
            dst128_mem(c, i, &s, 0);
        }
        return;
    }
    case 0x12: case 0x13: case 0x16: case 0x17: {   /* movlps/movlpd/movhlps, movhps/movhpd/movlhps */
        if (pfx >= 2)
            RAISE(c, EXC_UD);   /* movsldup/movddup/movshdup: SSE3 */
        int high = op >= 0x16;
        if (op == 0x12 || op == 0x16) {
            uint64_t v;
            if (i->mod == 3) {
                if (pfx == 1)
                    RAISE(c, EXC_UD);
                /* movlhps takes the source's low half, movhlps its high half */
                memcpy(&v, c->xmm[i->rm] + (high ? 0 : 8), 8);
            } else {
                v = ld(c, ea_lin(c, i), 8);
            }
            memcpy(dst + (high ? 8 : 0), &v, 8);
        } else {
            if (i->mod == 3)
                RAISE(c, EXC_UD);
            uint64_t v;
            memcpy(&v, dst + (high ? 8 : 0), 8);
            st(c, ea_lin(c, i), 8, v);
        }
        return;
    }
    case 0x14: case 0x15: {   /* unpcklps/pd, unpckhps/pd */
        src128(c, i, &s, 1);
        memcpy(&d, dst, 16);
        X r;
        if (pfx == 1) {
            r.q[0] = op == 0x14 ? d.q[0] : d.q[1];
            r.q[1] = op == 0x14 ? s.q[0] : s.q[1];
        } else {
            int h = op == 0x15 ? 2 : 0;
            r.d[0] = d.d[h]; r.d[1] = s.d[h]; r.d[2] = d.d[h + 1]; r.d[3] = s.d[h + 1];
        }
        memcpy(dst, &r, 16);
        return;
    }
    case 0x28: case 0x29:   /* movaps/movapd */
        if (pfx >= 2)
            RAISE(c, EXC_UD);
        if (op == 0x28) {
            src128(c, i, &s, 1);
            memcpy(dst, &s, 16);
        } else if (i->mod == 3) {
            memcpy(c->xmm[i->rm], dst, 16);
        } else {
            memcpy(&s, dst, 16);
            dst128_mem(c, i, &s, 1);
        }
        return;
    case 0x2b: case 0xe7:   /* movntps/movntpd, movntdq */
        if (i->mod == 3 || (op == 0xe7 && pfx != 1))
            RAISE(c, EXC_UD);
        memcpy(&s, dst, 16);
        dst128_mem(c, i, &s, 1);
        return;
    case 0x50: {   /* movmskps/pd */
        if (i->mod != 3 || pfx >= 2)
            RAISE(c, EXC_UD);
        memcpy(&s, c->xmm[i->rm], 16);
        uint64_t m = pfx == 1 ? ((s.q[0] >> 63) | ((s.q[1] >> 63) << 1))
                              : ((s.d[0] >> 31) | ((s.d[1] >> 31) << 1) | ((s.d[2] >> 31) << 2) | ((s.d[3] >> 31) << 3));
        c->r[i->reg] = m;
        return;
    }
    case 0x54: case 0x55: case 0x56: case 0x57:   /* andps andnps orps xorps (and pd) */
    case 0xdb: case 0xdf: case 0xeb: case 0xef: {   /* pand pandn por pxor */
        if (pfx >= 2 || (op >= 0xdb && pfx != 1))
            RAISE(c, EXC_UD);
        src128(c, i, &s, 1);
        memcpy(&d, dst, 16);
        for (int k = 0; k < 2; k++) {
            switch (op) {
            case 0x54: case 0xdb: d.q[k] &= s.q[k]; break;
            case 0x55: case 0xdf: d.q[k] = ~d.q[k] & s.q[k]; break;
            case 0x56: case 0xeb: d.q[k] |= s.q[k]; break;
            default: d.q[k] ^= s.q[k]; break;
            }
        }
        memcpy(dst, &d, 16);
        return;
    }
    case 0x6e: {   /* movd/movq xmm, r/m */
        if (pfx != 1)
            RAISE(c, EXC_UD);
        unsigned sz = i->rexw ? 8 : 4;
        uint64_t v = gpr_rm(c, i, sz);
        memset(dst, 0, 16);
        memcpy(dst, &v, sz);
        return;
    }
    case 0x7e: {
        if (pfx == 2) {   /* movq xmm, xmm/m64 */
            uint64_t v;
            if (i->mod == 3)
                memcpy(&v, c->xmm[i->rm], 8);
            else
                v = ld(c, ea_lin(c, i), 8);
            memset(dst, 0, 16);
            memcpy(dst, &v, 8);
            return;
        }
        if (pfx != 1)
            RAISE(c, EXC_UD);
        unsigned sz = i->rexw ? 8 : 4;
        uint64_t v = 0;
        memcpy(&v, dst, sz);
        if (i->mod == 3)
            c->r[i->rm] = v;   /* 32-bit form zero-extends */
        else
            st(c, ea_lin(c, i), sz, v);
        return;
    }
    case 0xd6: {   /* movq xmm/m64, xmm */
        if (pfx != 1)
            RAISE(c, EXC_UD);
        uint64_t v;
        memcpy(&v, dst, 8);
        if (i->mod == 3) {
            memset(c->xmm[i->rm], 0, 16);
            memcpy(c->xmm[i->rm], &v, 8);
        } else {
            st(c, ea_lin(c, i), 8, v);
        }
        return;
    }
    case 0x6f: case 0x7f:   /* movdqa / movdqu */
        if (pfx != 1 && pfx != 2)
            RAISE(c, EXC_UD);   /* MMX forms not implemented */
        if (op == 0x6f) {
            src128(c, i, &s, pfx == 1);
            memcpy(dst, &s, 16);
        } else if (i->mod == 3) {
            memcpy(c->xmm[i->rm], dst, 16);
        } else {
            memcpy(&s, dst, 16);
            dst128_mem(c, i, &s, pfx == 1);
        }
        return;
    case 0x70: {   /* pshufd / pshufhw / pshuflw */
        if (pfx == 0)
            RAISE(c, EXC_UD);
        /* all three are "Type 4" (SDM Vol. 2, Table 2-21): a misaligned m128 is #GP,
         * pshufhw and pshuflw too (the host CPU faults; found by the oracle) */
        src128(c, i, &s, 1);
        unsigned imm = i->imm & 0xff;
        X r;
        if (pfx == 1) {
            for (int k = 0; k < 4; k++)
                r.d[k] = s.d[(imm >> (2 * k)) & 3];
        } else if (pfx == 2) {
            r.q[0] = s.q[0];
            for (int k = 0; k < 4; k++)
                r.w[4 + k] = s.w[4 + ((imm >> (2 * k)) & 3)];
        } else {
            r.q[1] = s.q[1];
            for (int k = 0; k < 4; k++)
                r.w[k] = s.w[(imm >> (2 * k)) & 3];
        }
        memcpy(dst, &r, 16);
        return;
    }
    case 0x71: case 0x72: case 0x73: {   /* shifts by immediate */
        if (pfx != 1 || i->mod != 3)
            RAISE(c, EXC_UD);
        uint8_t *x = c->xmm[i->rm];
        memcpy(&d, x, 16);
        unsigned n = i->imm & 0xff;
        int kind = i->reg & 7;
        if (op == 0x71) {
            for (int k = 0; k < 8; k++) {
                if (kind == 2) d.w[k] = n > 15 ? 0 : d.w[k] >> n;
                else if (kind == 4) d.sw[k] = d.sw[k] >> (n > 15 ? 15 : n);
                else if (kind == 6) d.w[k] = n > 15 ? 0 : (uint16_t)(d.w[k] << n);
                else RAISE(c, EXC_UD);
            }
        } else if (op == 0x72) {
            for (int k = 0; k < 4; k++) {
                if (kind == 2) d.d[k] = n > 31 ? 0 : d.d[k] >> n;
                else if (kind == 4) d.sd[k] = d.sd[k] >> (n > 31 ? 31 : n);
                else if (kind == 6) d.d[k] = n > 31 ? 0 : d.d[k] << n;
                else RAISE(c, EXC_UD);
            }
        } else {
            if (kind == 2 || kind == 6) {
                for (int k = 0; k < 2; k++)
                    d.q[k] = n > 63 ? 0 : (kind == 2 ? d.q[k] >> n : d.q[k] << n);
            } else if (kind == 3 || kind == 7) {   /* psrldq / pslldq: bytes */
                X r;
                memset(&r, 0, 16);
                if (n > 16) n = 16;
                for (int k = 0; k < 16; k++) {
                    int from = kind == 3 ? k + (int)n : k - (int)n;
                    if (from >= 0 && from < 16)
                        r.b[k] = d.b[from];
                }
                d = r;
            } else {
                RAISE(c, EXC_UD);
            }
        }
        memcpy(x, &d, 16);
        return;
    }
    case 0xc6: {   /* shufps / shufpd */
        if (pfx >= 2)
            RAISE(c, EXC_UD);
        src128(c, i, &s, 1);
        memcpy(&d, dst, 16);
        unsigned imm = i->imm & 0xff;
        X r;
        if (pfx == 1) {
            r.q[0] = d.q[imm & 1];
            r.q[1] = s.q[(imm >> 1) & 1];
        } else {
            r.d[0] = d.d[imm & 3];
            r.d[1] = d.d[(imm >> 2) & 3];
            r.d[2] = s.d[(imm >> 4) & 3];
            r.d[3] = s.d[(imm >> 6) & 3];
        }
        memcpy(dst, &r, 16);
        return;
    }
    case 0xc4: {   /* pinsrw xmm, r32/m16, imm8 */
        if (pfx != 1)
            RAISE(c, EXC_UD);
        uint16_t v = (uint16_t)gpr_rm(c, i, i->mod == 3 ? 4 : 2);
        memcpy(dst + 2 * (i->imm & 7), &v, 2);
        return;
    }
    case 0xc5: {   /* pextrw r32, xmm, imm8 */
        if (pfx != 1 || i->mod != 3)
            RAISE(c, EXC_UD);
        uint16_t v;
        memcpy(&v, c->xmm[i->rm] + 2 * (i->imm & 7), 2);
        c->r[i->reg] = v;
        return;
    }
    case 0xd7: {   /* pmovmskb r, xmm */
        if (pfx != 1 || i->mod != 3)
            RAISE(c, EXC_UD);
        memcpy(&s, c->xmm[i->rm], 16);
        uint32_t m = 0;
        for (int k = 0; k < 16; k++)
            m |= (uint32_t)(s.b[k] >> 7) << k;
        c->r[i->reg] = m;
        return;
    }
    }
    /* remaining: packed integer arithmetic, 66-prefixed only */
    if (pfx != 1)
        RAISE(c, EXC_UD);
    src128(c, i, &s, 1);
    memcpy(&d, dst, 16);
    X r;
    if (!packed_int(op, &d, &s, &r))
        RAISE(c, EXC_UD);
    memcpy(dst, &r, 16);
}
