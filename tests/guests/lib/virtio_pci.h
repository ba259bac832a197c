/*
 * A minimal modern virtio-pci driver for the test guests: PCI config mechanism #1,
 * capability walk to the common/notify/device config windows, feature negotiation,
 * one split queue of QSZ entries used by polling. Header-only: each guest that
 * includes it gets its own copy of the static state.
 */
#ifndef GUEST_VIRTIO_PCI_H
#define GUEST_VIRTIO_PCI_H
#include "guest.h"

#define PCI_CFG_ADDR 0xcf8
#define PCI_CFG_DATA 0xcfc

static __attribute__((unused)) uint32_t pci_read32(int slot, int reg)
{
    outl(PCI_CFG_ADDR, 0x80000000u | (uint32_t)slot << 11 | (reg & 0xfc));
    return inl(PCI_CFG_DATA);
}

static __attribute__((unused)) void pci_write32(int slot, int reg, uint32_t v)
{
    outl(PCI_CFG_ADDR, 0x80000000u | (uint32_t)slot << 11 | (reg & 0xfc));
    outl(PCI_CFG_DATA, v);
}

static __attribute__((unused)) uint8_t pci_read8(int slot, int reg) { return pci_read32(slot, reg) >> (8 * (reg & 3)); }

static inline void w8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void w16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void w32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline uint8_t r8(uintptr_t a) { return *(volatile uint8_t *)a; }
static inline uint16_t r16(uintptr_t a) { return *(volatile uint16_t *)a; }
static inline uint32_t r32(uintptr_t a) { return *(volatile uint32_t *)a; }

struct vdev {
    int slot;
    uintptr_t common, notify, isr, device;
    uint32_t notify_mult;
};

/* common cfg offsets */
#define C_DFSEL   0x00
#define C_DF      0x04
#define C_GFSEL   0x08
#define C_GF      0x0c
#define C_MSIX    0x10
#define C_NUMQ    0x12
#define C_STATUS  0x14
#define C_QSEL    0x16
#define C_QSIZE   0x18
#define C_QMSIX   0x1a
#define C_QENABLE 0x1c
#define C_QNOFF   0x1e
#define C_QDESC   0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

static __attribute__((unused)) uint64_t bar_address(int slot, int bar)
{
    uint32_t lo = pci_read32(slot, 0x10 + 4 * bar);
    if (lo & 1)
        return 0;                       /* I/O BAR: virtio structures live in memory BARs */
    uint64_t a = lo & ~0xfull;
    if ((lo & 6) == 4)
        a |= (uint64_t)pci_read32(slot, 0x14 + 4 * bar) << 32;
    if (a >= (4ull << 30)) {
        /* Firmware put it above 4 GiB: map the 2 MiB around it, uncached. */
        paging_map_2m(a & ~0x1fffffull, a & ~0x1fffffull, PTE_P | PTE_W | PTE_PCD | PTE_PWT);
        paging_flush();
    }
    return a;
}

static __attribute__((unused)) int virtio_find(uint16_t device_id, struct vdev *d)
{
    for (int slot = 0; slot < 32; slot++) {
        uint32_t id = pci_read32(slot, 0);
        if (id != (0x1af4u | (uint32_t)device_id << 16))
            continue;
        d->slot = slot;
        pci_write32(slot, 0x04, (pci_read32(slot, 0x04) & 0xffff) | 0x6);  /* memory + bus master */
        d->common = d->notify = d->isr = d->device = 0;
        int ptr = pci_read8(slot, 0x34), guard = 0;
        while (ptr && guard++ < 48) {
            if (pci_read8(slot, ptr) == 0x09) {
                int type = pci_read8(slot, ptr + 3), bar = pci_read8(slot, ptr + 4);
                uint32_t off = pci_read32(slot, ptr + 8);
                uintptr_t base = bar < 6 ? (uintptr_t)bar_address(slot, bar) : 0;
                if (base) {
                    if (type == 1 && !d->common) d->common = base + off;
                    if (type == 2 && !d->notify) {
                        d->notify = base + off;
                        d->notify_mult = pci_read32(slot, ptr + 16);
                    }
                    if (type == 3 && !d->isr) d->isr = base + off;
                    if (type == 4 && !d->device) d->device = base + off;
                }
            }
            ptr = pci_read8(slot, ptr + 1);
        }
        if (d->common && d->notify && d->isr && d->device)
            return slot;
        printf("virtio: device at slot %d lacks a capability\n", slot);
        return -1;
    }
    return -1;
}

/* Reset, ACK, DRIVER, negotiate (VERSION_1 | wanted) & offered, FEATURES_OK. */
static __attribute__((unused)) int virtio_negotiate(struct vdev *d, uint64_t wanted, uint64_t *got)
{
    w8(d->common + C_STATUS, 0);
    while (r8(d->common + C_STATUS) != 0)
        cpu_relax();
    w8(d->common + C_STATUS, S_ACK);
    w8(d->common + C_STATUS, S_ACK | S_DRIVER);
    w32(d->common + C_DFSEL, 0);
    uint64_t f = r32(d->common + C_DF);
    w32(d->common + C_DFSEL, 1);
    f |= (uint64_t)r32(d->common + C_DF) << 32;
    if (!(f >> 32 & 1)) {
        puts("virtio: device does not offer VIRTIO_F_VERSION_1");
        return -1;
    }
    f &= wanted | 1ull << 32;
    w32(d->common + C_GFSEL, 0);
    w32(d->common + C_GF, (uint32_t)f);
    w32(d->common + C_GFSEL, 1);
    w32(d->common + C_GF, (uint32_t)(f >> 32));
    w8(d->common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(r8(d->common + C_STATUS) & S_FEATURES_OK)) {
        puts("virtio: FEATURES_OK refused");
        return -1;
    }
    *got = f;
    return 0;
}

struct vq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
#ifndef QSZ          /* a guest that keeps many requests in flight asks for more */
#define QSZ 16
#endif
struct vring {
    struct vq_desc desc[QSZ];
    struct { uint16_t flags, idx, ring[QSZ], used_event; } avail __attribute__((aligned(2)));
    struct { uint16_t flags, idx; struct { uint32_t id, len; } ring[QSZ]; uint16_t avail_event; } used
        __attribute__((aligned(4096)));
    uint16_t last_used;
    uint16_t index;
    uintptr_t notify;
} __attribute__((aligned(4096)));

static __attribute__((unused)) int virtio_queue(struct vdev *d, int index, struct vring *vr)
{
    memset(vr, 0, sizeof(*vr));
    w16(d->common + C_QSEL, index);
    uint16_t max = r16(d->common + C_QSIZE);
    if (max < QSZ) {
        printf("virtio: queue %d has only %u entries\n", index, max);
        return -1;
    }
    w16(d->common + C_QSIZE, QSZ);
    w16(d->common + C_QMSIX, 0xffff);   /* polling: no vector */
    uint64_t a[3] = {(uintptr_t)vr->desc, (uintptr_t)&vr->avail, (uintptr_t)&vr->used};
    for (int i = 0; i < 3; i++) {
        w32(d->common + C_QDESC + 8 * i, (uint32_t)a[i]);
        w32(d->common + C_QDESC + 8 * i + 4, (uint32_t)(a[i] >> 32));
    }
    vr->notify = d->notify + (uintptr_t)r16(d->common + C_QNOFF) * d->notify_mult;
    vr->index = index;
    w16(d->common + C_QENABLE, 1);
    return 0;
}

/* Publish descriptor chain [head..] and ring the doorbell. */
static __attribute__((unused)) void vq_submit(struct vring *vr, uint16_t head)
{
    vr->avail.ring[vr->avail.idx % QSZ] = head;
    barrier();
    *(volatile uint16_t *)&vr->avail.idx = vr->avail.idx + 1;
    barrier();
    w16(vr->notify, vr->index);
}

/* Wait for the next used element; returns its length, -1 on timeout or device error. */
static __attribute__((unused)) int64_t vq_wait(struct vdev *d, struct vring *vr, uint32_t *id)
{
    uint64_t start = rdtsc();
    while (*(volatile uint16_t *)&vr->used.idx == vr->last_used) {
        if (r8(d->common + C_STATUS) & S_NEEDS_RESET) {
            puts("virtio: device needs reset");
            return -1;
        }
        if (rdtsc() - start > 50000000000ull) {
            puts("virtio: timeout waiting for the device");
            return -1;
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

static __attribute__((unused)) uint32_t fnv1a(const uint8_t *p, size_t n)
{
    uint32_t h = 0x811c9dc5u;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}


#endif
