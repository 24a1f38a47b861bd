/*
 * rtc: PVH entry; prints the raw CMOS RTC registers as
 *     RTC cc yy-mm-dd hh:mm:ss B=xx
 * (century, year, month, day, hour, minute, second, register B; each byte as 2 hex
 * digits, so BCD values read as decimal), then powers off. Register A's
 * update-in-progress bit is not consulted: the bytes are printed as read.
 */
#include "pvh.S"

main:
        print   "RTC"
        mov     $fields, %esi
        mov     $(fields_end - fields) / 2, %ecx
1:      lodsb                           /* separator before the field */
        call    putc
        lodsb                           /* RTC register index */
        call    rtc_read
        call    hex2
        dec     %ecx
        jnz     1b
        print   " B="
        mov     $0x0b, %al              /* register B: bit 2 binary mode, bit 1 24-hour */
        call    rtc_read
        call    hex2
        putch   '\n'
        ret

/* rtc_read: AL = register index; returns the register in AL. */
rtc_read:
        out     %al, $RTC_INDEX
        in      $RTC_DATA, %al
        ret

        .section .rodata
/* (separator, register index) pairs, in output order */
fields:
        .byte   ' ', 0x32               /* century */
        .byte   ' ', 0x09               /* year */
        .byte   '-', 0x08               /* month */
        .byte   '-', 0x07               /* day of month */
        .byte   ' ', 0x04               /* hours */
        .byte   ':', 0x02               /* minutes */
        .byte   ':', 0x00               /* seconds */
fields_end:
