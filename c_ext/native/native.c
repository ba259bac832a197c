/* The native tier's code arena, x86-64 encoder and block compiler (see native.h). */
#include <stdlib.h>
#include <sys/mman.h>
#include "native.h"
#include "flags.h"

/* ---- arena ---- */

#define ARENA_SIZE (64u << 20)
/* the most one instruction can emit, with its exit stub: checked before each one */
#define INSN_MAX_CODE 200
/* a chained exit's code (emit_chain_exit), at most */
#define CHAIN_EXIT_CODE 256
/* an indirect exit's lookup (emit_lookup_exit), at most */
#define LOOKUP_EXIT_CODE 448
/* bytes of the prologue (push rbx, r12-r15, rbp; sub rsp, 8; mov rbx, rdi) a chained
 * jump skips: the frame is the same in every block, so one block's code can run on
 * another's */
#define NATIVE_CHAIN_ENTRY 17

int native_threshold_from_env(void)
{
    const char *s = getenv("KVMPY_TCG_NATIVE_THRESHOLD");
    if (!s || !*s)
        return NATIVE_DEFAULT_THRESHOLD;
    if (!strcmp(s, "off"))
        return NATIVE_OFF;
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v < 0 || v > 1000000000)
        return NATIVE_DEFAULT_THRESHOLD;
    return (int)v;
}

/* the arena's size: ARENA_SIZE, or KVMPY_TCG_ARENA_KB from 64 up (tests fill a
 * small one) */
static size_t arena_size_from_env(void)
{
    const char *s = getenv("KVMPY_TCG_ARENA_KB");
    char *end;
    long kb = s && *s ? strtol(s, &end, 10) : 0;
    if (kb < 64 || *end || kb > (long)(ARENA_SIZE >> 10))
        return ARENA_SIZE;
    return (size_t)kb << 10;
}

int native_arena_init(CPU *c)
{
    /* One RWX mapping: the arena is private to its vCPU thread and written only while
     * no block of it runs (compiles happen between blocks). Without it (a hardened
     * kernel refusing PROT_EXEC on anonymous memory) the tier stays off. */
    size_t size = arena_size_from_env();
    void *p = mmap(0, size, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        c->nat_arena = 0;
        c->nat_size = 0;
        return -1;
    }
    c->nat_arena = p;
    c->nat_size = size;
    c->nat_used = 0;
    return 0;
}

void native_arena_free(CPU *c)
{
    if (c->nat_arena)
        munmap(c->nat_arena, c->nat_size);
    c->nat_arena = 0;
    c->nat_size = 0;
}

/* ---- encoder: only what the compiler uses; rbx holds the CPU pointer ---- */

enum { RAX = 0, RCX = 1, RDX = 2, RBX = 3, RSP = 4, RBP = 5, RSI = 6, RDI = 7 };

/* The host registers that may hold guest registers (choose_cached), in the order they
 * are handed out: the callee-saved ones first. The code's scratch registers are rax,
 * rcx, rdx, rsi, rdi and r8; rbx holds the CPU. r9-r11 are not saved by the C
 * functions the code calls: emit_call_rax saves the ones in use around such a call,
 * and a helper that may write guest registers is followed by reload_cached anyway. */
static const int8_t cache_regs[] = { 12, 13, 14, 15, RBP, 9, 10, 11 };
#define CACHE_REGS ((int)sizeof cache_regs)

typedef struct Emit {
    uint8_t *p, *end;
    /* Guest registers cached in host registers within the block (choose_cached): guest
     * register n is also in host register host[n] (one of cache_regs), or host[n] is 0.
     * A 64-bit register write of the generated code goes to host[n] alone and marks it
     * in `dirty` (c->r[n] stale); flush_greg writes it back before anything reads
     * c->r[n]: any other access of it in memory (op_mem, the byte and word forms), a
     * slow path or helper call (the interpreter reads every register), a block exit.
     * After a helper call, or a write of c->r[n] in memory, host[n] is reloaded. */
    int8_t host[16];
    uint16_t dirty;
} Emit;

static void b1(Emit *e, uint8_t v) { *e->p++ = v; }
static void b4(Emit *e, uint32_t v) { memcpy(e->p, &v, 4); e->p += 4; }
static void b8(Emit *e, uint64_t v) { memcpy(e->p, &v, 8); e->p += 8; }

/* REX prefix: W (64-bit operand), R (the modrm reg field's register), B (the rm's) */
static uint8_t rex(int w, int r, int b)
{
    return (uint8_t)(0x40 | (w ? 8 : 0) | ((r >> 3) << 2) | (b >> 3));
}

/* mov [rbx + disp32], h (64 bits) */
static void store_host(Emit *e, int h, int32_t disp)
{
    b1(e, rex(1, h, 0)); b1(e, 0x89); b1(e, (uint8_t)(0x80 | ((h & 7) << 3) | RBX));
    b4(e, (uint32_t)disp);
}

/* mov h, [rbx + disp32] (64 bits) */
static void load_host(Emit *e, int h, int32_t disp)
{
    b1(e, rex(1, h, 0)); b1(e, 0x8b); b1(e, (uint8_t)(0x80 | ((h & 7) << 3) | RBX));
    b4(e, (uint32_t)disp);
}

/* opc with two registers, the modrm reg field `r` and rm `m` (w: 64-bit operands) */
static void op_rr(Emit *e, int w, uint8_t opc, int r, int m)
{
    b1(e, rex(w, r, m)); b1(e, opc); b1(e, (uint8_t)(0xc0 | ((r & 7) << 3) | (m & 7)));
}

#define CPU_OFF(field) ((int32_t)offsetof(CPU, field))
#define GREG(n) (CPU_OFF(r) + 8 * (int32_t)(n))

/* the guest register a [rbx + disp] operand is, whole, or -1 */
static int greg_at(int32_t disp)
{
    int32_t off = disp - GREG(0);
    return off >= 0 && off < 16 * 8 && !(off & 7) ? off >> 3 : -1;
}

/* c->r[n] = host[n] for the registers in `set` (the code's own state unchanged: an
 * out-of-line path uses it for the registers dirty where it branched off) */
static void emit_writeback(Emit *e, uint16_t set)
{
    for (int n = 0; n < 16; n++) {
        int h = e->host[n];
        if (!(set & (1u << n)))
            continue;
        store_host(e, h, GREG(n));
    }
}

/* c->r[n] = host[n] when only the host copy is current */
static void flush_greg(Emit *e, int n)
{
    emit_writeback(e, e->dirty & (uint16_t)(1u << n));
    e->dirty &= (uint16_t)~(1u << n);
}

static void flush_all(Emit *e)
{
    emit_writeback(e, e->dirty);
    e->dirty = 0;
}

/* host[n] = c->r[n] again, after something wrote the guest register in memory */
static void greg_written(Emit *e, int n)
{
    int h = e->host[n];
    if (!h)
        return;
    load_host(e, h, GREG(n));
}

static void reload_cached(Emit *e)
{
    for (int n = 0; n < 16; n++)
        greg_written(e, n);
}

/* call rax, to a C function that reads and writes no guest register: the cached
 * guest registers in caller-saved host registers are kept on the stack around it (an
 * even number of pushes, so the callee sees the stack aligned as the block has it) */
static void emit_call_rax(Emit *e)
{
    int saved[CACHE_REGS], ns = 0;
    for (int n = 0; n < 16; n++)
        if (e->host[n] >= 8 && e->host[n] <= 11)
            saved[ns++] = e->host[n];
    if (ns & 1)
        saved[ns++] = saved[0];
    for (int s = 0; s < ns; s++) {
        b1(e, 0x41); b1(e, (uint8_t)(0x50 | (saved[s] & 7)));    /* push r9-r11 */
    }
    b1(e, 0xff); b1(e, 0xd0);                                   /* call rax */
    for (int s = ns - 1; s >= 0; s--) {
        b1(e, 0x41); b1(e, (uint8_t)(0x58 | (saved[s] & 7)));    /* pop */
    }
}

/* opcodes op_mem emits that only read their memory operand */
static int op_reads_only(uint8_t opc)
{
    switch (opc) {
    case 0x8b: case 0x63: case 0x03: case 0x0b: case 0x13: case 0x1b: case 0x23: case 0x2b:
    case 0x33: case 0x3b: case 0x39: case 0x85:
        return 1;
    }
    return 0;
}

/* opcode with a register and [rbx + disp32]; w selects 64-bit operands. A load of a
 * cached guest register becomes a register move; a write to one updates its host copy. */
static void op_mem(Emit *e, int w, uint8_t opc, int reg, int32_t disp)
{
    int n = greg_at(disp);
    int h = n >= 0 ? e->host[n] : 0;
    if (h && opc == 0x8b) {
        op_rr(e, w, 0x8b, reg, h);                               /* mov reg, h */
        return;
    }
    if (h && opc == 0x89 && w) {
        op_rr(e, 1, 0x89, reg, h);                               /* mov h, reg */
        e->dirty |= (uint16_t)(1u << n);
        return;
    }
    if (h)
        flush_greg(e, n);
    if (w)
        b1(e, 0x48);
    b1(e, opc);
    b1(e, (uint8_t)(0x80 | ((reg & 7) << 3) | RBX));
    b4(e, (uint32_t)disp);
    if (h && !op_reads_only(opc))
        greg_written(e, n);
}

/* opc /ext [rbx + disp32], imm32 (c7 mov, 81 add/and...): op_mem with the immediate
 * in place before the host copy of a cached guest register is reloaded */
static void op_mem_imm32(Emit *e, int w, uint8_t opc, int ext, int32_t disp, uint32_t imm)
{
    int n = greg_at(disp);
    if (n >= 0)
        flush_greg(e, n);
    if (w)
        b1(e, 0x48);
    b1(e, opc);
    b1(e, (uint8_t)(0x80 | ((ext & 7) << 3) | RBX));
    b4(e, (uint32_t)disp);
    b4(e, imm);
    if (n >= 0)
        greg_written(e, n);
}

static void load64(Emit *e, int reg, int32_t disp) { op_mem(e, 1, 0x8b, reg, disp); }
/* zero-extends into the whole register, like the interpreter's (uint32_t) reads */
static void load32(Emit *e, int reg, int32_t disp) { op_mem(e, 0, 0x8b, reg, disp); }
static void store64(Emit *e, int reg, int32_t disp) { op_mem(e, 1, 0x89, reg, disp); }

/* Host register h (any of them) = guest register n, whole (w) or zero-extended from
 * 32 bits: a move from its cached copy, else a load */
static void greg_to_host(Emit *e, int w, int h, int n)
{
    int src = e->host[n];
    if (src) {
        op_rr(e, w, 0x8b, h, src);                               /* mov h, src */
        return;
    }
    b1(e, rex(w, h, 0)); b1(e, 0x8b); b1(e, (uint8_t)(0x80 | ((h & 7) << 3) | RBX));
    b4(e, (uint32_t)GREG(n));
}

/* mov h, imm for any host register h: the shortest form giving the 64-bit value */
static void mov_imm_host(Emit *e, int h, uint64_t v)
{
    if (v <= 0xffffffffull) {
        if (h >= 8)
            b1(e, 0x41);
        b1(e, (uint8_t)(0xb8 + (h & 7)));                        /* mov r32, imm32 zero-extends */
        b4(e, (uint32_t)v);
    } else if ((int64_t)v == (int32_t)v) {
        b1(e, rex(1, 0, h)); b1(e, 0xc7); b1(e, (uint8_t)(0xc0 | (h & 7)));
        b4(e, (uint32_t)v);
    } else {
        b1(e, rex(1, 0, h)); b1(e, (uint8_t)(0xb8 + (h & 7)));
        b8(e, v);
    }
}

/* mov dword [rbx + disp], imm32 */
static void store32_imm(Emit *e, int32_t disp, uint32_t imm)
{
    op_mem_imm32(e, 0, 0xc7, 0, disp, imm);
}

/* mov qword [rbx + disp], simm32 */
static void store64_simm(Emit *e, int32_t disp, int32_t imm)
{
    op_mem_imm32(e, 1, 0xc7, 0, disp, (uint32_t)imm);
}

/* add qword [rbx + disp], imm32 */
static void add64_mem_imm(Emit *e, int32_t disp, int32_t imm)
{
    op_mem_imm32(e, 1, 0x81, 0, disp, (uint32_t)imm);
}

/* mov reg, imm: the shortest form that yields the same 64-bit value */
static void mov_imm(Emit *e, int reg, uint64_t v)
{
    if (v <= 0xffffffffull) {
        b1(e, (uint8_t)(0xb8 + reg));           /* mov r32, imm32 zero-extends */
        b4(e, (uint32_t)v);
    } else if ((int64_t)v == (int32_t)v) {
        b1(e, 0x48); b1(e, 0xc7); b1(e, (uint8_t)(0xc0 | reg));
        b4(e, (uint32_t)v);
    } else {
        b1(e, 0x48); b1(e, (uint8_t)(0xb8 + reg));
        b8(e, v);
    }
}

/* store a 64-bit constant to [rbx + disp] (through rax when it needs 64 bits) */
static void store64_const(Emit *e, int32_t disp, uint64_t v)
{
    if ((int64_t)v == (int32_t)v) {
        store64_simm(e, disp, (int32_t)v);
    } else {
        mov_imm(e, RAX, v);
        store64(e, RAX, disp);
    }
}

/* two-register ALU op (01 add, 09 or, 21 and, 29 sub, 31 xor, 39 cmp, 85 test):
 * opc dst, src, 64-bit */
static void alu_rr(Emit *e, uint8_t opc, int dst, int src)
{
    b1(e, 0x48);
    b1(e, opc);
    b1(e, (uint8_t)(0xc0 | (src << 3) | dst));
}

static void mov32_rr(Emit *e, int dst, int src)   /* mov dst32, src32: clears the high half */
{
    b1(e, 0x89);
    b1(e, (uint8_t)(0xc0 | (src << 3) | dst));
}

static void shl_imm(Emit *e, int reg, uint8_t n)
{
    b1(e, 0x48); b1(e, 0xc1); b1(e, (uint8_t)(0xe0 | reg)); b1(e, n);
}

static uint8_t *jcc32(Emit *e, uint8_t cc)   /* returns the rel32 field to patch */
{
    b1(e, 0x0f); b1(e, (uint8_t)(0x80 | cc));
    uint8_t *at = e->p;
    b4(e, 0);
    return at;
}

static void patch_rel32(uint8_t *at, uint8_t *target)
{
    int32_t rel = (int32_t)(target - (at + 4));
    memcpy(at, &rel, 4);
}

/* [base + rdx + disp32]: a TLB entry, rdx its offset from base */
static void op_tlb(Emit *e, int w, uint8_t opc, int reg, int base, int32_t disp)
{
    if (w)
        b1(e, 0x48);
    b1(e, opc);
    b1(e, (uint8_t)(0x84 | ((reg & 7) << 3)));
    b1(e, (uint8_t)((RDX << 3) | base));
    b4(e, (uint32_t)disp);
}

/* ---- what has a native form ---- */

/* ALU operation numbers of decode.c's P_ALUX forms (the modrm reg field) */
enum { ALU_ADD = 0, ALU_OR = 1, ALU_AND = 4, ALU_SUB = 5, ALU_XOR = 6, ALU_CMP = 7 };

static int alux_form(const Insn *i, int *form, int *aluop)
{
    if (i->op < P_ALUX || i->op >= P_ALUX + 32)
        return 0;
    *form = (i->op - P_ALUX) / 8;   /* 0 RR64, 1 RR32, 2 RI64, 3 RI32 */
    *aluop = (i->op - P_ALUX) % 8;
    switch (*aluop) {
    case ALU_ADD: case ALU_OR: case ALU_AND: case ALU_SUB: case ALU_XOR: case ALU_CMP:
        return 1;
    }
    return 0;
}

static int alu_op_ok(int aluop)
{
    return aluop == ALU_ADD || aluop == ALU_OR || aluop == ALU_AND || aluop == ALU_SUB ||
           aluop == ALU_XOR || aluop == ALU_CMP;
}

/* a memory operand the inline TLB path can address: 32/64-bit addressing */
static int mem_ok(const Insn *i)
{
    return i->mod != 3 && (i->asz == 8 || i->asz == 4) && i->index != RIPREG && i->seg < 6;
}

/* The ALU forms without a decoder specialisation (byte operands, memory operands,
 * adc/sbb, the accumulator forms, test): what gen_alu() compiles */
enum { GA_E_REG, GA_REG_E, GA_ACC_IMM, GA_E_IMM, GA_TEST_E_REG, GA_TEST_E_IMM, GA_TEST_ACC_IMM };
enum { ALU_ADC = 2, ALU_SBB = 3 };

static int gen_alu_form(const Insn *i, int *aluop, unsigned *sz, int *kind)
{
    unsigned op = i->op;
    if (op < 0x40 && (op & 7) <= 5) {
        *aluop = (int)(op >> 3);
        *sz = (op & 1) ? i->osz : 1;
        *kind = (op & 7) <= 1 ? GA_E_REG : (op & 7) <= 3 ? GA_REG_E : GA_ACC_IMM;
    } else if (op == 0x80 || op == 0x81 || op == 0x83) {
        *aluop = i->reg & 7;
        *sz = op == 0x80 ? 1 : i->osz;
        *kind = GA_E_IMM;
    } else if (op == 0x84 || op == 0x85) {
        *aluop = ALU_AND;
        *sz = op == 0x84 ? 1 : i->osz;
        *kind = GA_TEST_E_REG;
    } else if (op == 0xa8 || op == 0xa9) {
        *aluop = ALU_AND;
        *sz = op == 0xa8 ? 1 : i->osz;
        *kind = GA_TEST_ACC_IMM;
    } else if ((op == 0xf6 || op == 0xf7) && (i->reg & 7) <= 1) {
        *aluop = ALU_AND;
        *sz = op == 0xf6 ? 1 : i->osz;
        *kind = GA_TEST_E_IMM;
    } else {
        return 0;
    }
    if (i->lock)   /* atomic on the host: a read-modify-write of memory only (else #UD) */
        return (*kind == GA_E_REG || *kind == GA_E_IMM) && *aluop != ALU_CMP && mem_ok(i);
    if (*kind == GA_ACC_IMM || *kind == GA_TEST_ACC_IMM)
        return 1;
    return i->mod == 3 || mem_ok(i);
}

static int gen_alu_mem(const Insn *i, int kind)
{
    return kind != GA_ACC_IMM && kind != GA_TEST_ACC_IMM && i->mod != 3;
}

int native_has_form(const Insn *i)
{
    int form, aluop, kind;
    unsigned sz;
    if (alux_form(i, &form, &aluop))
        return 1;
    if (gen_alu_form(i, &aluop, &sz, &kind))
        return 1;
    switch (i->op) {
    case P_MOV_RM_R64: case P_MOV_RM_R32: case P_MOV_R_RM64: case P_MOV_R_RM32:
    case P_TEST_RR64: case P_TEST_RR32:
    case P_SHIFT_RI64: case P_SHIFT_RI32:
        return 1;
    case P_LOAD64: case P_LOAD32: case P_STORE64: case P_STORE32:
        return mem_ok(i);
    case P_LOAD_ALU64: case P_LOAD_ALU32:
        return alu_op_ok((int)(i->imm2 & 0xff)) && ((i->imm2 & 0x100) || mem_ok(i));
    case P_LEA64:
        return (i->asz == 8 || i->asz == 4) && i->index != RIPREG;
    case 0x1b6: case 0x1b7: case 0x1be: case 0x1bf:   /* movzx, movsx */
        return (i->osz == 4 || i->osz == 8) && !i->lock && (i->mod == 3 || mem_ok(i));
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf:
        return i->osz == 4 || i->osz == 8;
    case 0x1af:   /* imul r, r/m */
        return (i->osz == 4 || i->osz == 8) && (i->mod == 3 || mem_ok(i));
    case 0x69: case 0x6b:   /* imul r, r/m, imm */
        return (i->osz == 4 || i->osz == 8) && (i->mod == 3 || mem_ok(i)) &&
               (int64_t)i->imm == (int32_t)i->imm;
    case 0x40: case 0x41: case 0x42: case 0x43: case 0x44: case 0x45: case 0x46: case 0x47:
    case 0x48: case 0x49: case 0x4a: case 0x4b: case 0x4c: case 0x4d: case 0x4e: case 0x4f:
        return i->osz == 4;   /* inc/dec r32 outside 64-bit mode (where 40-4F are REX) */
    case 0xff:   /* inc/dec of a register or memory; jmp/call near (is_indirect, with the mode) */
        if ((i->reg & 7) == 2 || (i->reg & 7) == 4)
            return !i->lock && (i->osz == 4 || i->osz == 8) && (i->mod == 3 || mem_ok(i));
        if ((i->reg & 7) <= 1 && i->mod != 3)
            return mem_ok(i);   /* any size, lock-prefixed too */
        return (i->reg & 7) <= 1 && i->mod == 3 && !i->lock && (i->osz == 4 || i->osz == 8);
    case 0x70: case 0x71: case 0x72: case 0x73: case 0x74: case 0x75: case 0x76: case 0x77:
    case 0x78: case 0x79: case 0x7a: case 0x7b: case 0x7c: case 0x7d: case 0x7e: case 0x7f:
    case 0x180: case 0x181: case 0x182: case 0x183: case 0x184: case 0x185: case 0x186: case 0x187:
    case 0x188: case 0x189: case 0x18a: case 0x18b: case 0x18c: case 0x18d: case 0x18e: case 0x18f:
    case 0xe9: case 0xeb:
        return 1;
    case 0x11f:   /* hint nop: no memory access */
        return 1;
    case 0x10d: case 0x118: case 0x119: case 0x11a: case 0x11b: case 0x11c: case 0x11d: case 0x11e:
        return !i->lock;   /* prefetches and hint nops: the interpreter's do nothing either */
    case 0x131:   /* rdtsc: the host's TSC plus the guest's offset, as the handler */
        return !i->lock;
    case 0xfa:    /* cli: at CPL 0 (else the helper's IOPL check) */
        return !i->lock;
    case 0x8c:    /* mov r/m, sreg */
        return (i->reg & 7) <= 5 && !i->lock && (i->mod == 3 || mem_ok(i));
    case 0x1ba:   /* bt, bts, btr, btc r/m32|64, imm8 (lock-prefixed on memory too) */
        return (i->reg & 7) >= 4 && (i->osz == 4 || i->osz == 8) &&
               (i->mod == 3 ? !i->lock : mem_ok(i) && (!i->lock || (i->reg & 7) > 4));
    case 0x90:    /* nop and pause (with REX.B it is xchg r8, rax) */
        return i->reg == 0;
    case 0xfe:    /* inc/dec of a byte in memory */
        return (i->reg & 7) <= 1 && i->mod != 3 && mem_ok(i);
    case 0x86: case 0x87:   /* xchg with memory: always atomic */
        return i->mod != 3 && mem_ok(i);
    case 0x1b0: case 0x1b1:   /* cmpxchg with memory */
        return i->mod != 3 && mem_ok(i);
    case 0x89: case 0x8b:   /* 16-bit mov (the decoder specialises 32 and 64 bits) */
        return i->osz == 2 && !i->lock && (i->mod == 3 || mem_ok(i));
    case 0x63:    /* movsxd r64, r/m32 (64-bit code only: 63 is arpl elsewhere) */
        return i->osz == 8 && (i->mod == 3 || mem_ok(i));
    case 0xc1:    /* rol/ror r32|r64, imm8 (the shifts are P_SHIFT_RI*) */
        return (i->reg & 7) <= 1 && i->mod == 3 && (i->osz == 4 || i->osz == 8);
    case 0x8d:    /* lea r32 (lea r64 is P_LEA64) */
        return i->mod != 3 && i->osz == 4 && (i->asz == 8 || i->asz == 4) && i->index != RIPREG;
    case 0xd3:    /* shl, shr, sar r32|r64 by cl */
        return ((i->reg & 7) == 4 || (i->reg & 7) == 5 || (i->reg & 7) == 7) && i->mod == 3 &&
               (i->osz == 4 || i->osz == 8);
    case 0xd1:    /* rol, ror, shl, shr, sar r32|r64 by 1 */
        return (i->reg & 7) != 2 && (i->reg & 7) != 3 && (i->reg & 7) != 6 && i->mod == 3 &&
               (i->osz == 4 || i->osz == 8);
    case 0xc6: case 0xc7:   /* mov r/m, imm */
        return (i->reg & 7) == 0 && !i->lock && (i->op == 0xc6 || i->osz == 2 || i->osz == 4 || i->osz == 8) &&
               (i->mod == 3 || mem_ok(i));
    case 0x88: case 0x8a:   /* mov of a byte */
        return !i->lock && (i->mod == 3 || mem_ok(i));
    case 0xf6: case 0xf7:   /* not, neg of a register; mul, div r/m32|64 */
        if (i->op == 0xf7 && ((i->reg & 7) == 6 || (i->reg & 7) == 4))
            return !i->lock && (i->osz == 4 || i->osz == 8) && (i->mod == 3 || mem_ok(i));
        return ((i->reg & 7) == 2 || (i->reg & 7) == 3) && i->mod == 3 && !i->lock &&
               (i->op == 0xf6 || i->osz == 4 || i->osz == 8);
    case 0x1c8: case 0x1c9: case 0x1ca: case 0x1cb: case 0x1cc: case 0x1cd: case 0x1ce: case 0x1cf:
        return i->osz == 4 || i->osz == 8;   /* bswap */
    case 0x190: case 0x191: case 0x192: case 0x193: case 0x194: case 0x195: case 0x196: case 0x197:
    case 0x198: case 0x199: case 0x19a: case 0x19b: case 0x19c: case 0x19d: case 0x19e: case 0x19f:
        return i->mod == 3;   /* setcc r8 */
    case 0x140: case 0x141: case 0x142: case 0x143: case 0x144: case 0x145: case 0x146: case 0x147:
    case 0x148: case 0x149: case 0x14a: case 0x14b: case 0x14c: case 0x14d: case 0x14e: case 0x14f:
        return i->mod == 3 && (i->osz == 4 || i->osz == 8);   /* cmovcc r, r */
    /* the stack: the operand size must be the mode's stack width (stack_osz), which
     * emit_native checks with the block's mode; 16-bit forms stay with the helper */
    case 0x50: case 0x51: case 0x52: case 0x53: case 0x54: case 0x55: case 0x56: case 0x57:
    case 0x58: case 0x59: case 0x5a: case 0x5b: case 0x5c: case 0x5d: case 0x5e: case 0x5f:
    case 0x68: case 0x6a: case 0xe8: case 0xc3: case 0xc2:
        return i->osz == 8 || i->osz == 4;
    }
    return 0;
}

/* ---- the compiler's state for one block ---- */

/* An out-of-line path: a TLB miss (slow) runs the instruction through the helper and
 * resumes after it; an early end (stub) leaves crediting the instructions run. */
typedef struct Slow {
    uint8_t *jump;      /* rel32 of the branch to it */
    uint8_t *jump2;     /* and of a second one (the stack-size guard), or 0 */
    uint8_t *resume;    /* 0: the instruction ends the block, leave after it */
    Insn *insn;
    uint64_t rip;
    int done;
    /* the lazy-flag kind (and size) the instruction leaves, which the path rebuilds in
     * the host flags before it rejoins, so they are live after either path; -1 none */
    int remat_kind;
    unsigned remat_sz;
    uint16_t dirty;     /* the cached registers to write back before the interpreter runs */
} Slow;

typedef struct Comp {
    Emit e;
    CPU *c;
    Block *b;
    NativeStepFn step;
    int long64;
    Slow slow[BLOCK_MAX_INSNS];
    int nslow;
    Slow stub[2 * BLOCK_MAX_INSNS];
    int nstub;
    /* host flags hold the guest's arithmetic flags of the instruction just emitted:
     * LIVE_ALL, or LIVE_NO_OF when the host's OF may differ (a shift by more than 1) */
    int flags_live;
    /* the lazy kind (CC_*) of the producer whose flags are live: which of the host's
     * undefined flags (AF after logic ops and shifts) the guest defines as 0 */
    int live_kind;
    /* what the lazy record in the CPU holds at this point for certain, written by a
     * native form of this block (kind CC_*, size), or -1: the consumers rebuild host
     * flags from it (emit_remat) instead of calling cond() */
    int known;
    unsigned known_sz;
    int known_set;   /* the instruction being emitted called set_known */
    /* the flags of this instruction are overwritten before anything can see them but
     * host-flag consumers: it need not write the lazy record */
    int cc_dead;
    /* the last producer skipped the lazy record (cc_dead); a consumer that then finds
     * no host flags (a bug in the liveness analysis) sets `failed`: the block stays
     * interpreted rather than run wrong */
    int cc_missing;
    int failed;
    /* the main path runs an instruction through the interpreter (emit_step_call) */
    int steps;
    /* where the block's body starts, past the prologue and the cached registers' loads:
     * a jump back to the block's own start enters here (emit_chain_exit) */
    uint8_t *body;
} Comp;

enum { LIVE_ALL = 1, LIVE_NO_OF = 2 };

/* Can condition cc be read from the host flags at liveness `live`? */
static int live_for(int live, int cc)
{
    int uses_of = (cc >> 1) == 0 || (cc >> 1) == 6 || (cc >> 1) == 7;
    return live == LIVE_ALL || (live == LIVE_NO_OF && !uses_of);
}

/* bt qword [rbx + cc_c], 0: host CF = the carry an inc/dec kept or adc/sbb took in */
static void emit_cf_from_cc_c(Emit *e)
{
    b1(e, 0x48); b1(e, 0x0f); b1(e, 0xba); b1(e, 0xa3); b4(e, (uint32_t)CPU_OFF(cc_c)); b1(e, 0);
}

static int remat_kind_ok(int kind)
{
    return kind == CC_ADD || kind == CC_SUB || kind == CC_ADC || kind == CC_SBB ||
           kind == CC_LOGIC || kind == CC_INC || kind == CC_DEC;
}

/* The host flags from the lazy record of kind `kind` and size sz (what the block's own
 * native form wrote): the operation run again at the guest's size on the recorded
 * operands, so every flag a condition reads is the guest's. Clobbers rax and rcx. */
static void emit_remat(Comp *k, int kind, unsigned sz)
{
    Emit *e = &k->e;
    uint8_t opc;
    switch (kind) {
    case CC_LOGIC: case CC_INC: case CC_DEC:
        load64(e, RAX, CPU_OFF(cc_res));
        if (kind != CC_LOGIC) {
            b1(e, 0x48); b1(e, 0x8d); b1(e, 0x40); b1(e, kind == CC_INC ? 0xff : 0x01);   /* lea rax, [rax -+ 1] */
            emit_cf_from_cc_c(e);
        }
        if (sz == 2)
            b1(e, 0x66);
        if (sz == 8)
            b1(e, 0x48);
        if (kind == CC_LOGIC) {
            b1(e, sz == 1 ? 0x84 : 0x85); b1(e, 0xc0);          /* test (al|ax|eax|rax) itself */
        } else {
            b1(e, sz == 1 ? 0xfe : 0xff); b1(e, kind == CC_INC ? 0xc0 : 0xc8);   /* inc|dec: CF stays */
        }
        break;
    default:   /* add, sub, adc, sbb: a in rax, b in rcx */
        load64(e, RAX, CPU_OFF(cc_a));
        load64(e, RCX, CPU_OFF(cc_b));
        if (kind == CC_ADC || kind == CC_SBB)
            emit_cf_from_cc_c(e);
        opc = kind == CC_ADD ? 0x01 : kind == CC_ADC ? 0x11 : kind == CC_SBB ? 0x19 : 0x39;
        if (sz == 2)
            b1(e, 0x66);
        if (sz == 8)
            b1(e, 0x48);
        b1(e, (uint8_t)(opc - (sz == 1))); b1(e, 0xc8);         /* op (al|ax|eax|rax), (cl|cx|ecx|rcx) */
        break;
    }
    k->live_kind = kind;   /* the caller says how long they stay live */
}

/* Makes the guest's condition cc readable from the host flags, which are at liveness
 * `live`, rebuilding them from the lazy record when it is known; returns their
 * liveness then, or 0 (the caller asks cond()) */
static int emit_flags_for(Comp *k, int live, int cc)
{
    if (live_for(live, cc))
        return live;
    if (k->known >= 0 && remat_kind_ok(k->known)) {
        emit_remat(k, k->known, k->known_sz);
        return LIVE_ALL;
    }
    if (k->cc_missing)
        k->failed = 1;
    return 0;
}

/* condition codes 2 and 3 (b, ae) read CF alone */
#define CC_CARRY 2

/* A producer wrote the lazy record kind/sz (CC_EAGER and the shifts: one emit_remat
 * cannot rebuild), or skipped it (cc_dead) */
static void set_known(Comp *k, int kind, unsigned sz)
{
    k->known = k->cc_dead ? -1 : kind;
    k->known_sz = sz;
    k->known_set = 1;
    k->cc_missing = k->cc_dead;
}

/* The host flags a producer leaves as the guest's: live at `live`, of lazy kind */
static void set_live(Comp *k, int live, int kind)
{
    k->flags_live = live;
    k->live_kind = kind;
}

/* ---- native forms ---- */

static int native_cond(CPU *c, int cc);
#define native_cond_fn native_cond

/* The interpreter's alu() + set_cc() with a in rax and b in rcx; the result goes to
 * guest register dst (unless cmp). Ends with the operation at its guest size, so the
 * host flags are the guest's. */
static void emit_alu_core(Comp *k, int aluop, int wide, int dst)
{
    Emit *e = &k->e;
    int logic = aluop == ALU_OR || aluop == ALU_AND || aluop == ALU_XOR;
    uint32_t cc = logic ? CC_LOGIC : aluop == ALU_ADD ? CC_ADD : CC_SUB;
    static const uint8_t opc[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_AND] = 0x21,
                                    [ALU_SUB] = 0x29, [ALU_XOR] = 0x31, [ALU_CMP] = 0x29 };
    /* 64-bit arithmetic on zero-extended 32-bit operands: the same cc_res bits as the
     * interpreter's uint64_t sums */
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);              /* mov rdx, rax */
    alu_rr(e, opc[aluop], RDX, RCX);
    if (!logic) {   /* (a logic record's operands are never read: flags.h) */
        if (!k->cc_dead) store64(e, RAX, CPU_OFF(cc_a));
        if (!k->cc_dead) store64(e, RCX, CPU_OFF(cc_b));
    }
    if (!k->cc_dead) store64(e, RDX, CPU_OFF(cc_res));
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_op), cc);
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
    if (aluop != ALU_CMP) {
        if (!wide)
            mov32_rr(e, RDX, RDX);
        store64(e, RDX, GREG(dst));
    }
    /* the same operation at the guest's size, for the host flags only (a 64-bit one
     * left them so already: only movs came after it) */
    static const uint8_t flag_opc[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_AND] = 0x85,
                                         [ALU_SUB] = 0x39, [ALU_XOR] = 0x31, [ALU_CMP] = 0x39 };
    if (!wide) {
        b1(e, flag_opc[aluop]);
        b1(e, (uint8_t)(0xc0 | (RCX << 3) | RAX));
    }
    set_live(k, LIVE_ALL, (int)cc);
    set_known(k, (int)cc, wide ? 8 : 4);
}

/* guest register dst = src (64 bits, or 32 zero-extended): one host move where either
 * is cached */
static void emit_mov_greg(Emit *e, int wide, int dst, int src)
{
    int h = e->host[dst];
    if (h) {
        greg_to_host(e, wide, h, src);
        e->dirty |= (uint16_t)(1u << dst);
        return;
    }
    if (wide)
        load64(e, RAX, GREG(src));
    else
        load32(e, RAX, GREG(src));
    store64(e, RAX, GREG(dst));
}

/* emit_alux on a cached destination, in place: `op h, src` with the source cached, in
 * memory or an immediate. The host operation at the guest's size leaves the guest's
 * flags and (at 32 bits) the zero-extended result. The lazy record takes the host
 * registers whole: its readers mask every field to cc_size (flags.h), so the upper
 * halves of a 32-bit record's operands do not matter. A compare whose record is read
 * subtracts in rdx. Returns 0 when it does not apply. */
static int emit_alux_cached(Comp *k, const Insn *i, int form, int aluop)
{
    Emit *e = &k->e;
    int wide = form == 0 || form == 2, h = e->host[i->rm];
    int imm_form = form >= 2;
    int logic = aluop == ALU_OR || aluop == ALU_AND || aluop == ALU_XOR;
    uint32_t cc = logic ? CC_LOGIC : aluop == ALU_ADD ? CC_ADD : CC_SUB;
    int src = imm_form ? 0 : e->host[i->reg];
    if (!h || (imm_form && wide && (int64_t)i->imm != (int32_t)i->imm))
        return 0;
    uint64_t imm = wide ? i->imm : (uint32_t)i->imm;
    if (!k->cc_dead && !logic) {
        store_host(e, h, CPU_OFF(cc_a));
        if (imm_form) {
            store64_const(e, CPU_OFF(cc_b), imm);
        } else if (src) {
            store_host(e, src, CPU_OFF(cc_b));
        } else {
            load64(e, RCX, GREG(i->reg));
            store64(e, RCX, CPU_OFF(cc_b));
        }
    }
    int dst = h, op = aluop;
    if (aluop == ALU_CMP && !k->cc_dead) {
        op_rr(e, 1, 0x8b, RDX, h);                               /* mov rdx, h */
        dst = RDX;
        op = ALU_SUB;
    }
    static const uint8_t ext[8] = { [ALU_ADD] = 0, [ALU_OR] = 1, [ALU_AND] = 4, [ALU_SUB] = 5,
                                    [ALU_XOR] = 6, [ALU_CMP] = 7 };
    static const uint8_t opc_rm[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_AND] = 0x21,
                                       [ALU_SUB] = 0x29, [ALU_XOR] = 0x31, [ALU_CMP] = 0x39 };
    if (imm_form) {
        b1(e, rex(wide, 0, dst)); b1(e, 0x81); b1(e, (uint8_t)(0xc0 | (ext[op] << 3) | (dst & 7)));
        b4(e, (uint32_t)imm);                                    /* op dst, imm32 */
    } else if (src) {
        op_rr(e, wide, opc_rm[op], src, dst);                    /* op dst, src */
    } else {
        b1(e, rex(wide, dst, 0)); b1(e, (uint8_t)(opc_rm[op] + 2));   /* op dst, [rbx + src] */
        b1(e, (uint8_t)(0x80 | ((dst & 7) << 3) | RBX));
        b4(e, (uint32_t)GREG(i->reg));
    }
    if (aluop != ALU_CMP)
        e->dirty |= (uint16_t)(1u << i->rm);
    if (!k->cc_dead) {
        store_host(e, dst, CPU_OFF(cc_res));
        store32_imm(e, CPU_OFF(cc_op), cc);
        store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
    }
    set_live(k, LIVE_ALL, (int)cc);
    set_known(k, (int)cc, wide ? 8 : 4);
    return 1;
}

static void emit_alux(Comp *k, const Insn *i, int form, int aluop)
{
    Emit *e = &k->e;
    int wide = form == 0 || form == 2;
    if (emit_alux_cached(k, i, form, aluop))
        return;
    if (wide)
        load64(e, RAX, GREG(i->rm));
    else
        load32(e, RAX, GREG(i->rm));
    if (form >= 2)
        mov_imm(e, RCX, wide ? i->imm : (uint32_t)i->imm);
    else if (wide)
        load64(e, RCX, GREG(i->reg));
    else
        load32(e, RCX, GREG(i->reg));
    emit_alu_core(k, aluop, wide, i->rm);
}

/* rax = offset of i's memory operand (ea_off); next_rip for rip-relative forms. One
 * lea where there are registers (their cached copies, else loaded into rax and rcx):
 * a 32-bit lea for 32-bit addressing keeps the low half, as the interpreter's wrap. */
static void emit_ea_off(Emit *e, const Insn *i, uint64_t next_rip)
{
    uint64_t disp = (uint64_t)i->disp;
    int has_base = i->base != NOREG && i->base != RIPREG, has_index = i->index != NOREG;
    if ((has_base || has_index) && (int64_t)disp == (int32_t)disp) {
        int base = 0, index = 0, w = i->asz == 8;
        if (has_base && !(base = e->host[i->base])) {
            load64(e, RAX, GREG(i->base));
            base = RAX;
        }
        if (has_index && !(index = e->host[i->index])) {
            load64(e, RCX, GREG(i->index));
            index = RCX;
        }
        b1(e, (uint8_t)(rex(w, RAX, has_base ? base : 0) | (has_index ? (index >> 3) << 1 : 0)));
        b1(e, 0x8d);
        /* [base + index*scale + disp32] (mod 10), or [index*scale + disp32] (mod 00, no
         * base); an index field of 100 without REX.X is "no index" */
        b1(e, has_base ? 0x84 : 0x04);
        b1(e, (uint8_t)((i->scale << 6) | ((has_index ? index : RSP) & 7) << 3 | (has_base ? base & 7 : RBP)));
        b4(e, (uint32_t)disp);
        return;
    }
    if (i->base == RIPREG)
        disp += next_rip;
    mov_imm(e, RAX, disp);
    if (i->base != NOREG && i->base != RIPREG) {
        load64(e, RCX, GREG(i->base));
        alu_rr(e, 0x01, RAX, RCX);
    }
    if (i->index != NOREG) {
        load64(e, RCX, GREG(i->index));
        if (i->scale)
            shl_imm(e, RCX, i->scale);
        alu_rr(e, 0x01, RAX, RCX);
    }
    if (i->asz == 4)
        mov32_rr(e, RAX, RAX);
}

/* A new out-of-line path running i through the interpreter (see Slow) */
static int new_slow(Comp *k, Insn *i, uint64_t rip, int done)
{
    Slow *s = &k->slow[k->nslow];
    memset(s, 0, sizeof *s);
    s->remat_kind = -1;
    s->dirty = k->e.dirty;
    s->insn = i;
    s->rip = rip;
    s->done = done;
    return k->nslow++;
}

/* Linear address in rax -> host address in rax through the TLB (tlb_hit in access.h);
 * a miss, a page crossing or a slow page branches to slow path s. Clobbers rcx, rdx, rdi. */
static void emit_tlb(Comp *k, int s, unsigned size, int write)
{
    Emit *e = &k->e;
    /* rdi = rbx + the row of this mmu_idx: off the path from the address to the data,
     * which the entry's loads then address as [rdi + rdx + offset] */
    op_mem(e, 1, 0x63, RDI, CPU_OFF(mmu_idx));                  /* movsxd rdi, mmu_idx */
    b1(e, 0x48); b1(e, 0x69); b1(e, 0xff); b4(e, (uint32_t)(TLB_SIZE * sizeof(TlbEnt)));   /* imul rdi, rdi, row */
    b1(e, 0x48); b1(e, 0x01); b1(e, 0xdf);                      /* add rdi, rbx */
    /* rdx = the entry's offset in its row, ((rax >> 12) & (TLB_SIZE-1)) * 64: a shift
     * and a mask on the way from the address to the data */
    _Static_assert(sizeof(TlbEnt) == 64 && TLB_SIZE <= 4096, "emit_tlb's index arithmetic");
    b1(e, 0x89); b1(e, 0xc2);                                   /* mov edx, eax */
    b1(e, 0xc1); b1(e, 0xea); b1(e, 6);                         /* shr edx, 6 */
    b1(e, 0x81); b1(e, 0xe2); b4(e, (TLB_SIZE - 1) << 6);       /* and edx, (TLB_SIZE-1) << 6 */
    /* the page of the last byte: differs from the tag when the access crosses a page */
    b1(e, 0x48); b1(e, 0x8d); b1(e, 0x48); b1(e, (uint8_t)(size - 1));   /* lea rcx, [rax+size-1] */
    b1(e, 0x48); b1(e, 0x81); b1(e, 0xe1); b4(e, 0xfffff000u);          /* and rcx, ~0xfff */
    op_tlb(e, 1, 0x3b, RCX, RDI, CPU_OFF(tlb) + (int32_t)(write ? offsetof(TlbEnt, tag_w)
                                                                 : offsetof(TlbEnt, tag_r)));
    k->slow[s].jump = jcc32(e, 0x5);                            /* jne slow */
    op_tlb(e, 1, 0x03, RAX, RDI, CPU_OFF(tlb) + (int32_t)offsetof(TlbEnt, addend));   /* add rax, addend */
}

/* Host address of i's memory operand in rax through the TLB; a miss, a page crossing
 * or a slow page branches to an out-of-line path that runs the whole instruction
 * through the interpreter. Returns the slow path's index. */
static int emit_mem(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, unsigned size, int write, int done)
{
    Emit *e = &k->e;
    emit_ea_off(e, i, next_rip);
    /* linear(): flat in 64-bit code but for FS/GS; 32-bit wrap otherwise */
    if (!k->long64 || i->seg >= S_FS)
        op_mem(e, 1, 0x03, RAX, CPU_OFF(seg) + (int32_t)(i->seg * sizeof(Seg)) +
                                    (int32_t)offsetof(Seg, base));   /* add rax, base */
    if (!k->long64)
        mov32_rr(e, RAX, RAX);
    int s = new_slow(k, i, rip, done);
    emit_tlb(k, s, size, write);
    return s;
}

/* ---- the stack (push, pop, call, ret): 64-bit code, or 32-bit code on a 32-bit stack ---- */

/* The operand size of a stack form with a native form in this block's mode, or 0 */
static unsigned stack_osz(const Insn *i, int long64)
{
    return long64 ? (i->osz == 8 ? 8 : 0) : (i->osz == 4 ? 4 : 0);
}

/* rax = linear address of the stack at rsp + delta, as sp_add/sp_lin do. Outside
 * 64-bit code SS must be a 32-bit stack: checked here (SS can change within a block's
 * mode), a 16-bit one takes slow path s. */
static void emit_stack_lin(Comp *k, int s, int32_t delta)
{
    Emit *e = &k->e;
    if (k->long64) {
        load64(e, RAX, GREG(R_SP));
        if (delta) {
            b1(e, 0x48); b1(e, 0x05); b4(e, (uint32_t)delta);  /* add rax, imm32 */
        }
        return;
    }
    int32_t ss = CPU_OFF(seg) + (int32_t)(S_SS * sizeof(Seg));
    b1(e, 0x80); b1(e, 0xbb); b4(e, (uint32_t)(ss + (int32_t)offsetof(Seg, db))); b1(e, 0);   /* cmp byte [rbx+db], 0 */
    k->slow[s].jump2 = jcc32(e, 0x4);                           /* je slow */
    load32(e, RAX, GREG(R_SP));
    if (delta) {
        b1(e, 0x05); b4(e, (uint32_t)delta);                    /* add eax, imm32: wraps at 32 bits */
    }
    op_mem(e, 1, 0x03, RAX, ss + (int32_t)offsetof(Seg, base)); /* add rax, ss.base */
    mov32_rr(e, RAX, RAX);
}

/* rsp += delta at the stack's size (after the access succeeded) */
static void emit_sp_add(Comp *k, int32_t delta)
{
    Emit *e = &k->e;
    if (k->long64) {
        op_mem_imm32(e, 1, 0x81, 0, GREG(R_SP), (uint32_t)delta);   /* add qword [rbx+rsp], imm32 */
        return;
    }
    load32(e, RCX, GREG(R_SP));
    b1(e, 0x81); b1(e, 0xc1); b4(e, (uint32_t)delta);           /* add ecx, imm32 */
    store64(e, RCX, GREG(R_SP));                                /* the upper half cleared, as sp_add */
}

/* push of rcx (the value, loaded by `load_value` after the address checks) */
static int emit_push(Comp *k, Insn *i, uint64_t rip, int done, unsigned sz)
{
    int s = new_slow(k, i, rip, done);
    emit_stack_lin(k, s, -(int32_t)sz);
    emit_tlb(k, s, sz, 1);
    return s;
}

static void emit_store_rcx(Emit *e, unsigned sz)
{
    if (sz == 8)
        b1(e, 0x48);
    b1(e, 0x89); b1(e, 0x08);                                   /* mov [rax], (r|e)cx */
}

/* movzx/movsx eax|rax from a register: [rbx + disp], the byte registers AH-BH at +1 */
static int32_t byte_reg_disp(const Insn *i, int r);

/* the guest register a byte register operand is part of */
static int byte_reg_greg(const Insn *i, int r)
{
    return !i->rex && r >= 4 && r < 8 ? r - 4 : r;
}

/* Is byte register r of i the low byte of guest register r (not ah, ch, dh, bh)? */
static int low_byte_reg(const Insn *i, int r)
{
    return i->rex || r < 4 || r >= 8;
}

/* A mov(z|s)x whose register source is the low byte or word of a register */
static int movx_low_source(const Insn *i)
{
    return !(i->op == 0x1b6 || i->op == 0x1be) || low_byte_reg(i, i->rm);
}

static int32_t byte_reg_disp(const Insn *i, int r)
{
    if (!i->rex && r >= 4 && r < 8)
        return GREG(r - 4) + 1;
    return GREG(r);
}

static uint64_t native_get_cf(CPU *c)
{
    return (uint64_t)get_cf(c);
}

/* rol/ror's flags, as shift_op: CF and OF from the result r, the others as they were */
static void native_rotate_flags(CPU *c, uint64_t r, uint32_t how)
{
    unsigned bits = how >> 8;
    uint32_t f = compute_arith(c), cf, of;
    if ((how & 0xff) == 0) {
        cf = r & 1;
        of = ((r >> (bits - 1)) & 1) ^ cf;
    } else {
        cf = (r >> (bits - 1)) & 1;
        of = cf ^ ((r >> (bits - 2)) & 1);
    }
    set_flags(c, (f & ~(F_CF | F_OF)) | cf | (of ? F_OF : 0));
}

/* eax = cond(c, cc), or the host's own condition when the guest's flags are live in
 * the host flags or can be rebuilt there: then al = cc and the host flags stay
 * (returns their liveness, else 0) */
static int emit_cond_al(Comp *k, int cc, int flags_live)
{
    Emit *e = &k->e;
    int live = emit_flags_for(k, flags_live, cc);
    if (live) {
        b1(e, 0x0f); b1(e, (uint8_t)(0x90 | cc)); b1(e, 0xc0); /* setcc al */
        return live;
    }
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                      /* mov rdi, rbx */
    mov_imm(e, RSI, (uint64_t)cc);
    mov_imm(e, RAX, (uint64_t)(uintptr_t)native_cond_fn);
    emit_call_rax(e);
    return 0;
}

/* inc/dec of a register: CF kept (cc_c), the rest from the result, as inc_dec_reg */
static void emit_inc_dec(Comp *k, int r, int wide, int inc, int flags_were_live)
{
    Emit *e = &k->e;
    if (emit_flags_for(k, flags_were_live, CC_CARRY)) {
        b1(e, 0x0f); b1(e, 0x92); b1(e, 0xc1);                  /* setc cl */
        b1(e, 0x0f); b1(e, 0xb6); b1(e, 0xc9);                  /* movzx ecx, cl */
    } else {
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                  /* mov rdi, rbx */
        mov_imm(e, RAX, (uint64_t)(uintptr_t)native_get_cf);
        emit_call_rax(e);
        b1(e, 0x89); b1(e, 0xc1);                               /* mov ecx, eax */
        b1(e, 0x0f); b1(e, 0xba); b1(e, 0xe1); b1(e, 0);        /* bt ecx, 0: host CF = guest CF */
    }
    if (!k->cc_dead) store64(e, RCX, CPU_OFF(cc_c));
    op_mem(e, wide, 0x8b, RAX, GREG(r));
    if (wide)
        b1(e, 0x48);
    b1(e, 0xff); b1(e, (uint8_t)(inc ? 0xc0 : 0xc8));         /* inc/dec (e|r)ax: CF stays */
    if (!k->cc_dead) store64(e, RAX, CPU_OFF(cc_res));
    store64(e, RAX, GREG(r));
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_op), inc ? CC_INC : CC_DEC);
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
    set_live(k, LIVE_ALL, inc ? CC_INC : CC_DEC);
    set_known(k, inc ? CC_INC : CC_DEC, wide ? 8 : 4);
}

/* imul_reg_rm: eager flags, CF = OF = signed overflow, SF ZF PF from the result */
static void emit_imul_tail(Comp *k, const Insn *i)
{
    Emit *e = &k->e;
    int wide = i->osz == 8;
    if (i->op == 0x1af) {
        op_mem(e, wide, 0x8b, RCX, GREG(i->reg));
        if (wide)
            b1(e, 0x48);
        b1(e, 0x0f); b1(e, 0xaf); b1(e, 0xc1);                  /* imul (e|r)ax, (e|r)cx */
    } else {
        if (wide)
            b1(e, 0x48);
        b1(e, 0x69); b1(e, 0xc0); b4(e, (uint32_t)i->imm);     /* imul (e|r)ax, (e|r)ax, imm32 */
    }
    set_known(k, CC_EAGER, 0);
    if (k->cc_dead) {   /* nothing reads these flags: the product alone */
        store64(e, RAX, GREG(i->reg));
        return;
    }
    b1(e, 0x0f); b1(e, 0x90); b1(e, 0xc2);                      /* seto dl */
    store64(e, RAX, GREG(i->reg));
    if (wide)
        b1(e, 0x48);
    b1(e, 0x85); b1(e, 0xc0);                                   /* test (e|r)ax, (e|r)ax */
    b1(e, 0x9c); b1(e, 0x59);                                   /* pushf; pop rcx */
    b1(e, 0x81); b1(e, 0xe1); b4(e, F_ZF | F_SF | F_PF);        /* and ecx, ZF|SF|PF */
    b1(e, 0x0f); b1(e, 0xb6); b1(e, 0xd2);                      /* movzx edx, dl */
    b1(e, 0x69); b1(e, 0xd2); b4(e, F_CF | F_OF);               /* imul edx, edx, CF|OF */
    b1(e, 0x09); b1(e, 0xd1);                                   /* or ecx, edx */
    if (!k->cc_dead) store64(e, RCX, CPU_OFF(cc_res));
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_op), CC_EAGER);
}

/* The interpreter's alu() for any operation and size 1, 4 or 8: a in rax, b in rcx
 * (zero-extended), for adc/sbb the carry in r8 (0/1). Leaves the result in rdx (upper
 * bits as the 64-bit sum has them) and the host flags as the guest's. */
static void emit_alu_core_any(Comp *k, int aluop, unsigned sz)
{
    Emit *e = &k->e;
    int logic = aluop == ALU_OR || aluop == ALU_AND || aluop == ALU_XOR;
    int carry = aluop == ALU_ADC || aluop == ALU_SBB;
    static const uint32_t ccop[8] = { [ALU_ADD] = CC_ADD, [ALU_OR] = CC_LOGIC, [ALU_ADC] = CC_ADC,
                                      [ALU_SBB] = CC_SBB, [ALU_AND] = CC_LOGIC, [ALU_SUB] = CC_SUB,
                                      [ALU_XOR] = CC_LOGIC, [ALU_CMP] = CC_SUB };
    static const uint8_t opc[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_ADC] = 0x01,
                                    [ALU_SBB] = 0x29, [ALU_AND] = 0x21, [ALU_SUB] = 0x29,
                                    [ALU_XOR] = 0x31, [ALU_CMP] = 0x29 };
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                      /* mov rdx, rax */
    alu_rr(e, opc[aluop], RDX, RCX);
    if (carry) {
        b1(e, 0x4c); b1(e, opc[aluop]); b1(e, 0xc2);            /* add|sub rdx, r8 */
    }
    if (!k->cc_dead) {
        if (!logic) {
            store64(e, RAX, CPU_OFF(cc_a));
            store64(e, RCX, CPU_OFF(cc_b));
        }
        if (carry) {
            b1(e, 0x4c); b1(e, 0x89); b1(e, 0x83); b4(e, (uint32_t)CPU_OFF(cc_c));   /* mov cc_c, r8 */
        }
        store64(e, RDX, CPU_OFF(cc_res));
        store32_imm(e, CPU_OFF(cc_op), ccop[aluop]);
        store32_imm(e, CPU_OFF(cc_size), sz);
    }
    if (carry) {
        b1(e, 0x41); b1(e, 0x0f); b1(e, 0xba); b1(e, 0xe0); b1(e, 0);   /* bt r8d, 0: CF = carry in */
    }
    /* the same operation at the guest's size, for the host flags only (a 64-bit one
     * without a carry left them so already: only movs came after it) */
    static const uint8_t flag_opc[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_ADC] = 0x11,
                                         [ALU_SBB] = 0x19, [ALU_AND] = 0x85, [ALU_SUB] = 0x39,
                                         [ALU_XOR] = 0x31, [ALU_CMP] = 0x39 };
    if (sz != 8 || carry) {
        if (sz == 2)
            b1(e, 0x66);
        if (sz == 8)
            b1(e, 0x48);
        b1(e, (uint8_t)(flag_opc[aluop] - (sz == 1)));             /* the byte form: one less */
        b1(e, (uint8_t)(0xc0 | (RCX << 3) | RAX));
    }
    set_live(k, LIVE_ALL, (int)ccop[aluop]);
    set_known(k, (int)ccop[aluop], sz);
}

/* reg = guest register r at size sz, zero-extended */
static void load_greg(Comp *k, const Insn *i, int reg, int r, unsigned sz)
{
    Emit *e = &k->e;
    if (sz == 1) {
        b1(e, 0x0f); b1(e, 0xb6); b1(e, (uint8_t)(0x80 | (reg << 3) | RBX));   /* movzx reg32, byte [rbx+d] */
        b4(e, (uint32_t)byte_reg_disp(i, r));
    } else if (sz == 2) {
        b1(e, 0x0f); b1(e, 0xb7); b1(e, (uint8_t)(0x80 | (reg << 3) | RBX));   /* movzx reg32, word [rbx+d] */
        b4(e, (uint32_t)GREG(r));
    } else {
        op_mem(e, sz == 8, 0x8b, reg, GREG(r));
    }
}

/* reg = [rsi] at size sz, zero-extended */
static void load_rsi(Emit *e, int reg, unsigned sz)
{
    if (sz == 1) {
        b1(e, 0x0f); b1(e, 0xb6); b1(e, (uint8_t)((reg << 3) | RSI));
    } else if (sz == 2) {
        b1(e, 0x0f); b1(e, 0xb7); b1(e, (uint8_t)((reg << 3) | RSI));   /* movzx reg32, word [rsi] */
    } else {
        if (sz == 8)
            b1(e, 0x48);
        b1(e, 0x8b); b1(e, (uint8_t)((reg << 3) | RSI));
    }
}

/* r8 = the guest's CF, for adc/sbb: from the host flags when they are the guest's */
static void emit_carry_r8(Comp *k, int flags_live)
{
    Emit *e = &k->e;
    if (emit_flags_for(k, flags_live, CC_CARRY)) {
        b1(e, 0x41); b1(e, 0x0f); b1(e, 0x92); b1(e, 0xc0);     /* setc r8b */
        b1(e, 0x45); b1(e, 0x0f); b1(e, 0xb6); b1(e, 0xc0);     /* movzx r8d, r8b */
        return;
    }
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                      /* mov rdi, rbx */
    mov_imm(e, RAX, (uint64_t)(uintptr_t)native_get_cf);
    emit_call_rax(e);
    b1(e, 0x41); b1(e, 0x89); b1(e, 0xc0);                      /* mov r8d, eax */
}

/* lock cmpxchg [rsi], (dl|dx|edx|rdx): compares with (al|ax|eax|rax) */
static void emit_lock_cmpxchg_rsi_rdx(Emit *e, unsigned sz)
{
    b1(e, 0xf0);
    if (sz == 2)
        b1(e, 0x66);
    if (sz == 8)
        b1(e, 0x48);
    b1(e, 0x0f); b1(e, sz == 1 ? 0xb0 : 0xb1); b1(e, (uint8_t)((RDX << 3) | RSI));
}

/* A lock-prefixed read-modify-write of [rsi] (a host address past the TLB check) with
 * the second operand guest register i->reg (src < 0) or imm: the host's lock cmpxchg
 * retried until no other vCPU wrote in between, as alu_E's atomic path. Leaves the
 * value it replaced in rax and the operand in rcx, zero-extended, for
 * emit_alu_core_any to record the flags from (adc/sbb: the carry in r8, read once
 * before, as alu_E restores the flags it read from on a retry). */
static void emit_locked_rmw(Comp *k, const Insn *i, int aluop, unsigned sz, int src, uint64_t imm)
{
    Emit *e = &k->e;
    static const uint8_t opc[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_ADC] = 0x01,
                                    [ALU_SBB] = 0x29, [ALU_AND] = 0x21, [ALU_SUB] = 0x29,
                                    [ALU_XOR] = 0x31, [ALU_CMP] = 0x29 };
    if (src < 0)
        load_greg(k, i, RCX, i->reg, sz);
    else
        mov_imm(e, RCX, imm);
    uint8_t *retry = e->p;
    load_rsi(e, RAX, sz);
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                      /* mov rdx, rax */
    alu_rr(e, opc[aluop], RDX, RCX);
    if (aluop == ALU_ADC || aluop == ALU_SBB) {
        b1(e, 0x4c); b1(e, opc[aluop]); b1(e, 0xc2);            /* add|sub rdx, r8 */
    }
    emit_lock_cmpxchg_rsi_rdx(e, sz);
    b1(e, 0x0f); b1(e, 0x85);                                   /* jne retry */
    b4(e, (uint32_t)(int32_t)(retry - (e->p + 4)));
}

/* guest register r = rdx's low sz bytes, as setreg: bytes and words keep the rest of
 * the register, a dword zero-extends */
static void store_greg_rdx(Comp *k, const Insn *i, int r, unsigned sz)
{
    Emit *e = &k->e;
    if (sz == 1) {
        b1(e, 0x88); b1(e, 0x93); b4(e, (uint32_t)byte_reg_disp(i, r));   /* mov [rbx+d], dl */
        greg_written(e, byte_reg_greg(i, r));
    } else if (sz == 2) {
        b1(e, 0x66); b1(e, 0x89); b1(e, 0x93); b4(e, (uint32_t)GREG(r));  /* mov [rbx+d], dx */
        greg_written(e, r);
    } else {
        if (sz == 4)
            mov32_rr(e, RDX, RDX);
        store64(e, RDX, GREG(r));
    }
}

/* an operand-size prefix, REX.W and opcode for a size: the byte form is opc8 */
static void op_sized(Emit *e, unsigned sz, uint8_t opc8, int two_byte)
{
    if (sz == 2)
        b1(e, 0x66);
    if (sz == 8)
        b1(e, 0x48);
    if (two_byte)
        b1(e, 0x0f);
    b1(e, (uint8_t)(sz == 1 ? opc8 : opc8 + 1));
}

/* inc/dec of memory (FE/FF /0 /1), lock-prefixed or not, as inc_dec_rm: CF kept in
 * cc_c, the rest from the result. Returns the slow path. */
static int emit_inc_dec_mem(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done, unsigned sz,
                            int flags_were_live)
{
    Emit *e = &k->e;
    int inc = (i->reg & 7) == 0;
    if (!k->cc_dead)
        emit_carry_r8(k, flags_were_live);                      /* before: it may call out */
    int s = emit_mem(k, i, rip, next_rip, sz, 1, done);
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);                      /* mov rsi, rax */
    uint8_t *retry = e->p;
    load_rsi(e, RAX, sz);
    b1(e, 0x48); b1(e, 0x8d); b1(e, 0x50); b1(e, inc ? 0x01 : 0xff);   /* lea rdx, [rax +- 1] */
    if (i->lock) {
        emit_lock_cmpxchg_rsi_rdx(e, sz);
        b1(e, 0x0f); b1(e, 0x85);                               /* jne retry */
        b4(e, (uint32_t)(int32_t)(retry - (e->p + 4)));
    } else {
        op_sized(e, sz, 0x88, 0);
        b1(e, (uint8_t)((RDX << 3) | RSI));                     /* mov [rsi], (dl|dx|edx|rdx) */
    }
    if (!k->cc_dead) {
        b1(e, 0x4c); b1(e, 0x89); b1(e, 0x83); b4(e, (uint32_t)CPU_OFF(cc_c));   /* mov cc_c, r8 */
        store64(e, RDX, CPU_OFF(cc_res));
        store32_imm(e, CPU_OFF(cc_op), inc ? CC_INC : CC_DEC);
        store32_imm(e, CPU_OFF(cc_size), sz);
    }
    set_known(k, inc ? CC_INC : CC_DEC, sz);
    return s;
}

/* xchg of a register with memory (86/87): the host's xchg, atomic like the guest's */
static int emit_xchg_mem(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    unsigned sz = i->op == 0x86 ? 1 : i->osz;
    int s = emit_mem(k, i, rip, next_rip, sz, 1, done);
    load_greg(k, i, RDX, i->reg, sz);
    op_sized(e, sz, 0x86, 0);
    b1(e, (uint8_t)(RDX << 3));                                 /* xchg [rax], (dl|dx|edx|rdx) */
    store_greg_rdx(k, i, i->reg, sz);
    return s;
}

/* cmpxchg with memory (0F B0/B1), lock-prefixed or not: the host's lock cmpxchg (a
 * guest without lock cannot tell). The flags are cmp(accumulator, value found), the
 * accumulator takes the value found when it differed, as the cmpxchg handler. */
static int emit_cmpxchg_mem(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    unsigned sz = i->op == 0x1b0 ? 1 : i->osz;
    int s = emit_mem(k, i, rip, next_rip, sz, 1, done);
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);                      /* mov rsi, rax */
    load_greg(k, i, RDX, i->reg, sz);
    load_greg(k, i, RAX, R_AX, sz);
    b1(e, 0x49); b1(e, 0x89); b1(e, 0xc0);                      /* mov r8, rax: the accumulator */
    emit_lock_cmpxchg_rsi_rdx(e, sz);                           /* rax = the value found, zero-extended */
    b1(e, 0x4c); b1(e, 0x89); b1(e, 0xc2);                      /* mov rdx, r8 */
    b1(e, 0x48); b1(e, 0x29); b1(e, 0xc2);                      /* sub rdx, rax */
    if (!k->cc_dead) {
        b1(e, 0x4c); b1(e, 0x89); b1(e, 0x83); b4(e, (uint32_t)CPU_OFF(cc_a));   /* mov cc_a, r8 */
        store64(e, RAX, CPU_OFF(cc_b));
        store64(e, RDX, CPU_OFF(cc_res));
        store32_imm(e, CPU_OFF(cc_op), CC_SUB);
        store32_imm(e, CPU_OFF(cc_size), sz);
    }
    set_known(k, CC_SUB, sz);
    b1(e, 0x48); b1(e, 0x85); b1(e, 0xd2);                      /* test rdx, rdx */
    uint8_t *same = jcc32(e, 0x4);                              /* je: the accumulator stays */
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                      /* mov rdx, rax */
    store_greg_rdx(k, i, R_AX, sz);
    patch_rel32(same, e->p);
    return s;
}

/* unsigned div r/m32|64 (F7 /6): a quotient too wide (the high half not below the
 * divisor, which a zero divisor always is) takes the slow path, where the interpreter
 * raises #DE with rip and every register as before the instruction. With a memory
 * operand that is the TLB miss's path (it runs the whole instruction again), so a
 * block of divs needs one slow path each. Flags stay as they were. */
static int emit_div(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    unsigned sz = i->osz;
    int w = sz == 8;
    int s;
    if (i->mod == 3) {
        s = new_slow(k, i, rip, done);
        op_mem(e, w, 0x8b, RCX, GREG(i->rm));
    } else {
        s = emit_mem(k, i, rip, next_rip, sz, 0, done);
        if (w)
            b1(e, 0x48);
        b1(e, 0x8b); b1(e, 0x08);                               /* mov (r|e)cx, [rax] */
    }
    op_mem(e, w, 0x8b, RDX, GREG(R_DX));
    op_mem(e, w, 0x8b, RAX, GREG(R_AX));
    b1(e, 0x48); b1(e, 0x39); b1(e, 0xca);                      /* cmp rdx, rcx */
    if (i->mod == 3)
        k->slow[s].jump = jcc32(e, 0x3);                        /* jae: #DE */
    else
        k->slow[s].jump2 = jcc32(e, 0x3);
    if (w)
        b1(e, 0x48);
    b1(e, 0xf7); b1(e, 0xf1);                                   /* div (e|r)cx */
    store64(e, RAX, GREG(R_AX));                                /* 32 bits: zero-extended by the host */
    store64(e, RDX, GREG(R_DX));
    return s;
}

/* unsigned mul r/m32|64 (F7 /4): rdx:rax = rax * operand; CF = OF = a non-zero high
 * half, SF, ZF, PF from the low half (as do_mul, eagerly) */
static int emit_mul(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    int w = i->osz == 8;
    int s = -1;
    if (i->mod == 3) {
        op_mem(e, w, 0x8b, RCX, GREG(i->rm));
    } else {
        s = emit_mem(k, i, rip, next_rip, i->osz, 0, done);
        if (w)
            b1(e, 0x48);
        b1(e, 0x8b); b1(e, 0x08);                               /* mov (r|e)cx, [rax] */
    }
    op_mem(e, w, 0x8b, RAX, GREG(R_AX));
    if (w)
        b1(e, 0x48);
    b1(e, 0xf7); b1(e, 0xe1);                                   /* mul (e|r)cx */
    store64(e, RAX, GREG(R_AX));                                /* 32 bits: zero-extended by the host */
    store64(e, RDX, GREG(R_DX));
    set_known(k, CC_EAGER, 0);
    if (k->cc_dead)
        return s;
    b1(e, 0x0f); b1(e, 0x92); b1(e, 0xc1);                      /* setc cl: the high half is not zero */
    if (w)
        b1(e, 0x48);
    b1(e, 0x85); b1(e, 0xc0);                                   /* test (e|r)ax, (e|r)ax */
    b1(e, 0x9c); b1(e, 0x5a);                                   /* pushf; pop rdx */
    b1(e, 0x81); b1(e, 0xe2); b4(e, F_ZF | F_SF | F_PF);        /* and edx, ZF|SF|PF */
    b1(e, 0x0f); b1(e, 0xb6); b1(e, 0xc9);                      /* movzx ecx, cl */
    b1(e, 0x69); b1(e, 0xc9); b4(e, F_CF | F_OF);               /* imul ecx, ecx, CF|OF */
    b1(e, 0x09); b1(e, 0xca);                                   /* or edx, ecx */
    store64(e, RDX, CPU_OFF(cc_res));
    store32_imm(e, CPU_OFF(cc_op), CC_EAGER);
    return s;
}

/* bt's flags, as bit_op: CF the bit, the others as they were */
static void native_bt_flags(CPU *c, uint64_t cf)
{
    set_flags(c, (compute_arith(c) & ~F_CF) | (uint32_t)(cf & 1));
}

/* bt/bts/btr/btc r/m32|64, imm8 (0F BA /4-7): the host's own, which wraps the bit
 * offset at the operand size as the guest's does, locked on memory when the guest's
 * is. Returns the slow path or -1. */
static int emit_bit_test_imm(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    int w = i->osz == 8, kind = i->reg & 7, s = -1;
    if (i->mod == 3) {
        op_mem(e, w, 0x8b, RAX, GREG(i->rm));
        if (w)
            b1(e, 0x48);
        b1(e, 0x0f); b1(e, 0xba); b1(e, (uint8_t)(0xc0 | (kind << 3) | RAX)); b1(e, (uint8_t)i->imm);
        if (kind != 4)
            store64(e, RAX, GREG(i->rm));                       /* 32 bits: zero-extended by the host */
    } else {
        s = emit_mem(k, i, rip, next_rip, i->osz, kind != 4, done);
        if (i->lock)
            b1(e, 0xf0);
        if (w)
            b1(e, 0x48);
        b1(e, 0x0f); b1(e, 0xba); b1(e, (uint8_t)((kind << 3) | RAX)); b1(e, (uint8_t)i->imm);   /* [rax] */
    }
    set_known(k, CC_EAGER, 0);
    if (k->cc_dead)
        return s;
    b1(e, 0x40); b1(e, 0x0f); b1(e, 0x92); b1(e, 0xc6);         /* setc sil */
    b1(e, 0x40); b1(e, 0x0f); b1(e, 0xb6); b1(e, 0xf6);         /* movzx esi, sil */
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                      /* mov rdi, rbx */
    mov_imm(e, RAX, (uint64_t)(uintptr_t)native_bt_flags);
    emit_call_rax(e);
    return s;
}

/* rdtsc: edx:eax = the host's TSC + tsc_offset, each half zero-extended */
static void emit_rdtsc(Comp *k)
{
    Emit *e = &k->e;
    b1(e, 0x0f); b1(e, 0x31);                                   /* rdtsc */
    b1(e, 0x48); b1(e, 0xc1); b1(e, 0xe2); b1(e, 32);           /* shl rdx, 32 */
    b1(e, 0x48); b1(e, 0x09); b1(e, 0xd0);                      /* or rax, rdx */
    op_mem(e, 1, 0x03, RAX, CPU_OFF(tsc_offset));              /* add rax, [rbx+tsc_offset] */
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                      /* mov rdx, rax */
    b1(e, 0x48); b1(e, 0xc1); b1(e, 0xea); b1(e, 32);           /* shr rdx, 32 */
    mov32_rr(e, RAX, RAX);
    store64(e, RAX, GREG(R_AX));
    store64(e, RDX, GREG(R_DX));
}

/* mov r/m, sreg (8C): a register takes the selector at the operand size (a word keeps
 * the upper bits, a dword or qword is zero-extended), memory a word. Returns the slow
 * path or -1. */
static int emit_mov_from_sreg(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    int32_t sel = CPU_OFF(seg) + (int32_t)((i->reg & 7) * sizeof(Seg)) + (int32_t)offsetof(Seg, sel);
    if (i->mod == 3) {
        b1(e, 0x0f); b1(e, 0xb7); b1(e, 0x83); b4(e, (uint32_t)sel);   /* movzx eax, word [rbx+sel] */
        if (i->osz == 2) {
            b1(e, 0x66); b1(e, 0x89); b1(e, 0x83); b4(e, (uint32_t)GREG(i->rm));   /* mov [rbx+d], ax */
            greg_written(e, i->rm);
        } else {
            store64(e, RAX, GREG(i->rm));
        }
        return -1;
    }
    int s = emit_mem(k, i, rip, next_rip, 2, 1, done);
    b1(e, 0x0f); b1(e, 0xb7); b1(e, 0x8b); b4(e, (uint32_t)sel);       /* movzx ecx, word [rbx+sel] */
    b1(e, 0x66); b1(e, 0x89); b1(e, 0x08);                      /* mov [rax], cx */
    return s;
}

/* A gen_alu_form() instruction; returns its slow path or -1 */
static int emit_gen_alu(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done, int flags_were_live)
{
    Emit *e = &k->e;
    int aluop, kind, slow = -1;
    unsigned sz;
    gen_alu_form(i, &aluop, &sz, &kind);
    int mem = gen_alu_mem(i, kind);
    int test = kind >= GA_TEST_E_REG;
    int store = !test && aluop != ALU_CMP;
    if (aluop == ALU_ADC || aluop == ALU_SBB)
        emit_carry_r8(k, flags_were_live);
    if (mem) {
        slow = emit_mem(k, i, rip, next_rip, sz, store && kind != GA_REG_E, done);
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);                  /* mov rsi, rax */
    }
    uint64_t imm = i->imm & szmask(sz);
    if (i->lock) {
        emit_locked_rmw(k, i, aluop, sz, kind == GA_E_REG ? -1 : 0, imm);
        emit_alu_core_any(k, aluop, sz);   /* the flags from the value the exchange found */
        return slow;
    }
    switch (kind) {
    case GA_E_REG: case GA_TEST_E_REG: case GA_E_IMM: case GA_TEST_E_IMM:
        if (mem)
            load_rsi(e, RAX, sz);
        else
            load_greg(k, i, RAX, i->rm, sz);
        if (kind == GA_E_REG || kind == GA_TEST_E_REG)
            load_greg(k, i, RCX, i->reg, sz);
        else
            mov_imm(e, RCX, imm);
        break;
    case GA_REG_E:
        load_greg(k, i, RAX, i->reg, sz);
        if (mem)
            load_rsi(e, RCX, sz);
        else
            load_greg(k, i, RCX, i->rm, sz);
        break;
    default:   /* the accumulator and an immediate */
        load_greg(k, i, RAX, R_AX, sz);
        mov_imm(e, RCX, imm);
        break;
    }
    emit_alu_core_any(k, aluop, sz);
    if (store) {
        /* movs keep the host flags */
        if (mem && kind != GA_REG_E) {
            if (sz == 2)
                b1(e, 0x66);
            if (sz == 8)
                b1(e, 0x48);
            b1(e, sz == 1 ? 0x88 : 0x89); b1(e, (uint8_t)((RDX << 3) | RSI));   /* mov [rsi], (dl|dx|edx|rdx) */
        } else {
            int r = kind == GA_REG_E ? i->reg : kind == GA_ACC_IMM ? R_AX : i->rm;
            if (sz == 1) {
                b1(e, 0x88); b1(e, (uint8_t)(0x80 | (RDX << 3) | RBX));   /* mov [rbx+d], dl */
                b4(e, (uint32_t)byte_reg_disp(i, r));
                greg_written(e, byte_reg_greg(i, r));
            } else if (sz == 2) {   /* the upper 48 bits stay */
                b1(e, 0x66); b1(e, 0x89); b1(e, (uint8_t)(0x80 | (RDX << 3) | RBX));
                b4(e, (uint32_t)GREG(r));
                greg_written(e, r);
            } else {
                if (sz == 4)
                    mov32_rr(e, RDX, RDX);
                store64(e, RDX, GREG(r));
            }
        }
    }
    return slow;
}

/* shl/shr/sar of a register by a constant: the lazy record as shift_group2 writes it */
static void emit_shift_reg(Comp *k, int r, int wide, unsigned n, int kind)
{
    Emit *e = &k->e;
    if (!n) {
        if (!wide) {   /* a 32-bit destination is written even for count 0 */
            load32(e, RAX, GREG(r));
            store64(e, RAX, GREG(r));
        }
        return;
    }
    int lazy = kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL;
    if (k->cc_dead && e->host[r]) {
        /* in place: the host shift leaves the flags the consumers read (below) */
        int h = e->host[r];
        b1(e, rex(wide, 0, h)); b1(e, 0xc1); b1(e, (uint8_t)(0xc0 | (kind << 3) | (h & 7))); b1(e, (uint8_t)n);
        e->dirty |= (uint16_t)(1u << r);
        set_live(k, n == 1 ? LIVE_ALL : LIVE_NO_OF, lazy);
        set_known(k, lazy, wide ? 8 : 4);
        return;
    }
    op_mem(e, wide, 0x8b, RAX, GREG(r));
    if (!k->cc_dead) store64(e, RAX, CPU_OFF(cc_a));
    if (!k->cc_dead) store64_simm(e, CPU_OFF(cc_b), (int32_t)n);
    if (wide)
        b1(e, 0x48);
    b1(e, 0xc1); b1(e, (uint8_t)(0xc0 | (kind << 3) | RAX)); b1(e, (uint8_t)n);
    if (!k->cc_dead) store64(e, RAX, CPU_OFF(cc_res));
    store64(e, RAX, GREG(r));
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_op), kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL);
    if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
    /* the host's shift by a constant sets CF SF ZF PF as the guest's; OF too for a
     * count of 1 (else it is undefined on the host, defined by shift_group2) */
    set_live(k, n == 1 ? LIVE_ALL : LIVE_NO_OF, lazy);
    set_known(k, lazy, wide ? 8 : 4);
}

/* rol/ror of a register by a constant; returns 1 when the flags stayed as they were
 * (count 0). With the guest's flags in the host flags (live or rebuilt), the host's
 * rotate keeps SF ZF AF PF and sets CF as the guest's; OF (undefined on the host past
 * a count of 1) comes from the result as shift_op has it, and the whole set is stored
 * eagerly. Otherwise native_rotate_flags works it out from the lazy record. */
static int emit_rotate_reg(Comp *k, int r, int wide, unsigned n, int kind, int flags_were_live)
{
    Emit *e = &k->e;
    unsigned bits = wide ? 64 : 32;
    int host = n && !k->cc_dead && emit_flags_for(k, flags_were_live, CC_CARRY);
    op_mem(e, wide, 0x8b, RAX, GREG(r));                       /* a 32-bit load zero-extends */
    if (n) {
        if (wide)
            b1(e, 0x48);
        b1(e, 0xc1); b1(e, (uint8_t)(0xc0 | (kind << 3) | RAX)); b1(e, (uint8_t)n);
    }
    store64(e, RAX, GREG(r));
    if (host) {
        /* AF after a logic op or a shift is undefined on the host, 0 for the guest */
        int af_zero = k->live_kind == CC_LOGIC || k->live_kind == CC_SHL || k->live_kind == CC_SHR ||
                      k->live_kind == CC_SAR;
        uint32_t keep = F_ARITH & ~(F_OF | (af_zero ? F_AF : 0u));
        b1(e, 0x9c); b1(e, 0x59);                               /* pushf; pop rcx */
        b1(e, 0x81); b1(e, 0xe1); b4(e, keep);                  /* and ecx, keep */
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                  /* mov rdx, rax */
        b1(e, 0x48); b1(e, 0xc1); b1(e, 0xea); b1(e, (uint8_t)(bits - 1));   /* shr rdx, bits-1: the top bit */
        if (kind == 0) {
            b1(e, 0x31); b1(e, 0xc2);                           /* xor edx, eax: ^ bit 0 (CF) */
        } else {
            b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);              /* mov rsi, rax */
            b1(e, 0x48); b1(e, 0xc1); b1(e, 0xee); b1(e, (uint8_t)(bits - 2));   /* shr rsi, bits-2 */
            b1(e, 0x31); b1(e, 0xf2);                           /* xor edx, esi */
        }
        b1(e, 0x83); b1(e, 0xe2); b1(e, 0x01);                  /* and edx, 1 */
        b1(e, 0xc1); b1(e, 0xe2); b1(e, 11);                    /* shl edx, 11: OF */
        b1(e, 0x09); b1(e, 0xd1);                               /* or ecx, edx */
        store64(e, RCX, CPU_OFF(cc_res));
        store32_imm(e, CPU_OFF(cc_op), CC_EAGER);
    } else if (n && !k->cc_dead && k->known == CC_EAGER) {
        /* the flags before are the record's own (a rotate before this one, say): CF and
         * OF replaced in it, as native_rotate_flags does, without the call */
        load64(e, RCX, CPU_OFF(cc_res));
        b1(e, 0x81); b1(e, 0xe1); b4(e, F_ARITH & ~(uint32_t)(F_CF | F_OF));   /* and ecx, ~(CF|OF) */
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                  /* mov rdx, rax */
        if (kind == 1) {
            b1(e, 0x48); b1(e, 0xc1); b1(e, 0xea); b1(e, (uint8_t)(bits - 1));   /* shr rdx, bits-1 */
        }
        b1(e, 0x83); b1(e, 0xe2); b1(e, 0x01);                  /* and edx, 1: CF */
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);                  /* mov rsi, rax */
        b1(e, 0x48); b1(e, 0xc1); b1(e, 0xee); b1(e, (uint8_t)(kind == 0 ? bits - 1 : bits - 2));   /* shr rsi */
        b1(e, 0x31); b1(e, 0xd6);                               /* xor esi, edx */
        b1(e, 0x83); b1(e, 0xe6); b1(e, 0x01);                  /* and esi, 1 */
        b1(e, 0xc1); b1(e, 0xe6); b1(e, 11);                    /* shl esi, 11: OF */
        b1(e, 0x09); b1(e, 0xd1);                               /* or ecx, edx */
        b1(e, 0x09); b1(e, 0xf1);                               /* or ecx, esi */
        store64(e, RCX, CPU_OFF(cc_res));
        store32_imm(e, CPU_OFF(cc_op), CC_EAGER);
    } else if (n && !k->cc_dead) {
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                  /* mov rdi, rbx */
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);                  /* mov rsi, rax */
        mov_imm(e, RDX, (uint64_t)(kind | (wide ? 64 : 32) << 8));
        mov_imm(e, RAX, (uint64_t)(uintptr_t)native_rotate_flags);
        emit_call_rax(e);
    }
    if (n)
        set_known(k, CC_EAGER, 0);
    return n == 0;
}

static int alu_logic(int aluop)
{
    return aluop == ALU_OR || aluop == ALU_AND || aluop == ALU_XOR;
}

/* Slow path s of a flag producer rejoins after its instruction: it rebuilds the host
 * flags from the lazy record the interpreter wrote (kind, sz), so they stay live past
 * the join (the lazy record is the interpreter's own there, cc_dead or not). */
static void slow_rejoin_live(Comp *k, int s, int kind, unsigned sz)
{
    k->slow[s].resume = k->e.p;
    k->slow[s].remat_kind = kind;
    k->slow[s].remat_sz = sz;
}

/* Emits i; returns 0 when it has no native form after all. */
static int emit_native(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    int form, aluop, slow = -1;
    int flags_were_live = k->flags_live;
    k->flags_live = 0;
    if (alux_form(i, &form, &aluop)) {
        emit_alux(k, i, form, aluop);
        return 1;
    }
    {
        int gop, gkind;
        unsigned gsz;
        if (gen_alu_form(i, &gop, &gsz, &gkind)) {
            slow = emit_gen_alu(k, i, rip, next_rip, done, flags_were_live);
            if (slow >= 0)
                slow_rejoin_live(k, slow, gop == ALU_ADD ? CC_ADD : gop == ALU_ADC ? CC_ADC :
                                 gop == ALU_SBB ? CC_SBB : gop == ALU_SUB || gop == ALU_CMP ? CC_SUB : CC_LOGIC, gsz);
            return 1;
        }
    }
    switch (i->op) {
    /* movs keep the host flags: a compare's flags still reach the jcc after them */
    case P_MOV_RM_R64: emit_mov_greg(e, i->op == P_MOV_RM_R64, i->rm, i->reg); k->flags_live = flags_were_live; return 1;
    case P_MOV_RM_R32: emit_mov_greg(e, 0, i->rm, i->reg); k->flags_live = flags_were_live; return 1;
    case P_MOV_R_RM64: emit_mov_greg(e, 1, i->reg, i->rm); k->flags_live = flags_were_live; return 1;
    case P_MOV_R_RM32: emit_mov_greg(e, 0, i->reg, i->rm); k->flags_live = flags_were_live; return 1;
    case P_TEST_RR64: case P_TEST_RR32: {
        int wide = i->op == P_TEST_RR64;
        op_mem(e, wide, 0x8b, RAX, GREG(i->rm));
        op_mem(e, wide, 0x8b, RCX, GREG(i->reg));
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                  /* mov rdx, rax */
        alu_rr(e, 0x21, RDX, RCX);
        if (!k->cc_dead) store64(e, RDX, CPU_OFF(cc_res));
        if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_op), CC_LOGIC);
        if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
        if (wide)
            b1(e, 0x48);
        b1(e, 0x85); b1(e, (uint8_t)(0xc0 | (RCX << 3) | RAX));   /* test: host flags */
        set_live(k, LIVE_ALL, CC_LOGIC);
        set_known(k, CC_LOGIC, wide ? 8 : 4);
        return 1;
    }
    case P_SHIFT_RI64: case P_SHIFT_RI32: {
        int wide = i->op == P_SHIFT_RI64;
        emit_shift_reg(k, i->rm, wide, (unsigned)(i->imm & (wide ? 63 : 31)), (int)i->imm2);
        return 1;
    }
    case P_LOAD64: case P_LOAD32: {
        int wide = i->op == P_LOAD64, h;
        slow = emit_mem(k, i, rip, next_rip, wide ? 8 : 4, 0, done);
        if ((h = e->host[i->reg])) {   /* straight into the cached register */
            b1(e, rex(wide, h, 0)); b1(e, 0x8b); b1(e, (uint8_t)(((h & 7) << 3) | RAX));   /* mov h, [rax] */
            e->dirty |= (uint16_t)(1u << i->reg);
            break;
        }
        if (wide)
            b1(e, 0x48);
        b1(e, 0x8b); b1(e, 0x00);                               /* mov (r|e)ax, [rax] */
        store64(e, RAX, GREG(i->reg));
        break;
    }
    case P_STORE64: case P_STORE32: {
        int wide = i->op == P_STORE64;
        slow = emit_mem(k, i, rip, next_rip, wide ? 8 : 4, 1, done);
        load64(e, RCX, GREG(i->reg));
        if (wide)
            b1(e, 0x48);
        b1(e, 0x89); b1(e, 0x08);                               /* mov [rax], (r|e)cx */
        break;
    }
    case P_LOAD_ALU64: case P_LOAD_ALU32: {
        int wide = i->op == P_LOAD_ALU64;
        if (i->imm2 & 0x100) {
            op_mem(e, wide, 0x8b, RCX, GREG(i->rm));
        } else {
            slow = emit_mem(k, i, rip, next_rip, wide ? 8 : 4, 0, done);
            if (wide)
                b1(e, 0x48);
            b1(e, 0x8b); b1(e, 0x08);                           /* mov (r|e)cx, [rax] */
        }
        op_mem(e, wide, 0x8b, RAX, GREG(i->reg));
        emit_alu_core(k, (int)(i->imm2 & 0xff), wide, i->reg);
        if (slow >= 0) {
            int aluop = (int)(i->imm2 & 0xff);
            slow_rejoin_live(k, slow, aluop == ALU_ADD ? CC_ADD : alu_logic(aluop) ? CC_LOGIC : CC_SUB, wide ? 8 : 4);
        }
        break;
    }
    case 0x1b6: case 0x1b7: case 0x1be: case 0x1bf: {
        unsigned from = (i->op & 1) ? 2 : 1;
        int sx = i->op >= 0x1be;
        uint8_t opc2 = (uint8_t)(i->op & 0xff);                 /* B6 B7 BE BF */
        int hs = i->mod == 3 && movx_low_source(i) ? e->host[i->rm] : 0;
        if (hs && i->osz >= 4) {
            /* mov(z|s)x from a cached register, at the destination's size: a 32-bit
             * one zero-extends, as the guest's */
            int hd = e->host[i->reg] ? e->host[i->reg] : RAX;
            b1(e, rex(i->osz == 8, hd, hs)); b1(e, 0x0f); b1(e, opc2); b1(e, (uint8_t)(0xc0 | ((hd & 7) << 3) | (hs & 7)));
            if (hd == RAX)
                store64(e, RAX, GREG(i->reg));
            else
                e->dirty |= (uint16_t)(1u << i->reg);
            k->flags_live = flags_were_live;
            return 1;
        }
        if (i->mod == 3) {
            int32_t d = from == 1 ? byte_reg_disp(i, i->rm) : GREG(i->rm);
            b1(e, 0x48); b1(e, 0x0f); b1(e, opc2);              /* mov(z|s)x rax, [rbx+d] */
            b1(e, (uint8_t)(0x80 | (RAX << 3) | RBX)); b4(e, (uint32_t)d);
        } else {
            slow = emit_mem(k, i, rip, next_rip, from, 0, done);
            b1(e, 0x48); b1(e, 0x0f); b1(e, opc2); b1(e, 0x00); /* mov(z|s)x rax, [rax] */
        }
        if (sx && i->osz == 4)
            mov32_rr(e, RAX, RAX);
        store64(e, RAX, GREG(i->reg));
        if (i->mod == 3) {   /* no TLB check: the host flags are untouched */
            k->flags_live = flags_were_live;
            return 1;
        }
        break;
    }
    case P_LEA64:
        emit_ea_off(e, i, next_rip);
        store64(e, RAX, GREG(i->reg));
        return 1;
    case 0x40: case 0x41: case 0x42: case 0x43: case 0x44: case 0x45: case 0x46: case 0x47:
    case 0x48: case 0x49: case 0x4a: case 0x4b: case 0x4c: case 0x4d: case 0x4e: case 0x4f:
        emit_inc_dec(k, i->op & 7, 0, i->op < 0x48, flags_were_live);
        return 1;
    case 0xfe:
        slow = emit_inc_dec_mem(k, i, rip, next_rip, done, 1, flags_were_live);
        break;
    case 0x86: case 0x87:
        slow = emit_xchg_mem(k, i, rip, next_rip, done);
        break;
    case 0x1b0: case 0x1b1:
        slow = emit_cmpxchg_mem(k, i, rip, next_rip, done);
        break;
    case 0xff:
        if ((i->reg & 7) > 1)
            return 0;   /* jmp/call: only as a block's end (emit_indirect) */
        if (i->mod != 3) {
            slow = emit_inc_dec_mem(k, i, rip, next_rip, done, i->osz, flags_were_live);
            break;
        }
        emit_inc_dec(k, i->rm, i->osz == 8, (i->reg & 7) == 0, flags_were_live);
        return 1;
    case 0x1af: case 0x69: case 0x6b:
        if (i->mod == 3 && k->cc_dead && i->osz >= 4 && e->host[i->reg]) {
            /* nothing reads its flags: imul on the cached register itself */
            int h = e->host[i->reg], src = e->host[i->rm], w = i->osz == 8;
            b1(e, rex(w, h, src));
            if (i->op == 0x1af) {
                b1(e, 0x0f); b1(e, 0xaf);                       /* imul h, src */
            } else {
                b1(e, 0x69);                                    /* imul h, src, imm32 */
            }
            if (src) {
                b1(e, (uint8_t)(0xc0 | ((h & 7) << 3) | (src & 7)));
            } else {
                b1(e, (uint8_t)(0x80 | ((h & 7) << 3) | RBX)); b4(e, (uint32_t)GREG(i->rm));
            }
            if (i->op != 0x1af)
                b4(e, (uint32_t)i->imm);
            e->dirty |= (uint16_t)(1u << i->reg);
            set_known(k, CC_EAGER, 0);
            return 1;
        }
        if (i->mod == 3) {
            op_mem(e, i->osz == 8, 0x8b, RAX, GREG(i->rm));
        } else {
            slow = emit_mem(k, i, rip, next_rip, i->osz, 0, done);
            if (i->osz == 8)
                b1(e, 0x48);
            b1(e, 0x8b); b1(e, 0x00);                           /* mov (r|e)ax, [rax] */
        }
        emit_imul_tail(k, i);
        break;
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf: {
        uint64_t v = i->osz == 4 ? (uint32_t)i->imm : i->imm;
        if (e->host[i->reg]) {   /* mov imm does not touch the host flags either */
            mov_imm_host(e, e->host[i->reg], v);
            e->dirty |= (uint16_t)(1u << i->reg);
        } else {
            store64_const(e, GREG(i->reg), v);
        }
        k->flags_live = flags_were_live;
        return 1;
    }
    case 0x11f: case 0x90:
    case 0x10d: case 0x118: case 0x119: case 0x11a: case 0x11b: case 0x11c: case 0x11d: case 0x11e:
        k->flags_live = flags_were_live;
        return 1;
    case 0x131:
        emit_rdtsc(k);
        return 1;
    case 0xfa: {
        int gp = new_slow(k, i, rip, done);
        b1(e, 0x83); b1(e, 0xbb); b4(e, (uint32_t)CPU_OFF(cpl)); b1(e, 0);   /* cmp dword [rbx+cpl], 0 */
        k->slow[gp].jump = jcc32(e, 0x5);                       /* jne: the helper checks IOPL */
        op_mem_imm32(e, 1, 0x81, 4, CPU_OFF(eflags), ~(uint32_t)F_IF);   /* and qword [rbx+eflags], ~IF */
        slow = gp;
        break;
    }
    case 0x1ba:
        slow = emit_bit_test_imm(k, i, rip, next_rip, done);
        break;
    case 0x8c:
        slow = emit_mov_from_sreg(k, i, rip, next_rip, done);
        if (slow < 0) {
            k->flags_live = flags_were_live;
            return 1;
        }
        break;
    case 0x89: case 0x8b: {   /* 16 bits: the destination register's upper 48 bits stay */
        int to_e = i->op == 0x89;
        if (i->mod == 3) {
            b1(e, 0x0f); b1(e, 0xb7); b1(e, 0x83); b4(e, (uint32_t)GREG(to_e ? i->reg : i->rm));   /* movzx eax, word [rbx+d] */
            b1(e, 0x66); b1(e, 0x89); b1(e, 0x83); b4(e, (uint32_t)GREG(to_e ? i->rm : i->reg));   /* mov [rbx+d], ax */
            greg_written(e, to_e ? i->rm : i->reg);
            k->flags_live = flags_were_live;
            return 1;
        }
        slow = emit_mem(k, i, rip, next_rip, 2, to_e, done);
        if (to_e) {
            b1(e, 0x0f); b1(e, 0xb7); b1(e, 0x8b); b4(e, (uint32_t)GREG(i->reg));   /* movzx ecx, word [rbx+d] */
            b1(e, 0x66); b1(e, 0x89); b1(e, 0x08);              /* mov [rax], cx */
        } else {
            b1(e, 0x0f); b1(e, 0xb7); b1(e, 0x00);              /* movzx eax, word [rax] */
            b1(e, 0x66); b1(e, 0x89); b1(e, 0x83); b4(e, (uint32_t)GREG(i->reg));   /* mov [rbx+d], ax */
            greg_written(e, i->reg);
        }
        break;
    }
    case 0x63:
        if (!k->long64)
            return 0;
        if (i->mod == 3) {
            op_mem(e, 1, 0x63, RAX, GREG(i->rm));               /* movsxd rax, [rbx+rm] */
        } else {
            slow = emit_mem(k, i, rip, next_rip, 4, 0, done);
            b1(e, 0x48); b1(e, 0x63); b1(e, 0x00);              /* movsxd rax, [rax] */
        }
        store64(e, RAX, GREG(i->reg));
        break;
    case 0xc1: case 0xd1: {
        int wide = i->osz == 8, kind = i->reg & 7;
        unsigned n = i->op == 0xd1 ? 1 : (unsigned)(i->imm & (wide ? 63 : 31));
        if (kind >= 4)
            emit_shift_reg(k, i->rm, wide, n, kind);
        else if (emit_rotate_reg(k, i->rm, wide, n, kind, flags_were_live))
            k->flags_live = flags_were_live;
        return 1;
    }
    case 0x8d:
        emit_ea_off(e, i, next_rip);
        mov32_rr(e, RAX, RAX);
        store64(e, RAX, GREG(i->reg));
        return 1;
    case 0xd3: {
        /* a count of 0 (after masking) changes no flag: the lazy record stays */
        int wide = i->osz == 8, kind = i->reg & 7;
        op_mem(e, wide, 0x8b, RAX, GREG(i->rm));               /* 32 bits: zero-extended */
        load32(e, RCX, GREG(R_CX));
        b1(e, 0x83); b1(e, 0xe1); b1(e, wide ? 63 : 31);        /* and ecx, mask */
        uint8_t *zero = jcc32(e, 0x4);                          /* jz: only the write */
        if (!k->cc_dead) store64(e, RAX, CPU_OFF(cc_a));
        if (!k->cc_dead) store64(e, RCX, CPU_OFF(cc_b));
        if (wide)
            b1(e, 0x48);
        b1(e, 0xd3); b1(e, (uint8_t)(0xc0 | (kind << 3) | RAX)); /* shl|shr|sar (e|r)ax, cl */
        if (!k->cc_dead) store64(e, RAX, CPU_OFF(cc_res));
        if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_op), kind == 5 ? CC_SHR : kind == 7 ? CC_SAR : CC_SHL);
        if (!k->cc_dead) store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
        patch_rel32(zero, e->p);
        store64(e, RAX, GREG(i->rm));
        set_known(k, -1, 0);   /* the count decides at run time whether it was written */
        return 1;
    }
    case 0xc6: case 0xc7: {
        unsigned sz = i->op == 0xc6 ? 1 : i->osz;
        if (i->mod == 3) {
            if (sz == 1) {
                b1(e, 0xc6); b1(e, 0x83); b4(e, (uint32_t)byte_reg_disp(i, i->rm)); b1(e, (uint8_t)i->imm);
                greg_written(e, byte_reg_greg(i, i->rm));
            } else if (sz == 2) {
                b1(e, 0x66); b1(e, 0xc7); b1(e, 0x83); b4(e, (uint32_t)GREG(i->rm));
                b1(e, (uint8_t)i->imm); b1(e, (uint8_t)(i->imm >> 8));
                greg_written(e, i->rm);
            } else {
                store64_const(e, GREG(i->rm), sz == 4 ? (uint32_t)i->imm : i->imm);
            }
            k->flags_live = flags_were_live;
            return 1;
        }
        slow = emit_mem(k, i, rip, next_rip, sz, 1, done);
        if (sz == 2)
            b1(e, 0x66);
        if (sz == 8)
            b1(e, 0x48);
        b1(e, (uint8_t)i->op); b1(e, 0x00);                     /* mov [rax], imm */
        if (sz == 1) {
            b1(e, (uint8_t)i->imm);
        } else if (sz == 2) {
            b1(e, (uint8_t)i->imm); b1(e, (uint8_t)(i->imm >> 8));
        } else {
            b4(e, (uint32_t)i->imm);                            /* 64 bits: sign-extended, as decoded */
        }
        break;
    }
    case 0x88: case 0x8a: {
        int to_e = i->op == 0x88;
        if (i->mod == 3) {
            load_greg(k, i, RAX, to_e ? i->reg : i->rm, 1);
            b1(e, 0x88); b1(e, 0x83); b4(e, (uint32_t)byte_reg_disp(i, to_e ? i->rm : i->reg));   /* mov [rbx+d], al */
            greg_written(e, byte_reg_greg(i, to_e ? i->rm : i->reg));
            k->flags_live = flags_were_live;
            return 1;
        }
        slow = emit_mem(k, i, rip, next_rip, 1, to_e, done);
        if (to_e) {
            b1(e, 0x48); b1(e, 0x89); b1(e, 0xc6);              /* mov rsi, rax */
            load_greg(k, i, RAX, i->reg, 1);
            b1(e, 0x88); b1(e, 0x06);                           /* mov [rsi], al */
        } else {
            b1(e, 0x0f); b1(e, 0xb6); b1(e, 0x00);              /* movzx eax, byte [rax] */
            b1(e, 0x88); b1(e, 0x83); b4(e, (uint32_t)byte_reg_disp(i, i->reg));
            greg_written(e, byte_reg_greg(i, i->reg));
        }
        break;
    }
    case 0xf6: case 0xf7: {   /* not, neg of a register (test is gen_alu_form's); div */
        if (i->op == 0xf7 && (i->reg & 7) == 6) {
            slow = emit_div(k, i, rip, next_rip, done);
            break;
        }
        if (i->op == 0xf7 && (i->reg & 7) == 4) {
            slow = emit_mul(k, i, rip, next_rip, done);
            break;
        }
        unsigned sz = i->op == 0xf6 ? 1 : i->osz;
        load_greg(k, i, (i->reg & 7) == 3 ? RCX : RAX, i->rm, sz);
        if ((i->reg & 7) == 2) {
            b1(e, 0x48); b1(e, 0xf7); b1(e, 0xd0);              /* not rax: no flags */
            b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);              /* mov rdx, rax */
            k->flags_live = flags_were_live;
        } else {
            b1(e, 0x31); b1(e, 0xc0);                           /* xor eax, eax: neg is 0 - a */
            emit_alu_core_any(k, ALU_SUB, sz);
        }
        if (sz == 1) {
            b1(e, 0x88); b1(e, 0x93); b4(e, (uint32_t)byte_reg_disp(i, i->rm));   /* mov [rbx+d], dl */
            greg_written(e, byte_reg_greg(i, i->rm));
        } else {
            if (sz == 4)
                mov32_rr(e, RDX, RDX);
            store64(e, RDX, GREG(i->rm));
        }
        return 1;
    }
    case 0x1c8: case 0x1c9: case 0x1ca: case 0x1cb: case 0x1cc: case 0x1cd: case 0x1ce: case 0x1cf:
        op_mem(e, i->osz == 8, 0x8b, RAX, GREG(i->reg));
        if (i->osz == 8)
            b1(e, 0x48);
        b1(e, 0x0f); b1(e, 0xc8);                               /* bswap (e|r)ax */
        store64(e, RAX, GREG(i->reg));
        k->flags_live = flags_were_live;
        return 1;
    case 0x190: case 0x191: case 0x192: case 0x193: case 0x194: case 0x195: case 0x196: case 0x197:
    case 0x198: case 0x199: case 0x19a: case 0x19b: case 0x19c: case 0x19d: case 0x19e: case 0x19f: {
        int live = emit_cond_al(k, i->op & 15, flags_were_live);
        int h = low_byte_reg(i, i->rm) ? e->host[i->rm] : 0;
        if (h) {
            op_rr(e, 0, 0x88, RAX, h);                          /* mov h8, al */
            e->dirty |= (uint16_t)(1u << i->rm);
            k->flags_live = live;
            return 1;
        }
        b1(e, 0x88); b1(e, 0x83); b4(e, (uint32_t)byte_reg_disp(i, i->rm));   /* mov [rbx+d], al */
        greg_written(e, byte_reg_greg(i, i->rm));
        k->flags_live = live;
        return 1;
    }
    case 0x140: case 0x141: case 0x142: case 0x143: case 0x144: case 0x145: case 0x146: case 0x147:
    case 0x148: case 0x149: case 0x14a: case 0x14b: case 0x14c: case 0x14d: case 0x14e: case 0x14f: {
        int wide = i->osz == 8, cc = i->op & 15;
        int live = emit_flags_for(k, flags_were_live, cc);
        if (!live) {
            emit_cond_al(k, cc, 0);
            b1(e, 0x85); b1(e, 0xc0);                           /* test eax, eax */
            cc = 0x5;                                           /* cmovnz */
        }
        op_mem(e, wide, 0x8b, RAX, GREG(i->reg));              /* 32 bits: zero-extended either way */
        op_mem(e, wide, 0x8b, RCX, GREG(i->rm));
        if (wide)
            b1(e, 0x48);
        b1(e, 0x0f); b1(e, (uint8_t)(0x40 | cc)); b1(e, 0xc1); /* cmovcc (e|r)ax, (e|r)cx */
        store64(e, RAX, GREG(i->reg));
        k->flags_live = live;
        return 1;
    }
    case 0x50: case 0x51: case 0x52: case 0x53: case 0x54: case 0x55: case 0x56: case 0x57:
    case 0x68: case 0x6a: {
        unsigned sz = stack_osz(i, k->long64);
        if (!sz)
            return 0;
        slow = emit_push(k, i, rip, done, sz);
        if (i->op >= 0x68)
            mov_imm(e, RCX, sz == 8 ? i->imm : (uint32_t)i->imm);
        else
            op_mem(e, sz == 8, 0x8b, RCX, GREG(i->reg));       /* push rsp: the value before */
        emit_store_rcx(e, sz);
        emit_sp_add(k, -(int32_t)sz);
        break;
    }
    case 0x58: case 0x59: case 0x5a: case 0x5b: case 0x5c: case 0x5d: case 0x5e: case 0x5f: {
        unsigned sz = stack_osz(i, k->long64);
        if (!sz)
            return 0;
        slow = new_slow(k, i, rip, done);
        emit_stack_lin(k, slow, 0);
        emit_tlb(k, slow, sz, 0);
        if (sz == 8)
            b1(e, 0x48);
        b1(e, 0x8b); b1(e, 0x00);                               /* mov (r|e)ax, [rax] */
        emit_sp_add(k, (int32_t)sz);                            /* clobbers rcx only */
        store64(e, RAX, GREG(i->reg));                          /* pop rsp: the loaded value wins */
        break;
    }
    default:
        return 0;
    }
    if (slow >= 0)
        k->slow[slow].resume = e->p;
    return 1;
}

/* ---- branches (the block's last instruction) ---- */

static int native_cond(CPU *c, int cc)
{
    return cond(c, cc);
}

/* target of a relative branch: ip_mask() of operands.h at compile time */
static uint64_t branch_target(const Comp *k, const Insn *i, uint64_t next_rip)
{
    uint64_t v = next_rip + i->imm;
    if (k->long64)
        return v;
    return i->osz == 2 ? (uint16_t)v : (uint32_t)v;
}

/* the epilogue: the registers every block's prologue saved (NATIVE_CHAIN_ENTRY) */
static void emit_ret(Emit *e)
{
    b1(e, 0x48); b1(e, 0x83); b1(e, 0xc4); b1(e, 8);   /* add rsp, 8 */
    b1(e, 0x5d);                /* pop rbp */
    b1(e, 0x41); b1(e, 0x5f);   /* pop r15 */
    b1(e, 0x41); b1(e, 0x5e);   /* pop r14 */
    b1(e, 0x41); b1(e, 0x5d);   /* pop r13 */
    b1(e, 0x41); b1(e, 0x5c);   /* pop r12 */
    b1(e, 0x5b);                /* pop rbx */
    b1(e, 0xc3);                /* ret */
}

static void emit_exit(Emit *e, int done)
{
    add64_mem_imm(e, CPU_OFF(st_native_insns), done);
    emit_ret(e);
}

/* What a direct chain and a jump-cache exit both check before leaving for compiled
 * code (native.h): nothing pending between blocks (exit request, halt, interrupt
 * shadow, a stop, an access left over) and every code-page mark seen. Each failed
 * check is a jcc32 to patch to the plain exit; returns the new count. */
static int emit_chain_allowed(Comp *k, uint8_t **out, int nout)
{
    Emit *e = &k->e;
    op_mem(e, 0, 0x8b, RDX, CPU_OFF(exit_request));             /* mov edx, exit_request */
    op_mem(e, 0, 0x0b, RDX, CPU_OFF(halted));                   /* or edx, halted */
    op_mem(e, 0, 0x0b, RDX, CPU_OFF(shadow));
    op_mem(e, 0, 0x0b, RDX, CPU_OFF(stop_block));
    op_mem(e, 0, 0x0b, RDX, CPU_OFF(nacc));
    out[nout++] = jcc32(e, 0x5);                                /* jnz out */
    mov_imm(e, RDX, (uint64_t)(uintptr_t)k->c->nat_code_epoch);
    b1(e, 0x48); b1(e, 0x8b); b1(e, 0x12);                      /* mov rdx, [rdx] */
    op_mem(e, 1, 0x3b, RDX, CPU_OFF(seen_code_epoch));          /* cmp rdx, seen_code_epoch */
    out[nout++] = jcc32(e, 0x5);
    return nout;
}

/* Into the compiled code of the block in rcx, past its prologue, counting the jump
 * in the stat at ``stat_off``. */
static void emit_enter_block_rcx(Comp *k, int32_t stat_off)
{
    Emit *e = &k->e;
    store64(e, RCX, CPU_OFF(cur_block));                        /* the step helper's block */
    add64_mem_imm(e, stat_off, 1);
    b1(e, 0x48); b1(e, 0x8b); b1(e, 0x81); b4(e, (uint32_t)offsetof(Block, native));   /* mov rax, [rcx+native] */
    b1(e, 0x48); b1(e, 0x83); b1(e, 0xc0); b1(e, NATIVE_CHAIN_ENTRY);   /* past its prologue */
    b1(e, 0xff); b1(e, 0xe0);                                   /* jmp rax */
}

/* Where a chained exit's failed checks (jcc32 fields out[0..nout)) go: return, with
 * CPU.nat_exit_slot naming the successor slot at slot_addr for exec.c to link */
static void emit_slot_exit(Comp *k, uint8_t **out, int nout, uint64_t slot_addr)
{
    Emit *e = &k->e;
    for (int n = 0; n < nout; n++)
        patch_rel32(out[n], e->p);
    mov_imm(e, RAX, slot_addr);
    store64(e, RAX, CPU_OFF(nat_exit_slot));
    emit_ret(e);
}

/* Leaves for the direct successor at guest rip `target` (c->rip already holds it),
 * jumping straight into its compiled code when native_chain_fits() linked it in
 * b->nat_succ[slot] and the conditions of native.h hold; otherwise returns with
 * CPU.nat_exit_slot naming the slot, so exec.c can link it. */
static void emit_chain_exit(Comp *k, int slot, uint64_t target, int done)
{
    Emit *e = &k->e;
    uint8_t *out[8];
    int nout = 0;
    flush_all(e);   /* the main path's last writes (a call's or ret's rsp) */
    add64_mem_imm(e, CPU_OFF(st_native_insns), done);
    uint64_t slot_addr = (uint64_t)(uintptr_t)&k->b->nat_succ[slot];
    if (target == k->b->pc && !k->steps) {
        /* A loop back to the block's own start, from a block whose main path runs no
         * instruction through the interpreter: nothing of it can move the page under
         * it (a mapping changes only by a system instruction, which the interpreter
         * runs, or by an interrupt, which exit_request reports), so of native.h's
         * conditions only the pending requests, the code-page marks and the block's
         * own validity are looked at (a store into its own code drops it and ends it
         * at once, through stop_block; the check keeps a block dropped any other way
         * from running again). The cached registers are current in their host
         * registers: the loop enters past their loads. */
        nout = emit_chain_allowed(k, out, nout);
        mov_imm(e, RAX, (uint64_t)(uintptr_t)&k->b->valid);
        b1(e, 0x83); b1(e, 0x38); b1(e, 0);                     /* cmp dword [rax], 0 */
        out[nout++] = jcc32(e, 0x4);
        add64_mem_imm(e, CPU_OFF(st_native_chained), 1);
        b1(e, 0xe9);                                            /* jmp body */
        b4(e, 0);
        patch_rel32(e->p - 4, k->body);
        emit_slot_exit(k, out, nout, slot_addr);
        return;
    }
    mov_imm(e, RAX, slot_addr);
    b1(e, 0x48); b1(e, 0x8b); b1(e, 0x08);                      /* mov rcx, [rax] */
    b1(e, 0x48); b1(e, 0x85); b1(e, 0xc9);                      /* test rcx, rcx */
    out[nout++] = jcc32(e, 0x4);                                /* jz out */
    /* what the run loop and native_ready() look at between blocks, all zero */
    nout = emit_chain_allowed(k, out, nout);
    b1(e, 0x83); b1(e, 0xb9); b4(e, (uint32_t)offsetof(Block, valid)); b1(e, 0);   /* cmp dword [rcx+valid], 0 */
    out[nout++] = jcc32(e, 0x4);
    /* block_fits(): the successor's page is what this CPU fetches at its linear address.
     * Known without a look where the successor lies on this block's own (one) page and
     * nothing of the main path ran through the interpreter: the page was checked when
     * this block was entered and cannot have moved since (see the loop case above),
     * and the successor linked in the slot was found on that same page. */
    uint64_t lin = k->long64 ? target : (uint32_t)(k->b->cs_base + target);
    uint64_t lin_pc = k->long64 ? k->b->pc : (uint32_t)(k->b->cs_base + k->b->pc);
    if (k->steps || k->b->phys2 != ~0ull || (lin >> 12) != (lin_pc >> 12)) {
        int32_t ent = CPU_OFF(tlb) + (int32_t)(((lin >> 12) & (TLB_SIZE - 1)) * sizeof(TlbEnt));
        op_mem(e, 1, 0x63, RDX, CPU_OFF(mmu_idx));              /* movsxd rdx, mmu_idx */
        b1(e, 0x48); b1(e, 0x69); b1(e, 0xd2); b4(e, (uint32_t)(TLB_SIZE * sizeof(TlbEnt)));   /* imul rdx, rdx, row */
        mov_imm(e, RAX, lin & ~0xfffull);
        op_tlb(e, 1, 0x3b, RAX, RBX, ent + (int32_t)offsetof(TlbEnt, tag_x));   /* cmp rax, tag_x */
        out[nout++] = jcc32(e, 0x5);
        b1(e, 0x48); b1(e, 0x8b); b1(e, 0x81); b4(e, (uint32_t)offsetof(Block, phys));   /* mov rax, [rcx+phys] */
        op_tlb(e, 1, 0x3b, RAX, RBX, ent + (int32_t)offsetof(TlbEnt, paddr));   /* cmp rax, paddr */
        out[nout++] = jcc32(e, 0x5);
    }
    emit_enter_block_rcx(k, CPU_OFF(st_native_chained));
    emit_slot_exit(k, out, nout, slot_addr);
}

/* Leaves for a successor known only at run time (ret, jmp/call through a register or
 * memory; c->rip already holds it): QEMU's lookup_and_goto_ptr. The CPU's jump cache
 * (CPU.jc, find_block's first probe) names the block last found at that rip; its
 * compiled code is entered straight from here under the same conditions as a direct
 * chain (native.h: nothing pending, every code-page mark seen, the block valid, one
 * page, this block's mode and cs base, its page what this CPU fetches there), else
 * the exit returns to exec.c's dispatcher as before. The jump cache is cleared with
 * the block cache and holds only hints, so nothing must unlink anything here. */
static void emit_lookup_exit(Comp *k, int done)
{
    Emit *e = &k->e;
    uint8_t *out[16];
    int nout = 0;
    flush_all(e);   /* the main path's last writes (a call's or ret's rsp) */
    add64_mem_imm(e, CPU_OFF(st_native_insns), done);
    nout = emit_chain_allowed(k, out, nout);
    load64(e, RAX, CPU_OFF(rip));
    /* rcx = jc[(pc ^ (pc >> 10)) & 4095], find_block's index */
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xc1);                      /* mov rcx, rax */
    b1(e, 0x48); b1(e, 0xc1); b1(e, 0xe9); b1(e, 10);           /* shr rcx, 10 */
    b1(e, 0x48); b1(e, 0x31); b1(e, 0xc1);                      /* xor rcx, rax */
    b1(e, 0x81); b1(e, 0xe1); b4(e, (uint32_t)(sizeof k->c->jc / sizeof k->c->jc[0] - 1));   /* and ecx, mask */
    b1(e, 0x48); b1(e, 0x8b); b1(e, 0x8c); b1(e, 0xcb); b4(e, (uint32_t)CPU_OFF(jc));   /* mov rcx, [rbx+rcx*8+jc] */
    b1(e, 0x48); b1(e, 0x85); b1(e, 0xc9);                      /* test rcx, rcx */
    out[nout++] = jcc32(e, 0x4);
    b1(e, 0x83); b1(e, 0xb9); b4(e, (uint32_t)offsetof(Block, valid)); b1(e, 0);   /* cmp dword [rcx+valid], 0 */
    out[nout++] = jcc32(e, 0x4);
    b1(e, 0x48); b1(e, 0x3b); b1(e, 0x81); b4(e, (uint32_t)offsetof(Block, pc));   /* cmp rax, [rcx+pc] */
    out[nout++] = jcc32(e, 0x5);
    b1(e, 0x48); b1(e, 0x83); b1(e, 0xb9); b4(e, (uint32_t)offsetof(Block, native)); b1(e, 0);   /* cmp qword [rcx+native], 0 */
    out[nout++] = jcc32(e, 0x4);
    b1(e, 0x48); b1(e, 0x83); b1(e, 0xb9); b4(e, (uint32_t)offsetof(Block, phys2)); b1(e, 0xff);   /* cmp qword [rcx+phys2], -1 */
    out[nout++] = jcc32(e, 0x5);
    b1(e, 0x81); b1(e, 0xb9); b4(e, (uint32_t)offsetof(Block, mode)); b4(e, k->b->mode);   /* cmp dword [rcx+mode], mode */
    out[nout++] = jcc32(e, 0x5);
    mov_imm(e, RDX, k->b->cs_base);
    b1(e, 0x48); b1(e, 0x3b); b1(e, 0x91); b4(e, (uint32_t)offsetof(Block, cs_base));   /* cmp rdx, [rcx+cs_base] */
    out[nout++] = jcc32(e, 0x5);
    /* block_fits(): rdx = linear(CS, pc); its TLB entry's fetch tag and page */
    if (k->long64) {
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xc2);                  /* mov rdx, rax */
    } else {
        b1(e, 0x89); b1(e, 0xc2);                               /* mov edx, eax */
        b1(e, 0x81); b1(e, 0xc2); b4(e, (uint32_t)k->b->cs_base);   /* add edx, cs base: wraps at 32 bits */
    }
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xd6);                      /* mov rsi, rdx */
    b1(e, 0x48); b1(e, 0xc1); b1(e, 0xee); b1(e, 12);           /* shr rsi, 12 */
    b1(e, 0x81); b1(e, 0xe6); b4(e, TLB_SIZE - 1);              /* and esi, TLB_SIZE-1 */
    b1(e, 0x69); b1(e, 0xf6); b4(e, (uint32_t)sizeof(TlbEnt));  /* imul esi, esi, size */
    op_mem(e, 1, 0x63, RDI, CPU_OFF(mmu_idx));                  /* movsxd rdi, mmu_idx */
    b1(e, 0x48); b1(e, 0x69); b1(e, 0xff); b4(e, (uint32_t)(TLB_SIZE * sizeof(TlbEnt)));   /* imul rdi, rdi, row */
    b1(e, 0x48); b1(e, 0x01); b1(e, 0xfe);                      /* add rsi, rdi */
    b1(e, 0x48); b1(e, 0x81); b1(e, 0xe2); b4(e, 0xfffff000u);  /* and rdx, ~0xfff */
    b1(e, 0x48); b1(e, 0x3b); b1(e, 0x94); b1(e, 0x33);         /* cmp rdx, [rbx+rsi+tag_x] */
    b4(e, (uint32_t)(CPU_OFF(tlb) + (int32_t)offsetof(TlbEnt, tag_x)));
    out[nout++] = jcc32(e, 0x5);
    b1(e, 0x48); b1(e, 0x8b); b1(e, 0x91); b4(e, (uint32_t)offsetof(Block, phys));   /* mov rdx, [rcx+phys] */
    b1(e, 0x48); b1(e, 0x3b); b1(e, 0x94); b1(e, 0x33);         /* cmp rdx, [rbx+rsi+paddr] */
    b4(e, (uint32_t)(CPU_OFF(tlb) + (int32_t)offsetof(TlbEnt, paddr)));
    out[nout++] = jcc32(e, 0x5);
    emit_enter_block_rcx(k, CPU_OFF(st_native_indirect));
    for (int n = 0; n < nout; n++)
        patch_rel32(out[n], e->p);
    emit_ret(e);
}

/* jcc/jmp ending the block: c->rip = target or fall-through, then leave */
static void emit_branch(Comp *k, Insn *i, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    uint64_t target = branch_target(k, i, next_rip);
    if (i->op == 0xe9 || i->op == 0xeb) {
        store64_const(e, CPU_OFF(rip), target);
        emit_chain_exit(k, 0, target, done);
        return;
    }
    int cc = i->op & 15;
    uint8_t *taken;
    if (emit_flags_for(k, k->flags_live, cc)) {
        /* the flag producer before ran at the guest's size (or its lazy record was
         * run again so): the host flags are the guest's, and x86 condition codes are
         * the same on both sides */
        taken = jcc32(e, (uint8_t)cc);
    } else {
        b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                  /* mov rdi, rbx */
        mov_imm(e, RSI, (uint64_t)cc);
        mov_imm(e, RAX, (uint64_t)(uintptr_t)native_cond);
        emit_call_rax(e);
        b1(e, 0x85); b1(e, 0xc0);                               /* test eax, eax */
        taken = jcc32(e, 0x5);
    }
    store64_const(e, CPU_OFF(rip), next_rip);
    emit_chain_exit(k, 1, next_rip, done);
    patch_rel32(taken, e->p);
    store64_const(e, CPU_OFF(rip), target);
    emit_chain_exit(k, 0, target, done);
}

/* call rel / ret ending the block. Nothing changes before the stack access has
 * passed the TLB: a miss runs the instruction through the interpreter (precise rsp and
 * rip on a fault) and leaves after it. */
static void emit_call_ret(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    unsigned sz = stack_osz(i, k->long64);
    int s = new_slow(k, i, rip, done);
    if (i->op == 0xe8) {
        uint64_t target = branch_target(k, i, next_rip);
        emit_stack_lin(k, s, -(int32_t)sz);
        emit_tlb(k, s, sz, 1);
        mov_imm(e, RCX, next_rip);
        emit_store_rcx(e, sz);
        emit_sp_add(k, -(int32_t)sz);
        store64_const(e, CPU_OFF(rip), target);
        emit_chain_exit(k, 0, target, done);
        return;
    }
    emit_stack_lin(k, s, 0);
    emit_tlb(k, s, sz, 0);
    if (sz == 8)
        b1(e, 0x48);
    b1(e, 0x8b); b1(e, 0x00);                                   /* mov (r|e)ax, [rax]: zero-extends */
    emit_sp_add(k, (int32_t)(sz + (i->op == 0xc2 ? (uint32_t)(i->imm & 0xffff) : 0)));
    store64(e, RAX, CPU_OFF(rip));
    emit_lookup_exit(k, done);
}

static int is_call_ret(const Insn *i, int long64)
{
    return (i->op == 0xe8 || i->op == 0xc3 || i->op == 0xc2) && stack_osz(i, long64);
}

/* jmp/call near through a register or memory (FF /4, FF /2) at the stack's width */
static int is_indirect(const Insn *i, int long64)
{
    return i->op == 0xff && ((i->reg & 7) == 2 || (i->reg & 7) == 4) && !i->lock &&
           stack_osz(i, long64) && (i->mod == 3 || mem_ok(i));
}

/* An indirect jmp or call ending the block. The target is read first (rdE before the
 * push, as group4_5 does: `call [rsp]` and `call rsp` see the old rsp), and nothing
 * changes before every access passed the TLB: a miss runs the whole instruction
 * through the interpreter, which leaves rip and rsp precise on a fault. */
static void emit_indirect(Comp *k, Insn *i, uint64_t rip, uint64_t next_rip, int done)
{
    Emit *e = &k->e;
    unsigned sz = stack_osz(i, k->long64);
    if (i->mod == 3) {
        op_mem(e, sz == 8, 0x8b, RSI, GREG(i->rm));             /* mov (r|e)si, reg: zero-extends */
    } else {
        emit_mem(k, i, rip, next_rip, sz, 0, done);
        if (sz == 8)
            b1(e, 0x48);
        b1(e, 0x8b); b1(e, 0x30);                               /* mov (r|e)si, [rax] */
    }
    if ((i->reg & 7) == 2) {
        int s = new_slow(k, i, rip, done);
        emit_stack_lin(k, s, -(int32_t)sz);
        emit_tlb(k, s, sz, 1);                                  /* rsi survives: rax rcx rdx rdi only */
        mov_imm(e, RCX, next_rip);
        emit_store_rcx(e, sz);
        emit_sp_add(k, -(int32_t)sz);
    }
    store64(e, RSI, CPU_OFF(rip));
    emit_lookup_exit(k, done);
}

/* ---- the block compiler ---- */

static void emit_step_call(Comp *k, Insn *i, uint64_t rip)
{
    Emit *e = &k->e;
    /* step(c, i, rip): the helper stores rip itself, so c->rip is precise for any
     * fault or exit of this instruction */
    b1(e, 0x48); b1(e, 0x89); b1(e, 0xdf);                      /* mov rdi, rbx */
    mov_imm(e, RSI, (uint64_t)(uintptr_t)i);
    mov_imm(e, RDX, rip);
    mov_imm(e, RAX, (uint64_t)(uintptr_t)k->step);
    b1(e, 0xff); b1(e, 0xd0);                                   /* call rax */
    reload_cached(e);                                           /* it may have written any */
    b1(e, 0x85); b1(e, 0xc0);                                   /* test eax, eax */
}

static void add_stub(Comp *k, int done)
{
    Slow *s = &k->stub[k->nstub++];
    s->jump = jcc32(&k->e, 0x5);   /* jnz: the block ends here */
    s->done = done;
}

/* Native forms that write the whole lazy-flag state (cc_op and what it reads), read no
 * flags, and cannot fault: the flags of the instruction before them are dead. */
static int kills_flags(const Insn *i)
{
    int form, aluop;
    if (!native_has_form(i))
        return 0;
    if (alux_form(i, &form, &aluop))
        return 1;
    unsigned gsz;
    int gkind;
    if (gen_alu_form(i, &aluop, &gsz, &gkind))
        return !gen_alu_mem(i, gkind) && aluop != ALU_ADC && aluop != ALU_SBB;
    switch (i->op) {
    case P_TEST_RR64: case P_TEST_RR32:
        return 1;
    case P_SHIFT_RI64:
        return (i->imm & 63) != 0;
    case P_SHIFT_RI32:
        return (i->imm & 31) != 0;
    case P_LOAD_ALU64: case P_LOAD_ALU32:
        return (i->imm2 & 0x100) != 0;
    case 0x1af: case 0x69: case 0x6b:
        return i->mod == 3;
    }
    return 0;
}

/* Native forms that neither read nor write the flags and cannot fault or exit: the
 * flags of the instruction before them reach the one after them unchanged. */
static int flags_neutral(const Insn *i)
{
    switch (i->op) {
    case P_MOV_RM_R64: case P_MOV_RM_R32: case P_MOV_R_RM64: case P_MOV_R_RM32: case P_LEA64:
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf:
    case 0x11f: case 0x90:
    case 0x10d: case 0x118: case 0x119: case 0x11a: case 0x11b: case 0x11c: case 0x11d: case 0x11e:
        return native_has_form(i);
    case 0x8c:
        return i->mod == 3 && native_has_form(i);
    case 0x1b6: case 0x1b7: case 0x1be: case 0x1bf:
        return i->mod == 3 && native_has_form(i);
    }
    return 0;
}

/* The shift or rotate count of a native C1/D1/P_SHIFT_RI form (after masking) */
static unsigned shift_count(const Insn *i)
{
    int wide = i->op == P_SHIFT_RI64 || ((i->op == 0xc1 || i->op == 0xd1) && i->osz == 8);
    return i->op == 0xd1 ? 1 : (unsigned)(i->imm & (wide ? 63 : 31));
}

/* Native forms that never write the lazy record (nor does the interpreter's handler
 * their slow path runs): what a consumer after them finds there is still what the
 * block's last producer wrote (Comp.known). */
static int keeps_lazy_record(const Insn *i)
{
    if (!native_has_form(i))
        return 0;
    switch (i->op) {
    case P_MOV_RM_R64: case P_MOV_RM_R32: case P_MOV_R_RM64: case P_MOV_R_RM32: case P_LEA64:
    case P_LOAD64: case P_LOAD32: case P_STORE64: case P_STORE32:
    case 0x1b6: case 0x1b7: case 0x1be: case 0x1bf: case 0x8d: case 0x63:
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf:
    case 0x11f: case 0x90: case 0x10d: case 0x118: case 0x119: case 0x11a: case 0x11b: case 0x11c:
    case 0x11d: case 0x11e: case 0x131: case 0xfa: case 0x8c: case 0x89: case 0x8b:
    case 0xc6: case 0xc7: case 0x88: case 0x8a: case 0x86: case 0x87:
    case 0x50: case 0x51: case 0x52: case 0x53: case 0x54: case 0x55: case 0x56: case 0x57:
    case 0x58: case 0x59: case 0x5a: case 0x5b: case 0x5c: case 0x5d: case 0x5e: case 0x5f:
    case 0x68: case 0x6a:
    case 0x1c8: case 0x1c9: case 0x1ca: case 0x1cb: case 0x1cc: case 0x1cd: case 0x1ce: case 0x1cf:
    case 0x190: case 0x191: case 0x192: case 0x193: case 0x194: case 0x195: case 0x196: case 0x197:
    case 0x198: case 0x199: case 0x19a: case 0x19b: case 0x19c: case 0x19d: case 0x19e: case 0x19f:
    case 0x140: case 0x141: case 0x142: case 0x143: case 0x144: case 0x145: case 0x146: case 0x147:
    case 0x148: case 0x149: case 0x14a: case 0x14b: case 0x14c: case 0x14d: case 0x14e: case 0x14f:
        return 1;
    case 0xf6: case 0xf7:   /* not; div (its flags stay as they were, do_div too) */
        return (i->reg & 7) == 2 || (i->op == 0xf7 && (i->reg & 7) == 6);
    case P_SHIFT_RI64: case P_SHIFT_RI32: case 0xc1: case 0xd1:
        return shift_count(i) == 0;
    }
    return 0;
}

/* The liveness of the guest's flags in the host flags right after native form i
 * produced them (emit_native's set_live, a slow path rejoining with them rebuilt),
 * or 0 */
static int host_live_after(const Insn *i)
{
    int form, aluop, kind;
    unsigned sz;
    if (!native_has_form(i))
        return 0;
    if (alux_form(i, &form, &aluop) || gen_alu_form(i, &aluop, &sz, &kind))
        return LIVE_ALL;
    switch (i->op) {
    case P_TEST_RR64: case P_TEST_RR32:
        return LIVE_ALL;
    case P_LOAD_ALU64: case P_LOAD_ALU32:
        return LIVE_ALL;
    case 0x40: case 0x41: case 0x42: case 0x43: case 0x44: case 0x45: case 0x46: case 0x47:
    case 0x48: case 0x49: case 0x4a: case 0x4b: case 0x4c: case 0x4d: case 0x4e: case 0x4f:
        return LIVE_ALL;
    case 0xff:
        return (i->reg & 7) <= 1 && i->mod == 3 ? LIVE_ALL : 0;
    case 0xf6: case 0xf7:
        return (i->reg & 7) == 3 ? LIVE_ALL : 0;
    case P_SHIFT_RI64: case P_SHIFT_RI32:
        return shift_count(i) == 0 ? 0 : shift_count(i) == 1 ? LIVE_ALL : LIVE_NO_OF;
    case 0xc1: case 0xd1:
        if ((i->reg & 7) < 4 || !shift_count(i))
            return 0;
        return shift_count(i) == 1 ? LIVE_ALL : LIVE_NO_OF;
    }
    return 0;
}

/* Native forms that keep the host flags as they are (flags_neutral ones whose code
 * has no flag-setting host instruction): the live flags pass them */
static int keeps_host_flags(const Insn *i)
{
    switch (i->op) {
    case P_MOV_RM_R64: case P_MOV_RM_R32: case P_MOV_R_RM64: case P_MOV_R_RM32:
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf:
    case 0x11f: case 0x90:
    case 0x10d: case 0x118: case 0x119: case 0x11a: case 0x11b: case 0x11c: case 0x11d: case 0x11e:
        return native_has_form(i);
    case 0x8c:
        return i->mod == 3 && native_has_form(i);
    }
    return 0;
}

/* setcc r8 / cmovcc r, r: native consumers that read the host flags when they are live
 * for their condition and leave them so */
static int host_flag_consumer(const Insn *i)
{
    return native_has_form(i) && ((i->op >= 0x190 && i->op <= 0x19f) || (i->op >= 0x140 && i->op <= 0x14f));
}

/* Are the flags instruction n of b leaves overwritten before anything can see them?
 * Anything but consumers that read them from the live host flags: those they pass. */
static int flags_dead_after(const Block *b, unsigned n)
{
    int live = host_live_after(&b->insns[n]);
    for (unsigned m = n + 1; m < b->n; m++) {
        const Insn *i = &b->insns[m];
        if (kills_flags(i))
            return 1;
        if (live && host_flag_consumer(i) && live_for(live, i->op & 15))
            continue;
        if (!flags_neutral(i))
            return 0;
        if (!keeps_host_flags(i))
            live = 0;
    }
    return 0;
}

static int is_branch(const Insn *i)
{
    return (i->op >= 0x70 && i->op <= 0x7f) || (i->op >= 0x180 && i->op <= 0x18f) ||
           i->op == 0xe9 || i->op == 0xeb;
}

/* Native forms whose code reaches guest registers only through op_mem's whole 32- and
 * 64-bit loads and stores and op_mem_imm32, which know the register cache: before any
 * other instruction every cached register is written back (the byte and word forms
 * read and write c->r[] in memory themselves, the helper reads all of it). */
static int regs_clean(const Insn *i)
{
    int form, aluop, kind;
    unsigned sz;
    if (!native_has_form(i))
        return 0;
    if (alux_form(i, &form, &aluop))
        return 1;
    if (gen_alu_form(i, &aluop, &sz, &kind))
        return sz >= 4;
    switch (i->op) {
    case P_MOV_RM_R64: case P_MOV_RM_R32: case P_MOV_R_RM64: case P_MOV_R_RM32:
    case P_TEST_RR64: case P_TEST_RR32: case P_SHIFT_RI64: case P_SHIFT_RI32:
    case P_LOAD64: case P_LOAD32: case P_STORE64: case P_STORE32: case P_LOAD_ALU64: case P_LOAD_ALU32:
    case P_LEA64: case 0x8d:
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf:
    case 0x1af: case 0x69: case 0x6b:
    case 0x40: case 0x41: case 0x42: case 0x43: case 0x44: case 0x45: case 0x46: case 0x47:
    case 0x48: case 0x49: case 0x4a: case 0x4b: case 0x4c: case 0x4d: case 0x4e: case 0x4f:
    case 0x50: case 0x51: case 0x52: case 0x53: case 0x54: case 0x55: case 0x56: case 0x57:
    case 0x58: case 0x59: case 0x5a: case 0x5b: case 0x5c: case 0x5d: case 0x5e: case 0x5f:
    case 0x68: case 0x6a:
    case 0x140: case 0x141: case 0x142: case 0x143: case 0x144: case 0x145: case 0x146: case 0x147:
    case 0x148: case 0x149: case 0x14a: case 0x14b: case 0x14c: case 0x14d: case 0x14e: case 0x14f:
    case 0xc1: case 0xd1: case 0xd3:
    case 0x1c8: case 0x1c9: case 0x1ca: case 0x1cb: case 0x1cc: case 0x1cd: case 0x1ce: case 0x1cf:
    case 0x131: case 0x90: case 0x11f:
        return 1;
    case 0xff:
        return (i->reg & 7) <= 1 && i->mod == 3;
    case 0xf7:   /* mul, div; not and neg of a dword or qword register */
        return (i->reg & 7) == 4 || (i->reg & 7) == 6 || i->mod == 3;
    case 0x1b6: case 0x1b7: case 0x1be: case 0x1bf:
        /* a register source through the cache, or [rbx + its disp] when not cached;
         * ah-bh, whose bytes lie inside c->r[], only after a write-back */
        return i->osz >= 4 && (i->mod != 3 || movx_low_source(i));
    case 0x190: case 0x191: case 0x192: case 0x193: case 0x194: case 0x195: case 0x196: case 0x197:
    case 0x198: case 0x199: case 0x19a: case 0x19b: case 0x19c: case 0x19d: case 0x19e: case 0x19f:
        return i->mod == 3 && low_byte_reg(i, i->rm);   /* setcc into the cached register */
    }
    return 0;
}

/* Does the modrm reg field (or the register in the opcode) of i name a register? Not
 * where it extends the opcode (the group forms and the pseudo-ops made of them). */
static int reg_field_is_register(const Insn *i)
{
    if (i->op >= P_ALUX && i->op < P_ALUX + 32)
        return (i->op - P_ALUX) / 8 < 2;   /* RR64, RR32: reg is the source */
    switch (i->op) {
    case P_SHIFT_RI64: case P_SHIFT_RI32:
    case 0x80: case 0x81: case 0x82: case 0x83: case 0x8f: case 0xc0: case 0xc1: case 0xc6: case 0xc7:
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: case 0xf6: case 0xf7: case 0xfe: case 0xff:
    case 0x1ba: case 0x10d: case 0x118: case 0x119: case 0x11a: case 0x11b: case 0x11c: case 0x11d:
    case 0x11e: case 0x11f:
        return 0;
    }
    return 1;
}

/* The guest registers the block's native forms name most (at least twice) go into
 * host registers for the block (Emit.host, cache_regs in order); the rest stay in
 * memory only. */
static void choose_cached(Comp *k)
{
    int uses[16] = { 0 };
    const Block *b = k->b;
    memset(k->e.host, 0, sizeof k->e.host);
    for (unsigned n = 0; n < b->n; n++) {
        const Insn *i = &b->insns[n];
        if (!native_has_form(i))
            continue;
        if (i->mod == 3 && i->rm < 16)
            uses[i->rm]++;
        if (i->reg < 16 && reg_field_is_register(i))
            uses[i->reg]++;
        if (i->mod != 3 && i->base < 16)
            uses[i->base]++;
        if (i->mod != 3 && i->index < 16)
            uses[i->index]++;
        if ((i->op >= 0x50 && i->op <= 0x5f) || i->op == 0x68 || i->op == 0x6a)
            uses[4] += 2;   /* push and pop read and write rsp */
    }
    for (int h = 0; h < CACHE_REGS; h++) {
        int best = -1;
        for (int r = 0; r < 16; r++)
            if (!k->e.host[r] && uses[r] >= 2 && (best < 0 || uses[r] > uses[best]))
                best = r;
        if (best < 0)
            break;
        k->e.host[best] = cache_regs[h];
    }
}

void *native_compile(CPU *c, Block *b, NativeStepFn step)
{
    if (!c->nat_arena)
        return 0;
    size_t need = 64 + (size_t)b->n * 3 * INSN_MAX_CODE + 2 * CHAIN_EXIT_CODE + LOOKUP_EXIT_CODE;
    if (c->nat_size - c->nat_used < need) {
        /* cpu_run flushes the cache before the next block (QEMU's tb_flush), unless
         * an empty arena would not hold this block either */
        c->nat_full = c->nat_used > 0;
        return 0;
    }
    uint64_t t0 = now_ns();
    uint8_t *start = c->nat_arena + c->nat_used;
    static __thread Comp k;
    memset(&k, 0, sizeof k);
    k.e.p = start;
    k.e.end = start + need;
    k.c = c;
    k.b = b;
    k.step = step;
    k.long64 = b->mode == 2;
    k.known = -1;   /* the lazy record of whatever ran before the block */
    uint64_t wrap = k.long64 ? ~0ull : 0xffffffffull;
    uint64_t rip = b->pc;
    int rip_stale = 0;   /* c->rip lags behind: set it before leaving */
    int ended = 0;

    b1(&k.e, 0x53);                                 /* push rbx */
    b1(&k.e, 0x41); b1(&k.e, 0x54);                 /* push r12 */
    b1(&k.e, 0x41); b1(&k.e, 0x55);                 /* push r13 */
    b1(&k.e, 0x41); b1(&k.e, 0x56);                 /* push r14 */
    b1(&k.e, 0x41); b1(&k.e, 0x57);                 /* push r15 */
    b1(&k.e, 0x55);                                 /* push rbp */
    b1(&k.e, 0x48); b1(&k.e, 0x83); b1(&k.e, 0xec); b1(&k.e, 8);   /* sub rsp, 8: calls see an aligned stack */
    b1(&k.e, 0x48); b1(&k.e, 0x89); b1(&k.e, 0xfb); /* mov rbx, rdi */
    /* NATIVE_CHAIN_ENTRY: where a chained jump enters, rbx and the frame already set */
    choose_cached(&k);
    reload_cached(&k.e);
    k.body = k.e.p;
    for (unsigned n = 0; n < b->n; n++) {
        Insn *i = &b->insns[n];
        uint64_t next = (b->pc + i->end) & wrap;
        k.cc_dead = flags_dead_after(b, n);
        if (n + 1 == b->n && (is_branch(i) || is_call_ret(i, k.long64) || is_indirect(i, k.long64)))
            flush_all(&k.e);   /* c->r[] whole when the block leaves, by any path */
        if (n + 1 == b->n && is_branch(i)) {
            emit_branch(&k, i, next, (int)b->n);
            ended = 1;
            break;
        }
        if (n + 1 == b->n && is_call_ret(i, k.long64)) {
            emit_call_ret(&k, i, rip, next, (int)b->n);
            ended = 1;
            break;
        }
        if (n + 1 == b->n && is_indirect(i, k.long64)) {
            emit_indirect(&k, i, rip, next, (int)b->n);
            ended = 1;
            break;
        }
        k.known_set = 0;
        if (!regs_clean(i))
            flush_all(&k.e);
        if (!is_branch(i) && native_has_form(i) && emit_native(&k, i, rip, next, (int)n + 1)) {
            rip_stale = 1;
            if (!k.known_set && !keeps_lazy_record(i))
                k.known = -1;   /* it wrote the lazy record in a way not followed here */
        } else {
            if (k.cc_missing)   /* the interpreter's handler may read the flags */
                k.failed = 1;
            flush_all(&k.e);   /* and every register */
            emit_step_call(&k, i, rip);
            k.steps = 1;
            add_stub(&k, (int)n + 1);
            k.flags_live = 0;
            k.known = -1;
            rip_stale = 0;
        }
        rip = next;
    }
    if (!ended) {
        flush_all(&k.e);
        if (rip_stale) {
            /* ran into the block's size or page limit: the next block follows directly */
            store64_const(&k.e, CPU_OFF(rip), rip);
            emit_chain_exit(&k, 1, rip, (int)b->n);
        } else {
            emit_exit(&k.e, (int)b->n);   /* the helper set rip: a jump of its own */
        }
    }
    /* TLB misses: the instruction through the interpreter, then back (or out) */
    for (int s = 0; s < k.nslow; s++) {
        patch_rel32(k.slow[s].jump, k.e.p);
        if (k.slow[s].jump2)
            patch_rel32(k.slow[s].jump2, k.e.p);
        emit_writeback(&k.e, k.slow[s].dirty);
        emit_step_call(&k, k.slow[s].insn, k.slow[s].rip);
        if (!k.slow[s].resume) {   /* a block-ending instruction: the interpreter set rip */
            emit_exit(&k.e, k.slow[s].done);
            continue;
        }
        add_stub(&k, k.slow[s].done);
        if (k.slow[s].remat_kind >= 0)
            emit_remat(&k, k.slow[s].remat_kind, k.slow[s].remat_sz);
        b1(&k.e, 0xe9);
        uint8_t *at = k.e.p;
        b4(&k.e, 0);
        patch_rel32(at, k.slow[s].resume);
    }
    for (int s = 0; s < k.nstub; s++) {
        patch_rel32(k.stub[s].jump, k.e.p);
        emit_exit(&k.e, k.stub[s].done);
    }
    if (k.failed)
        return 0;   /* nothing of it is kept: nat_used stays */
    c->nat_used += (size_t)(k.e.p - start);
    c->nat_used = (c->nat_used + 15) & ~(size_t)15;
    c->st_native_blocks++;
    c->st_native_compile_ns += now_ns() - t0;
    return start;
}
