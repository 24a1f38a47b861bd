/*
 * cpuid: 64-bit ELF entry; prints CPUID leaves 1, 0x80000008 and 0x40000000 as
 *     CPUID1 eeeeeeee bbbbbbbb cccccccc dddddddd
 *     CPUID80000008 eeeeeeee bbbbbbbb cccccccc dddddddd
 *     CPUID40000000 eeeeeeee bbbbbbbb cccccccc dddddddd
 * (EAX EBX ECX EDX, 8 lowercase hex digits each; ECX = 0 on input), then powers off.
 */
#include "elf64.S"

main:
        print   "CPUID1"
        mov     $1, %edi
        call    cpuid_line
        print   "CPUID80000008"
        mov     $0x80000008, %edi
        call    cpuid_line
        print   "CPUID40000000"
        mov     $0x40000000, %edi
        call    cpuid_line
        ret

/* cpuid_line: write " eax ebx ecx edx\n" for CPUID leaf EDI, subleaf 0. */
cpuid_line:
        mov     %edi, %eax
        xor     %ecx, %ecx
        cpuid
        call    space_hex8              /* EAX */
        mov     %ebx, %eax
        call    space_hex8
        mov     %ecx, %eax
        call    space_hex8
        mov     %edx, %eax
        call    space_hex8
        putch   '\n'
        ret

/* space_hex8: write ' ' and the 8 hex digits of EAX. */
space_hex8:
        putch   ' '
        jmp     hex8
