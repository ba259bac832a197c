/* String instructions: movs, stos, lods, cmps, scas, with rep/repe/repne.
 * (ins/outs are port I/O: insn_io.h.) */
#ifndef KVMPY_INSN_STRING_H
#define KVMPY_INSN_STRING_H

#include "insn_alu.h"

/* One instruction, all its repetitions: a rep runs here to the end unless an exit
 * request comes in, checked every 0x4000 elements; it then resumes at the same rip. */
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
                        uint64_t v = c->r[R_AX] & szmask(sz);
                        if (sz == 1 || v == 0) {
                            memset(dp, (int)(v & 0xff), bytes);   /* clear_page's zeroes */
                        } else if (sz == 8) {   /* constant sizes: stores, not memcpy calls */
                            for (uint64_t k = 0; k < chunk; k++)
                                memcpy(dp + k * 8, &v, 8);
                        } else if (sz == 4) {
                            uint32_t v32 = (uint32_t)v;
                            for (uint64_t k = 0; k < chunk; k++)
                                memcpy(dp + k * 4, &v32, 4);
                        } else {
                            uint16_t v16 = (uint16_t)v;
                            for (uint64_t k = 0; k < chunk; k++)
                                memcpy(dp + k * 2, &v16, 2);
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
            alu(c, ALU_CMP, a, b, sz);
            areg_set(c, R_SI, asz, si + d);
            areg_set(c, R_DI, asz, di + d);
            break;
        }
        default: {   /* 0xae scas */
            uint64_t b = ld(c, linear(c, S_ES, di), sz);
            alu(c, ALU_CMP, c->r[R_AX] & szmask(sz), b, sz);
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

#endif
