/* hello-elf64: 64-bit ELF entry; prints "READY\n", then powers off. */
#include "elf64.S"
#include "hello.inc"
