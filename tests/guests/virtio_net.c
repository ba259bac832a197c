/*
 * virtio-net guest driver: finds the modern virtio-net PCI function through
 * configuration mechanism #1, sets up the RX and TX queues used by polling,
 * sends frames of EtherType 0x88B5 to the broadcast address and prints the
 * answers the other side (a test's packet socket on the bridge) sends back.
 *
 * cmdline: count=N (3) ping frames; flood=N (0) extra frames sent as fast as
 * possible afterwards (benchmark); rxflood=N (0) then asks the other side for a
 * stream of frames ("kvmpy-net-rxflood"), counts N of them ("kvmpy-net-fill")
 * and tells it to stop ("kvmpy-net-rxdone") (benchmark); msix=1 turns MSI-X on with
 * no vector for the queues, as a polling driver on a modern system would: no
 * interrupt at all (without it, INTx is raised and never read).
 * Prints:
 *   virtio-net: found at 00:SS.0
 *   virtio-net: mac xx:xx:xx:xx:xx:xx link up|down
 *   virtio-net: tx kvmpy-net-ping-<i>           (per frame)
 *   virtio-net: rx <payload of the answer>      (per answer)
 *   virtio-net: N echoes ok
 *   virtio-net: flood N frames cycles C         (with flood=)
 *   virtio-net: rxflood N frames cycles C       (with rxflood=)
 */
#include "guest.h"

#include "lib/virtio_pci.h"


#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_STATUS 16
#define ETH_TYPE 0x88b5
#define HDR_LEN 12
#define BUF_LEN 2048

static struct vring rxq, txq;
static uint8_t rxbuf[QSZ][BUF_LEN] __attribute__((aligned(4096)));
static uint8_t txbuf[QSZ][BUF_LEN] __attribute__((aligned(4096)));
static struct vdev net;
static uint8_t mac[6];
static uint16_t tx_next;

static void rx_post(uint16_t id)
{
    rxq.desc[id] = (struct vq_desc){(uintptr_t)rxbuf[id], BUF_LEN, 2, 0};
    rxq.avail.ring[rxq.avail.idx % QSZ] = id;
    barrier();
    *(volatile uint16_t *)&rxq.avail.idx = rxq.avail.idx + 1;
}

/* The next used entry, spinning on memory only: an MMIO read per turn would be
 * an exit to the VMM per turn, and the floods would measure exits, not frames.
 * The status register is looked at once in a while for NEEDS_RESET. */
static int64_t vq_wait_quiet(struct vring *vr, uint32_t *id)
{
    uint64_t start = rdtsc();
    for (uint32_t spins = 1; *(volatile uint16_t *)&vr->used.idx == vr->last_used; spins++) {
        if (!(spins & 0xFFFFF)) {
            if (r8(net.common + C_STATUS) & S_NEEDS_RESET) {
                /* The driver's own cursors beside the VMM's error line: whether it
                 * ran ahead of the used idx it read, or read one that went back. */
                printf("virtio: device needs reset (queue %u: avail idx %u, used idx %u, last used %u)\n",
                       vr->index, *(volatile uint16_t *)&vr->avail.idx, *(volatile uint16_t *)&vr->used.idx,
                       vr->last_used);
                return -1;
            }
            if (rdtsc() - start > 50000000000ull) {
                puts("virtio: timeout waiting for the device");
                return -1;
            }
        }
        cpu_relax();
    }
    barrier();
    uint16_t slot = vr->last_used % QSZ;
    vr->last_used++;
    if (id)
        *id = vr->used.ring[slot].id;
    return vr->used.ring[slot].len;
}

/* Make head available and kick, unless the device said (used.flags NO_NOTIFY) it
 * is working through the ring anyway, as Linux's driver does. */
static void submit(struct vring *vr, uint16_t head)
{
    vr->avail.ring[vr->avail.idx % QSZ] = head;
    barrier();
    *(volatile uint16_t *)&vr->avail.idx = vr->avail.idx + 1;
    __sync_synchronize();       /* the index out before the flags are read */
    if (!(*(volatile uint16_t *)&vr->used.flags & 1))
        w16(vr->notify, vr->index);
}

static int tx_frame(const char *payload, int wait)
{
    while ((uint16_t)(txq.avail.idx - txq.last_used) >= QSZ)   /* ring full: reclaim one */
        if (vq_wait_quiet(&txq, 0) < 0)
            return -1;
    uint16_t id = tx_next++ % QSZ;
    uint8_t *b = txbuf[id];
    memset(b, 0, HDR_LEN);
    uint8_t *f = b + HDR_LEN;
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETH_TYPE >> 8;
    f[13] = ETH_TYPE & 0xff;
    size_t n = strlen(payload);
    memcpy(f + 14, payload, n + 1);
    size_t len = 14 + n + 1;
    if (len < 60)
        len = 60;
    txq.desc[id] = (struct vq_desc){(uintptr_t)b, (uint32_t)(HDR_LEN + len), 0, 0};
    submit(&txq, id);
    if (wait)
        return vq_wait_quiet(&txq, 0) < 0 ? -1 : 0;
    return 0;
}

/* MSI-X on (capability 0x11, message control bit 15); the queues keep NO_VECTOR. */
static void msix_on(int slot)
{
    for (int ptr = pci_read8(slot, 0x34), guard = 0; ptr && guard++ < 48; ptr = pci_read8(slot, ptr + 1)) {
        if (pci_read8(slot, ptr) == 0x11) {
            uint32_t v = pci_read32(slot, ptr);
            pci_write32(slot, ptr, v | 1u << 31);
            return;
        }
    }
}

static int is_payload(uint32_t id, int64_t len, const char *payload)
{
    uint8_t *f = rxbuf[id] + HDR_LEN;
    size_t n = strlen(payload);
    return len >= (int64_t)(HDR_LEN + 14 + n) && f[12] == (ETH_TYPE >> 8) && f[13] == (ETH_TYPE & 0xff)
           && !memcmp(f + 14, payload, n);
}

/* Next received frame of our EtherType; copies its payload string to out. */
static int rx_frame(char *out, size_t size)
{
    for (int tries = 0; tries < 64; tries++) {
        uint32_t id;
        int64_t len = vq_wait(&net, &rxq, &id);
        if (len < 0 || id >= QSZ)
            return -1;
        uint8_t *f = rxbuf[id] + HDR_LEN;
        int ours = len >= HDR_LEN + 14 && f[12] == (ETH_TYPE >> 8) && f[13] == (ETH_TYPE & 0xff);
        if (ours) {
            size_t n = 0;
            while (n + 1 < size && 14 + n < (size_t)len - HDR_LEN && f[14 + n])
                out[n] = (char)f[14 + n], n++;
            out[n] = 0;
        }
        rx_post((uint16_t)id);
        w16(rxq.notify, rxq.index);
        if (ours)
            return 0;
    }
    return -1;
}

static void fmt_num(char *p, unsigned v)
{
    char tmp[12];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10); while (v /= 10);
    while (n) *p++ = tmp[--n];
    *p = 0;
}

int guest_main(const struct hvm_start_info *si)
{
    uint64_t count = cmdline_get_u64("count", 3);
    uint64_t flood = cmdline_get_u64("flood", 0);
    uint64_t rxflood = cmdline_get_u64("rxflood", 0);
    uint64_t msix = cmdline_get_u64("msix", 0);
    if (virtio_find(0x1041, &net) < 0) {
        puts("virtio-net: no modern virtio-net device found");
        return 1;
    }
    printf("virtio-net: found at 00:%02x.0\n", net.slot);
    if (msix)
        msix_on(net.slot);
    uint64_t features;
    if (virtio_negotiate(&net, 1ull << VIRTIO_NET_F_MAC | 1ull << VIRTIO_NET_F_STATUS, &features) < 0)
        return 1;
    if (virtio_queue(&net, 0, &rxq) < 0 || virtio_queue(&net, 1, &txq) < 0)
        return 1;
    for (uint16_t i = 0; i < QSZ; i++)
        rx_post(i);
    w8(net.common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    w16(rxq.notify, rxq.index);

    for (int i = 0; i < 6; i++)
        mac[i] = features >> VIRTIO_NET_F_MAC & 1 ? r8(net.device + i) : (uint8_t)(i == 0 ? 0x52 : i);
    uint16_t st = features >> VIRTIO_NET_F_STATUS & 1 ? r16(net.device + 6) : 1;
    printf("virtio-net: mac %02x:%02x:%02x:%02x:%02x:%02x link %s\n", mac[0], mac[1], mac[2], mac[3], mac[4],
           mac[5], st & 1 ? "up" : "down");

    char msg[64], reply[128];
    for (uint64_t i = 0; i < count; i++) {
        memcpy(msg, "kvmpy-net-ping-", 15);
        fmt_num(msg + 15, (unsigned)i);
        if (tx_frame(msg, 1) < 0)
            return 1;
        printf("virtio-net: tx %s\n", msg);
        if (rx_frame(reply, sizeof(reply)) < 0) {
            puts("virtio-net: no answer");
            return 1;
        }
        printf("virtio-net: rx %s\n", reply);
    }
    printf("virtio-net: %lu echoes ok\n", count);

    if (flood) {
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; i < flood; i++)
            if (tx_frame("kvmpy-net-flood", 0) < 0)
                return 1;
        while (txq.last_used != txq.avail.idx)
            if (vq_wait_quiet(&txq, 0) < 0)
                return 1;
        printf("virtio-net: flood %lu frames cycles %lu\n", flood, rdtsc() - t0);
    }

    if (rxflood) {
        if (tx_frame("kvmpy-net-rxflood", 1) < 0)
            return 1;
        uint64_t t0 = rdtsc(), got = 0;
        while (got < rxflood) {
            uint32_t id;
            int64_t len = vq_wait_quiet(&rxq, &id);
            if (len < 0 || id >= QSZ)
                return 1;
            got += is_payload(id, len, "kvmpy-net-fill");
            rx_post((uint16_t)id);
            /* One kick per few buffers, and before waiting for more. */
            __sync_synchronize();
            if ((!(rxq.avail.idx % 4) || *(volatile uint16_t *)&rxq.used.idx == rxq.last_used)
                && !(*(volatile uint16_t *)&rxq.used.flags & 1))
                w16(rxq.notify, rxq.index);
        }
        uint64_t cycles = rdtsc() - t0;
        if (tx_frame("kvmpy-net-rxdone", 1) < 0)
            return 1;
        printf("virtio-net: rxflood %lu frames cycles %lu\n", rxflood, cycles);
    }
    return 0;
}
