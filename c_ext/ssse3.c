/* SSSE3: 0F 38 00-0B and 1C-1E, 0F 3A 0F (palignr), each in an MMX form (no prefix,
 * 8 bytes, the x87 effects of mmx.h) and an XMM form (66, 16 bytes, an m128 operand
 * must be 16-byte aligned). One lane-generic core serves both widths. */
#include "simd.h"

int ssse3_op(int op)
{
    return (op >= 0x200 && op <= 0x20b) || (op >= 0x21c && op <= 0x21e) || op == 0x30f;
}

static int16_t sat16(int v)
{
    return v > 32767 ? 32767 : v < -32768 ? -32768 : (int16_t)v;
}

/* r = d op s on n bytes (8 or 16); r is zeroed past n */
static void ssse3_core(int op, const X *d, const X *s, X *r, int n, unsigned imm)
{
    memset(r, 0, sizeof *r);
    int nw = n / 2, nd = n / 4;
    switch (op) {
    case 0x200:   /* pshufb */
        for (int k = 0; k < n; k++)
            r->b[k] = (s->b[k] & 0x80) ? 0 : d->b[s->b[k] & (n - 1)];
        break;
    case 0x201: case 0x203: case 0x205: case 0x207:   /* phaddw phaddsw phsubw phsubsw */
        for (int k = 0; k < nw; k++) {
            const X *src = k < nw / 2 ? d : s;
            int j = 2 * (k % (nw / 2));
            int v = op <= 0x203 ? src->sw[j] + src->sw[j + 1] : src->sw[j] - src->sw[j + 1];
            r->sw[k] = (op == 0x203 || op == 0x207) ? sat16(v) : (int16_t)v;
        }
        break;
    case 0x202: case 0x206:   /* phaddd phsubd */
        for (int k = 0; k < nd; k++) {
            const X *src = k < nd / 2 ? d : s;
            int j = 2 * (k % (nd / 2));
            r->d[k] = op == 0x202 ? src->d[j] + src->d[j + 1] : src->d[j] - src->d[j + 1];
        }
        break;
    case 0x204:   /* pmaddubsw: unsigned bytes of d times signed bytes of s, pairs summed */
        for (int k = 0; k < nw; k++)
            r->sw[k] = sat16(d->b[2 * k] * s->sb[2 * k] + d->b[2 * k + 1] * s->sb[2 * k + 1]);
        break;
    case 0x208:   /* psignb */
        for (int k = 0; k < n; k++)
            r->b[k] = s->sb[k] < 0 ? (uint8_t)-d->b[k] : s->sb[k] ? d->b[k] : 0;
        break;
    case 0x209:   /* psignw */
        for (int k = 0; k < nw; k++)
            r->w[k] = s->sw[k] < 0 ? (uint16_t)-d->w[k] : s->sw[k] ? d->w[k] : 0;
        break;
    case 0x20a:   /* psignd */
        for (int k = 0; k < nd; k++)
            r->d[k] = s->sd[k] < 0 ? -d->d[k] : s->sd[k] ? d->d[k] : 0;
        break;
    case 0x20b:   /* pmulhrsw */
        for (int k = 0; k < nw; k++)
            r->sw[k] = (int16_t)((((int32_t)d->sw[k] * s->sw[k] >> 14) + 1) >> 1);
        break;
    case 0x21c:
        for (int k = 0; k < n; k++)
            r->b[k] = (uint8_t)(s->sb[k] < 0 ? -s->sb[k] : s->sb[k]);
        break;
    case 0x21d:
        for (int k = 0; k < nw; k++)
            r->w[k] = (uint16_t)(s->sw[k] < 0 ? -s->sw[k] : s->sw[k]);
        break;
    case 0x21e:
        for (int k = 0; k < nd; k++)
            r->d[k] = s->sd[k] < 0 ? -(uint32_t)s->sd[k] : (uint32_t)s->sd[k];
        break;
    case 0x30f: {   /* palignr: the 2n-byte d:s shifted right by imm bytes, low n kept */
        uint8_t cat[32];
        memcpy(cat, s->b, n);
        memcpy(cat + n, d->b, n);
        for (int k = 0; k < n; k++)
            r->b[k] = imm + k < (unsigned)(2 * n) ? cat[imm + k] : 0;
        break;
    }
    }
}

void ssse3_exec(CPU *c, Insn *i, int op, int pfx)
{
    X d, s, r;
    memset(&d, 0, sizeof d);
    memset(&s, 0, sizeof s);
    unsigned imm = (unsigned)(i->imm & 0xff);
    if (pfx == 0) {
        mmx_check(c);
        s.q[0] = mm_src(c, i);
        d.q[0] = mm_get(c, i->reg);
        ssse3_core(op, &d, &s, &r, 8, imm);
        mmx_enter(c);
        mm_set(c, i->reg, r.q[0]);
        return;
    }
    if (pfx != 1)
        RAISE(c, EXC_UD);
    sse_check(c);
    src128(c, i, &s, 1);
    memcpy(&d, c->xmm[i->reg], 16);
    ssse3_core(op, &d, &s, &r, 16, imm);
    memcpy(c->xmm[i->reg], &r, 16);
}
