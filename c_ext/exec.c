/* Execution: the block cache, the run loop and the dispatcher (exec_block).
 * The instruction semantics are handlers grouped by instruction kind in the
 * insn_*.h files, each inlined into its dispatch label here. */
#include <stdio.h>
#include "tcg.h"
#include "access.h"
#include "flags.h"
#include "operands.h"
#include "insn_alu.h"
#include "insn_bits.h"
#include "insn_shift.h"
#include "insn_move.h"
#include "insn_exchange.h"
#include "insn_string.h"
#include "insn_io.h"
#include "insn_stack.h"
#include "insn_control.h"
#include "insn_fpu.h"
#include "insn_system.h"
#include "insn_bmi.h"
#include "native/native.h"

/* ---- block cache ---- */

void block_cache_flush(CPU *c)
{
    /* the shared code bitmap stays as it is: other vCPUs may hold translations of those
     * pages, and a stale "code" mark only costs a slow-path write */
    /* Links and jump-cache entries may still point at these slots: a slot is only
     * trusted while valid, and it becomes valid again only once refilled whole. */
    for (int k = 0; k < c->nblocks; k++)
        c->blocks[k].valid = 0;
    c->nblocks = 0;
    c->ninsns = 0;
    native_arena_reset(c);   /* no compiled block runs now: flushes happen between blocks */
    memset(c->hash, 0, sizeof(Block *) * c->hash_size);
    memset(c->jc, 0, sizeof c->jc);
    memset(c->page_blocks, 0, sizeof c->page_blocks);
    c->cur_block = 0;
}

static inline uint32_t phash(CPU *c, uint64_t pa, uint32_t mode)
{
    return (uint32_t)((pa ^ (pa >> 13) ^ mode * 0x9e3779b9u) & (c->hash_size - 1));
}

static uint64_t fetch_phys(CPU *c, uint64_t lin, int fault, int *ok)
{
    TlbEnt *e = &c->tlb[c->mmu_idx][(lin >> 12) & (TLB_SIZE - 1)];
    *ok = 1;
    if (e->tag_x == (lin & ~0xfffull))
        return e->paddr | (lin & 0xfff);
    uint64_t pa;
    if (translate(c, lin, 2, c->mmu_idx == 1, &pa, fault) < 0) {
        *ok = 0;
        return 0;
    }
    /* fill the TLB through a read of the page */
    if (ram_ptr(c, pa & ~0xfffull, 4096)) {
        tlb_log_fill(c, c->mmu_idx, e);
        e->tag_r = e->tag_w = TLB_INVALID;
        e->paddr = pa & ~0xfffull;
        e->addend = (uintptr_t)ram_ptr(c, e->paddr, 4096) - (uintptr_t)(lin & ~0xfffull);
        e->tag_x = lin & ~0xfffull;
        e->global = 0;
    }
    return pa;
}

static Block *translate_block(CPU *c, uint64_t pc, uint64_t lin, uint64_t pa, uint32_t mode)
{
    uint64_t t0 = now_ns();
    if (c->nblocks >= c->max_blocks || c->ninsns + BLOCK_MAX_INSNS > c->max_insns)
        block_cache_flush(c);
    uint8_t *p1 = ram_ptr(c, pa & ~0xfffull, 4096);
    if (!p1) {
        snprintf(c->errmsg, sizeof c->errmsg, "instruction fetch outside RAM at rip %#llx (gpa %#llx)",
                 (unsigned long long)pc, (unsigned long long)pa);
        cpu_exit(c, EXIT_INTERNAL_ERROR);
    }
    /* marked before decoding: a write after this point (on any vCPU) invalidates us */
    code_page_mark(c, pa & ~0xfffull);
    Block *b = &c->blocks[c->nblocks];
    b->insns = &c->insn_pool[c->ninsns];
    b->phys = pa & ~0xfffull;
    b->start = pa;
    b->phys2 = ~0ull;
    b->pc = pc;
    b->cs_base = c->seg[S_CS].base;
    b->mode = mode;
    b->link[0] = b->link[1] = 0;
    b->native = 0;
    b->heat = 0;
    b->nat_succ[0] = b->nat_succ[1] = 0;
    unsigned cur = pa & 0xfff;
    int n = 0;
    uint8_t *p2 = 0;
    uint64_t pa2 = ~0ull;
    int p2_tried = 0;
    uint64_t lin_page2 = (lin & ~0xfffull) + 4096;
    if (!c->long64)
        lin_page2 = (uint32_t)lin_page2;
    while (n < BLOCK_MAX_INSNS) {
        uint8_t buf[16];
        const uint8_t *src;
        int avail;
        if (cur + 15 <= 4096) {
            src = p1 + cur;
            avail = 15;
        } else {
            int in1 = 4096 - cur;
            memcpy(buf, p1 + cur, in1);
            if (!p2_tried) {
                int ok;
                p2_tried = 1;
                uint64_t q = fetch_phys(c, lin_page2, 0, &ok);
                if (ok) {
                    p2 = ram_ptr(c, q & ~0xfffull, 4096);
                    if (p2) {
                        pa2 = q & ~0xfffull;
                        code_page_mark(c, pa2);
                    }
                }
            }
            if (p2) {
                memcpy(buf + in1, p2, 15 - in1);
                avail = 15;
            } else {
                avail = in1;
            }
            src = buf;
        }
        Insn *i = &b->insns[n];
        int ends;
        int len = decode_insn_bytes(src, avail, mode, i, &ends);
        if (len == 0) {
            if (n == 0) {
                int ok;
                fetch_phys(c, lin_page2, 1, &ok);   /* raises the #PF for the second page */
                snprintf(c->errmsg, sizeof c->errmsg, "instruction fetch outside RAM at rip %#llx",
                         (unsigned long long)pc);
                cpu_exit(c, EXIT_INTERNAL_ERROR);
            }
            break;
        }
        if (len < 0) {
            if (n == 0)
                RAISE_ERR(c, EXC_GP, 0);
            break;
        }
        n++;
        cur += len;
        i->end = (uint16_t)(cur - (pa & 0xfff));
        if (cur > 4096) {
            b->phys2 = pa2;
            break;
        }
        if (ends || cur == 4096)
            break;
    }
    b->n = n;
    b->valid = 1;
    c->nblocks++;
    c->ninsns += n;
    uint32_t h = phash(c, pa, mode);
    b->hnext = c->hash[h];
    c->hash[h] = b;
    /* a block on two pages colliding in one list is linked there once, through pnext[0] */
    unsigned s1 = page_list_slot(b->phys);
    b->pnext[0] = c->page_blocks[s1];
    c->page_blocks[s1] = b;
    b->pnext[1] = 0;
    if (b->phys2 != ~0ull && page_list_slot(b->phys2) != s1) {
        unsigned s2 = page_list_slot(b->phys2);
        b->pnext[1] = c->page_blocks[s2];
        c->page_blocks[s2] = b;
    }
    c->st_translated++;
    c->st_decoded_insns += n;
    c->st_decode_ns += now_ns() - t0;
    return b;
}

/* Is b the translation of the code at the current cs:pc, as this CPU maps and may
 * execute it now? Cached block pointers (jump cache, links) are only hints and
 * must pass this first. Checking the fetch mapping through the TLB (tag_x is
 * per privilege level and only set for executable pages) means TLB flushes and
 * INVLPG need not clear the hints; invalidated or recycled blocks fail "valid". */
static inline __attribute__((always_inline)) int block_fits(CPU *c, Block *b, uint64_t pc, uint64_t csb,
                                                           uint32_t mode)
{
    if (!(b->valid && b->pc == pc && b->cs_base == csb && b->mode == mode))
        return 0;
    uint64_t lin = linear(c, S_CS, pc);
    TlbEnt *e = &c->tlb[c->mmu_idx][(lin >> 12) & (TLB_SIZE - 1)];
    if (e->tag_x != (lin & ~0xfffull) || e->paddr != b->phys)
        return 0;
    if (unlikely(b->phys2 != ~0ull)) {
        /* the block's tail lies on the next virtual page: same mapping required */
        uint64_t l2 = (lin & ~0xfffull) + 4096;
        if (!c->long64)
            l2 = (uint32_t)l2;
        TlbEnt *e2 = &c->tlb[c->mmu_idx][(l2 >> 12) & (TLB_SIZE - 1)];
        if (e2->tag_x != l2 || e2->paddr != b->phys2)
            return 0;
    }
    return 1;
}

static Block *find_block(CPU *c)
{
    uint64_t pc = c->rip;
    uint64_t csb = c->seg[S_CS].base;
    uint32_t mode = c->code_mode;
    unsigned j = (unsigned)(pc ^ (pc >> 10)) & 4095;
    Block *b = c->jc[j];
    if (likely(b && block_fits(c, b, pc, csb, mode)))
        return b;
    uint64_t lin = linear(c, S_CS, pc);
    int ok;
    uint64_t pa = fetch_phys(c, lin, 1, &ok);
    uint32_t h = phash(c, pa, mode);
    /* invalidate_local_blocks() leaves invalid blocks in the chains: drop them here */
    for (Block **pp = &c->hash[h]; (b = *pp) != 0; pp = &b->hnext) {
        while (b && !b->valid)
            b = *pp = b->hnext;
        if (!b)
            break;
        if (b->start == pa && b->mode == mode) {
            if (b->phys2 != ~0ull) {
                /* the block's tail lies on the next virtual page: same mapping required */
                uint64_t l2 = (lin & ~0xfffull) + 4096;
                if (!c->long64) l2 = (uint32_t)l2;
                int ok2;
                uint64_t q = fetch_phys(c, l2, 0, &ok2);
                if (!ok2 || (q & ~0xfffull) != b->phys2)
                    continue;
            }
            break;
        }
    }
    if (!b)
        b = translate_block(c, pc, lin, pa, mode);
    c->jc[j] = b;
    return b;
}

/* The block to run after prev (0 when unknown): prev's links first, they stay in
 * the cache lines just used; the jump cache and hash table otherwise. */
static inline __attribute__((always_inline)) Block *next_block(CPU *c, Block *prev)
{
    if (likely(prev != 0)) {
        uint64_t pc = c->rip;
        uint64_t csb = c->seg[S_CS].base;
        uint32_t mode = c->code_mode;
        Block *n = prev->link[0];
        if (likely(n && block_fits(c, n, pc, csb, mode)))
            return n;
        n = prev->link[1];
        if (n && block_fits(c, n, pc, csb, mode))
            return n;
    }
    Block *b = find_block(c);
    /* translate_block may have flushed the cache: prev is then a recycled slot and
     * its links mere hints like any other, so writing them is harmless */
    if (prev && b != prev->link[0]) {
        prev->link[1] = prev->link[0];
        prev->link[0] = b;
    }
    return b;
}

/* ---- interrupts and async requests ---- */

static int irq_highest(CPU *c)
{
    for (int w = 3; w >= 0; w--) {
        uint64_t v = atomic_load(&c->irq_pending[w]);
        if (v)
            return w * 64 + 63 - __builtin_clzll(v);
    }
    return -1;
}

static int async_wanted(CPU *c)
{
    return atomic_load(&c->kicked) || irq_highest(c) >= 0 || c->ninval ||
           atomic_load(&c->life_request) || (atomic_load(&c->nmi_pending) && !c->nmi_blocked) ||
           atomic_load(&c->want_irq_window);
}

static void recompute_request(CPU *c)
{
    int req = async_wanted(c);
    atomic_store(&c->exit_request, req);
    /* a request raced with the store above must not be lost */
    if (!req && async_wanted(c))
        atomic_store(&c->exit_request, 1);
}

/* any thread: INIT. Supersedes a SIPI not yet applied (the CPU ends up waiting). */
void request_init(CPU *c)
{
    atomic_store(&c->life_request, LIFE_INIT);
    atomic_store(&c->exit_request, 1);
}

/* any thread: SIPI; applied after a pending INIT, ignored unless the CPU waits for it */
void request_sipi(CPU *c, int vector)
{
    uint32_t old = atomic_load(&c->life_request), nv;
    do
        nv = (old & LIFE_INIT) | ((uint32_t)(vector & 0xff) + 1);
    while (!atomic_compare_exchange_weak(&c->life_request, &old, nv));
    atomic_store(&c->exit_request, 1);
}

void request_nmi(CPU *c)
{
    atomic_store(&c->nmi_pending, 1);
    atomic_store(&c->exit_request, 1);
}

/* run() leaves with EXIT_INTR once IF=1 and no interrupt shadow (KVM's
 * request_interrupt_window); the request ends with that exit or cpu_reset */
void request_irq_window(CPU *c)
{
    atomic_store(&c->want_irq_window, 1);
    atomic_store(&c->exit_request, 1);
}

/* an external interrupt handed over now would be delivered before the next instruction */
int cpu_interruptible(CPU *c)
{
    return (c->eflags & F_IF) && !c->shadow && c->nacc == 0 && !c->wait_sipi;
}

/* Power-on state (wait_sipi: an AP after INIT, which keeps its APIC base MSR).
 * RAM, CPUID, translations and statistics stay. vCPU thread, or run() not executing. */
void cpu_reset(CPU *c, int wait_sipi)
{
    uint64_t apic_base = c->apic_base;
    cpu_init(c);
    if (wait_sipi)
        c->apic_base = apic_base;
    for (int w = 0; w < 4; w++)
        atomic_store(&c->irq_pending[w], 0);
    atomic_store(&c->nmi_pending, 0);
    atomic_store(&c->want_irq_window, 0);
    c->nmi_blocked = 0;
    c->shadow = 0;
    c->nacc = c->acc_pos = 0;
    c->delivering = -1;
    c->cur_block = 0;
    c->stop_block = 0;
    c->wait_sipi = wait_sipi;
    c->halted = wait_sipi;
    recompute_request(c);
}

/* vCPU thread: apply INIT / SIPI requests */
static void apply_life_requests(CPU *c)
{
    uint32_t req = atomic_exchange(&c->life_request, 0);
    if (req & LIFE_INIT)
        cpu_reset(c, 1);
    if ((req & LIFE_SIPI_MASK) && c->wait_sipi) {
        int vector = (int)(req & LIFE_SIPI_MASK) - 1;
        /* what KVM's in-kernel LAPIC does: real mode at vector:0000 */
        c->seg[S_CS].sel = (uint16_t)(vector << 8);
        c->seg[S_CS].base = (uint64_t)vector << 12;
        c->rip = 0;
        /* what was sent to the CPU while it waited is lost, as on hardware */
        for (int w = 0; w < 4; w++)
            atomic_store(&c->irq_pending[w], 0);
        atomic_store(&c->nmi_pending, 0);
        c->wait_sipi = 0;
        c->halted = 0;
        update_mode(c);
    }
}

/* vCPU thread: apply queued invalidations */
static void apply_invalidations(CPU *c)
{
    while (atomic_flag_test_and_set_explicit(&c->inval_lock, memory_order_acquire))
        ;
    int n = c->ninval, overflow = c->inval_overflow;
    uint64_t gpa[64], size[64];
    for (int k = 0; k < n; k++) {
        gpa[k] = c->inval[k].gpa;
        size[k] = c->inval[k].size;
    }
    c->ninval = 0;
    c->inval_overflow = 0;
    atomic_flag_clear_explicit(&c->inval_lock, memory_order_release);
    if (overflow) {
        block_cache_flush(c);
        return;
    }
    /* The shared "code" marks stay: another vCPU may have translated the page again
     * since the request was queued, and a stale mark only costs a slow-path write. */
    for (int k = 0; k < n; k++)
        for (uint64_t p = gpa[k] & ~0xfffull; p < gpa[k] + size[k]; p += 4096)
            if (ram_ptr(c, p, 1))
                invalidate_local_blocks(c, p);
}

static int check_async(CPU *c)
{
    if (c->ninval || c->inval_overflow)
        apply_invalidations(c);
    if (atomic_load(&c->life_request)) {
        apply_life_requests(c);
        recompute_request(c);
    }
    if (atomic_load(&c->kicked)) {
        atomic_store(&c->kicked, 0);
        recompute_request(c);
        return EXIT_INTR;
    }
    if (c->wait_sipi)
        return EXIT_HLT;   /* nothing runs before the SIPI; NMIs and interrupts wait */
    if (c->nacc == 0 && !c->nmi_blocked && atomic_load(&c->nmi_pending)) {
        atomic_store(&c->nmi_pending, 0);
        c->nmi_blocked = 1;          /* until the next IRET */
        recompute_request(c);
        c->halted = 0;
        c->delivering = 2;
        deliver_interrupt(c, 2, 0, 0, 0, c->rip);
        c->delivering = -1;
    }
    int v = irq_highest(c);
    if (v >= 0 && (c->eflags & F_IF) && !c->shadow && c->nacc == 0) {
        atomic_fetch_and(&c->irq_pending[v / 64], ~(1ull << (v % 64)));
        recompute_request(c);
        c->halted = 0;
        c->delivering = v;
        deliver_interrupt(c, v, 0, 0, 0, c->rip);
        c->delivering = -1;
    }
    if (atomic_load(&c->want_irq_window) && cpu_interruptible(c)) {
        atomic_store(&c->want_irq_window, 0);
        recompute_request(c);
        return EXIT_INTR;
    }
    if (c->halted)
        return EXIT_HLT;
    return 0;
}

static Block *exec_insns(CPU *c, Block *b, Insn *single);
static inline Block *exec_block(CPU *c, Block *b);
static int native_step(CPU *c, Insn *i, uint64_t rip);

static int exc_class(int v)
{
    if (v == EXC_PF) return 2;
    if (v == 0 || (v >= 10 && v <= 13)) return 1;
    return 0;
}

int cpu_run(CPU *c)
{
    uint64_t t0 = now_ns();
    uint64_t d0 = c->st_decode_ns;
    c->acc_pos = 0;   /* the first instruction replays the accesses the VMM completed */
    if (c->nacc)
        c->stop_block |= STOP_REPLAY;   /* ... and its end clears the access log (NEXT) */
    int r = setjmp(c->jb);
    if (r == 2) {
        c->cur_block = 0;
        c->st_exec_ns += (now_ns() - t0) - (c->st_decode_ns - d0);
        return c->exit_reason;
    }
    if (r == 1) {
        c->cur_block = 0;
        c->stop_block = 0;
        c->nacc = c->acc_pos = 0;
        update_mode(c);
        int vec = c->exc_vec;
        uint32_t err = c->exc_err;
        int has_err = c->exc_has_err;
        if (c->delivering >= 0) {
            int prev = c->delivering;
            if (prev == EXC_DF) {
                c->delivering = -1;
                c->st_exec_ns += (now_ns() - t0) - (c->st_decode_ns - d0);
                return EXIT_SHUTDOWN;
            }
            int pc = exc_class(prev), nc = exc_class(vec);
            if ((pc == 1 && nc == 1) || (pc == 2 && nc != 0)) {
                vec = EXC_DF;
                err = 0;
                has_err = 1;
            }
        }
        if (!(c->cr0 & CR0_PE))
            has_err = 0;
        c->delivering = vec;
        deliver_interrupt(c, vec, 0, err, has_err, c->rip);
        c->delivering = -1;
    }
    /* the block that just ran, for next_block(); declared after setjmp, so an
     * exception (longjmp) restarts the chain from nothing */
    Block *last = 0;
    for (;;) {
        if (unlikely(c->seen_code_epoch != atomic_load_explicit(&code_epoch, memory_order_relaxed)))
            drop_code_write_tags(c);
        if (unlikely(c->nat_full)) {   /* a hot block found the code arena full: QEMU's tb_flush */
            block_cache_flush(c);
            last = 0;
        }
        if (unlikely(atomic_load_explicit(&c->exit_request, memory_order_relaxed) || c->halted)) {
            int rr = check_async(c);
            if (rr) {
                c->st_exec_ns += (now_ns() - t0) - (c->st_decode_ns - d0);
                return rr;
            }
            last = 0;   /* an interrupt entry is no successor worth linking */
        }
        last = exec_block(c, next_block(c, last));
    }
}

void cpu_init(CPU *c)
{
    memset(c, 0, offsetof(CPU, nram));
    for (int s = 0; s < 8; s++) {
        c->seg[s].limit = 0xffff;
        c->seg[s].present = 1;
        c->seg[s].s = 1;
        c->seg[s].type = 3;
    }
    c->seg[S_CS].type = 0xb;
    c->seg[S_CS].sel = 0xf000;
    c->seg[S_CS].base = 0xffff0000;
    c->seg[S_TR].s = 0;
    c->seg[S_TR].type = 0xb;
    c->seg[S_LDT].s = 0;
    c->seg[S_LDT].type = 2;
    c->gdt_limit = c->idt_limit = 0xffff;
    c->rip = 0xfff0;
    c->eflags = 2;
    c->cc_op = CC_EAGER;
    c->cr0 = 0x60000010;
    c->xcr0 = 1;
    c->mxcsr = 0x1f80;
    fpu_reset(c);
    c->pat = 0x0007040600070406ull;
    c->apic_base = 0xfee00000ull | (c->cpu_index == 0 ? 0x900 : 0x800);
    c->delivering = -1;
    for (int m = 0; m < 2; m++)
        for (int k = 0; k < TLB_SIZE; k++)
            c->tlb[m][k].tag_r = c->tlb[m][k].tag_w = c->tlb[m][k].tag_x = TLB_INVALID;
    c->tlb_log_n[0] = c->tlb_log_n[1] = 0;
    update_mode(c);
}
/* May the block after this one start without a trip through cpu_run? Only when
 * none of the run loop's per-block checks (cpu_run) would act: keep the two in step. */
static inline __attribute__((always_inline)) int chain_ok(CPU *c)
{
    return !atomic_load_explicit(&c->exit_request, memory_order_relaxed) && !c->halted &&
           c->seen_code_epoch == atomic_load_explicit(&code_epoch, memory_order_relaxed);
}

/* the most blocks run back to back through links before cpu_run has control again */
#define CHAIN_MAX 64

/* ---- native tier (c_ext/native/): when a block runs compiled ---- */

/* Compiles b once it is hot; says whether its native code may run now. The code
 * assumes entry at b->pc with nothing pending that the interpreter's first
 * instruction must handle (interrupt shadow, replayed accesses, stop requests). */
static inline __attribute__((always_inline)) int native_ready(CPU *c, Block *b)
{
    if (unlikely(b->native == 0)) {
        if (c->native_threshold < 0 || ++b->heat <= (uint32_t)c->native_threshold)
            return 0;
        c->nat_code_epoch = &code_epoch;
        b->native = native_compile(c, b, native_step);
        if (!b->native) {
            b->heat = 0;   /* arena full: try again after the next flush */
            return 0;
        }
    }
    return c->rip == b->pc && !c->shadow && !c->nacc && !c->stop_block;
}

/* Runs b, then its linked successors while chain_ok(); returns the last block run.
 * With `single`, runs only that instruction of b (c->cur_block), for native code:
 * no chaining, no statistics, and 0 when the block must end after it. */
static Block *exec_insns(CPU *c, Block *b, Insn *single)
{
    Insn *i, *end;
    uint64_t entry_rip, ip_wrap;
    int chain = CHAIN_MAX;
    int stopped = 0;
    Block **nat_slot = 0;
enter:
    if (!single && native_ready(c, b)) {
        c->cur_block = b;
        native_run(c, b->native);
        /* the code may have jumped on to compiled successors: the last one ran is the
         * one whose links and exit slot count now */
        if (likely(c->cur_block != 0))
            b = c->cur_block;
        nat_slot = c->nat_exit_slot;
        c->nat_exit_slot = 0;
        goto chain_next;
    }
    i = single ? single : b->insns;
    end = single ? single + 1 : i + b->n;
    /* next_rip comes from the block's entry rip and the instruction's end offset, not
     * from the previous rip: no store-to-load dependency chain through c->rip from one
     * instruction to the next. Valid because anything that moves rip other than to the
     * next instruction ends the block (ends_block() in decode.c, or stop_block). */
    entry_rip = single ? b->pc : c->rip;
    ip_wrap = c->long64 ? ~0ull : 0xffffffffull;
    if (unlikely(c->shadow) && !single) {
        end = i + 1;
        c->shadow = 0;
    }
    c->cur_block = b;
    /* Threaded dispatch: every handler ends with its own indirect jump to the next
     * instruction's handler (NEXT), which predicts far better than one shared switch.
     * Table entries and op_ labels must match: tests/test_tcg_build.py checks that. */
    static void *const dispatch[DISPATCH_SIZE] = {
        [0 ... DISPATCH_SIZE - 1] = &&op_default,
        [P_MOV_RM_R64] = &&op_P_MOV_RM_R64,
        [P_MOV_RM_R32] = &&op_P_MOV_RM_R32,
        [P_MOV_R_RM64] = &&op_P_MOV_R_RM64,
        [P_MOV_R_RM32] = &&op_P_MOV_R_RM32,
        [P_LOAD64] = &&op_P_LOAD64,
        [P_LOAD32] = &&op_P_LOAD32,
        [P_STORE64] = &&op_P_STORE64,
        [P_STORE32] = &&op_P_STORE32,
        [P_ALU_RR64] = &&op_P_ALU_RR64,
        [P_ALU_RR32] = &&op_P_ALU_RR32,
        [P_ALU_RI64] = &&op_P_ALU_RI64,
        [P_ALU_RI32] = &&op_P_ALU_RI32,
        [P_SHIFT_RI64] = &&op_P_SHIFT_RI64,
        [P_SHIFT_RI32] = &&op_P_SHIFT_RI32,
        [P_LEA64] = &&op_P_LEA64,
        [P_TEST_RR64] = &&op_P_TEST_RR64,
        [P_TEST_RR32] = &&op_P_TEST_RR32,
        [P_LOAD_ALU64] = &&op_P_LOAD_ALU64,
        [P_LOAD_ALU32] = &&op_P_LOAD_ALU32,
        [P_ADD_RR64] = &&op_P_ADD_RR64,
        [P_OR_RR64] = &&op_P_OR_RR64,
        [P_AND_RR64] = &&op_P_AND_RR64,
        [P_SUB_RR64] = &&op_P_SUB_RR64,
        [P_XOR_RR64] = &&op_P_XOR_RR64,
        [P_CMP_RR64] = &&op_P_CMP_RR64,
        [P_ADD_RR32] = &&op_P_ADD_RR32,
        [P_OR_RR32] = &&op_P_OR_RR32,
        [P_AND_RR32] = &&op_P_AND_RR32,
        [P_SUB_RR32] = &&op_P_SUB_RR32,
        [P_XOR_RR32] = &&op_P_XOR_RR32,
        [P_CMP_RR32] = &&op_P_CMP_RR32,
        [P_ADD_RI64] = &&op_P_ADD_RI64,
        [P_OR_RI64] = &&op_P_OR_RI64,
        [P_AND_RI64] = &&op_P_AND_RI64,
        [P_SUB_RI64] = &&op_P_SUB_RI64,
        [P_XOR_RI64] = &&op_P_XOR_RI64,
        [P_CMP_RI64] = &&op_P_CMP_RI64,
        [P_ADD_RI32] = &&op_P_ADD_RI32,
        [P_OR_RI32] = &&op_P_OR_RI32,
        [P_AND_RI32] = &&op_P_AND_RI32,
        [P_SUB_RI32] = &&op_P_SUB_RI32,
        [P_XOR_RI32] = &&op_P_XOR_RI32,
        [P_CMP_RI32] = &&op_P_CMP_RI32,
        [0x00] = &&op_0x00,
        [0x08] = &&op_0x08,
        [0x10] = &&op_0x10,
        [0x18] = &&op_0x18,
        [0x20] = &&op_0x20,
        [0x28] = &&op_0x28,
        [0x30] = &&op_0x30,
        [0x38] = &&op_0x38,
        [0x01] = &&op_0x01,
        [0x09] = &&op_0x09,
        [0x11] = &&op_0x11,
        [0x19] = &&op_0x19,
        [0x21] = &&op_0x21,
        [0x29] = &&op_0x29,
        [0x31] = &&op_0x31,
        [0x39] = &&op_0x39,
        [0x02] = &&op_0x02,
        [0x0a] = &&op_0x0a,
        [0x12] = &&op_0x12,
        [0x1a] = &&op_0x1a,
        [0x22] = &&op_0x22,
        [0x2a] = &&op_0x2a,
        [0x32] = &&op_0x32,
        [0x3a] = &&op_0x3a,
        [0x03] = &&op_0x03,
        [0x0b] = &&op_0x0b,
        [0x13] = &&op_0x13,
        [0x1b] = &&op_0x1b,
        [0x23] = &&op_0x23,
        [0x2b] = &&op_0x2b,
        [0x33] = &&op_0x33,
        [0x3b] = &&op_0x3b,
        [0x04] = &&op_0x04,
        [0x0c] = &&op_0x0c,
        [0x14] = &&op_0x14,
        [0x1c] = &&op_0x1c,
        [0x24] = &&op_0x24,
        [0x2c] = &&op_0x2c,
        [0x34] = &&op_0x34,
        [0x3c] = &&op_0x3c,
        [0x05] = &&op_0x05,
        [0x0d] = &&op_0x0d,
        [0x15] = &&op_0x15,
        [0x1d] = &&op_0x1d,
        [0x25] = &&op_0x25,
        [0x2d] = &&op_0x2d,
        [0x35] = &&op_0x35,
        [0x3d] = &&op_0x3d,
        [0x06] = &&op_0x06,
        [0x0e] = &&op_0x0e,
        [0x16] = &&op_0x16,
        [0x1e] = &&op_0x1e,
        [0x07] = &&op_0x07,
        [0x17] = &&op_0x17,
        [0x1f] = &&op_0x1f,
        [0x40] = &&op_0x40,
        [0x41] = &&op_0x41,
        [0x42] = &&op_0x42,
        [0x43] = &&op_0x43,
        [0x44] = &&op_0x44,
        [0x45] = &&op_0x45,
        [0x46] = &&op_0x46,
        [0x47] = &&op_0x47,
        [0x48] = &&op_0x48,
        [0x49] = &&op_0x49,
        [0x4a] = &&op_0x4a,
        [0x4b] = &&op_0x4b,
        [0x4c] = &&op_0x4c,
        [0x4d] = &&op_0x4d,
        [0x4e] = &&op_0x4e,
        [0x4f] = &&op_0x4f,
        [0x50] = &&op_0x50,
        [0x51] = &&op_0x51,
        [0x52] = &&op_0x52,
        [0x53] = &&op_0x53,
        [0x54] = &&op_0x54,
        [0x55] = &&op_0x55,
        [0x56] = &&op_0x56,
        [0x57] = &&op_0x57,
        [0x58] = &&op_0x58,
        [0x59] = &&op_0x59,
        [0x5a] = &&op_0x5a,
        [0x5b] = &&op_0x5b,
        [0x5c] = &&op_0x5c,
        [0x5d] = &&op_0x5d,
        [0x5e] = &&op_0x5e,
        [0x5f] = &&op_0x5f,
        [0x60] = &&op_0x60,
        [0x61] = &&op_0x61,
        [0x63] = &&op_0x63,
        [0x68] = &&op_0x68,
        [0x6a] = &&op_0x6a,
        [0x69] = &&op_0x69,
        [0x6b] = &&op_0x6b,
        [0x1af] = &&op_0x1af,
        [0x6c] = &&op_0x6c,
        [0x6d] = &&op_0x6d,
        [0x6e] = &&op_0x6e,
        [0x6f] = &&op_0x6f,
        [0x70] = &&op_0x70,
        [0x71] = &&op_0x71,
        [0x72] = &&op_0x72,
        [0x73] = &&op_0x73,
        [0x74] = &&op_0x74,
        [0x75] = &&op_0x75,
        [0x76] = &&op_0x76,
        [0x77] = &&op_0x77,
        [0x78] = &&op_0x78,
        [0x79] = &&op_0x79,
        [0x7a] = &&op_0x7a,
        [0x7b] = &&op_0x7b,
        [0x7c] = &&op_0x7c,
        [0x7d] = &&op_0x7d,
        [0x7e] = &&op_0x7e,
        [0x7f] = &&op_0x7f,
        [0x180] = &&op_0x180,
        [0x181] = &&op_0x181,
        [0x182] = &&op_0x182,
        [0x183] = &&op_0x183,
        [0x184] = &&op_0x184,
        [0x185] = &&op_0x185,
        [0x186] = &&op_0x186,
        [0x187] = &&op_0x187,
        [0x188] = &&op_0x188,
        [0x189] = &&op_0x189,
        [0x18a] = &&op_0x18a,
        [0x18b] = &&op_0x18b,
        [0x18c] = &&op_0x18c,
        [0x18d] = &&op_0x18d,
        [0x18e] = &&op_0x18e,
        [0x18f] = &&op_0x18f,
        [0x80] = &&op_0x80,
        [0x82] = &&op_0x82,
        [0x81] = &&op_0x81,
        [0x83] = &&op_0x83,
        [0x84] = &&op_0x84,
        [0x85] = &&op_0x85,
        [0x86] = &&op_0x86,
        [0x87] = &&op_0x87,
        [0x88] = &&op_0x88,
        [0x89] = &&op_0x89,
        [0x8a] = &&op_0x8a,
        [0x8b] = &&op_0x8b,
        [0x8c] = &&op_0x8c,
        [0x8d] = &&op_0x8d,
        [0x8e] = &&op_0x8e,
        [0x8f] = &&op_0x8f,
        [0x90] = &&op_0x90,
        [0x91] = &&op_0x91,
        [0x92] = &&op_0x92,
        [0x93] = &&op_0x93,
        [0x94] = &&op_0x94,
        [0x95] = &&op_0x95,
        [0x96] = &&op_0x96,
        [0x97] = &&op_0x97,
        [0x98] = &&op_0x98,
        [0x99] = &&op_0x99,
        [0x9a] = &&op_0x9a,
        [0x9b] = &&op_0x9b,
        [0x9c] = &&op_0x9c,
        [0x9d] = &&op_0x9d,
        [0x9e] = &&op_0x9e,
        [0x9f] = &&op_0x9f,
        [0xa0] = &&op_0xa0,
        [0xa1] = &&op_0xa1,
        [0xa2] = &&op_0xa2,
        [0xa3] = &&op_0xa3,
        [0xa4] = &&op_0xa4,
        [0xa5] = &&op_0xa5,
        [0xa6] = &&op_0xa6,
        [0xa7] = &&op_0xa7,
        [0xaa] = &&op_0xaa,
        [0xab] = &&op_0xab,
        [0xac] = &&op_0xac,
        [0xad] = &&op_0xad,
        [0xae] = &&op_0xae,
        [0xaf] = &&op_0xaf,
        [0xa8] = &&op_0xa8,
        [0xa9] = &&op_0xa9,
        [0xb0] = &&op_0xb0,
        [0xb1] = &&op_0xb1,
        [0xb2] = &&op_0xb2,
        [0xb3] = &&op_0xb3,
        [0xb4] = &&op_0xb4,
        [0xb5] = &&op_0xb5,
        [0xb6] = &&op_0xb6,
        [0xb7] = &&op_0xb7,
        [0xb8] = &&op_0xb8,
        [0xb9] = &&op_0xb9,
        [0xba] = &&op_0xba,
        [0xbb] = &&op_0xbb,
        [0xbc] = &&op_0xbc,
        [0xbd] = &&op_0xbd,
        [0xbe] = &&op_0xbe,
        [0xbf] = &&op_0xbf,
        [0xc0] = &&op_0xc0,
        [0xc1] = &&op_0xc1,
        [0xd0] = &&op_0xd0,
        [0xd1] = &&op_0xd1,
        [0xd2] = &&op_0xd2,
        [0xd3] = &&op_0xd3,
        [0xc2] = &&op_0xc2,
        [0xc3] = &&op_0xc3,
        [0xc4] = &&op_0xc4,
        [0xc5] = &&op_0xc5,
        [0xc6] = &&op_0xc6,
        [0xc7] = &&op_0xc7,
        [0xc8] = &&op_0xc8,
        [0xc9] = &&op_0xc9,
        [0xca] = &&op_0xca,
        [0xcb] = &&op_0xcb,
        [0xcc] = &&op_0xcc,
        [0xcd] = &&op_0xcd,
        [0xce] = &&op_0xce,
        [0xf1] = &&op_0xf1,
        [0xcf] = &&op_0xcf,
        [0xd4] = &&op_0xd4,
        [0xd5] = &&op_0xd5,
        [0xd6] = &&op_0xd6,
        [0xd7] = &&op_0xd7,
        [0xd8] = &&op_0xd8,
        [0xd9] = &&op_0xd9,
        [0xda] = &&op_0xda,
        [0xdb] = &&op_0xdb,
        [0xdc] = &&op_0xdc,
        [0xdd] = &&op_0xdd,
        [0xde] = &&op_0xde,
        [0xdf] = &&op_0xdf,
        [0xe0] = &&op_0xe0,
        [0xe1] = &&op_0xe1,
        [0xe2] = &&op_0xe2,
        [0xe3] = &&op_0xe3,
        [0xe4] = &&op_0xe4,
        [0xe5] = &&op_0xe5,
        [0xec] = &&op_0xec,
        [0xed] = &&op_0xed,
        [0xe6] = &&op_0xe6,
        [0xe7] = &&op_0xe7,
        [0xee] = &&op_0xee,
        [0xef] = &&op_0xef,
        [0xe8] = &&op_0xe8,
        [0xe9] = &&op_0xe9,
        [0xeb] = &&op_0xeb,
        [0xea] = &&op_0xea,
        [0xf4] = &&op_0xf4,
        [0xf5] = &&op_0xf5,
        [0xf6] = &&op_0xf6,
        [0xf7] = &&op_0xf7,
        [0xf8] = &&op_0xf8,
        [0xf9] = &&op_0xf9,
        [0xfa] = &&op_0xfa,
        [0xfb] = &&op_0xfb,
        [0xfc] = &&op_0xfc,
        [0xfd] = &&op_0xfd,
        [0xfe] = &&op_0xfe,
        [0xff] = &&op_0xff,
        [0x100] = &&op_0x100,
        [0x102] = &&op_0x102,
        [0x103] = &&op_0x103,
        [0x101] = &&op_0x101,
        [0x105] = &&op_0x105,
        [0x106] = &&op_0x106,
        [0x107] = &&op_0x107,
        [0x108] = &&op_0x108,
        [0x109] = &&op_0x109,
        [0x10b] = &&op_0x10b,
        [0x10d] = &&op_0x10d,
        [0x118] = &&op_0x118,
        [0x119] = &&op_0x119,
        [0x11a] = &&op_0x11a,
        [0x11b] = &&op_0x11b,
        [0x11c] = &&op_0x11c,
        [0x11d] = &&op_0x11d,
        [0x11e] = &&op_0x11e,
        [0x11f] = &&op_0x11f,
        [0x120] = &&op_0x120,
        [0x122] = &&op_0x122,
        [0x121] = &&op_0x121,
        [0x123] = &&op_0x123,
        [0x130] = &&op_0x130,
        [0x131] = &&op_0x131,
        [0x132] = &&op_0x132,
        [0x140] = &&op_0x140,
        [0x141] = &&op_0x141,
        [0x142] = &&op_0x142,
        [0x143] = &&op_0x143,
        [0x144] = &&op_0x144,
        [0x145] = &&op_0x145,
        [0x146] = &&op_0x146,
        [0x147] = &&op_0x147,
        [0x148] = &&op_0x148,
        [0x149] = &&op_0x149,
        [0x14a] = &&op_0x14a,
        [0x14b] = &&op_0x14b,
        [0x14c] = &&op_0x14c,
        [0x14d] = &&op_0x14d,
        [0x14e] = &&op_0x14e,
        [0x14f] = &&op_0x14f,
        [0x190] = &&op_0x190,
        [0x191] = &&op_0x191,
        [0x192] = &&op_0x192,
        [0x193] = &&op_0x193,
        [0x194] = &&op_0x194,
        [0x195] = &&op_0x195,
        [0x196] = &&op_0x196,
        [0x197] = &&op_0x197,
        [0x198] = &&op_0x198,
        [0x199] = &&op_0x199,
        [0x19a] = &&op_0x19a,
        [0x19b] = &&op_0x19b,
        [0x19c] = &&op_0x19c,
        [0x19d] = &&op_0x19d,
        [0x19e] = &&op_0x19e,
        [0x19f] = &&op_0x19f,
        [0x1a0] = &&op_0x1a0,
        [0x1a8] = &&op_0x1a8,
        [0x1a1] = &&op_0x1a1,
        [0x1a9] = &&op_0x1a9,
        [0x1a2] = &&op_0x1a2,
        [0x1a3] = &&op_0x1a3,
        [0x1ab] = &&op_0x1ab,
        [0x1b3] = &&op_0x1b3,
        [0x1bb] = &&op_0x1bb,
        [0x1ba] = &&op_0x1ba,
        [0x1a4] = &&op_0x1a4,
        [0x1a5] = &&op_0x1a5,
        [0x1ac] = &&op_0x1ac,
        [0x1ad] = &&op_0x1ad,
        [0x1ae] = &&op_0x1ae,
        [0x1b0] = &&op_0x1b0,
        [0x1b1] = &&op_0x1b1,
        [0x1b2] = &&op_0x1b2,
        [0x1b4] = &&op_0x1b4,
        [0x1b5] = &&op_0x1b5,
        [0x1b6] = &&op_0x1b6,
        [0x1b7] = &&op_0x1b7,
        [0x1be] = &&op_0x1be,
        [0x1bf] = &&op_0x1bf,
        [0x1b8] = &&op_0x1b8,
        [0x1bc] = &&op_0x1bc,
        [0x1bd] = &&op_0x1bd,
        [0x1c0] = &&op_0x1c0,
        [0x1c1] = &&op_0x1c1,
        [0x1c7] = &&op_0x1c7,
        [0x1c8] = &&op_0x1c8,
        [0x1c9] = &&op_0x1c9,
        [0x1ca] = &&op_0x1ca,
        [0x1cb] = &&op_0x1cb,
        [0x1cc] = &&op_0x1cc,
        [0x1cd] = &&op_0x1cd,
        [0x1ce] = &&op_0x1ce,
        [0x1cf] = &&op_0x1cf,
        [0x177] = &&op_0x177,
        [OP_UD] = &&op_OP_UD,
        [P_VEX] = &&op_P_VEX,
        [0x2f0] = &&op_0x2f0,
        [0x2f1] = &&op_0x2f1,
        [0x2f6] = &&op_0x2f6,
    };
    int op;
#define PROLOGUE()                                          \
    do {                                                    \
        c->next_rip = (entry_rip + i->end) & ip_wrap;       \
        op = i->op;                                         \
    } while (0)
#define NEXT                                                \
    do {                                                    \
        c->rip = c->next_rip;                               \
        if (unlikely(c->stop_block)) {                      \
            int why = c->stop_block;                        \
            c->stop_block = 0;                              \
            if (why & STOP_REPLAY)                          \
                c->nacc = c->acc_pos = 0;                   \
            if (why & STOP_BLOCK) {                         \
                i++;                                        \
                stopped = 1;                                \
                goto out;                                   \
            }                                               \
        }                                                   \
        if (++i >= end)                                     \
            goto out;                                       \
        PROLOGUE();                                         \
        goto *dispatch[op];                                 \
    } while (0)
    if (i >= end)
        goto out;
    PROLOGUE();
    goto *dispatch[op];
    {
        /* One line per opcode or opcode group, calling its handler: ALU in insn_alu.h,
         * bit instructions in insn_bits.h, shifts in insn_shift.h, data movement in
         * insn_move.h, exchanges in insn_exchange.h, string instructions in
         * insn_string.h, port I/O in insn_io.h, stack in insn_stack.h, control flow in
         * insn_control.h, system in insn_system.h, x87/SSE in insn_fpu.h. The lines keep
         * the (roughly opcode) order the code had before the split, because the order
         * is the code's layout and it matters: the same lines grouped by kind ran about
         * 4% slower on bench/tcg.py's compute guest. */
        op_0x00: op_0x08: op_0x10: op_0x18: op_0x20: op_0x28: op_0x30: op_0x38:
            alu_rm_reg(c, i, op >> 3, 1); NEXT;
        op_0x01: op_0x09: op_0x11: op_0x19: op_0x21: op_0x29: op_0x31: op_0x39:
            alu_rm_reg(c, i, op >> 3, i->osz); NEXT;
        op_0x02: op_0x0a: op_0x12: op_0x1a: op_0x22: op_0x2a: op_0x32: op_0x3a:
            alu_reg_rm(c, i, op >> 3, 1); NEXT;
        op_0x03: op_0x0b: op_0x13: op_0x1b: op_0x23: op_0x2b: op_0x33: op_0x3b:
            alu_reg_rm(c, i, op >> 3, i->osz); NEXT;
        op_0x04: op_0x0c: op_0x14: op_0x1c: op_0x24: op_0x2c: op_0x34: op_0x3c:
            alu_acc_imm(c, i, op >> 3, 1); NEXT;
        op_0x05: op_0x0d: op_0x15: op_0x1d: op_0x25: op_0x2d: op_0x35: op_0x3d:
            alu_acc_imm(c, i, op >> 3, i->osz); NEXT;
        op_0x06: op_0x0e: op_0x16: op_0x1e: push_seg(c, i, op >> 3); NEXT;
        op_0x07: op_0x17: op_0x1f: pop_seg(c, i, op >> 3); NEXT;
        op_0x40: op_0x41: op_0x42: op_0x43: op_0x44: op_0x45: op_0x46: op_0x47:
            inc_dec_reg(c, i, op & 7, 1); NEXT;
        op_0x48: op_0x49: op_0x4a: op_0x4b: op_0x4c: op_0x4d: op_0x4e: op_0x4f:
            inc_dec_reg(c, i, op & 7, 0); NEXT;
        op_0x50: op_0x51: op_0x52: op_0x53: op_0x54: op_0x55: op_0x56: op_0x57: push_reg(c, i); NEXT;
        op_0x58: op_0x59: op_0x5a: op_0x5b: op_0x5c: op_0x5d: op_0x5e: op_0x5f: pop_reg(c, i); NEXT;
        op_0x60: pusha(c, i); NEXT;
        op_0x61: popa(c, i); NEXT;
        op_0x63: movsxd(c, i); NEXT;
        op_0x68: op_0x6a: push_imm(c, i); NEXT;
        op_0x69: op_0x6b: op_0x1af: imul_reg_rm(c, i, op); NEXT;
        op_0x6c: op_0x6d: op_0x6e: op_0x6f: string_io(c, i); NEXT;
        op_0x70: op_0x71: op_0x72: op_0x73: op_0x74: op_0x75: op_0x76: op_0x77:
        op_0x78: op_0x79: op_0x7a: op_0x7b: op_0x7c: op_0x7d: op_0x7e: op_0x7f:
            jump_if(c, i, op & 15); NEXT;
        op_0x180: op_0x181: op_0x182: op_0x183: op_0x184: op_0x185: op_0x186: op_0x187:
        op_0x188: op_0x189: op_0x18a: op_0x18b: op_0x18c: op_0x18d: op_0x18e: op_0x18f:
            jump_if(c, i, op & 15); NEXT;
        op_0x80: op_0x82: alu_rm_imm(c, i, 1); NEXT;
        op_0x81: op_0x83: alu_rm_imm(c, i, i->osz); NEXT;
        op_0x84: test_rm_reg(c, i, 1); NEXT;
        op_0x85: test_rm_reg(c, i, i->osz); NEXT;
        op_0x86: xchg_rm_reg(c, i, 1); NEXT;
        op_0x87: xchg_rm_reg(c, i, i->osz); NEXT;
        op_0x88: mov_rm_reg(c, i, 1); NEXT;
        op_0x89: mov_rm_reg(c, i, i->osz); NEXT;
        op_0x8a: mov_reg_rm(c, i, 1); NEXT;
        op_0x8b: mov_reg_rm(c, i, i->osz); NEXT;
        op_0x8c: mov_rm_sreg(c, i); NEXT;
        op_0x8d: lea(c, i); NEXT;
        op_0x8e: mov_sreg_rm(c, i); NEXT;
        op_0x8f: pop_rm(c, i); NEXT;
        op_0x90: nop_or_xchg(c, i); NEXT;
        op_0x91: op_0x92: op_0x93: op_0x94: op_0x95: op_0x96: op_0x97: xchg_acc_reg(c, i); NEXT;
        op_0x98: sign_extend_acc(c, i); NEXT;
        op_0x99: sign_fill_dx(c, i); NEXT;
        op_0x9a: far_jump_imm(c, i, 1); NEXT;
        op_0x9b: x87_fwait(c); NEXT;
        op_0x9c: pushf(c, i); NEXT;
        op_0x9d: popf(c, i); NEXT;
        op_0x9e: sahf(c); NEXT;
        op_0x9f: lahf(c, i); NEXT;
        op_0xa0: mov_acc_moffs(c, i, 1); NEXT;
        op_0xa1: mov_acc_moffs(c, i, i->osz); NEXT;
        op_0xa2: mov_moffs_acc(c, i, 1); NEXT;
        op_0xa3: mov_moffs_acc(c, i, i->osz); NEXT;
        op_0xa4: op_0xa5: op_0xa6: op_0xa7: op_0xaa: op_0xab: op_0xac: op_0xad: op_0xae: op_0xaf:
            string_op(c, i); NEXT;
        op_0xa8: test_acc_imm(c, i, 1); NEXT;
        op_0xa9: test_acc_imm(c, i, i->osz); NEXT;
        op_0xb0: op_0xb1: op_0xb2: op_0xb3: op_0xb4: op_0xb5: op_0xb6: op_0xb7:
            mov_reg_imm(c, i, 1); NEXT;
        op_0xb8: op_0xb9: op_0xba: op_0xbb: op_0xbc: op_0xbd: op_0xbe: op_0xbf:
            mov_reg_imm(c, i, i->osz); NEXT;
        op_0xc0: op_0xc1: op_0xd0: op_0xd1: op_0xd2: op_0xd3: shift_group2(c, i, op); NEXT;
        op_0xc2: op_0xc3: ret_near(c, i, op); NEXT;
        op_0xc4: load_far_ptr(c, i, S_ES); NEXT;
        op_0xc5: load_far_ptr(c, i, S_DS); NEXT;
        op_0xc6: mov_rm_imm(c, i, 1); NEXT;
        op_0xc7: mov_rm_imm(c, i, i->osz); NEXT;
        op_0xc8: enter(c, i); NEXT;
        op_0xc9: leave(c, i); NEXT;
        op_0xca: op_0xcb: far_ret(c, i, op); NEXT;
        op_0xcc: op_0xcd: op_0xce: op_0xf1: soft_interrupt(c, i, op); NEXT;
        op_0xcf: do_iret(c, i->osz); NEXT;
        op_0xd4: aam(c, i); NEXT;
        op_0xd5: aad(c, i); NEXT;
        op_0xd6: salc(c, i); NEXT;
        op_0xd7: xlat(c, i); NEXT;
        op_0xd8: op_0xd9: op_0xda: op_0xdb: op_0xdc: op_0xdd: op_0xde: op_0xdf: x87_exec(c, i); NEXT;
        op_0xe0: op_0xe1: op_0xe2: loop_cx(c, i, op); NEXT;
        op_0xe3: jump_if_cx_zero(c, i); NEXT;
        op_0xe4: op_0xe5: op_0xec: op_0xed: in_acc(c, i, op); NEXT;
        op_0xe6: op_0xe7: op_0xee: op_0xef: out_acc(c, i, op); NEXT;
        op_0xe8: call_rel(c, i); NEXT;
        op_0xe9: op_0xeb: jump_rel(c, i); NEXT;
        op_0xea: far_jump_imm(c, i, 0); NEXT;
        op_0xf4: hlt(c); NEXT;
        op_0xf5: cmc(c); NEXT;
        op_0xf6: alu_group3(c, i, 1); NEXT;
        op_0xf7: alu_group3(c, i, i->osz); NEXT;
        op_0xf8: clc(c); NEXT;
        op_0xf9: stc(c); NEXT;
        op_0xfa: cli(c); NEXT;
        op_0xfb: sti(c); NEXT;
        op_0xfc: cld(c); NEXT;
        op_0xfd: std(c); NEXT;
        op_0xfe: op_0xff: group4_5(c, i, op); NEXT;
        op_0x100: system_group6(c, i); NEXT;
        op_0x102: op_0x103: lar_lsl(c, i, op == 0x103); NEXT;
        op_0x101: system_group7(c, i); NEXT;
        op_0x105: do_syscall(c); NEXT;
        op_0x106: clts(c); NEXT;
        op_0x107: do_sysret(c, i->osz); NEXT;
        op_0x108: op_0x109: flush_caches(c); NEXT;
        op_0x10b: UD(); NEXT;
        op_0x10d: op_0x118: op_0x119: op_0x11a: op_0x11b: op_0x11c: op_0x11d: op_0x11e: op_0x11f:
            NEXT;   /* prefetch / hint nops */
        op_0x120: mov_from_cr(c, i); NEXT;
        op_0x122: mov_to_cr(c, i); NEXT;
        op_0x121: mov_from_dr(c, i); NEXT;
        op_0x123: mov_to_dr(c, i); NEXT;
        op_0x130: wrmsr(c); NEXT;
        op_0x131: rdtsc(c); NEXT;
        op_0x132: rdmsr(c); NEXT;
        op_0x140: op_0x141: op_0x142: op_0x143: op_0x144: op_0x145: op_0x146: op_0x147:
        op_0x148: op_0x149: op_0x14a: op_0x14b: op_0x14c: op_0x14d: op_0x14e: op_0x14f:
            cmov(c, i, op & 15); NEXT;
        op_0x190: op_0x191: op_0x192: op_0x193: op_0x194: op_0x195: op_0x196: op_0x197:
        op_0x198: op_0x199: op_0x19a: op_0x19b: op_0x19c: op_0x19d: op_0x19e: op_0x19f:
            setcc(c, i, op & 15); NEXT;
        op_0x1a0: push_seg(c, i, S_FS); NEXT;
        op_0x1a8: push_seg(c, i, S_GS); NEXT;
        op_0x1a1: pop_seg(c, i, S_FS); NEXT;
        op_0x1a9: pop_seg(c, i, S_GS); NEXT;
        op_0x1a2: do_cpuid(c); NEXT;
        op_0x1a3: bit_test_reg(c, i, 0); NEXT;
        op_0x1ab: bit_test_reg(c, i, 1); NEXT;
        op_0x1b3: bit_test_reg(c, i, 2); NEXT;
        op_0x1bb: bit_test_reg(c, i, 3); NEXT;
        op_0x1ba: bit_test_imm(c, i); NEXT;
        op_0x1a4: op_0x1a5: op_0x1ac: op_0x1ad: shift_double(c, i, op); NEXT;
        op_0x1ae: group15(c, i); NEXT;
        op_0x1b0: cmpxchg(c, i, 1); NEXT;
        op_0x1b1: cmpxchg(c, i, i->osz); NEXT;
        op_0x1b2: load_far_ptr(c, i, S_SS); NEXT;
        op_0x1b4: load_far_ptr(c, i, S_FS); NEXT;
        op_0x1b5: load_far_ptr(c, i, S_GS); NEXT;
        op_0x1b6: movzx(c, i, 1); NEXT;
        op_0x1b7: movzx(c, i, 2); NEXT;
        op_0x1be: movsx(c, i, 1); NEXT;
        op_0x1bf: movsx(c, i, 2); NEXT;
        op_0x1b8: popcnt(c, i); NEXT;
        op_0x1bc: op_0x1bd: bit_scan(c, i, op); NEXT;
        op_0x1c0: xadd(c, i, 1); NEXT;
        op_0x1c1: xadd(c, i, i->osz); NEXT;
        op_0x1c7: if (i->mod == 3) rdrand_rdseed(c, i); else exchange_group9(c, i); NEXT;
        op_0x1c8: op_0x1c9: op_0x1ca: op_0x1cb: op_0x1cc: op_0x1cd: op_0x1ce: op_0x1cf:
            bswap(c, i); NEXT;
        op_0x177: emms(c); NEXT;
        op_OP_UD: UD(); NEXT;
        op_P_VEX: vex_bmi(c, i); NEXT;
        op_0x2f0: op_0x2f1: movbe_or_crc32(c, i, op); NEXT;
        op_0x2f6: adx(c, i); NEXT;

        /* the decoder's specialised forms (specialize() in decode.c) */
        op_P_MOV_RM_R64: mov_rr64(c, i->rm, i->reg); NEXT;
        op_P_MOV_RM_R32: mov_rr32(c, i->rm, i->reg); NEXT;
        op_P_MOV_R_RM64: mov_rr64(c, i->reg, i->rm); NEXT;
        op_P_MOV_R_RM32: mov_rr32(c, i->reg, i->rm); NEXT;
        op_P_LOAD64: load64(c, i); NEXT;
        op_P_LOAD32: load32(c, i); NEXT;
        op_P_STORE64: store64(c, i); NEXT;
        op_P_STORE32: store32(c, i); NEXT;
        op_P_ALU_RR64: alu_rr64(c, i, (int)i->imm2); NEXT;
        op_P_ALU_RR32: alu_rr32(c, i, (int)i->imm2); NEXT;
        op_P_ALU_RI64: alu_ri64(c, i, (int)i->imm2); NEXT;
        op_P_ALU_RI32: alu_ri32(c, i, (int)i->imm2); NEXT;
        /* per-operation ALU forms (P_ALUX): alu() folds to the one operation */
        op_P_ADD_RR64: alu_rr64(c, i, ALU_ADD); NEXT;
        op_P_OR_RR64: alu_rr64(c, i, ALU_OR); NEXT;
        op_P_AND_RR64: alu_rr64(c, i, ALU_AND); NEXT;
        op_P_SUB_RR64: alu_rr64(c, i, ALU_SUB); NEXT;
        op_P_XOR_RR64: alu_rr64(c, i, ALU_XOR); NEXT;
        op_P_CMP_RR64: alu_rr64(c, i, ALU_CMP); NEXT;
        op_P_ADD_RR32: alu_rr32(c, i, ALU_ADD); NEXT;
        op_P_OR_RR32: alu_rr32(c, i, ALU_OR); NEXT;
        op_P_AND_RR32: alu_rr32(c, i, ALU_AND); NEXT;
        op_P_SUB_RR32: alu_rr32(c, i, ALU_SUB); NEXT;
        op_P_XOR_RR32: alu_rr32(c, i, ALU_XOR); NEXT;
        op_P_CMP_RR32: alu_rr32(c, i, ALU_CMP); NEXT;
        op_P_ADD_RI64: alu_ri64(c, i, ALU_ADD); NEXT;
        op_P_OR_RI64: alu_ri64(c, i, ALU_OR); NEXT;
        op_P_AND_RI64: alu_ri64(c, i, ALU_AND); NEXT;
        op_P_SUB_RI64: alu_ri64(c, i, ALU_SUB); NEXT;
        op_P_XOR_RI64: alu_ri64(c, i, ALU_XOR); NEXT;
        op_P_CMP_RI64: alu_ri64(c, i, ALU_CMP); NEXT;
        op_P_ADD_RI32: alu_ri32(c, i, ALU_ADD); NEXT;
        op_P_OR_RI32: alu_ri32(c, i, ALU_OR); NEXT;
        op_P_AND_RI32: alu_ri32(c, i, ALU_AND); NEXT;
        op_P_SUB_RI32: alu_ri32(c, i, ALU_SUB); NEXT;
        op_P_XOR_RI32: alu_ri32(c, i, ALU_XOR); NEXT;
        op_P_CMP_RI32: alu_ri32(c, i, ALU_CMP); NEXT;
        op_P_LOAD_ALU64: load_alu64(c, i); NEXT;
        op_P_LOAD_ALU32: load_alu32(c, i); NEXT;
        op_P_SHIFT_RI64: shift_ri64(c, i); NEXT;
        op_P_SHIFT_RI32: shift_ri32(c, i); NEXT;
        op_P_LEA64: lea64(c, i); NEXT;
        op_P_TEST_RR64: test_rr64(c, i); NEXT;
        op_P_TEST_RR32: test_rr32(c, i); NEXT;
        op_default: sse_or_ud(c, i, op); NEXT;
    }
out:
#undef NEXT
#undef PROLOGUE
    if (single)
        return stopped ? 0 : b;
    c->st_insns += i - b->insns;
chain_next:
    /* Block chaining: the successor is taken from b's links (see next_block) without
     * returning to cpu_run, whose per-block work (call, checks, lookup) costs about
     * as much as a short block. Links that miss or need translating go through cpu_run. */
    if (likely(--chain > 0 && chain_ok(c))) {
        uint64_t pc = c->rip, csb = c->seg[S_CS].base;
        uint32_t mode = c->code_mode;
        Block *n = b->link[0];
        if (!(likely(n && block_fits(c, n, pc, csb, mode)))) {
            n = b->link[1];
            if (!(n && block_fits(c, n, pc, csb, mode)))
                n = 0;
        }
        if (n) {
            /* a direct exit of native code that found a compiled successor: from now
             * on the code jumps there itself (native_chain_fits) */
            if (nat_slot && native_chain_fits(b, n))
                *nat_slot = n;
            nat_slot = 0;
            b = n;
            goto enter;
        }
    }
    c->cur_block = 0;
    return b;
}

static inline Block *exec_block(CPU *c, Block *b)
{
    return exec_insns(c, b, 0);
}

/* native code's helper: one instruction through the interpreter (see native.h) */
_Static_assert(sizeof(((CPU *)0)->st_native_helper_op) / sizeof(uint64_t) == DISPATCH_SIZE,
               "CPU.st_native_helper_op is indexed by dispatch op");

static int native_step(CPU *c, Insn *i, uint64_t rip)
{
    c->rip = rip;
    c->st_native_helper++;
    if (unlikely(c->profiling))
        c->st_native_helper_op[i->op]++;
    return exec_insns(c, c->cur_block, i) == 0;
}
