/* Port I/O: in, out, ins, outs. Each access is a VM exit the VMM completes; the
 * instruction then runs again and finds the data in the access log (mem.c). */
#ifndef KVMPY_INSN_IO_H
#define KVMPY_INSN_IO_H

#include "operands.h"

/* CPL against IOPL only: the TSS I/O permission bitmap is not consulted */
static int io_allowed(CPU *c)
{
    if (!(c->cr0 & CR0_PE))
        return 1;
    return (c->eflags & F_VM) ? 0 : c->cpl <= (int)((c->eflags >> 12) & 3);
}

/* ins/outs: a rep moves as many elements as fit the page and iobuf in one exit,
 * then repeats at the same rip for the rest */
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

/* E4/E5 (port imm8), EC/ED (port DX) */
HANDLER in_acc(CPU *c, Insn *i, int op)
{
    unsigned sz = i->osz;
    unsigned s = (op & 1) ? (sz == 8 ? 4 : sz) : 1;
    uint16_t port = op < 0xe8 ? (uint16_t)(i->imm & 0xff) : (uint16_t)c->r[R_DX];
    if (!io_allowed(c)) GP0();
    uint64_t v = io_access(c, port, s, 0, 0);
    setreg(c, i, R_AX, s, v);
}

/* E6/E7 (port imm8), EE/EF (port DX) */
HANDLER out_acc(CPU *c, Insn *i, int op)
{
    unsigned sz = i->osz;
    unsigned s = (op & 1) ? (sz == 8 ? 4 : sz) : 1;
    uint16_t port = op < 0xe8 ? (uint16_t)(i->imm & 0xff) : (uint16_t)c->r[R_DX];
    if (!io_allowed(c)) GP0();
    uint64_t v = c->r[R_AX] & szmask(s);
    /* a byte for a queued port waits in the machine's queue instead of exiting
     * (not while this OUT is replayed after its exit: the queue was full then) */
    if (s == 1 && c->port_queue && !c->nacc && port_queue_push(c->port_queue, port, (uint8_t)v))
        return;
    io_access(c, port, s, 1, v);
}

#endif
