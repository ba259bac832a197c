/* x86 instruction decoder: prefixes, REX, ModRM/SIB/displacement, immediates.
 * Produces one struct Insn; semantics live in exec.c. */
#include "tcg.h"


/* ModRM presence, one-byte map (1 = has ModRM) */
static const uint8_t modrm1[256] = {
    /*       0 1 2 3 4 5 6 7 8 9 A B C D E F */
    /* 0 */ 1,1,1,1,0,0,0,0,1,1,1,1,0,0,0,0,
    /* 1 */ 1,1,1,1,0,0,0,0,1,1,1,1,0,0,0,0,
    /* 2 */ 1,1,1,1,0,0,0,0,1,1,1,1,0,0,0,0,
    /* 3 */ 1,1,1,1,0,0,0,0,1,1,1,1,0,0,0,0,
    /* 4 */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* 5 */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* 6 */ 0,0,1,1,0,0,0,0,0,1,0,1,0,0,0,0,
    /* 7 */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* 8 */ 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
    /* 9 */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* A */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* B */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* C */ 1,1,0,0,1,1,1,1,0,0,0,0,0,0,0,0,
    /* D */ 1,1,1,1,0,0,0,0,1,1,1,1,1,1,1,1,
    /* E */ 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
    /* F */ 0,0,0,0,0,0,1,1,0,0,0,0,0,0,1,1,
};

/* two-byte map: everything has ModRM except these */
static int modrm2(int b)
{
    if (b >= 0x80 && b <= 0x8f) return 0;
    if (b >= 0xc8 && b <= 0xcf) return 0;
    switch (b) {
    case 0x05: case 0x06: case 0x07: case 0x08: case 0x09: case 0x0b: case 0x0e:
    case 0x30: case 0x31: case 0x32: case 0x33: case 0x34: case 0x35: case 0x37:
    case 0x77: case 0xa0: case 0xa1: case 0xa2: case 0xa8: case 0xa9: case 0xaa:
        return 0;
    }
    return 1;
}

/* ops whose operand size defaults to 64 bits in long mode */
static int default64(int op, int reg)
{
    if (op >= 0x50 && op <= 0x5f) return 1;
    switch (op) {
    case 0x68: case 0x6a: case 0x8f: case 0x9c: case 0x9d: case 0xc8: case 0xc9:
    case 0x1a0: case 0x1a1: case 0x1a8: case 0x1a9:
        return 1;
    case 0xff:
        return reg == 6;
    }
    return 0;
}

/* near branches: operand size forced to 64 in long mode */
static int near_branch(int op, int reg)
{
    if (op >= 0x70 && op <= 0x7f) return 1;
    if (op >= 0x180 && op <= 0x18f) return 1;
    switch (op) {
    case 0xe0: case 0xe1: case 0xe2: case 0xe3: case 0xe8: case 0xe9: case 0xeb:
    case 0xc2: case 0xc3:
        return 1;
    case 0xff:
        return reg == 2 || reg == 4;
    }
    return 0;
}

static int ends_block(int op, int reg, int mod)
{
    if (op >= 0x70 && op <= 0x7f) return 1;
    if (op >= 0x180 && op <= 0x18f) return 1;
    switch (op) {
    case 0x07: case 0x17: case 0x1f: case 0x8e: case 0x9a: case 0x9d:
    case 0xc2: case 0xc3: case 0xca: case 0xcb: case 0xcc: case 0xcd: case 0xce: case 0xcf:
    case 0xe0: case 0xe1: case 0xe2: case 0xe3: case 0xe8: case 0xe9: case 0xea: case 0xeb:
    case 0xf1: case 0xf4: case 0xfa: case 0xfb: case 0xc4: case 0xc5:
    case 0x100: case 0x101: case 0x105: case 0x106: case 0x107: case 0x10b:
    case 0x120: case 0x122: case 0x123: case 0x130: case 0x134: case 0x135:
    case 0x1a1: case 0x1a9: case 0x1aa: case 0x1b2: case 0x1b4: case 0x1b5:
    case OP_UD:
        return 1;
    case 0xff:
        return reg >= 2 && reg <= 5;
    }
    return 0;
}

/* The VEX instruction (opcode map << 8 | byte, with its pp, L, ModRM.reg, vvvv) the
 * translator implements: BMI1 and BMI2 (SDM Vol. 2, Table A-2's VEX rows), or -1.
 * Everything else VEX-encoded is AVX, which CPUID does not announce: #UD. */
static int vex_kind(int op, int pp, int l, int reg, int vvvv)
{
    static const int group_f7[4] = { VX_BEXTR, VX_SHLX, VX_SARX, VX_SHRX };   /* by pp */
    if (l)
        return -1;   /* the BMI forms are VEX.LZ: L=1 would be a 256-bit (AVX) encoding */
    switch (op) {
    case 0x2f2: return pp == 0 ? VX_ANDN : -1;
    case 0x2f3:      /* group 17 */
        if (pp != 0) return -1;
        return reg == 1 ? VX_BLSR : reg == 2 ? VX_BLSMSK : reg == 3 ? VX_BLSI : -1;
    case 0x2f5: return pp == 0 ? VX_BZHI : pp == 3 ? VX_PDEP : pp == 2 ? VX_PEXT : -1;
    case 0x2f6: return pp == 3 ? VX_MULX : -1;
    case 0x2f7: return group_f7[pp];
    case 0x3f0: return pp == 3 && vvvv == 0 ? VX_RORX : -1;   /* vvvv reserved (1111b) */
    }
    return -1;
}

/* P_ALU_RR64..P_ALU_RI32 with the operation in imm2 -> the per-operation pseudo-op */
static void split_alu(Insn *i)
{
    i->op = P_ALUX + (i->op - P_ALU_RR64) * 8 + (int)i->imm2;
}

/* Rewrites the hottest 32/64-bit forms to pseudo-ops with size-free handlers. */
static void specialize(Insn *i)
{
    int op = i->op, sz = i->osz, reg3 = i->mod == 3;
    if ((sz != 8 && sz != 4) || i->lock || i->rep)
        return;
    int w = sz == 8;
    switch (op) {
    case 0x89:
        i->op = reg3 ? (w ? P_MOV_RM_R64 : P_MOV_RM_R32) : (w ? P_STORE64 : P_STORE32);
        return;
    case 0x8b:
        i->op = reg3 ? (w ? P_MOV_R_RM64 : P_MOV_R_RM32) : (w ? P_LOAD64 : P_LOAD32);
        return;
    case 0x01: case 0x09: case 0x21: case 0x29: case 0x31: case 0x39:
        if (reg3) {
            i->imm2 = op >> 3;
            i->op = w ? P_ALU_RR64 : P_ALU_RR32;
            split_alu(i);
        }
        return;
    case 0x03: case 0x0b: case 0x23: case 0x2b: case 0x33: case 0x3b:
        i->imm2 = op >> 3;
        if (reg3) {
            /* reg <- reg op rm: swap so the handler's destination is rm */
            uint8_t t = i->rm;
            if (op == 0x3b || op == 0x2b) {
                i->op = w ? P_LOAD_ALU64 : P_LOAD_ALU32;   /* order matters for sub/cmp */
                i->imm2 |= 0x100;
            } else {
                i->rm = i->reg;
                i->reg = t;
                i->op = w ? P_ALU_RR64 : P_ALU_RR32;
                split_alu(i);
            }
        } else {
            i->op = w ? P_LOAD_ALU64 : P_LOAD_ALU32;
        }
        return;
    case 0x81: case 0x83:
        if (reg3 && (i->reg & 7) != 2 && (i->reg & 7) != 3) {
            i->imm2 = i->reg & 7;
            i->op = w ? P_ALU_RI64 : P_ALU_RI32;
            split_alu(i);
        }
        return;
    case 0xc1:
        if (reg3 && ((i->reg & 7) == 4 || (i->reg & 7) == 5 || (i->reg & 7) == 7)) {
            i->imm2 = i->reg & 7;
            i->op = w ? P_SHIFT_RI64 : P_SHIFT_RI32;
        }
        return;
    case 0x8d:
        if (!reg3 && w)
            i->op = P_LEA64;
        return;
    case 0x85:
        if (reg3)
            i->op = w ? P_TEST_RR64 : P_TEST_RR32;
        return;
    }
}

/* Returns the length, 0 when more than `avail` bytes are needed, -1 when the
 * instruction exceeds 15 bytes (#GP). */
int decode_insn_bytes(const uint8_t *b, int avail, int mode, Insn *i, int *ends)
{
    int p = 0;
    int opsz_pfx = 0, adsz_pfx = 0, rep = 0, lock = 0, seg = -1, last_sse = 0;
    int rex = 0;
    memset(i, 0, sizeof *i);
#define NEED(n) do { if (p + (n) > avail) return (p + (n) > 15) ? -1 : 0; } while (0)
    for (;;) {
        NEED(1);
        uint8_t x = b[p];
        /* Several REX prefixes: the last counts. A legacy prefix after a REX makes the
         * REX ignored (SDM 2.2.1: REX must come right before the opcode or escape). */
        if (mode == 2 && (x & 0xf0) == 0x40) {
            rex = x;
            if (++p >= 15)
                return -1;
            continue;
        }
        if (x == 0x66) { opsz_pfx = 1; last_sse = 1; }
        else if (x == 0x67) adsz_pfx = 1;
        else if (x == 0xf0) lock = 1;
        else if (x == 0xf2) { rep = 2; last_sse = 3; }
        else if (x == 0xf3) { rep = 1; last_sse = 2; }
        else if (x == 0x26) seg = S_ES;
        else if (x == 0x2e) seg = S_CS;
        else if (x == 0x36) seg = S_SS;
        else if (x == 0x3e) seg = S_DS;
        else if (x == 0x64) seg = S_FS;
        else if (x == 0x65) seg = S_GS;
        else break;
        rex = 0;
        p++;
        if (p >= 15)
            return -1;
    }
    /* VEX: C4 (three bytes) or C5 (two). In 64-bit mode always; in 32-bit code only
     * when the next byte's top two bits are 11, which LES/LDS would read as a register
     * operand (invalid for them); 16-bit code keeps LES/LDS, as QEMU does. */
    int vex = 0, vex_bad = 0, vex_op = 0, vex_w = 0, vex_l = 0, vex_v = 0, vex_pp = 0;
    if (mode >= 1) {
        NEED(1);
        if (b[p] == 0xc4 || b[p] == 0xc5) {
            NEED(2);
            if (mode == 2 || (b[p + 1] & 0xc0) == 0xc0) {
                uint8_t v1 = b[p + 1], v2 = v1;
                int vr = !(v1 & 0x80), vx = 0, vb = 0, map = 1;
                vex = 1;
                /* a 66, F2, F3, LOCK or REX prefix before VEX is #UD (SDM Vol. 2, 2.3.2) */
                vex_bad = opsz_pfx || rep || lock || rex;
                if (b[p] == 0xc4) {
                    NEED(3);
                    v2 = b[p + 2];
                    vx = !(v1 & 0x40);
                    vb = !(v1 & 0x20);
                    map = v1 & 0x1f;
                    vex_w = v2 >> 7;
                    p += 3;
                } else {
                    p += 2;
                }
                vex_v = (~v2 >> 3) & 15;
                vex_l = (v2 >> 2) & 1;
                vex_pp = v2 & 3;
                if (mode == 2) {
                    rex = 0x40 | vex_w << 3 | vr << 2 | vx << 1 | vb;
                } else {
                    rex = 0;      /* outside 64-bit mode VEX.W, B and vvvv[3] are ignored */
                    vex_w = 0;
                    vex_v &= 7;
                }
                NEED(1);
                vex_op = b[p++];
                if (map >= 1 && map <= 3)
                    vex_op |= map << 8;
                else
                    vex_op = OP_UD, vex_bad = 1;   /* reserved opcode map */
            }
        }
    }
    NEED(1);
    int op = vex ? vex_op : b[p++];
    if (!vex && op == 0x0f) {
        NEED(1);
        op = b[p++];
        if (op == 0x38) {
            NEED(1);
            op = 0x200 | b[p++];
        } else if (op == 0x3a) {
            NEED(1);
            op = 0x300 | b[p++];
        } else {
            op |= 0x100;
        }
    }
    int osz, asz;
    if (mode == 2) {
        osz = (rex & 8) ? 8 : (opsz_pfx ? 2 : 4);
        asz = adsz_pfx ? 4 : 8;
    } else if (mode == 1) {
        osz = opsz_pfx ? 2 : 4;
        asz = adsz_pfx ? 2 : 4;
    } else {
        osz = opsz_pfx ? 4 : 2;
        asz = adsz_pfx ? 4 : 2;
    }
    i->rex = rex != 0;
    i->rexw = (rex & 8) != 0;
    i->rep = rep;
    i->lock = lock;
    i->pfx = rep == 1 ? 2 : rep == 2 ? 3 : (opsz_pfx ? 1 : 0);
    if (vex)
        i->pfx = vex_pp;   /* VEX.pp encodes 66/F3/F2 in the same order */
    (void)last_sse;
    i->asz = asz;
    i->base = i->index = NOREG;

    /* invalid in 64-bit mode */
    if (mode == 2) {
        switch (op) {
        case 0x06: case 0x07: case 0x0e: case 0x16: case 0x17: case 0x1e: case 0x1f:
        case 0x27: case 0x2f: case 0x37: case 0x3f: case 0x60: case 0x61: case 0x62:
        case 0x82: case 0x9a: case 0xc4: case 0xc5: case 0xce: case 0xd4: case 0xd5:
        case 0xd6: case 0xea:
            op = OP_UD;
        }
    }

    int has_modrm = op < 0x100 ? modrm1[op] : (op < 0x200 ? modrm2(op & 0xff) : (op != OP_UD));
    if (vex)
        has_modrm = op != OP_UD && op != 0x177;   /* all but vzeroupper/vzeroall (AVX) */
    int mod = 0, reg = 0, rm = 0;
    if (has_modrm) {
        NEED(1);
        uint8_t m = b[p++];
        mod = m >> 6;
        reg = (m >> 3) & 7;
        rm = m & 7;
        i->mod = mod;
        i->reg = reg | ((rex & 4) ? 8 : 0);
        if (mod == 3) {
            i->rm = rm | ((rex & 1) ? 8 : 0);
            i->seg = seg >= 0 ? seg : S_DS;   /* maskmovq/maskmovdqu store through DS:rDI */
        } else if (asz == 2) {
            static const uint8_t b16[8] = { R_BX, R_BX, R_BP, R_BP, R_SI, R_DI, R_BP, R_BX };
            static const uint8_t x16[8] = { R_SI, R_DI, R_SI, R_DI, NOREG, NOREG, NOREG, NOREG };
            int dseg = S_DS;
            if (mod == 0 && rm == 6) {
                NEED(2);
                i->disp = (int16_t)(b[p] | b[p + 1] << 8);
                p += 2;
            } else {
                i->base = b16[rm];
                i->index = x16[rm];
                if (rm == 2 || rm == 3 || rm == 6)
                    dseg = S_SS;
                if (mod == 1) {
                    NEED(1);
                    i->disp = (int8_t)b[p++];
                } else if (mod == 2) {
                    NEED(2);
                    i->disp = (int16_t)(b[p] | b[p + 1] << 8);
                    p += 2;
                }
            }
            i->seg = seg >= 0 ? seg : dseg;
        } else {
            int dseg = S_DS;
            if (rm == 4) {
                NEED(1);
                uint8_t sib = b[p++];
                int ss = sib >> 6, idx = ((sib >> 3) & 7) | ((rex & 2) ? 8 : 0), base = sib & 7;
                if (idx != 4) {
                    i->index = idx;
                    i->scale = ss;
                }
                if (base == 5 && mod == 0) {
                    NEED(4);
                    i->disp = (int32_t)(b[p] | b[p + 1] << 8 | b[p + 2] << 16 | (uint32_t)b[p + 3] << 24);
                    p += 4;
                } else {
                    i->base = base | ((rex & 1) ? 8 : 0);
                    if (base == R_SP || base == R_BP)
                        dseg = S_SS;
                }
            } else if (mod == 0 && rm == 5) {
                NEED(4);
                i->disp = (int32_t)(b[p] | b[p + 1] << 8 | b[p + 2] << 16 | (uint32_t)b[p + 3] << 24);
                p += 4;
                if (mode == 2)
                    i->base = RIPREG;
            } else {
                i->base = rm | ((rex & 1) ? 8 : 0);
                if (rm == R_BP)
                    dseg = S_SS;
            }
            if (mod == 1) {
                NEED(1);
                i->disp = (int8_t)b[p++];
            } else if (mod == 2) {
                NEED(4);
                i->disp = (int32_t)(b[p] | b[p + 1] << 8 | b[p + 2] << 16 | (uint32_t)b[p + 3] << 24);
                p += 4;
            }
            i->seg = seg >= 0 ? seg : dseg;
        }
        i->rm = mod == 3 ? i->rm : rm;
    } else {
        i->seg = seg >= 0 ? seg : S_DS;
        i->reg = (op & 7) | ((rex & 1) ? 8 : 0);   /* register encoded in the opcode */
    }

    if (mode == 2 && default64(op, reg) && osz == 4)
        osz = 8;
    if (mode == 2 && near_branch(op, reg))
        osz = 8;
    if (mode == 2 && (op == 0x120 || op == 0x122 || op == 0x121 || op == 0x123))
        osz = 8;
    if (vex)
        osz = vex_w ? 8 : 4;
    i->osz = osz;

    /* immediates */
    int immsz = 0, imm2sz = 0;
    int z = osz == 2 ? 2 : 4;
    if (op < 0x40) {
        if ((op & 7) == 4) immsz = 1;
        else if ((op & 7) == 5) immsz = z;
    } else {
        switch (op) {
        case 0x6a: case 0x6b: case 0x80: case 0x82: case 0x83: case 0xa8: case 0xc0: case 0xc1:
        case 0xc6: case 0xcd: case 0xd4: case 0xd5: case 0xe0: case 0xe1: case 0xe2: case 0xe3:
        case 0xe4: case 0xe5: case 0xe6: case 0xe7: case 0xeb:
        case 0x170: case 0x171: case 0x172: case 0x173: case 0x1a4: case 0x1ac: case 0x1ba:
        case 0x1c2: case 0x1c4: case 0x1c5: case 0x1c6:
            immsz = 1;
            break;
        case 0x68: case 0x69: case 0x81: case 0xa9: case 0xc7: case 0xe8: case 0xe9:
            immsz = z;
            break;
        case 0xc2: case 0xca:
            immsz = 2;
            break;
        case 0xc8:
            immsz = 2;
            imm2sz = 1;
            break;
        case 0x9a: case 0xea:
            immsz = z;
            imm2sz = 2;
            break;
        case 0xf6:
            if (reg < 2) immsz = 1;
            break;
        case 0xf7:
            if (reg < 2) immsz = z;
            break;
        case 0xa0: case 0xa1: case 0xa2: case 0xa3:
            immsz = asz;
            break;
        default:
            if (op >= 0x70 && op <= 0x7f) immsz = 1;
            else if (op >= 0xb0 && op <= 0xb7) immsz = 1;
            else if (op >= 0xb8 && op <= 0xbf) immsz = osz;
            else if (op >= 0x180 && op <= 0x18f) immsz = z;
            else if (op >= 0x300 && op < OP_UD) immsz = 1;
        }
    }
    if (immsz) {
        NEED(immsz);
        uint64_t v = 0;
        for (int k = 0; k < immsz; k++)
            v |= (uint64_t)b[p + k] << (8 * k);
        p += immsz;
        if (immsz == 1) v = (uint64_t)(int64_t)(int8_t)v;
        else if (immsz == 2) v = (uint64_t)(int64_t)(int16_t)v;
        else if (immsz == 4 && !(op >= 0xa0 && op <= 0xa3)) v = (uint64_t)(int64_t)(int32_t)v;
        i->imm = v;
        if (op >= 0xa0 && op <= 0xa3)
            i->disp = (int64_t)v;
    }
    if (imm2sz) {
        NEED(imm2sz);
        uint64_t v = 0;
        for (int k = 0; k < imm2sz; k++)
            v |= (uint64_t)b[p + k] << (8 * k);
        p += imm2sz;
        i->imm2 = v;
    }
    if (p > 15)
        return -1;
    if (vex) {
        int kind = vex_bad ? -1 : vex_kind(op, vex_pp, vex_l, reg, vex_v);
        op = kind < 0 ? OP_UD : P_VEX;
        i->imm2 = kind < 0 ? 0 : (uint64_t)(kind | vex_v << 8);
    }
    i->op = op;
    i->len = p;
    *ends = ends_block(op, reg, mod);
    specialize(i);
    return p;
#undef NEED
}
