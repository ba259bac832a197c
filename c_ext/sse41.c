/* SSE4.1 (66 0F 38 10-41, 66 0F 3A 08-22/40-42) and SSE4.2's pcmpgtq (66 0F 38 37).
 * Integer work is plain C over the X union; the floating point (round*, dpps, dppd)
 * runs each scalar step on the host's SSE unit under the guest's MXCSR, as sse.c's
 * other floating point does, so rounding, NaNs and status flags are the hardware's. */
#include "simd.h"

#include <fenv.h>
#include <math.h>
#include <smmintrin.h>

/* Scalar steps whose operand order the compiler must keep: with two NaNs the SSE
 * unit returns its first source, and GCC treats an intrinsic's add or multiply as
 * commutative and may swap them. */
static inline __m128 addss_ordered(__m128 a, __m128 b) { __asm__("addss %1, %0" : "+x"(a) : "x"(b)); return a; }
static inline __m128 mulss_ordered(__m128 a, __m128 b) { __asm__("mulss %1, %0" : "+x"(a) : "x"(b)); return a; }
static inline __m128d addsd_ordered(__m128d a, __m128d b) { __asm__("addsd %1, %0" : "+x"(a) : "x"(b)); return a; }
static inline __m128d mulsd_ordered(__m128d a, __m128d b) { __asm__("mulsd %1, %0" : "+x"(a) : "x"(b)); return a; }

int sse41_op(int op)
{
    switch (op) {
    case 0x210: case 0x214: case 0x215: case 0x217:
    case 0x220: case 0x221: case 0x222: case 0x223: case 0x224: case 0x225:
    case 0x228: case 0x229: case 0x22a: case 0x22b:
    case 0x230: case 0x231: case 0x232: case 0x233: case 0x234: case 0x235:
    case 0x237: case 0x238: case 0x239: case 0x23a: case 0x23b: case 0x23c: case 0x23d: case 0x23e: case 0x23f:
    case 0x240: case 0x241:
    case 0x308: case 0x309: case 0x30a: case 0x30b: case 0x30c: case 0x30d: case 0x30e:
    case 0x314: case 0x315: case 0x316: case 0x317: case 0x320: case 0x321: case 0x322:
    case 0x340: case 0x341: case 0x342:
        return 1;
    }
    return 0;
}

/* a partial source (pmovsx/pmovzx, roundss/sd, insertps): n bytes of memory, or the register */
static void src_part(CPU *c, Insn *i, X *x, unsigned n)
{
    if (i->mod == 3) {
        memcpy(x, c->xmm[i->rm], 16);
        return;
    }
    memset(x, 0, 16);
    uint64_t v = ld(c, ea_lin(c, i), n);
    memcpy(x, &v, n);
}

/* round one value with rounding control rc (0 nearest-even, 1 down, 2 up, 3 toward
 * zero); the host MXCSR already holds the guest's DAZ/FTZ. rintf/rint raise inexact
 * like ROUNDPS without imm bit 3; nearbyint does not. */
static float round_f(float x, int rc, int quiet)
{
    static const int modes[4] = { FE_TONEAREST, FE_DOWNWARD, FE_UPWARD, FE_TOWARDZERO };
    int saved = fegetround();
    fesetround(modes[rc & 3]);
    volatile float r = quiet ? nearbyintf(x) : rintf(x);
    fesetround(saved);
    return r;
}

static double round_d(double x, int rc, int quiet)
{
    static const int modes[4] = { FE_TONEAREST, FE_DOWNWARD, FE_UPWARD, FE_TOWARDZERO };
    int saved = fegetround();
    fesetround(modes[rc & 3]);
    volatile double r = quiet ? nearbyint(x) : rint(x);
    fesetround(saved);
    return r;
}

/* ROUNDPS/PD/SS/SD on the host's own SSE4.1 unit when it has one: the immediate must
 * be a constant, hence the switch over its 16 meaningful values */
#define ROUND_CASES(expr) \
    switch (imm & 15) { \
    case 0: { const int k = 0; expr; break; } case 1: { const int k = 1; expr; break; } \
    case 2: { const int k = 2; expr; break; } case 3: { const int k = 3; expr; break; } \
    case 4: { const int k = 4; expr; break; } case 5: { const int k = 5; expr; break; } \
    case 6: { const int k = 6; expr; break; } case 7: { const int k = 7; expr; break; } \
    case 8: { const int k = 8; expr; break; } case 9: { const int k = 9; expr; break; } \
    case 10: { const int k = 10; expr; break; } case 11: { const int k = 11; expr; break; } \
    case 12: { const int k = 12; expr; break; } case 13: { const int k = 13; expr; break; } \
    case 14: { const int k = 14; expr; break; } default: { const int k = 15; expr; break; } \
    }

__attribute__((target("sse4.1"))) static void round_host(int op, unsigned imm, const X *d, const X *s, X *r)
{
    __m128 dps, sps, rps;
    __m128d dpd, spd, rpd;
    memcpy(&dps, d, 16); memcpy(&sps, s, 16);
    memcpy(&dpd, d, 16); memcpy(&spd, s, 16);
    switch (op) {
    case 0x308: ROUND_CASES(rps = _mm_round_ps(sps, k)); memcpy(r, &rps, 16); break;
    case 0x309: ROUND_CASES(rpd = _mm_round_pd(spd, k)); memcpy(r, &rpd, 16); break;
    case 0x30a: ROUND_CASES(rps = _mm_round_ss(dps, sps, k)); memcpy(r, &rps, 16); break;
    default: ROUND_CASES(rpd = _mm_round_sd(dpd, spd, k)); memcpy(r, &rpd, 16); break;
    }
}

/* dpps and dppd on the host's own SSE4.1 unit, as the other floating point: which
 * NaN a dot product of two NaN products returns is the order of its adds, and our
 * hosts' CPUs have not agreed on it (some add each pair's high element first, others
 * the low one, as the SDM's DP_primitive writes it), so no fixed order in C matches
 * them all. The immediate must be a constant: a case per value (dppd reads only bits
 * 5:4 and 1:0). */
#define DP_CASE(n, expr) case (n): { expr(n); break; }
#define DP_CASES4(n, expr) DP_CASE(n, expr) DP_CASE((n) + 1, expr) DP_CASE((n) + 2, expr) DP_CASE((n) + 3, expr)
#define DP_CASES16(n, expr) DP_CASES4(n, expr) DP_CASES4((n) + 4, expr) DP_CASES4((n) + 8, expr) DP_CASES4((n) + 12, expr)
#define DP_CASES64(n, expr) DP_CASES16(n, expr) DP_CASES16((n) + 16, expr) DP_CASES16((n) + 32, expr) \
    DP_CASES16((n) + 48, expr)

__attribute__((target("sse4.1"))) static void dp_host(int op, unsigned imm, const X *d, const X *s, X *r)
{
    if (op == 0x340) {
        __m128 a, b, v;
        memcpy(&a, d, 16); memcpy(&b, s, 16);
#define DPPS(n) v = _mm_dp_ps(a, b, (n))
        switch (imm & 0xff) { DP_CASES64(0, DPPS) DP_CASES64(64, DPPS) DP_CASES64(128, DPPS) DP_CASES64(192, DPPS)
        default: v = a; break; }
#undef DPPS
        memcpy(r, &v, 16);
    } else {
        __m128d a, b, v;
        memcpy(&a, d, 16); memcpy(&b, s, 16);
#define DPPD(n) v = _mm_dp_pd(a, b, (n))
        switch (imm & 0x33) { DP_CASES64(0, DPPD) default: v = a; break; }
#undef DPPD
        memcpy(r, &v, 16);
    }
}

void sse41_exec(CPU *c, Insn *i, int op)
{
    if (i->pfx != 1)
        RAISE(c, EXC_UD);
    sse_check(c);
    uint8_t *dst = c->xmm[i->reg];
    unsigned imm = (unsigned)(i->imm & 0xff);
    X d, s, r;
    memcpy(&d, dst, 16);
    memset(&r, 0, sizeof r);

    /* ---- moves between XMM and general registers / memory ---- */
    switch (op) {
    case 0x314: case 0x315: case 0x316: case 0x317: {   /* pextrb/w/d/q, extractps: r/m <- xmm(reg) */
        unsigned sz = op == 0x314 ? 1 : op == 0x315 ? 2 : (op == 0x316 && i->rexw) ? 8 : 4;
        uint64_t v = 0;
        unsigned idx = op == 0x314 ? imm & 15 : op == 0x315 ? imm & 7 : sz == 8 ? imm & 1 : imm & 3;
        memcpy(&v, dst + idx * sz, sz);
        if (i->mod == 3)
            c->r[i->rm] = v;   /* zero-extended into the whole register */
        else
            st(c, ea_lin(c, i), sz, v);
        return;
    }
    case 0x320: case 0x322: {   /* pinsrb, pinsrd/q: xmm(reg) <- r/m */
        unsigned sz = op == 0x320 ? 1 : i->rexw ? 8 : 4;
        uint64_t v = i->mod == 3 ? c->r[i->rm] : ld(c, ea_lin(c, i), sz);
        unsigned idx = sz == 1 ? imm & 15 : sz == 4 ? imm & 3 : imm & 1;
        memcpy(dst + idx * sz, &v, sz);
        return;
    }
    case 0x321: {   /* insertps */
        uint32_t v;
        if (i->mod == 3)
            memcpy(&v, c->xmm[i->rm] + 4 * ((imm >> 6) & 3), 4);
        else
            v = (uint32_t)ld(c, ea_lin(c, i), 4);
        d.d[(imm >> 4) & 3] = v;
        for (int k = 0; k < 4; k++)
            if (imm & (1u << k))
                d.d[k] = 0;
        memcpy(dst, &d, 16);
        return;
    }
    case 0x22a:   /* movntdqa: an aligned load (no streaming distinction here) */
        if (i->mod == 3)
            RAISE(c, EXC_UD);
        src128(c, i, &s, 1);
        memcpy(dst, &s, 16);
        return;
    case 0x220: case 0x221: case 0x222: case 0x223: case 0x224: case 0x225:
    case 0x230: case 0x231: case 0x232: case 0x233: case 0x234: case 0x235: {
        /* pmovsx / pmovzx: bw bd bq wd wq dq; the source is as wide as the results need */
        static const unsigned from[6] = { 1, 1, 1, 2, 2, 4 }, to[6] = { 2, 4, 8, 4, 8, 8 };
        int k6 = (op & 0xf) - 0;
        unsigned fs = from[k6], ts = to[k6], n = 16 / ts;
        src_part(c, i, &s, fs * n);
        int sign = op < 0x230;
        for (unsigned k = 0; k < n; k++) {
            int64_t v;
            if (fs == 1) v = sign ? (int64_t)s.sb[k] : (int64_t)s.b[k];
            else if (fs == 2) v = sign ? (int64_t)s.sw[k] : (int64_t)s.w[k];
            else v = sign ? (int64_t)s.sd[k] : (int64_t)s.d[k];
            memcpy(r.b + k * ts, &v, ts);
        }
        memcpy(dst, &r, 16);
        return;
    }
    }

    /* ---- floating point: rounding and dot products ---- */
    if (op == 0x30a || op == 0x30b) {   /* roundss, roundsd: the low element, the rest kept */
        src_part(c, i, &s, op == 0x30a ? 4 : 8);
    } else {
        src128(c, i, &s, 1);
    }
    if ((op >= 0x308 && op <= 0x30b) || op == 0x340 || op == 0x341) {
        unsigned host = _mm_getcsr();
        _mm_setcsr((c->mxcsr & ~0x3fu) | 0x1f80u);   /* guest RC/FTZ/DAZ, all exceptions masked */
        int rc = (imm & 4) ? (int)((c->mxcsr >> 13) & 3) : (int)(imm & 3);
        int quiet = (imm >> 3) & 1;
        r = d;
        int host_round = __builtin_cpu_supports("sse4.1");
        if (op <= 0x30b && host_round) {
            round_host(op, imm, &d, &s, &r);
            op = 0;   /* done */
        } else if (op >= 0x340 && host_round) {
            dp_host(op, imm, &d, &s, &r);
            op = 0;   /* done */
        }
        switch (op) {
        case 0x308: for (int k = 0; k < 4; k++) { float f; memcpy(&f, &s.d[k], 4); f = round_f(f, rc, quiet); memcpy(&r.d[k], &f, 4); } break;
        case 0x309: for (int k = 0; k < 2; k++) { double f; memcpy(&f, &s.q[k], 8); f = round_d(f, rc, quiet); memcpy(&r.q[k], &f, 8); } break;
        case 0x30a: { float f; memcpy(&f, &s.d[0], 4); f = round_f(f, rc, quiet); memcpy(&r.d[0], &f, 4); break; }
        case 0x30b: { double f; memcpy(&f, &s.q[0], 8); f = round_d(f, rc, quiet); memcpy(&r.q[0], &f, 8); break; }
        case 0x340: {   /* dpps: products by imm[7:4], summed pairwise, to the slots of imm[3:0] */
            __m128 t[4];
            for (int k = 0; k < 4; k++) {
                float a, b;
                memcpy(&a, &d.d[k], 4);
                memcpy(&b, &s.d[k], 4);
                t[k] = (imm >> (4 + k)) & 1 ? mulss_ordered(_mm_set_ss(a), _mm_set_ss(b)) : _mm_set_ss(0.0f);
            }
            /* Without SSE4.1 on the host (dp_host above otherwise): the SDM's order
             * (DP_primitive: elements 0+1, 2+3, then those sums), which decides the
             * NaN a dot product of two NaN products returns. */
            __m128 sum = addss_ordered(addss_ordered(t[0], t[1]), addss_ordered(t[2], t[3]));
            float v = _mm_cvtss_f32(sum);
            for (int k = 0; k < 4; k++) {
                float o = (imm >> k) & 1 ? v : 0.0f;
                memcpy(&r.d[k], &o, 4);
            }
            break;
        }
        case 0x341: {   /* dppd */
            __m128d t[2];
            for (int k = 0; k < 2; k++) {
                double a, b;
                memcpy(&a, &d.q[k], 8);
                memcpy(&b, &s.q[k], 8);
                t[k] = (imm >> (4 + k)) & 1 ? mulsd_ordered(_mm_set_sd(a), _mm_set_sd(b)) : _mm_set_sd(0.0);
            }
            double v = _mm_cvtsd_f64(addsd_ordered(t[0], t[1]));
            for (int k = 0; k < 2; k++) {
                double o = (imm >> k) & 1 ? v : 0.0;
                memcpy(&r.q[k], &o, 8);
            }
            break;
        }
        }
        c->mxcsr |= _mm_getcsr() & 0x3f;
        _mm_setcsr(host);
        memcpy(dst, &r, 16);
        return;
    }

    /* ---- integer, full 128-bit source ---- */
    X m;
    memcpy(&m, c->xmm[0], 16);   /* the implicit mask of the blendv forms */
    switch (op) {
    case 0x210: for (int k = 0; k < 16; k++) r.b[k] = (m.b[k] & 0x80) ? s.b[k] : d.b[k]; break;
    case 0x214: for (int k = 0; k < 4; k++) r.d[k] = (m.d[k] >> 31) ? s.d[k] : d.d[k]; break;
    case 0x215: for (int k = 0; k < 2; k++) r.q[k] = (m.q[k] >> 63) ? s.q[k] : d.q[k]; break;
    case 0x30c: for (int k = 0; k < 4; k++) r.d[k] = (imm >> k) & 1 ? s.d[k] : d.d[k]; break;
    case 0x30d: for (int k = 0; k < 2; k++) r.q[k] = (imm >> k) & 1 ? s.q[k] : d.q[k]; break;
    case 0x30e: for (int k = 0; k < 8; k++) r.w[k] = (imm >> k) & 1 ? s.w[k] : d.w[k]; break;
    case 0x217: {   /* ptest: ZF = !(d & s), CF = !(~d & s), the other arithmetic flags clear */
        int zf = !((d.q[0] & s.q[0]) | (d.q[1] & s.q[1]));
        int cf = !((~d.q[0] & s.q[0]) | (~d.q[1] & s.q[1]));
        c->cc_op = CC_EAGER;
        c->cc_res = (zf ? F_ZF : 0) | (cf ? F_CF : 0);
        return;
    }
    case 0x228: for (int k = 0; k < 2; k++) r.sq[k] = (int64_t)d.sd[2 * k] * s.sd[2 * k]; break;
    case 0x229: for (int k = 0; k < 2; k++) r.q[k] = d.q[k] == s.q[k] ? ~0ull : 0; break;
    case 0x237: for (int k = 0; k < 2; k++) r.q[k] = d.sq[k] > s.sq[k] ? ~0ull : 0; break;
    case 0x22b:   /* packusdw */
        for (int k = 0; k < 4; k++) {
            int64_t v = d.sd[k]; r.w[k] = v > 65535 ? 65535 : v < 0 ? 0 : (uint16_t)v;
            v = s.sd[k]; r.w[4 + k] = v > 65535 ? 65535 : v < 0 ? 0 : (uint16_t)v;
        }
        break;
    case 0x238: for (int k = 0; k < 16; k++) r.sb[k] = d.sb[k] < s.sb[k] ? d.sb[k] : s.sb[k]; break;
    case 0x239: for (int k = 0; k < 4; k++) r.sd[k] = d.sd[k] < s.sd[k] ? d.sd[k] : s.sd[k]; break;
    case 0x23a: for (int k = 0; k < 8; k++) r.w[k] = d.w[k] < s.w[k] ? d.w[k] : s.w[k]; break;
    case 0x23b: for (int k = 0; k < 4; k++) r.d[k] = d.d[k] < s.d[k] ? d.d[k] : s.d[k]; break;
    case 0x23c: for (int k = 0; k < 16; k++) r.sb[k] = d.sb[k] > s.sb[k] ? d.sb[k] : s.sb[k]; break;
    case 0x23d: for (int k = 0; k < 4; k++) r.sd[k] = d.sd[k] > s.sd[k] ? d.sd[k] : s.sd[k]; break;
    case 0x23e: for (int k = 0; k < 8; k++) r.w[k] = d.w[k] > s.w[k] ? d.w[k] : s.w[k]; break;
    case 0x23f: for (int k = 0; k < 4; k++) r.d[k] = d.d[k] > s.d[k] ? d.d[k] : s.d[k]; break;
    case 0x240: for (int k = 0; k < 4; k++) r.d[k] = (uint32_t)((int64_t)d.sd[k] * s.sd[k]); break;
    case 0x241: {   /* phminposuw: the smallest word of s and its (lowest) index */
        unsigned best = 0;
        for (unsigned k = 1; k < 8; k++)
            if (s.w[k] < s.w[best])
                best = k;
        r.w[0] = s.w[best];
        r.w[1] = (uint16_t)best;
        break;
    }
    case 0x342: {   /* mpsadbw: 8 sums of 4 absolute differences, sliding over d */
        unsigned db = ((imm >> 2) & 1) * 4, sb = (imm & 3) * 4;
        for (int k = 0; k < 8; k++) {
            int sum = 0;
            for (int j = 0; j < 4; j++) {
                int v = d.b[db + k + j] - s.b[sb + j];
                sum += v < 0 ? -v : v;
            }
            r.w[k] = (uint16_t)sum;
        }
        break;
    }
    default:
        RAISE(c, EXC_UD);
    }
    memcpy(dst, &r, 16);
}
