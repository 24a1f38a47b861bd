/*
 * pvh.S - PVH entry for a tiny guest. A guest source starts with
 *     #include "pvh.S"
 * and defines `main`, which runs in 32-bit protected mode (paging off, flat segments)
 * with EBX = address of hvm_start_info and a 16 KiB stack. When main returns, the
 * guest powers off. The library routines in lib.S are available.
 */
#define BITS 32
#include "tiny.h"

        .file   __BASE_FILE__           /* the guest source, not a temporary file name */

/*
 * Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18): its presence marks the ELF as
 * PVH-bootable, its 4-byte desc is the 32-bit physical entry address.
 */
        .section .note.Xen, "a", @note
        .balign 4
        .long   2f - 1f                 /* namesz */
        .long   4f - 3f                 /* descsz */
        .long   18                      /* type: XEN_ELFNOTE_PHYS32_ENTRY */
1:      .asciz  "Xen"
2:      .balign 4
3:      .long   _start                  /* desc: physical entry address */
4:      .balign 4

        .section .text.entry, "ax"
        .code32
        .globl  _start
_start:
        cli
        cld
        mov     $stack_top, %esp        /* EBX (hvm_start_info) is left as it is for main */
        call    main
        jmp     poweroff

        .section .bss
        .balign 16
stack:  .skip   STACK_SIZE
stack_top:

        .text
#include "lib.S"
