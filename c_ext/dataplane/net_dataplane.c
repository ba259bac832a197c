/* virtio-net data plane: the per-pair thread. See net_dataplane.h for the
 * division of work with the Python model; the ring walker is vring.c's. */
#define _GNU_SOURCE
#include "net_dataplane.h"
#include "thread_start.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define NUM_BUFFERS_OFFSET 10
#define NP_SPIN_NS 50000L

/* An rx chain walked ahead of the frame that will fill it: the ring entries from
 * next_avail on belong to the device until it uses them, so the walk stays valid
 * (its host addresses were checked against guest RAM when it was made). */
struct rx_chain { uint16_t head; int first_iov, niov; uint32_t cap; };

struct np_pair {
    struct np_config c;             /* c.filter: the filter the thread applies now */
    /* np_set_filter's hand-over: a new filter waits in next_filter, filter_gen says
     * there is one; the thread takes it before judging the next frame. */
    pthread_mutex_t filter_lock;
    struct np_filter next_filter;
    unsigned filter_gen;            /* atomic */
    unsigned filter_seen;
    struct dp_vring ring[2];
    int stop_fd;
    int stop;                       /* atomic */
    int exit_reason, handback_queue, tap_errno;
    uint64_t rx_frames, tx_frames, rx_dropped, tx_dropped, rx_filtered;
    int tx_more, rx_more;           /* a batch ended with work left */
    int rx_starved;                 /* no rx buffers: the tap waits for the rx doorbell */
    pthread_t thread;
    struct dp_seg segs[NP_MAX_SEGS];
    struct iovec tx_iov[NP_MAX_SEGS];
    struct rx_chain chains[NP_MAX_RX_CHAINS];
    int nchains;
    uint64_t rx_cap;                /* bytes the walked chains hold (one may hold 4 GiB) */
    struct iovec rx_iov[NP_MAX_SEGS + 1];   /* + the bounce buffer */
    int rx_niov;
    /* Read after the walked chains, as the model reads after its chain: a tap read
     * returns what fit, so only a read that reaches in here shows the frame was
     * longer than the chains. */
    uint8_t *bounce;
    uint32_t bounce_cap;
    uint32_t waiting_len;           /* a merged frame handed back whole: in bounce */
};

static int stopping(struct np_pair *p)
{
    return __atomic_load_n(&p->stop, __ATOMIC_ACQUIRE);
}

/* The counters are read by np_counters while the thread runs. */
static void count(uint64_t *counter)
{
    __atomic_store_n(counter, *counter + 1, __ATOMIC_RELAXED);
}

static int hand_back(struct np_pair *p, int queue)
{
    p->handback_queue = queue;
    return NP_EXIT_HANDBACK;
}

/* Used entries go out as each frame is done (the driver may be reposting them
 * while the rest of the batch is served); the interrupt once per batch. */
static void finish_batch(struct dp_vring *r, uint16_t *unsignalled)
{
    if (*unsignalled) {
        *unsignalled = 0;
        dp_vring_signal(r);
    }
}

/* Whether the driver makes buffers available within NP_SPIN_NS, notifications
 * still off: a ring that just went empty in a stream usually refills within
 * microseconds, and its kick would cost an exit and a wake-up. Only right after
 * work, so an idle pair does not spin; and only where another CPU can run the
 * guest meanwhile (np_config.spin): on one CPU the spin only delays the driver. */
static int avail_soon(struct np_pair *p, struct dp_vring *r)
{
    struct timespec t0, t;
    if (!p->c.spin)
        return 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 1;; i++) {
        if (dp_vring_avail_idx(r) != r->next_avail)
            return 1;
        if (stopping(p))
            return 0;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (!(i & 63)) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) >= NP_SPIN_NS)
                return 0;
        }
    }
}

/* ---- tx: guest -> tap ------------------------------------------------------------ */

static int tx_process(struct np_pair *p)
{
    struct dp_vring *r = &p->ring[NP_TX];
    uint16_t done = 0;
    int quiet = 0;
    p->tx_more = 0;
    for (;;) {
        uint16_t pending = (uint16_t)(dp_vring_avail_idx(r) - r->next_avail);
        if (pending > r->size) {
            finish_batch(r, &done);
            return hand_back(p, NP_TX);          /* the model calls the ring broken */
        }
        if (!pending) {
            int worked = done != 0;
            finish_batch(r, &done);
            if (worked && avail_soon(p, r))
                continue;
            if (!dp_vring_enable_notification(r))
                return NP_EXIT_RUNNING;
            continue;
        }
        if (done == NP_BATCH || stopping(p)) {
            finish_batch(r, &done);
            p->tx_more = 1;
            return NP_EXIT_RUNNING;
        }
        if (!quiet) {
            /* Frames are coming: no kicks until the ring is empty again. Only
             * then, so a thread that finds nothing leaves the flags as they were. */
            dp_vring_disable_notification(r);
            quiet = 1;
        }
        uint16_t head = dp_vring_head(r, r->next_avail);
        int nsegs;
        uint64_t len = 0;
        if (dp_walk_chain(r->regions, r->nregions, r->desc_addr, r->size, r->indirect, head, p->segs,
                          NP_MAX_SEGS, &nsegs) != DP_WALK_OK) {
            finish_batch(r, &done);
            return hand_back(p, NP_TX);
        }
        for (int i = 0; i < nsegs; i++) {
            if (p->segs[i].writable)
                break;
            p->tx_iov[i].iov_base = dp_gpa_to_host(r->regions, r->nregions, p->segs[i].gpa, p->segs[i].len);
            p->tx_iov[i].iov_len = p->segs[i].len;
            len += p->segs[i].len;
        }
        /* A writable buffer, or no frame after the header: the model drops (and counts) it. */
        if (len <= p->c.hdr_len || p->segs[nsegs - 1].writable) {
            finish_batch(r, &done);
            return hand_back(p, NP_TX);
        }
        ssize_t w;
        do w = writev(p->c.tap_fd, p->tx_iov, nsegs); while (w < 0 && errno == EINTR);
        /* EAGAIN/ENOBUFS: the host is congested; EINVAL: the kernel refused the
         * guest's vnet header. A NIC drops such a frame, as the model does. */
        count(w < 0 ? &p->tx_dropped : &p->tx_frames);
        dp_vring_put_used(r, 0, head, 0);
        r->next_avail++;
        dp_vring_publish(r, 1);
        done++;
    }
}

/* ---- rx: tap -> guest ------------------------------------------------------------- */

/* Walk rx chains ahead until one frame of rx_frame_max bytes fits (MRG_RXBUF) or
 * one chain is there (without it: a frame takes one chain). 1: chains are ready;
 * 0: the ring is empty (the doorbell is armed); NP_EXIT_HANDBACK: the chain at
 * next_avail is the model's. */
static int rx_gather(struct np_pair *p, int worked)
{
    struct dp_vring *r = &p->ring[NP_RX];
    for (;;) {
        if (p->nchains && (!p->c.mrg_rxbuf || p->rx_cap >= p->c.rx_frame_max || p->nchains == NP_MAX_RX_CHAINS))
            return 1;
        uint16_t pending = (uint16_t)(dp_vring_avail_idx(r) - r->next_avail);
        if (pending > r->size)
            return p->nchains ? 1 : hand_back(p, NP_RX);
        if (pending <= p->nchains) {
            if (p->nchains)
                return 1;
            if (worked && avail_soon(p, r)) {
                worked = 0;
                continue;
            }
            if (!dp_vring_enable_notification(r))
                return 0;
            continue;
        }
        uint16_t head = dp_vring_head(r, (uint16_t)(r->next_avail + p->nchains));
        int nsegs;
        uint32_t cap = 0;
        /* A bad chain, or one the model drops (too small for the header, readable
         * buffers, too many buffers): the model takes over when it is the first. */
        if (dp_walk_chain(r->regions, r->nregions, r->desc_addr, r->size, r->indirect, head, p->segs,
                          NP_MAX_SEGS, &nsegs) != DP_WALK_OK || nsegs == 0 || !p->segs[0].writable
                || p->rx_niov + nsegs >= NP_MAX_SEGS)         /* one iovec is the bounce buffer's */
            return p->nchains ? 1 : hand_back(p, NP_RX);
        for (int i = 0; i < nsegs; i++)
            cap += p->segs[i].len;
        if (cap < p->c.hdr_len)
            return p->nchains ? 1 : hand_back(p, NP_RX);
        struct rx_chain *ch = &p->chains[p->nchains++];
        ch->head = head;
        ch->first_iov = p->rx_niov;
        ch->niov = nsegs;
        ch->cap = cap;
        for (int i = 0; i < nsegs; i++) {
            p->rx_iov[p->rx_niov].iov_base = dp_gpa_to_host(r->regions, r->nregions, p->segs[i].gpa, p->segs[i].len);
            p->rx_iov[p->rx_niov++].iov_len = p->segs[i].len;
        }
        p->rx_cap += cap;
    }
}

/* The first k walked chains are used: the rest move to the front. */
static void rx_consume(struct np_pair *p, int k)
{
    int iovs = 0;
    for (int i = 0; i < k; i++) {
        iovs += p->chains[i].niov;
        p->rx_cap -= p->chains[i].cap;
    }
    p->nchains -= k;
    p->rx_niov -= iovs;
    memmove(p->chains, p->chains + k, sizeof p->chains[0] * (size_t)p->nchains);
    memmove(p->rx_iov, p->rx_iov + iovs, sizeof p->rx_iov[0] * (size_t)p->rx_niov);
    for (int i = 0; i < p->nchains; i++)
        p->chains[i].first_iov -= iovs;
    p->ring[NP_RX].next_avail += (uint16_t)k;
}

/* num_buffers, bytes 10-11 of the header, which may straddle buffers. */
static void set_num_buffers(struct np_pair *p, uint16_t value)
{
    uint8_t bytes[2] = {(uint8_t)value, (uint8_t)(value >> 8)};
    uint32_t pos = 0;
    for (int i = 0; i < p->rx_niov && pos < NUM_BUFFERS_OFFSET + 2; i++) {
        for (int b = 0; b < 2; b++) {
            uint32_t off = NUM_BUFFERS_OFFSET + (uint32_t)b;
            if (off >= pos && off < pos + p->rx_iov[i].iov_len)
                ((uint8_t *)p->rx_iov[i].iov_base)[off - pos] = bytes[b];
        }
        pos += (uint32_t)p->rx_iov[i].iov_len;
    }
}

static int mac_listed(const uint8_t (*table)[6], uint32_t n, const uint8_t *mac)
{
    for (uint32_t i = 0; i < n && i < NP_MAC_TABLE; i++)
        if (!memcmp(table[i], mac, 6))
            return 1;
    return 0;
}

int np_filter_accepts(const struct np_filter *f, const uint8_t *frame, uint32_t len)
{
    static const uint8_t broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (f->promisc)
        return 1;
    if (len < 14)
        return 0;
    if (f->vlan_filtering && frame[12] == 0x81 && frame[13] == 0x00) {
        if (len < 16)
            return 0;
        unsigned vid = ((unsigned)frame[14] << 8 | frame[15]) & 0xFFF;
        if (!(f->vlans[vid / 8] >> (vid % 8) & 1))
            return 0;
    }
    if (frame[0] & 1) {
        if (!memcmp(frame, broadcast, 6))
            return !f->nobcast;
        if (f->nomulti)
            return 0;
        return f->allmulti || f->multicast_overflow || mac_listed(f->multicast, f->n_multicast, frame);
    }
    if (f->nouni)
        return 0;
    return f->alluni || f->unicast_overflow || !memcmp(frame, f->own_mac, 6)
        || mac_listed(f->unicast, f->n_unicast, frame);
}

void np_set_filter(struct np_pair *p, const struct np_filter *f)
{
    pthread_mutex_lock(&p->filter_lock);
    p->next_filter = *f;
    __atomic_add_fetch(&p->filter_gen, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->filter_lock);
}

/* Whether the frame of n bytes just read into the walked chains passes the
 * filter: its first 16 bytes after the header, wherever the buffers cut them. */
static int rx_accepts(struct np_pair *p, uint64_t n)
{
    if (__atomic_load_n(&p->filter_gen, __ATOMIC_ACQUIRE) != p->filter_seen) {
        pthread_mutex_lock(&p->filter_lock);
        p->c.filter = p->next_filter;
        p->filter_seen = __atomic_load_n(&p->filter_gen, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&p->filter_lock);
    }
    if (p->c.filter.promisc)
        return 1;
    uint8_t head[16];
    /* The frame's start, in the chains or (past them) in the bounce buffer. */
    int niov = p->rx_niov + 1;
    uint64_t have = n, pos = 0;
    uint32_t got = 0;
    for (int i = 0; i < niov && got < sizeof head && pos < have; i++) {
        uint64_t len = p->rx_iov[i].iov_len;
        if (len > have - pos)
            len = have - pos;
        for (uint64_t b = 0; b < len && got < sizeof head; b++)
            if (pos + b >= p->c.hdr_len)
                head[got++] = ((const uint8_t *)p->rx_iov[i].iov_base)[b];
        pos += len;
    }
    return np_filter_accepts(&p->c.filter, head, got);
}

static int rx_process(struct np_pair *p)
{
    struct dp_vring *r = &p->ring[NP_RX];
    uint16_t entries = 0;
    int frames = 0;
    p->rx_more = 0;
    p->rx_starved = 0;
    for (;;) {
        if (frames == NP_BATCH || stopping(p)) {
            p->rx_more = 1;
            break;
        }
        int g = rx_gather(p, frames != 0);
        if (g == NP_EXIT_HANDBACK) {
            finish_batch(r, &entries);
            return g;
        }
        if (g == 0) {
            p->rx_starved = 1;
            break;
        }
        ssize_t n;
        p->rx_iov[p->rx_niov].iov_base = p->bounce;
        p->rx_iov[p->rx_niov].iov_len = p->bounce_cap;
        do n = readv(p->c.tap_fd, p->rx_iov, p->rx_niov + 1); while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN)
                break;                          /* the tap is empty */
            p->tap_errno = errno;
            finish_batch(r, &entries);
            return hand_back(p, NP_RX);         /* the model logs the tap's error */
        }
        if (!frames++)
            dp_vring_disable_notification(r);   /* a stream: buffers are looked for anyway */
        if (!rx_accepts(p, (uint64_t)n)) {
            /* The chains were only scribbled on: the next frame takes them. */
            count(&p->rx_filtered);
            continue;
        }
        if ((uint64_t)n > p->rx_cap) {
            if (!p->c.mrg_rxbuf) {
                /* The frame did not fit: the model hands back the chain empty
                 * (the guest counts a length error). */
                count(&p->rx_dropped);
                dp_vring_put_used(r, 0, p->chains[0].head, 0);
                rx_consume(p, 1);
                dp_vring_publish(r, 1);
                entries++;
                continue;
            }
            /* Too few merged buffers for it: the frame waits whole for more, as
             * in the model, which takes it (and the pair) from here: its head
             * from the chains, its tail moved up behind it in the bounce buffer. */
            if ((uint64_t)n > p->bounce_cap) {
                /* Longer than any frame the tap hands over (rx_frame_max): what
                 * was read of it cannot be kept whole. Dropped; the chains stay. */
                count(&p->rx_dropped);
                continue;
            }
            uint32_t tail = (uint32_t)((uint64_t)n - p->rx_cap);
            memmove(p->bounce + p->rx_cap, p->bounce, tail);
            uint64_t at = 0;
            for (int i = 0; i < p->rx_niov; i++) {
                memcpy(p->bounce + at, p->rx_iov[i].iov_base, p->rx_iov[i].iov_len);
                at += p->rx_iov[i].iov_len;
            }
            p->waiting_len = (uint32_t)n;
            finish_batch(r, &entries);
            return hand_back(p, NP_RX);
        }
        int k = 0;
        uint32_t left = (uint32_t)n;
        do {
            uint32_t len = left < p->chains[k].cap ? left : p->chains[k].cap;
            left -= len;
            k++;
        } while (left && k < p->nchains);
        if (p->c.hdr_len >= NUM_BUFFERS_OFFSET + 2)
            set_num_buffers(p, (uint16_t)k);
        left = (uint32_t)n;
        for (int i = 0; i < k; i++) {
            uint32_t len = left < p->chains[i].cap ? left : p->chains[i].cap;
            left -= len;
            dp_vring_put_used(r, (uint16_t)i, p->chains[i].head, len);
        }
        rx_consume(p, k);
        dp_vring_publish(r, (uint16_t)k);
        entries += (uint16_t)k;
        count(&p->rx_frames);
    }
    finish_batch(r, &entries);
    return NP_EXIT_RUNNING;
}

static void drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, 8) < 0 && errno == EINTR)
        ;
}

static void *np_thread(void *arg)
{
    struct np_pair *p = arg;
    int reason;
    prctl(PR_SET_NAME, "kvmpy-net");    /* itself: see blk_dataplane.c's dp_worker */
    for (;;) {
        reason = tx_process(p);
        if (reason == NP_EXIT_RUNNING)
            reason = rx_process(p);
        if (reason != NP_EXIT_RUNNING)
            break;
        if (stopping(p)) {
            reason = NP_EXIT_STOPPED;
            break;
        }
        int block = !p->tx_more && !p->rx_more;
        /* Waiting on the tap with buffers in hand: the driver's kicks are welcome
         * again (and the used flags are as the model leaves them). */
        if (block && !p->rx_starved)
            dp_vring_enable_notification(&p->ring[NP_RX]);
        struct pollfd fds[4] = {
            {p->stop_fd, POLLIN, 0},
            {p->c.rings[NP_TX].kick_fd, POLLIN, 0},
            {p->c.rings[NP_RX].kick_fd, POLLIN, 0},
            /* Backpressure: without rx buffers frames stay in the tap (whose queue
             * drops when full) until the driver adds some and rings. */
            {p->c.tap_fd, p->rx_starved ? 0 : POLLIN, 0},
        };
        int r = poll(fds, 4, block ? -1 : 0);
        if (r < 0 && errno != EINTR) {
            p->tap_errno = errno;
            reason = hand_back(p, NP_RX);
            break;
        }
        if (fds[0].revents || stopping(p)) {
            reason = NP_EXIT_STOPPED;
            break;
        }
        if (fds[1].revents & POLLIN)
            drain(p->c.rings[NP_TX].kick_fd);
        if (fds[2].revents & POLLIN)
            drain(p->c.rings[NP_RX].kick_fd);
        if (fds[3].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            p->tap_errno = EIO;
            reason = hand_back(p, NP_RX);
            break;
        }
    }
    /* Whoever serves the rings next (the model, a new thread) must hear the kicks. */
    dp_vring_enable_notification(&p->ring[NP_RX]);
    dp_vring_enable_notification(&p->ring[NP_TX]);
    p->exit_reason = reason;
    if (reason == NP_EXIT_HANDBACK) {
        uint64_t one = 1;
        ssize_t w;
        do w = write(p->c.handback_fd, &one, 8); while (w < 0 && errno == EINTR);
    }
    return NULL;
}

struct np_pair *np_start(const struct np_config *cfg, int *err)
{
    struct np_pair *p;
    *err = EINVAL;
    if (cfg->nregions < 0 || cfg->nregions > DP_MAX_REGIONS || (cfg->hdr_len != 10 && cfg->hdr_len != 12)
        || (cfg->mrg_rxbuf && cfg->hdr_len != 12) || cfg->rx_frame_max < cfg->hdr_len)
        return NULL;
    p = calloc(1, sizeof *p);
    if (!p) {
        *err = ENOMEM;
        return NULL;
    }
    p->c = *cfg;
    /* A frame of rx_frame_max bytes fits in the bounce alone, and so does one the
     * chains began (which then holds less than rx_frame_max in chains). */
    p->bounce_cap = cfg->rx_frame_max;
    p->bounce = malloc(p->bounce_cap);
    if (!p->bounce) {
        free(p);
        *err = ENOMEM;
        return NULL;
    }
    p->next_filter = cfg->filter;
    pthread_mutex_init(&p->filter_lock, NULL);
    for (int q = 0; q < 2; q++) {
        const struct np_ring_config *rc = &cfg->rings[q];
        struct dp_vring *r = &p->ring[q];
        r->regions = p->c.regions;
        r->nregions = cfg->nregions;
        r->size = rc->size;
        r->desc_addr = rc->desc_addr;
        r->event_idx = cfg->event_idx;
        r->indirect = cfg->indirect;
        r->next_avail = rc->next_avail;
        r->next_used = rc->next_used;
        r->signalled_valid = rc->signalled_valid;
        r->signalled_used = rc->signalled_used;
        r->call_fd = rc->call_fd;
        if (dp_vring_map(r, rc->avail_addr, rc->used_addr) < 0) {
            free(p->bounce);
            free(p);
            return NULL;
        }
    }
    p->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->stop_fd < 0) {
        *err = errno;
        free(p->bounce);
        free(p);
        return NULL;
    }
    int r = kvmpy_start_thread_without_signals(&p->thread, np_thread, p);
    if (r) {
        *err = r;
        close(p->stop_fd);
        free(p->bounce);
        free(p);
        return NULL;
    }
    *err = 0;
    return p;
}

void np_counters(struct np_pair *p, struct np_result *out)
{
    out->rx_frames = __atomic_load_n(&p->rx_frames, __ATOMIC_RELAXED);
    out->tx_frames = __atomic_load_n(&p->tx_frames, __ATOMIC_RELAXED);
    out->rx_dropped = __atomic_load_n(&p->rx_dropped, __ATOMIC_RELAXED);
    out->tx_dropped = __atomic_load_n(&p->tx_dropped, __ATOMIC_RELAXED);
    out->rx_filtered = __atomic_load_n(&p->rx_filtered, __ATOMIC_RELAXED);
}

void np_stop(struct np_pair *p, struct np_result *out, uint8_t *waiting, uint32_t waiting_cap)
{
    uint64_t one = 1;
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    while (write(p->stop_fd, &one, 8) < 0 && errno == EINTR)
        ;
    pthread_join(p->thread, NULL);
    for (int q = 0; q < 2; q++) {
        out->rings[q].next_avail = p->ring[q].next_avail;
        out->rings[q].next_used = p->ring[q].next_used;
        out->rings[q].signalled_valid = p->ring[q].signalled_valid;
        out->rings[q].signalled_used = p->ring[q].signalled_used;
    }
    out->exit_reason = p->exit_reason;
    out->handback_queue = p->handback_queue;
    out->tap_errno = p->tap_errno;
    out->rx_frames = p->rx_frames;
    out->tx_frames = p->tx_frames;
    out->rx_dropped = p->rx_dropped;
    out->tx_dropped = p->tx_dropped;
    out->rx_filtered = p->rx_filtered;
    out->waiting_len = 0;
    if (p->waiting_len && p->waiting_len <= waiting_cap) {
        memcpy(waiting, p->bounce, p->waiting_len);
        out->waiting_len = p->waiting_len;
    }
    close(p->stop_fd);
    pthread_mutex_destroy(&p->filter_lock);
    free(p->bounce);
    free(p);
}
