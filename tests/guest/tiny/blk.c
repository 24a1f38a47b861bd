/*
 * blk.c - a minimal polling virtio-blk driver (modern virtio-pci, virtio 1.x) for driving
 * vmm's block device quickly from a tiny guest. Entry: c64.S (64-bit ELF, RSI = boot_params).
 *
 * The command line (boot_params setup header cmd_line_ptr) holds key=value words; other
 * words are ignored. Output goes to COM1, one line each:
 *
 *   (every mode, after initialising the first virtio-blk function on bus 0)
 *     BLK capacity=<sectors>
 *   mode=durable records=N start=S
 *     for i in S..S+N: write record i to sector i, then FLUSH; after both succeed:
 *     ACK <i>                       on a non-zero status: ERR <i> status=<hex>, and stop
 *     DONE
 *   mode=verify records=N start=S
 *     BAD <i>                       for each sector i in S..S+N not holding record i
 *     OK <n>                        n = number of good records
 *     DONE                          (a read error: ERR <i> status=<hex>, and stop)
 *   mode=hostile [jump=0]
 *     CASE <name> used=<0|1> status=<hex|none>   for each malformed request (see hostile());
 *                                   jump=0 leaves out the last case, avail-jump
 *     SURVIVED                      a normal write + read of sector 0 worked afterwards
 *                                   (BROKEN <why> otherwise)
 *   mode=resetloop [qd=1..8]
 *     forever: qd writes of sectors 0..qd-1 made available, the first one completed, then a
 *     reset with the others in flight (waiting for the status to read 0) and the device
 *     brought up again; "ROUND <n> status=<hex>" (of the first write) before each reset
 *   mode=bench ops=N op=read|write size=4096|1048576 qd=1..8 [seed=X]
 *     BENCH start                   (before the first request)
 *     BENCH done                    (a non-zero status: ERR <op number> status=<hex>)
 *   no or an unknown mode, or bad arguments:
 *     BLK usage
 * Setup failures print "BLK <what>"; a request that does not complete within the timeout
 * prints TIMEOUT. The guest always powers off at the end.
 *
 * Record format (512 bytes, sector i): "VMMREC01", i (u64 LE), bytes k = 16..507 hold
 * (i * 31 + k) & 0xff, bytes 508..511 the FNV-1a 32 hash of bytes 0..507 (LE).
 *
 * Numbers on the command line are decimal, or hex with 0x. Defaults: records=1 start=0
 * ops=1000 size=4096 qd=1 (op has none); size may be any multiple of 512 up to 1 MiB.
 * Output numbers are decimal, except statuses (lowercase hex, no prefix).
 *
 * Only VIRTIO_F_VERSION_1 and VIRTIO_BLK_F_FLUSH are negotiated; no interrupts (the used
 * ring is polled). Memory: the image needs about 9.1 MiB of RAM (8 x 1 MiB buffers).
 */

#include "tinyc.h"

/* A hostile request that vmm does not complete at once is never completed: ~0.3 s. */
#define TIMEOUT_HOSTILE (1ULL << 30)
#define F_BLK_FLUSH (1ULL << 9)

static u64 notify;                          /* queue 0's notification address */
static u64 features;                        /* negotiated */
static u64 capacity;                        /* sectors */

/* The request queue (queue 0). QSIZE is 32 rather than 16 so that 8 requests of three
 * descriptors each fit. */
#define QSIZE 32
enum { D_NEXT = 1, D_WRITE = 2 };
struct desc { u64 addr; u32 len; u16 flags, next; };
static struct desc vdesc[QSIZE] __attribute__((aligned(4096)));
static struct { u16 flags, idx, ring[QSIZE], used_event; } vavail __attribute__((aligned(4096)));
static struct { u16 flags, idx; struct { u32 id, len; } ring[QSIZE]; u16 avail_event; }
    vused __attribute__((aligned(4096)));
static u16 avail_idx;   /* next avail ring slot (free-running) */
static u16 used_seen;   /* used ring entries consumed (free-running) */

static void write64(u64 at, u64 v)
{
    R32(at) = (u32)v;
    R32(at + 4) = (u32)(v >> 32);
}

/* Resets the device and brings it up with queue 0 (all ring memory zeroed). */
static void init(void)
{
    R8(common + STATUS) = 0;
    for (u64 t0 = rdtsc(); R8(common + STATUS) != 0;)
        if (rdtsc() - t0 > TIMEOUT_IO)
            die("BLK reset timeout");
    R8(common + STATUS) = S_ACK;
    R8(common + STATUS) = S_ACK | S_DRIVER;

    R32(common + DEV_FEAT_SEL) = 0;
    u64 offered = R32(common + DEV_FEAT);
    R32(common + DEV_FEAT_SEL) = 1;
    offered |= (u64)R32(common + DEV_FEAT) << 32;
    if (!(offered & F_VERSION_1))
        die("BLK legacy");
    features = offered & (F_VERSION_1 | F_BLK_FLUSH);
    R32(common + DRV_FEAT_SEL) = 0;
    R32(common + DRV_FEAT) = (u32)features;
    R32(common + DRV_FEAT_SEL) = 1;
    R32(common + DRV_FEAT) = (u32)(features >> 32);
    R8(common + STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK;
    if (!(R8(common + STATUS) & S_FEATURES_OK))
        die("BLK features rejected");

    memset(vdesc, 0, sizeof vdesc);
    memset(&vavail, 0, sizeof vavail);
    memset(&vused, 0, sizeof vused);
    avail_idx = used_seen = 0;
    vavail.flags = 1;                           /* VRING_AVAIL_F_NO_INTERRUPT: we poll */
    R16(common + Q_SELECT) = 0;
    if (R16(common + Q_SIZE) < QSIZE)
        die("BLK queue too small");
    R16(common + Q_SIZE) = QSIZE;
    R16(common + Q_VECTOR) = 0xffff;            /* no MSI-X vector */
    write64(common + Q_DESC, (u64)vdesc);
    write64(common + Q_AVAIL, (u64)&vavail);
    write64(common + Q_USED, (u64)&vused);
    notify = notify_base + (u64)R16(common + Q_NOTIFY_OFF) * notify_mult;
    R16(common + Q_ENABLE) = 1;
    fence();
    R8(common + STATUS) = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    if (R8(common + STATUS) & 0xc0)             /* DEVICE_NEEDS_RESET or FAILED */
        die("BLK device failed");

    /* capacity (u64 at offset 0), read until config_generation is stable */
    u8 gen;
    do {
        gen = R8(common + CFG_GEN);
        capacity = R32(devcfg) | (u64)R32(devcfg + 4) << 32;
    } while (gen != R8(common + CFG_GEN));
}

/* ---- requests ------------------------------------------------------------------------------ */

enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4 };
struct hdr { u32 type, reserved; u64 sector; };

/* Per request slot s (up to MAXQD in flight): descriptors 3s..3s+2, a header, a status
 * byte and a data buffer of up to 1 MiB. */
#define MAXQD 8
#define MAXSIZE (1u << 20)
static struct hdr hdrs[MAXQD];
static volatile u8 stat[MAXQD];
static u8 bufs[MAXQD][MAXSIZE] __attribute__((aligned(4096)));

static void set_desc(u16 i, const volatile void *addr, u32 len, u16 flags, u16 next)
{
    vdesc[i].addr = (u64)addr;
    vdesc[i].len = len;
    vdesc[i].flags = flags;
    vdesc[i].next = next;
}

/* Prepares slot s: header, len bytes of data (none if 0; the device writes them if
 * dev_writes), status. Returns the chain's head. */
static u16 prep(int s, u32 type, u64 sector, void *data, u32 len, int dev_writes)
{
    u16 d = 3 * s;
    hdrs[s].type = type;
    hdrs[s].reserved = 0;
    hdrs[s].sector = sector;
    stat[s] = 0xff;
    set_desc(d, &hdrs[s], sizeof hdrs[s], D_NEXT, len ? d + 1 : d + 2);
    if (len)
        set_desc(d + 1, data, len, D_NEXT | (dev_writes ? D_WRITE : 0), d + 2);
    set_desc(d + 2, &stat[s], 1, D_WRITE, 0);
    return d;
}

/* Puts a chain head into the avail ring (not yet visible to the device). */
static void publish(u16 head)
{
    vavail.ring[avail_idx % QSIZE] = head;
    avail_idx++;
}

/* Makes published heads visible and notifies queue 0, unless the device said it does not
 * need that (VRING_USED_F_NO_NOTIFY: it is processing and checks the index again before it
 * stops; the fence here and the device's own after clearing the flag keep this race-free).
 * always: notify regardless (hostile requests). */
static void kick_if(int always)
{
    barrier();                                  /* ring entries before the index */
    *(volatile u16 *)&vavail.idx = avail_idx;
    fence();                                    /* the index before reading the flag */
    if (always || !(*(volatile u16 *)&vused.flags & 1))
        R16(notify) = 0;
}

static void kick(void) { kick_if(0); }

/* Waits up to `ticks` for the next used entry; returns its id, or -1 on timeout. */
static int next_used(u64 ticks)
{
    u64 t0 = rdtsc();
    while (*(volatile u16 *)&vused.idx == used_seen)
        if (rdtsc() - t0 > ticks)
            return -1;
    barrier();                                  /* x86: the entry is read after the index */
    int id = *(volatile u32 *)&vused.ring[used_seen % QSIZE].id;
    used_seen++;
    return id;
}

/* One request in slot 0, waited for; returns its status. */
static u8 io(u32 type, u64 sector, void *data, u32 len, int dev_writes)
{
    publish(prep(0, type, sector, data, len, dev_writes));
    kick();
    if (next_used(TIMEOUT_IO) < 0)
        die("TIMEOUT");
    return stat[0];
}

static void err(u64 i, u8 status)
{
    con_puts("ERR ");
    con_dec(i);
    con_puts(" status=");
    con_hex(status);
    die("");
}

/* ---- records -------------------------------------------------------------------------------- */

static u32 fnv1a(const u8 *p, u32 n)
{
    u32 h = 2166136261u;
    while (n--)
        h = (h ^ *p++) * 16777619u;
    return h;
}

static void make_record(u8 *b, u64 i)
{
    memcpy(b, "VMMREC01", 8);
    for (int k = 0; k < 8; k++)
        b[8 + k] = i >> 8 * k;
    for (u32 k = 16; k < 508; k++)
        b[k] = (i * 31 + k) & 0xff;
    u32 h = fnv1a(b, 508);
    for (int k = 0; k < 4; k++)
        b[508 + k] = h >> 8 * k;
}

static int same(const u8 *a, const u8 *b, u32 n)
{
    while (n--)
        if (*a++ != *b++)
            return 0;
    return 1;
}

static void durable(u64 start, u64 records)
{
    if (!(features & F_BLK_FLUSH))
        die("BLK noflush");
    for (u64 i = start; i < start + records; i++) {
        make_record(bufs[0], i);
        u8 s = io(T_OUT, i, bufs[0], 512, 0);
        if (s)
            err(i, s);
        s = io(T_FLUSH, 0, 0, 0, 0);
        if (s)
            err(i, s);
        con_puts("ACK ");
        con_dec(i);
        con_putc('\n');
    }
    die("DONE");
}

static void verify(u64 start, u64 records)
{
    u64 good = 0;
    for (u64 i = start; i < start + records; i++) {
        memset(bufs[0], 0, 512);
        u8 s = io(T_IN, i, bufs[0], 512, 1);
        if (s)
            err(i, s);
        make_record(bufs[1], i);
        if (same(bufs[0], bufs[1], 512)) {
            good++;
        } else {
            con_puts("BAD ");
            con_dec(i);
            con_putc('\n');
        }
    }
    con_puts("OK ");
    con_dec(good);
    con_putc('\n');
    die("DONE");
}

/* ---- hostile requests ------------------------------------------------------------------------ */

/* Publishes `head`, waits a little for the used index to move, and prints
 * "CASE <name> used=<0|1> status=<hex|none>"; status is the byte at *status_at if the
 * device changed it from 0xff. */
static void hostile_case(const char *name, u16 head, volatile u8 *status_at)
{
    u16 before = *(volatile u16 *)&vused.idx;
    publish(head);
    kick_if(1);
    int used = 0;
    for (u64 t0 = rdtsc(); !used && rdtsc() - t0 < TIMEOUT_HOSTILE;)
        used = *(volatile u16 *)&vused.idx != before;
    barrier();
    used_seen = *(volatile u16 *)&vused.idx;
    con_puts("CASE ");
    con_puts(name);
    con_puts(used ? " used=1 status=" : " used=0 status=");
    if (*status_at == 0xff)
        con_puts("none");
    else
        con_hex(*status_at);
    con_putc('\n');
}

/* A header in slot 0 and status byte reset to 0xff; returns the header's address. */
static struct hdr *hdr0(u32 type, u64 sector)
{
    hdrs[0].type = type;
    hdrs[0].reserved = 0;
    hdrs[0].sector = sector;
    stat[0] = 0xff;
    return &hdrs[0];
}

/* A three-descriptor chain 0 → 1 → 2: header, the given data descriptor, status. */
static void chain3(u32 type, u64 sector, u64 data, u32 len, u16 data_flags)
{
    set_desc(0, hdr0(type, sector), 16, D_NEXT, 1);
    set_desc(1, (void *)data, len, D_NEXT | data_flags, 2);
    set_desc(2, &stat[0], 1, D_WRITE, 0);
}

static void hostile(int jump)
{
    u8 *b = bufs[0];
    u64 buf = (u64)b;

    /* descriptor loop 0 → 1 → 0 …; a device that stops after the queue size may put the
     * status in the last byte of the writable data buffer */
    set_desc(0, hdr0(T_IN, 0), 16, D_NEXT, 1);
    set_desc(1, b, 512, D_NEXT | D_WRITE, 0);
    b[511] = 0xff;
    hostile_case("loop", 0, &b[511]);

    chain3(T_IN, 0, 0x700000000000ULL, 512, D_WRITE);   /* data outside RAM */
    hostile_case("oob-addr", 0, &stat[0]);

    chain3(T_IN, 0, buf, 0, D_WRITE);                   /* zero-length data */
    hostile_case("zero-len", 0, &stat[0]);

    chain3(T_IN, 0, buf, 0xffffffffu, D_WRITE);         /* 4 GiB - 1 bytes of data */
    hostile_case("huge-len", 0, &stat[0]);

    chain3(T_IN, 0, buf, 512, 0);                       /* read into a device-readable buffer */
    hostile_case("wrong-dir", 0, &stat[0]);

    memset(b, 0xee, 1024);
    chain3(T_OUT, capacity - 1, buf, 1024, 0);          /* write across the end of the disk */
    hostile_case("past-end", 0, &stat[0]);

    chain3(T_OUT, 1ULL << 55, buf, 512, 0);             /* sector * 512 overflows 64 bits */
    hostile_case("sector-overflow", 0, &stat[0]);

    chain3(0x77, 0, buf, 512, 0);                       /* unknown request type */
    hostile_case("bad-type", 0, &stat[0]);

    chain3(T_OUT, 1, buf, 512, 0);                      /* the status descriptor is readable */
    vdesc[2].flags = 0;
    hostile_case("no-status", 0, &stat[0]);

    set_desc(0, hdr0(T_IN, 0), 16, D_NEXT, 0x1234);     /* next index beyond the table */
    hostile_case("next-oob", 0, &stat[0]);

    chain3(T_IN, 0, buf, 512, D_WRITE);                 /* a head index beyond the table */
    hostile_case("bad-head", 0xbeef, &stat[0]);

    /* the avail index jumps 1000 ahead over garbage ring entries; last, as it breaks the ring */
    if (jump) {
        for (u16 i = 0; i < QSIZE; i++)
            vavail.ring[i] = 0xbeef + i;
        stat[0] = 0xff;
        avail_idx += 999;                               /* hostile_case() publishes one more */
        hostile_case("avail-jump", 0xbeef, &stat[0]);
    }

    /* reset, re-initialise, and check that a write and a read of sector 0 work */
    init();
    for (u32 k = 0; k < 512; k++)
        b[k] = k * 7 + 3;
    u8 s = io(T_OUT, 0, b, 512, 0);
    if (s)
        err(0, s);
    memset(bufs[1], 0, 512);
    s = io(T_IN, 0, bufs[1], 512, 1);
    if (s)
        err(0, s);
    die(same(b, bufs[1], 512) ? "SURVIVED" : "BROKEN readback");
}

/* ---- benchmark ------------------------------------------------------------------------------- */

static void bench(u64 ops, int write, u32 size, u32 qd, u64 seed)
{
    u64 per = size / 512, blocks = capacity / per;
    if (!blocks)
        die("BLK disk too small");
    u64 x = seed ? seed : 0x9e3779b97f4a7c15ULL;
    int free_slots[MAXQD], nfree = 0;
    for (u32 s = 0; s < qd; s++)
        free_slots[nfree++] = qd - 1 - s;
    u64 submitted = 0, done = 0;
    con_puts("BENCH start\n");
    while (done < ops) {
        int n = 0;
        while (submitted < ops && nfree) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;    /* xorshift64 */
            int s = free_slots[--nfree];
            publish(prep(s, write ? T_OUT : T_IN, x % blocks * per, bufs[s], size, !write));
            submitted++, n++;
        }
        if (n)
            kick();
        /* at least one completion, then whatever else is already there */
        int id = next_used(TIMEOUT_IO);
        if (id < 0)
            die("TIMEOUT");
        do {
            int s = id / 3;
            if (s >= MAXQD || stat[s])
                err(done, s < MAXQD ? stat[s] : 0xff);
            free_slots[nfree++] = s;
            done++;
        } while (*(volatile u16 *)&vused.idx != used_seen && (id = next_used(0)) >= 0);
    }
    die("BENCH done");
}

/* ---- resets with requests in flight ------------------------------------------------------------ */

/* Forever: qd writes made available, the first one completed, then a reset with the others
 * in flight (waiting for the status to read 0, as a driver must), then the device brought
 * up again. */
static void __attribute__((noreturn)) resetloop(u64 qd)
{
    for (u64 round = 0;; round++) {
        for (u64 s = 0; s < qd; s++)
            publish(prep(s, T_OUT, s, bufs[s], 512, 0));
        kick();
        int id = next_used(TIMEOUT_IO);         /* the device is at work on the others */
        if (id < 0)
            die("TIMEOUT");
        con_puts("ROUND ");
        con_dec(round);
        con_puts(" status=");
        con_hex(stat[id / 3]);
        con_putc('\n');
        init();                                 /* resets, waits for 0, starts over */
    }
}

/* ---- entry -------------------------------------------------------------------------------------- */

void c_main(const u8 *boot_params)
{
    load_cmdline(boot_params);
    usage_line = "BLK usage";
    const char *mode = arg("mode");
    if (!is(mode, "durable") && !is(mode, "verify") && !is(mode, "hostile") && !is(mode, "bench") &&
        !is(mode, "resetloop"))
        die("BLK usage");

    map_4g();
    find_virtio(0x1042, "BLK");
    init();
    con_puts("BLK capacity=");
    con_dec(capacity);
    con_putc('\n');

    if (is(mode, "durable"))
        durable(num("start", 0), num("records", 1));
    if (is(mode, "verify"))
        verify(num("start", 0), num("records", 1));
    if (is(mode, "hostile"))
        hostile(num("jump", 1));
    if (is(mode, "resetloop")) {
        u64 qd = num("qd", 8);
        if (!qd || qd > MAXQD)
            die("BLK usage");
        resetloop(qd);
    }
    const char *op = arg("op");
    u64 size = num("size", 4096), qd = num("qd", 1);
    if (!(is(op, "read") || is(op, "write")) || !size || size % 512 || size > MAXSIZE ||
        !qd || qd > MAXQD)
        die("BLK usage");
    bench(num("ops", 1000), is(op, "write"), size, qd, num("seed", 0));
}
