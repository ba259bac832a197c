/* System architecture: exceptions and interrupt delivery (IVT, 32-bit and
 * 64-bit IDT), segment loading, far transfers, iret, syscall/sysret, control
 * registers, MSRs, CPUID. */
#include <x86intrin.h>
#include "tcg.h"
#include "access.h"
#include "flags.h"

void update_mode(CPU *c)
{
    if (!(c->cr0 & CR0_PE))
        c->cpl = 0;
    else if (c->eflags & F_VM)
        c->cpl = 3;
    else
        c->cpl = c->seg[S_CS].dpl;
    if ((c->efer & EFER_LMA) && c->seg[S_CS].l)
        c->code_mode = 2;
    else
        c->code_mode = c->seg[S_CS].db ? 1 : 0;
    c->long64 = c->code_mode == 2;
    c->mmu_idx = c->cpl == 3;
}

/* implicit supervisor accesses (descriptor tables, TSS) */
static uint64_t sys_ld(CPU *c, uint64_t lin, unsigned size)
{
    int saved = c->mmu_idx, saved64 = c->long64;
    c->mmu_idx = 0;
    c->long64 = (c->efer & EFER_LMA) != 0;
    uint64_t v = ld(c, lin, size);
    c->mmu_idx = saved;
    c->long64 = saved64;
    return v;
}

static void sys_st(CPU *c, uint64_t lin, unsigned size, uint64_t v)
{
    int saved = c->mmu_idx, saved64 = c->long64;
    c->mmu_idx = 0;
    c->long64 = (c->efer & EFER_LMA) != 0;
    st(c, lin, size, v);
    c->mmu_idx = saved;
    c->long64 = saved64;
}

void seg_from_desc(Seg *s, uint16_t sel, const uint32_t d[2])
{
    s->sel = sel;
    s->base = (d[0] >> 16) | ((d[1] & 0xff) << 16) | (d[1] & 0xff000000u);
    uint32_t limit = (d[0] & 0xffff) | (d[1] & 0xf0000);
    s->g = (d[1] >> 23) & 1;
    if (s->g)
        limit = (limit << 12) | 0xfff;
    s->limit = limit;
    s->type = (d[1] >> 8) & 0xf;
    s->s = (d[1] >> 12) & 1;
    s->dpl = (d[1] >> 13) & 3;
    s->present = (d[1] >> 15) & 1;
    s->avl = (d[1] >> 20) & 1;
    s->l = (d[1] >> 21) & 1;
    s->db = (d[1] >> 22) & 1;
    s->unusable = 0;
}

/* Reads the 8-byte (or 16-byte when wide) descriptor for sel; -1 when beyond the table limit. */
int read_descriptor(CPU *c, uint16_t sel, uint32_t d[4], int wide)
{
    uint64_t base;
    uint32_t limit;
    if (sel & 4) {
        base = c->seg[S_LDT].base;
        limit = c->seg[S_LDT].limit;
    } else {
        base = c->gdt_base;
        limit = c->gdt_limit;
    }
    uint32_t off = sel & ~7u;
    if (off + (wide ? 15 : 7) > limit)
        return -1;
    uint64_t lo = sys_ld(c, base + off, 8);
    d[0] = (uint32_t)lo;
    d[1] = (uint32_t)(lo >> 32);
    if (wide) {
        uint64_t hi = sys_ld(c, base + off + 8, 8);
        d[2] = (uint32_t)hi;
        d[3] = (uint32_t)(hi >> 32);
    }
    return 0;
}

void load_seg_real(CPU *c, int sreg, uint16_t sel)
{
    Seg *s = &c->seg[sreg];
    s->sel = sel;
    s->base = (uint64_t)sel << 4;
    s->present = 1;
    s->unusable = 0;
    if (c->eflags & F_VM) {
        s->limit = 0xffff;
        s->dpl = 3;
        s->db = 0;
        s->l = 0;
    }
}

void load_seg(CPU *c, int sreg, uint16_t sel)
{
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM)) {
        load_seg_real(c, sreg, sel);
        if (sreg == S_CS)
            update_mode(c);
        return;
    }
    Seg *s = &c->seg[sreg];
    if ((sel & ~3) == 0) {
        if (sreg == S_CS)
            RAISE_ERR(c, EXC_GP, 0);
        if (sreg == S_SS && !(c->long64 && c->cpl != 3))
            RAISE_ERR(c, EXC_GP, 0);
        s->sel = sel;
        s->unusable = 1;
        s->present = 0;
        if (!((c->efer & EFER_LMA) && (sreg == S_FS || sreg == S_GS)))
            s->base = 0;
        if (sreg == S_SS)
            s->dpl = sel & 3;
        return;
    }
    uint32_t d[4];
    if (read_descriptor(c, sel, d, 0) < 0)
        RAISE_ERR(c, EXC_GP, sel & ~3u);
    if (!((d[1] >> 12) & 1))
        RAISE_ERR(c, EXC_GP, sel & ~3u);   /* system descriptor in a data/code register */
    if (!((d[1] >> 15) & 1))
        RAISE_ERR(c, sreg == S_SS ? EXC_SS : EXC_NP, sel & ~3u);
    seg_from_desc(s, sel, d);
    if (sreg == S_CS)
        update_mode(c);
}

static int stack_size(CPU *c)
{
    if (c->long64)
        return 8;
    return c->seg[S_SS].db ? 4 : 2;
}

static void push_v(CPU *c, uint64_t *sp, int size, uint64_t v)
{
    int ss = stack_size(c);
    uint64_t nsp = *sp - size;
    if (ss == 2)
        nsp = (*sp & ~0xffffull) | (uint16_t)nsp;
    else if (ss == 4)
        nsp = (uint32_t)nsp;
    uint64_t off = ss == 2 ? (uint16_t)nsp : nsp;
    st(c, linear(c, S_SS, off), size, v);
    *sp = nsp;
}

static uint64_t pop_v(CPU *c, uint64_t *sp, int size)
{
    int ss = stack_size(c);
    uint64_t off = ss == 2 ? (uint16_t)*sp : (ss == 4 ? (uint32_t)*sp : *sp);
    uint64_t v = ld(c, linear(c, S_SS, off), size);
    uint64_t nsp = *sp + size;
    if (ss == 2)
        nsp = (*sp & ~0xffffull) | (uint16_t)nsp;
    else if (ss == 4)
        nsp = (uint32_t)nsp;
    *sp = nsp;
    return v;
}

void deliver_interrupt(CPU *c, int vec, int soft, uint32_t err, int has_err, uint64_t ret_rip)
{
    uint64_t flags = get_eflags(c);
    if (!(c->cr0 & CR0_PE)) {
        if ((uint32_t)vec * 4 + 3 > c->idt_limit)
            RAISE_ERR(c, EXC_GP, vec * 8 + 2);
        uint32_t ent = (uint32_t)ld(c, (uint32_t)(c->idt_base + vec * 4), 4);
        uint64_t sp = c->r[R_SP];
        push_v(c, &sp, 2, flags);
        push_v(c, &sp, 2, c->seg[S_CS].sel);
        push_v(c, &sp, 2, ret_rip);
        c->r[R_SP] = sp;
        c->eflags &= ~(uint64_t)(F_IF | F_TF | F_AC | F_RF);
        load_seg_real(c, S_CS, ent >> 16);
        c->rip = ent & 0xffff;
        update_mode(c);
        return;
    }
    int lma = (c->efer & EFER_LMA) != 0;
    int gsz = lma ? 16 : 8;
    uint32_t ext = soft ? 0 : 1;
    if ((uint32_t)vec * gsz + gsz - 1 > c->idt_limit)
        RAISE_ERR(c, EXC_GP, vec * 8 + 2 + ext);
    uint64_t g0 = sys_ld(c, c->idt_base + vec * gsz, 8);
    uint64_t g1 = lma ? sys_ld(c, c->idt_base + vec * gsz + 8, 8) : 0;
    int type = (g0 >> 40) & 0xf;
    int gdpl = (g0 >> 45) & 3;
    int present = (g0 >> 47) & 1;
    uint64_t target = (g0 & 0xffff) | ((g0 >> 32) & 0xffff0000ull);
    if (lma)
        target |= (g1 & 0xffffffffull) << 32;
    uint16_t tsel = (g0 >> 16) & 0xffff;
    int ist = lma ? (g0 >> 32) & 7 : 0;
    if (soft && gdpl < c->cpl)
        RAISE_ERR(c, EXC_GP, vec * 8 + 2);
    if (!present)
        RAISE_ERR(c, EXC_NP, vec * 8 + 2 + ext);
    int is32 = type == 0xe || type == 0xf;
    if (!(type == 0xe || type == 0xf || (!lma && (type == 6 || type == 7))))
        RAISE_ERR(c, EXC_GP, vec * 8 + 2 + ext);   /* task gates unsupported */
    int trap = (type & 1) != 0;
    uint32_t d[4];
    if ((tsel & ~3) == 0 || read_descriptor(c, tsel, d, 0) < 0)
        RAISE_ERR(c, EXC_GP, (tsel & ~3u) + ext);
    Seg ncs;
    seg_from_desc(&ncs, tsel, d);
    if (!ncs.s || !(ncs.type & 8))
        RAISE_ERR(c, EXC_GP, (tsel & ~3u) + ext);
    if (!ncs.present)
        RAISE_ERR(c, EXC_NP, (tsel & ~3u) + ext);
    int ncpl = (ncs.type & 4) ? c->cpl : ncs.dpl;   /* conforming keeps CPL */
    uint64_t old_ss = c->seg[S_SS].sel, old_sp = c->r[R_SP];
    uint64_t tss = c->seg[S_TR].base;

    if (lma) {
        uint64_t sp;
        if (ist)
            sp = sys_ld(c, tss + 0x24 + 8 * (ist - 1), 8);
        else if (ncpl < c->cpl)
            sp = sys_ld(c, tss + 4 + 8 * ncpl, 8);
        else
            sp = c->r[R_SP];
        sp &= ~0xfull;
        int saved_idx = c->mmu_idx, saved64 = c->long64;
        c->mmu_idx = ncpl == 3;
        c->long64 = 1;
        push_v(c, &sp, 8, old_ss);
        push_v(c, &sp, 8, old_sp);
        push_v(c, &sp, 8, flags);
        push_v(c, &sp, 8, c->seg[S_CS].sel);
        push_v(c, &sp, 8, ret_rip);
        if (has_err)
            push_v(c, &sp, 8, err);
        c->mmu_idx = saved_idx;
        c->long64 = saved64;
        if (ncpl < c->cpl) {
            Seg *ss = &c->seg[S_SS];
            memset(ss, 0, sizeof *ss);
            ss->sel = ncpl;
            ss->unusable = 1;
            ss->dpl = ncpl;
            ss->type = 3;
            ss->s = 1;
        }
        c->r[R_SP] = sp;
        ncs.sel = (tsel & ~3) | ncpl;
        c->seg[S_CS] = ncs;
        c->rip = target;
    } else {
        int psz = is32 ? 4 : 2;
        uint64_t sp;
        int switched = 0;
        if (ncpl < c->cpl) {
            uint16_t nss = (uint16_t)sys_ld(c, tss + 8 + 8 * ncpl, 2);
            sp = (uint32_t)sys_ld(c, tss + 4 + 8 * ncpl, 4);
            uint32_t sd[4];
            if ((nss & ~3) == 0 || read_descriptor(c, nss, sd, 0) < 0)
                RAISE_ERR(c, EXC_TS, nss & ~3u);
            Seg nss_seg;
            seg_from_desc(&nss_seg, nss, sd);
            c->seg[S_SS] = nss_seg;
            switched = 1;
        } else {
            sp = c->r[R_SP];
        }
        int saved_idx = c->mmu_idx;
        c->mmu_idx = ncpl == 3;
        if (switched) {
            push_v(c, &sp, psz, old_ss);
            push_v(c, &sp, psz, old_sp);
        }
        push_v(c, &sp, psz, flags);
        push_v(c, &sp, psz, c->seg[S_CS].sel);
        push_v(c, &sp, psz, ret_rip);
        if (has_err)
            push_v(c, &sp, psz, err);
        c->mmu_idx = saved_idx;
        if (c->seg[S_SS].db)
            c->r[R_SP] = (uint32_t)sp;
        else
            c->r[R_SP] = (c->r[R_SP] & ~0xffffull) | (uint16_t)sp;
        ncs.sel = (tsel & ~3) | ncpl;
        c->seg[S_CS] = ncs;
        c->rip = is32 ? (uint32_t)target : (uint16_t)target;
    }
    c->eflags &= ~(uint64_t)(F_TF | F_NT | F_RF | F_VM);
    if (!trap)
        c->eflags &= ~(uint64_t)F_IF;
    update_mode(c);
}

void do_far_jump(CPU *c, uint16_t sel, uint64_t off, int call, int osz)
{
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM)) {
        if (call) {
            uint64_t sp = c->r[R_SP];
            push_v(c, &sp, osz, c->seg[S_CS].sel);
            push_v(c, &sp, osz, c->next_rip);
            c->r[R_SP] = sp;
        }
        load_seg_real(c, S_CS, sel);
        c->next_rip = osz == 2 ? (uint16_t)off : (uint32_t)off;
        update_mode(c);
        return;
    }
    uint32_t d[4];
    if ((sel & ~3) == 0 || read_descriptor(c, sel, d, 0) < 0)
        RAISE_ERR(c, EXC_GP, sel & ~3u);
    Seg ncs;
    seg_from_desc(&ncs, sel, d);
    if (!ncs.s || !(ncs.type & 8))
        RAISE_ERR(c, EXC_GP, sel & ~3u);   /* call gates / task switches unsupported */
    if (!ncs.present)
        RAISE_ERR(c, EXC_NP, sel & ~3u);
    if (call) {
        uint64_t sp = c->r[R_SP];
        push_v(c, &sp, osz, c->seg[S_CS].sel);
        push_v(c, &sp, osz, c->next_rip);
        c->r[R_SP] = sp;
    }
    ncs.sel = (sel & ~3) | c->cpl;
    ncs.dpl = (ncs.type & 4) ? ncs.dpl : c->cpl;
    c->seg[S_CS] = ncs;
    update_mode(c);
    c->next_rip = c->long64 ? off : (osz == 2 ? (uint16_t)off : (uint32_t)off);
}

static void check_data_segs_after_return(CPU *c)
{
    /* segments not accessible at the new (outer) level become null */
    static const int regs[4] = { S_ES, S_DS, S_FS, S_GS };
    for (int k = 0; k < 4; k++) {
        Seg *s = &c->seg[regs[k]];
        int conforming_code = (s->type & 0xc) == 0xc;
        if (!s->unusable && s->s && !conforming_code && s->dpl < c->cpl) {
            s->sel = 0;
            s->unusable = 1;
            s->present = 0;
        }
    }
}

void do_far_ret(CPU *c, int osz, uint32_t pop_extra)
{
    uint64_t sp = c->r[R_SP];
    uint64_t nip = pop_v(c, &sp, osz);
    uint16_t sel = (uint16_t)pop_v(c, &sp, osz);
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM)) {
        sp += pop_extra;
        c->r[R_SP] = stack_size(c) == 2 ? ((c->r[R_SP] & ~0xffffull) | (uint16_t)sp) : sp;
        load_seg_real(c, S_CS, sel);
        c->next_rip = nip & (osz == 2 ? 0xffff : 0xffffffff);
        update_mode(c);
        return;
    }
    uint32_t d[4];
    if ((sel & ~3) == 0 || read_descriptor(c, sel, d, 0) < 0)
        RAISE_ERR(c, EXC_GP, sel & ~3u);
    Seg ncs;
    seg_from_desc(&ncs, sel, d);
    if (!ncs.s || !(ncs.type & 8) || (sel & 3) < c->cpl)
        RAISE_ERR(c, EXC_GP, sel & ~3u);
    sp += pop_extra;
    int rpl = sel & 3;
    if (rpl > c->cpl) {
        uint64_t nsp = pop_v(c, &sp, osz);
        uint16_t nss = (uint16_t)pop_v(c, &sp, osz);
        c->seg[S_CS] = ncs;
        c->seg[S_CS].dpl = rpl;
        update_mode(c);
        load_seg(c, S_SS, nss);
        c->r[R_SP] = nsp + pop_extra;
        check_data_segs_after_return(c);
    } else {
        c->seg[S_CS] = ncs;
        c->seg[S_CS].dpl = (ncs.type & 4) ? ncs.dpl : rpl;
        update_mode(c);
        c->r[R_SP] = stack_size(c) == 2 ? ((c->r[R_SP] & ~0xffffull) | (uint16_t)sp) : sp;
    }
    c->next_rip = c->long64 ? nip : (osz == 2 ? (uint16_t)nip : (uint32_t)nip);
}

static void iret_set_flags(CPU *c, uint64_t nf, int osz, int old_cpl)
{
    uint64_t mask = F_ARITH | F_TF | F_DF | F_NT | F_RF | F_AC | F_ID | 0x180000;
    if (osz == 2)
        mask &= 0xffff;
    if (old_cpl == 0)
        mask |= F_IOPL;
    if (old_cpl <= (int)((c->eflags >> 12) & 3))
        mask |= F_IF;
    set_eflags(c, nf, mask);
}

void do_iret(CPU *c, int osz)
{
    uint64_t sp = c->r[R_SP];
    if (c->nmi_blocked) {
        /* NMIs are blocked from the delivery of one to the next IRET (even one that faults
         * later: the instruction restarts and unblocks again, which changes nothing) */
        c->nmi_blocked = 0;
        if (atomic_load(&c->nmi_pending))
            atomic_store(&c->exit_request, 1);
    }
    if (!(c->cr0 & CR0_PE)) {
        uint64_t nip = pop_v(c, &sp, osz);
        uint16_t sel = (uint16_t)pop_v(c, &sp, osz);
        uint64_t nf = pop_v(c, &sp, osz);
        c->r[R_SP] = stack_size(c) == 2 ? ((c->r[R_SP] & ~0xffffull) | (uint16_t)sp) : sp;
        load_seg_real(c, S_CS, sel);
        c->next_rip = nip & (osz == 2 ? 0xffff : 0xffffffff);
        uint64_t mask = F_ARITH | F_TF | F_IF | F_DF | F_NT | F_IOPL;
        if (osz == 4)
            mask |= F_AC | F_ID | F_RF;
        set_eflags(c, nf, mask);
        update_mode(c);
        return;
    }
    int lma = (c->efer & EFER_LMA) != 0;
    if (c->eflags & F_NT && !lma)
        RAISE_ERR(c, EXC_GP, 0);   /* nested task return unsupported */
    uint64_t nip = pop_v(c, &sp, osz);
    uint16_t sel = (uint16_t)pop_v(c, &sp, osz);
    uint64_t nf = pop_v(c, &sp, osz);
    uint32_t d[4];
    if ((sel & ~3) == 0 || read_descriptor(c, sel, d, 0) < 0)
        RAISE_ERR(c, EXC_GP, sel & ~3u);
    Seg ncs;
    seg_from_desc(&ncs, sel, d);
    int rpl = sel & 3;
    if (!ncs.s || !(ncs.type & 8) || rpl < c->cpl)
        RAISE_ERR(c, EXC_GP, sel & ~3u);
    if (!ncs.present)
        RAISE_ERR(c, EXC_NP, sel & ~3u);
    int old_cpl = c->cpl;
    int pop_stack = rpl > c->cpl || c->long64;
    uint64_t nsp = 0;
    uint16_t nss = 0;
    if (pop_stack) {
        nsp = pop_v(c, &sp, osz);
        nss = (uint16_t)pop_v(c, &sp, osz);
    }
    iret_set_flags(c, nf, osz, old_cpl);
    ncs.dpl = (ncs.type & 4) ? ncs.dpl : rpl;
    c->seg[S_CS] = ncs;
    update_mode(c);
    if (pop_stack) {
        if ((nss & ~3) == 0 && lma && c->long64) {
            Seg *s = &c->seg[S_SS];
            s->sel = nss;
            s->unusable = 1;
            s->dpl = rpl;
        } else {
            load_seg(c, S_SS, nss);
        }
        c->r[R_SP] = (c->long64 || osz == 8) ? nsp : (c->seg[S_SS].db ? (uint32_t)nsp : (uint16_t)nsp);
        if (rpl > old_cpl)
            check_data_segs_after_return(c);
    } else {
        c->r[R_SP] = stack_size(c) == 2 ? ((c->r[R_SP] & ~0xffffull) | (uint16_t)sp) : sp;
    }
    c->next_rip = c->long64 ? nip : (uint32_t)nip;
}

static void flat_seg(Seg *s, uint16_t sel, int code, int dpl, int l)
{
    s->sel = sel;
    s->base = 0;
    s->limit = 0xffffffff;
    s->g = 1;
    s->s = 1;
    s->present = 1;
    s->unusable = 0;
    s->avl = 0;
    s->dpl = dpl;
    s->type = code ? 0xb : 0x3;
    s->l = l;
    s->db = l ? 0 : 1;
}

void do_syscall(CPU *c)
{
    if (!(c->efer & EFER_SCE))
        RAISE(c, EXC_UD);
    uint16_t sel = (c->star >> 32) & 0xffff;
    uint64_t flags = get_eflags(c);
    if (c->efer & EFER_LMA) {
        uint64_t target = c->long64 ? c->lstar : c->cstar;   /* by the caller's mode */
        c->r[R_CX] = c->next_rip;
        c->r[11] = flags & ~(uint64_t)F_RF;
        flat_seg(&c->seg[S_CS], sel & ~3, 1, 0, 1);
        flat_seg(&c->seg[S_SS], (sel + 8) & ~3, 0, 0, 0);
        set_eflags(c, flags & ~c->fmask & ~(uint64_t)F_RF, ~0ull);
        update_mode(c);
        c->next_rip = target;
    } else {
        c->r[R_CX] = (uint32_t)c->next_rip;
        flat_seg(&c->seg[S_CS], sel & ~3, 1, 0, 0);
        flat_seg(&c->seg[S_SS], (sel + 8) & ~3, 0, 0, 0);
        c->eflags &= ~(uint64_t)(F_IF | F_VM | F_RF);
        c->next_rip = (uint32_t)c->star;
        update_mode(c);
    }
}

void do_sysret(CPU *c, int osz)
{
    if (!(c->efer & EFER_SCE))
        RAISE(c, EXC_UD);
    if (c->cpl != 0 || !(c->cr0 & CR0_PE))
        RAISE_ERR(c, EXC_GP, 0);
    uint16_t sel = (c->star >> 48) & 0xffff;
    if (c->efer & EFER_LMA) {
        if (osz == 8) {
            flat_seg(&c->seg[S_CS], (sel + 16) | 3, 1, 3, 1);
            c->next_rip = c->r[R_CX];
        } else {
            flat_seg(&c->seg[S_CS], sel | 3, 1, 3, 0);
            c->next_rip = (uint32_t)c->r[R_CX];
        }
        set_eflags(c, (c->r[11] & 0x3c7fd7) | 2, ~0ull);
    } else {
        flat_seg(&c->seg[S_CS], sel | 3, 1, 3, 0);
        c->next_rip = (uint32_t)c->r[R_CX];
        c->eflags |= F_IF;
    }
    flat_seg(&c->seg[S_SS], (sel + 8) | 3, 0, 3, 0);
    update_mode(c);
}

void set_cr0(CPU *c, uint64_t v)
{
    v |= 0x10;   /* ET is hardwired */
    uint64_t changed = c->cr0 ^ v;
    if ((v & CR0_PG) && !(v & CR0_PE))
        RAISE_ERR(c, EXC_GP, 0);
    if ((changed & CR0_PG) && (v & CR0_PG) && (c->efer & EFER_LME)) {
        if (!(c->cr4 & CR4_PAE))
            RAISE_ERR(c, EXC_GP, 0);
        c->efer |= EFER_LMA;
    }
    if ((changed & CR0_PG) && !(v & CR0_PG))
        c->efer &= ~(uint64_t)EFER_LMA;
    c->cr0 = v;
    if (changed & (CR0_PG | CR0_WP | CR0_PE))
        tlb_flush(c, 1);
    update_mode(c);
}

void set_cr3(CPU *c, uint64_t v)
{
    c->cr3 = v;
    tlb_flush(c, 0);
}

void set_cr4(CPU *c, uint64_t v)
{
    uint64_t changed = c->cr4 ^ v;
    if ((c->efer & EFER_LMA) && !(v & CR4_PAE))
        RAISE_ERR(c, EXC_GP, 0);
    c->cr4 = v;
    if (changed & (CR4_PGE | CR4_PAE | CR4_PSE))
        tlb_flush(c, 1);
}

void set_efer(CPU *c, uint64_t v)
{
    uint64_t keep_lma = c->efer & EFER_LMA;
    c->efer = (v & ~(uint64_t)EFER_LMA) | keep_lma;
    tlb_flush(c, 1);
    update_mode(c);
}

int msr_read(CPU *c, uint32_t idx, uint64_t *val)
{
    switch (idx) {
    case 0x10: *val = __rdtsc() + c->tsc_offset; return 0;
    case 0x1b: *val = c->apic_base; return 0;
    case 0x17: *val = 0; return 0;   /* platform id: what KVM answers (OVMF reads it) */
    case 0x3a: *val = 1; return 0;   /* feature control: locked, nothing enabled */
    case 0x8b: *val = 0; return 0;
    /* IA32_ARCH_CAPABILITIES (CPUID 7 EDX bit 29): an interpreter has no speculative
     * execution, so say so, as QEMU's models do; Linux then skips page-table isolation,
     * buffer clearing, retpolines and return thunks, which cost a translator far more
     * than a CPU. RDCL_NO IBRS_ALL SKIP_L1DFL_VMENTRY SSB_NO MDS_NO PSCHANGE_MC_NO
     * TAA_NO SBDR_SSDP_NO FBSDP_NO PSDP_NO BHI_NO PBRSB_NO GDS_NO RFDS_NO ITS_NO */
    case 0x10a: *val = (1ull << 0) | (1ull << 1) | (1ull << 3) | (1ull << 4) | (1ull << 5) | (1ull << 6) |
                       (1ull << 8) | (1ull << 13) | (1ull << 14) | (1ull << 15) | (1ull << 20) | (1ull << 24) |
                       (1ull << 26) | (1ull << 27) | (1ull << 62); return 0;
    /* IA32_SPEC_CTRL (CPUID 7 EDX bit 26): kept for the guest to read back, no effect */
    case 0x48: *val = c->spec_ctrl; return 0;
    case 0xfe: *val = 0; return 0;   /* MTRRcap: no variable ranges */
    case 0x174: *val = c->sysenter_cs; return 0;
    case 0x175: *val = c->sysenter_esp; return 0;
    case 0x176: *val = c->sysenter_eip; return 0;
    case 0x179: *val = 0; return 0;
    case 0x1a0: *val = c->misc_enable; return 0;
    case 0x277: *val = c->pat; return 0;
    case 0x2ff: *val = c->mtrr_def_type; return 0;
    case 0xc0000080: *val = c->efer; return 0;
    case 0xc0000081: *val = c->star; return 0;
    case 0xc0000082: *val = c->lstar; return 0;
    case 0xc0000083: *val = c->cstar; return 0;
    case 0xc0000084: *val = c->fmask; return 0;
    case 0xc0000100: *val = c->seg[S_FS].base; return 0;
    case 0xc0000101: *val = c->seg[S_GS].base; return 0;
    case 0xc0000102: *val = c->kernel_gs_base; return 0;
    case 0xc0000103: *val = c->tsc_aux; return 0;
    }
    if (idx >= 0x200 && idx <= 0x26f) {
        *val = 0;   /* MTRR ranges: none configured */
        return 0;
    }
    return -1;
}

static int canonical(uint64_t v)
{
    return (uint64_t)(((int64_t)v << 16) >> 16) == v;
}

int msr_write(CPU *c, uint32_t idx, uint64_t v)
{
    switch (idx) {
    case 0x10: c->tsc_offset = v - __rdtsc(); return 0;
    case 0x1b: c->apic_base = v; return 0;
    case 0x8b: return 0;
    case 0x174: c->sysenter_cs = v & 0xffff; return 0;
    case 0x175: c->sysenter_esp = v; return 0;
    case 0x176: c->sysenter_eip = v; return 0;
    case 0x1a0: c->misc_enable = v; return 0;
    case 0x277: c->pat = v; return 0;
    case 0x2ff: c->mtrr_def_type = v; return 0;
    case 0xc0000080:
        if (v & ~(uint64_t)(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE))
            return -1;
        set_efer(c, v);
        return 0;
    case 0xc0000081: c->star = v; return 0;
    case 0xc0000082: if (!canonical(v)) return -1; c->lstar = v; return 0;
    case 0xc0000083: if (!canonical(v)) return -1; c->cstar = v; return 0;
    case 0xc0000084: c->fmask = v & 0xffffffff; return 0;
    case 0x48:   /* IA32_SPEC_CTRL: IBRS STIBP SSBD are accepted and mean nothing here */
        if (v & ~7ull)
            return -1;
        c->spec_ctrl = v;
        return 0;
    case 0x49:   /* IA32_PRED_CMD: IBPB, a barrier with nothing to flush */
        return (v & ~1ull) ? -1 : 0;
    case 0xc0000100: if (!canonical(v)) return -1; c->seg[S_FS].base = v; return 0;
    case 0xc0000101: if (!canonical(v)) return -1; c->seg[S_GS].base = v; return 0;
    case 0xc0000102: if (!canonical(v)) return -1; c->kernel_gs_base = v; return 0;
    case 0xc0000103: c->tsc_aux = v & 0xffffffff; return 0;
    }
    if (idx >= 0x200 && idx <= 0x26f)
        return 0;   /* MTRR ranges: memory types do not matter to an emulator */
    return -1;
}

void do_cpuid(CPU *c)
{
    uint32_t fn = (uint32_t)c->r[R_AX], idx = (uint32_t)c->r[R_CX];
    uint32_t a = 0, b = 0, cc = 0, d = 0;
    int found = 0;
    for (int k = 0; k < c->ncpuid; k++) {
        if (c->cpuid[k].fn == fn && (!(c->cpuid[k].flags & 1) || c->cpuid[k].idx == idx)) {
            a = c->cpuid[k].eax; b = c->cpuid[k].ebx; cc = c->cpuid[k].ecx; d = c->cpuid[k].edx;
            found = 1;
            break;
        }
    }
    if (!found && c->ncpuid == 0) {
        switch (fn) {
        case 0: a = 7; b = 0x756e6547; d = 0x49656e69; cc = 0x6c65746e; break;   /* GenuineIntel */
        case 1:
            a = 0x000306d2;     /* as kvmpy/hv/tcg/accel.py's SIGNATURE */
            b = ((uint32_t)c->cpu_index << 24) | (1 << 16) | (8 << 8);
            cc = (1u << 13) | (1u << 22) | (1u << 23) | (1u << 30) | (1u << 31);   /* cx16 movbe popcnt rdrand hypervisor */
            d = 1 | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 13) |
                (1 << 15) | (1 << 16) | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26);
            break;
        case 7:
            if (idx == 0)
                b = (1u << 3) | (1u << 8) | (1u << 18) | (1u << 19);   /* bmi1 bmi2 rdseed adx */
            break;
        case 0x80000000: a = 0x80000008; break;
        case 0x80000001:
            cc = 1 | (1 << 5);   /* lahf_lm abm */
            d = (1u << 11) | (1u << 20) | (1u << 26) | (1u << 27) | (1u << 29);
            break;
        case 0x80000008: a = 0x3028; break;
        }
    }
    if (fn == 1) {
        b = (b & 0x00ffffff) | ((uint32_t)c->cpu_index << 24);
        /* OSXSAVE mirrors CR4 */
        cc = (cc & ~(1u << 27)) | ((c->cr4 & (1u << 18)) ? (1u << 27) : 0);
    }
    c->r[R_AX] = a;
    c->r[R_BX] = b;
    c->r[R_CX] = cc;
    c->r[R_DX] = d;
}

static uint64_t raw_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The TSC and CLOCK_MONOTONIC_RAW at one instant: the TSC read between two clock reads,
 * the tightest bracket of a few tries. A plain clock-then-rdtsc pair is off by however
 * long the thread was preempted between the two, which on a loaded host moved the
 * measured frequency by up to 80 ppm from one process to the next. */
static void tsc_at_instant(uint64_t *ns, uint64_t *tsc)
{
    uint64_t best = UINT64_MAX;
    for (int k = 0; k < 32; k++) {
        uint64_t before = raw_ns();
        uint64_t t = __rdtsc();
        uint64_t after = raw_ns();
        if (after - before < best) {
            best = after - before;
            *ns = before + best / 2;
            *tsc = t;
        }
    }
}

/* The calibration interval's first end, when start_tsc_calibration() took it: the VMM
 * builds its machine (imports, devices, the kernel's load) while the interval runs,
 * instead of sleeping through it at the end. */
#define TSC_CALIBRATION_NS 20000000ull
/* An older start is taken again: across a host suspend the TSC and the raw clock need
 * not have advanced together. */
#define TSC_CALIBRATION_MAX_AGE_NS 1000000000ull
static uint64_t calibration_ns0, calibration_tsc0;

void start_tsc_calibration(void)
{
    tsc_at_instant(&calibration_ns0, &calibration_tsc0);
}

/* The host TSC's frequency, which the guest's TSC runs at (rdtsc is the host's plus an
 * offset): measured once against CLOCK_MONOTONIC_RAW over at least 20 ms (from
 * start_tsc_calibration(), or from this call), so CPUID 0x15/0x16 can announce it and
 * Linux need not calibrate the TSC against the PIT (thousands of port exits). Each end
 * is bracketed within ~100 ns, a few ppm of the interval; rounded to 1 kHz, Linux's
 * unit. */
uint64_t host_tsc_hz(void)
{
    static uint64_t hz;
    if (hz)
        return hz;
    uint64_t ns0 = calibration_ns0, tsc0 = calibration_tsc0, ns1, tsc1;
    if (!ns0 || raw_ns() - ns0 > TSC_CALIBRATION_MAX_AGE_NS)
        tsc_at_instant(&ns0, &tsc0);
    uint64_t elapsed = raw_ns() - ns0;
    if (elapsed < TSC_CALIBRATION_NS) {
        uint64_t left = TSC_CALIBRATION_NS - elapsed;
        struct timespec pause = { (time_t)(left / 1000000000ull), (long)(left % 1000000000ull) };
        while (nanosleep(&pause, &pause) != 0)
            ;
    }
    tsc_at_instant(&ns1, &tsc1);
    uint64_t measured = (uint64_t)((double)(tsc1 - tsc0) * 1e9 / (double)(ns1 - ns0));
    hz = (measured + 500) / 1000 * 1000;
    return hz;
}
