/*
 * tiny.h - constants for the tiny test guests (the fixed machine layout of vmm).
 *
 * Included by pvh.S and elf64.S; guest sources include one of those two instead.
 * C preprocessor only: this file must stay valid for both .code32 and .code64.
 */
#ifndef TINY_H
#define TINY_H

/* COM1 16550 UART */
#define COM1            0x3f8
#define COM1_THR        (COM1 + 0)      /* transmit holding register (write) */
#define COM1_RBR        (COM1 + 0)      /* receive buffer register (read) */
#define COM1_LSR        (COM1 + 5)      /* line status register */
#define LSR_DR          0x01            /* data ready */
#define LSR_THRE        0x20            /* transmit holding register empty */

/* Power off: hardware-reduced ACPI sleep control register, SLP_TYP=5 (S5) | SLP_EN */
#define ACPI_SLEEP_CTL  0x600
#define SLP_S5          ((5 << 2) | (1 << 5))   /* = 0x34 */

/* QEMU isa-debug-exit (only for running the guests under QEMU) */
#define QEMU_DEBUG_EXIT 0xf4

/* i8042 keyboard controller: command 0xfe pulses the CPU reset line */
#define I8042_CMD       0x64
#define I8042_RESET     0xfe

/* PCI configuration mechanism #1 and ECAM */
#define PCI_CONFIG_ADDR 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define PCI_ENABLE      0x80000000
#define PCI_ECAM_BASE   0xe0000000

/*
 * PCI hotplug controller (no ACPI): 32-bit registers, 4-byte in/out only; bit n of
 * each bitmap is slot (device number) n on bus 0.
 */
#define HOTPLUG_BASE    0x610
#define HOTPLUG_UP      (HOTPLUG_BASE + 0x0)    /* read: newly inserted slots; read clears */
#define HOTPLUG_DOWN    (HOTPLUG_BASE + 0x4)    /* read: slots to be removed; read clears */
#define HOTPLUG_EJECT   (HOTPLUG_BASE + 0x8)    /* write: slots the guest has released */
#define HOTPLUG_PRESENT (HOTPLUG_BASE + 0xc)    /* read: occupied hotplug slots */

/* CMOS RTC */
#define RTC_INDEX       0x70
#define RTC_DATA        0x71

/* Unbacked guest-physical address inside the PCI MMIO window */
#define UNBACKED_ADDR   0xd0000000

/* Size of the stack each guest sets up in .bss */
#define STACK_SIZE      16384

#endif
