/*
 * spin: PVH entry; prints "SPINNING\n", then spins forever with interrupts disabled and
 * no hlt (it never exits to the VMM again), for tests that stop the VMM from outside.
 */
#include "pvh.S"

main:
        print   "SPINNING\n"
        cli
1:      jmp     1b
