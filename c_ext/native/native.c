/* The native tier's code arena, x86-64 encoder and block compiler (see native.h). */
#include <stdlib.h>
#include <sys/mman.h>
#include "native.h"

/* ---- arena ---- */

#define ARENA_SIZE (32u << 20)
/* the most one instruction can emit, with its exit stub: checked before each one */
#define INSN_MAX_CODE 160

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

int native_arena_init(CPU *c)
{
    /* One RWX mapping: the arena is private to its vCPU thread and written only while
     * no block of it runs (compiles happen between blocks). Without it (a hardened
     * kernel refusing PROT_EXEC on anonymous memory) the tier stays off. */
    void *p = mmap(0, ARENA_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        c->nat_arena = 0;
        c->nat_size = 0;
        return -1;
    }
    c->nat_arena = p;
    c->nat_size = ARENA_SIZE;
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

typedef struct Emit {
    uint8_t *p, *end;
} Emit;

static void b1(Emit *e, uint8_t v) { *e->p++ = v; }
static void b4(Emit *e, uint32_t v) { memcpy(e->p, &v, 4); e->p += 4; }
static void b8(Emit *e, uint64_t v) { memcpy(e->p, &v, 8); e->p += 8; }

#define CPU_OFF(field) ((int32_t)offsetof(CPU, field))
#define GREG(n) (CPU_OFF(r) + 8 * (int32_t)(n))

/* opcode with a register and [rbx + disp32]; w selects 64-bit operands */
static void op_mem(Emit *e, int w, uint8_t opc, int reg, int32_t disp)
{
    if (w)
        b1(e, 0x48);
    b1(e, opc);
    b1(e, (uint8_t)(0x80 | ((reg & 7) << 3) | RBX));
    b4(e, (uint32_t)disp);
}

static void load64(Emit *e, int reg, int32_t disp) { op_mem(e, 1, 0x8b, reg, disp); }
/* zero-extends into the whole register, like the interpreter's (uint32_t) reads */
static void load32(Emit *e, int reg, int32_t disp) { op_mem(e, 0, 0x8b, reg, disp); }
static void store64(Emit *e, int reg, int32_t disp) { op_mem(e, 1, 0x89, reg, disp); }

/* mov dword [rbx + disp], imm32 */
static void store32_imm(Emit *e, int32_t disp, uint32_t imm)
{
    op_mem(e, 0, 0xc7, 0, disp);
    b4(e, imm);
}

/* mov qword [rbx + disp], simm32 */
static void store64_simm(Emit *e, int32_t disp, int32_t imm)
{
    op_mem(e, 1, 0xc7, 0, disp);
    b4(e, (uint32_t)imm);
}

/* add qword [rbx + disp], imm32 */
static void add64_mem_imm(Emit *e, int32_t disp, int32_t imm)
{
    op_mem(e, 1, 0x81, 0, disp);
    b4(e, (uint32_t)imm);
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

/* ---- native forms ---- */

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

int native_has_form(const Insn *i)
{
    int form, aluop;
    if (alux_form(i, &form, &aluop))
        return 1;
    switch (i->op) {
    case P_MOV_RM_R64: case P_MOV_RM_R32: case P_MOV_R_RM64: case P_MOV_R_RM32:
    case P_TEST_RR64: case P_TEST_RR32:
        return 1;
    case P_LEA64:
        return (i->asz == 8 || i->asz == 4) && i->index != RIPREG;
    case 0xb8: case 0xb9: case 0xba: case 0xbb: case 0xbc: case 0xbd: case 0xbe: case 0xbf:
        return i->osz == 4 || i->osz == 8;
    }
    return 0;
}

/* the interpreter's alu() + set_cc() for one P_ALUX form */
static void emit_alux(Emit *e, const Insn *i, int form, int aluop)
{
    int wide = form == 0 || form == 2;
    int imm = form >= 2;
    if (wide)
        load64(e, RAX, GREG(i->rm));
    else
        load32(e, RAX, GREG(i->rm));
    if (imm)
        mov_imm(e, RCX, wide ? i->imm : (uint32_t)i->imm);
    else if (wide)
        load64(e, RCX, GREG(i->reg));
    else
        load32(e, RCX, GREG(i->reg));
    int logic = aluop == ALU_OR || aluop == ALU_AND || aluop == ALU_XOR;
    uint32_t cc = logic ? CC_LOGIC : aluop == ALU_ADD ? CC_ADD : CC_SUB;
    if (logic) {
        store64_simm(e, CPU_OFF(cc_a), 0);
        store64_simm(e, CPU_OFF(cc_b), 0);
    } else {
        store64(e, RAX, CPU_OFF(cc_a));
        store64(e, RCX, CPU_OFF(cc_b));
    }
    static const uint8_t opc[8] = { [ALU_ADD] = 0x01, [ALU_OR] = 0x09, [ALU_AND] = 0x21,
                                    [ALU_SUB] = 0x29, [ALU_XOR] = 0x31, [ALU_CMP] = 0x29 };
    /* 64-bit arithmetic on zero-extended 32-bit operands: the same cc_res bits as the
     * interpreter's uint64_t sums */
    alu_rr(e, opc[aluop], RAX, RCX);
    store64(e, RAX, CPU_OFF(cc_res));
    store32_imm(e, CPU_OFF(cc_op), cc);
    store32_imm(e, CPU_OFF(cc_size), wide ? 8 : 4);
    if (aluop != ALU_CMP) {
        if (!wide)
            mov32_rr(e, RAX, RAX);
        store64(e, RAX, GREG(i->rm));
    }
}

static void emit_lea(Emit *e, const Insn *i, uint64_t next_rip)
{
    uint64_t disp = (uint64_t)i->disp;
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
    store64(e, RAX, GREG(i->reg));
}

/* emits i's native form; next_rip is the guest rip after it */
static void emit_native(Emit *e, const Insn *i, uint64_t next_rip)
{
    int form, aluop;
    if (alux_form(i, &form, &aluop)) {
        emit_alux(e, i, form, aluop);
        return;
    }
    switch (i->op) {
    case P_MOV_RM_R64: load64(e, RAX, GREG(i->reg)); store64(e, RAX, GREG(i->rm)); return;
    case P_MOV_RM_R32: load32(e, RAX, GREG(i->reg)); store64(e, RAX, GREG(i->rm)); return;
    case P_MOV_R_RM64: load64(e, RAX, GREG(i->rm)); store64(e, RAX, GREG(i->reg)); return;
    case P_MOV_R_RM32: load32(e, RAX, GREG(i->rm)); store64(e, RAX, GREG(i->reg)); return;
    case P_TEST_RR64: case P_TEST_RR32:
        if (i->op == P_TEST_RR64) {
            load64(e, RAX, GREG(i->rm));
            load64(e, RCX, GREG(i->reg));
        } else {
            load32(e, RAX, GREG(i->rm));
            load32(e, RCX, GREG(i->reg));
        }
        alu_rr(e, 0x21, RAX, RCX);
        store64(e, RAX, CPU_OFF(cc_res));
        store64_simm(e, CPU_OFF(cc_a), 0);
        store64_simm(e, CPU_OFF(cc_b), 0);
        store32_imm(e, CPU_OFF(cc_op), CC_LOGIC);
        store32_imm(e, CPU_OFF(cc_size), i->op == P_TEST_RR64 ? 8 : 4);
        return;
    case P_LEA64:
        emit_lea(e, i, next_rip);
        return;
    default:   /* B8+r, mov r32/r64, imm */
        store64_const(e, GREG(i->reg), i->osz == 4 ? (uint32_t)i->imm : i->imm);
        return;
    }
}

/* ---- the block compiler ---- */

/* Exit stubs sit after the block's main path: one per helper call that can end the
 * block early, each crediting the instructions run so far. */
typedef struct Stub {
    uint8_t *jump;      /* rel32 of the jnz to the stub */
    int done;           /* instructions run when it is taken */
} Stub;

static void emit_exit(Emit *e, int done)
{
    add64_mem_imm(e, CPU_OFF(st_insns), done);
    add64_mem_imm(e, CPU_OFF(st_native_insns), done);
    b1(e, 0x5b);   /* pop rbx */
    b1(e, 0xc3);   /* ret */
}

void *native_compile(CPU *c, Block *b, NativeStepFn step)
{
    if (!c->nat_arena)
        return 0;
    size_t need = 64 + (size_t)b->n * 2 * INSN_MAX_CODE;
    if (c->nat_size - c->nat_used < need)
        return 0;
    uint64_t t0 = now_ns();
    uint8_t *start = c->nat_arena + c->nat_used;
    Emit e = { start, start + need };
    Stub stubs[BLOCK_MAX_INSNS];
    int nstubs = 0;
    uint64_t wrap = b->mode == 2 ? ~0ull : 0xffffffffull;
    uint64_t rip = b->pc;
    int rip_stale = 0;   /* c->rip lags behind: set it before leaving */

    b1(&e, 0x53);                        /* push rbx: also aligns the stack for calls */
    b1(&e, 0x48); b1(&e, 0x89); b1(&e, 0xfb);   /* mov rbx, rdi */
    for (unsigned k = 0; k < b->n; k++) {
        Insn *i = &b->insns[k];
        uint64_t next = (b->pc + i->end) & wrap;
        if (native_has_form(i)) {
            emit_native(&e, i, next);
            rip_stale = 1;
        } else {
            /* step(c, i, rip): the helper stores rip itself, so c->rip is precise for
             * any fault or exit of this instruction */
            b1(&e, 0x48); b1(&e, 0x89); b1(&e, 0xdf);   /* mov rdi, rbx */
            mov_imm(&e, RSI, (uint64_t)(uintptr_t)i);
            mov_imm(&e, RDX, rip);
            mov_imm(&e, RAX, (uint64_t)(uintptr_t)step);
            b1(&e, 0xff); b1(&e, 0xd0);                 /* call rax */
            b1(&e, 0x85); b1(&e, 0xc0);                 /* test eax, eax */
            stubs[nstubs].jump = jcc32(&e, 0x5);        /* jnz: the block ends here */
            stubs[nstubs].done = (int)k + 1;
            nstubs++;
            rip_stale = 0;
        }
        rip = next;
    }
    if (rip_stale)
        store64_const(&e, CPU_OFF(rip), rip);
    emit_exit(&e, (int)b->n);
    for (int s = 0; s < nstubs; s++) {
        patch_rel32(stubs[s].jump, e.p);
        emit_exit(&e, stubs[s].done);
    }
    c->nat_used += (size_t)(e.p - start);
    c->nat_used = (c->nat_used + 15) & ~(size_t)15;
    c->st_native_blocks++;
    c->st_native_compile_ns += now_ns() - t0;
    return start;
}
