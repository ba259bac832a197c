/* System instructions: segment register loads and stores, descriptor-table and
 * task-register groups (0F 00, 0F 01), lar/lsl, control and debug registers, MSRs,
 * time stamp counter, hlt, cli/sti, clts, and the register forms of 0F AE. CPUID,
 * syscall/sysret, far transfers and iret are in system.c. */
#ifndef KVMPY_INSN_SYSTEM_H
#define KVMPY_INSN_SYSTEM_H

#include <x86intrin.h>
#include "insn_fpu.h"

/* 8C: mov r/m, sreg (a register destination takes the operand size) */
HANDLER mov_rm_sreg(CPU *c, Insn *i)
{
    if ((i->reg & 7) > 5) UD();
    if (i->mod == 3)
        setreg(c, i, i->rm, i->osz, c->seg[i->reg & 7].sel);
    else
        st(c, ea_lin(c, i), 2, c->seg[i->reg & 7].sel);
}

/* 8E: mov sreg, r/m (not CS) */
HANDLER mov_sreg_rm(CPU *c, Insn *i)
{
    int s = i->reg & 7;
    if (s == S_CS || s > 5) UD();
    load_seg(c, s, (uint16_t)rdE(c, i, 2));
    if (s == S_SS)
        c->shadow = 1;   /* no interrupt before the next instruction (which sets rsp) */
}

/* C4 les, C5 lds, 0F B2 lss, 0F B4 lfs, 0F B5 lgs: a segment:offset pair from memory */
static void load_far_ptr(CPU *c, Insn *i, int sreg)
{
    if (i->mod == 3)
        UD();
    unsigned sz = i->osz;
    uint64_t lin = ea_lin(c, i);
    uint64_t off = ld(c, lin, sz);
    uint16_t sel = (uint16_t)ld(c, linear(c, i->seg, ea_off(c, i) + sz), 2);
    load_seg(c, sreg, sel);
    setreg(c, i, i->reg, sz, off);
}

/* LAR / LSL: access rights or limit of a descriptor the current privilege may see */
static void lar_lsl(CPU *c, Insn *i, int lsl)
{
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM))
        UD();
    uint16_t sel = (uint16_t)rdE(c, i, 2);
    uint32_t d[4];
    int ok = (sel & ~3) && read_descriptor(c, sel, d, 0) == 0;
    if (ok) {
        int s_bit = (d[1] >> 12) & 1, type = (d[1] >> 8) & 0xf, dpl = (d[1] >> 13) & 3;
        int conforming = s_bit && (type & 0xc) == 0xc;
        if (!s_bit) {
            /* system descriptors: TSS and LDT for both; gates only for LAR (not in long mode) */
            ok = type == 1 || type == 2 || type == 3 || type == 9 || type == 11 ||
                 (!lsl && !(c->efer & EFER_LMA) && (type == 4 || type == 5 || type == 12));
        }
        if (ok && !conforming && (dpl < c->cpl || dpl < (sel & 3)))
            ok = 0;
    }
    uint32_t f = compute_arith(c) & ~F_ZF;
    if (ok) {
        uint64_t v;
        if (lsl) {
            v = (d[0] & 0xffff) | (d[1] & 0xf0000);
            if (d[1] & (1u << 23))
                v = (v << 12) | 0xfff;
        } else {
            v = d[1] & 0x00f0ff00;
        }
        setreg(c, i, i->reg, i->osz, v);
        f |= F_ZF;
    }
    set_flags(c, f);
}

/* 0F 00 (group 6): sldt, str, lldt, ltr, verr, verw */
static void system_group6(CPU *c, Insn *i)
{
    int r = i->reg & 7;
    if (!(c->cr0 & CR0_PE) || (c->eflags & F_VM)) UD();
    switch (r) {
    case 0: case 1: {
        uint16_t sel = c->seg[r == 0 ? S_LDT : S_TR].sel;
        if (i->mod == 3) setreg(c, i, i->rm, i->osz, sel);
        else st(c, ea_lin(c, i), 2, sel);
        break;
    }
    case 2: case 3: {
        NEED_CPL0();
        uint16_t sel = (uint16_t)rdE(c, i, 2);
        int sreg = r == 2 ? S_LDT : S_TR;
        Seg *s = &c->seg[sreg];
        if ((sel & ~3) == 0) {
            if (r == 3) GP0();
            s->sel = sel;
            s->unusable = 1;
            s->base = 0;
            s->limit = 0;
            break;
        }
        if (sel & 4) GP0();
        uint32_t d[4];
        int wide = (c->efer & EFER_LMA) != 0;
        if (read_descriptor(c, sel, d, wide) < 0) GP0();
        Seg ns;
        seg_from_desc(&ns, sel, d);
        if (ns.s) GP0();
        if (r == 2 && ns.type != 2) GP0();
        if (r == 3 && ns.type != 9 && ns.type != 1) GP0();
        if (!ns.present) RAISE_ERR(c, EXC_NP, sel & ~3u);
        if (wide)
            ns.base |= (uint64_t)d[2] << 32;
        if (r == 3) {
            /* mark the TSS busy in the GDT */
            uint64_t dl = c->gdt_base + (sel & ~7u);
            int saved = c->mmu_idx;
            c->mmu_idx = 0;
            st(c, dl + 5, 1, ((d[1] >> 8) & 0xff) | 2);
            c->mmu_idx = saved;
            ns.type |= 2;
        }
        *s = ns;
        break;
    }
    case 4: case 5: {   /* verr / verw: report accessible for flat data and code */
        uint16_t sel = (uint16_t)rdE(c, i, 2);
        uint32_t d[4];
        int ok = (sel & ~3) && read_descriptor(c, sel, d, 0) == 0 && ((d[1] >> 12) & 1);
        uint32_t f = compute_arith(c) & ~F_ZF;
        set_flags(c, f | (ok ? F_ZF : 0));
        break;
    }
    default:
        UD();
    }
}

/* 0F 01 (group 7): sgdt, sidt, lgdt, lidt, smsw, lmsw, invlpg on memory; on registers
 * clac/stac, xgetbv/xsetbv, swapgs, rdtscp, and smsw/lmsw */
static void system_group7(CPU *c, Insn *i)
{
    int r = i->reg & 7;
    if (i->mod == 3) {
        switch (r * 8 + (i->rm & 7)) {
        case 8 * 1 + 0: case 8 * 1 + 1:   /* monitor / mwait: not advertised */
            UD();
        case 8 * 1 + 2: case 8 * 1 + 3:   /* clac / stac */
            NEED_CPL0();
            if ((i->rm & 7) == 2) c->eflags &= ~(uint64_t)F_AC;
            else c->eflags |= F_AC;
            return;
        case 8 * 2 + 0: {   /* xgetbv */
            if (!(c->cr4 & (1u << 18))) UD();
            if ((uint32_t)c->r[R_CX] != 0) GP0();
            c->r[R_AX] = (uint32_t)c->xcr0;
            c->r[R_DX] = c->xcr0 >> 32;
            return;
        }
        case 8 * 2 + 1: {   /* xsetbv */
            if (!(c->cr4 & (1u << 18))) UD();
            NEED_CPL0();
            uint64_t v = (c->r[R_DX] << 32) | (uint32_t)c->r[R_AX];
            if ((uint32_t)c->r[R_CX] != 0 || !(v & 1) || (v & ~7ull) || ((v & 4) && !(v & 2))) GP0();
            c->xcr0 = v;
            return;
        }
        case 8 * 7 + 0:   /* swapgs */
            if (!c->long64) UD();
            NEED_CPL0();
            {
                uint64_t t = c->seg[S_GS].base;
                c->seg[S_GS].base = c->kernel_gs_base;
                c->kernel_gs_base = t;
            }
            return;
        case 8 * 7 + 1: {   /* rdtscp */
            uint64_t t = __rdtsc() + c->tsc_offset;
            c->r[R_AX] = (uint32_t)t;
            c->r[R_DX] = t >> 32;
            c->r[R_CX] = (uint32_t)c->tsc_aux;
            return;
        }
        }
        if (r == 4) {
            setreg(c, i, i->rm, i->osz, c->cr0 & (i->osz == 2 ? 0xffff : ~0ull));
            return;
        }
        if (r == 6) {
            NEED_CPL0();
            uint64_t v = getreg(c, i, i->rm, 2);
            set_cr0(c, (c->cr0 & ~0xeull) | (v & 0xf) | (c->cr0 & 1));
            return;
        }
        UD();
    }
    uint64_t lin = ea_lin(c, i);
    switch (r) {
    case 0: case 1: {
        uint64_t base = r == 0 ? c->gdt_base : c->idt_base;
        uint32_t limit = r == 0 ? c->gdt_limit : c->idt_limit;
        st(c, lin, 2, limit);
        if (c->long64) st(c, lin + 2, 8, base);
        else st(c, linear(c, i->seg, ea_off(c, i) + 2), 4, i->osz == 2 ? base & 0xffffff : base);
        return;
    }
    case 2: case 3: {
        NEED_CPL0();
        uint32_t limit = (uint32_t)ld(c, lin, 2);
        uint64_t base;
        if (c->long64) base = ld(c, lin + 2, 8);
        else {
            base = ld(c, linear(c, i->seg, ea_off(c, i) + 2), 4);
            if (i->osz == 2) base &= 0xffffff;
        }
        if (r == 2) { c->gdt_base = base; c->gdt_limit = limit; }
        else { c->idt_base = base; c->idt_limit = limit; }
        return;
    }
    case 4:
        st(c, lin, 2, c->cr0);
        return;
    case 6: {
        NEED_CPL0();
        uint64_t v = ld(c, lin, 2);
        set_cr0(c, (c->cr0 & ~0xeull) | (v & 0xf) | (c->cr0 & 1));
        return;
    }
    case 7:
        NEED_CPL0();
        tlb_flush_page(c, lin);
        return;
    }
    UD();
}

/* F4 */
HANDLER hlt(CPU *c)
{
    NEED_CPL0();
    c->halted = 1;
}

/* FA */
HANDLER cli(CPU *c)
{
    if ((c->cr0 & CR0_PE) && c->cpl > (int)((c->eflags >> 12) & 3)) GP0();
    c->eflags &= ~(uint64_t)F_IF;
}

/* FB: interrupts stay off for one more instruction when it enables them */
HANDLER sti(CPU *c)
{
    if ((c->cr0 & CR0_PE) && c->cpl > (int)((c->eflags >> 12) & 3)) GP0();
    if (!(c->eflags & F_IF))
        c->shadow = 1;
    c->eflags |= F_IF;
}

/* 0F 06 */
HANDLER clts(CPU *c)
{
    NEED_CPL0();
    c->cr0 &= ~(uint64_t)CR0_TS;
}

/* 0F 08 invd, 0F 09 wbinvd: nothing to do beyond the privilege check */
HANDLER flush_caches(CPU *c)
{
    NEED_CPL0();
}

/* 0F 20: mov reg, crN (always the full register in 64-bit mode, else 32 bits) */
HANDLER mov_from_cr(CPU *c, Insn *i)
{
    NEED_CPL0();
    uint64_t v;
    switch (i->reg) {
    case 0: v = c->cr0; break;
    case 2: v = c->cr2; break;
    case 3: v = c->cr3; break;
    case 4: v = c->cr4; break;
    case 8: v = c->cr8; break;
    default: UD();
    }
    c->r[i->rm] = c->long64 ? v : (uint32_t)v;
}

/* 0F 22 */
HANDLER mov_to_cr(CPU *c, Insn *i)
{
    NEED_CPL0();
    uint64_t v = c->long64 ? c->r[i->rm] : (uint32_t)c->r[i->rm];
    switch (i->reg) {
    case 0: set_cr0(c, v); break;
    case 2: c->cr2 = v; break;
    case 3: set_cr3(c, v); break;
    case 4: set_cr4(c, v); break;
    case 8: c->cr8 = v & 15; break;
    default: UD();
    }
}

/* 0F 21. DR4/DR5 alias DR6/DR7; the reserved bits read as hardware sets them. */
HANDLER mov_from_dr(CPU *c, Insn *i)
{
    NEED_CPL0();
    int dr = i->reg & 7;
    if (dr == 4 || dr == 5) dr += 2;
    uint64_t v = dr == 6 ? (c->dr[6] | 0xffff0ff0ull) : dr == 7 ? (c->dr[7] | 0x400) : c->dr[dr];
    c->r[i->rm] = c->long64 ? v : (uint32_t)v;
}

/* 0F 23: kept for reads back; debug breakpoints are not implemented */
HANDLER mov_to_dr(CPU *c, Insn *i)
{
    NEED_CPL0();
    int dr = i->reg & 7;
    if (dr == 4 || dr == 5) dr += 2;
    c->dr[dr] = c->r[i->rm];
}

/* 0F 30 */
HANDLER wrmsr(CPU *c)
{
    NEED_CPL0();
    uint64_t val = (c->r[R_DX] << 32) | (uint32_t)c->r[R_AX];
    if (msr_write(c, (uint32_t)c->r[R_CX], val) < 0) GP0();
}

/* 0F 31: the host's TSC plus the guest's offset */
HANDLER rdtsc(CPU *c)
{
    uint64_t t = __rdtsc() + c->tsc_offset;
    c->r[R_AX] = (uint32_t)t;
    c->r[R_DX] = t >> 32;
}

/* 0F 32 */
HANDLER rdmsr(CPU *c)
{
    NEED_CPL0();
    uint64_t val;
    if (msr_read(c, (uint32_t)c->r[R_CX], &val) < 0) GP0();
    c->r[R_AX] = (uint32_t)val;
    c->r[R_DX] = val >> 32;
}

/* 0F AE on registers: lfence/mfence/sfence (ModRM.reg 5-7, no-ops here) and, with F3
 * and CR4.FSGSBASE in 64-bit mode, rdfsbase/rdgsbase/wrfsbase/wrgsbase (0-3) */
HANDLER fence_or_fsgsbase(CPU *c, Insn *i)
{
    unsigned sz = i->osz;
    if ((i->reg & 7) >= 5)
        return;
    if (!c->long64 || !(c->cr4 & CR4_FSGSBASE) || i->pfx != 2) UD();
    switch (i->reg & 7) {
    case 0: setreg(c, i, i->rm, sz, c->seg[S_FS].base); break;
    case 1: setreg(c, i, i->rm, sz, c->seg[S_GS].base); break;
    case 2: c->seg[S_FS].base = getreg(c, i, i->rm, sz); break;
    default: c->seg[S_GS].base = getreg(c, i, i->rm, sz); break;
    }
}

/* 0F AE (group 15) */
HANDLER group15(CPU *c, Insn *i)
{
    if (i->mod == 3)
        fence_or_fsgsbase(c, i);
    else
        fpu_state_mem(c, i);
}

#endif
