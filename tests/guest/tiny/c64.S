/*
 * c64.S - 64-bit ELF entry for a tiny guest written in C (linked with elf64.ld).
 *
 * elf64.S sets up the stack and calls `main` with RSI = boot_params; here `main` passes
 * that on as c_main's first argument (System V ABI: RDI):
 *     void c_main(const void *boot_params);
 * When c_main returns, the guest powers off. `poweroff` (lib.S) is made global so C can
 * call it directly: extern void poweroff(void) __attribute__((noreturn));
 */
#include "elf64.S"

        .text
main:
        mov     %rsi, %rdi
        jmp     c_main                  /* RSP is as it was at main's entry: ABI-aligned */

        .globl  poweroff
