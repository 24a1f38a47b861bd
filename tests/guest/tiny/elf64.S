/*
 * elf64.S - 64-bit ELF entry for a tiny guest (no PVH note). A guest source starts with
 *     #include "elf64.S"
 * and defines `main`, which runs in 64-bit long mode (first 1 GiB identity-mapped) with
 * RSI = address of boot_params and a 16 KiB stack. When main returns, the guest powers
 * off. The library routines in lib.S are available.
 */
#define BITS 64
#include "tiny.h"

        .file   __BASE_FILE__           /* the guest source, not a temporary file name */

        .section .text.entry, "ax"
        .code64
        .globl  _start
_start:
        cli
        cld
        mov     $stack_top, %rsp        /* RSI (boot_params) is left as it is for main */
        call    main
        jmp     poweroff

        .section .bss
        .balign 16
stack:  .skip   STACK_SIZE
stack_top:

        .text
#include "lib.S"
