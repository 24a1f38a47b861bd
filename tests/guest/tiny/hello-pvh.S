/* hello-pvh: PVH entry; prints "READY\n", then powers off. */
#include "pvh.S"
#include "hello.inc"
