/*
 * tinyc.h - what the tiny C guests share: port I/O, the TSC, COM1 output, key=value
 * arguments from the command line, an identity map of 0-4 GiB, MMIO and ECAM access, and
 * finding a modern virtio-pci function and its capabilities.
 *
 * Each guest is one .c file that includes this header once (everything here is static),
 * entered through c64.S: void c_main(const u8 *boot_params). Call load_cmdline() first,
 * then map_4g() before touching ECAM or a BAR.
 */

/* Not every guest uses every helper. */
#pragma GCC diagnostic ignored "-Wunused-function"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

extern void poweroff(void) __attribute__((noreturn));   /* lib.S */

/* ---- memory ordering, port I/O, time -------------------------------------------------- */

/* The device runs on another host thread. x86 keeps stores in order and loads in order,
 * so a compiler barrier suffices between ring writes; a full fence precedes notifications. */
#define barrier() asm volatile("" ::: "memory")
#define fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

/* About 10 s in TSC ticks (1-3 GHz): how long a guest waits for the device. */
#define TIMEOUT_IO      (1ULL << 35)

/* gcc may emit calls to these even when freestanding. */
void *memset(void *d, int c, unsigned long n)
{
    void *r = d;
    asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    void *r = d;
    asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

/* ---- console ---------------------------------------------------------------------------- */

#define COM1 0x3f8

static void con_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))     /* LSR.THRE */
        ;
    outb(COM1, c);
}

static void con_puts(const char *s)
{
    while (*s)
        con_putc(*s++);
}

static void con_dec(u64 v)
{
    char b[20];
    int n = 0;
    do {
        b[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n)
        con_putc(b[--n]);
}

static void con_hex(u64 v)
{
    char b[16];
    int n = 0;
    do {
        b[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    while (n)
        con_putc(b[--n]);
}

/* Prints "<what>\n" and powers off. */
static void __attribute__((noreturn)) die(const char *what)
{
    con_puts(what);
    con_putc('\n');
    poweroff();
}

/* ---- command line ----------------------------------------------------------------------- */

static const char *cmdline = "";
/* What a malformed argument prints (the guest sets its own). */
static const char *usage_line = "usage";

/* The value of the word "key=value" (ends at a space or NUL), or 0 if absent. */
static const char *arg(const char *key)
{
    for (const char *p = cmdline; *p;) {
        while (*p == ' ')
            p++;
        const char *k = key;
        while (*k && *p == *k)
            p++, k++;
        if (!*k && *p == '=')
            return p + 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* Whether the value v equals s. */
static int is(const char *v, const char *s)
{
    if (!v)
        return 0;
    while (*s && *v == *s)
        v++, s++;
    return !*s && (!*v || *v == ' ');
}

/* A numeric argument (decimal or 0x hex); dflt if absent, usage if malformed. */
static u64 num(const char *key, u64 dflt)
{
    const char *v = arg(key);
    if (!v)
        return dflt;
    u64 base = 10, n = 0;
    if (v[0] == '0' && v[1] == 'x')
        base = 16, v += 2;
    if (!*v || *v == ' ')
        die(usage_line);
    for (; *v && *v != ' '; v++) {
        u64 d;
        if (*v >= '0' && *v <= '9')
            d = *v - '0';
        else if (base == 16 && *v >= 'a' && *v <= 'f')
            d = *v - 'a' + 10;
        else
            die(usage_line);
        n = n * base + d;
    }
    return n;
}

/* ---- page tables: identity-map 0-4 GiB (the boot map covers only 1 GiB; ECAM and the
 * BARs are at 0xc0000000-0xefffffff) with 2 MiB pages, the top GiB uncached. ---------- */

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4][512] __attribute__((aligned(4096)));

static void map_4g(void)
{
    enum { P = 1, RW = 2, PWT = 8, PCD = 16, PS = 128 };
    for (u64 g = 0; g < 4; g++) {
        for (u64 i = 0; i < 512; i++)
            pd[g][i] = (g << 30 | i << 21) | P | RW | PS | (g == 3 ? PWT | PCD : 0);
        pdpt[g] = (u64)pd[g] | P | RW;
    }
    pml4[0] = (u64)pdpt | P | RW;
    asm volatile("mov %0, %%cr3" : : "r"(pml4) : "memory");
}

/* ---- MMIO -------------------------------------------------------------------------------- */

#define R8(a) (*(volatile u8 *)(a))
#define R16(a) (*(volatile u16 *)(a))
#define R32(a) (*(volatile u32 *)(a))

/* ---- PCI (ECAM, bus 0) -------------------------------------------------------------------- */

#define ECAM 0xe0000000ULL
static u64 fn;   /* ECAM address of the function being driven */

/* Configuration reads are naturally aligned dwords; narrower values are cut out. */
static u32 cfg32(u32 off) { return R32(fn + (off & ~3u)); }
static u8 cfg8(u32 off) { return cfg32(off) >> (off & 3) * 8; }

/* The address BAR `bar` decodes (64-bit BARs use the next register too). */
static u64 bar_addr(u32 bar)
{
    u32 lo = cfg32(0x10 + 4 * bar);
    u64 a = lo & ~0xfu;
    if ((lo & 6) == 4 && bar < 5)
        a |= (u64)cfg32(0x14 + 4 * bar) << 32;
    return a;
}

/* ---- virtio-pci ---------------------------------------------------------------------------- */

/* Common configuration (virtio_pci_common_cfg) offsets. */
enum {
    DEV_FEAT_SEL = 0x00, DEV_FEAT = 0x04, DRV_FEAT_SEL = 0x08, DRV_FEAT = 0x0c,
    STATUS = 0x14, CFG_GEN = 0x15, Q_SELECT = 0x16, Q_SIZE = 0x18, Q_VECTOR = 0x1a,
    Q_ENABLE = 0x1c, Q_NOTIFY_OFF = 0x1e, Q_DESC = 0x20, Q_AVAIL = 0x28, Q_USED = 0x30,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
#define F_VERSION_1 (1ULL << 32)

static u64 common, notify_base, devcfg;     /* addresses of the structures */
static u32 notify_mult;                     /* notify_off_multiplier */

/* Finds the first function on bus 0 (ECAM) with the virtio-pci device ID `id` (0x1040 +
 * virtio device type; 0: any modern virtio device) and its virtio capabilities, and enables
 * memory decoding and bus mastering. Dies with "<who> nodevice" or "<who> nocaps". */
static void find_virtio(u16 id, const char *who)
{
    for (u32 dev = 0; dev < 32 && !fn; dev++) {
        u32 v = R32(ECAM + ((u64)dev << 15));
        if ((v & 0xffff) == 0x1af4 && (id ? v >> 16 == id : v >> 16 >= 0x1040))
            fn = ECAM + ((u64)dev << 15);
    }
    if (!fn) {
        con_puts(who);
        die(" nodevice");
    }
    if (!(cfg32(0x04) >> 16 & 0x10))            /* status: capabilities list */
        fn = 0;
    u32 ptr = fn ? cfg8(0x34) & 0xfc : 0;
    for (int n = 0; ptr && n < 48; n++, ptr = cfg8(ptr + 1) & 0xfc) {
        /* virtio_pci_cap: vndr 0x09, next, len, cfg_type, bar, id, pad[2], offset, length */
        u8 type = cfg8(ptr + 3), bar = cfg8(ptr + 4);
        if (cfg8(ptr) != 0x09 || bar > 5)
            continue;
        u64 at = bar_addr(bar) + cfg32(ptr + 8);
        if (type == 1 && !common)
            common = at;
        if (type == 2 && !notify_base)
            notify_base = at, notify_mult = cfg32(ptr + 16);
        if (type == 4 && !devcfg)
            devcfg = at;
    }
    if (!common || !notify_base || !devcfg) {
        con_puts(who);
        die(" nocaps");
    }
    /* command: memory space + bus master (read as a dword, written as a word) */
    R16(fn + 4) = (u16)cfg32(0x04) | 0x6;
}

/* Points cmdline at the kernel command line of the boot_params (setup header cmd_line_ptr). */
static void load_cmdline(const u8 *boot_params)
{
    u32 ptr = *(const u32 *)(boot_params + 0x228);
    if (ptr)
        cmdline = (const char *)(u64)ptr;
}
