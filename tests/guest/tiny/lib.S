/*
 * lib.S - console and power routines shared by all tiny guests. Included (once) by
 * pvh.S or elf64.S after .code32 / .code64 and BITS are set.
 *
 * Every routine preserves all registers except EFLAGS. Addresses are below 4 GiB, so
 * 32-bit register moves work in both modes (they zero-extend in 64-bit mode); only
 * push/pop need the native word size, hence the xAX... names.
 */
#if BITS == 64
#define xAX %rax
#define xBX %rbx
#define xCX %rcx
#define xDX %rdx
#define xSI %rsi
#else
#define xAX %eax
#define xBX %ebx
#define xCX %ecx
#define xDX %edx
#define xSI %esi
#endif

/*
 * print "text": write a string literal to COM1 (the string goes to .rodata).
 * Preserves all registers. Uses the local label 9, so guests should not use 9: / 9b.
 */
        .macro  print text:req
        .pushsection .rodata
9:      .asciz  "\text"
        .popsection
        push    xSI
        mov     $9b, %esi
        call    puts
        pop     xSI
        .endm

/* putch 'c': write one character constant to COM1. Preserves all registers. */
        .macro  putch c:req
        push    xAX
        mov     $\c, %al
        call    putc
        pop     xAX
        .endm

        .text

/* putc: write AL to COM1, after waiting for LSR.THRE (transmit holding register empty). */
putc:
        push    xDX
        push    xAX
        mov     $COM1_LSR, %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        pop     xAX
        mov     $COM1_THR, %dx
        out     %al, %dx
        pop     xDX
        ret

/* puts: write the NUL-terminated string at ESI/RSI to COM1. */
puts:
        push    xSI
        push    xAX
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      pop     xAX
        pop     xSI
        ret

/* puthex: write the low ECX (1..8) hex digits of EAX, most significant first, lowercase. */
puthex:
        push    xAX
        push    xCX
        push    xDX
        mov     %eax, %edx
        mov     $8, %eax
        sub     %ecx, %eax
        shl     $2, %eax                /* AL = 4 * (8 - ECX): move the first digit to the top */
        xchg    %eax, %ecx
        shl     %cl, %edx
        mov     %eax, %ecx              /* ECX = digit count again */
1:      rol     $4, %edx                /* next digit into the low nibble */
        mov     %dl, %al
        and     $0xf, %al
        cmp     $10, %al
        jb      2f
        add     $('a' - '0' - 10), %al
2:      add     $'0', %al
        call    putc
        dec     %ecx
        jnz     1b
        pop     xDX
        pop     xCX
        pop     xAX
        ret

/* hex2, hex4, hex8: write the low 2, 4 or 8 hex digits of EAX. */
hex2:   push    xCX
        mov     $2, %ecx
        jmp     1f
hex4:   push    xCX
        mov     $4, %ecx
        jmp     1f
hex8:   push    xCX
        mov     $8, %ecx
1:      call    puthex
        pop     xCX
        ret

/* putdec: write EAX as an unsigned decimal number. */
putdec:
        push    xAX
        push    xBX
        push    xCX
        push    xDX
        mov     $10, %ebx
        xor     %ecx, %ecx              /* ECX = number of digits pushed */
1:      xor     %edx, %edx
        div     %ebx                    /* EAX = EAX / 10, EDX = digit */
        push    xDX
        inc     %ecx
        test    %eax, %eax
        jnz     1b
2:      pop     xAX                     /* digits come back most significant first */
        add     $'0', %al
        call    putc
        dec     %ecx
        jnz     2b
        pop     xDX
        pop     xCX
        pop     xBX
        pop     xAX
        ret

/*
 * poweroff: ACPI S5 through the sleep control register; then, for QEMU, isa-debug-exit;
 * then halt forever if neither stopped the machine.
 */
poweroff:
        mov     $SLP_S5, %al
        mov     $ACPI_SLEEP_CTL, %dx
        out     %al, %dx
        xor     %eax, %eax
        out     %al, $QEMU_DEBUG_EXIT
        /* fall through */

/* halt_forever: cli; hlt in a loop (an NMI would resume after hlt). */
halt_forever:
        cli
1:      hlt
        jmp     1b
