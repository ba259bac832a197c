"""cffi API-mode build of the virtio-blk data plane (c_ext/dataplane/).

A module of its own, beside the KVM bindings: device models may not import the
accelerators, and the data plane needs nothing of KVM but eventfds. Calls into it
release the GIL (cffi's default), so ``dp_stop``'s join never holds up the VMM.
"""

import os

from cffi import FFI

_SRC = os.path.join("c_ext", "dataplane")

# io_uring through liburing (Debian's liburing-dev, in the Makefile's APT_PACKAGES);
# without its headers the data plane is built without rings and uses its preadv
# worker threads, as it does where the kernel refuses io_uring.
_HAVE_URING = any(os.path.exists(os.path.join(d, "liburing.h")) for d in ("/usr/include", "/usr/local/include"))

ffibuilder = FFI()

ffibuilder.cdef(r"""
#define DP_MAX_REGIONS ...
#define DP_MAX_SEGS ...
#define DP_SERIAL_BYTES ...
#define DP_MAX_DISCARD_SEG ...
#define DP_MAX_DISCARD_SECTORS ...
#define DP_WALK_OK ...
#define DP_WALK_BAD ...
#define DP_WALK_TOO_LONG ...
#define DP_EXIT_RUNNING ...
#define DP_EXIT_STOPPED ...
#define DP_EXIT_HANDBACK ...
#define DP_MAP_ENTRIES ...
#define DP_RING_ENTRIES ...
#define DP_IOTHREAD_QUEUES ...

struct dp_region { uint64_t gpa; uint64_t size; uint8_t *host; ...; };
struct dp_seg { uint64_t gpa; uint32_t len; uint32_t writable; ...; };
struct dp_config {
    struct dp_region regions[16];
    int nregions;
    uint32_t size;
    uint64_t desc_addr, avail_addr, used_addr;
    int event_idx, indirect;
    int fd;
    uint64_t capacity;
    int read_only;
    int write_through;
    uint64_t guarded_bytes;
    int discard;
    int flush_ignored;
    uint32_t direct_align, direct_mem_align;
    struct dp_map *map;
    struct dp_ring *ring;
    struct dp_iothread *iothread;
    uint8_t serial[20];
    int kick_fd, call_fd, handback_fd;
    int *intx_pending;
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    ...;
};
struct dp_indices {
    uint16_t next_avail, next_used;
    int signalled_valid;
    uint16_t signalled_used;
    int exit_reason;
    uint64_t completed;
    uint64_t deferred;
    uint64_t ring_ops;
    uint64_t ring_enters;
    uint64_t interrupts;
    uint64_t interrupts_coalesced;
    ...;
};
struct dp_queue;
struct dp_map;
struct dp_ring;
struct dp_iothread;
struct dp_iothread *dp_iothread_new(int *err);
void dp_iothread_free(struct dp_iothread *io);
int dp_iothread_tid(const struct dp_iothread *io);
struct dp_ring *dp_ring_new(int *err);
void dp_ring_free(struct dp_ring *r);
struct dp_map *dp_map_new(uint32_t cluster_bits);
void dp_map_free(struct dp_map *m);
int dp_map_set(struct dp_map *m, uint64_t generation, const uint64_t *clusters, const uint64_t *hosts, int n);
void dp_map_invalidate(struct dp_map *m, uint64_t generation);
int dp_map_get(struct dp_map *m, uint64_t cluster, uint64_t *host);
struct dp_queue *dp_start(const struct dp_config *cfg, int *err);
void dp_stop(struct dp_queue *q, struct dp_indices *out);
int dp_walk_chain(const struct dp_region *regions, int nregions, uint64_t desc_addr, uint32_t size,
                  int indirect, uint16_t head, struct dp_seg *segs, int max_segs, int *nsegs);
""")

ffibuilder.set_source(
    "kvmpy.devices.virtio._dataplane_cffi",
    '#include "blk_dataplane.h"\n'
    '_Static_assert(DP_MAX_REGIONS == 16 && DP_SERIAL_BYTES == 20, "the cdef above spells these out");\n',
    sources=[os.path.join(_SRC, "blk_dataplane.c"), os.path.join(_SRC, "vring.c")],
    include_dirs=[_SRC, "c_ext"],
    depends=[os.path.join(_SRC, "blk_dataplane.h"), os.path.join(_SRC, "vring.h"), os.path.join("c_ext", "thread_start.h")],
    libraries=(["uring"] if _HAVE_URING else []) + ["pthread"],
    define_macros=[("DP_HAVE_URING", "1")] if _HAVE_URING else [],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
