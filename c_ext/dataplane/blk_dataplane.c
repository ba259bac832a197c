/* virtio-blk data plane: the per-queue I/O thread.
 * See blk_dataplane.h for the division of work with the Python model. The ring
 * walker is vring.c's, shared with the net data plane. */
#define _GNU_SOURCE
#include "blk_dataplane.h"
#include "thread_start.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#ifdef DP_HAVE_URING
#include <liburing.h>
#endif
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#define MAX_QUEUE_SIZE 32768u
#define SECTOR 512u
#define BLK_IOV_MAX 1024

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define WRITE_ZEROES_FLAG_UNMAP 1
#define S_OK 0

/* Reads the page cache cannot answer at once (RWF_NOWAIT) go to a few worker
 * threads, so up to DP_BATCH of them wait on the disk together; everything else
 * runs on the ring thread. */
#define DP_WORKERS 4
#define DP_BATCH 32

#define EXEC_HANDBACK (-1)
#define EXEC_DEFERRED (-2)
#define EXEC_BARRIER (-3)           /* not started: the batch's ring I/O must finish first */

/* One read handed to the workers, or a read or write in the io_uring. */
struct dp_job {
    int niov;
    int write;
    uint64_t offset;
    uint64_t nbytes;
    int result;                     /* 0 done, -1 failed: the model's */
    int done;                       /* atomic */
    struct iovec iov[BLK_IOV_MAX];
};

/* A request of the current batch: answered (status written) or a job in flight;
 * its used entry is published once every earlier one is. */
struct dp_slot {
    uint16_t head;
    uint32_t used;
    uint8_t *status;
    struct dp_job *job;             /* NULL: answered on the ring thread */
};

struct dp_queue {
    struct dp_config c;
    uint8_t *desc, *avail, *used;
    int stop_fd;
    int stop;                       /* atomic */
    int exit_reason;
    uint64_t completed;
    uint64_t deferred;              /* reads that went to the workers */
    int nowait_refused;             /* the file system has no RWF_NOWAIT: all reads inline */
    uint64_t ring_ops;              /* reads and writes that went through the io_uring */
    uint64_t ring_enters;           /* io_uring_enter calls */
    uint64_t interrupts;            /* call_fd writes */
    uint64_t interrupts_coalesced;  /* wanted, but an INTx level already up covered them */
    int ring_inflight;              /* of the current batch, not reaped yet */
    int map_held;                   /* the cluster map's read lock, for this batch */
    uint8_t *bounce;                /* O_DIRECT: aligned, for requests with unaligned buffers */
    size_t bounce_size;
    /* served by an iothread: run at its next turn (a kick, or just attached), and
     * finished once the iothread let go of it (dp_stop waits for that) */
    int io_run;
    int io_finished;
    pthread_t thread;
    struct dp_seg segs[DP_MAX_SEGS];
    struct iovec iov[BLK_IOV_MAX];
    /* the batch and the workers */
    struct dp_slot batch[DP_BATCH];
    struct dp_job jobs[DP_BATCH];
    struct dp_job *work[DP_BATCH];
    int work_queued, work_taken, outstanding, workers_exit, nworkers;
    pthread_mutex_t lock;
    pthread_cond_t work_cv, done_cv;
    pthread_t workers[DP_WORKERS];
};

/* ---- the qcow2 cluster map --------------------------------------------------- */

struct dp_map_entry { uint64_t key; uint64_t host; };   /* key: cluster + 1; 0 is empty */

struct dp_map {
    /* Readers are the queue threads, for the whole of a request's I/O: once Python's
     * invalidation returns, no thread still writes where the old mapping pointed
     * (a cluster Python is about to free or share). Writers first, so a steady
     * stream of requests cannot keep an invalidation waiting. */
    pthread_rwlock_t lock;
    uint32_t cluster_bits;
    uint64_t generation;           /* the driver's mapping generation the entries belong to */
    struct dp_map_entry e[DP_MAP_ENTRIES];
};

struct dp_map *dp_map_new(uint32_t cluster_bits)
{
    if (cluster_bits < 9 || cluster_bits > 21)
        return NULL;
    struct dp_map *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&m->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    m->cluster_bits = cluster_bits;
    return m;
}

void dp_map_free(struct dp_map *m)
{
    if (!m)
        return;
    pthread_rwlock_destroy(&m->lock);
    free(m);
}

/* Entries computed by Python at mapping generation `generation`; dropped (returns
 * 0) when the mapping changed since, else returns n. */
int dp_map_set(struct dp_map *m, uint64_t generation, const uint64_t *clusters, const uint64_t *hosts, int n)
{
    int stored = 0;
    pthread_rwlock_wrlock(&m->lock);
    if (generation == m->generation) {
        for (int i = 0; i < n; i++) {
            if (hosts[i] == 0 || hosts[i] & ((1ull << m->cluster_bits) - 1))
                continue;          /* never a cluster 0 (the header) or a misaligned one */
            struct dp_map_entry *e = &m->e[clusters[i] & (DP_MAP_ENTRIES - 1)];
            e->key = clusters[i] + 1;
            e->host = hosts[i];
            stored++;
        }
    }
    pthread_rwlock_unlock(&m->lock);
    return stored;
}

void dp_map_invalidate(struct dp_map *m, uint64_t generation)
{
    pthread_rwlock_wrlock(&m->lock);
    memset(m->e, 0, sizeof m->e);
    m->generation = generation;
    pthread_rwlock_unlock(&m->lock);
}

/* Under the lock (read or write): the host offset of cluster, or 0. */
static uint64_t map_lookup(const struct dp_map *m, uint64_t cluster)
{
    const struct dp_map_entry *e = &m->e[cluster & (DP_MAP_ENTRIES - 1)];
    return e->key == cluster + 1 ? e->host : 0;
}

int dp_map_get(struct dp_map *m, uint64_t cluster, uint64_t *host)
{
    pthread_rwlock_rdlock(&m->lock);
    *host = map_lookup(m, cluster);
    pthread_rwlock_unlock(&m->lock);
    return *host != 0;
}

/* ---- io_uring ------------------------------------------------------------------ */

/* Built without liburing (its headers missing: see _dataplane_build.py) there is
 * never a ring, and the threads use the workers. */
#ifdef DP_HAVE_URING
struct dp_ring { struct io_uring ring; };

/* A ring that can do nothing but what the thread submits (even in a process a
 * guest has taken over): vectored reads and writes, fsync, fallocate. */
struct dp_ring *dp_ring_new(int *err)
{
    static const uint8_t ops[] = {IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC, IORING_OP_FALLOCATE};
    struct io_uring_restriction res[sizeof ops];
    struct io_uring_params params;
    struct dp_ring *r = calloc(1, sizeof *r);
    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    memset(&params, 0, sizeof params);
    params.flags = IORING_SETUP_R_DISABLED;
    int rc = io_uring_queue_init_params(DP_RING_ENTRIES, &r->ring, &params);
    if (rc < 0) {
        *err = -rc;
        free(r);
        return NULL;
    }
    memset(res, 0, sizeof res);
    for (size_t i = 0; i < sizeof ops; i++) {
        res[i].opcode = IORING_RESTRICTION_SQE_OP;
        res[i].sqe_op = ops[i];
    }
    /* By the system call: Debian 12's liburing 2.3 declares but does not export
     * the two helpers. */
    rc = (int)syscall(__NR_io_uring_register, r->ring.ring_fd, IORING_REGISTER_RESTRICTIONS, res,
                      (unsigned)(sizeof ops));
    if (rc >= 0)
        rc = (int)syscall(__NR_io_uring_register, r->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    if (rc < 0)
        rc = -errno;
    if (rc < 0) {
        *err = -rc;
        io_uring_queue_exit(&r->ring);
        free(r);
        return NULL;
    }
    *err = 0;
    return r;
}

void dp_ring_free(struct dp_ring *r)
{
    if (!r)
        return;
    io_uring_queue_exit(&r->ring);
    free(r);
}
#else
struct dp_ring *dp_ring_new(int *err)
{
    *err = ENOSYS;
    return NULL;
}

void dp_ring_free(struct dp_ring *r)
{
}
#endif

/* ---- the ring, device side ---------------------------------------------------- */

static uint16_t avail_idx(struct dp_queue *q)
{
    return __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
}

static uint16_t avail_ring(struct dp_queue *q, uint16_t slot)
{
    return __atomic_load_n((uint16_t *)(q->avail + 4 + 2u * slot), __ATOMIC_RELAXED);
}

static void add_used(struct dp_queue *q, uint16_t head, uint32_t len)
{
    uint8_t *elem = q->used + 4 + 8u * (q->c.next_used % q->c.size);
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &len, 4);
    q->c.next_used++;
    /* The element must be visible before the index that publishes it. */
    __atomic_store_n((uint16_t *)(q->used + 2), q->c.next_used, __ATOMIC_RELEASE);
}

/* SplitQueue.needs_notification, after a full barrier: the driver's used_event
 * (or NO_INTERRUPT) written after it saw our older used idx must be read here. */
static void signal_used(struct dp_queue *q)
{
    uint16_t old = q->c.signalled_used, new_idx = q->c.next_used;
    int valid = q->c.signalled_valid, want;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    q->c.signalled_used = new_idx;
    q->c.signalled_valid = 1;
    if (q->c.event_idx) {
        uint16_t used_event = __atomic_load_n((uint16_t *)(q->avail + 4 + 2u * q->c.size), __ATOMIC_RELAXED);
        want = !valid || dp_vring_need_event(used_event, new_idx, old);
    } else {
        want = !(__atomic_load_n((uint16_t *)q->avail, __ATOMIC_RELAXED) & AVAIL_F_NO_INTERRUPT);
    }
    if (want && q->c.intx_pending && __atomic_exchange_n(q->c.intx_pending, 1, __ATOMIC_SEQ_CST)) {
        /* Set since the driver last read the ISR: its next read (after the raise
         * that is up or on its way) comes after the used idx stored above. */
        q->interrupts_coalesced++;
        return;
    }
    if (want) {
        uint64_t one = 1;
        ssize_t r;
        do r = write(q->c.call_fd, &one, 8); while (r < 0 && errno == EINTR);
        q->interrupts++;
    }
}

/* SplitQueue.set_notification(True): ask for the next kick; returns whether
 * buffers are already waiting. */
static int enable_notification(struct dp_queue *q)
{
    if (q->c.event_idx) {
        __atomic_store_n((uint16_t *)(q->used + 4 + 8u * q->c.size), q->c.next_avail, __ATOMIC_RELAXED);
    } else {
        uint16_t *flags = (uint16_t *)q->used;
        uint16_t f = __atomic_load_n(flags, __ATOMIC_RELAXED);
        if (f & USED_F_NO_NOTIFY)
            __atomic_store_n(flags, f & ~USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_idx(q) != q->c.next_avail;
}

/* ---- requests -------------------------------------------------------------------- */

static uint8_t *host(struct dp_queue *q, const struct dp_seg *s)
{
    return dp_gpa_to_host(q->c.regions, q->c.nregions, s->gpa, s->len);
}

/* All of iov moved, or -1: an error or an end of file, both the model's to answer
 * (it reruns the whole request: a read or write of the same bytes is idempotent). */
static int full_io(int fd, struct iovec *iov, int niov, uint64_t offset, int write)
{
    while (niov > 0) {
        ssize_t n = write ? pwritev(fd, iov, niov, (off_t)offset) : preadv(fd, iov, niov, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        offset += (uint64_t)n;
        while (niov > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* The cluster map's read lock, taken by the first qcow2 request of a batch and
 * held until the batch's I/O is done (map_release), so an invalidation returns
 * only once no I/O through an old mapping is in flight. Never taken twice: with
 * writers preferred, a second read lock behind a waiting writer would wait on it. */
static void map_hold(struct dp_queue *q)
{
    if (!q->map_held) {
        pthread_rwlock_rdlock(&q->c.map->lock);
        q->map_held = 1;
    }
}

static void map_release(struct dp_queue *q)
{
    if (q->map_held) {
        pthread_rwlock_unlock(&q->c.map->lock);
        q->map_held = 0;
    }
}

/* Where guest bytes [offset, offset+nbytes) of a qcow2 disk are in the image
 * file (map held): 1 and *host when in one run of host clusters, 2 when in
 * several, 0 when a cluster is not in the map (an unallocated, zero, compressed
 * or shared cluster: the model's). */
static int map_runs(struct dp_queue *q, uint64_t offset, uint64_t nbytes, uint64_t *host)
{
    const struct dp_map *m = q->c.map;
    uint32_t bits = m->cluster_bits;
    uint64_t mask = (1ull << bits) - 1, first = offset >> bits, last = (offset + nbytes - 1) >> bits;
    uint64_t base = map_lookup(m, first);
    int runs = 1;
    if (!base)
        return 0;
    for (uint64_t c = first + 1; c <= last; c++) {
        uint64_t h = map_lookup(m, c);
        if (!h)
            return 0;
        if (h != base + ((c - first) << bits))
            runs = 2;
    }
    *host = base + (offset & mask);
    return runs;
}

/* A read or write of guest bytes [offset, offset+nbytes) of a qcow2 disk whose
 * clusters are all in the map (held), a call per run of host clusters. */
static int mapped_io(struct dp_queue *q, struct iovec *iov, int niov, uint64_t offset, uint64_t nbytes, int write)
{
    const struct dp_map *m = q->c.map;
    uint32_t bits = m->cluster_bits;
    uint64_t mask = (1ull << bits) - 1;
    struct iovec sub[BLK_IOV_MAX + 1];
    int vi = 0;
    size_t vo = 0;                 /* bytes of iov[vi] already used */
    for (uint64_t pos = offset, end = offset + nbytes; pos < end;) {
        uint64_t host = map_lookup(m, pos >> bits) + (pos & mask);
        uint64_t run = ((pos | mask) + 1) - pos;
        /* Clusters whose host clusters follow each other go in one call. */
        while (pos + run < end && map_lookup(m, (pos + run) >> bits) == host + run)
            run += 1ull << bits;
        if (run > end - pos)
            run = end - pos;
        int nsub = 0;
        for (uint64_t left = run; left;) {
            size_t take = iov[vi].iov_len - vo;
            if (take > left)
                take = (size_t)left;
            sub[nsub].iov_base = (uint8_t *)iov[vi].iov_base + vo;
            sub[nsub++].iov_len = take;
            left -= take;
            vo += take;
            if (vo == iov[vi].iov_len) {
                vi++;
                vo = 0;
            }
        }
        if (full_io(q->c.fd, sub, nsub, host, write) < 0)
            return -1;
        pos += run;
    }
    return 0;
}

#ifdef DP_HAVE_URING
/* Queue job in the ring (submitted with the rest of the batch by ring_wait). */
static int ring_queue(struct dp_queue *q, struct dp_job *job)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&q->c.ring->ring);
    if (!sqe)
        return -1;                 /* not with DP_RING_ENTRIES >= DP_BATCH */
    if (job->write)
        io_uring_prep_writev(sqe, q->c.fd, job->iov, (unsigned)job->niov, job->offset);
    else
        io_uring_prep_readv(sqe, q->c.fd, job->iov, (unsigned)job->niov, job->offset);
    io_uring_sqe_set_data(sqe, job);
    job->done = 0;
    q->ring_inflight++;
    q->ring_ops++;
    return 0;
}

/* A completion's result as full_io's: a short transfer is finished here, and a
 * refusal to wait (EAGAIN) is done again the blocking way. */
static int ring_result(struct dp_queue *q, struct dp_job *job, int res)
{
    if (res >= 0 && (uint64_t)res == job->nbytes)
        return 0;
    if (res < 0 && res != -EAGAIN)
        return -1;
    uint64_t skip = res > 0 ? (uint64_t)res : 0;
    struct iovec *iov = job->iov;
    int niov = job->niov;
    while (niov > 0 && skip >= iov->iov_len) {
        skip -= iov->iov_len;
        iov++;
        niov--;
    }
    if (niov > 0) {
        iov->iov_base = (uint8_t *)iov->iov_base + skip;
        iov->iov_len -= skip;
    }
    return full_io(q->c.fd, iov, niov, job->offset + (res > 0 ? (uint64_t)res : 0), job->write);
}

/* Submit the batch's ring I/O and reap all of it. */
static void ring_wait(struct dp_queue *q)
{
    struct io_uring *ring = &q->c.ring->ring;
    while (q->ring_inflight) {
        /* One enter submits what is queued and sleeps until the whole batch is
         * done: the thread wakes once per batch, not once per completion (on a
         * busy or single CPU each wake is a context switch the guest pays for). */
        int r = io_uring_submit_and_wait(ring, (unsigned)q->ring_inflight);
        q->ring_enters++;
        if (r == -EINTR || r == -EAGAIN || r == -EBUSY)
            continue;
        if (r < 0) {
            /* Not for a ring of our own making. What it did not answer fails, so the
             * batch goes back to the model from there, and the ring is not used again. */
            for (int i = 0; i < DP_BATCH; i++)
                if (!__atomic_load_n(&q->jobs[i].done, __ATOMIC_ACQUIRE)) {
                    q->jobs[i].result = -1;
                    __atomic_store_n(&q->jobs[i].done, 1, __ATOMIC_RELEASE);
                }
            q->ring_inflight = 0;
            q->c.ring = NULL;
            return;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(ring, head, cqe) {
            struct dp_job *job = io_uring_cqe_get_data(cqe);
            q->ring_inflight--;
            job->result = ring_result(q, job, cqe->res);
            __atomic_store_n(&job->done, 1, __ATOMIC_RELEASE);
            seen++;
        }
        io_uring_cq_advance(ring, seen);
    }
}

#else
static int ring_queue(struct dp_queue *q, struct dp_job *job)
{
    return -1;
}

static void ring_wait(struct dp_queue *q)
{
}
#endif

static void *dp_worker(void *arg)
{
    struct dp_queue *q = arg;
    /* Each thread names itself (ps, gdb, tests): naming another thread writes its
     * /proc comm file, which the sandbox refuses once the VM runs. */
    prctl(PR_SET_NAME, "kvmpy-blk-rd");
    pthread_mutex_lock(&q->lock);
    for (;;) {
        while (!q->workers_exit && q->work_taken == q->work_queued)
            pthread_cond_wait(&q->work_cv, &q->lock);
        if (q->work_taken == q->work_queued)
            break;                  /* told to exit, nothing left */
        struct dp_job *job = q->work[q->work_taken++];
        pthread_mutex_unlock(&q->lock);
        job->result = full_io(q->c.fd, job->iov, job->niov, job->offset, 0);
        pthread_mutex_lock(&q->lock);
        __atomic_store_n(&job->done, 1, __ATOMIC_RELEASE);
        if (--q->outstanding == 0)
            pthread_cond_signal(&q->done_cv);
    }
    pthread_mutex_unlock(&q->lock);
    return NULL;
}

/* Queue job; the workers start with the first one (from the ring thread, whose
 * signal mask they inherit: all blocked). Returns -1 if no worker could start. */
static int defer_read(struct dp_queue *q, struct dp_job *job)
{
    if (!q->nworkers) {
        for (int i = 0; i < DP_WORKERS; i++) {
            if (pthread_create(&q->workers[i], NULL, dp_worker, q))
                break;
            q->nworkers++;
        }
        if (!q->nworkers)
            return -1;
    }
    job->done = 0;
    pthread_mutex_lock(&q->lock);
    q->work[q->work_queued++] = job;
    q->outstanding++;
    pthread_cond_signal(&q->work_cv);
    pthread_mutex_unlock(&q->lock);
    q->deferred++;
    return 0;
}

/* Every job of the batch finished; the work list starts over. */
static void wait_for_workers(struct dp_queue *q)
{
    pthread_mutex_lock(&q->lock);
    while (q->outstanding)
        pthread_cond_wait(&q->done_cv, &q->lock);
    q->work_queued = q->work_taken = 0;
    pthread_mutex_unlock(&q->lock);
}

static void stop_workers(struct dp_queue *q)
{
    pthread_mutex_lock(&q->lock);
    q->workers_exit = 1;
    pthread_cond_broadcast(&q->work_cv);
    pthread_mutex_unlock(&q->lock);
    for (int i = 0; i < q->nworkers; i++)
        pthread_join(q->workers[i], NULL);
    q->nworkers = 0;
}

/* 0: the page cache answered the whole read now; 1: it would wait on the disk. */
static int read_nowait(struct dp_queue *q, int niov, uint64_t offset, uint64_t nbytes)
{
    ssize_t n;
    do n = preadv2(q->c.fd, q->iov, niov, (off_t)offset, RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS))
        q->nowait_refused = 1;
    return n >= 0 && (uint64_t)n == nbytes ? 0 : 1;
}

static int sync_image(struct dp_queue *q)
{
    int r;
    do r = fdatasync(q->c.fd); while (r < 0 && errno == EINTR);
    return r;
}

/* Whether every buffer of iov may go to an O_DIRECT descriptor as it is. */
static int iov_direct_ok(const struct dp_queue *q, const struct iovec *iov, int niov)
{
    for (int i = 0; i < niov; i++)
        if ((uintptr_t)iov[i].iov_base % q->c.direct_mem_align || iov[i].iov_len % q->c.direct_align)
            return 0;
    return 1;
}

/* The bounce buffer, at least nbytes; 0 or -1 when it cannot be had. */
static int bounce_reserve(struct dp_queue *q, size_t nbytes)
{
    if (q->bounce_size >= nbytes)
        return 0;
    size_t align = q->c.direct_mem_align > 4096 ? q->c.direct_mem_align : 4096;
    void *p;
    if (posix_memalign(&p, align, nbytes))
        return -1;
    free(q->bounce);
    q->bounce = p;
    q->bounce_size = nbytes;
    return 0;
}

/* Copy between the bounce buffer and iov (to_bounce: gather a write's data). */
static void bounce_copy(struct dp_queue *q, const struct iovec *iov, int niov, int to_bounce)
{
    size_t pos = 0;
    for (int i = 0; i < niov; i++) {
        if (to_bounce)
            memcpy(q->bounce + pos, iov[i].iov_base, iov[i].iov_len);
        else
            memcpy(iov[i].iov_base, q->bounce + pos, iov[i].iov_len);
        pos += iov[i].iov_len;
    }
}

/* DISCARD / WRITE_ZEROES with segments the model would accept as they are (no
 * answer but OK), done with the fallocate modes RawDriver uses; anything else,
 * a file system without the mode included, is handed back to the model. */
static int discard_segments(struct dp_queue *q, uint32_t type, uint8_t *payload, uint32_t len)
{
    struct { uint64_t sector; uint32_t num, flags; } seg;
    if (!q->c.discard || len == 0 || len % 16 || len / 16 > DP_MAX_DISCARD_SEG)
        return -1;
    for (uint32_t o = 0; o < len; o += 16) {
        memcpy(&seg, payload + o, 16);
        if ((seg.flags & ~WRITE_ZEROES_FLAG_UNMAP) || (type == T_DISCARD && seg.flags)
            || seg.num > DP_MAX_DISCARD_SECTORS || seg.sector > q->c.capacity
            || seg.num > q->c.capacity - seg.sector)
            return -1;
    }
    for (uint32_t o = 0; o < len; o += 16) {
        memcpy(&seg, payload + o, 16);
        if (!seg.num)
            continue;
        int mode = type == T_DISCARD || (seg.flags & WRITE_ZEROES_FLAG_UNMAP)
                   ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        int r;
        do r = fallocate(q->c.fd, mode, (off_t)(seg.sector * SECTOR), (off_t)seg.num * SECTOR);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* Serve the chain in q->segs; returns the used length, EXEC_HANDBACK, or
 * EXEC_DEFERRED with slot filled in (a read in job, its status not written yet).
 * Only a read with a job given may be deferred. */
static int64_t execute(struct dp_queue *q, int nsegs, struct dp_slot *slot, struct dp_job *job)
{
    uint8_t hdr[16];
    int i = 0, hdr_got = 0, niov = 0;
    uint32_t hdr_split = 0;        /* bytes of segs[i] the header used */
    int first_w, last_w = nsegs - 1;
    uint32_t type;
    uint64_t sector, nbytes = 0;

    if (nsegs == 0 || !q->segs[last_w].writable)
        return -1;                 /* no status byte: the model logs it */
    for (first_w = 0; first_w < nsegs && !q->segs[first_w].writable; first_w++)
        ;
    for (i = 0; i < first_w && hdr_got < 16; i++) {
        uint32_t take = q->segs[i].len < (uint32_t)(16 - hdr_got) ? q->segs[i].len : (uint32_t)(16 - hdr_got);
        memcpy(hdr + hdr_got, host(q, &q->segs[i]), take);
        hdr_got += (int)take;
        hdr_split = take;
    }
    if (hdr_got < 16)
        return -1;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    uint8_t *status = host(q, &q->segs[last_w]) + q->segs[last_w].len - 1;

    if (type == T_IN) {
        for (int j = first_w; j <= last_w; j++) {
            uint32_t len = q->segs[j].len - (j == last_w);
            if (!len)
                continue;
            if (niov == BLK_IOV_MAX)
                return -1;
            q->iov[niov].iov_base = host(q, &q->segs[j]);
            q->iov[niov++].iov_len = len;
            nbytes += len;
        }
    } else if (type == T_OUT) {
        /* data_out: what follows the header in the readable part */
        i--;                       /* the segment the header ended in */
        for (int j = i; j < first_w; j++) {
            uint32_t skip = j == i ? hdr_split : 0;
            if (q->segs[j].len == skip)
                continue;
            if (niov == BLK_IOV_MAX)
                return -1;
            q->iov[niov].iov_base = host(q, &q->segs[j]) + skip;
            q->iov[niov++].iov_len = q->segs[j].len - skip;
            nbytes += q->segs[j].len - skip;
        }
        if (q->c.read_only)
            return -1;
    } else if (type == T_FLUSH) {
        if (q->ring_inflight)
            return EXEC_BARRIER;   /* writes of this batch first: a flush covers what completed */
        if (q->c.map)
            return -1;             /* qcow2: the driver's dirty tables go out first, in Python */
        if (!q->c.read_only && !q->c.flush_ignored && sync_image(q) < 0)
            return -1;
        *status = S_OK;
        return 1;
    } else if (type == T_GET_ID) {
        uint32_t done = 0;
        for (int j = first_w; j <= last_w && done < DP_SERIAL_BYTES; j++) {
            uint32_t len = q->segs[j].len - (j == last_w);
            uint32_t take = len < DP_SERIAL_BYTES - done ? len : DP_SERIAL_BYTES - done;
            memcpy(host(q, &q->segs[j]), q->c.serial + done, take);
            done += take;
        }
        *status = S_OK;
        return (int64_t)done + 1;
    } else if (type == T_DISCARD || type == T_WRITE_ZEROES) {
        if (q->ring_inflight)
            return EXEC_BARRIER;
        if (q->c.map)
            return -1;             /* qcow2: a change of mapping, the driver's */
        uint8_t payload[16 * DP_MAX_DISCARD_SEG];
        uint32_t len = 0;
        int views = 0;
        /* The model reads segments from the first max_discard_seg + 1 buffers only:
         * a longer list is its to judge. */
        for (int j = i - 1; j < first_w; j++) {
            uint32_t skip = j == i - 1 ? hdr_split : 0, n = q->segs[j].len - skip;
            if (!n)
                continue;
            if (++views > DP_MAX_DISCARD_SEG + 1 || n > sizeof payload - len)
                return -1;
            memcpy(payload + len, host(q, &q->segs[j]) + skip, n);
            len += n;
        }
        if (discard_segments(q, type, payload, len) < 0)
            return -1;
        if (q->c.write_through && sync_image(q) < 0)
            return -1;
        *status = S_OK;
        return 1;
    } else {
        return -1;                 /* unknown types: the model's (UNSUPP) */
    }
    /* Bad lengths and ranges are answered by the model (IOERR, logged there). */
    if (nbytes % SECTOR || sector > q->c.capacity || nbytes / SECTOR > q->c.capacity - sector)
        return -1;
    if (type == T_OUT && nbytes && sector * SECTOR < q->c.guarded_bytes)
        return -1;
    /* Where the bytes are in the file: the same offset on a raw disk; on qcow2 the
     * map's answer, and a request over several runs of host clusters is done here
     * and now, run by run. */
    uint64_t file_offset = sector * SECTOR;
    int runs = 1;
    if (q->c.direct_align && nbytes && (file_offset % q->c.direct_align || nbytes % q->c.direct_align))
        return -1;                 /* part of a block: the model reads, modifies and writes it */
    if (q->c.map && nbytes) {
        if (type == T_OUT && q->c.write_through)
            return -1;
        map_hold(q);
        runs = map_runs(q, file_offset, nbytes, &file_offset);
        if (runs == 0)
            return -1;
    }
    if (q->c.direct_align && nbytes && !iov_direct_ok(q, q->iov, niov)) {
        /* Done here and now through the bounce buffer: file offset and length are
         * aligned, so no block is read that the request does not cover. */
        if (nbytes > DP_BOUNCE_MAX || bounce_reserve(q, (size_t)nbytes) < 0)
            return -1;
        struct iovec whole = {q->bounce, (size_t)nbytes};
        if (type == T_OUT)
            bounce_copy(q, q->iov, niov, 1);
        int r = runs > 1 ? mapped_io(q, &whole, 1, sector * SECTOR, nbytes, type == T_OUT)
                         : full_io(q->c.fd, &whole, 1, file_offset, type == T_OUT);
        if (r < 0)
            return -1;
        if (type == T_IN)
            bounce_copy(q, q->iov, niov, 0);
        if (type == T_OUT && q->c.write_through && sync_image(q) < 0)
            return -1;
        *status = S_OK;
        return type == T_IN ? (int64_t)nbytes + 1 : 1;
    }
    if (q->c.map && nbytes) {
        if (runs > 1) {
            if (mapped_io(q, q->iov, niov, sector * SECTOR, nbytes, type == T_OUT) < 0)
                return -1;
            *status = S_OK;
            return type == T_IN ? (int64_t)nbytes + 1 : 1;
        }
    }
    if (q->c.ring && nbytes && job && !(type == T_OUT && q->c.write_through)) {
        memcpy(job->iov, q->iov, sizeof job->iov[0] * (size_t)niov);
        job->niov = niov;
        job->write = type == T_OUT;
        job->offset = file_offset;
        job->nbytes = nbytes;
        if (ring_queue(q, job) == 0) {
            slot->status = status;
            slot->used = type == T_IN ? (uint32_t)nbytes + 1 : 1;
            slot->job = job;
            return EXEC_DEFERRED;
        }
    }
    if (type == T_IN && nbytes && job && !q->nowait_refused) {
        if (!read_nowait(q, niov, file_offset, nbytes)) {
            *status = S_OK;
            return (int64_t)nbytes + 1;
        }
        if (!q->nowait_refused) {
            memcpy(job->iov, q->iov, sizeof job->iov[0] * (size_t)niov);
            job->niov = niov;
            job->write = 0;
            job->offset = file_offset;
            job->nbytes = nbytes;
            if (defer_read(q, job) == 0) {
                slot->status = status;
                slot->used = (uint32_t)nbytes + 1;
                slot->job = job;
                return EXEC_DEFERRED;
            }
        }
    }
    if (nbytes && full_io(q->c.fd, q->iov, niov, file_offset, type == T_OUT) < 0)
        return -1;
    if (type == T_OUT && nbytes && q->c.write_through && sync_image(q) < 0)
        return -1;
    *status = S_OK;
    return type == T_IN ? (int64_t)nbytes + 1 : 1;
}

/* Publish the batch's used entries in order, as far as the requests are answered;
 * a failed read stops there (and the rest of the batch, answered or not, is the
 * model's again: it reruns them). Returns how many it published. */
static int publish_ready(struct dp_queue *q, int from, int n, int *failed)
{
    int i;
    for (i = from; i < n; i++) {
        struct dp_slot *slot = &q->batch[i];
        if (slot->job) {
            if (!__atomic_load_n(&slot->job->done, __ATOMIC_ACQUIRE))
                break;
            if (slot->job->result < 0) {
                *failed = 1;
                break;
            }
            *slot->status = S_OK;
        }
        q->c.next_avail++;
        add_used(q, slot->head, slot->used);
        q->completed++;
    }
    return i - from;
}

/* Serve everything available; DP_EXIT_RUNNING when the ring is empty (and
 * notifications are enabled again), else why the thread must end. Requests are
 * taken in batches: a read the page cache cannot answer at once goes to the
 * workers while the ring thread walks on; used entries go out in ring order, so
 * next_avail is always where the model would carry on. */
static int process(struct dp_queue *q)
{
    for (;;) {
        int did = 0, reason = DP_EXIT_RUNNING, n = 0, published = 0, failed = 0, deferred = 0;
        uint16_t base = q->c.next_avail;    /* ring position of batch[0] */
        uint16_t pending = (uint16_t)(avail_idx(q) - base);
        if (pending > q->c.size)
            return DP_EXIT_HANDBACK;         /* the model calls the ring broken */
        while (n < DP_BATCH && n < pending && !__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE)) {
            struct dp_slot *slot = &q->batch[n];
            slot->head = avail_ring(q, (uint16_t)(base + n) % q->c.size);
            slot->job = NULL;
            int nsegs;
            if (dp_walk_chain(q->c.regions, q->c.nregions, q->c.desc_addr, q->c.size, q->c.indirect,
                              slot->head, q->segs, DP_MAX_SEGS, &nsegs) != DP_WALK_OK) {
                reason = DP_EXIT_HANDBACK;
                break;
            }
            int64_t used = execute(q, nsegs, slot, &q->jobs[n]);
            if (used == EXEC_BARRIER)
                break;                       /* it starts the next batch */
            if (used == EXEC_HANDBACK) {
                reason = DP_EXIT_HANDBACK;
                break;
            }
            if (used == EXEC_DEFERRED)
                deferred = 1;
            else
                slot->used = (uint32_t)used;
            n++;
            /* Answered requests go out at once unless a read ahead of them waits. */
            if (published == n - 1 && !slot->job) {
                published += publish_ready(q, published, n, &failed);
                did = 1;
            }
        }
        if (q->ring_inflight)
            ring_wait(q);
        if (deferred)
            wait_for_workers(q);   /* nothing to wait for when the ring had them all */
        map_release(q);
        if (published < n && !failed) {
            published += publish_ready(q, published, n, &failed);
            did = 1;
        }
        if (did)
            signal_used(q);
        if (failed)
            reason = DP_EXIT_HANDBACK;       /* at the read that failed */
        if (reason != DP_EXIT_RUNNING)
            return reason;
        if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE))
            return DP_EXIT_STOPPED;
        if (n == DP_BATCH || (uint16_t)(avail_idx(q) - q->c.next_avail)) {
            if (q->c.iothread) {
                q->io_run = 1;     /* a batch per turn: the iothread's other queues are served between */
                return DP_EXIT_RUNNING;
            }
            continue;
        }
        if (!enable_notification(q))
            return DP_EXIT_RUNNING;
    }
}

static void drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, 8) < 0 && errno == EINTR)
        ;
}

static void *dp_thread(void *arg)
{
    struct dp_queue *q = arg;
    int reason;
    prctl(PR_SET_NAME, "kvmpy-blk");
    for (;;) {
        reason = process(q);
        if (reason != DP_EXIT_RUNNING)
            break;
        struct pollfd fds[2] = {{q->c.kick_fd, POLLIN, 0}, {q->stop_fd, POLLIN, 0}};
        int r = poll(fds, 2, -1);
        if (r < 0 && errno != EINTR) {
            reason = DP_EXIT_HANDBACK;
            break;
        }
        if (fds[1].revents || __atomic_load_n(&q->stop, __ATOMIC_ACQUIRE)) {
            reason = DP_EXIT_STOPPED;
            break;
        }
        if (fds[0].revents & POLLIN)
            drain(q->c.kick_fd);
    }
    stop_workers(q);
    q->exit_reason = reason;
    if (reason == DP_EXIT_HANDBACK) {
        uint64_t one = 1;
        ssize_t w;
        do w = write(q->c.handback_fd, &one, 8); while (w < 0 && errno == EINTR);
    }
    return NULL;
}

/* ---- iothreads ----------------------------------------------------------------- */

struct dp_iothread {
    pthread_t thread;
    int ctl_fd;                     /* written on attach, stop and exit */
    pthread_mutex_t lock;
    pthread_cond_t finished_cv;
    struct dp_queue *queues[DP_IOTHREAD_QUEUES];
    int nqueues;
    int exit;
    int tid;                        /* the thread's kernel id, 0 until it runs */
};

static void io_wake(struct dp_iothread *io)
{
    uint64_t one = 1;
    while (write(io->ctl_fd, &one, 8) < 0 && errno == EINTR)
        ;
}

/* The iothread lets go of q, whose turn ended with reason. */
static void io_finish(struct dp_iothread *io, struct dp_queue *q, int reason)
{
    stop_workers(q);
    q->exit_reason = reason;
    if (reason == DP_EXIT_HANDBACK) {
        uint64_t one = 1;
        ssize_t w;
        do w = write(q->c.handback_fd, &one, 8); while (w < 0 && errno == EINTR);
    }
    pthread_mutex_lock(&io->lock);
    for (int i = 0; i < io->nqueues; i++)
        if (io->queues[i] == q) {
            io->queues[i] = io->queues[--io->nqueues];
            break;
        }
    /* dp_stop may free q as soon as it sees this. */
    q->io_finished = 1;
    pthread_cond_broadcast(&io->finished_cv);
    pthread_mutex_unlock(&io->lock);
}

/* Each attached queue in turn: a turn serves what its ring has (process), then
 * one poll waits for any queue's kick or a change of the set. */
static void *dp_iothread_main(void *arg)
{
    struct dp_iothread *io = arg;
    struct dp_queue *qs[DP_IOTHREAD_QUEUES];
    struct pollfd fds[DP_IOTHREAD_QUEUES + 1];
    prctl(PR_SET_NAME, "kvmpy-iothread");
    pthread_mutex_lock(&io->lock);
    io->tid = (int)syscall(SYS_gettid);
    pthread_cond_broadcast(&io->finished_cv);
    pthread_mutex_unlock(&io->lock);
    for (;;) {
        pthread_mutex_lock(&io->lock);
        int n = io->nqueues, exiting = io->exit;
        memcpy(qs, io->queues, sizeof qs[0] * (size_t)n);
        pthread_mutex_unlock(&io->lock);
        if (exiting && n == 0)
            break;
        int live = 0;
        for (int i = 0; i < n; i++) {
            struct dp_queue *q = qs[i];
            if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE)) {
                io_finish(io, q, DP_EXIT_STOPPED);
                continue;
            }
            if (q->io_run) {
                q->io_run = 0;
                int reason = process(q);
                if (reason != DP_EXIT_RUNNING) {
                    io_finish(io, q, reason);
                    continue;
                }
            }
            qs[live++] = q;
        }
        int busy = 0;              /* a queue with more than its turn took: look, do not wait */
        fds[0] = (struct pollfd){io->ctl_fd, POLLIN, 0};
        for (int i = 0; i < live; i++) {
            fds[i + 1] = (struct pollfd){qs[i]->c.kick_fd, POLLIN, 0};
            busy |= qs[i]->io_run;
        }
        if (poll(fds, (nfds_t)live + 1, busy ? 0 : -1) < 0)
            continue;
        if (fds[0].revents & POLLIN)
            drain(io->ctl_fd);
        for (int i = 0; i < live; i++)
            if (fds[i + 1].revents & POLLIN) {
                drain(qs[i]->c.kick_fd);
                qs[i]->io_run = 1;
            }
    }
    return NULL;
}

struct dp_iothread *dp_iothread_new(int *err)
{
    struct dp_iothread *io = calloc(1, sizeof *io);
    if (!io) {
        *err = ENOMEM;
        return NULL;
    }
    io->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (io->ctl_fd < 0) {
        *err = errno;
        free(io);
        return NULL;
    }
    pthread_mutex_init(&io->lock, NULL);
    pthread_cond_init(&io->finished_cv, NULL);
    int r = kvmpy_start_thread_without_signals(&io->thread, dp_iothread_main, io);
    if (r) {
        *err = r;
        close(io->ctl_fd);
        pthread_cond_destroy(&io->finished_cv);
        pthread_mutex_destroy(&io->lock);
        free(io);
        return NULL;
    }
    /* Its id is known before anyone can ask (query-iothreads' thread-id). */
    pthread_mutex_lock(&io->lock);
    while (!io->tid)
        pthread_cond_wait(&io->finished_cv, &io->lock);
    pthread_mutex_unlock(&io->lock);
    *err = 0;
    return io;
}

int dp_iothread_tid(const struct dp_iothread *io)
{
    return io->tid;
}

/* After every queue it served was stopped. */
void dp_iothread_free(struct dp_iothread *io)
{
    if (!io)
        return;
    pthread_mutex_lock(&io->lock);
    io->exit = 1;
    pthread_mutex_unlock(&io->lock);
    io_wake(io);
    pthread_join(io->thread, NULL);
    close(io->ctl_fd);
    pthread_cond_destroy(&io->finished_cv);
    pthread_mutex_destroy(&io->lock);
    free(io);
}

struct dp_queue *dp_start(const struct dp_config *cfg, int *err)
{
    struct dp_queue *q;
    uint32_t size = cfg->size;
    *err = EINVAL;
    if (size == 0 || size > MAX_QUEUE_SIZE || (size & (size - 1)) || cfg->nregions < 0
        || cfg->nregions > DP_MAX_REGIONS)
        return NULL;
    q = calloc(1, sizeof *q);
    if (!q) {
        *err = ENOMEM;
        return NULL;
    }
    q->c = *cfg;
    q->desc = dp_gpa_to_host(cfg->regions, cfg->nregions, cfg->desc_addr, 16ull * size);
    q->avail = dp_gpa_to_host(cfg->regions, cfg->nregions, cfg->avail_addr, 4 + 2ull * size + 2);
    q->used = dp_gpa_to_host(cfg->regions, cfg->nregions, cfg->used_addr, 4 + 8ull * size + 2);
    if (!q->desc || !q->avail || !q->used || cfg->desc_addr % 16 || cfg->avail_addr % 2 || cfg->used_addr % 4) {
        free(q);
        return NULL;
    }
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->work_cv, NULL);
    pthread_cond_init(&q->done_cv, NULL);
    q->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->stop_fd < 0) {
        *err = errno;
        free(q);
        return NULL;
    }
    if (cfg->iothread) {
        struct dp_iothread *io = cfg->iothread;
        pthread_mutex_lock(&io->lock);
        int full = io->nqueues == DP_IOTHREAD_QUEUES || io->exit;
        if (!full) {
            q->io_run = 1;              /* what came in since the model's turn */
            io->queues[io->nqueues++] = q;
        }
        pthread_mutex_unlock(&io->lock);
        if (full) {
            *err = ENOSPC;
            close(q->stop_fd);
            free(q);
            return NULL;
        }
        io_wake(io);
        *err = 0;
        return q;
    }
    int r = kvmpy_start_thread_without_signals(&q->thread, dp_thread, q);
    if (r) {
        *err = r;
        close(q->stop_fd);
        free(q);
        return NULL;
    }
    *err = 0;
    return q;
}

void dp_stop(struct dp_queue *q, struct dp_indices *out)
{
    uint64_t one = 1;
    __atomic_store_n(&q->stop, 1, __ATOMIC_RELEASE);
    while (write(q->stop_fd, &one, 8) < 0 && errno == EINTR)
        ;
    if (q->c.iothread) {
        struct dp_iothread *io = q->c.iothread;
        io_wake(io);
        pthread_mutex_lock(&io->lock);
        while (!q->io_finished)
            pthread_cond_wait(&io->finished_cv, &io->lock);
        pthread_mutex_unlock(&io->lock);
    } else {
        pthread_join(q->thread, NULL);
    }
    out->next_avail = q->c.next_avail;
    out->next_used = q->c.next_used;
    out->signalled_valid = q->c.signalled_valid;
    out->signalled_used = q->c.signalled_used;
    out->exit_reason = q->exit_reason;
    out->completed = q->completed;
    out->deferred = q->deferred;
    out->ring_ops = q->ring_ops;
    out->ring_enters = q->ring_enters;
    out->interrupts = q->interrupts;
    out->interrupts_coalesced = q->interrupts_coalesced;
    close(q->stop_fd);
    free(q->bounce);
    pthread_cond_destroy(&q->done_cv);
    pthread_cond_destroy(&q->work_cv);
    pthread_mutex_destroy(&q->lock);
    free(q);
}
