"""cffi API-mode build of the virtio-net data plane (c_ext/dataplane/net_dataplane.c).

A module of its own beside the blk plane's (``_dataplane_cffi``), so the two
planes build and change apart; both compile the shared ring walker vring.c. Calls
into it release the GIL (cffi's default), so ``np_stop``'s join never holds up the VMM.
"""

import os

from cffi import FFI

_SRC = os.path.join("c_ext", "dataplane")

ffibuilder = FFI()

ffibuilder.cdef(r"""
#define DP_MAX_REGIONS ...
#define NP_MAX_SEGS ...
#define NP_BATCH ...
#define NP_RX ...
#define NP_TX ...
#define NP_EXIT_RUNNING ...
#define NP_EXIT_STOPPED ...
#define NP_EXIT_HANDBACK ...
#define DP_WALK_OK ...
#define DP_WALK_TOO_LONG ...

struct dp_region { uint64_t gpa; uint64_t size; uint8_t *host; ...; };
struct dp_seg { uint64_t gpa; uint32_t len; uint32_t writable; ...; };
int dp_walk_chain(const struct dp_region *regions, int nregions, uint64_t desc_addr, uint32_t size,
                  int indirect, uint16_t head, struct dp_seg *segs, int max_segs, int *nsegs);
#define NP_MAC_TABLE ...
struct np_filter {
    int promisc, allmulti, alluni, nomulti, nouni, nobcast;
    int unicast_overflow, multicast_overflow;
    int vlan_filtering;
    uint8_t own_mac[6];
    uint32_t n_unicast, n_multicast;
    uint8_t unicast[64][6], multicast[64][6];
    uint8_t vlans[512];
    ...;
};
int np_filter_accepts(const struct np_filter *f, const uint8_t *frame, uint32_t len);
struct np_ring_config {
    uint32_t size;
    uint64_t desc_addr, avail_addr, used_addr;
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    int kick_fd, call_fd;
    ...;
};
struct np_config {
    struct dp_region regions[16];
    int nregions;
    int event_idx, indirect;
    struct np_ring_config rings[2];
    int tap_fd;
    uint32_t hdr_len;
    int mrg_rxbuf;
    uint32_t rx_frame_max;
    int handback_fd;
    int spin;
    struct np_filter filter;
    ...;
};
struct np_ring_state {
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    ...;
};
struct np_result {
    struct np_ring_state rings[2];
    int exit_reason;
    int handback_queue;
    int tap_errno;
    uint64_t rx_frames, tx_frames, rx_dropped, tx_dropped;
    uint64_t rx_filtered;
    uint32_t waiting_len;
    ...;
};
struct np_pair;
struct np_pair *np_start(const struct np_config *cfg, int *err);
void np_stop(struct np_pair *p, struct np_result *out, uint8_t *waiting, uint32_t waiting_cap);
void np_counters(struct np_pair *p, struct np_result *out);
void np_set_filter(struct np_pair *p, const struct np_filter *f);
""")

ffibuilder.set_source(
    "kvmpy.devices.virtio._netplane_cffi",
    '#include "net_dataplane.h"\n'
    '_Static_assert(DP_MAX_REGIONS == 16, "the cdef above spells it out");\n'
    '_Static_assert(NP_MAC_TABLE == 64 && NP_VLANS == 4096, "the cdef above spells them out");\n',
    sources=[os.path.join(_SRC, "net_dataplane.c"), os.path.join(_SRC, "vring.c")],
    include_dirs=[_SRC, "c_ext"],
    depends=[os.path.join(_SRC, "net_dataplane.h"), os.path.join(_SRC, "vring.h"), os.path.join("c_ext", "thread_start.h")],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
