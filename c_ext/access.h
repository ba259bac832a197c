/* Guest memory access: the TLB hit inline, mem.c's slow path otherwise.
 *
 * ld/st/atomic_host are the fast paths every instruction takes: a RAM access that
 * hits the software TLB (tlb_hit) is a tag compare and a host load or store; a miss,
 * a page crossing, MMIO or a write into a page holding translated code goes to
 * mem.c (mem_read_slow, mem_write_slow, atomic_host_slow).
 *
 * Included by the files that access guest memory (exec.c with its handler groups
 * through operands.h, system.c, x87.c, sse.c), never by mem.c: the slow paths sit
 * below these fast paths, so mem.c uses none of them (see the layering in tcg.h).
 */
#ifndef KVMPY_ACCESS_H
#define KVMPY_ACCESS_H

#include "tcg.h"

/* mem.c's count of pages marked as code; exec.c checks CPU.seen_code_epoch against
 * it at block boundaries. (The slow paths are declared with mem.c's other functions
 * in tcg.h.) */
extern _Atomic uint64_t code_epoch;

/* ---- inline fast paths ---- */

static inline __attribute__((always_inline)) void *tlb_hit(CPU *c, uint64_t lin, unsigned size, int write)
{
    TlbEnt *e = &c->tlb[c->mmu_idx][(lin >> 12) & (TLB_SIZE - 1)];
    uint64_t tag = write ? e->tag_w : e->tag_r;
    if (likely(tag == (lin & ~0xfffULL) && (lin & 0xfff) <= 4096 - size))
        return (void *)(e->addend + (uintptr_t)lin);
    return 0;
}

/* Host pointer for an atomic read-modify-write (lock prefix, xchg, cmpxchg): the
 * guest's atomicity against other vCPUs comes from the host's own atomics. 0 when the
 * operand is not plain RAM on one page (MMIO, page-crossing): the caller falls back
 * to a non-atomic load/store. */
static inline __attribute__((always_inline)) void *atomic_host(CPU *c, uint64_t lin, unsigned size)
{
    void *p = tlb_hit(c, lin, size, 1);
    return likely(p != 0) ? p : atomic_host_slow(c, lin, size);
}

static inline __attribute__((always_inline)) uint64_t ld(CPU *c, uint64_t lin, unsigned size)
{
    void *p = tlb_hit(c, lin, size, 0);
    if (likely(p != 0)) {
        switch (size) {
        case 1: return *(uint8_t *)p;
        case 2: { uint16_t v; memcpy(&v, p, 2); return v; }
        case 4: { uint32_t v; memcpy(&v, p, 4); return v; }
        default: { uint64_t v; memcpy(&v, p, 8); return v; }
        }
    }
    return mem_read_slow(c, lin, size, 0);
}

static inline __attribute__((always_inline)) void st(CPU *c, uint64_t lin, unsigned size, uint64_t v)
{
    void *p = tlb_hit(c, lin, size, 1);
    if (likely(p != 0)) {
        switch (size) {
        case 1: *(uint8_t *)p = (uint8_t)v; return;
        case 2: { uint16_t x = (uint16_t)v; memcpy(p, &x, 2); return; }
        case 4: { uint32_t x = (uint32_t)v; memcpy(p, &x, 4); return; }
        default: memcpy(p, &v, 8); return;
        }
    }
    mem_write_slow(c, lin, size, v);
}

#endif
