/* MMX: the 64-bit integer SIMD set (0F 60-7F, 0F C4/C5, 0F D1-FE without a 66, F2 or
 * F3 prefix), with the SSE additions on MMX registers (pshufw, pinsrw, pextrw,
 * pmovmskb, pmulhuw, pavgb/w, psadbw, pminub/pmaxub, pminsw/pmaxsw, maskmovq, movntq)
 * and the SSE2 ones (paddq, psubq, pmuludq).
 *
 * MM0-MM7 are the x87 registers' 64-bit mantissas (physical R0-R7, not the stack
 * order). Every MMX instruction sets TOP to 0 and tags all eight registers valid; a
 * write also sets the register's sign and exponent to all ones, so x87 code that
 * forgets EMMS sees NaNs. sse.c routes the prefix-less forms here; the operand
 * helpers and the packed-integer core are simd.h's. */
#include "simd.h"

#define MMX_CR0_EM 4u
#define MMX_CR0_NE 0x20u
#define MMX_FSW_ES 0x0080u

int mmx_op(int op)
{
    if (op >= 0x60 && op <= 0x7f)
        return op != 0x6c && op != 0x6d && op != 0x77 && op != 0x78 && op != 0x79 && op != 0x7a &&
               op != 0x7b && op != 0x7c && op != 0x7d;
    if (op == 0xc4 || op == 0xc5)
        return 1;
    if (op >= 0xd1 && op <= 0xfe)
        return op != 0xd6 && op != 0xe6 && op != 0xf0;
    return 0;
}

/* Faults an MMX instruction checks before it runs (SDM Vol. 2, Table 22-x "MMX"):
 * CR0.EM #UD, CR0.TS #NM, a pending unmasked x87 exception #MF (as x87.c's
 * waiting instructions, ignored with CR0.NE clear). EMMS checks the same. */
void mmx_check(CPU *c)
{
    if (c->cr0 & MMX_CR0_EM)
        RAISE(c, EXC_UD);
    if (c->cr0 & CR0_TS)
        RAISE(c, EXC_NM);
    if ((c->fsw & MMX_FSW_ES) && (c->cr0 & MMX_CR0_NE))
        RAISE(c, EXC_MF);
}





void mmx_exec(CPU *c, Insn *i, int op)
{
    mmx_check(c);
    int dr = i->reg & 7;   /* REX.R does not extend an MMX register either */
    switch (op) {
    case 0x6e: {   /* movd/movq mm, r/m32/64 */
        uint64_t v = gpr_rm(c, i, i->rexw ? 8 : 4);
        mmx_enter(c);
        mm_set(c, dr, v);
        return;
    }
    case 0x7e: {   /* movd/movq r/m32/64, mm */
        unsigned sz = i->rexw ? 8 : 4;
        uint64_t v = mm_get(c, dr);
        if (sz == 4)
            v = (uint32_t)v;
        if (i->mod == 3) {
            mmx_enter(c);
            c->r[i->rm] = v;
        } else {
            st(c, ea_lin(c, i), sz, v);
            mmx_enter(c);
        }
        return;
    }
    case 0x6f: {   /* movq mm, mm/m64 */
        uint64_t v = mm_src(c, i);
        mmx_enter(c);
        mm_set(c, dr, v);
        return;
    }
    case 0x7f: case 0xe7: {   /* movq mm/m64, mm; movntq m64, mm */
        uint64_t v = mm_get(c, dr);
        if (i->mod == 3) {
            if (op == 0xe7)
                RAISE(c, EXC_UD);
            mmx_enter(c);
            mm_set(c, i->rm, v);
        } else {
            st(c, ea_lin(c, i), 8, v);
            mmx_enter(c);
        }
        return;
    }
    case 0x70: {   /* pshufw mm, mm/m64, imm8 */
        X s, r;
        s.q[0] = mm_src(c, i);
        unsigned imm = i->imm & 0xff;
        r.q[0] = 0;
        for (int k = 0; k < 4; k++)
            r.w[k] = s.w[(imm >> (2 * k)) & 3];
        mmx_enter(c);
        mm_set(c, dr, r.q[0]);
        return;
    }
    case 0x71: case 0x72: case 0x73: {   /* shifts by imm8 of mm (the r/m register) */
        int kind = i->reg & 7;
        if (i->mod != 3 || kind == 0 || kind == 1 || kind == 3 || kind == 5 || kind == 7 ||
            (op == 0x73 && kind == 4))
            RAISE(c, EXC_UD);
        X d, s, r;
        memset(&d, 0, sizeof d);
        memset(&s, 0, sizeof s);
        d.q[0] = mm_get(c, i->rm);
        s.q[0] = i->imm & 0xff;
        /* the by-register shifts: D1-D3 srl, E1-E2 sra, F1-F3 sll by the count in s */
        static const int base[3][8] = {
            { 0, 0, 0xd1, 0, 0xe1, 0, 0xf1, 0 },
            { 0, 0, 0xd2, 0, 0xe2, 0, 0xf2, 0 },
            { 0, 0, 0xd3, 0, 0, 0, 0xf3, 0 },
        };
        packed_int(base[op - 0x71][kind], &d, &s, &r);
        mmx_enter(c);
        mm_set(c, i->rm, r.q[0]);
        return;
    }
    case 0xc4: {   /* pinsrw mm, r32/m16, imm8 */
        uint16_t v = (uint16_t)gpr_rm(c, i, i->mod == 3 ? 4 : 2);
        mmx_enter(c);
        X d;
        d.q[0] = mm_get(c, dr);
        d.w[i->imm & 3] = v;
        mm_set(c, dr, d.q[0]);
        return;
    }
    case 0xc5: {   /* pextrw r32, mm, imm8 */
        if (i->mod != 3)
            RAISE(c, EXC_UD);
        X s;
        s.q[0] = mm_get(c, i->rm);
        mmx_enter(c);
        c->r[i->reg] = s.w[i->imm & 3];
        return;
    }
    case 0xd7: {   /* pmovmskb r32, mm */
        if (i->mod != 3)
            RAISE(c, EXC_UD);
        X s;
        s.q[0] = mm_get(c, i->rm);
        uint32_t m = 0;
        for (int k = 0; k < 8; k++)
            m |= (uint32_t)(s.b[k] >> 7) << k;
        mmx_enter(c);
        c->r[i->reg] = m;
        return;
    }
    case 0xf7: {   /* maskmovq mm1, mm2: the bytes of mm1 whose mm2 byte has its top bit, to DS:rDI */
        if (i->mod != 3)
            RAISE(c, EXC_UD);
        X v, m;
        v.q[0] = mm_get(c, dr);
        m.q[0] = mm_get(c, i->rm);
        uint64_t di = c->r[R_DI];
        if (i->asz == 4)
            di = (uint32_t)di;
        else if (i->asz == 2)
            di = (uint16_t)di;
        uint64_t lin = linear(c, i->seg, di);
        /* probe every selected byte first: a fault leaves memory untouched */
        for (int k = 0; k < 8; k++)
            if (m.b[k] & 0x80)
                ld(c, lin + k, 1);
        for (int k = 0; k < 8; k++)
            if (m.b[k] & 0x80)
                st(c, lin + k, 1, v.b[k]);
        mmx_enter(c);
        return;
    }
    }
    X d, s, r;
    memset(&d, 0, sizeof d);
    memset(&s, 0, sizeof s);
    s.q[0] = mm_src(c, i);
    d.q[0] = mm_get(c, dr);
    switch (op) {
    case 0xdb: r.q[0] = d.q[0] & s.q[0]; break;
    case 0xdf: r.q[0] = ~d.q[0] & s.q[0]; break;
    case 0xeb: r.q[0] = d.q[0] | s.q[0]; break;
    case 0xef: r.q[0] = d.q[0] ^ s.q[0]; break;
    case 0x68: case 0x69: case 0x6a:
        /* high-half unpacks take the upper 4 bytes of each operand: where the XMM form
         * reads its upper 8 */
        d.d[2] = d.d[1];
        s.d[2] = s.d[1];
        if (!packed_int(op, &d, &s, &r))
            RAISE(c, EXC_UD);
        break;
    default:
        if (!packed_int(op, &d, &s, &r))
            RAISE(c, EXC_UD);
        if (op == 0x63 || op == 0x67 || op == 0x6b)
            r.d[1] = r.d[2];   /* packs: the XMM form puts the source's half at byte 8, MMX at 4 */
        break;
    }
    mmx_enter(c);
    mm_set(c, dr, r.q[0]);
}
