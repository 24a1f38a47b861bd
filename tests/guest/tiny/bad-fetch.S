/*
 * bad-fetch: PVH entry; prints "JUMPING\n", then jumps to 0xd0000000, unbacked memory
 * in the PCI MMIO window (no RAM, no device): the instruction fetch cannot be served
 * (an emulation failure / internal error under KVM).
 */
#include "pvh.S"

main:
        print   "JUMPING\n"
        mov     $UNBACKED_ADDR, %eax
        jmp     *%eax
