/*
 * AP trampoline, copied to TRAMPOLINE_BASE and entered by SIPI vector
 * TRAMPOLINE_BASE >> 12 in real mode (CS = TRAMPOLINE_BASE >> 4, IP = 0).  It runs
 * from the copy, so every address in it is TRAMPOLINE_BASE + offset.
 */
#include "layout.h"

#define T(label) (TRAMPOLINE_BASE + (label) - ap_trampoline_start)

	.section .rodata.ap_trampoline, "a"
	.balign 16
	.globl ap_trampoline_start, ap_trampoline_end, ap_trampoline_params
	.code16
ap_trampoline_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tramp_gdt_desc - ap_trampoline_start
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $T(tramp32)

	.code32
tramp32:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl T(tramp_cr3), %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx          /* IA32_EFER: the BSP's LME/NXE */
	rdmsr
	orl T(tramp_efer), %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80010000, %eax           /* PG | WP */
	movl %eax, %cr0
	ljmp $SEL_CODE64, $T(tramp64)

	.code64
tramp64:
	/* Switch to the kernel's GDT and IDT (same selectors); TR stays the BSP's alone. */
	lgdt boot_gdt_desc
	lidt idt_descriptor
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq T(tramp_stack), %rsp
	andq $-16, %rsp
	movq T(tramp_arg), %rdi
	movq T(tramp_entry), %rax
	xorl %ebp, %ebp
	call *%rax
1:	cli
	hlt
	jmp 1b

	.balign 8
tramp_gdt:
	.quad 0
	.quad 0x00CF9A000000FFFF        /* code32 */
	.quad 0x00AF9A000000FFFF        /* code64 */
	.quad 0x00CF92000000FFFF        /* data */
tramp_gdt_end:
tramp_gdt_desc:
	.word tramp_gdt_end - tramp_gdt - 1
	.long T(tramp_gdt)
	.balign 8
ap_trampoline_params:               /* struct ap_params in ap.c */
tramp_cr3:	.long 0
tramp_efer:	.long 0
tramp_stack:	.quad 0
tramp_entry:	.quad 0
tramp_arg:	.quad 0
ap_trampoline_end:

	.section .note.GNU-stack, "", @progbits
