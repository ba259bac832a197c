/*
 * virtio-blk guest driver: finds the modern virtio-blk PCI function through
 * configuration mechanism #1 (0xCF8/0xCFC), sets up one split queue used by
 * polling, writes a pattern, flushes, reads it back and prints checksums.
 *
 * cmdline: sector=N (2048) where the pattern goes, bytes=N (32768, multiple of
 * 512, at most 65536), reads=N (0) extra sequential 64 KiB reads for timing,
 * rand=N (0) extra 4 KiB random reads for timing, writes=N (0) extra sequential
 * 64 KiB writes for timing (after the reads, from sector 0 on), randw=N (0) extra
 * 4 KiB random writes for timing (after those), qd=N (1, at most 32; depth=N is the
 * same) random requests kept in flight at once for rand= and randw=, qcow2magic=1 puts a qcow2 magic at
 * the start of the pattern (a guest planting a header; the host must refuse it at
 * sector 0 of a probed raw disk), waitkey=1 waits for a byte on COM1 before the write
 * (a test connects its monitor first, then lets the write go), misalign=N (0, below
 * 4096) moves the pattern's write and read-back buffers N bytes off their page
 * (and splits each in two descriptors there), as a guest's odd DMA buffers would
 * be: a host with O_DIRECT must bounce them.
 * Prints:
 *   virtio-blk: found at 00:SS.0
 *   virtio-blk: capacity N sectors
 *   virtio-blk: serial <GET_ID>
 *   virtio-blk: sector0 <first 16 bytes of sector 0, non-printables as '.'>
 *   virtio-blk: sector0 checksum 0x........
 *   virtio-blk: waiting for a key              (waitkey=1)
 *   virtio-blk: wrote N bytes at sector S checksum 0x........
 *   virtio-blk: read back checksum 0x........
 *   virtio-blk: pattern ok
 *   virtio-blk: bench seq64k=N cycles=C rand4k=N cycles=C      (reads=, rand=)
 *   virtio-blk: bench write64k=N cycles=C                      (writes=)
 *   virtio-blk: bench randw4k=N cycles=C                       (randw=)
 * The checksum is FNV-1a 32 over the bytes.
 */
#include "guest.h"

/* 32 requests of three descriptors in flight */
#define QSZ 128
#include "lib/virtio_pci.h"


#define VIRTIO_BLK_F_FLUSH 9
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

static struct vring rq;
static struct { uint32_t type, reserved; uint64_t sector; } hdr;
static volatile uint8_t status;
static uint8_t wbuf_space[65536 + 4096] __attribute__((aligned(4096)));
static uint8_t rbuf_space[65536 + 4096] __attribute__((aligned(4096)));
static uint8_t *wbuf = wbuf_space, *rbuf = rbuf_space;
#define BUF_BYTES 65536u
/* misalign=: the data of one request in two descriptors split at this byte (0: one) */
static uint32_t split_at;
static struct vdev blk;

static int blk_request(uint32_t type, uint64_t sector, void *buf, uint32_t len, int device_writes)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status = 0xff;
    int n = 0;
    rq.desc[n] = (struct vq_desc){(uintptr_t)&hdr, sizeof(hdr), 1, (uint16_t)(n + 1)};
    n++;
    if (len) {
        uint16_t flags = (uint16_t)(1 | (device_writes ? 2 : 0));
        uint32_t first = split_at && split_at < len ? split_at : len;
        rq.desc[n] = (struct vq_desc){(uintptr_t)buf, first, flags, (uint16_t)(n + 1)};
        n++;
        if (first < len) {
            rq.desc[n] = (struct vq_desc){(uintptr_t)buf + first, len - first, flags, (uint16_t)(n + 1)};
            n++;
        }
    }
    rq.desc[n] = (struct vq_desc){(uintptr_t)&status, 1, 2, 0};
    vq_submit(&rq, 0);
    uint32_t id;
    if (vq_wait(&blk, &rq, &id) < 0)
        return -1;
    if (id != 0 || status != 0) {
        printf("virtio-blk: request type %u sector %lu failed: id %u status %u\n", type, sector, id, status);
        return -1;
    }
    return 0;
}

#define DEPTH_MAX 32
static struct { uint32_t type, reserved; uint64_t sector; } slot_hdr[DEPTH_MAX];
static volatile uint8_t slot_status[DEPTH_MAX];
static uint8_t slot_buf[DEPTH_MAX][4096] __attribute__((aligned(4096)));

/* A 4 KiB request of type (T_IN or T_OUT) in slot s (descriptors 3s..3s+2, head
 * 3s), published and kicked. */
static void submit_slot(int s, uint32_t type, uint64_t sector)
{
    slot_hdr[s].type = type;
    slot_hdr[s].reserved = 0;
    slot_hdr[s].sector = sector;
    slot_status[s] = 0xff;
    uint16_t d = (uint16_t)(3 * s);
    uint16_t data_flags = (uint16_t)(1 | (type == T_IN ? 2 : 0));
    rq.desc[d] = (struct vq_desc){(uintptr_t)&slot_hdr[s], sizeof(slot_hdr[s]), 1, (uint16_t)(d + 1)};
    rq.desc[d + 1] = (struct vq_desc){(uintptr_t)slot_buf[s], 4096, data_flags, (uint16_t)(d + 2)};
    rq.desc[d + 2] = (struct vq_desc){(uintptr_t)&slot_status[s], 1, 2, 0};
    vq_submit(&rq, d);
}

/* n random 4 KiB requests of one type, depth of them in flight: each completion
 * submits the next. */
static int random_in_flight(uint32_t type, uint64_t n, int depth, uint64_t capacity)
{
    uint64_t x = 88172645463325252ull ^ type, submitted = 0, done = 0;
    for (int s = 0; s < depth && submitted < n; s++, submitted++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        submit_slot(s, type, (x % (capacity / 8)) * 8);
    }
    while (done < n) {
        uint32_t id;
        if (vq_wait(&blk, &rq, &id) < 0)
            return -1;
        int s = (int)(id / 3);
        if (id % 3 || s >= depth || slot_status[s] != 0) {
            printf("virtio-blk: in-flight request type %u id %u failed: status %u\n", type, id,
                   s < depth ? slot_status[s] : 0xff);
            return -1;
        }
        done++;
        if (submitted < n) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            submit_slot(s, type, (x % (capacity / 8)) * 8);
            submitted++;
        }
    }
    return 0;
}

int guest_main(const struct hvm_start_info *si)
{
    uint64_t sector = cmdline_get_u64("sector", 2048);
    uint64_t bytes = cmdline_get_u64("bytes", 32768);
    uint64_t reads = cmdline_get_u64("reads", 0);
    uint64_t rand_reads = cmdline_get_u64("rand", 0);
    uint64_t writes = cmdline_get_u64("writes", 0);
    uint64_t rand_writes = cmdline_get_u64("randw", 0);
    uint64_t depth = cmdline_get_u64("qd", cmdline_get_u64("depth", 1));
    if (depth < 1 || depth > DEPTH_MAX) {
        puts("virtio-blk: bad qd=");
        return 1;
    }
    uint64_t misalign = cmdline_get_u64("misalign", 0);
    if (bytes == 0 || bytes % 512 || bytes > BUF_BYTES) {
        puts("virtio-blk: bad bytes=");
        return 1;
    }
    if (misalign >= 4096) {
        puts("virtio-blk: bad misalign=");
        return 1;
    }
    if (misalign) {
        wbuf = wbuf_space + misalign;
        rbuf = rbuf_space + misalign;
        split_at = (uint32_t)(bytes / 2 + misalign % 512);
    }
    if (virtio_find(0x1042, &blk) < 0) {
        puts("virtio-blk: no modern virtio-blk device found");
        return 1;
    }
    printf("virtio-blk: found at 00:%02x.0\n", blk.slot);
    uint64_t features;
    if (virtio_negotiate(&blk, 1ull << VIRTIO_BLK_F_FLUSH, &features) < 0 || virtio_queue(&blk, 0, &rq) < 0)
        return 1;
    w8(blk.common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    uint64_t capacity = r32(blk.device) | (uint64_t)r32(blk.device + 4) << 32;
    printf("virtio-blk: capacity %lu sectors\n", capacity);
    if (sector + bytes / 512 > capacity) {
        puts("virtio-blk: disk too small for the pattern");
        return 1;
    }

    char serial[21];
    memset(serial, 0, sizeof(serial));
    if (blk_request(T_GET_ID, 0, serial, 20, 1) < 0)
        return 1;
    printf("virtio-blk: serial %s\n", serial);

    if (blk_request(T_IN, 0, rbuf, 512, 1) < 0)
        return 1;
    char head[17];
    for (int i = 0; i < 16; i++)
        head[i] = rbuf[i] >= 0x20 && rbuf[i] < 0x7f ? (char)rbuf[i] : '.';
    head[16] = 0;
    printf("virtio-blk: sector0 %s\n", head);
    printf("virtio-blk: sector0 checksum 0x%08x\n", fnv1a(rbuf, 512));

    for (uint64_t i = 0; i < bytes; i++)
        wbuf[i] = (uint8_t)((i * 13 + 7) ^ (i >> 9));
    if (cmdline_get_u64("qcow2magic", 0))   /* a hostile guest planting a qcow2 header */
        memcpy(wbuf, "QFI\xfb", 4);
    if (cmdline_get_u64("waitkey", 0)) {
        puts("virtio-blk: waiting for a key");
        while (serial_getc_nowait() < 0)
            cpu_relax();
    }
    if (blk_request(T_OUT, sector, wbuf, (uint32_t)bytes, 0) < 0)
        return 1;
    printf("virtio-blk: wrote %lu bytes at sector %lu checksum 0x%08x\n", bytes, sector, fnv1a(wbuf, bytes));
    if (features >> VIRTIO_BLK_F_FLUSH & 1) {
        if (blk_request(T_FLUSH, 0, 0, 0, 0) < 0)
            return 1;
        puts("virtio-blk: flushed");
    }
    memset(rbuf, 0, BUF_BYTES);
    if (blk_request(T_IN, sector, rbuf, (uint32_t)bytes, 1) < 0)
        return 1;
    printf("virtio-blk: read back checksum 0x%08x\n", fnv1a(rbuf, bytes));
    if (memcmp(rbuf, wbuf, bytes) != 0) {
        puts("virtio-blk: pattern MISMATCH");
        return 1;
    }
    puts("virtio-blk: pattern ok");

    if (reads || rand_reads) {
        uint64_t span = capacity - capacity % 128;
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; i < reads; i++)
            if (blk_request(T_IN, (i * 128) % span, rbuf, 65536, 1) < 0)
                return 1;
        uint64_t t1 = rdtsc();
        uint64_t x = 88172645463325252ull;
        if (depth > 1) {
            if (random_in_flight(T_IN, rand_reads, (int)depth, capacity) < 0)
                return 1;
        } else {
            for (uint64_t i = 0; i < rand_reads; i++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                if (blk_request(T_IN, (x % (capacity / 8)) * 8, rbuf, 4096, 1) < 0)
                    return 1;
            }
        }
        uint64_t t2 = rdtsc();
        printf("virtio-blk: bench seq64k=%lu cycles=%lu rand4k=%lu cycles=%lu\n", reads, t1 - t0, rand_reads, t2 - t1);
    }
    if (writes) {
        uint64_t span = capacity - capacity % 128;
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; i < writes; i++)
            if (blk_request(T_OUT, (i * 128) % span, wbuf, 65536, 0) < 0)
                return 1;
        printf("virtio-blk: bench write64k=%lu cycles=%lu\n", writes, rdtsc() - t0);
    }
    if (rand_writes) {
        for (int s = 0; s < DEPTH_MAX; s++)
            for (int i = 0; i < 4096; i++)
                slot_buf[s][i] = (uint8_t)(i * 31 + s);
        uint64_t t0 = rdtsc();
        if (random_in_flight(T_OUT, rand_writes, (int)depth, capacity) < 0)
            return 1;
        printf("virtio-blk: bench randw4k=%lu cycles=%lu\n", rand_writes, rdtsc() - t0);
    }
    return 0;
}
