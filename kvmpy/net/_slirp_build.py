"""cffi API-mode build of kvmpy's libslirp glue (kvmpy.net._slirp_cffi).

libslirp (Debian libslirp-dev) is QEMU's user-mode TCP/IP stack. The compiler
reads the real <slirp/libslirp.h>, so SlirpConfig's layout is its, not ours.

The per-packet work stays in C: frames from the guest (read from a
SOCK_SEQPACKET socketpair, one virtio-net header + frame per record) have the
checksum the guest left to the device completed and TSO frames cut into
segments, then go to slirp_input, slirp's send_packet writes header + frame back, and one "step"
polls libslirp's sockets (slirp_pollfds_fill, poll with no wait,
slirp_pollfds_poll) and mirrors what they wait for into a private epoll set,
whose single descriptor is what kvmpy's event loop waits on. Python runs once
per wake-up, not once per packet or per socket. What is rare (guest errors,
libslirp's timers, guestfwd data) goes to Python through extern "Python"
callbacks.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(r"""
typedef struct Slirp Slirp;
typedef int... socklen_t;
struct in_addr { uint32_t s_addr; ...; };
struct in6_addr { uint8_t s6_addr[16]; ...; };
struct sockaddr { ...; };
typedef enum SlirpTimerId { SLIRP_TIMER_RA, SLIRP_TIMER_NUM } SlirpTimerId;

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    bool disable_dns;
    bool disable_dhcp;
    ...;
} SlirpConfig;

const char *slirp_version_string(void);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port);
int slirp_add_hostxfwd(Slirp *slirp, const struct sockaddr *haddr, socklen_t haddrlen,
                       const struct sockaddr *gaddr, socklen_t gaddrlen, int flags);
int slirp_remove_hostxfwd(Slirp *slirp, const struct sockaddr *haddr, socklen_t haddrlen, int flags);
size_t slirp_socket_can_recv(Slirp *slirp, struct in_addr guest_addr, int guest_port);
void slirp_socket_recv(Slirp *slirp, struct in_addr guest_addr, int guest_port,
                       const uint8_t *buf, int size);
int slirp_remove_guestfwd(Slirp *slirp, struct in_addr guest_addr, int guest_port);
int slirp_add_unix(Slirp *slirp, const char *unixsock, struct in_addr *guest_addr, int guest_port);
char *slirp_connection_info(Slirp *slirp);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
void free(void *);

struct kvmpy_slirp {
    Slirp *slirp;
    int frame_fd;
    int epoll_fd;
    uint32_t timeout_ms;
    int sockets;
    int max_sockets;
    uint64_t to_guest;
    uint64_t to_guest_dropped;
    uint64_t from_guest;
    uint64_t from_guest_dropped;
    uint64_t flows_refused;
    uint32_t dns_intercept;
    uint64_t from_guest_gso;
    uint64_t csum_completed;
    int guest_csum;
    ...;
};

#define KVMPY_SLIRP_IDLE_MS ...
#define KVMPY_VNET_HDR_SIZE ...
#define KVMPY_MAX_FRAME ...
#define KVMPY_MAX_GSO_FRAME ...
#define KVMPY_MIN_GSO_SIZE ...

struct kvmpy_slirp *kvmpy_slirp_new(const SlirpConfig *cfg, int frame_fd, int max_sockets, void *handle);
void kvmpy_slirp_free(struct kvmpy_slirp *s);
int kvmpy_slirp_from_guest(struct kvmpy_slirp *s, int budget);
void kvmpy_slirp_step(struct kvmpy_slirp *s);
void kvmpy_slirp_input(struct kvmpy_slirp *s, const uint8_t *frame, int len);
int kvmpy_slirp_add_guestfwd(struct kvmpy_slirp *s, void *fwd_handle, struct in_addr *guest_addr, int guest_port);

extern "Python" void kvmpy_slirp_guest_error(const char *msg, void *handle);
extern "Python" void *kvmpy_slirp_timer_new(SlirpTimerId id, void *cb_opaque, void *handle);
extern "Python" void kvmpy_slirp_timer_free(void *timer, void *handle);
extern "Python" void kvmpy_slirp_timer_mod(void *timer, int64_t expire_ms, void *handle);
extern "Python" ssize_t kvmpy_slirp_guestfwd_write(const void *buf, size_t len, void *fwd_handle);
extern "Python" void kvmpy_slirp_dns_query(const uint8_t *frame, int len, void *handle);
int kvmpy_slirp_send_to_guest(struct kvmpy_slirp *s, const uint8_t *frame, int len);
void kvmpy_slirp_set_guest_csum(struct kvmpy_slirp *s, int on);
""")

ffibuilder.set_source("kvmpy.net._slirp_cffi", r"""
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <slirp/libslirp.h>


/* slirp_pollfds_fill never asks for less than this: a wait this long is "no timer due". */
#define KVMPY_SLIRP_IDLE_MS 1000
#define KVMPY_VNET_HDR_SIZE 12
/* An Ethernet frame of the 1500-byte MTU, with a VLAN tag: anything longer is dropped. */
#define KVMPY_MAX_FRAME 1522
/* With VIRTIO_NET_F_HOST_TSO4 the guest hands over TCP/IPv4 frames of up to 64 KiB
   (an IPv4 packet's limit) and the device cuts them into MTU-sized segments, as a
   NIC does: the guest's TCP then costs one pass per 64 KiB, not per 1460 bytes. */
#define KVMPY_MAX_GSO_FRAME (65535 + 18)
/* A smaller segment size would let one frame make thousands of segments. Linux never
   sends an MSS below 88 (TCP_MIN_SND_MSS 48 plus options). */
#define KVMPY_MIN_GSO_SIZE 88

/* virtio_net_hdr (virtio 1.x, little-endian fields) */
#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_ECN 0x80

struct kvmpy_watch { int fd; uint32_t events; };

struct kvmpy_slirp {
    Slirp *slirp;
    int frame_fd;              /* our end of the socketpair: vnet header + frame per record */
    int epoll_fd;              /* the sockets libslirp waits on; kvmpy's loop waits on this */
    uint32_t timeout_ms;       /* from the last fill: when libslirp wants to run its timers */
    int sockets;               /* sockets libslirp holds open */
    int max_sockets;           /* beyond this, guest packets that open new flows are dropped */
    uint64_t to_guest, to_guest_dropped, from_guest, from_guest_dropped, flows_refused;
    uint32_t dns_intercept;    /* network order: UDP to this address port 53 goes to Python, 0: off */
    uint64_t from_guest_gso;   /* TSO frames the guest handed over whole, cut into segments here */
    uint64_t csum_completed;   /* frames whose checksum the guest left to the device (NEEDS_CSUM) */
    int guest_csum;            /* VIRTIO_NET_F_GUEST_CSUM: frames to the guest say DATA_VALID */
    uint8_t *record;           /* one record from the guest: vnet header + frame, up to a TSO frame */
    uint8_t *segment;          /* one MTU-sized segment cut from a TSO frame */
    void *handle;
    uint8_t *live;             /* by fd: a socket libslirp registered and has not unregistered */
    int live_cap;
    struct pollfd *pfds;       /* the last fill, indexed as libslirp numbered them */
    int npfds, pfd_cap;
    struct kvmpy_watch *watched;   /* what epoll_fd holds, sorted by fd */
    int nwatched, watched_cap;
    struct kvmpy_watch *next;      /* scratch for the next sync */
    int next_cap;
};

static void kvmpy_slirp_guest_error(const char *msg, void *handle);
static void *kvmpy_slirp_timer_new(SlirpTimerId id, void *cb_opaque, void *handle);
static void kvmpy_slirp_timer_free(void *timer, void *handle);
static void kvmpy_slirp_timer_mod(void *timer, int64_t expire_ms, void *handle);
static ssize_t kvmpy_slirp_guestfwd_write(const void *buf, size_t len, void *fwd_handle);
static void kvmpy_slirp_dns_query(const uint8_t *frame, int len, void *handle);

static ssize_t cb_send_packet(const void *buf, size_t len, void *opaque)
{
    struct kvmpy_slirp *s = opaque;
    /* libslirp's frames carry correct checksums: with GUEST_CSUM the guest is told so
       and skips checking them; no segmentation offload either way. */
    static const uint8_t plain[KVMPY_VNET_HDR_SIZE];
    static const uint8_t valid[KVMPY_VNET_HDR_SIZE] = {VNET_F_DATA_VALID};
    const uint8_t *header = s->guest_csum ? valid : plain;
    struct iovec iov[2] = {{(void *)header, KVMPY_VNET_HDR_SIZE}, {(void *)buf, len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    if (len > KVMPY_MAX_FRAME || sendmsg(s->frame_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* The guest's RX queue is full (the socket buffer is the bound): drop, as a NIC does. */
        s->to_guest_dropped++;
    } else {
        s->to_guest++;
    }
    return (ssize_t)len;
}

static void cb_guest_error(const char *msg, void *opaque)
{
    kvmpy_slirp_guest_error(msg, ((struct kvmpy_slirp *)opaque)->handle);
}

static int64_t cb_clock_get_ns(void *opaque)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *cb_timer_new_opaque(SlirpTimerId id, void *cb_opaque, void *opaque)
{
    return kvmpy_slirp_timer_new(id, cb_opaque, ((struct kvmpy_slirp *)opaque)->handle);
}

static void cb_timer_free(void *timer, void *opaque)
{
    kvmpy_slirp_timer_free(timer, ((struct kvmpy_slirp *)opaque)->handle);
}

static void cb_timer_mod(void *timer, int64_t expire_ms, void *opaque)
{
    kvmpy_slirp_timer_mod(timer, expire_ms, ((struct kvmpy_slirp *)opaque)->handle);
}

static int watch_index(struct kvmpy_slirp *s, int fd)
{
    int lo = 0, hi = s->nwatched;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (s->watched[mid].fd < fd) lo = mid + 1; else hi = mid;
    }
    return lo < s->nwatched && s->watched[lo].fd == fd ? lo : -1;
}

static int grow(void **array, int *cap, int need, size_t item);

/* libslirp registers each socket it makes and unregisters it before closing it:
   that is the count the flow bound holds to. A new socket may also reuse a closed
   one's number, which epoll dropped with the old file: forget the number so the
   next sync adds it afresh. */
static void forget_watch(struct kvmpy_slirp *s, int fd)
{
    int i = watch_index(s, fd);
    if (i >= 0) {
        epoll_ctl(s->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
        memmove(&s->watched[i], &s->watched[i + 1], (s->nwatched - i - 1) * sizeof *s->watched);
        s->nwatched--;
    }
}

static void cb_register_poll_fd(int fd, void *opaque)
{
    struct kvmpy_slirp *s = opaque;
    if (fd >= 0) {
        int old = s->live_cap;
        if (grow((void **)&s->live, &s->live_cap, fd + 1, 1) == 0) {
            memset(s->live + old, 0, s->live_cap - old);
            if (!s->live[fd]) {
                s->live[fd] = 1;
                s->sockets++;
            }
        }
    }
    forget_watch(s, fd);
}

static void cb_unregister_poll_fd(int fd, void *opaque)
{
    struct kvmpy_slirp *s = opaque;
    if (fd >= 0 && fd < s->live_cap && s->live[fd]) {
        s->live[fd] = 0;
        s->sockets--;
    }
    forget_watch(s, fd);
}

static void cb_notify(void *opaque)
{
    /* Every call into libslirp is followed by a fill, which is what notify asks for. */
}

static const SlirpCb kvmpy_callbacks = {
    .send_packet = cb_send_packet,
    .guest_error = cb_guest_error,
    .clock_get_ns = cb_clock_get_ns,
    .timer_free = cb_timer_free,
    .timer_mod = cb_timer_mod,
    .register_poll_fd = cb_register_poll_fd,
    .unregister_poll_fd = cb_unregister_poll_fd,
    .notify = cb_notify,
    .timer_new_opaque = cb_timer_new_opaque,
};

static int grow(void **array, int *cap, int need, size_t item)
{
    if (need <= *cap)
        return 0;
    int n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *p = realloc(*array, n * item);
    if (!p)
        return -1;
    *array = p;
    *cap = n;
    return 0;
}

static int add_poll(int fd, int events, void *opaque)
{
    struct kvmpy_slirp *s = opaque;
    if (grow((void **)&s->pfds, &s->pfd_cap, s->npfds + 1, sizeof *s->pfds) < 0)
        return -1;      /* libslirp then does not poll this socket this round */
    short ev = 0;
    if (events & SLIRP_POLL_IN) ev |= POLLIN;
    if (events & SLIRP_POLL_OUT) ev |= POLLOUT;
    if (events & SLIRP_POLL_PRI) ev |= POLLPRI;
    s->pfds[s->npfds] = (struct pollfd){.fd = fd, .events = ev};
    return s->npfds++;
}

static int get_revents(int idx, void *opaque)
{
    struct kvmpy_slirp *s = opaque;
    if (idx < 0 || idx >= s->npfds)
        return 0;
    short rev = s->pfds[idx].revents;
    int r = 0;
    if (rev & POLLIN) r |= SLIRP_POLL_IN;
    if (rev & POLLOUT) r |= SLIRP_POLL_OUT;
    if (rev & POLLPRI) r |= SLIRP_POLL_PRI;
    if (rev & (POLLERR | POLLNVAL)) r |= SLIRP_POLL_ERR;
    if (rev & POLLHUP) r |= SLIRP_POLL_HUP;
    return r;
}

static int by_fd(const void *a, const void *b)
{
    int x = ((const struct kvmpy_watch *)a)->fd, y = ((const struct kvmpy_watch *)b)->fd;
    return (x > y) - (x < y);
}

/* Make epoll_fd wait for what the last fill asked, changing only what changed. */
static void sync_epoll(struct kvmpy_slirp *s)
{
    int n = 0;
    if (grow((void **)&s->next, &s->next_cap, s->npfds + 1, sizeof *s->next) < 0)
        return;
    for (int i = 0; i < s->npfds; i++) {
        uint32_t ev = 0;
        if (s->pfds[i].events & POLLIN) ev |= EPOLLIN;
        if (s->pfds[i].events & POLLOUT) ev |= EPOLLOUT;
        if (s->pfds[i].events & POLLPRI) ev |= EPOLLPRI;
        s->next[n++] = (struct kvmpy_watch){s->pfds[i].fd, ev};
    }
    qsort(s->next, n, sizeof *s->next, by_fd);
    int m = 0;      /* merge duplicates */
    for (int i = 0; i < n; i++) {
        if (m && s->next[m - 1].fd == s->next[i].fd)
            s->next[m - 1].events |= s->next[i].events;
        else
            s->next[m++] = s->next[i];
    }
    int i = 0, j = 0;
    while (i < s->nwatched || j < m) {
        struct kvmpy_watch *old = i < s->nwatched ? &s->watched[i] : NULL;
        struct kvmpy_watch *new = j < m ? &s->next[j] : NULL;
        if (old && (!new || old->fd < new->fd)) {
            epoll_ctl(s->epoll_fd, EPOLL_CTL_DEL, old->fd, NULL);
            i++;
        } else if (new && (!old || new->fd < old->fd)) {
            struct epoll_event e = {.events = new->events, .data.fd = new->fd};
            if (epoll_ctl(s->epoll_fd, EPOLL_CTL_ADD, new->fd, &e) < 0 && errno == EEXIST)
                epoll_ctl(s->epoll_fd, EPOLL_CTL_MOD, new->fd, &e);
            j++;
        } else {
            if (old->events != new->events) {
                struct epoll_event e = {.events = new->events, .data.fd = new->fd};
                if (epoll_ctl(s->epoll_fd, EPOLL_CTL_MOD, new->fd, &e) < 0 && errno == ENOENT)
                    epoll_ctl(s->epoll_fd, EPOLL_CTL_ADD, new->fd, &e);
            }
            i++, j++;
        }
    }
    struct kvmpy_watch *t = s->watched;
    int tc = s->watched_cap;
    s->watched = s->next;
    s->watched_cap = s->next_cap;
    s->nwatched = m;
    s->next = t;
    s->next_cap = tc;
}

static void fill(struct kvmpy_slirp *s)
{
    s->npfds = 0;
    s->timeout_ms = UINT32_MAX;
    slirp_pollfds_fill(s->slirp, &s->timeout_ms, add_poll, s);
    sync_epoll(s);
}

void kvmpy_slirp_step(struct kvmpy_slirp *s)
{
    int rc = 0;
    if (s->npfds) {
        rc = poll(s->pfds, s->npfds, 0);
        if (rc < 0)
            for (int i = 0; i < s->npfds; i++) s->pfds[i].revents = 0;
    }
    slirp_pollfds_poll(s->slirp, rc < 0, get_revents, s);
    fill(s);
}

/* Does this IPv4/IPv6 packet open a flow (a host socket) in libslirp? TCP SYN, and
   UDP and ICMP, whose sockets libslirp makes per guest port or echo id. */
static int opens_flow(const uint8_t *f, int len)
{
    if (len < 14)
        return 0;
    int type = f[12] << 8 | f[13], off = 14, proto;
    if (type == 0x0800 && len >= off + 20) {
        int ihl = (f[off] & 15) * 4;
        proto = f[off + 9];
        off += ihl;
    } else if (type == 0x86dd && len >= off + 40) {
        proto = f[off + 6];
        off += 40;
    } else {
        return 0;
    }
    if (proto == IPPROTO_TCP)
        return len >= off + 14 && (f[off + 13] & 0x12) == 0x02;   /* SYN without ACK */
    return proto == IPPROTO_UDP || proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

int kvmpy_slirp_send_to_guest(struct kvmpy_slirp *s, const uint8_t *frame, int len)
{
    uint64_t before = s->to_guest;
    cb_send_packet(frame, (size_t)len, s);
    return s->to_guest != before ? 0 : -1;
}

/* An unfragmented IPv4 UDP datagram to dns_intercept:53? */
static int is_dns_query(const struct kvmpy_slirp *s, const uint8_t *f, int len)
{
    if (!s->dns_intercept || len < 14 + 20 + 8 || f[12] != 0x08 || f[13] != 0x00)
        return 0;
    const uint8_t *ip = f + 14;
    int ihl = (ip[0] & 15) * 4;
    uint32_t dst;
    memcpy(&dst, ip + 16, 4);
    if ((ip[0] >> 4) != 4 || ihl < 20 || len < 14 + ihl + 8 || ip[9] != IPPROTO_UDP || dst != s->dns_intercept)
        return 0;
    if ((ip[6] & 0x3f) || ip[7])       /* more fragments, or a fragment offset */
        return 0;
    return ip[ihl + 2] == 0 && ip[ihl + 3] == 53;
}

void kvmpy_slirp_input(struct kvmpy_slirp *s, const uint8_t *frame, int len)
{
    if (len < 14 || len > KVMPY_MAX_FRAME) {
        s->from_guest_dropped++;
        return;
    }
    if (is_dns_query(s, frame, len)) {
        s->from_guest++;
        kvmpy_slirp_dns_query(frame, len, s->handle);
        return;
    }
    if (s->sockets >= s->max_sockets && opens_flow(frame, len)) {
        s->flows_refused++;
        s->from_guest_dropped++;
        return;
    }
    s->from_guest++;
    slirp_input(s->slirp, frame, len);
}

static uint64_t csum_add(uint64_t sum, const uint8_t *p, size_t len)
{
    for (; len > 1; p += 2, len -= 2)
        sum += (uint32_t)p[0] << 8 | p[1];
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* VIRTIO_NET_HDR_F_NEEDS_CSUM: the guest left the 16-bit one's-complement sum from
   csum_start to the end (its field holding the pseudo-header's sum) to the device.
   0 on success, -1 when the offsets do not fit the frame. */
static int complete_csum(uint8_t *f, int len, const uint8_t *hdr)
{
    int start = le16(hdr + 6), offset = le16(hdr + 8);
    if (start >= len || offset > len - start - 2)
        return -1;
    uint16_t sum = csum_fold(csum_add(0, f + start, len - start));
    put16(f + start + offset, sum ? sum : 0xffff);     /* 0 means "no checksum" to UDP */
    return 0;
}

/* A TCP/IPv4 TSO frame cut into segments of gso_size payload bytes, each with its
   own IP length, id and checksum and TCP sequence number, flags and checksum, as the
   NIC the guest thinks it has would send them. -1: not a frame this can cut. */
static int input_tso4(struct kvmpy_slirp *s, const uint8_t *f, int len, int gso_size)
{
    int l2 = 14;
    if (len < l2 + 20)
        return -1;
    if (f[12] == 0x81 && f[13] == 0x00)
        l2 = 18;
    if (len < l2 + 20 || f[l2 - 2] != 0x08 || f[l2 - 1] != 0x00)
        return -1;
    const uint8_t *ip = f + l2;
    int ihl = (ip[0] & 15) * 4;
    if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != IPPROTO_TCP || len < l2 + ihl + 20)
        return -1;
    const uint8_t *tcp = ip + ihl;
    int thl = (tcp[12] >> 4) * 4;
    int headers = l2 + ihl + thl;
    int payload = len - headers;
    if (thl < 20 || payload <= 0 || gso_size < KVMPY_MIN_GSO_SIZE || headers + gso_size > KVMPY_MAX_FRAME)
        return -1;
    uint32_t seq = (uint32_t)tcp[4] << 24 | tcp[5] << 16 | tcp[6] << 8 | tcp[7];
    uint16_t id = get16(ip + 4);
    s->from_guest_gso++;
    for (int off = 0, i = 0; off < payload; off += gso_size, i++) {
        int n = payload - off < gso_size ? payload - off : gso_size;
        uint8_t *seg = s->segment, *sip = seg + l2, *stcp = sip + ihl;
        memcpy(seg, f, headers);
        memcpy(seg + headers, f + headers + off, n);
        put16(sip + 2, (uint16_t)(ihl + thl + n));
        put16(sip + 4, (uint16_t)(id + i));
        put16(sip + 10, 0);
        put16(sip + 10, csum_fold(csum_add(0, sip, ihl)));
        uint32_t sseq = seq + (uint32_t)off;
        stcp[4] = sseq >> 24; stcp[5] = sseq >> 16; stcp[6] = sseq >> 8; stcp[7] = (uint8_t)sseq;
        if (off + n < payload)
            stcp[13] &= ~0x09;      /* FIN and PSH: the last segment's */
        if (i > 0)
            stcp[13] &= ~0x80;      /* CWR: the first's */
        put16(stcp + 16, 0);
        uint64_t sum = csum_add(0, sip + 12, 8) + IPPROTO_TCP + (uint32_t)(thl + n);
        put16(stcp + 16, csum_fold(csum_add(sum, stcp, thl + n)));
        kvmpy_slirp_input(s, seg, headers + n);
    }
    return 0;
}

/* One record from the guest: finish what it left to the device (checksum, TSO),
   then hand the frame(s) to libslirp. A header that does not fit its frame is the
   guest's error: the frame is dropped and counted. */
static void input_record(struct kvmpy_slirp *s, uint8_t *record, int n)
{
    const uint8_t *hdr = record;
    uint8_t *f = record + KVMPY_VNET_HDR_SIZE;
    int len = n - KVMPY_VNET_HDR_SIZE;
    int gso = hdr[1] & ~VNET_GSO_ECN;
    if (gso == VNET_GSO_NONE) {
        if (hdr[0] & VNET_F_NEEDS_CSUM) {
            if (len > KVMPY_MAX_FRAME || complete_csum(f, len, hdr) < 0) {
                s->from_guest_dropped++;
                return;
            }
            s->csum_completed++;
        }
        kvmpy_slirp_input(s, f, len);
        return;
    }
    /* The segments' checksums are computed whole: NEEDS_CSUM's partial sum is not needed. */
    if (gso != VNET_GSO_TCPV4 || input_tso4(s, f, len, le16(hdr + 4)) < 0)
        s->from_guest_dropped++;
}

int kvmpy_slirp_from_guest(struct kvmpy_slirp *s, int budget)
{
    const ssize_t room = KVMPY_VNET_HDR_SIZE + KVMPY_MAX_GSO_FRAME + 1;
    int done = 0;
    while (done < budget) {
        ssize_t n = recv(s->frame_fd, s->record, room, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0)
            break;
        done++;
        if (n == 0) {       /* the NIC's end is closed: nothing more will come */
            done = -1;
            break;
        }
        if (n <= KVMPY_VNET_HDR_SIZE || n > room - 1) {
            s->from_guest_dropped++;
            continue;
        }
        input_record(s, s->record, (int)n);
    }
    kvmpy_slirp_step(s);
    return done;
}

void kvmpy_slirp_set_guest_csum(struct kvmpy_slirp *s, int on)
{
    s->guest_csum = on;
}

struct kvmpy_slirp *kvmpy_slirp_new(const SlirpConfig *cfg, int frame_fd, int max_sockets, void *handle)
{
    struct kvmpy_slirp *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->frame_fd = frame_fd;
    s->max_sockets = max_sockets;
    s->handle = handle;
    s->record = malloc(KVMPY_VNET_HDR_SIZE + KVMPY_MAX_GSO_FRAME + 1);
    s->segment = malloc(KVMPY_MAX_FRAME);
    s->epoll_fd = s->record && s->segment ? epoll_create1(EPOLL_CLOEXEC) : -1;
    if (s->epoll_fd < 0) {
        free(s->record);
        free(s->segment);
        free(s);
        return NULL;
    }
    s->slirp = slirp_new(cfg, &kvmpy_callbacks, s);
    if (!s->slirp) {
        close(s->epoll_fd);
        free(s->record);
        free(s->segment);
        free(s);
        return NULL;
    }
    fill(s);
    return s;
}

void kvmpy_slirp_free(struct kvmpy_slirp *s)
{
    slirp_cleanup(s->slirp);
    close(s->epoll_fd);
    free(s->pfds);
    free(s->watched);
    free(s->next);
    free(s->live);
    free(s->record);
    free(s->segment);
    free(s);
}

static ssize_t guestfwd_write(const void *buf, size_t len, void *fwd_handle)
{
    return kvmpy_slirp_guestfwd_write(buf, len, fwd_handle);
}

int kvmpy_slirp_add_guestfwd(struct kvmpy_slirp *s, void *fwd_handle, struct in_addr *guest_addr, int guest_port)
{
    return slirp_add_guestfwd(s->slirp, guestfwd_write, fwd_handle, guest_addr, guest_port);
}
""", libraries=["slirp"], extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
