/* The split ring walker and the device side of a ring, shared by the native data
 * planes. The checks mirror kvmpy/devices/virtio/queue.py SplitQueue._read_chain
 * one for one (tests/test_dataplane_walker.py holds the two to the same answers). */
#define _GNU_SOURCE
#include "vring.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define MAX_QUEUE_SIZE 32768u
#define MAX_CHAIN_BYTES 0xFFFFFFFFull

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

uint8_t *dp_gpa_to_host(const struct dp_region *regions, int nregions, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < nregions; i++) {
        const struct dp_region *r = &regions[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

/* The guest may rewrite a descriptor while we read it: copy it once, use the copy. */
static void read_desc(const uint8_t *table, uint32_t index, struct desc *d)
{
    memcpy(d, table + 16u * index, sizeof *d);
}

int dp_walk_chain(const struct dp_region *regions, int nregions, uint64_t desc_addr, uint32_t size,
                  int indirect, uint16_t head, struct dp_seg *segs, int max_segs, int *nsegs)
{
    const uint8_t *table = dp_gpa_to_host(regions, nregions, desc_addr, 16ull * size);
    uint32_t table_len = size, index = head, steps = 0;
    int in_indirect = 0, have_writable = 0, n = 0;
    uint64_t total = 0;
    *nsegs = 0;
    if (!table || head >= size)
        return DP_WALK_BAD;
    for (;;) {
        struct desc d;
        if (++steps > table_len)
            return DP_WALK_BAD;                      /* a loop */
        read_desc(table, index, &d);
        if (d.flags & DESC_F_INDIRECT) {
            if (in_indirect || !indirect || (d.flags & DESC_F_NEXT))
                return DP_WALK_BAD;
            if (d.len == 0 || d.len % 16 || d.len / 16 > MAX_QUEUE_SIZE)
                return DP_WALK_BAD;
            table = dp_gpa_to_host(regions, nregions, d.addr, d.len);
            if (!table)
                return DP_WALK_BAD;
            table_len = d.len / 16;
            index = 0;
            steps = 0;
            in_indirect = 1;
            continue;
        }
        /* Any writable descriptor, an empty one too, ends the readable part. */
        if (d.flags & DESC_F_WRITE)
            have_writable = 1;
        else if (have_writable)
            return DP_WALK_BAD;                      /* readable after writable */
        if (d.len) {
            total += d.len;
            if (total > MAX_CHAIN_BYTES)
                return DP_WALK_BAD;
            if (!dp_gpa_to_host(regions, nregions, d.addr, d.len))
                return DP_WALK_BAD;
            if (n == max_segs)
                return DP_WALK_TOO_LONG;
            segs[n].gpa = d.addr;
            segs[n].len = d.len;
            segs[n].writable = !!(d.flags & DESC_F_WRITE);
            n++;
            *nsegs = n;
        }
        if (!(d.flags & DESC_F_NEXT))
            return DP_WALK_OK;
        if (d.next >= table_len)
            return DP_WALK_BAD;
        index = d.next;
    }
}

/* ---- the ring, device side ---------------------------------------------------- */

int dp_vring_map(struct dp_vring *r, uint64_t avail_addr, uint64_t used_addr)
{
    uint32_t size = r->size;
    if (size == 0 || size > MAX_QUEUE_SIZE || (size & (size - 1)))
        return -1;
    r->avail = dp_gpa_to_host(r->regions, r->nregions, avail_addr, 4 + 2ull * size + 2);
    r->used = dp_gpa_to_host(r->regions, r->nregions, used_addr, 4 + 8ull * size + 2);
    if (!dp_gpa_to_host(r->regions, r->nregions, r->desc_addr, 16ull * size) || !r->avail || !r->used
        || r->desc_addr % 16 || avail_addr % 2 || used_addr % 4)
        return -1;
    return 0;
}

uint16_t dp_vring_avail_idx(const struct dp_vring *r)
{
    return __atomic_load_n((uint16_t *)(r->avail + 2), __ATOMIC_ACQUIRE);
}

uint16_t dp_vring_head(const struct dp_vring *r, uint16_t ring_pos)
{
    return __atomic_load_n((uint16_t *)(r->avail + 4 + 2u * (ring_pos % r->size)), __ATOMIC_RELAXED);
}

void dp_vring_put_used(struct dp_vring *r, uint16_t offset, uint16_t head, uint32_t len)
{
    uint8_t *elem = r->used + 4 + 8u * ((uint16_t)(r->next_used + offset) % r->size);
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &len, 4);
}

void dp_vring_publish(struct dp_vring *r, uint16_t count)
{
    r->next_used += count;
    /* The elements must be visible before the index that publishes them. */
    __atomic_store_n((uint16_t *)(r->used + 2), r->next_used, __ATOMIC_RELEASE);
}

/* SplitQueue.needs_notification, after a full barrier: the driver's used_event
 * (or NO_INTERRUPT) written after it saw our older used idx must be read here. */
void dp_vring_signal(struct dp_vring *r)
{
    uint16_t old = r->signalled_used, new_idx = r->next_used;
    int valid = r->signalled_valid, want;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    r->signalled_used = new_idx;
    r->signalled_valid = 1;
    if (r->event_idx) {
        uint16_t used_event = __atomic_load_n((uint16_t *)(r->avail + 4 + 2u * r->size), __ATOMIC_RELAXED);
        want = !valid || dp_vring_need_event(used_event, new_idx, old);
    } else {
        want = !(__atomic_load_n((uint16_t *)r->avail, __ATOMIC_RELAXED) & AVAIL_F_NO_INTERRUPT);
    }
    if (want && r->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t w;
        do w = write(r->call_fd, &one, 8); while (w < 0 && errno == EINTR);
    }
}

void dp_vring_disable_notification(struct dp_vring *r)
{
    if (!r->event_idx) {
        uint16_t *flags = (uint16_t *)r->used;
        uint16_t f = __atomic_load_n(flags, __ATOMIC_RELAXED);
        if (!(f & USED_F_NO_NOTIFY))
            __atomic_store_n(flags, f | USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
    }
}

/* SplitQueue.set_notification(True). */
int dp_vring_enable_notification(struct dp_vring *r)
{
    if (r->event_idx) {
        __atomic_store_n((uint16_t *)(r->used + 4 + 8u * r->size), r->next_avail, __ATOMIC_RELAXED);
    } else {
        uint16_t *flags = (uint16_t *)r->used;
        uint16_t f = __atomic_load_n(flags, __ATOMIC_RELAXED);
        if (f & USED_F_NO_NOTIFY)
            __atomic_store_n(flags, f & ~USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return dp_vring_avail_idx(r) != r->next_avail;
}
