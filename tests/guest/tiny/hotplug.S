/*
 * hotplug: PVH entry; drives the PCI hotplug controller (HOTPLUG_* in tiny.h, no ACPI)
 * and reports bus-0 slot changes. It never powers off: the host kills the VM.
 *
 * At start it reads dword 0 (vendor/device) of every slot 0..31 of bus 0 through
 * 0xcf8/0xcfc (present when the low 16 bits != 0xffff), remembers it, and prints
 *     HP-READY
 * Then, forever and without delays:
 *   1. It reads DOWN; for every set bit n, lowest first, it writes 1<<n to EJECT and
 *      then prints
 *          EJ dd
 *   2. It reads UP, only to clear it (the scan below finds new devices).
 *   3. It reads dword 0 of slots 24..31 (RESCAN_FIRST..31: the hotplug slots of machines
 *      with up to 8 of them; the others only at start) and compares it with the
 *      remembered dword; if they differ it remembers the new one and prints
 *          HP- dd                 if the slot was present
 *          HP+ dd vvvv:dddd       if the slot is present now
 *      (both, in this order, when one device was replaced by another between reads).
 * dd = slot number, vvvv = vendor (low 16 bits), dddd = device (high 16 bits), all hex,
 * lowercase, fixed width. Each line is written in one piece. A DOWN or UP read of
 * 0xffffffff (no controller, e.g. under QEMU) is taken as 0.
 */
#include "pvh.S"

/* First slot rescanned in the loop: fewer config-space exits per pass, so a new function is
 * seen within microseconds (the hotplug benchmark measures that). */
#define RESCAN_FIRST 24

main:
        xor     %edi, %edi              /* EDI = slot number */
1:      call    read_id
        mov     %eax, ids(,%edi,4)
        inc     %edi
        cmp     $32, %edi
        jb      1b
        print   "HP-READY\n"

poll:
        mov     $HOTPLUG_DOWN, %dx
        in      %dx, %eax
        cmp     $0xffffffff, %eax
        je      3f                      /* no controller: nothing to remove */
        mov     %eax, %ebx              /* EBX = slots still to eject */
2:      bsf     %ebx, %ecx              /* ECX = lowest of them */
        jz      3f                      /* none left */
        btr     %ecx, %ebx
        xor     %eax, %eax
        bts     %ecx, %eax              /* EAX = 1 << ECX */
        mov     $HOTPLUG_EJECT, %dx
        out     %eax, %dx
        print   "EJ "
        mov     %ecx, %eax
        call    hex2
        putch   '\n'
        jmp     2b

3:      mov     $HOTPLUG_UP, %dx
        in      %dx, %eax               /* only to clear it; the value is not needed */

        mov     $RESCAN_FIRST, %edi     /* EDI = slot number */
4:      call    read_id
        mov     ids(,%edi,4), %esi      /* ESI = the dword read last time */
        cmp     %esi, %eax
        je      6f                      /* unchanged: the common case */
        mov     %eax, ids(,%edi,4)
        cmp     $0xffff, %si
        je      5f                      /* was absent */
        print   "HP- "
        push    %eax
        mov     %edi, %eax
        call    hex2
        pop     %eax
        putch   '\n'
5:      cmp     $0xffff, %ax
        je      6f                      /* is absent */
        print   "HP+ "
        call    show_device
6:      inc     %edi
        cmp     $32, %edi
        jb      4b
        jmp     poll

/* read_id: returns in EAX dword 0 (vendor/device) of bus 0, slot EDI, function 0. */
read_id:
        mov     %edi, %eax
        shl     $11, %eax               /* bus 0, device EDI, function 0, register 0 */
        jmp     pci_read

#include "pci.inc"

        .section .bss
        .balign 4
ids:    .skip   32 * 4                  /* dword 0 of each slot as last read */
