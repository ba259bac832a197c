/* x87 FPU: the whole floating-point instruction set, run on the host's own x87.
 *
 * Emulating 80-bit extended arithmetic in software (softfloat) gets the common
 * cases right and the corners (pseudo-denormals, unnormals, transcendental
 * precision, fprem partial remainders, C1 rounding indication, stack faults)
 * subtly wrong. This host is an x86-64 CPU with the very same FPU, so each guest
 * arithmetic instruction executes natively:
 *
 *   frstor  the guest's state (its FCW, so its rounding/precision/masks, TOP,
 *           tags, registers; exception flags cleared so nothing pending traps),
 *   call    a 4-byte stub "ESC modrm; ret" (memory forms address [rdi], a
 *           host buffer holding the guest operand),
 *   fnsave  the result back (no-wait: an unmasked exception the instruction just
 *           raised is recorded in FSW.ES and never traps in the VMM, because
 *           fnsave also reinitialises the host FPU).
 *
 * The guest then sees the hardware's result, C0-C3, TOP, tags and exception
 * flags bit for bit, including the unmasked responses (destination untouched
 * for IE/ZE/DE, biased exponent for OE/UE). As on hardware, the #MF for an
 * unmasked exception is raised by the next waiting x87 instruction or FWAIT.
 *
 * Guest registers live in c->fpregs[] in physical order (R0-R7); ST(i) is
 * R[(TOP+i)&7]. c->ftw is the full 2-bit-per-register tag word. Environment
 * instructions (fldcw/fnstcw/fnstsw/fnstenv/fldenv/fnsave/frstor/fninit/fnclex)
 * and fxsave/fxrstor are implemented here in C because their memory layout
 * depends on the guest's mode and operand size.
 */
#include "tcg.h"
#include "access.h"
#include "flags.h"

#define CR0_MP 2u
#define CR0_EM 4u
#define CR0_NE 0x20u

#define FSW_ES 0x0080u
#define FSW_B 0x8000u
#define FSW_TOP_SHIFT 11

/* Guest memory as byte strings, through ld/st: the x87 environment, fnsave/frstor
 * images and fxsave/fxrstor areas, the 80-bit operands. */
static void mem_read_bytes(CPU *c, uint64_t lin, void *dst, unsigned size)
{
    uint8_t *d = dst;
    while (size) {
        unsigned chunk = size >= 8 ? 8 : (size >= 4 ? 4 : 1);
        uint64_t v = ld(c, lin, chunk);
        memcpy(d, &v, chunk);
        d += chunk;
        lin += chunk;
        size -= chunk;
    }
}

static void mem_write_bytes(CPU *c, uint64_t lin, const void *src, unsigned size)
{
    const uint8_t *s = src;
    /* probe both ends first so a fault cannot leave a partial write */
    if (size) {
        ld(c, lin, 1);
        ld(c, lin + size - 1, 1);
    }
    while (size) {
        unsigned chunk = size >= 8 ? 8 : (size >= 4 ? 4 : 1);
        uint64_t v = 0;
        memcpy(&v, s, chunk);
        st(c, lin, chunk, v);
        s += chunk;
        lin += chunk;
        size -= chunk;
    }
}

/* "ESC modrm; ret; int3" for every ESC opcode (D8-DF) and ModRM byte; ModRM with
 * mod=00 rm=111 is [rdi]. Index (opcode & 7) << 8 | modrm. */
__asm__(".pushsection .text\n"
        ".p2align 4\n"
        ".globl kvmpy_x87_stubs\n"
        ".hidden kvmpy_x87_stubs\n"
        "kvmpy_x87_stubs:\n"
        ".set kvmpy_x87_i, 0\n"
        ".rept 2048\n"
        ".byte 0xd8 + (kvmpy_x87_i >> 8), kvmpy_x87_i & 0xff, 0xc3, 0xcc\n"
        ".set kvmpy_x87_i, kvmpy_x87_i + 1\n"
        ".endr\n"
        ".popsection\n");
extern const uint8_t kvmpy_x87_stubs[] __attribute__((visibility("hidden")));

/* FNSAVE image, 32-bit protected-mode layout (what the host uses in 64-bit mode) */
typedef struct __attribute__((packed)) SaveImg {
    uint16_t cw, pad0, sw, pad1, tw, pad2;
    uint32_t fip, fcs_op, fdp, fds;
    uint8_t st[8][10];
} SaveImg;

static inline int fpu_top(CPU *c)
{
    return (c->fsw >> FSW_TOP_SHIFT) & 7;
}

/* the tag the hardware reports for a non-empty register, from its contents */
static unsigned tag_of(const uint8_t *r)
{
    uint64_t m;
    uint16_t e;
    memcpy(&m, r, 8);
    memcpy(&e, r + 8, 2);
    e &= 0x7fff;
    if (e == 0x7fff)
        return 2;
    if (e == 0)
        return m ? 2 : 1;
    return (m >> 63) ? 0 : 2;   /* unnormal: special */
}

static uint16_t full_tag_word(CPU *c)
{
    uint16_t tw = 0;
    for (int k = 0; k < 8; k++) {
        unsigned t = (c->ftw >> (2 * k)) & 3;
        if (t != 3)
            t = tag_of(c->fpregs[k]);
        tw |= t << (2 * k);
    }
    return tw;
}

/* ES and B summarise "an unmasked exception flag is set" */
static uint16_t with_summary(uint16_t fsw, uint16_t fcw)
{
    fsw &= ~(FSW_ES | FSW_B);
    if (fsw & ~fcw & 0x3f)
        fsw |= FSW_ES | FSW_B;
    return fsw;
}

static uint16_t fcw_value(uint16_t v)
{
    return (v & 0x1f3f) | 0x40;   /* bit 6 reads as 1, bits 13-15 as 0 */
}

void fpu_reset(CPU *c)
{
    c->fcw = 0x37f;
    c->fsw = 0;
    c->ftw = 0xffff;
    c->fip = c->fdp = 0;
    c->fcs = c->fds = c->fop = 0;
}

/* #NM for CR0.EM/TS; then, for waiting instructions, a pending unmasked exception
 * is delivered as #MF. With CR0.NE clear, hardware signals FERR# to an external
 * interrupt controller instead; kvmpy's platform does not wire IRQ13, so the
 * exception is ignored there (the IGNNE# behaviour). */
static void fpu_enter(CPU *c, int waiting)
{
    if (c->cr0 & (CR0_EM | CR0_TS))
        RAISE(c, EXC_NM);
    if (waiting && (c->fsw & FSW_ES) && (c->cr0 & CR0_NE))
        RAISE(c, EXC_MF);
}

void x87_fwait(CPU *c)
{
    if ((c->cr0 & (CR0_MP | CR0_TS)) == (CR0_MP | CR0_TS))
        RAISE(c, EXC_NM);
    if ((c->fsw & FSW_ES) && (c->cr0 & CR0_NE))
        RAISE(c, EXC_MF);
}

/* Runs one stub on the host FPU loaded with `img`; `flags` carries EFLAGS'
 * arithmetic bits in (fcmov) and out (fcomi). */
static void host_run(SaveImg *img, unsigned idx, void *mem, uint64_t *flags)
{
    const void *stub = kvmpy_x87_stubs + 4 * idx;
    uint16_t hcw;
    uint64_t fl = *flags & F_ARITH;
    __asm__ volatile(
        "fnstcw %[hcw]\n\t"
        "frstor %[img]\n\t"
        "sub $128, %%rsp\n\t"          /* the stub's return address must not hit the red zone */
        "pushfq\n\t"
        "andq $~0x8d5, (%%rsp)\n\t"
        "orq %[fl], (%%rsp)\n\t"
        "popfq\n\t"
        "call *%[stub]\n\t"
        "pushfq\n\t"
        "popq %[fl]\n\t"
        "add $128, %%rsp\n\t"
        "fnsave %[img]\n\t"
        "fldcw %[hcw]\n\t"
        : [img] "+m"(*img), [hcw] "=m"(hcw), [fl] "+r"(fl)
        : [stub] "r"(stub), "D"(mem)
        : "memory", "cc", "st", "st(1)", "st(2)", "st(3)", "st(4)", "st(5)", "st(6)", "st(7)");
    *flags = fl;
}

static void img_from_guest(CPU *c, SaveImg *img)
{
    memset(img, 0, sizeof *img);
    img->cw = c->fcw;
    img->sw = c->fsw & 0x7f00;   /* C0-C3 and TOP; exception flags start clear */
    img->tw = c->ftw;
    int top = fpu_top(c);
    for (int k = 0; k < 8; k++)
        memcpy(img->st[k], c->fpregs[(top + k) & 7], 10);
}

static void img_to_guest(CPU *c, const SaveImg *img)
{
    uint16_t sw = (img->sw & 0x7f7f) | (c->fsw & 0x7f);
    c->fsw = with_summary(sw, c->fcw);
    c->ftw = img->tw;
    int top = fpu_top(c);
    for (int k = 0; k < 8; k++) {
        memcpy(c->fpregs[(top + k) & 7], img->st[k], 10);
        memset(c->fpregs[(top + k) & 7] + 10, 0, 6);
    }
}

/* register forms the hardware defines (the SDM's opcode map, with the classic
 * aliases fstp1 fcom2 fcomp3 fxch4 fcomp5 ffreep fxch7 fstp8 fstp9 that every
 * x86 since the 387 executes) */
static int reg_form_valid(int op, int m)
{
    switch (op) {
    case 0: case 4: return 1;
    case 1: return !(m >= 0xd1 && m <= 0xd7) && m != 0xe2 && m != 0xe3 && m != 0xe6 && m != 0xe7 && m != 0xef;
    case 2: return m < 0xe0 || m == 0xe9;
    case 3: return m < 0xe5 || (m >= 0xe8 && m < 0xf8);
    case 5: return m < 0xf0;
    case 6: return m < 0xd8 || m == 0xd9 || m >= 0xe0;
    default: return m <= 0xe0 || (m >= 0xe8 && m < 0xf8);
    }
}

/* memory operand bytes per (opcode, reg): 0 = #UD, -1 = environment (in C) */
static const int8_t mem_size[8][8] = {
    { 4, 4, 4, 4, 4, 4, 4, 4 },
    { 4, 0, 4, 4, -1, -1, -1, -1 },
    { 4, 4, 4, 4, 4, 4, 4, 4 },
    { 4, 4, 4, 4, 0, 10, 0, 10 },
    { 8, 8, 8, 8, 8, 8, 8, 8 },
    { 8, 8, 8, 8, -1, 0, -1, -1 },
    { 2, 2, 2, 2, 2, 2, 2, 2 },
    { 2, 2, 2, 2, 10, 8, 10, 8 },
};
/* which reg fields of each opcode store to memory */
static const uint8_t mem_store[8] = { 0, 0x0c, 0, 0x8e, 0, 0x0e, 0, 0xce };

static void note_insn(CPU *c, Insn *i, int op, int modrm, int has_mem, uint64_t off)
{
    c->fip = c->rip;
    c->fcs = c->seg[S_CS].sel;
    c->fop = (uint16_t)(((op & 7) << 8) | modrm);
    if (has_mem) {
        c->fdp = off;
        c->fds = c->seg[i->seg].sel;
    }
}

static int real_or_v86(CPU *c)
{
    return !(c->cr0 & CR0_PE) || (c->eflags & F_VM);
}

/* FNSTENV/FLDENV layouts: 14 bytes (16-bit operand size) or 28 (32/64-bit),
 * protected-mode or real-mode format (SDM Vol. 1, 8.1.10, Figures 8-9 to 8-12) */
static unsigned env_store(CPU *c, int osz, uint8_t *b)
{
    uint16_t tw = full_tag_word(c);
    if (osz == 2) {
        uint16_t w[7];
        w[0] = c->fcw; w[1] = c->fsw; w[2] = tw;
        if (real_or_v86(c)) {
            uint32_t ip = (uint32_t)(c->fip + ((uint64_t)c->fcs << 4)), dp = (uint32_t)(c->fdp + ((uint64_t)c->fds << 4));
            w[3] = (uint16_t)ip;
            w[4] = (uint16_t)(((ip >> 16) & 0xf) << 12 | (c->fop & 0x7ff));
            w[5] = (uint16_t)dp;
            w[6] = (uint16_t)(((dp >> 16) & 0xf) << 12);
        } else {
            w[3] = (uint16_t)c->fip; w[4] = c->fcs; w[5] = (uint16_t)c->fdp; w[6] = c->fds;
        }
        memcpy(b, w, 14);
        return 14;
    }
    uint32_t d[7];
    d[0] = 0xffff0000u | c->fcw;
    d[1] = 0xffff0000u | c->fsw;
    d[2] = 0xffff0000u | tw;
    if (real_or_v86(c)) {
        uint32_t ip = (uint32_t)(c->fip + ((uint64_t)c->fcs << 4)), dp = (uint32_t)(c->fdp + ((uint64_t)c->fds << 4));
        d[3] = 0xffff0000u | (ip & 0xffff);
        d[4] = ((ip >> 16) << 12) | (c->fop & 0x7ff);
        d[5] = 0xffff0000u | (dp & 0xffff);
        d[6] = (dp >> 16) << 12;
    } else {
        d[3] = (uint32_t)c->fip;
        d[4] = ((uint32_t)(c->fop & 0x7ff) << 16) | c->fcs;
        d[5] = (uint32_t)c->fdp;
        d[6] = 0xffff0000u | c->fds;
    }
    memcpy(b, d, 28);
    return 28;
}

static unsigned env_load(CPU *c, int osz, const uint8_t *b)
{
    uint16_t cw, sw, tw;
    if (osz == 2) {
        uint16_t w[7];
        memcpy(w, b, 14);
        cw = w[0]; sw = w[1]; tw = w[2];
        if (real_or_v86(c)) {
            c->fip = w[3] | ((uint32_t)(w[4] >> 12) << 16);
            c->fop = w[4] & 0x7ff;
            c->fdp = w[5] | ((uint32_t)(w[6] >> 12) << 16);
            c->fcs = c->fds = 0;
        } else {
            c->fip = w[3]; c->fcs = w[4]; c->fdp = w[5]; c->fds = w[6];
            c->fop = 0;   /* not in this layout: the hardware clears it */
        }
    } else {
        uint32_t d[7];
        memcpy(d, b, 28);
        cw = (uint16_t)d[0]; sw = (uint16_t)d[1]; tw = (uint16_t)d[2];
        if (real_or_v86(c)) {
            c->fip = (d[3] & 0xffff) | ((d[4] >> 12) << 16);
            c->fop = d[4] & 0x7ff;
            c->fdp = (d[5] & 0xffff) | ((d[6] >> 12) << 16);
            c->fcs = c->fds = 0;
        } else {
            c->fip = d[3]; c->fcs = (uint16_t)d[4]; c->fop = (d[4] >> 16) & 0x7ff;
            c->fdp = d[5]; c->fds = (uint16_t)d[6];
        }
    }
    c->fcw = fcw_value(cw);
    c->fsw = with_summary(sw, c->fcw);
    /* only "empty" survives in the hardware; stores recompute the rest from contents */
    uint16_t t = 0;
    for (int k = 0; k < 8; k++)
        if (((tw >> (2 * k)) & 3) == 3)
            t |= 3 << (2 * k);
    c->ftw = t;
    return osz == 2 ? 14 : 28;
}

static void x87_env(CPU *c, Insn *i, int op, int r)
{
    uint64_t lin = ea_lin(c, i);
    int osz = i->osz == 2 ? 2 : 4;
    uint8_t b[108];
    if (op == 1 && r == 5) {                     /* fldcw */
        fpu_enter(c, 1);
        c->fcw = fcw_value((uint16_t)ld(c, lin, 2));
        c->fsw = with_summary(c->fsw, c->fcw);
        return;
    }
    if ((op == 1 && r == 7) || (op == 5 && r == 7)) {   /* fnstcw, fnstsw */
        fpu_enter(c, 0);
        st(c, lin, 2, op == 1 ? c->fcw : c->fsw);
        return;
    }
    if (op == 1 && r == 6) {                     /* fnstenv */
        fpu_enter(c, 0);
        unsigned n = env_store(c, osz, b);
        mem_write_bytes(c, lin, b, n);
        c->fcw |= 0x3f;                          /* and masks every exception */
        c->fsw = with_summary(c->fsw, c->fcw);
        return;
    }
    if (op == 5 && r == 6) {                     /* fnsave */
        fpu_enter(c, 0);
        unsigned n = env_store(c, osz, b);
        int top = fpu_top(c);
        for (int k = 0; k < 8; k++)
            memcpy(b + n + 10 * k, c->fpregs[(top + k) & 7], 10);
        mem_write_bytes(c, lin, b, n + 80);
        fpu_reset(c);
        return;
    }
    /* fldenv, frstor: read everything first, so a fault leaves the state alone */
    fpu_enter(c, 1);
    unsigned n = osz == 2 ? 14 : 28;
    unsigned total = (op == 5) ? n + 80 : n;
    mem_read_bytes(c, lin, b, total);
    env_load(c, osz, b);
    if (op == 5) {
        int top = fpu_top(c);
        for (int k = 0; k < 8; k++) {
            memcpy(c->fpregs[(top + k) & 7], b + n + 10 * k, 10);
            memset(c->fpregs[(top + k) & 7] + 10, 0, 6);
        }
    }
}

void x87_exec(CPU *c, Insn *i)
{
    int op = i->op & 7, r = i->reg & 7;
    if (i->mod == 3) {
        int m = 0xc0 | (r << 3) | (i->rm & 7);
        if (!reg_form_valid(op, m))
            RAISE(c, EXC_UD);
        if (op == 3 && m >= 0xe0 && m <= 0xe4) {   /* fneni fndisi fnclex fninit fnsetpm: no-wait */
            fpu_enter(c, 0);
            if (m == 0xe2)
                c->fsw &= 0x7f00;
            else if (m == 0xe3)
                fpu_reset(c);
            return;
        }
        if (op == 7 && m == 0xe0) {                /* fnstsw ax */
            fpu_enter(c, 0);
            c->r[R_AX] = (c->r[R_AX] & ~0xffffull) | c->fsw;
            return;
        }
        fpu_enter(c, 1);
        SaveImg img;
        img_from_guest(c, &img);
        int fcmov = (op == 2 || op == 3) && m < 0xe0;
        int fcomi = (op == 3 || op == 7) && m >= 0xe8 && m < 0xf8;
        uint64_t fl = (fcmov || fcomi) ? get_eflags(c) : 0;
        host_run(&img, (op << 8) | m, 0, &fl);
        note_insn(c, i, op, m, 0, 0);
        img_to_guest(c, &img);
        if (fcomi)                                 /* ZF PF CF, OF SF AF cleared */
            set_eflags(c, fl, F_ARITH);
        return;
    }
    int n = mem_size[op][r];
    if (n == 0)
        RAISE(c, EXC_UD);
    if (n < 0) {
        x87_env(c, i, op, r);
        return;
    }
    fpu_enter(c, 1);
    uint64_t off = ea_off(c, i);
    uint64_t lin = linear(c, i->seg, off);
    int store = (mem_store[op] >> r) & 1;
    uint8_t buf[16] __attribute__((aligned(16)));
    memset(buf, 0, sizeof buf);
    if (!store) {
        if (n == 10) {
            mem_read_bytes(c, lin, buf, 10);
        } else {
            uint64_t v = ld(c, lin, n);
            memcpy(buf, &v, 8);
        }
    }
    SaveImg img;
    img_from_guest(c, &img);
    uint64_t fl = 0;
    int m = (r << 3) | 7;                          /* [rdi] */
    host_run(&img, (op << 8) | m, buf, &fl);
    if (store) {
        /* an unmasked IE/DE/ZE/OE/UE leaves memory alone (SDM Vol. 1, 8.5) */
        uint16_t exc = img.sw & 0x1f;
        if (!(exc & ~c->fcw & 0x1f)) {
            if (n == 10) {
                mem_write_bytes(c, lin, buf, 10);
            } else {
                uint64_t v;
                memcpy(&v, buf, 8);
                st(c, lin, n, v);
            }
        }
    }
    note_insn(c, i, op, (i->mod << 6) | (r << 3) | (i->rm & 7), 1, off);
    img_to_guest(c, &img);
}

/* ---- FXSAVE / FXRSTOR (legacy region; registers in ST order, abridged tags) ---- */

void fxsave(CPU *c, uint64_t lin, int rexw)
{
    if (c->cr0 & (CR0_EM | CR0_TS))
        RAISE(c, (c->cr0 & CR0_EM) ? EXC_UD : EXC_NM);
    if (lin & 15)
        RAISE_ERR(c, EXC_GP, 0);
    uint8_t buf[512];
    memset(buf, 0, sizeof buf);
    memcpy(buf + 0, &c->fcw, 2);
    memcpy(buf + 2, &c->fsw, 2);
    uint8_t ftw = 0;   /* abridged: 1 = valid register */
    for (int k = 0; k < 8; k++)
        if (((c->ftw >> (2 * k)) & 3) != 3)
            ftw |= 1 << k;
    buf[4] = ftw;
    memcpy(buf + 6, &c->fop, 2);
    if (rexw) {
        memcpy(buf + 8, &c->fip, 8);
        memcpy(buf + 16, &c->fdp, 8);
    } else {
        uint32_t ip = (uint32_t)c->fip, dp = (uint32_t)c->fdp;
        memcpy(buf + 8, &ip, 4);
        memcpy(buf + 12, &c->fcs, 2);
        memcpy(buf + 16, &dp, 4);
        memcpy(buf + 20, &c->fds, 2);
    }
    memcpy(buf + 24, &c->mxcsr, 4);
    uint32_t mask = 0xffff;
    memcpy(buf + 28, &mask, 4);
    int top = fpu_top(c);
    for (int k = 0; k < 8; k++)
        memcpy(buf + 32 + 16 * k, c->fpregs[(top + k) & 7], 10);
    int nxmm = c->long64 ? 16 : 8;
    for (int k = 0; k < nxmm; k++)
        memcpy(buf + 160 + 16 * k, c->xmm[k], 16);
    /* the reserved and software-available tail (from the last XMM register on) is
     * left as it was, as the hardware does (SDM Vol. 2 FXSAVE: bytes 464:511) */
    mem_write_bytes(c, lin, buf, 160 + 16 * nxmm);
}

void fxrstor(CPU *c, uint64_t lin, int rexw)
{
    if (c->cr0 & (CR0_EM | CR0_TS))
        RAISE(c, (c->cr0 & CR0_EM) ? EXC_UD : EXC_NM);
    if (lin & 15)
        RAISE_ERR(c, EXC_GP, 0);
    uint8_t buf[512];
    mem_read_bytes(c, lin, buf, 512);
    uint32_t mxcsr;
    memcpy(&mxcsr, buf + 24, 4);
    if (mxcsr & 0xffff0000u)
        RAISE_ERR(c, EXC_GP, 0);
    uint16_t cw, sw;
    memcpy(&cw, buf + 0, 2);
    memcpy(&sw, buf + 2, 2);
    c->fcw = fcw_value(cw);
    c->fsw = with_summary(sw, c->fcw);
    uint16_t ftw = 0;
    for (int k = 0; k < 8; k++)
        if (!(buf[4] & (1 << k)))
            ftw |= 3 << (2 * k);
    c->ftw = ftw;
    memcpy(&c->fop, buf + 6, 2);
    c->fop &= 0x7ff;
    if (rexw) {
        memcpy(&c->fip, buf + 8, 8);
        memcpy(&c->fdp, buf + 16, 8);
    } else {
        uint32_t ip, dp;
        memcpy(&ip, buf + 8, 4);
        memcpy(&c->fcs, buf + 12, 2);
        memcpy(&dp, buf + 16, 4);
        memcpy(&c->fds, buf + 20, 2);
        c->fip = ip;
        c->fdp = dp;
    }
    c->mxcsr = mxcsr;
    int top = fpu_top(c);
    for (int k = 0; k < 8; k++) {
        memcpy(c->fpregs[(top + k) & 7], buf + 32 + 16 * k, 10);
        memset(c->fpregs[(top + k) & 7] + 10, 0, 6);
    }
    /* the full tag word is recomputed from contents for non-empty registers */
    c->ftw = full_tag_word(c);
    int nxmm = c->long64 ? 16 : 8;
    for (int k = 0; k < nxmm; k++)
        memcpy(c->xmm[k], buf + 160 + 16 * k, 16);
}
