/*
 * echo: PVH entry; prints "ECHO-READY\n", then echoes every byte received on COM1
 * back to COM1 (polling LSR.DR). After echoing a 'q' it prints "\nECHO-DONE\n" and
 * powers off.
 */
#include "pvh.S"

main:
        print   "ECHO-READY\n"
1:      mov     $COM1_LSR, %dx
        in      %dx, %al
        test    $LSR_DR, %al
        jz      1b                      /* nothing received yet */
        mov     $COM1_RBR, %dx
        in      %dx, %al
        call    putc                    /* echo it, the 'q' included */
        cmp     $'q', %al
        jne     1b
        print   "\nECHO-DONE\n"
        ret
