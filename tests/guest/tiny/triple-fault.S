/*
 * triple-fault: PVH entry; prints "FAULTING\n", loads an empty IDT (limit 0) and raises
 * #UD with ud2. Vector 6 is outside the IDT, so #GP; that is outside too, so #DF; and
 * that is outside too: triple fault (shutdown; KVM_EXIT_SHUTDOWN under KVM).
 *
 * Not int3: with a software interrupt (int3, int $n, int1) here, the kvm_pvm module of
 * the development machines reports an emulation failure (KVM internal error) instead
 * of the shutdown. Faults raised by the CPU itself (#UD, #DE, #GP) triple-fault there
 * as they do under QEMU TCG.
 */
#include "pvh.S"

main:
        print   "FAULTING\n"
        lidt    empty_idt
        ud2
        jmp     halt_forever            /* not reached */

        .section .rodata
        .balign 8
empty_idt:
        .word   0                       /* limit */
        .long   0                       /* base */
        .text
