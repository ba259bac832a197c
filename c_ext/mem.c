/* Guest memory: RAM lookup, page walks, the software TLB, slow paths (page
 * crossing, MMIO, writes into pages holding translated code), and the access log
 * of device accesses (port I/O, MMIO) that become VM exits. The fast paths that
 * fall back to these slow paths are inline in access.h, which this file does not
 * include: it sits below them.
 *
 * Self-modifying code across vCPUs: every TcgVcpu on the same RAM shares one
 * "holds translated code" byte per page (bitmaps keyed by the host mapping).
 * A write that hits such a page on any vCPU clears the byte and queues the
 * page's invalidation on every other vCPU (applied at its next block boundary).
 * Marking a page as code bumps code_epoch; each vCPU drops its TLB write
 * permissions for code pages when it sees a new epoch, so later writes take the
 * slow path where they are seen. A page is marked before its bytes are decoded, so
 * a write that lands after the decode always finds the mark. The remaining window
 * is a writer that has not yet crossed a block boundary since the mark (it still
 * holds a fast write tag): cross-modifying code needs the guest's own
 * synchronisation on hardware too, and that synchronisation (an IPI, a serialising
 * instruction after a flag) takes longer than one block.
 *
 * Shared between vCPU threads: the code bytes (atomic byte accesses), the registry
 * and every CPU's RAM list as the registry sees it (registry_lock), page-table
 * entries (accessed/dirty bits are set with compare-and-swap on guest RAM). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include "tcg.h"

_Atomic uint64_t code_epoch;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static CPU *registry[256];
static int nregistry;
static struct { uint8_t *host; uint64_t size; uint8_t *code; int refs; } bitmaps[64];

void ram_registry_lock(void)
{
    pthread_mutex_lock(&registry_lock);
}

void ram_registry_unlock(void)
{
    pthread_mutex_unlock(&registry_lock);
}

void cpu_register(CPU *c)
{
    pthread_mutex_lock(&registry_lock);
    if (nregistry < (int)(sizeof registry / sizeof registry[0]))
        registry[nregistry++] = c;
    pthread_mutex_unlock(&registry_lock);
}

void cpu_unregister(CPU *c)
{
    pthread_mutex_lock(&registry_lock);
    for (int k = 0; k < nregistry; k++)
        if (registry[k] == c) {
            registry[k] = registry[--nregistry];
            break;
        }
    pthread_mutex_unlock(&registry_lock);
}

uint8_t *code_bitmap_get(uint8_t *host, uint64_t size)
{
    uint8_t *code = 0;
    pthread_mutex_lock(&registry_lock);
    int freeslot = -1;
    for (int k = 0; k < (int)(sizeof bitmaps / sizeof bitmaps[0]); k++) {
        if (bitmaps[k].refs && bitmaps[k].host == host && bitmaps[k].size == size) {
            bitmaps[k].refs++;
            code = bitmaps[k].code;
            break;
        }
        if (!bitmaps[k].refs && freeslot < 0)
            freeslot = k;
    }
    if (!code && freeslot >= 0) {
        code = calloc(size >> 12, 1);
        if (code) {
            bitmaps[freeslot].host = host;
            bitmaps[freeslot].size = size;
            bitmaps[freeslot].code = code;
            bitmaps[freeslot].refs = 1;
        }
    }
    pthread_mutex_unlock(&registry_lock);
    return code;
}

void code_bitmap_put(uint8_t *code)
{
    pthread_mutex_lock(&registry_lock);
    for (int k = 0; k < (int)(sizeof bitmaps / sizeof bitmaps[0]); k++)
        if (bitmaps[k].refs && bitmaps[k].code == code) {
            if (--bitmaps[k].refs == 0) {
                free(code);
                bitmaps[k].code = 0;
                bitmaps[k].host = 0;
            }
            break;
        }
    pthread_mutex_unlock(&registry_lock);
}

#define PTE_P 1ull
#define PTE_W 2ull
#define PTE_U 4ull
#define PTE_A 0x20ull
#define PTE_D 0x40ull
#define PTE_PS 0x80ull
#define PTE_G 0x100ull
#define PTE_NX (1ull << 63)
#define PTE_ADDR 0x000ffffffffff000ull

#define PERM_R 1
#define PERM_W 2
#define PERM_X 4

uint8_t *ram_ptr(CPU *c, uint64_t pa, uint64_t len)
{
    for (int k = 0; k < c->nram; k++) {
        RamRegion *r = &c->ram[k];
        if (pa >= r->gpa && pa - r->gpa < r->size && len <= r->size - (pa - r->gpa))
            return r->host + (pa - r->gpa);
    }
    return 0;
}

static RamRegion *ram_region(CPU *c, uint64_t pa)
{
    for (int k = 0; k < c->nram; k++) {
        RamRegion *r = &c->ram[k];
        if (pa >= r->gpa && pa - r->gpa < r->size)
            return r;
    }
    return 0;
}

int ram_readonly(CPU *c, uint64_t pa)
{
    RamRegion *r = ram_region(c, pa);
    return r && r->readonly;
}

static int is_code_page(CPU *c, uint64_t pa)
{
    RamRegion *r = ram_region(c, pa);
    return r && __atomic_load_n(&r->code[(pa - r->gpa) >> 12], __ATOMIC_ACQUIRE);
}

uint64_t phys_ld(CPU *c, uint64_t pa, unsigned size)
{
    uint8_t *h = ram_ptr(c, pa, size);
    uint64_t v = 0;
    if (h)
        memcpy(&v, h, size);
    return v;
}

void phys_st(CPU *c, uint64_t pa, unsigned size, uint64_t v)
{
    uint8_t *h = ram_ptr(c, pa, size);
    if (h && !ram_readonly(c, pa))
        memcpy(h, &v, size);
}

/* e (of c->tlb[m]) is about to be filled: log it unless a tag shows it logged already */
void tlb_log_fill(CPU *c, int m, TlbEnt *e)
{
    if (e->tag_r != TLB_INVALID || e->tag_w != TLB_INVALID || e->tag_x != TLB_INVALID)
        return;
    int n = c->tlb_log_n[m];
    if (n < TLB_LOG_MAX)
        c->tlb_log[m][n] = (uint16_t)(e - c->tlb[m]);
    if (n <= TLB_LOG_MAX)
        c->tlb_log_n[m] = n + 1;
}

static void tlb_drop(TlbEnt *e)
{
    e->tag_r = e->tag_w = e->tag_x = TLB_INVALID;
    e->global = 0;
}

void tlb_flush(CPU *c, int global_too)
{
    for (int m = 0; m < 2; m++) {
        int n = c->tlb_log_n[m], kept = 0;
        if (n <= TLB_LOG_MAX) {
            /* the global entries that stay are logged again, the log stays complete */
            for (int j = 0; j < n; j++) {
                TlbEnt *e = &c->tlb[m][c->tlb_log[m][j]];
                if (!global_too && e->global)
                    c->tlb_log[m][kept++] = c->tlb_log[m][j];
                else
                    tlb_drop(e);
            }
        } else {
            for (int k = 0; k < TLB_SIZE; k++) {
                TlbEnt *e = &c->tlb[m][k];
                if (global_too || !e->global) {
                    tlb_drop(e);
                } else if (e->tag_r != TLB_INVALID || e->tag_w != TLB_INVALID || e->tag_x != TLB_INVALID) {
                    if (kept < TLB_LOG_MAX)
                        c->tlb_log[m][kept] = (uint16_t)k;
                    if (kept <= TLB_LOG_MAX)
                        kept++;
                }
            }
        }
        c->tlb_log_n[m] = kept;
    }
    /* no jump-cache flush: its hits are checked against the TLB (block_fits) */
}

void tlb_flush_page(CPU *c, uint64_t lin)
{
    for (int m = 0; m < 2; m++) {
        TlbEnt *e = &c->tlb[m][(lin >> 12) & (TLB_SIZE - 1)];
        e->tag_r = e->tag_w = e->tag_x = TLB_INVALID;
        e->global = 0;
    }
}

static void __attribute__((noreturn)) page_fault(CPU *c, uint64_t lin, uint32_t err)
{
    c->cr2 = lin;
    RAISE_ERR(c, EXC_PF, err);
}

/* Walk the guest page tables. access: 0 read, 1 write, 2 fetch. On success
 * returns 0 with the physical address and the permissions this privilege
 * level has on the page (PERM_W only once the dirty bit is set). */
static int walk(CPU *c, uint64_t lin, int access, int user, uint64_t *pa_out, int *perm_out,
                int *global_out, int fault)
{
    if (!(c->cr0 & CR0_PG)) {
        *pa_out = c->long64 ? lin : (uint32_t)lin;
        *perm_out = PERM_R | PERM_W | PERM_X;
        *global_out = 0;
        return 0;
    }
    if ((c->efer & EFER_LMA) && (uint64_t)(((int64_t)lin << 16) >> 16) != lin) {
        if (!fault)
            return -1;
        RAISE_ERR(c, EXC_GP, 0);   /* non-canonical (#SS for stack accesses is reported as #GP) */
    }
    int nxe = (c->efer & EFER_NXE) != 0;
    uint32_t err_u = user ? 4 : 0;
    uint32_t err_w = access == 1 ? 2 : 0;
    uint32_t err_i = (access == 2 && nxe) ? 16 : 0;
    uint64_t entries_pa[5];
    uint64_t entries[5];
    int n;
    uint64_t rw, us, nx;
    uint64_t pa;
    uint64_t page_mask;   /* offset bits within the final page */
    int is_pse32 = 0;

restart:
    n = 0;
    rw = 1, us = 1, nx = 0;
    if (c->cr4 & CR4_PAE) {
        uint64_t table;
        int level;
        if (c->efer & EFER_LMA) {
            table = c->cr3 & PTE_ADDR;
            level = 4;
        } else {
            uint64_t pdpte_pa = (c->cr3 & 0xffffffe0ull) + ((lin >> 30) & 3) * 8;
            uint64_t pdpte = phys_ld(c, pdpte_pa, 8);
            if (!(pdpte & PTE_P))
                goto not_present;
            table = pdpte & PTE_ADDR;
            level = 2;
        }
        for (;;) {
            int shift = 12 + 9 * (level - 1);
            uint64_t epa = table + ((lin >> shift) & 511) * 8;
            uint64_t e = phys_ld(c, epa, 8);
            if (!(e & PTE_P))
                goto not_present;
            if ((e & PTE_NX) && !nxe)
                goto reserved;
            entries_pa[n] = epa;
            entries[n++] = e;
            rw &= (e >> 1) & 1;
            us &= (e >> 2) & 1;
            if (e & PTE_NX)
                nx = 1;
            if (level == 1 || ((level == 2 || level == 3) && (e & PTE_PS))) {
                page_mask = (1ull << shift) - 1;
                pa = (e & PTE_ADDR & ~page_mask) | (lin & page_mask);
                break;
            }
            table = e & PTE_ADDR;
            level--;
        }
    } else {
        uint64_t pde_pa = (c->cr3 & 0xfffff000ull) + ((lin >> 22) & 1023) * 4;
        uint64_t pde = phys_ld(c, pde_pa, 4);
        if (!(pde & PTE_P))
            goto not_present;
        entries_pa[n] = pde_pa;
        entries[n++] = pde;
        rw &= (pde >> 1) & 1;
        us &= (pde >> 2) & 1;
        if ((pde & PTE_PS) && (c->cr4 & CR4_PSE)) {
            pa = (pde & 0xffc00000ull) | ((pde & 0x1fe000ull) << 19) | (lin & 0x3fffff);
            is_pse32 = 1;
        } else {
            uint64_t pte_pa = (pde & 0xfffff000ull) + ((lin >> 12) & 1023) * 4;
            uint64_t pte = phys_ld(c, pte_pa, 4);
            if (!(pte & PTE_P))
                goto not_present;
            entries_pa[n] = pte_pa;
            entries[n++] = pte;
            rw &= (pte >> 1) & 1;
            us &= (pte >> 2) & 1;
            pa = (pte & 0xfffff000ull) | (lin & 0xfff);
        }
    }
    (void)is_pse32;
    /* permission check */
    int wp = (c->cr0 & CR0_WP) != 0;
    if (user && !us)
        goto protection;
    if (access == 1 && !rw && (user || wp))
        goto protection;
    if (access == 2 && nx)
        goto protection;
    {
        unsigned esz = (c->cr4 & CR4_PAE) ? 8 : 4;
        for (int k = 0; k < n; k++) {
            uint64_t e = entries[k];
            uint64_t ne = e | PTE_A;
            if (k == n - 1 && access == 1)
                ne |= PTE_D;
            if (ne != e) {
                /* another vCPU may be walking or the guest rewriting this entry right
                 * now: set the bits only if the entry is still the one we walked */
                uint8_t *h = ram_ptr(c, entries_pa[k], esz);
                if (h) {
                    int ok = esz == 8
                        ? __atomic_compare_exchange_n((uint64_t *)h, &e, ne, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)
                        : __atomic_compare_exchange_n((uint32_t *)h, &(uint32_t){ (uint32_t)e },
                                                      (uint32_t)ne, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
                    if (!ok)
                        goto restart;
                }
                entries[k] = ne;
            }
        }
        uint64_t leaf = entries[n - 1];
        int perm = PERM_R;
        if (user && !us)
            perm = 0;
        if ((rw || (!user && !wp)) && (leaf & PTE_D) && perm)
            perm |= PERM_W;
        if (!nx && perm)
            perm |= PERM_X;
        *pa_out = pa;
        *perm_out = perm;
        *global_out = (leaf & PTE_G) && (c->cr4 & CR4_PGE);
        return 0;
    }
not_present:
    if (!fault)
        return -1;
    page_fault(c, lin, err_u | err_w | err_i);
reserved:
    if (!fault)
        return -1;
    page_fault(c, lin, 1 | 8 | err_u | err_w | err_i);
protection:
    if (!fault)
        return -1;
    page_fault(c, lin, 1 | err_u | err_w | err_i);
}

int translate(CPU *c, uint64_t lin, int access, int user, uint64_t *phys, int fault)
{
    int perm, global;
    return walk(c, lin, access, user, phys, &perm, &global, fault);
}

/* Fill the TLB entry for lin at the current privilege; returns the physical address. */
static uint64_t tlb_fill(CPU *c, uint64_t lin, int access)
{
    uint64_t pa;
    int perm, global;
    walk(c, lin, access, c->mmu_idx == 1, &pa, &perm, &global, 1);
    uint64_t page = lin & ~0xfffull;
    TlbEnt *e = &c->tlb[c->mmu_idx][(lin >> 12) & (TLB_SIZE - 1)];
    tlb_log_fill(c, c->mmu_idx, e);
    e->paddr = pa & ~0xfffull;
    e->tag_r = e->tag_w = e->tag_x = TLB_INVALID;
    e->global = global;
    uint8_t *h = ram_ptr(c, e->paddr, 4096);
    if (h) {
        e->addend = (uintptr_t)h - (uintptr_t)page;
        if (perm & PERM_R)
            e->tag_r = page;
        if ((perm & PERM_W) && !is_code_page(c, e->paddr) && !ram_readonly(c, e->paddr))
            e->tag_w = page;
        if (perm & PERM_X)
            e->tag_x = page;
    }
    return pa;
}

void code_page_mark(CPU *c, uint64_t pa)
{
    RamRegion *r = ram_region(c, pa);
    if (!r)
        return;
    uint8_t *flag = &r->code[(pa - r->gpa) >> 12];
    if (!__atomic_load_n(flag, __ATOMIC_ACQUIRE)) {
        if (!__atomic_exchange_n(flag, 1, __ATOMIC_SEQ_CST)) {
            uint64_t old = atomic_fetch_add(&code_epoch, 1);   /* other vCPUs drop their write tags for it */
            /* this vCPU drops them for the page right below: no need for a whole-TLB
             * drop_code_write_tags() on our own marking if we were up to date before */
            if (c->seen_code_epoch == old)
                c->seen_code_epoch = old + 1;
        }
    } else if (c->seen_code_epoch == atomic_load(&code_epoch)) {
        /* Already code, and this vCPU has seen every marking since: whoever set the flag
         * dropped our write tags for the page (here below, or drop_code_write_tags() on
         * its epoch bump) and tlb_fill() gives code pages none, so there is nothing to
         * scan for. Most translations land on pages that hold code already. */
        return;
    }
    uint64_t page = pa & ~0xfffull;
    for (int m = 0; m < 2; m++)
        for (int k = 0; k < TLB_SIZE; k++)
            if (c->tlb[m][k].paddr == page)
                c->tlb[m][k].tag_w = TLB_INVALID;
}

/* A new page became code somewhere: fast writes to code pages must stop here too. */
void drop_code_write_tags(CPU *c)
{
    c->seen_code_epoch = atomic_load(&code_epoch);
    for (int m = 0; m < 2; m++)
        for (int k = 0; k < TLB_SIZE; k++) {
            TlbEnt *e = &c->tlb[m][k];
            if (e->tag_w != TLB_INVALID && is_code_page(c, e->paddr))
                e->tag_w = TLB_INVALID;
        }
}

/* Drop this vCPU's translations from one physical page (no bitmap check). Only the
 * page's list is walked; hash chains lose the invalid blocks lazily (find_block). */
void invalidate_local_blocks(CPU *c, uint64_t pa)
{
    uint64_t page = pa & ~0xfffull;
    unsigned slot = page_list_slot(page);
    int hit = 0;
    Block **pp = &c->page_blocks[slot];
    while (*pp) {
        Block *b = *pp;
        /* the link this list uses: pnext[0] when it is the list of b's first page */
        int k = page_list_slot(b->phys) == slot ? 0 : 1;
        if (b->valid && b->phys != page && b->phys2 != page) {
            pp = &b->pnext[k];
            continue;
        }
        if (b->valid) {
            b->valid = 0;
            hit = 1;
            if (b == c->cur_block)
                c->stop_block |= STOP_BLOCK;
        }
        *pp = b->pnext[k];   /* invalid blocks leave the list (a two-page block: each list in turn) */
    }
    if (hit)
        c->st_invalidations++;
}

/* any thread: queue a range of guest RAM whose translations must go */
void request_invalidate(CPU *c, uint64_t gpa, uint64_t size)
{
    while (atomic_flag_test_and_set_explicit(&c->inval_lock, memory_order_acquire))
        ;
    if (c->ninval < (int)(sizeof c->inval / sizeof c->inval[0])) {
        c->inval[c->ninval].gpa = gpa;
        c->inval[c->ninval].size = size;
        c->ninval++;
    } else {
        c->inval_overflow = 1;
    }
    atomic_flag_clear_explicit(&c->inval_lock, memory_order_release);
    atomic_store(&c->exit_request, 1);
}

/* This vCPU writes a page marked as code: invalidate here and on every other vCPU
 * mapping the same host memory. */
void invalidate_code_page(CPU *c, uint64_t pa)
{
    RamRegion *r = ram_region(c, pa);
    /* one writer clears the mark and tells everybody; concurrent writers of the same
     * page find it clear (their writes are covered by the same invalidation) */
    if (!r || !__atomic_exchange_n(&r->code[(pa - r->gpa) >> 12], 0, __ATOMIC_SEQ_CST))
        return;
    uint64_t page = pa & ~0xfffull;
    invalidate_local_blocks(c, page);
    uint8_t *host = r->host + (page - r->gpa);
    pthread_mutex_lock(&registry_lock);
    for (int k = 0; k < nregistry; k++) {
        CPU *o = registry[k];
        if (o == c)
            continue;
        for (int j = 0; j < o->nram; j++) {
            RamRegion *q = &o->ram[j];
            if (host >= q->host && host < q->host + q->size) {
                request_invalidate(o, q->gpa + (uint64_t)(host - q->host), 4096);
                break;
            }
        }
    }
    pthread_mutex_unlock(&registry_lock);
}

void *atomic_host_slow(CPU *c, uint64_t lin, unsigned size)
{
    if (!c->long64)
        lin = (uint32_t)lin;
    if ((lin & 0xfff) + size > 4096)
        return 0;   /* split lock: rare, and not worth a global lock here */
    uint64_t pa = tlb_fill(c, lin, 1);   /* a write access: faults and the dirty bit like a store */
    uint8_t *h = ram_ptr(c, pa, size);
    if (!h || ram_readonly(c, pa))
        return 0;
    if (is_code_page(c, pa)) {
        invalidate_code_page(c, pa);
        tlb_fill(c, lin, 1);
    }
    return h;
}

static uint64_t access_one(CPU *c, uint64_t lin, unsigned size, int access, int write, uint64_t val)
{
    uint64_t pa = tlb_fill(c, lin, access);
    uint8_t *h = ram_ptr(c, pa, size);
    if (!h || (write && ram_readonly(c, pa)))
        return mmio_access(c, pa, size, write, val);
    if (write) {
        if (is_code_page(c, pa))
            invalidate_code_page(c, pa);
        memcpy(h, &val, size);
        /* now that the page is clean of code, later writes can take the fast path */
        tlb_fill(c, lin, access);
        return 0;
    }
    uint64_t v = 0;
    memcpy(&v, h, size);
    return v;
}

static uint64_t read_slow(CPU *c, uint64_t lin, unsigned size, int fetch)
{
    if (!c->long64)
        lin = (uint32_t)lin;
    if ((lin & 0xfff) + size > 4096) {
        uint64_t v = 0;
        for (unsigned k = 0; k < size; k++) {
            uint64_t a = lin + k;
            if (!c->long64)
                a = (uint32_t)a;
            v |= access_one(c, a, 1, fetch ? 2 : 0, 0, 0) << (8 * k);
        }
        return v;
    }
    return access_one(c, lin, size, fetch ? 2 : 0, 0, 0);
}

static void write_slow(CPU *c, uint64_t lin, unsigned size, uint64_t val)
{
    if (!c->long64)
        lin = (uint32_t)lin;
    if ((lin & 0xfff) + size > 4096) {
        /* translate both pages first so a fault on the second leaves memory untouched */
        uint64_t second = (lin | 0xfff) + 1;
        if (!c->long64)
            second = (uint32_t)second;
        tlb_fill(c, lin, 1);
        tlb_fill(c, second, 1);
        for (unsigned k = 0; k < size; k++) {
            uint64_t a = lin + k;
            if (!c->long64)
                a = (uint32_t)a;
            access_one(c, a, 1, 1, 1, (val >> (8 * k)) & 0xff);
        }
        return;
    }
    access_one(c, lin, size, 1, 1, val);
}

/* The slow paths as the fast paths call them: counted always, timed for --trace profile
 * (a fault longjmps out and goes untimed; its count stays). */
uint64_t mem_read_slow(CPU *c, uint64_t lin, unsigned size, int fetch)
{
    c->st_slow_mem++;
    if (likely(!c->profiling))
        return read_slow(c, lin, size, fetch);
    uint64_t t0 = now_ns();
    uint64_t v = read_slow(c, lin, size, fetch);
    c->st_slow_mem_ns += now_ns() - t0;
    return v;
}

void mem_write_slow(CPU *c, uint64_t lin, unsigned size, uint64_t val)
{
    c->st_slow_mem++;
    if (likely(!c->profiling)) {
        write_slow(c, lin, size, val);
        return;
    }
    uint64_t t0 = now_ns();
    write_slow(c, lin, size, val);
    c->st_slow_mem_ns += now_ns() - t0;
}

/* ---- the access log: device accesses that become VM exits ---- */

/* errmsg = what + rip + the instruction bytes there (as far as they are readable RAM) */
static void error_with_bytes(CPU *c, const char *what)
{
    int n = snprintf(c->errmsg, sizeof c->errmsg, "%s at rip %#llx, bytes:", what, (unsigned long long)c->rip);
    uint64_t lin = linear(c, S_CS, c->rip);
    for (int k = 0; k < 15 && n < (int)sizeof c->errmsg - 4; k++) {
        uint64_t pa;
        if (translate(c, lin + k, 2, c->cpl == 3, &pa, 0) < 0)
            break;
        uint8_t *h = ram_ptr(c, pa, 1);
        if (!h)
            break;
        n += snprintf(c->errmsg + n, sizeof c->errmsg - n, " %02x", *h);
    }
}

static Access *next_access(CPU *c, int kind, uint64_t addr, unsigned size, int write, unsigned count)
{
    if (c->acc_pos < c->nacc) {
        Access *a = &c->acc[c->acc_pos++];
        if (a->kind == kind && a->addr == addr && a->size == size && a->write == write)
            return a;
        /* the replay no longer matches (guest state changed under us): start over */
        c->nacc = c->acc_pos = 0;
    }
    if (c->nacc >= 4) {
        error_with_bytes(c, "more than 4 device accesses in one instruction");
        cpu_exit(c, EXIT_INTERNAL_ERROR);
    }
    Access *a = &c->acc[c->nacc++];
    c->acc_pos = c->nacc;
    a->kind = kind;
    a->addr = addr;
    a->size = size;
    a->write = write;
    a->count = count;
    a->data = count > 1 ? c->iobuf : a->small;
    memset(a->small, 0, sizeof a->small);
    return 0;
}

/* One port or MMIO access of `size` bytes: the value the device gave when the access
 * is replayed after its exit, else the access is logged and the CPU exits (`kind`). */
static uint64_t device_access(CPU *c, int kind, uint64_t addr, unsigned size, int write, uint64_t val)
{
    Access *a = next_access(c, kind, addr, size, write, 1);
    if (a) {
        uint64_t v = 0;
        if (!write)
            memcpy(&v, a->data, size);
        return v;
    }
    a = &c->acc[c->nacc - 1];
    if (write)
        memcpy(a->data, &val, size);
    cpu_exit(c, kind);
}

#define PM_TIMER_HZ 3579545u

/* The PM timer's bytes [offset, offset + size) now, exactly as the model computes
 * them: ticks = (now - origin) * 3.579545 MHz, rounded down, in one clock read. */
static uint64_t pm_timer_read(CPU *c, unsigned offset, unsigned size)
{
    int64_t ns = (int64_t)now_ns() - c->pm_timer_origin_ns;
    uint64_t ticks = ns > 0 ? (uint64_t)((unsigned __int128)(uint64_t)ns * PM_TIMER_HZ / 1000000000u) : 0;
    c->st_pm_timer_reads++;
    return ((ticks & c->pm_timer_mask) >> (8 * offset)) & ((1ull << (8 * size)) - 1);
}

uint64_t io_access(CPU *c, uint16_t port, unsigned size, int write, uint64_t val)
{
    if (!write && c->pm_timer_port && (uint16_t)(port - c->pm_timer_port) + size <= 4)
        return pm_timer_read(c, (uint16_t)(port - c->pm_timer_port), size);
    uint8_t published;
    if (!write && size == 1 && c->port_queue && port_published_read(c->port_queue, port, &published)) {
        c->st_published_reads++;
        return published;
    }
    return device_access(c, EXIT_IO, port, size, write, val);
}

/* Rep string I/O: one exit for `count` elements whose data sits in iobuf. */
Access *io_access_string(CPU *c, uint16_t port, unsigned size, int write, unsigned count, int *fresh)
{
    Access *a = next_access(c, EXIT_IO, port, size, write, count);
    *fresh = a == 0;
    if (a)
        return a;
    return &c->acc[c->nacc - 1];
}

uint64_t mmio_access(CPU *c, uint64_t pa, unsigned size, int write, uint64_t val)
{
    return device_access(c, EXIT_MMIO, pa, size, write, val);
}
