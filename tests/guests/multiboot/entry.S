/*
 * A multiboot (v1) kernel's header and 32-bit entry. Built twice: with the a.out
 * kludge (the header says where to load it) and as a plain ELF32 (the loader reads
 * the program headers).
 */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003     /* page-aligned modules, memory info, a.out kludge */
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a"
    .p2align 2
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header             /* header_addr */
    .long __load_start          /* load_addr */
    .long __load_end            /* load_end_addr */
    .long __bss_end             /* bss_end_addr */
    .long _start                /* entry_addr */
#endif

    .text
    .code32
    .globl _start
_start:
    /* The registers as the loader left them are what the kernel checks: keep them.
       ESP is undefined at entry: EFLAGS go through a stack of our own. */
    mov %eax, entry_eax
    mov %ebx, entry_ebx
    mov $stack_top, %esp
    pushfl
    popl entry_eflags
    mov %cr0, %ecx
    mov %ecx, entry_cr0
    mov %cs, %cx
    mov %cx, entry_cs
    mov %ds, %cx
    mov %cx, entry_ds
    mov $stack_top, %esp
    call mb_main
1:  cli
    hlt
    jmp 1b

    .bss
    .p2align 4
    .globl entry_eax, entry_ebx, entry_eflags, entry_cr0, entry_cs, entry_ds
entry_eax: .long 0
entry_ebx: .long 0
entry_eflags: .long 0
entry_cr0: .long 0
entry_cs: .word 0
entry_ds: .word 0
    .p2align 4
stack: .skip 8192
stack_top:
