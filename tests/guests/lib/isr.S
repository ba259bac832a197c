/* Interrupt entry stubs (one 16-byte stub per vector) and ring-3 entry/return. */
#include "layout.h"

	.text
	.code64
	.balign 16
	.globl isr_stubs
isr_stubs:
	vec = 0
	.rept 256
	.balign 16
	/* Vectors where the CPU pushes an error code: #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX */
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	vec = vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi                 /* struct trap_frame * */
	movq %rsp, %rbx
	andq $-16, %rsp
	call trap_dispatch
	movq %rbx, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp                  /* vector, error code */
	iretq

/* uint64_t run_user_asm(uint64_t (*fn)(uint64_t), uint64_t arg, void *user_stack_top) */
	.globl run_user_asm
run_user_asm:
	pushfq
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, user_saved_rsp(%rip)
	movq %rdi, %r12
	movq %rsi, %r13
	andq $-16, %rdx
	pushq $(SEL_UDATA | 3)
	pushq %rdx
	pushq $0x002                    /* IF=0 in ring 3: nothing may interrupt the user run */
	pushq $(SEL_UCODE | 3)
	pushq $user_entry_thunk
	iretq

/* Runs in ring 3. */
user_entry_thunk:
	movq %r13, %rdi
	call *%r12
	movq %rax, %rdi
	movl $0, %eax                   /* SYS_EXIT */
	cmpb $1, user_entry_mode(%rip)  /* enum user_entry */
	je 1f
	ja 2f
	syscall
1:	int $0x80
2:	ud2

/*
 * SYSCALL entry (LSTAR): rax = number, rdi = argument, rcx = user RIP, r11 = user
 * RFLAGS, rsp still the user's.  IF is off (FMASK), and only one CPU runs ring 3,
 * so a global holds the user RSP while we switch to the TSS.RSP0 stack.
 */
	.globl syscall_entry
syscall_entry:
	movq %rsp, syscall_user_rsp(%rip)
	movq syscall_kernel_rsp(%rip), %rsp
	pushq syscall_user_rsp(%rip)
	pushq %rcx
	pushq %r11
	subq $8, %rsp
	movq %rdi, %rsi
	movq %rax, %rdi
	cld
	call syscall_dispatch           /* SYS_EXIT does not come back */
	addq $8, %rsp
	popq %r11
	popq %rcx
	popq %rsp
	sysretq

/* Called by the SYS_EXIT handler on the TSS.RSP0 stack: abandons that trap frame
 * and returns value from run_user(). */
	.globl user_return
user_return:
	movq user_saved_rsp(%rip), %rsp
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movq %rdi, %rax
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	popfq
	ret

	.bss
	.balign 8
user_saved_rsp:
	.skip 8
syscall_user_rsp:
	.skip 8
	.globl syscall_kernel_rsp
syscall_kernel_rsp:
	.skip 8

	.section .note.GNU-stack, "", @progbits
