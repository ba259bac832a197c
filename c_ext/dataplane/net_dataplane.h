/* The virtio-net data plane for hosts without vhost-net: one native thread per
 * rx/tx queue pair moves frames between the tap and guest buffers, no Python on
 * the way.
 *
 * The Python model (kvmpy/devices/virtio/net.py) stays the control plane: it
 * negotiates, owns the control queue (it sets the rx filter the thread applies,
 * struct np_filter) and every error. The thread takes only chains whose handling
 * cannot differ from the model's (all-readable tx chains longer than the header,
 * all-writable rx chains that hold it) and hands the pair back, before consuming
 * it, at the first chain it does not take, and with a merged frame too big for
 * the buffers there are (the model keeps it whole until there are more). Its
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

/* The guest's receive filter (the control queue's CTRL_RX, CTRL_MAC, CTRL_VLAN), as
 * net.py's RxFilter applies it: the thread drops what it refuses and counts it in
 * rx_filtered, so a filter change leaves the pair where it is. */
#define NP_MAC_TABLE 64
#define NP_VLANS 4096

struct np_filter {
    int promisc, allmulti, alluni, nomulti, nouni, nobcast;
    int unicast_overflow, multicast_overflow;
    int vlan_filtering;                /* CTRL_VLAN negotiated: tagged frames need their id listed */
    uint8_t own_mac[6];
    uint32_t n_unicast, n_multicast;   /* at most NP_MAC_TABLE each */
    uint8_t unicast[NP_MAC_TABLE][6], multicast[NP_MAC_TABLE][6];
    uint8_t vlans[NP_VLANS / 8];       /* bit v: VLAN id v is let through */
};

/* Whether a frame of len bytes starting with frame (its first 16 bytes suffice)
 * reaches the guest under f: RxFilter.accepts. */
int np_filter_accepts(const struct np_filter *f, const uint8_t *frame, uint32_t len);

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
    struct np_filter filter;           /* the receive filter at start (np_set_filter changes it) */
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
    uint64_t rx_filtered;              /* frames the receive filter kept from the guest */
    uint32_t waiting_len;              /* a merged frame too big for the rx buffers there were:
                                        * header and frame, handed back whole (np_stop's waiting) */
};

struct np_pair;

struct np_pair *np_start(const struct np_config *cfg, int *err);
/* Joins the thread; a frame it handed back whole goes into waiting (waiting_cap
 * bytes, rx_frame_max suffice). */
void np_stop(struct np_pair *p, struct np_result *out, uint8_t *waiting, uint32_t waiting_cap);
/* The frame counters only (rx_frames..rx_filtered), while the thread runs. */
void np_counters(struct np_pair *p, struct np_result *out);
/* A new receive filter: every frame the thread reads after this returns is judged by it. */
void np_set_filter(struct np_pair *p, const struct np_filter *f);

#endif
