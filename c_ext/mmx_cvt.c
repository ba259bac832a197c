/* The SSE/SSE2 conversions with an MMX operand (0F 2A/2C/2D without a prefix or
 * with 66): cvtpi2ps, cvtpi2pd (two int32 of mm/m64 into floats/doubles), cvtps2pi,
 * cvttps2pi (two floats of xmm/m64 into mm), cvtpd2pi, cvttpd2pi (two doubles of
 * xmm/m128 into mm). Like sse.c, the arithmetic runs on the host's SSE unit with the
 * guest's rounding and FTZ/DAZ, so results, "integer indefinite" and status flags
 * are the hardware's; one lane at a time through the scalar forms, which keeps the
 * host's own MMX/x87 state out of it.
 *
 * The x87 side (SDM Vol. 2, CVTPI2PS and the others): an MMX register operand
 * makes the MMX transition (TOP 0, all tags valid) and can take a pending x87
 * exception (#MF); cvtpi2ps/cvtpi2pd from memory do neither. */
#include <emmintrin.h>
#include "simd.h"

static void guest_csr(CPU *c, unsigned *host)
{
    *host = _mm_getcsr();
    _mm_setcsr((c->mxcsr & ~0x3fu) | 0x1f80u);   /* guest rounding/FTZ/DAZ, all exceptions masked */
}

static void host_csr(CPU *c, unsigned host)
{
    c->mxcsr |= _mm_getcsr() & 0x3f;
    _mm_setcsr(host);
}

void mmx_cvt_exec(CPU *c, Insn *i)
{
    int op = i->op & 0xff, pd = i->pfx == 1;
    sse_check(c);
    if (op == 0x2a) {          /* cvtpi2ps / cvtpi2pd xmm, mm/m64 */
        uint64_t src;
        if (i->mod == 3) {
            mmx_check(c);
            src = mm_get(c, i->rm);
            mmx_enter(c);
        } else {
            src = ld(c, ea_lin(c, i), 8);
        }
        int32_t lane[2] = { (int32_t)src, (int32_t)(src >> 32) };
        X *dst = (X *)c->xmm[i->reg];
        if (pd) {              /* exact: every int32 is a double */
            double d[2] = { lane[0], lane[1] };
            memcpy(dst, d, 16);
            return;
        }
        unsigned host;
        guest_csr(c, &host);
        for (int k = 0; k < 2; k++) {
            __m128 f = _mm_cvtsi32_ss(_mm_setzero_ps(), lane[k]);
            dst->d[k] = (uint32_t)_mm_cvtsi128_si32(_mm_castps_si128(f));
        }
        host_csr(c, host);     /* the upper half of the destination stays */
        return;
    }
    /* cvt(t)ps2pi mm, xmm/m64; cvt(t)pd2pi mm, xmm/m128 (aligned) */
    mmx_check(c);
    X s;
    if (i->mod == 3)
        memcpy(&s, c->xmm[i->rm], 16);
    else if (pd)
        src128(c, i, &s, 1);
    else
        s.q[0] = ld(c, ea_lin(c, i), 8);
    int trunc = op == 0x2c;
    uint32_t out[2];
    unsigned host;
    guest_csr(c, &host);
    for (int k = 0; k < 2; k++) {
        if (pd) {
            __m128d x = _mm_castsi128_pd(_mm_set_epi64x(0, (int64_t)s.q[k]));
            out[k] = (uint32_t)(trunc ? _mm_cvttsd_si32(x) : _mm_cvtsd_si32(x));
        } else {
            __m128 x = _mm_castsi128_ps(_mm_cvtsi32_si128((int)s.d[k]));
            out[k] = (uint32_t)(trunc ? _mm_cvttss_si32(x) : _mm_cvtss_si32(x));
        }
    }
    host_csr(c, host);
    mmx_enter(c);
    mm_set(c, i->reg, out[0] | (uint64_t)out[1] << 32);
}
