/* The virtio-blk data plane: one native thread per virtqueue (and, once a read
 * misses the page cache, four workers for such reads), no Python on its path.
 *
 * The Python device model (kvmpy/devices/virtio/blk.py) stays the control plane:
 * it negotiates, answers everything unusual and owns the error policy. This thread
 * serves only the requests whose answer cannot differ from the model's (a read or
 * write inside the disk, a flush, GET_ID, a well-formed DISCARD or WRITE_ZEROES)
 * and hands the queue back, at a request
 * boundary, for anything else. Declarations shared with the cffi build
 * (kvmpy/devices/virtio/_dataplane_build.py). */
#ifndef KVMPY_BLK_DATAPLANE_H
#define KVMPY_BLK_DATAPLANE_H

#include <stdint.h>

#include "vring.h"

/* Segments of one chain the walker keeps; a longer chain goes to Python, which
 * answers it (more data segments than preadv takes is an IOERR there). */
#define DP_MAX_SEGS 4096
#define DP_SERIAL_BYTES 20
/* virtio-blk config limits the model offers (blk.py: max_discard_seg, max_discard_sectors) */
#define DP_MAX_DISCARD_SEG 32
#define DP_MAX_DISCARD_SECTORS 0x3FFFFFu


/* why the thread ended */
#define DP_EXIT_RUNNING 0
#define DP_EXIT_STOPPED 1       /* dp_stop asked */
#define DP_EXIT_HANDBACK 2      /* a request (at next_avail) the model must see */


struct dp_config {
    struct dp_region regions[DP_MAX_REGIONS];
    int nregions;
    uint32_t size;                 /* ring entries, a power of two */
    uint64_t desc_addr, avail_addr, used_addr;
    int event_idx, indirect;
    int fd;                        /* the raw image, open for reading (and writing unless read_only) */
    uint64_t capacity;             /* in 512-byte sectors */
    int read_only;
    int write_through;             /* no FLUSH negotiated: each write is made durable before its used entry */
    uint64_t guarded_bytes;        /* writes below this offset go to Python (probed raw's block-0 rule) */
    int discard;                   /* DISCARD and WRITE_ZEROES offered */
    uint8_t serial[DP_SERIAL_BYTES];
    int kick_fd;                   /* the queue's doorbell eventfd */
    int call_fd;                   /* written when the driver wants an interrupt */
    int handback_fd;               /* written when the thread hands the queue back */
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
};

struct dp_indices {
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    int exit_reason;
    uint64_t completed;            /* requests this thread answered */
    uint64_t deferred;             /* of them, reads its workers did (not in the page cache) */
};

struct dp_queue;

struct dp_queue *dp_start(const struct dp_config *cfg, int *err);
void dp_stop(struct dp_queue *q, struct dp_indices *out);

#endif
