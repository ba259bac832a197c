/* What the SIMD files share (sse.c, mmx.c, ssse3.c, sse41.c): the 16-byte register
 * image, the SSE fault checks and operand access, the packed-integer core of the
 * XMM and MMX forms, and MMX register access (MM0-MM7 are the x87 registers'
 * mantissas; mmx.c explains the x87 side). Inline only. */
#ifndef KVMPY_SIMD_H
#define KVMPY_SIMD_H

#include "tcg.h"
#include "access.h"

#define MMX_FSW_TOP (7u << 11)

typedef union {
    uint8_t b[16];
    uint16_t w[8];
    uint32_t d[4];
    uint64_t q[2];
    int8_t sb[16];
    int16_t sw[8];
    int32_t sd[4];
    int64_t sq[2];
} X;


static inline void sse_check(CPU *c)
{
    if ((c->cr0 & 4) || !(c->cr4 & CR4_OSFXSR))   /* CR0.EM or no OS support */
        RAISE(c, EXC_UD);
    if (c->cr0 & CR0_TS)
        RAISE(c, EXC_NM);
}

/* 16-byte source operand; `aligned` demands 16-byte alignment (#GP) */
static inline void src128(CPU *c, Insn *i, X *x, int aligned)
{
    if (i->mod == 3) {
        memcpy(x, c->xmm[i->rm], 16);
        return;
    }
    uint64_t lin = ea_lin(c, i);
    if (aligned && (lin & 15))
        RAISE_ERR(c, EXC_GP, 0);
    x->q[0] = ld(c, lin, 8);
    x->q[1] = ld(c, lin + 8, 8);
}

static inline void dst128_mem(CPU *c, Insn *i, const X *x, int aligned)
{
    uint64_t lin = ea_lin(c, i);
    if (aligned && (lin & 15))
        RAISE_ERR(c, EXC_GP, 0);
    /* probe the second half first so a fault leaves memory untouched */
    ld(c, lin + 15, 1);
    st(c, lin, 8, x->q[0]);
    st(c, lin + 8, 8, x->q[1]);
}

static inline uint64_t gpr_rm(CPU *c, Insn *i, unsigned sz)
{
    if (i->mod == 3)
        return sz == 8 ? c->r[i->rm] : (uint32_t)c->r[i->rm];
    return ld(c, ea_lin(c, i), sz);
}

/* ---- packed integer arithmetic: XMM (66 0F xx) and MMX (0F xx, mmx_exec) ---- */

/* r = d op s over 16 bytes; 0 if op is none of them. The MMX forms run the same code
 * on the low halves (high halves zero) and fix up what is not lane-local. */
static inline int packed_int(int op, const X *dp, const X *sp, X *rp)
{
    const X d = *dp, s = *sp;
    X r;
    memset(&r, 0, sizeof r);
    switch (op) {
    case 0x60: for (int k = 0; k < 8; k++) { r.b[2 * k] = d.b[k]; r.b[2 * k + 1] = s.b[k]; } break;
    case 0x61: for (int k = 0; k < 4; k++) { r.w[2 * k] = d.w[k]; r.w[2 * k + 1] = s.w[k]; } break;
    case 0x62: for (int k = 0; k < 2; k++) { r.d[2 * k] = d.d[k]; r.d[2 * k + 1] = s.d[k]; } break;
    case 0x6c: r.q[0] = d.q[0]; r.q[1] = s.q[0]; break;
    case 0x68: for (int k = 0; k < 8; k++) { r.b[2 * k] = d.b[8 + k]; r.b[2 * k + 1] = s.b[8 + k]; } break;
    case 0x69: for (int k = 0; k < 4; k++) { r.w[2 * k] = d.w[4 + k]; r.w[2 * k + 1] = s.w[4 + k]; } break;
    case 0x6a: for (int k = 0; k < 2; k++) { r.d[2 * k] = d.d[2 + k]; r.d[2 * k + 1] = s.d[2 + k]; } break;
    case 0x6d: r.q[0] = d.q[1]; r.q[1] = s.q[1]; break;
    case 0x63:   /* packsswb */
        for (int k = 0; k < 8; k++) {
            int v = d.sw[k]; r.sb[k] = v > 127 ? 127 : v < -128 ? -128 : v;
            v = s.sw[k]; r.sb[8 + k] = v > 127 ? 127 : v < -128 ? -128 : v;
        }
        break;
    case 0x67:   /* packuswb */
        for (int k = 0; k < 8; k++) {
            int v = d.sw[k]; r.b[k] = v > 255 ? 255 : v < 0 ? 0 : v;
            v = s.sw[k]; r.b[8 + k] = v > 255 ? 255 : v < 0 ? 0 : v;
        }
        break;
    case 0x6b:   /* packssdw */
        for (int k = 0; k < 4; k++) {
            int64_t v = d.sd[k]; r.sw[k] = v > 32767 ? 32767 : v < -32768 ? -32768 : v;
            v = s.sd[k]; r.sw[4 + k] = v > 32767 ? 32767 : v < -32768 ? -32768 : v;
        }
        break;
    case 0x64: for (int k = 0; k < 16; k++) r.b[k] = d.sb[k] > s.sb[k] ? 0xff : 0; break;
    case 0x65: for (int k = 0; k < 8; k++) r.w[k] = d.sw[k] > s.sw[k] ? 0xffff : 0; break;
    case 0x66: for (int k = 0; k < 4; k++) r.d[k] = d.sd[k] > s.sd[k] ? ~0u : 0; break;
    case 0x74: for (int k = 0; k < 16; k++) r.b[k] = d.b[k] == s.b[k] ? 0xff : 0; break;
    case 0x75: for (int k = 0; k < 8; k++) r.w[k] = d.w[k] == s.w[k] ? 0xffff : 0; break;
    case 0x76: for (int k = 0; k < 4; k++) r.d[k] = d.d[k] == s.d[k] ? ~0u : 0; break;
    case 0xd4: for (int k = 0; k < 2; k++) r.q[k] = d.q[k] + s.q[k]; break;
    case 0xd5: for (int k = 0; k < 8; k++) r.w[k] = (uint16_t)(d.sw[k] * s.sw[k]); break;
    case 0xe5: for (int k = 0; k < 8; k++) r.w[k] = (uint16_t)((d.sw[k] * s.sw[k]) >> 16); break;
    case 0xe4: for (int k = 0; k < 8; k++) r.w[k] = (uint16_t)(((uint32_t)d.w[k] * s.w[k]) >> 16); break;
    case 0xf4: for (int k = 0; k < 2; k++) r.q[k] = (uint64_t)d.d[2 * k] * s.d[2 * k]; break;
    case 0xf5:
        for (int k = 0; k < 4; k++)
            r.sd[k] = d.sw[2 * k] * s.sw[2 * k] + d.sw[2 * k + 1] * s.sw[2 * k + 1];
        break;
    case 0xd8: for (int k = 0; k < 16; k++) r.b[k] = d.b[k] > s.b[k] ? d.b[k] - s.b[k] : 0; break;
    case 0xd9: for (int k = 0; k < 8; k++) r.w[k] = d.w[k] > s.w[k] ? d.w[k] - s.w[k] : 0; break;
    case 0xdc: for (int k = 0; k < 16; k++) { unsigned v = d.b[k] + s.b[k]; r.b[k] = v > 255 ? 255 : v; } break;
    case 0xdd: for (int k = 0; k < 8; k++) { unsigned v = d.w[k] + s.w[k]; r.w[k] = v > 65535 ? 65535 : v; } break;
    case 0xe8: for (int k = 0; k < 16; k++) { int v = d.sb[k] - s.sb[k]; r.sb[k] = v > 127 ? 127 : v < -128 ? -128 : v; } break;
    case 0xe9: for (int k = 0; k < 8; k++) { int v = d.sw[k] - s.sw[k]; r.sw[k] = v > 32767 ? 32767 : v < -32768 ? -32768 : v; } break;
    case 0xec: for (int k = 0; k < 16; k++) { int v = d.sb[k] + s.sb[k]; r.sb[k] = v > 127 ? 127 : v < -128 ? -128 : v; } break;
    case 0xed: for (int k = 0; k < 8; k++) { int v = d.sw[k] + s.sw[k]; r.sw[k] = v > 32767 ? 32767 : v < -32768 ? -32768 : v; } break;
    case 0xda: for (int k = 0; k < 16; k++) r.b[k] = d.b[k] < s.b[k] ? d.b[k] : s.b[k]; break;
    case 0xde: for (int k = 0; k < 16; k++) r.b[k] = d.b[k] > s.b[k] ? d.b[k] : s.b[k]; break;
    case 0xea: for (int k = 0; k < 8; k++) r.sw[k] = d.sw[k] < s.sw[k] ? d.sw[k] : s.sw[k]; break;
    case 0xee: for (int k = 0; k < 8; k++) r.sw[k] = d.sw[k] > s.sw[k] ? d.sw[k] : s.sw[k]; break;
    case 0xe0: for (int k = 0; k < 16; k++) r.b[k] = (d.b[k] + s.b[k] + 1) >> 1; break;
    case 0xe3: for (int k = 0; k < 8; k++) r.w[k] = (d.w[k] + s.w[k] + 1) >> 1; break;
    case 0xf6: {   /* psadbw */
        for (int h = 0; h < 2; h++) {
            uint64_t sum = 0;
            for (int k = 0; k < 8; k++) {
                int v = d.b[8 * h + k] - s.b[8 * h + k];
                sum += v < 0 ? -v : v;
            }
            r.q[h] = sum;
        }
        break;
    }
    case 0xf8: for (int k = 0; k < 16; k++) r.b[k] = d.b[k] - s.b[k]; break;
    case 0xf9: for (int k = 0; k < 8; k++) r.w[k] = d.w[k] - s.w[k]; break;
    case 0xfa: for (int k = 0; k < 4; k++) r.d[k] = d.d[k] - s.d[k]; break;
    case 0xfb: for (int k = 0; k < 2; k++) r.q[k] = d.q[k] - s.q[k]; break;
    case 0xfc: for (int k = 0; k < 16; k++) r.b[k] = d.b[k] + s.b[k]; break;
    case 0xfd: for (int k = 0; k < 8; k++) r.w[k] = d.w[k] + s.w[k]; break;
    case 0xfe: for (int k = 0; k < 4; k++) r.d[k] = d.d[k] + s.d[k]; break;
    case 0xd1: case 0xd2: case 0xd3: case 0xe1: case 0xe2: case 0xf1: case 0xf2: case 0xf3: {
        /* shifts by the low quadword of the source */
        uint64_t n = s.q[0];
        r = d;
        if (op == 0xd1 || op == 0xe1 || op == 0xf1)
            for (int k = 0; k < 8; k++)
                r.w[k] = op == 0xd1 ? (n > 15 ? 0 : d.w[k] >> n) : op == 0xf1 ? (n > 15 ? 0 : (uint16_t)(d.w[k] << n))
                                    : (uint16_t)(d.sw[k] >> (n > 15 ? 15 : n));
        else if (op == 0xd2 || op == 0xe2 || op == 0xf2)
            for (int k = 0; k < 4; k++)
                r.d[k] = op == 0xd2 ? (n > 31 ? 0 : d.d[k] >> n) : op == 0xf2 ? (n > 31 ? 0 : d.d[k] << n)
                                    : (uint32_t)(d.sd[k] >> (n > 31 ? 31 : n));
        else
            for (int k = 0; k < 2; k++)
                r.q[k] = n > 63 ? 0 : (op == 0xd3 ? d.q[k] >> n : d.q[k] << n);
        break;
    }
    default:
        return 0;
    }
    *rp = r;
    return 1;
}

/* the x87 side of any MMX instruction but EMMS: TOP = 0, all registers valid */
static inline void mmx_enter(CPU *c)
{
    c->fsw &= ~MMX_FSW_TOP;
    c->ftw = 0;
}
static inline uint64_t mm_get(CPU *c, int n)
{
    uint64_t v;
    memcpy(&v, c->fpregs[n & 7], 8);
    return v;
}
static inline void mm_set(CPU *c, int n, uint64_t v)
{
    memcpy(c->fpregs[n & 7], &v, 8);
    c->fpregs[n & 7][8] = 0xff;
    c->fpregs[n & 7][9] = 0xff;
}
/* the r/m operand: an MMX register (REX.B does not extend it) or 64 bits of memory */
static inline uint64_t mm_src(CPU *c, Insn *i)
{
    return i->mod == 3 ? mm_get(c, i->rm) : ld(c, ea_lin(c, i), 8);
}

#endif
