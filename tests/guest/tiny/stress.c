/*
 * stress.c - a tiny guest that leans on one part of vmm as hard as it can, for the tests of
 * hostile guests (tests/hostile_tiny.rs). Entry: c64.S. Output on COM1, one line each.
 *
 *   mode=ecam [reads=N]
 *     reads the first dword of every slot of bus 0 and the command/status and BAR 0 of
 *     every slot that has a function, through ECAM, over and over (a function may come and
 *     go between two reads: vmm plugs and removes them meanwhile). Prints
 *     ECAM <n> <present>     every 65536 reads (n = reads so far, present = slots found in
 *                            the last pass)
 *     and powers off after N reads (never, when N is absent or 0).
 *   mode=flood count=N
 *     finds the first virtio-pci function on bus 0 and, N times, resets it and makes three
 *     writes it must refuse: an invalid queue size, FEATURES_OK without VIRTIO_F_VERSION_1,
 *     DRIVER_OK without FEATURES_OK (8 exits each). Prints FLOOD done and powers off.
 *   mode=spew bytes=N [then=spin]
 *     writes N bytes to COM1 as fast as the UART takes them (lines of 64 characters), then
 *     SPEW done, and powers off (with then=spin: runs on, doing nothing).
 * Anything else prints "STRESS usage".
 */

#include "tinyc.h"

static void ecam(u64 limit)
{
    u64 n = 0;
    u32 present = 0, seen = 0;
    for (;;) {
        for (u32 dev = 0; dev < 32; dev++) {
            u64 f = ECAM + ((u64)dev << 15);
            u32 id = R32(f);
            n++;
            if (id != 0xffffffff) {
                seen++;
                (void)R32(f + 0x04);
                (void)R32(f + 0x10);
                n += 2;
            }
            if ((n & 0xffff) < 3 && n > 3) {
                con_puts("ECAM ");
                con_dec(n);
                con_putc(' ');
                con_dec(present);
                con_putc('\n');
            }
            if (limit && n >= limit)
                die("ECAM done");
        }
        present = seen;
        seen = 0;
    }
}

static void flood(u64 count)
{
    map_4g();
    find_virtio(0, "STRESS");
    for (u64 i = 0; i < count; i++) {
        R8(common + STATUS) = 0;
        while (R8(common + STATUS) != 0)
            ;
        R16(common + Q_SELECT) = 0;
        R16(common + Q_SIZE) = 3;               /* not a power of two */
        R32(common + DRV_FEAT_SEL) = 1;
        R32(common + DRV_FEAT) = 0;             /* no VIRTIO_F_VERSION_1 */
        R8(common + STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK;
        R8(common + STATUS) = S_ACK | S_DRIVER | S_DRIVER_OK;
    }
    die("FLOOD done");
}

static void spew(u64 bytes, int spin)
{
    for (u64 i = 0; i < bytes; i++)
        con_putc(i % 64 == 63 ? '\n' : 'a' + i % 26);
    if (!spin)
        die("\nSPEW done");
    con_puts("\nSPEW done\n");
    for (;;)
        asm volatile("pause");
}

void c_main(const u8 *boot_params)
{
    load_cmdline(boot_params);
    usage_line = "STRESS usage";
    const char *mode = arg("mode");
    if (is(mode, "ecam")) {
        map_4g();
        ecam(num("reads", 0));
    }
    if (is(mode, "flood"))
        flood(num("count", 1000));
    if (is(mode, "spew"))
        spew(num("bytes", 1000), is(arg("then"), "spin"));
    die(usage_line);
}
