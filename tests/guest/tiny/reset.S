/* reset: PVH entry; prints "RESET\n", then asks the i8042 to pulse the reset line. */
#include "pvh.S"

main:
        print   "RESET\n"
        mov     $I8042_RESET, %al
        out     %al, $I8042_CMD
        jmp     halt_forever            /* the reset never comes back here */
