/*
 * blk_crash: the writer of the qcow2 crash-consistency test
 * (tests/test_crash_consistency.py). It writes numbered records to a virtio-blk
 * disk, a FLUSH every flush=K writes, and after each completed flush prints
 *     flushed S
 * meaning: every write numbered below S is durable. The host SIGKILLs the VMM
 * whenever it likes and then checks the image against those lines.
 *
 * Write number s covers nsect sectors from sector first, both a pure function of
 * (seed, s) (splitmix64, mirrored by the test), so the host knows every write
 * without the guest printing it, and a boot given start=S re-issues, byte for
 * byte, the writes a crash may have cut off after the last "flushed S". One write
 * in 16 is a WRITE_ZEROES instead (half of them with the UNMAP flag, which frees
 * qcow2 clusters that later writes then reuse). Every 512-byte sector a data
 * write covers is self-describing, as 64 little-endian u64:
 *     [0] "KVMPYREC"  [1] s  [2] this sector  [3] first | nsect << 48
 *     [4..62] fill derived from (s, sector)  [63] checksum of [0..62]
 * so a sector read back is this write's, a later one's, or evidence of a bug.
 * Half the writes land in the first hot= sectors (the backing file's data there
 * must survive partial-cluster copy-on-write), the rest anywhere on the disk, so
 * the qcow2 keeps allocating clusters, L2 tables and refcount blocks.
 *
 * cmdline: seed=X (1), start=S (0), count=N (0: until killed), flush=K (8),
 *   maxlen=M (24, sectors per write, at most 128), hot=H (16384 sectors),
 *   verify=V (0): before writing, read writes [S-V, S) back through the device
 *   and check each sector holds what that write left or what a later one did;
 *   wt=1: do not negotiate VIRTIO_BLK_F_FLUSH. The device is then write-through
 *   (virtio 1.1, 5.2.6.2: a completed write is stable), so instead of flushing
 *   the guest prints "written S" every K writes: writes below S completed.
 * Prints: "crash: capacity C start S seed X", "verify: V writes ok" (with verify),
 *   "flushed S" after each flush (or "written S"), "crash: done S" when count is
 *   reached. Exits 1 when a request fails or verification finds a bad sector (one
 *   line saying which).
 */
#include "guest.h"

#include "lib/virtio_pci.h"

#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_WRITE_ZEROES 13
#define WZ_UNMAP 1

#define REC_MAGIC 0x43455259504d564bull    /* "KVMPYREC" */
#define GOLDEN 0x9e3779b97f4a7c15ull
#define MAX_SECTORS 128
/* How far past start= a crashed boot may have got with writes nobody saw
 * acknowledged: a zeroed sector is explained by a WRITE_ZEROES up to here. */
#define LOOKAHEAD 1024

static struct vring rq;
static struct { uint32_t type, reserved; uint64_t sector; } hdr;
static struct { uint64_t sector; uint32_t num, flags; } segment;
static volatile uint8_t status;
static uint64_t buf[MAX_SECTORS * 64] __attribute__((aligned(4096)));
static struct vdev blk;

/* vq_wait without its device-status read on every spin: that read is an MMIO exit
 * into the VMM, which then competes (for the GIL) with the very thread serving the
 * request. Here the status is looked at about once a millisecond. */
static int used_wait(uint32_t *id)
{
    uint64_t start = rdtsc(), last = start;
    while (*(volatile uint16_t *)&rq.used.idx == rq.last_used) {
        uint64_t now = rdtsc();
        if (now - last > 3000000) {
            last = now;
            if (r8(blk.common + C_STATUS) & S_NEEDS_RESET) {
                puts("virtio: device needs reset");
                return -1;
            }
            if (now - start > 50000000000ull) {
                puts("virtio: timeout waiting for the device");
                return -1;
            }
        }
        cpu_relax();
    }
    barrier();
    *id = rq.used.ring[rq.last_used % QSZ].id;
    rq.last_used++;
    return 0;
}

static int blk_request(uint32_t type, uint64_t sector, void *data, uint32_t len, int device_writes)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status = 0xff;
    int n = 0;
    rq.desc[n] = (struct vq_desc){(uintptr_t)&hdr, sizeof(hdr), 1, (uint16_t)(n + 1)};
    n++;
    if (len) {
        rq.desc[n] = (struct vq_desc){(uintptr_t)data, len, (uint16_t)(1 | (device_writes ? 2 : 0)), (uint16_t)(n + 1)};
        n++;
    }
    rq.desc[n] = (struct vq_desc){(uintptr_t)&status, 1, 2, 0};
    vq_submit(&rq, 0);
    uint32_t id;
    if (used_wait(&id) < 0)
        return -1;
    if (id != 0 || status != 0) {
        printf("crash: request type %u sector %lu failed: status %u\n", type, sector, status);
        return -1;
    }
    return 0;
}

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t seed, capacity, hot, maxlen, start;

struct wr { uint64_t first, nsect, zero, unmap; };

static struct wr write_of(uint64_t s)
{
    uint64_t h = mix(seed + (s + 1) * GOLDEN);
    uint64_t h2 = mix(h);
    struct wr w;
    w.nsect = 1 + h % maxlen;
    uint64_t limit = ((h >> 20) & 1) && hot ? hot : capacity;
    w.first = h2 % (limit - w.nsect + 1);
    w.zero = ((h >> 40) & 15) == 0;
    w.unmap = (h >> 44) & 1;
    return w;
}

static int covers(struct wr w, uint64_t sector)
{
    return sector >= w.first && sector < w.first + w.nsect;
}

static uint64_t checksum(const uint64_t *w)
{
    uint64_t c = 0xcbf29ce484222325ull;
    for (int i = 0; i < 63; i++)
        c = (c ^ w[i]) * 0x100000001b3ull;
    return c;
}

static void stamp(uint64_t *w, uint64_t s, uint64_t sector, struct wr wr)
{
    uint64_t base = (s << 32 ^ sector) * 0xbf58476d1ce4e5b9ull;
    w[0] = REC_MAGIC;
    w[1] = s;
    w[2] = sector;
    w[3] = wr.first | wr.nsect << 48;
    for (int i = 4; i < 63; i++)
        w[i] = base ^ (uint64_t)i * GOLDEN;
    w[63] = checksum(w);
}

/* The record work runs in ring 3: under the project's software-nested KVM only
 * ring 3 runs at native speed (ring 0 is emulated), and stamping or checking a
 * few thousand sectors there would dominate the test. I/O stays in ring 0. */
static uint8_t user_stack[16384] __attribute__((aligned(16)));
static struct { uint64_t s; struct wr w; } job;

static uint64_t stamp_job(uint64_t unused)
{
    for (uint64_t j = 0; j < job.w.nsect; j++)
        stamp(buf + j * 64, job.s, job.w.first + j, job.w);
    return 0;
}

enum verdict { OK, NO_RECORD, OLDER, BAD_RECORD, NOT_ZEROED };

/* What `sector` holds, given that write s was the last durable one to cover it. */
static enum verdict judge(const uint64_t *w, uint64_t s, struct wr ws, uint64_t sector)
{
    static uint64_t expect[64];
    uint64_t any = 0;
    for (int i = 0; i < 64; i++)
        any |= w[i];
    if (!any) {
        if (ws.zero)
            return OK;
        /* A WRITE_ZEROES after s, not acknowledged but landed before a crash. */
        for (uint64_t t = s + 1; t < start + LOOKAHEAD; t++) {
            struct wr o = write_of(t);
            if (o.zero && covers(o, sector))
                return OK;
        }
        return NO_RECORD;
    }
    if (w[0] != REC_MAGIC || w[2] != sector)
        return ws.zero ? NOT_ZEROED : NO_RECORD;
    if (w[1] < s || (w[1] == s && ws.zero))
        return ws.zero ? NOT_ZEROED : OLDER;
    struct wr o = write_of(w[1]);
    if (o.zero || !covers(o, sector))
        return BAD_RECORD;
    stamp(expect, w[1], sector, o);
    for (int i = 0; i < 64; i++)
        if (expect[i] != w[i])
            return BAD_RECORD;
    return OK;
}

/* 0, or 1 + the index of the first sector judge() refuses. */
static uint64_t verify_job(uint64_t unused)
{
    for (uint64_t j = 0; j < job.w.nsect; j++)
        if (judge(buf + j * 64, job.s, job.w, job.w.first + j) != OK)
            return j + 1;
    return 0;
}

static const char *const verdicts[] = {
    [NO_RECORD] = "holds no record", [OLDER] = "holds an older write's record",
    [BAD_RECORD] = "holds a corrupt or misplaced record", [NOT_ZEROED] = "is not zeroed",
};

static int do_write(uint64_t s)
{
    job.s = s;
    job.w = write_of(s);
    if (job.w.zero) {
        segment.sector = job.w.first;
        segment.num = (uint32_t)job.w.nsect;
        segment.flags = job.w.unmap ? WZ_UNMAP : 0;
        return blk_request(T_WRITE_ZEROES, 0, &segment, sizeof(segment), 0);
    }
    run_user(stamp_job, 0, user_stack + sizeof(user_stack));
    return blk_request(T_OUT, job.w.first, buf, (uint32_t)(job.w.nsect * 512), 0);
}

int guest_main(const struct hvm_start_info *si)
{
    seed = cmdline_get_u64("seed", 1);
    start = cmdline_get_u64("start", 0);
    uint64_t count = cmdline_get_u64("count", 0);
    uint64_t flush_every = cmdline_get_u64("flush", 8);
    uint64_t verify = cmdline_get_u64("verify", 0);
    int writethrough = cmdline_get_u64("wt", 0) != 0;
    maxlen = cmdline_get_u64("maxlen", 24);
    hot = cmdline_get_u64("hot", 16384);
    if (maxlen == 0 || maxlen > MAX_SECTORS || flush_every == 0) {
        puts("crash: bad maxlen= or flush=");
        return 1;
    }
    user_set_entry(USER_ENTRY_UD2);     /* the one ring-3 entry software-nested KVM gets right */
    paging_set_user((uint64_t)(uintptr_t)__image_start, (uint64_t)(uintptr_t)__image_end, true);
    if (virtio_find(0x1042, &blk) < 0) {
        puts("crash: no modern virtio-blk device found");
        return 1;
    }
    uint64_t features;
    uint64_t wanted = 1ull << VIRTIO_BLK_F_WRITE_ZEROES | (writethrough ? 0 : 1ull << VIRTIO_BLK_F_FLUSH);
    if (virtio_negotiate(&blk, wanted, &features) < 0 || virtio_queue(&blk, 0, &rq) < 0)
        return 1;
    if (features != (wanted | 1ull << 32)) {
        printf("crash: the device does not offer features 0x%lx\n", wanted & ~features);
        return 1;
    }
    w8(blk.common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    capacity = r32(blk.device) | (uint64_t)r32(blk.device + 4) << 32;
    if (hot > capacity)
        hot = capacity;
    if (hot < maxlen)
        hot = 0;
    if (capacity < maxlen) {
        puts("crash: disk too small");
        return 1;
    }
    printf("crash: capacity %lu start %lu seed %lu\n", capacity, start, seed);

    if (verify) {
        uint64_t from = verify < start ? start - verify : 0;
        for (uint64_t s = from; s < start; s++) {
            struct wr w = write_of(s);
            if (blk_request(T_IN, w.first, buf, (uint32_t)(w.nsect * 512), 1) < 0)
                return 1;
            job.s = s;
            job.w = w;
            uint64_t bad = run_user(verify_job, 0, user_stack + sizeof(user_stack));
            if (bad) {
                uint64_t sector = w.first + bad - 1;
                const uint64_t *got = buf + (bad - 1) * 64;
                printf("verify: sector %lu, last durably written by write %lu, %s: 0x%lx 0x%lx 0x%lx\n", sector,
                       s, verdicts[judge(got, s, w, sector)], got[0], got[1], got[2]);
                return 1;
            }
        }
        printf("verify: %lu writes ok\n", start - from);
    }

    const char *ack = writethrough ? "written" : "flushed";
    for (uint64_t s = start; !count || s < start + count; s++) {
        if (do_write(s) < 0)
            return 1;
        if ((s + 1) % flush_every == 0) {
            if (!writethrough && blk_request(T_FLUSH, 0, 0, 0, 0) < 0)
                return 1;
            printf("%s %lu\n", ack, s + 1);
        }
    }
    if (!writethrough && blk_request(T_FLUSH, 0, 0, 0, 0) < 0)
        return 1;
    printf("%s %lu\n", ack, start + count);
    printf("crash: done %lu\n", start + count);
    return 0;
}
