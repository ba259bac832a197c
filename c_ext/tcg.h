/* kvmpy C translator: shared CPU state, the functions of each file, addresses.
 *
 * Design: guest code is decoded once into blocks of pre-decoded instructions
 * (struct Insn), cached by guest-physical address + code mode, and executed by
 * a switch-threaded interpreter. Memory goes through a software TLB holding
 * host pointers, so a RAM access that hits is a tag compare and a load.
 * Faults and VM exits leave an instruction with longjmp back to the run loop;
 * instructions do their register writeback only after their last memory
 * access, so they can restart (after a #PF, or after an I/O/MMIO exit whose
 * data the VMM completes: see the access log below). The inline guest-memory fast
 * paths (ld, st, atomic_host over the TLB) are in access.h.
 */
#ifndef KVMPY_TCG_H
#define KVMPY_TCG_H

#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

enum { R_AX, R_CX, R_DX, R_BX, R_SP, R_BP, R_SI, R_DI };
enum { S_ES, S_CS, S_SS, S_DS, S_FS, S_GS, S_LDT, S_TR };
#define NOREG 0xff
#define RIPREG 0xfe

#define F_CF 0x1u
#define F_PF 0x4u
#define F_AF 0x10u
#define F_ZF 0x40u
#define F_SF 0x80u
#define F_TF 0x100u
#define F_IF 0x200u
#define F_DF 0x400u
#define F_OF 0x800u
#define F_IOPL 0x3000u
#define F_NT 0x4000u
#define F_RF 0x10000u
#define F_VM 0x20000u
#define F_AC 0x40000u
#define F_ID 0x200000u
#define F_ARITH (F_CF | F_PF | F_AF | F_ZF | F_SF | F_OF)

#define CR0_PE 1u
#define CR0_TS 8u
#define CR0_WP (1u << 16)
#define CR0_PG (1u << 31)
#define CR4_PSE (1u << 4)
#define CR4_PAE (1u << 5)
#define CR4_PGE (1u << 7)
#define CR4_OSFXSR (1u << 9)
#define CR4_FSGSBASE (1u << 16)
#define EFER_SCE 1u
#define EFER_LME (1u << 8)
#define EFER_LMA (1u << 10)
#define EFER_NXE (1u << 11)

/* exception vectors */
enum { EXC_DE = 0, EXC_DB = 1, EXC_BP = 3, EXC_OF = 4, EXC_BR = 5, EXC_UD = 6, EXC_NM = 7,
       EXC_DF = 8, EXC_TS = 10, EXC_NP = 11, EXC_SS = 12, EXC_GP = 13, EXC_PF = 14,
       EXC_MF = 16, EXC_AC = 17, EXC_XM = 19 };

/* exit kinds: same numbers as kvmpy/vcpu/exits.py */
enum { EXIT_NONE = 0, EXIT_IO = 1, EXIT_MMIO = 2, EXIT_HLT = 3, EXIT_SHUTDOWN = 4,
       EXIT_INTERNAL_ERROR = 5, EXIT_INTR = 6 };

/* lazy flags: the last flag-setting operation, evaluated on demand */
enum { CC_EAGER, CC_ADD, CC_ADC, CC_SUB, CC_SBB, CC_LOGIC, CC_INC, CC_DEC, CC_SHL, CC_SHR, CC_SAR };

typedef struct Seg {
    uint64_t base;
    uint32_t limit;
    uint16_t sel;
    uint8_t type, s, dpl, present, avl, l, db, g, unusable;
} Seg;

#define TLB_BITS 12
#define TLB_SIZE (1 << TLB_BITS)
#define TLB_INVALID (~0ULL)
#define TLB_LOG_MAX 1024
typedef struct TlbEnt {
    uint64_t tag_r, tag_w, tag_x;  /* linear page, or TLB_INVALID when that access must go slow */
    uintptr_t addend;              /* host = addend + linear */
    uint64_t paddr;                /* guest-physical page */
    uint8_t global;
    /* one cache line an entry, and compiled code finds it with a shift and a mask
     * (native.c emit_tlb) */
    uint8_t pad_to_64[23];
} TlbEnt;
_Static_assert(sizeof(TlbEnt) == 64, "TlbEnt is one cache line");

typedef struct Insn {
    uint16_t op;        /* 0x000-0x0ff one byte, 0x100 0F xx, 0x200 0F38 xx, 0x300 0F3A xx */
    uint8_t len;
    uint8_t osz;        /* operand size in bytes: 2/4/8 (byte forms are implied by op) */
    uint8_t asz;        /* address size: 2/4/8 */
    uint8_t seg;        /* effective segment of the memory operand */
    uint8_t rep;        /* 0, 1 = F3 (rep/repe), 2 = F2 (repne) */
    uint8_t rex;        /* REX byte present (changes byte registers 4-7) */
    uint8_t pfx;        /* SSE mandatory prefix: 0 none, 1 = 66, 2 = F3, 3 = F2 */
    uint8_t lock;
    uint8_t mod, reg, rm;   /* reg and rm already include REX.R / REX.B */
    uint8_t base, index, scale;
    uint8_t rexw;
    uint16_t end;       /* offset of the next instruction from the block's first byte */
    int64_t disp;
    uint64_t imm;
    uint64_t imm2;
} Insn;

#define BLOCK_MAX_INSNS 64
#define PAGE_LISTS 4096
static inline unsigned page_list_slot(uint64_t page)
{
    return (unsigned)((page >> 12) ^ (page >> 24)) & (PAGE_LISTS - 1);
}
typedef struct Block {
    uint64_t start;         /* guest-physical address of the first byte */
    uint64_t phys, phys2;   /* physical page(s) its bytes came from (phys2 = ~0 when one page) */
    uint64_t pc;            /* rip at decode (for the jump cache) */
    uint64_t cs_base;
    uint32_t mode;
    uint32_t n;
    uint32_t valid;
    struct Block *hnext;
    Insn *insns;
    /* Successors seen after this block ran (most recent first): hints that spare the
     * jump-cache lookup. Like jump-cache entries they are checked with block_fits()
     * before use, so nothing has to find and clear them when blocks or mappings go. */
    struct Block *link[2];
    struct Block *pnext[2];  /* next in the page lists of phys and phys2 (CPU.page_blocks) */
    /* native tier (c_ext/native/): host code once the block ran native_threshold times;
     * it dies with the block (slot refilled by translate_block, arena reset by
     * block_cache_flush), and runs only while the block is valid */
    void *native;
    uint32_t heat;
    /* native tier: the compiled successors of this block's two direct exits (taken,
     * fall-through), jumped to straight from its code; set by exec.c once a successor
     * fits (native.h says when), cleared when the slot is refilled. The jump re-checks
     * the successor's validity and fetch mapping, so nothing must unlink them. */
    struct Block *nat_succ[2];
} Block;

typedef struct RamRegion {
    uint64_t gpa, size;
    uint8_t *host;
    uint8_t *code;          /* one byte per 4 KiB page: translated code lives there */
    int readonly;           /* ROM: guest writes become MMIO exits (dropped), as under KVM */
} RamRegion;

enum { STOP_BLOCK = 1, STOP_REPLAY = 2 };

/* One VM-exit-producing access of the current instruction, kept so the
 * instruction can be re-executed after the VMM completes it. */
typedef struct Access {
    uint8_t kind;           /* EXIT_IO or EXIT_MMIO */
    uint8_t write;
    uint32_t size, count;
    uint64_t addr;
    uint8_t *data;
    uint8_t small[16];
} Access;

#define LIFE_INIT 0x80000000u
#define LIFE_SIPI_MASK 0x1ffu

#define MAX_RAM 32
#define MAX_CPUID 64
#define IOBUF_SIZE 4096

typedef struct CPU {
    uint64_t r[16];
    uint64_t rip, next_rip;
    uint64_t eflags;                 /* all bits except F_ARITH, which are lazy */
    uint32_t cc_op, cc_size;
    uint64_t cc_res, cc_a, cc_b, cc_c;
    Seg seg[8];
    uint64_t gdt_base, idt_base;
    uint32_t gdt_limit, idt_limit;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, xcr0;
    uint64_t dr[8];
    uint64_t star, lstar, cstar, fmask, kernel_gs_base, tsc_offset, apic_base, pat;
    uint64_t sysenter_cs, sysenter_esp, sysenter_eip, tsc_aux, misc_enable;
    uint64_t spec_ctrl;   /* IA32_SPEC_CTRL as the guest wrote it */
    uint64_t mtrr_def_type;
    int cpl;
    int code_mode;                   /* 0 = 16-bit, 1 = 32-bit, 2 = 64-bit code */
    int long64;                      /* running 64-bit code: flat ES/CS/SS/DS */
    int mmu_idx;                     /* 0 supervisor, 1 user */
    TlbEnt tlb[2][TLB_SIZE];
    /* the entries filled since the last flush (with repeats), so that a flush (every CR3
     * write) clears those rather than sweeping both arrays; past TLB_LOG_MAX it sweeps */
    uint16_t tlb_log[2][TLB_LOG_MAX];
    int tlb_log_n[2];                /* TLB_LOG_MAX + 1: overflowed */

    /* SSE / x87 */
    uint8_t xmm[16][16] __attribute__((aligned(16)));
    uint32_t mxcsr;
    uint16_t fcw, fsw, ftw;
    uint8_t fpregs[8][16];           /* physical R0-R7 (x87.c); ST(i) = R[(TOP+i)&7] */
    uint64_t fip, fdp;               /* last non-control x87 instruction and its operand */
    uint16_t fcs, fds, fop;

    int nram;
    RamRegion ram[MAX_RAM];

    /* exceptions */
    jmp_buf jb;
    int exc_vec;
    uint32_t exc_err;
    int exc_has_err;
    int delivering;                  /* vector being delivered, -1 none: nested faults -> #DF */

    /* asynchronous requests */
    _Atomic int exit_request;
    _Atomic int kicked;
    _Atomic uint64_t irq_pending[4];
    int halted;
    int shadow;                      /* interrupt shadow after sti / mov ss */
    /* NMI: requested from any thread, taken regardless of IF, then blocked until IRET */
    _Atomic int nmi_pending;
    int nmi_blocked;
    /* run() returns EXIT_INTR as soon as an external interrupt can be taken */
    _Atomic int want_irq_window;
    /* INIT / SIPI from the LAPIC (any thread): LIFE_INIT | (SIPI vector + 1), applied by
     * the vCPU thread. An AP waits in wait_sipi (run() returns EXIT_HLT) until a SIPI. */
    _Atomic uint32_t life_request;
    int wait_sipi;

    /* exits */
    int exit_reason;
    Access acc[4];
    int nacc, acc_pos;
    uint8_t iobuf[IOBUF_SIZE];
    char errmsg[256];

    /* block cache */
    Block *blocks;
    int nblocks, max_blocks;
    Insn *insn_pool;
    int ninsns, max_insns;
    Block **hash;
    uint32_t hash_size;
    Block *jc[4096];                 /* by pc; a hint checked with block_fits(), like Block.link */
    /* blocks by physical page, so a write to a code page finds its blocks without
     * scanning the whole cache; see page_list_slot() */
    Block *page_blocks[PAGE_LISTS];
    Block *cur_block;
    /* checked after every instruction (one load): STOP_BLOCK leaves the block after it
     * (its code was overwritten, or it must repeat); STOP_REPLAY clears the access log
     * once the instruction that replayed completed VM exits is done */
    int stop_block;

    uint64_t seen_code_epoch;        /* code_epoch when this CPU last dropped write tags */

    /* invalidation requests from other threads (DMA into guest RAM): ranges queued under
     * inval_lock, applied by the vCPU thread at the next block boundary */
    atomic_flag inval_lock;
    int ninval;
    int inval_overflow;
    struct { uint64_t gpa, size; } inval[64];

    /* CPUID table */
    int ncpuid;
    struct { uint32_t fn, idx, flags, eax, ebx, ecx, edx; } cpuid[MAX_CPUID];
    int cpu_index;

    /* statistics (decode vs execute split for the benchmark); st_insns counts the
     * instructions run outside compiled blocks (stats() adds st_native_insns: compiled
     * code bumps one counter, not two) */
    uint64_t st_insns, st_blocks, st_translated, st_decoded_insns, st_decode_ns, st_exec_ns;
    uint64_t st_invalidations;
    /* --trace profile: slow memory paths (TLB misses, page crossings, MMIO, writes to
     * code pages); the clock is read around them only while `profiling` is set */
    uint64_t st_slow_mem, st_slow_mem_ns, st_gil_wait_ns;
    int profiling;

    /* The ACPI PM timer's reads answered here instead of exiting: the counter is a
     * pure function of CLOCK_MONOTONIC, whose origin and width its Python model
     * publishes (kvmpy/devices/acpi_pm.py PmTimerClock). Port 0: every read exits.
     * After nram, so a CPU reset keeps them (they are the machine's, not the CPU's). */
    uint16_t pm_timer_port;
    uint64_t pm_timer_mask;
    int64_t pm_timer_origin_ns;
    uint64_t st_pm_timer_reads;
    uint64_t st_published_reads;   /* port reads answered from PortQueue's published values */

    /* native tier (c_ext/native/): the code arena (mapped with the CPU, before the
     * sandbox closes), the executions before a block is compiled (-1: never) and its
     * statistics (st_native_insns: run inside compiled blocks, st_native_helper: of
     * those, through the interpreter's handler) */
    uint8_t *nat_arena;
    size_t nat_size, nat_used;
    int nat_full;   /* a hot block found no room: cpu_run flushes the cache between blocks */
    int native_threshold;
    uint64_t st_native_insns, st_native_helper, st_native_blocks, st_native_compile_ns;
    /* native tier, while `profiling`: helper calls per dispatch op (Insn.op), to find
     * what still lacks a native form; sized by DISPATCH_SIZE (exec.c checks) */
    uint64_t st_native_helper_op[0x441];
    /* the native tier's direct chaining (native.h): the successor slot of the exit a
     * compiled block just left by, or 0; exec.c links it and clears it */
    struct Block **nat_exit_slot;
    const _Atomic uint64_t *nat_code_epoch;   /* mem.c's code_epoch, for the chained jumps */
    uint64_t st_native_chained;
    uint64_t st_native_indirect;   /* jumps into compiled blocks found through jc (ret, jmp/call r/m) */
    /* queued port writes (struct PortQueue below), 0: every OUT exits */
    struct PortQueue *port_queue;
} CPU;

/* ---- queued port writes ----
 * A one-byte OUT to a port of the queue's zones (the UART's THR, the RTC's index)
 * does not exit: it waits here, in the order the vCPUs issued it, until the VMM
 * hands the queue to the devices, which it does before it serves any exit
 * (kvmpy/hv/tcg/portqueue.py): KVM's coalesced PIO, for the translator. A full
 * queue makes the OUT exit as any other. One queue per machine, shared by its CPUs. */
#define PORT_QUEUE_SIZE 512
#define PORT_QUEUE_ZONES 4
/* The same object holds the machine's published port reads: a one-byte IN of such a
 * port is answered from the value its device model last published (the low byte,
 * with PORT_PUBLISHED set; 0: the read exits), without an exit. A device publishes
 * only a register whose read has no side effect and whose value no queued write can
 * change (the UART's LSR with nothing latched and loopback off), and stores the new
 * value before the access that changed it returns. */
#define PORT_PUBLISHED_MAX 4
#define PORT_PUBLISHED 0x100u
typedef struct PortQueue {
    pthread_mutex_t lock;
    int nzones;                      /* set before the vCPUs run */
    uint16_t zone[PORT_QUEUE_ZONES];
    _Atomic int count;               /* writes not yet handed over */
    uint64_t pushed;                 /* writes ever queued (the drain tick's idle test) */
    uint16_t port[PORT_QUEUE_SIZE];
    uint8_t value[PORT_QUEUE_SIZE];
    _Atomic int npublished;          /* slots are only ever added */
    uint16_t published_port[PORT_PUBLISHED_MAX];
    _Atomic uint32_t published_word[PORT_PUBLISHED_MAX];
} PortQueue;

/* 1 and *value: the published answer to a one-byte read of port; 0: it exits */
static inline int port_published_read(PortQueue *q, uint16_t port, uint8_t *value)
{
    int n = atomic_load_explicit(&q->npublished, memory_order_acquire);
    for (int k = 0; k < n; k++) {
        if (q->published_port[k] == port) {
            uint32_t word = atomic_load_explicit(&q->published_word[k], memory_order_acquire);
            *value = (uint8_t)word;
            return (word & PORT_PUBLISHED) != 0;
        }
    }
    return 0;
}

/* 1 if the write was queued; 0: it must exit */
static inline int port_queue_push(PortQueue *q, uint16_t port, uint8_t value)
{
    int hit = 0;
    for (int k = 0; k < q->nzones; k++)
        hit |= q->zone[k] == port;
    if (!hit)
        return 0;
    pthread_mutex_lock(&q->lock);
    int n = atomic_load(&q->count);
    if (n < PORT_QUEUE_SIZE) {
        q->port[n] = port;
        q->value[n] = value;
        q->pushed++;
        atomic_store(&q->count, n + 1);
    }
    pthread_mutex_unlock(&q->lock);
    return n < PORT_QUEUE_SIZE;
}

/* Layering: a file calls only into files listed before it, so the calls between
 * c_ext files form no circle (flags.h and operands.h are inline only). A header
 * uses nothing defined in a .c file that includes it: this one holds types,
 * constants, prototypes and inlines over the CPU state alone.
 *   unwind.c   raise_exc / cpu_exit, the longjmp back to cpu_run; calls nothing
 *   decode.c   instruction bytes -> Insn; calls nothing
 *   mem.c      RAM, page walks, TLB, code-page tracking and invalidation requests,
 *              the access log of I/O and MMIO exits, the slow paths of guest memory
 *              access; calls unwind.c
 *   access.h   guest memory access, inline: the TLB hit, mem.c's slow path otherwise;
 *              calls mem.c, and so mem.c does not include it
 *   system.c, x87.c   system architecture, x87; call access.h, mem.c, unwind.c
 *   mmx.c      MMX (and the faults EMMS checks); calls access.h, mem.c, unwind.c
 *   ssse3.c, sse41.c, sse42.c   SSSE3 (XMM and MMX forms), SSE4.1, SSE4.2; call mmx.c and
 *              what it calls
 *   mmx_cvt.c  the SSE conversions with an MMX operand; calls mmx.c and what it calls
 *   sse.c      SSE/SSE2/SSE3, routing to the four above; simd.h is their shared inline part
 *   native/native.c   the native tier's arena, encoder and block compiler; calls
 *              nothing (exec.c hands it the helper its code calls)
 *   exec.c     block cache, run loop, dispatcher with the insn_*.h handler groups
 *              (insn_bmi.h: BMI1/2, ADX, MOVBE, RDRAND/RDSEED; it calls sse.c for crc32)
 *   pymod.c    the Python type kvmpy._tcg.Cpu */

/* ---- unwind.c ---- */
void __attribute__((noreturn)) raise_exc(CPU *c, int vec, uint32_t err, int has_err);
#define RAISE(c, v) raise_exc((c), (v), 0, 0)
#define RAISE_ERR(c, v, e) raise_exc((c), (v), (e), 1)
void __attribute__((noreturn)) cpu_exit(CPU *c, int reason);

/* ---- decode.c ---- */
#define OP_UD 0x3ff
/* Specialised forms picked by the decoder (dispatch table entries 0x400+): the
 * common 32/64-bit register and memory forms without size switches.
 * i->imm2 holds the ALU operation / shift kind where one is needed. */
enum {
    P_MOV_RM_R64 = 0x400, P_MOV_RM_R32, P_MOV_R_RM64, P_MOV_R_RM32,
    P_LOAD64, P_LOAD32, P_STORE64, P_STORE32,
    P_ALU_RR64, P_ALU_RR32, P_ALU_RI64, P_ALU_RI32, P_SHIFT_RI64, P_SHIFT_RI32,
    P_LEA64, P_TEST_RR64, P_TEST_RR32, P_LOAD_ALU64, P_LOAD_ALU32,
    P_COUNT,
    /* P_ALU_RR64..P_ALU_RI32 split by operation (P_ALUX + form * 8 + ALU op; adc/sbb
     * never take these forms): each op gets its own dispatch entry and handler, so the
     * one indirect jump per instruction also selects the operation */
    P_ALUX = 0x420,
    P_ADD_RR64 = P_ALUX, P_OR_RR64, P_AND_RR64 = P_ALUX + 4, P_SUB_RR64, P_XOR_RR64, P_CMP_RR64,
    P_ADD_RR32 = P_ALUX + 8, P_OR_RR32, P_AND_RR32 = P_ALUX + 12, P_SUB_RR32, P_XOR_RR32, P_CMP_RR32,
    P_ADD_RI64 = P_ALUX + 16, P_OR_RI64, P_AND_RI64 = P_ALUX + 20, P_SUB_RI64, P_XOR_RI64, P_CMP_RI64,
    P_ADD_RI32 = P_ALUX + 24, P_OR_RI32, P_AND_RI32 = P_ALUX + 28, P_SUB_RI32, P_XOR_RI32, P_CMP_RI32,
    /* a VEX-encoded instruction the translator implements (BMI1/BMI2, insn_bmi.h); the
     * decoder turns every other VEX encoding into OP_UD, as a CPU without AVX does */
    P_VEX = P_ALUX + 32,
};
#define DISPATCH_SIZE 0x441
/* P_VEX: which one, in i->imm2 with VEX.vvvv (the extra register operand) above it */
enum { VX_ANDN, VX_BLSR, VX_BLSMSK, VX_BLSI, VX_BZHI, VX_PDEP, VX_PEXT, VX_MULX, VX_BEXTR,
       VX_SHLX, VX_SARX, VX_SHRX, VX_RORX };
#define VEX_KIND(i) ((int)((i)->imm2 & 0xff))
#define VEX_VREG(i) ((int)((i)->imm2 >> 8) & 15)
int decode_insn_bytes(const uint8_t *b, int avail, int mode, Insn *i, int *ends);

/* ---- mem.c ---- (mem_read_slow, mem_write_slow, atomic_host_slow: behind access.h) */
uint64_t mem_read_slow(CPU *c, uint64_t lin, unsigned size, int fetch);
void mem_write_slow(CPU *c, uint64_t lin, unsigned size, uint64_t val);
int translate(CPU *c, uint64_t lin, int access, int user, uint64_t *phys, int fault);
uint8_t *ram_ptr(CPU *c, uint64_t pa, uint64_t len);
int ram_readonly(CPU *c, uint64_t pa);
void tlb_flush(CPU *c, int global_too);
void tlb_log_fill(CPU *c, int m, TlbEnt *e);
void tlb_flush_page(CPU *c, uint64_t lin);
void code_page_mark(CPU *c, uint64_t pa);
void invalidate_code_page(CPU *c, uint64_t pa);
void invalidate_local_blocks(CPU *c, uint64_t pa);
void request_invalidate(CPU *c, uint64_t gpa, uint64_t size);
void drop_code_write_tags(CPU *c);
void cpu_register(CPU *c);
void cpu_unregister(CPU *c);
uint8_t *code_bitmap_get(uint8_t *host, uint64_t size);
void code_bitmap_put(uint8_t *code);
void ram_registry_lock(void);
void ram_registry_unlock(void);
void *atomic_host_slow(CPU *c, uint64_t lin, unsigned size);
uint64_t phys_ld(CPU *c, uint64_t pa, unsigned size);
void phys_st(CPU *c, uint64_t pa, unsigned size, uint64_t v);
uint64_t io_access(CPU *c, uint16_t port, unsigned size, int write, uint64_t val);
Access *io_access_string(CPU *c, uint16_t port, unsigned size, int write, unsigned count, int *fresh);
uint64_t mmio_access(CPU *c, uint64_t pa, unsigned size, int write, uint64_t val);

/* ---- system.c ---- */
void deliver_interrupt(CPU *c, int vec, int soft, uint32_t err, int has_err, uint64_t ret_rip);
void update_mode(CPU *c);
void load_seg(CPU *c, int sreg, uint16_t sel);
void load_seg_real(CPU *c, int sreg, uint16_t sel);
int read_descriptor(CPU *c, uint16_t sel, uint32_t d[4], int wide);
void seg_from_desc(Seg *s, uint16_t sel, const uint32_t d[2]);
int msr_read(CPU *c, uint32_t idx, uint64_t *val);
int msr_write(CPU *c, uint32_t idx, uint64_t val);
void do_cpuid(CPU *c);
uint64_t host_tsc_hz(void);
void start_tsc_calibration(void);
void set_cr0(CPU *c, uint64_t v);
void set_cr3(CPU *c, uint64_t v);
void set_cr4(CPU *c, uint64_t v);
void set_efer(CPU *c, uint64_t v);
void do_far_jump(CPU *c, uint16_t sel, uint64_t off, int call, int osz);
void do_far_ret(CPU *c, int osz, uint32_t pop_extra);
void do_iret(CPU *c, int osz);
void do_syscall(CPU *c);
void do_sysret(CPU *c, int osz);

/* ---- x87.c ---- */
void x87_exec(CPU *c, Insn *i);
void x87_fwait(CPU *c);
void fpu_reset(CPU *c);
void fxsave(CPU *c, uint64_t lin, int rexw);
void fxrstor(CPU *c, uint64_t lin, int rexw);

/* ---- sse.c ---- */
void sse_exec(CPU *c, Insn *i);

/* ---- mmx.c, ssse3.c, sse41.c (called by sse.c; mmx_check by exec.c's emms too) ---- */
void mmx_check(CPU *c);
int mmx_op(int op);
void mmx_exec(CPU *c, Insn *i, int op);
int ssse3_op(int op);
void ssse3_exec(CPU *c, Insn *i, int op, int pfx);
int sse41_op(int op);
void sse41_exec(CPU *c, Insn *i, int op);
int sse42_op(int op);
void sse42_exec(CPU *c, Insn *i, int op);

/* ---- mmx_cvt.c (called by sse.c) ---- */
void mmx_cvt_exec(CPU *c, Insn *i);

/* ---- exec.c ---- */
int cpu_run(CPU *c);
void cpu_init(CPU *c);
void block_cache_flush(CPU *c);
void cpu_reset(CPU *c, int wait_sipi);
void request_init(CPU *c);
void request_sipi(CPU *c, int vector);
void request_nmi(CPU *c);
void request_irq_window(CPU *c);
int cpu_interruptible(CPU *c);

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* ---- addresses: pure functions of the CPU state, no memory access ---- */

static inline __attribute__((always_inline)) uint64_t linear(CPU *c, int sreg, uint64_t off)
{
    if (c->long64)
        return sreg >= S_FS ? c->seg[sreg].base + off : off;
    return (uint32_t)(c->seg[sreg].base + off);
}

/* Effective address of a memory operand: offset, then linear (with the segment base). */
static inline __attribute__((always_inline)) uint64_t ea_off(CPU *c, Insn *i)
{
    uint64_t a = (uint64_t)i->disp;
    if (i->base != NOREG)
        a += i->base == RIPREG ? c->next_rip : c->r[i->base];
    if (i->index != NOREG)
        a += c->r[i->index] << i->scale;
    if (i->asz == 4)
        a = (uint32_t)a;
    else if (i->asz == 2)
        a = (uint16_t)a;
    return a;
}

static inline __attribute__((always_inline)) uint64_t ea_lin(CPU *c, Insn *i)
{
    return linear(c, i->seg, ea_off(c, i));
}

#endif
