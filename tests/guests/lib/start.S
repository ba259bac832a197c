/*
 * PVH entry: the loader enters pvh_entry32 in 32-bit protected mode, paging off,
 * flat segments, %ebx = physical address of struct hvm_start_info.  We build an
 * identity map of the first 4 GiB (2 MiB pages), switch to long mode and call
 * guest_start(start_info) in C.
 */
#include "layout.h"

/*
 * XEN_ELFNOTE_PHYS32_ENTRY.  The descriptor is 8 bytes like Linux's, because
 * QEMU reads a full 64-bit value; the note segment must stay 4-byte aligned
 * because QEMU rounds the name size up to the segment alignment.
 */
	.section .note.Xen, "a"
	.balign 4
	.long 4                 /* namesz: "Xen\0" */
	.long 8                 /* descsz */
	.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry32
	.balign 4

	.section .text.boot, "ax"
	.code32
	.globl pvh_entry32
pvh_entry32:
	cli
	cld
	/* Zero .bss ourselves: a loader that only copies p_filesz must still work. %ebx survives. */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx                   /* the linker script keeps both ends 16-byte aligned */
	xorl %eax, %eax
	rep stosl
	movl %ebx, boot_start_info

	/* PML4[0] -> PDPT; PDPT[0..3] -> four page directories.  U is set on the upper
	 * levels so paging_set_user() only has to touch the 2 MiB leaves. */
	movl $boot_pdpt, %eax
	orl $(PTE_P | PTE_W | PTE_U), %eax
	movl %eax, boot_pml4
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $12, %eax
	addl $boot_pd, %eax
	orl $(PTE_P | PTE_W | PTE_U), %eax
	movl %eax, boot_pdpt(,%ecx,8)
	incl %ecx
	cmpl $4, %ecx
	jb 1b

	/* 2048 leaves of 2 MiB; the top GiB (LAPIC, IOAPIC, PCI holes) is uncached. */
	xorl %ecx, %ecx
2:	movl %ecx, %eax
	shll $21, %eax
	orl $(PTE_P | PTE_W | PTE_PS), %eax
	cmpl $1536, %ecx
	jb 3f
	orl $(PTE_PCD | PTE_PWT), %eax
3:	movl %eax, boot_pd(,%ecx,8)
	incl %ecx
	cmpl $2048, %ecx
	jb 2b

	lgdt boot_gdt_desc
	ljmp $SEL_CODE32, $4f
4:	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs

	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3

	/* EFER.NXE only where CPUID says NX exists: setting it otherwise is a #GP. */
	xorl %esi, %esi
	movl $0x80000000, %eax
	cpuid
	cmpl $0x80000001, %eax
	jb 5f
	movl $0x80000001, %eax
	cpuid
	btl $20, %edx
	jnc 5f
	movl $0x800, %esi               /* NXE */
5:	movl $0xC0000080, %ecx          /* IA32_EFER */
	rdmsr
	orl $0x100, %eax                /* LME */
	orl %esi, %eax
	wrmsr

	movl %cr0, %eax
	orl $0x80010001, %eax           /* PG | WP | PE */
	movl %eax, %cr0
	ljmp $SEL_CODE64, $entry64

	.code64
entry64:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq $boot_stack_top, %rsp
	xorl %ebp, %ebp
	movl boot_start_info, %edi
	call guest_start
6:	cli
	hlt
	jmp 6b

	.section .data
	.balign 16
	.globl boot_gdt
boot_gdt:
	.quad 0
	.quad 0x00CF9A000000FFFF        /* 0x08 code32 */
	.quad 0x00AF9A000000FFFF        /* 0x10 code64 */
	.quad 0x00CF92000000FFFF        /* 0x18 data */
	.quad 0x00CFF2000000FFFF        /* 0x20 user data, DPL 3 */
	.quad 0x00AFFA000000FFFF        /* 0x28 user code64, DPL 3 */
	.quad 0, 0                      /* 0x30 TSS, filled in by gdt_install_tss() */
boot_gdt_end:
	.balign 16
	.globl boot_gdt_desc
boot_gdt_desc:
	.word boot_gdt_end - boot_gdt - 1
	.quad boot_gdt

	.globl boot_start_info
	.balign 4
boot_start_info:
	.long 0

	.section .bss
	.balign 4096
	.globl boot_pml4, boot_pdpt, boot_pd
boot_pml4:	.skip 4096
boot_pdpt:	.skip 4096
boot_pd:	.skip 4 * 4096
	.balign 16
	.globl boot_stack_top
boot_stack:	.skip BOOT_STACK_SIZE
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
