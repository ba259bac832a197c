/* The virtio-net data plane for hosts without vhost-net: one native thread per
 * rx/tx queue pair moves frames between the tap and guest buffers, no Python on
 * the way.
 *
 * The Python model (kvmpy/devices/virtio/net.py) stays the control plane: it
 * negotiates, owns the control queue, the rx filter and every error. The thread
 * takes only chains whose handling cannot differ from the model's (all-readable tx
 * chains longer than the header, all-writable rx chains that hold it) and hands
 * the pair back, before consuming it, at the first chain it does not take. Its
 * Python side is kvmpy/devices/virtio/netplane.py (cffi: _netplane_build.py). */
#ifndef KVMPY_NET_DATAPLANE_H
#define KVMPY_NET_DATAPLANE_H

#include <stdint.h>

#include "vring.h"

/* Buffers of one frame, as net.py's IOV_MAX: a longer chain is the model's. */
#define NP_MAX_SEGS 1024
/* Frames per queue per wake-up before the other queue and the doorbells get a turn. */
#define NP_BATCH 64
/* rx chains one merged frame may span (MRG_RXBUF). */
#define NP_MAX_RX_CHAINS 256

#define NP_RX 0
#define NP_TX 1

/* why the thread ended */
#define NP_EXIT_RUNNING 0
#define NP_EXIT_STOPPED 1       /* np_stop asked */
#define NP_EXIT_HANDBACK 2      /* a chain (at handback_queue's next_avail) the model must see */

struct np_ring_config {
    uint32_t size;                 /* entries, a power of two */
    uint64_t desc_addr, avail_addr, used_addr;
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    int kick_fd;                   /* the queue's doorbell eventfd */
    int call_fd;                   /* written when the driver wants an interrupt; -1: it has none */
};

struct np_config {
    struct dp_region regions[DP_MAX_REGIONS];
    int nregions;
    int event_idx, indirect;
    struct np_ring_config rings[2];    /* NP_RX, NP_TX */
    int tap_fd;                        /* non-blocking, IFF_VNET_HDR with hdr_len */
    uint32_t hdr_len;                  /* 12 (VERSION_1 or MRG_RXBUF: num_buffers) or 10 */
    int mrg_rxbuf;                     /* a frame may fill several rx chains */
    uint32_t rx_frame_max;             /* header + the largest frame the tap may hand over */
    int handback_fd;                   /* written when the thread hands the pair back */
    int spin;                          /* wait briefly for the driver after work (another CPU can refill) */
};

struct np_ring_state {
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
};

struct np_result {
    struct np_ring_state rings[2];
    int exit_reason;
    int handback_queue;                /* NP_RX or NP_TX when exit_reason is NP_EXIT_HANDBACK */
    int tap_errno;                     /* the tap failed (not EAGAIN): the model's to log, and to keep */
    uint64_t rx_frames, tx_frames, rx_dropped, tx_dropped;
};

struct np_pair;

struct np_pair *np_start(const struct np_config *cfg, int *err);
void np_stop(struct np_pair *p, struct np_result *out);
/* The frame counters only (rx_frames..tx_dropped), while the thread runs. */
void np_counters(struct np_pair *p, struct np_result *out);

#endif
