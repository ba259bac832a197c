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
/* The largest request an O_DIRECT queue bounces; a larger one with unaligned
 * buffers is the model's. */
#define DP_BOUNCE_MAX (4u << 20)


/* why the thread ended */
#define DP_EXIT_RUNNING 0
#define DP_EXIT_STOPPED 1       /* dp_stop asked */
#define DP_EXIT_HANDBACK 2      /* a request (at next_avail) the model must see */

/* The qcow2 cluster map: guest cluster -> host offset of the data clusters the
 * Python driver (kvmpy/block/qcow2.py) has said reads and writes may reach in
 * place. Filled by Python, emptied by Python whenever the driver changes a
 * mapping; a cluster not in it is a request for the model. Direct-mapped: a
 * colliding cluster replaces the older one, which then misses. */
#define DP_MAP_ENTRIES 65536u

struct dp_map;

/* An io_uring for one queue's thread (liburing). Made, restricted to the
 * operations below and enabled before the VMM's seccomp filter closes (which
 * refuses io_uring_setup and io_uring_register; see kvmpy/sandbox.py): the reads
 * and writes of a batch go to it together. Without one, reads the page cache
 * cannot answer go to worker threads and writes run on the queue's thread. */
#define DP_RING_ENTRIES 64

struct dp_ring;

/* An iothread (QEMU's -object iothread): one thread serving the queues of every
 * disk that names it, in turn, instead of a thread per queue. */
#define DP_IOTHREAD_QUEUES 64

struct dp_iothread;


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
    int flush_ignored;             /* cache=unsafe: FLUSH answers OK at once */
    /* fd is O_DIRECT (cache=none, directsync): file offsets and lengths must be
     * multiples of direct_align, buffers of direct_mem_align. A request whose
     * buffers are not goes through the queue's bounce buffer; one whose offset or
     * length is not (a read-modify-write) is the model's. 0: the page cache. */
    uint32_t direct_align, direct_mem_align;
    struct dp_map *map;            /* qcow2: the cluster map (NULL: fd is the raw disk itself) */
    struct dp_ring *ring;          /* NULL: preadv workers */
    struct dp_iothread *iothread;  /* NULL: a thread of its own */
    uint8_t serial[DP_SERIAL_BYTES];
    int kick_fd;                   /* the queue's doorbell eventfd */
    int call_fd;                   /* written when the driver wants an interrupt */
    /* INTx (the transport raises a level when call_fd is written): the line's
     * state, shared with the transport; NULL for a vector. Set here with the
     * call_fd write, cleared by the guest's ISR read: while it is set, an
     * interrupt is on its way or up, and the driver's ISR read still to come
     * finds every used entry published before, so another write would only wake
     * the event loop for a level that is already up (QEMU's pci_set_irq skips
     * an unchanged level the same way). */
    int *intx_pending;
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
    uint64_t ring_ops;             /* of them, reads and writes done through its io_uring */
    uint64_t ring_enters;          /* io_uring_enter calls (submissions and waits) */
    uint64_t interrupts;           /* call_fd writes */
    uint64_t interrupts_coalesced; /* interrupts the driver wanted that an INTx level already up covered */
};

struct dp_queue;

struct dp_queue *dp_start(const struct dp_config *cfg, int *err);
void dp_stop(struct dp_queue *q, struct dp_indices *out);
struct dp_iothread *dp_iothread_new(int *err);
void dp_iothread_free(struct dp_iothread *io);
int dp_iothread_tid(const struct dp_iothread *io);      /* its kernel thread id */
struct dp_ring *dp_ring_new(int *err);
void dp_ring_free(struct dp_ring *r);

struct dp_map *dp_map_new(uint32_t cluster_bits);
void dp_map_free(struct dp_map *m);
int dp_map_set(struct dp_map *m, uint64_t generation, const uint64_t *clusters, const uint64_t *hosts, int n);
void dp_map_invalidate(struct dp_map *m, uint64_t generation);
int dp_map_get(struct dp_map *m, uint64_t cluster, uint64_t *host);

#endif
