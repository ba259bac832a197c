/* The split virtqueue as both native data planes (blk_dataplane.c, net_dataplane.c)
 * see it: guest RAM regions, the chain walker with queue.py's checks, and the
 * device side of one ring (used entries, EVENT_IDX, notifications).
 * tests/test_dataplane_walker.py holds dp_walk_chain to SplitQueue._read_chain. */
#ifndef KVMPY_VRING_H
#define KVMPY_VRING_H

#include <stdint.h>

#define DP_MAX_REGIONS 16

/* dp_walk_chain's answers */
#define DP_WALK_OK 0
#define DP_WALK_BAD (-1)        /* the Python queue raises QueueError for this chain */
#define DP_WALK_TOO_LONG (-2)   /* valid or not, too many segments to judge here */

struct dp_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct dp_seg { uint64_t gpa; uint32_t len; uint32_t writable; };

/* The host address of guest range [gpa, gpa+len) when it lies inside one RAM
 * region (GuestMemory.view's rule), else NULL. */
uint8_t *dp_gpa_to_host(const struct dp_region *regions, int nregions, uint64_t gpa, uint64_t len);

int dp_walk_chain(const struct dp_region *regions, int nregions, uint64_t desc_addr, uint32_t size,
                  int indirect, uint16_t head, struct dp_seg *segs, int max_segs, int *nsegs);

/* Whether the driver asked for an interrupt when used idx moved from old_idx to
 * new_idx past event_idx (the virtio spec's vring_need_event). */
static inline int dp_vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* One ring's device side, owned by one thread while it runs. */
struct dp_vring {
    const struct dp_region *regions;
    int nregions;
    uint32_t size;
    uint64_t desc_addr;
    int event_idx, indirect;
    uint8_t *avail, *used;
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    int call_fd;                   /* -1: the driver takes no interrupt for this ring (no vector) */
};

/* Maps the ring's parts; -1 when one lies outside guest RAM or is misaligned. */
int dp_vring_map(struct dp_vring *r, uint64_t avail_addr, uint64_t used_addr);
uint16_t dp_vring_avail_idx(const struct dp_vring *r);
uint16_t dp_vring_head(const struct dp_vring *r, uint16_t ring_pos);
/* Writes the used element for the entry next_used + offset (not published yet). */
void dp_vring_put_used(struct dp_vring *r, uint16_t offset, uint16_t head, uint32_t len);
/* Publishes count elements put since the last publish. */
void dp_vring_publish(struct dp_vring *r, uint16_t count);
/* Writes call_fd if the driver wants an interrupt for what was published. */
void dp_vring_signal(struct dp_vring *r);
/* While the device works through a ring it needs no kicks: without EVENT_IDX it
 * says so in used.flags (with it, avail_event left behind says so already). */
void dp_vring_disable_notification(struct dp_vring *r);
/* Asks for the driver's next kick; returns whether buffers already wait. */
int dp_vring_enable_notification(struct dp_vring *r);

#endif
