/* Constants shared by the assembly start code and the C support library. */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

/* GDT selectors (the AP trampoline's GDT uses the same first four). */
#define SEL_CODE32      0x08
#define SEL_CODE64      0x10
#define SEL_DATA        0x18
#define SEL_UDATA       0x20    /* DPL 3; SYSRET-compatible order: data, then code */
#define SEL_UCODE       0x28    /* DPL 3 */
#define SEL_TSS         0x30    /* 16-byte system descriptor */

#define PVH_START_MAGIC 0x336ec578

/* Physical page the AP real-mode trampoline is copied to (SIPI vector 0x08). */
#define TRAMPOLINE_BASE 0x8000

#define BOOT_STACK_SIZE  (64 * 1024)
#define TRAP_STACK_SIZE  (16 * 1024)   /* TSS.RSP0: entries from ring 3 */
#define DF_STACK_SIZE    (8 * 1024)    /* TSS.IST1: double fault */

/* Page-table entry bits. */
#define PTE_P    0x001
#define PTE_W    0x002
#define PTE_U    0x004
#define PTE_PWT  0x008
#define PTE_PCD  0x010
#define PTE_PS   0x080
#define PTE_NX   (1ull << 63)

#endif
