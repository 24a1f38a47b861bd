/*
 * pciscan: PVH entry; scans bus 0 through configuration mechanism #1 and ECAM.
 *
 * For each present device d (vendor != 0xffff in dword 0 read through 0xcf8/0xcfc):
 *     PCI dd vvvv:dddd       (config mechanism #1)
 *     ECAM dd vvvv:dddd      (the same dword read through ECAM)
 * then
 *     BUS1 xxxxxxxx          (dword 0 of bus 1 device 0 through 0xcf8/0xcfc)
 *     SCAN-DONE n            (n = number of present devices on bus 0, decimal)
 * and powers off. All hex is lowercase.
 */
#include "pvh.S"

main:
        xor     %edi, %edi              /* EDI = device number */
        xor     %ebp, %ebp              /* EBP = present devices */
next_device:
        mov     %edi, %eax
        shl     $11, %eax               /* bus 0, device EDI, function 0, register 0 */
        call    pci_read
        cmp     $0xffff, %ax
        je      1f                      /* no device */
        inc     %ebp
        print   "PCI "
        call    show_device

        mov     %edi, %ebx
        shl     $15, %ebx               /* ECAM offset of bus 0, device EDI, function 0 */
        mov     PCI_ECAM_BASE(%ebx), %eax
        print   "ECAM "
        call    show_device
1:      inc     %edi
        cmp     $32, %edi
        jb      next_device

        mov     $(1 << 16), %eax        /* bus 1, device 0, function 0, register 0 */
        call    pci_read
        print   "BUS1 "
        call    hex8
        putch   '\n'

        print   "SCAN-DONE "
        mov     %ebp, %eax
        call    putdec
        putch   '\n'
        ret

#include "pci.inc"
