/* CPython binding: kvmpy._tcg.Cpu, a thin handle over struct CPU.
 * The Python wrapper (kvmpy/vcpu/tcg.py) converts to the Regs/SRegs dataclasses. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>
#include "tcg.h"
#include "flags.h"
#include "native/native.h"
#include "thread_start.h"

/* A guest write that only signals an eventfd (a virtio queue notify): the
 * translator's ioeventfd. size 0 matches any size; has_match 0 any value. */
typedef struct {
    uint64_t addr, match;
    uint32_t size;
    int pio, has_match, fd;
} Doorbell;

typedef struct {
    PyObject_HEAD
    CPU *cpu;
    Py_buffer bufs[MAX_RAM];
    int nbufs;
    int running;
    /* run_decoded handed a read to the loop: its value comes back in access[3] */
    int decoded_read;
    /* The GuestMemory the RAM list was last synced from, and its generations then
     * (watch_memory): run_decoded asks for a resync when they moved. */
    PyObject *memory;
    long long mem_generation, mem_protection;
    Py_ssize_t mem_regions;
    /* doorbells: added and removed from any thread, rung by the vCPU's thread
     * between exits with the GIL released */
    pthread_mutex_t bell_lock;
    Doorbell *bells;
    int nbells, bells_cap, bell_lock_ready;
    /* stats(): exits run_decoded returned decoded, doorbell writes rung in C */
    uint64_t st_decoded, st_doorbells;
    /* kick_at: a thread of the core's own kicks the CPU at a deadline (the LAPIC
     * timer's), so no Python thread wakes up for it; started at the first kick_at */
    pthread_t alarm_thread;
    pthread_mutex_t alarm_lock;
    pthread_cond_t alarm_cond;
    int alarm_ready, alarm_started, alarm_stop;
    int64_t alarm_deadline;          /* CLOCK_MONOTONIC ns; -1: none */
    uint64_t st_alarms;
    PyObject *port_queue;            /* the PortQueueObject behind cpu->port_queue */
} CpuObject;

/* run_decoded's answer when the guest memory map changed since watch_memory: the
 * Python side syncs and runs again (not an exit kind, not a DECODED_* value) */
#define RUN_RESYNC_MEMORY 0x80
/* kvmpy.hv.exits.DECODED_*: one port or MMIO access, decoded */
enum { DECODED_PIO_WRITE = 0x100, DECODED_PIO_READ, DECODED_MMIO_WRITE, DECODED_MMIO_READ,
       DECODED_AFTER_QUEUED = 0x200 };

/* kvmpy._tcg.PortQueue: a machine's queued port writes (tcg.h), shared by its Cpus */
typedef struct {
    PyObject_HEAD
    PortQueue *q;
} PortQueueObject;

static void release_ram(CpuObject *self)
{
    CPU *c = self->cpu;
    for (int k = 0; k < self->nbufs; k++)
        PyBuffer_Release(&self->bufs[k]);
    self->nbufs = 0;
    if (c) {
        /* other vCPUs' threads walk our RAM list to forward code invalidations */
        uint8_t *codes[MAX_RAM];
        ram_registry_lock();
        int n = c->nram;
        for (int k = 0; k < n; k++)
            codes[k] = c->ram[k].code;
        c->nram = 0;
        ram_registry_unlock();
        for (int k = 0; k < n; k++)
            code_bitmap_put(codes[k]);
        block_cache_flush(c);
        tlb_flush(c, 1);
    }
}

static void alarm_shutdown(CpuObject *self);

static void Cpu_dealloc(CpuObject *self)
{
    alarm_shutdown(self);
    if (self->cpu)
        cpu_unregister(self->cpu);
    release_ram(self);
    Py_CLEAR(self->memory);
    if (self->cpu)
        self->cpu->port_queue = 0;
    Py_CLEAR(self->port_queue);
    free(self->bells);
    if (self->bell_lock_ready)
        pthread_mutex_destroy(&self->bell_lock);
    if (self->cpu) {
        free(self->cpu->blocks);
        free(self->cpu->insn_pool);
        free(self->cpu->hash);
        native_arena_free(self->cpu);
        free(self->cpu);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Cpu_init(CpuObject *self, PyObject *args, PyObject *kw)
{
    int index = 0;
    static char *kwlist[] = { "cpu_index", NULL };
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i", kwlist, &index))
        return -1;
    CPU *c = aligned_alloc(64, (sizeof(CPU) + 63) & ~63ul);
    if (!c) {
        PyErr_NoMemory();
        return -1;
    }
    memset(c, 0, sizeof *c);
    c->cpu_index = index;
    c->max_blocks = 1 << 17;
    c->max_insns = 1 << 21;
    c->hash_size = 1 << 16;
    c->blocks = calloc(c->max_blocks, sizeof(Block));
    c->insn_pool = calloc(c->max_insns, sizeof(Insn));
    c->hash = calloc(c->hash_size, sizeof(Block *));
    if (!c->blocks || !c->insn_pool || !c->hash) {
        free(c->blocks);
        free(c->insn_pool);
        free(c->hash);
        free(c);
        PyErr_NoMemory();
        return -1;
    }
    cpu_init(c);
    c->cpu_index = index;
    c->native_threshold = native_threshold_from_env();
    if (native_arena_init(c) < 0)
        c->native_threshold = NATIVE_OFF;
    self->cpu = c;
    if (!self->bell_lock_ready) {
        pthread_mutex_init(&self->bell_lock, NULL);
        self->bell_lock_ready = 1;
    }
    if (!self->alarm_ready) {
        pthread_condattr_t attr;
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&self->alarm_cond, &attr);
        pthread_condattr_destroy(&attr);
        pthread_mutex_init(&self->alarm_lock, NULL);
        self->alarm_deadline = -1;
        self->alarm_ready = 1;
    }
    cpu_register(c);
    return 0;
}

static PyObject *Cpu_add_ram(CpuObject *self, PyObject *args)
{
    unsigned long long gpa;
    PyObject *obj;
    int readonly = 0;
    if (!PyArg_ParseTuple(args, "KO|p", &gpa, &obj, &readonly))
        return NULL;
    CPU *c = self->cpu;
    if (c->nram >= MAX_RAM) {
        PyErr_SetString(PyExc_ValueError, "too many RAM regions");
        return NULL;
    }
    Py_buffer *b = &self->bufs[self->nbufs];
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if ((gpa & 0xfff) || (b->len & 0xfff) || b->len == 0) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "RAM regions must be page aligned");
        return NULL;
    }
    uint8_t *code = code_bitmap_get(b->buf, b->len);   /* shared by every vCPU on this RAM */
    if (!code) {
        PyBuffer_Release(b);
        return PyErr_NoMemory();
    }
    ram_registry_lock();
    RamRegion *r = &c->ram[c->nram];
    r->gpa = gpa;
    r->size = b->len;
    r->host = b->buf;
    r->code = code;
    r->readonly = readonly;
    c->nram++;
    ram_registry_unlock();
    self->nbufs++;
    tlb_flush(c, 1);
    Py_RETURN_NONE;
}

/* set_ram_readonly(gpa, readonly): the region starting at gpa becomes ROM or RAM
 * again (the chipset's shadow-RAM write protection); on the vCPU's own thread,
 * outside run(). */
static PyObject *Cpu_set_ram_readonly(CpuObject *self, PyObject *args)
{
    unsigned long long gpa;
    int readonly;
    if (!PyArg_ParseTuple(args, "Kp", &gpa, &readonly))
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "set_ram_readonly while the vCPU runs");
        return NULL;
    }
    CPU *c = self->cpu;
    for (int k = 0; k < c->nram; k++)
        if (c->ram[k].gpa == gpa)
            c->ram[k].readonly = readonly;
    tlb_flush(c, 1);   /* the write tags of the fast path follow the new protection */
    Py_RETURN_NONE;
}

static PyObject *Cpu_clear_ram(CpuObject *self, PyObject *unused)
{
    release_ram(self);
    /* this object is not GC-tracked: its reference must not hold a cycle through the
     * memory's listeners once the vCPU is closed */
    Py_CLEAR(self->memory);
    Py_RETURN_NONE;
}

/* The one access the last exit stopped at, or 0 (rep string I/O, nothing logged) */
static Access *single_access(CPU *c)
{
    if (c->nacc == 0)
        return 0;
    Access *a = &c->acc[c->nacc - 1];
    return a->count == 1 ? a : 0;
}

/* A guest write a doorbell takes: its eventfd is signalled and the write is done
 * (the instruction completes at the next cpu_run, as after any device write), so
 * a virtio queue notify costs no trip through Python, as KVM's ioeventfd. */
static int ring_doorbell(CpuObject *self, int kind, Access *a)
{
    if (!a || !a->write || a->size > 8)
        return 0;
    uint64_t value = 0;
    memcpy(&value, a->data, a->size);
    int pio = kind == EXIT_IO, rung = 0;
    pthread_mutex_lock(&self->bell_lock);
    for (int k = 0; k < self->nbells; k++) {
        Doorbell *d = &self->bells[k];
        if (d->addr == a->addr && d->pio == pio && (!d->size || d->size == a->size) &&
            (!d->has_match || d->match == value)) {
            uint64_t one = 1;
            ssize_t n;
            do
                n = write(d->fd, &one, sizeof one);
            while (n < 0 && errno == EINTR);
            rung = 1;
            self->st_doorbells++;
            break;
        }
    }
    pthread_mutex_unlock(&self->bell_lock);
    return rung;
}

/* cpu_run until an exit the VMM must see (without the GIL) */
static int run_serving_doorbells(CpuObject *self)
{
    CPU *c = self->cpu;
    for (;;) {
        int r = cpu_run(c);
        if ((r == EXIT_IO || r == EXIT_MMIO) && ring_doorbell(self, r, single_access(c)))
            continue;
        return r;
    }
}

static PyObject *Cpu_run(CpuObject *self, PyObject *unused)
{
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "run() is already executing on another thread");
        return NULL;
    }
    int r;
    self->running = 1;
    self->decoded_read = 0;
    uint64_t returned = 0;
    Py_BEGIN_ALLOW_THREADS
    r = run_serving_doorbells(self);
    if (self->cpu->profiling)
        returned = now_ns();
    Py_END_ALLOW_THREADS
    /* --trace profile: how long the exit waited for the GIL (other Python threads) */
    if (returned)
        self->cpu->st_gil_wait_ns += now_ns() - returned;
    self->running = 0;
    return PyLong_FromLong(r);
}

static PyObject *str_generation, *str_protection_generation, *str_regions;

static int attr_ll(PyObject *o, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* 1 if the watched GuestMemory's map or protection moved since watch_memory, -1 on error */
static int memory_moved(CpuObject *self)
{
    long long gen, prot;
    if (attr_ll(self->memory, str_generation, &gen) < 0 ||
        attr_ll(self->memory, str_protection_generation, &prot) < 0)
        return -1;
    PyObject *regions = PyObject_GetAttr(self->memory, str_regions);
    if (!regions)
        return -1;
    Py_ssize_t n = PyObject_Size(regions);
    Py_DECREF(regions);
    if (n < 0)
        return -1;
    return gen != self->mem_generation || prot != self->mem_protection || n != self->mem_regions;
}

/* watch_memory(memory, generation, protection_generation, regions): the RAM list was
 * synced from `memory` at these values (run_decoded compares) */
static PyObject *Cpu_watch_memory(CpuObject *self, PyObject *args)
{
    PyObject *memory;
    long long gen, prot;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OLLn", &memory, &gen, &prot, &n))
        return NULL;
    Py_INCREF(memory);
    Py_XSETREF(self->memory, memory);
    self->mem_generation = gen;
    self->mem_protection = prot;
    self->mem_regions = n;
    Py_RETURN_NONE;
}

/* run_decoded(access): run() for the vCPU loop's fast path (kvmpy.hv.exits.DecodedExits).
 * One port or MMIO access of up to 8 bytes comes back as DECODED_*, with access[0]
 * the port or address, access[1] the size and, for a write, access[2] the value; a
 * read's value is taken from access[3] at the next call. Anything else is the exit
 * kind (the exit attributes come from exit_access()), or RUN_RESYNC_MEMORY. */
static PyObject *Cpu_run_decoded(CpuObject *self, PyObject *access)
{
    if (!PyList_CheckExact(access) || PyList_GET_SIZE(access) < 4) {
        PyErr_SetString(PyExc_TypeError, "run_decoded wants a list of 4");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "run() is already executing on another thread");
        return NULL;
    }
    CPU *c = self->cpu;
    if (self->decoded_read) {
        self->decoded_read = 0;
        Access *a = single_access(c);
        if (a && !a->write && a->size <= 8) {
            uint64_t v = PyLong_AsUnsignedLongLongMask(PyList_GET_ITEM(access, 3));
            if (v == (uint64_t)-1 && PyErr_Occurred())
                return NULL;
            memcpy(a->data, &v, a->size);
        }
    }
    if (self->memory) {
        int moved = memory_moved(self);
        if (moved < 0)
            return NULL;
        if (moved)
            return PyLong_FromLong(RUN_RESYNC_MEMORY);
    }
    int r;
    self->running = 1;
    uint64_t returned = 0;
    Py_BEGIN_ALLOW_THREADS
    r = run_serving_doorbells(self);
    if (c->profiling)
        returned = now_ns();
    Py_END_ALLOW_THREADS
    if (returned)
        c->st_gil_wait_ns += now_ns() - returned;
    self->running = 0;
    Access *a = (r == EXIT_IO || r == EXIT_MMIO) ? single_access(c) : 0;
    if (!a || a->size > 8)
        return PyLong_FromLong(r);
    PyObject *addr = PyLong_FromUnsignedLongLong(a->addr), *size = PyLong_FromLong(a->size), *value = 0;
    if (a->write) {
        uint64_t v = 0;
        memcpy(&v, a->data, a->size);
        value = PyLong_FromUnsignedLongLong(v);
    }
    if (!addr || !size || (a->write && !value)) {
        Py_XDECREF(addr);
        Py_XDECREF(size);
        Py_XDECREF(value);
        return NULL;
    }
    PyList_SetItem(access, 0, addr);
    PyList_SetItem(access, 1, size);
    if (value)
        PyList_SetItem(access, 2, value);
    else
        self->decoded_read = 1;
    self->st_decoded++;
    int queued = c->port_queue && atomic_load(&c->port_queue->count) ? DECODED_AFTER_QUEUED : 0;
    return PyLong_FromLong((r == EXIT_IO ? DECODED_PIO_WRITE : DECODED_MMIO_WRITE) + !a->write + queued);
}

/* add_doorbell(fd, addr, size, datamatch, pio): guest writes to addr (of `size` bytes,
 * 0: any; of value datamatch, None: any) signal the eventfd fd instead of exiting.
 * Thread-safe. */
static PyObject *Cpu_add_doorbell(CpuObject *self, PyObject *args)
{
    int fd, pio;
    unsigned long long addr;
    unsigned int size;
    PyObject *match;
    if (!PyArg_ParseTuple(args, "iKIOp", &fd, &addr, &size, &match, &pio))
        return NULL;
    Doorbell d = { .addr = addr, .size = size, .pio = pio, .fd = fd };
    if (match != Py_None) {
        d.match = PyLong_AsUnsignedLongLongMask(match);
        if (d.match == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        d.has_match = 1;
    }
    if (size > 8 || fd < 0) {
        PyErr_Format(PyExc_ValueError, "doorbell: size %u, fd %d", size, fd);
        return NULL;
    }
    pthread_mutex_lock(&self->bell_lock);
    if (self->nbells == self->bells_cap) {
        int cap = self->bells_cap ? 2 * self->bells_cap : 16;
        Doorbell *more = realloc(self->bells, cap * sizeof *more);
        if (!more) {
            pthread_mutex_unlock(&self->bell_lock);
            return PyErr_NoMemory();
        }
        self->bells = more;
        self->bells_cap = cap;
    }
    self->bells[self->nbells++] = d;
    pthread_mutex_unlock(&self->bell_lock);
    Py_RETURN_NONE;
}

/* remove_doorbell(fd): once this returns, no write signals fd (it may be closed) */
static PyObject *Cpu_remove_doorbell(CpuObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    pthread_mutex_lock(&self->bell_lock);
    int k = 0;
    for (int j = 0; j < self->nbells; j++)
        if (self->bells[j].fd != fd)
            self->bells[k++] = self->bells[j];
    self->nbells = k;
    pthread_mutex_unlock(&self->bell_lock);
    Py_RETURN_NONE;
}


/* ---- kick_at: the core's alarm ---- */

static int64_t monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *alarm_main(void *arg)
{
    CpuObject *self = arg;
    /* Itself, as the data planes' threads: else it keeps its creator's name, the vCPU's. */
    prctl(PR_SET_NAME, "kvmpy-tcg-alarm");
    pthread_mutex_lock(&self->alarm_lock);
    while (!self->alarm_stop) {
        int64_t due = self->alarm_deadline;
        if (due < 0) {
            pthread_cond_wait(&self->alarm_cond, &self->alarm_lock);
            continue;
        }
        if (monotonic_ns() >= due) {
            self->alarm_deadline = -1;
            self->st_alarms++;
            atomic_store(&self->cpu->kicked, 1);
            atomic_store(&self->cpu->exit_request, 1);
            continue;
        }
        struct timespec ts = { .tv_sec = due / 1000000000, .tv_nsec = due % 1000000000 };
        pthread_cond_timedwait(&self->alarm_cond, &self->alarm_lock, &ts);
    }
    pthread_mutex_unlock(&self->alarm_lock);
    return NULL;
}

static void alarm_shutdown(CpuObject *self)
{
    if (!self->alarm_ready)
        return;
    if (self->alarm_started) {
        pthread_mutex_lock(&self->alarm_lock);
        self->alarm_stop = 1;
        pthread_cond_signal(&self->alarm_cond);
        pthread_mutex_unlock(&self->alarm_lock);
        pthread_join(self->alarm_thread, NULL);
        self->alarm_started = 0;
    }
    pthread_cond_destroy(&self->alarm_cond);
    pthread_mutex_destroy(&self->alarm_lock);
    self->alarm_ready = 0;
}

/* kick_at(deadline_ns): run() returns EXIT_INTR (as after kick()) once CLOCK_MONOTONIC
 * (time.monotonic_ns) reaches deadline_ns; None disarms. Thread-safe; one deadline. */
static PyObject *Cpu_kick_at(CpuObject *self, PyObject *arg)
{
    int64_t due = -1;
    if (arg != Py_None) {
        long long v = PyLong_AsLongLong(arg);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        due = v < 0 ? 0 : v;
    }
    pthread_mutex_lock(&self->alarm_lock);
    if (due >= 0 && !self->alarm_started) {
        int err = kvmpy_start_thread_without_signals(&self->alarm_thread, alarm_main, self);
        if (err) {
            pthread_mutex_unlock(&self->alarm_lock);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        self->alarm_started = 1;
    }
    self->alarm_deadline = due;
    pthread_cond_signal(&self->alarm_cond);
    pthread_mutex_unlock(&self->alarm_lock);
    Py_RETURN_NONE;
}


/* ---- kvmpy._tcg.PortQueue ---- */

static int PortQueue_init(PortQueueObject *self, PyObject *args, PyObject *kw)
{
    if (self->q)
        return 0;
    self->q = calloc(1, sizeof *self->q);
    if (!self->q) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&self->q->lock, NULL);
    return 0;
}

static void PortQueue_dealloc(PortQueueObject *self)
{
    if (self->q) {
        pthread_mutex_destroy(&self->q->lock);
        free(self->q);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set_zone(port, on): queue one-byte writes to port (True) or not; False if the
 * zones are full. Before the vCPUs run (the cores read the zones unlocked). */
static PyObject *PortQueue_set_zone(PortQueueObject *self, PyObject *args)
{
    unsigned int port;
    int on;
    if (!PyArg_ParseTuple(args, "Ip", &port, &on))
        return NULL;
    PortQueue *q = self->q;
    int ok = 1;
    pthread_mutex_lock(&q->lock);
    int k = 0;
    while (k < q->nzones && q->zone[k] != port)
        k++;
    if (on && k == q->nzones) {
        if (q->nzones < PORT_QUEUE_ZONES)
            q->zone[q->nzones++] = (uint16_t)port;
        else
            ok = 0;
    } else if (!on && k < q->nzones) {
        q->zone[k] = q->zone[--q->nzones];
    }
    pthread_mutex_unlock(&q->lock);
    return PyBool_FromLong(ok);
}

static PyObject *PortQueue_pending(PortQueueObject *self, PyObject *unused)
{
    return PyBool_FromLong(atomic_load(&self->q->count) > 0);
}

static PyObject *PortQueue_pushed(PortQueueObject *self, PyObject *unused)
{
    pthread_mutex_lock(&self->q->lock);
    uint64_t n = self->q->pushed;
    pthread_mutex_unlock(&self->q->lock);
    return PyLong_FromUnsignedLongLong(n);
}

/* hand_over(write, write_burst): the queued writes to the devices, oldest first, a
 * run of writes to one port as write_burst(port, bytes), a lone one as write(port, 1,
 * value); then dropped from the queue (pending until then). Every run is handed over
 * even when a device raises; the first exception is raised after. The caller
 * serialises hand_over calls. */
static PyObject *PortQueue_hand_over(PortQueueObject *self, PyObject *args)
{
    PyObject *write, *write_burst;
    if (!PyArg_ParseTuple(args, "OO", &write, &write_burst))
        return NULL;
    PortQueue *q = self->q;
    uint16_t port[PORT_QUEUE_SIZE];
    uint8_t value[PORT_QUEUE_SIZE];
    pthread_mutex_lock(&q->lock);
    int n = atomic_load(&q->count);
    memcpy(port, q->port, n * sizeof port[0]);
    memcpy(value, q->value, n);
    pthread_mutex_unlock(&q->lock);
    PyObject *err_type = NULL, *err_value = NULL, *err_tb = NULL;
    for (int k = 0; k < n;) {
        int end = k + 1;
        while (end < n && port[end] == port[k])
            end++;
        PyObject *r = end - k == 1
            ? PyObject_CallFunction(write, "IiI", (unsigned)port[k], 1, (unsigned)value[k])
            : PyObject_CallFunction(write_burst, "Iy#", (unsigned)port[k], (const char *)value + k,
                                    (Py_ssize_t)(end - k));
        if (r)
            Py_DECREF(r);
        else if (!err_type)
            PyErr_Fetch(&err_type, &err_value, &err_tb);
        else
            PyErr_Clear();
        k = end;
    }
    pthread_mutex_lock(&q->lock);
    int have = atomic_load(&q->count);
    memmove(q->port, q->port + n, (have - n) * sizeof q->port[0]);
    memmove(q->value, q->value + n, have - n);
    atomic_store(&q->count, have - n);
    pthread_mutex_unlock(&q->lock);
    if (err_type) {
        PyErr_Restore(err_type, err_value, err_tb);
        return NULL;
    }
    return PyLong_FromLong(n);
}

/* published_slot(port) -> the slot for port's published one-byte reads (nothing
 * published yet), the same one for the same port; -1 when every slot is taken. */
static PyObject *PortQueue_published_slot(PortQueueObject *self, PyObject *args)
{
    unsigned int port;
    if (!PyArg_ParseTuple(args, "I", &port))
        return NULL;
    if (port > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return NULL;
    }
    PortQueue *q = self->q;
    pthread_mutex_lock(&q->lock);
    int n = atomic_load(&q->npublished), k = 0;
    while (k < n && q->published_port[k] != port)
        k++;
    if (k == n) {
        if (n < PORT_PUBLISHED_MAX) {
            q->published_port[n] = (uint16_t)port;
            atomic_store(&q->published_word[n], 0);
            atomic_store_explicit(&q->npublished, n + 1, memory_order_release);
        } else
            k = -1;
    }
    pthread_mutex_unlock(&q->lock);
    return PyLong_FromLong(k);
}

/* publish(slot, value): reads of the slot's port answer value (0..255) from now on;
 * -1: they exit again. Any thread. */
static PyObject *PortQueue_publish(PortQueueObject *self, PyObject *args)
{
    int slot, value;
    if (!PyArg_ParseTuple(args, "ii", &slot, &value))
        return NULL;
    if (slot < 0 || slot >= atomic_load(&self->q->npublished) || value < -1 || value > 0xff) {
        PyErr_SetString(PyExc_ValueError, "no such slot, or a value past a byte");
        return NULL;
    }
    atomic_store_explicit(&self->q->published_word[slot], value < 0 ? 0 : PORT_PUBLISHED | (uint32_t)value,
                          memory_order_release);
    Py_RETURN_NONE;
}

static PyMethodDef PortQueue_methods[] = {
    { "hand_over", (PyCFunction)PortQueue_hand_over, METH_VARARGS,
      "hand_over(write, write_burst) -> n: the queued writes to the devices, then dropped" },
    { "set_zone", (PyCFunction)PortQueue_set_zone, METH_VARARGS, "set_zone(port, on) -> False if no room" },
    { "pending", (PyCFunction)PortQueue_pending, METH_NOARGS, "thread-safe: writes are queued" },
    { "pushed", (PyCFunction)PortQueue_pushed, METH_NOARGS, "thread-safe: how many writes were ever queued" },
    { "published_slot", (PyCFunction)PortQueue_published_slot, METH_VARARGS,
      "published_slot(port) -> slot for the port's published reads, -1 if none is left" },
    { "publish", (PyCFunction)PortQueue_publish, METH_VARARGS,
      "publish(slot, value): answer one-byte reads with value (-1: they exit again)" },
    { NULL }
};

static PyTypeObject PortQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmpy._tcg.PortQueue",
    .tp_basicsize = sizeof(PortQueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PortQueue_init,
    .tp_dealloc = (destructor)PortQueue_dealloc,
    .tp_methods = PortQueue_methods,
    .tp_doc = "a machine's queued one-byte port writes, shared by its Cpus",
};

/* set_port_queue(queue or None): this CPU's one-byte OUTs to the queue's ports wait
 * there. Not while run() executes. */
static PyObject *Cpu_set_port_queue(CpuObject *self, PyObject *arg)
{
    if (arg != Py_None && !PyObject_TypeCheck(arg, &PortQueueType)) {
        PyErr_SetString(PyExc_TypeError, "set_port_queue wants a PortQueue or None");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "set_port_queue while the vCPU runs");
        return NULL;
    }
    PyObject *old = self->port_queue;
    if (arg == Py_None) {
        self->cpu->port_queue = 0;
        self->port_queue = NULL;
    } else {
        Py_INCREF(arg);
        self->port_queue = arg;
        self->cpu->port_queue = ((PortQueueObject *)arg)->q;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *Cpu_get_regs(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    PyObject *t = PyTuple_New(18);
    static const int order[16] = { R_AX, R_BX, R_CX, R_DX, R_SI, R_DI, R_SP, R_BP, 8, 9, 10, 11, 12, 13, 14, 15 };
    for (int k = 0; k < 16; k++)
        PyTuple_SET_ITEM(t, k, PyLong_FromUnsignedLongLong(c->r[order[k]]));
    PyTuple_SET_ITEM(t, 16, PyLong_FromUnsignedLongLong(c->rip));
    PyTuple_SET_ITEM(t, 17, PyLong_FromUnsignedLongLong(get_eflags(c)));
    return t;
}

static PyObject *Cpu_set_regs(CpuObject *self, PyObject *args)
{
    unsigned long long v[18];
    if (!PyArg_ParseTuple(args, "(KKKKKKKKKKKKKKKKKK)", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                          &v[7], &v[8], &v[9], &v[10], &v[11], &v[12], &v[13], &v[14], &v[15], &v[16], &v[17]))
        return NULL;
    CPU *c = self->cpu;
    static const int order[16] = { R_AX, R_BX, R_CX, R_DX, R_SI, R_DI, R_SP, R_BP, 8, 9, 10, 11, 12, 13, 14, 15 };
    for (int k = 0; k < 16; k++)
        c->r[order[k]] = v[k];
    if (c->rip != v[16]) {
        c->halted = c->wait_sipi;   /* only a SIPI starts a waiting AP */
        c->nacc = c->acc_pos = 0;
    }
    c->rip = v[16];
    c->eflags = 0;
    c->cc_op = CC_EAGER;
    c->cc_res = 0;
    set_eflags(c, v[17], ~0ull);
    update_mode(c);
    Py_RETURN_NONE;
}

static PyObject *seg_tuple(Seg *s)
{
    return Py_BuildValue("(KkHbbbbbbbbb)", (unsigned long long)s->base, (unsigned long)s->limit, s->sel,
                         s->type, s->present, s->dpl, s->db, s->s, s->l, s->g, s->avl, s->unusable);
}

static int seg_parse(PyObject *o, Seg *s)
{
    unsigned long long base;
    unsigned long limit;
    int sel, type, present, dpl, db, ss, l, g, avl, unusable;
    if (!PyArg_ParseTuple(o, "Kkiiiiiiiiii", &base, &limit, &sel, &type, &present, &dpl, &db, &ss, &l, &g,
                          &avl, &unusable))
        return -1;
    s->base = base;
    s->limit = (uint32_t)limit;
    s->sel = sel;
    s->type = type;
    s->present = present;
    s->dpl = dpl;
    s->db = db;
    s->s = ss;
    s->l = l;
    s->g = g;
    s->avl = avl;
    s->unusable = unusable;
    return 0;
}

/* KVM's order in struct kvm_sregs: cs ds es fs gs ss tr ldt */
static const int sreg_order[8] = { S_CS, S_DS, S_ES, S_FS, S_GS, S_SS, S_TR, S_LDT };

static PyObject *Cpu_get_sregs(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    PyObject *segs = PyTuple_New(8);
    for (int k = 0; k < 8; k++)
        PyTuple_SET_ITEM(segs, k, seg_tuple(&c->seg[sreg_order[k]]));
    return Py_BuildValue("(N(KI)(KI)KKKKKKK)", segs, (unsigned long long)c->gdt_base, c->gdt_limit,
                         (unsigned long long)c->idt_base, c->idt_limit, (unsigned long long)c->cr0,
                         (unsigned long long)c->cr2, (unsigned long long)c->cr3, (unsigned long long)c->cr4,
                         (unsigned long long)c->cr8, (unsigned long long)c->efer,
                         (unsigned long long)c->apic_base);
}

static PyObject *Cpu_set_sregs(CpuObject *self, PyObject *args)
{
    PyObject *segs;
    unsigned long long gb, ib, cr0, cr2, cr3, cr4, cr8, efer, apic;
    unsigned int gl, il;
    if (!PyArg_ParseTuple(args, "(O(KI)(KI)KKKKKKK)", &segs, &gb, &gl, &ib, &il, &cr0, &cr2, &cr3, &cr4, &cr8,
                          &efer, &apic))
        return NULL;
    if (!PyTuple_Check(segs) || PyTuple_GET_SIZE(segs) != 8) {
        PyErr_SetString(PyExc_TypeError, "segments must be a tuple of 8");
        return NULL;
    }
    CPU *c = self->cpu;
    Seg tmp[8];
    for (int k = 0; k < 8; k++)
        if (seg_parse(PyTuple_GET_ITEM(segs, k), &tmp[k]) < 0)
            return NULL;
    for (int k = 0; k < 8; k++)
        c->seg[sreg_order[k]] = tmp[k];
    c->gdt_base = gb;
    c->gdt_limit = gl;
    c->idt_base = ib;
    c->idt_limit = il;
    c->cr0 = cr0 | 0x10;
    c->cr2 = cr2;
    c->cr3 = cr3;
    c->cr4 = cr4;
    c->cr8 = cr8;
    c->efer = efer;
    c->apic_base = apic;
    tlb_flush(c, 1);
    update_mode(c);
    Py_RETURN_NONE;
}

static PyObject *Cpu_get_msr(CpuObject *self, PyObject *args)
{
    unsigned int idx;
    if (!PyArg_ParseTuple(args, "I", &idx))
        return NULL;
    uint64_t v;
    if (msr_read(self->cpu, idx, &v) < 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *Cpu_set_msr(CpuObject *self, PyObject *args)
{
    unsigned int idx;
    unsigned long long v;
    if (!PyArg_ParseTuple(args, "IK", &idx, &v))
        return NULL;
    return PyBool_FromLong(msr_write(self->cpu, idx, v) == 0);
}

static PyObject *Cpu_kick(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    atomic_store(&c->kicked, 1);
    atomic_store(&c->exit_request, 1);
    Py_RETURN_NONE;
}

static PyObject *Cpu_request_interrupt(CpuObject *self, PyObject *args)
{
    int v;
    if (!PyArg_ParseTuple(args, "i", &v))
        return NULL;
    if (v < 0 || v > 255) {
        PyErr_SetString(PyExc_ValueError, "vector must be 0..255");
        return NULL;
    }
    CPU *c = self->cpu;
    atomic_fetch_or(&c->irq_pending[v / 64], 1ull << (v % 64));
    atomic_store(&c->exit_request, 1);
    Py_RETURN_NONE;
}

static PyObject *Cpu_request_nmi(CpuObject *self, PyObject *unused)
{
    request_nmi(self->cpu);
    Py_RETURN_NONE;
}

static PyObject *Cpu_request_init(CpuObject *self, PyObject *unused)
{
    request_init(self->cpu);
    Py_RETURN_NONE;
}

static PyObject *Cpu_request_sipi(CpuObject *self, PyObject *args)
{
    int v;
    if (!PyArg_ParseTuple(args, "i", &v))
        return NULL;
    if (v < 0 || v > 255) {
        PyErr_SetString(PyExc_ValueError, "SIPI vector must be 0..255");
        return NULL;
    }
    request_sipi(self->cpu, v);
    Py_RETURN_NONE;
}

static PyObject *Cpu_request_irq_window(CpuObject *self, PyObject *unused)
{
    request_irq_window(self->cpu);
    Py_RETURN_NONE;
}

static PyObject *Cpu_reset(CpuObject *self, PyObject *args, PyObject *kw)
{
    int wait_sipi = 0;
    static char *kwlist[] = { "wait_sipi", NULL };
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &wait_sipi))
        return NULL;
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "reset() while run() executes: use request_init()");
        return NULL;
    }
    cpu_reset(self->cpu, wait_sipi);
    atomic_store(&self->cpu->life_request, 0);
    Py_RETURN_NONE;
}

static PyObject *Cpu_set_cpuid(CpuObject *self, PyObject *args)
{
    PyObject *list;
    if (!PyArg_ParseTuple(args, "O", &list))
        return NULL;
    PyObject *seq = PySequence_Fast(list, "cpuid entries must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_CPUID) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many CPUID entries");
        return NULL;
    }
    CPU *c = self->cpu;
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned int fn, idx, flags, a, b, cc, d;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "IIIIIII", &fn, &idx, &flags, &a, &b, &cc, &d)) {
            Py_DECREF(seq);
            return NULL;
        }
        c->cpuid[k].fn = fn;
        c->cpuid[k].idx = idx;
        c->cpuid[k].flags = flags;
        c->cpuid[k].eax = a;
        c->cpuid[k].ebx = b;
        c->cpuid[k].ecx = cc;
        c->cpuid[k].edx = d;
    }
    c->ncpuid = (int)n;
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* (kind, addr, size, write, count, data) of the access the last exit stopped at */
static PyObject *Cpu_exit_access(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    if (c->nacc == 0)
        Py_RETURN_NONE;
    Access *a = &c->acc[c->nacc - 1];
    PyObject *mv = PyMemoryView_FromMemory((char *)a->data, (Py_ssize_t)a->size * a->count, PyBUF_WRITE);
    if (!mv)
        return NULL;
    return Py_BuildValue("(iKIiIN)", a->kind, (unsigned long long)a->addr, a->size, a->write, a->count, mv);
}

static PyObject *Cpu_error(CpuObject *self, PyObject *unused)
{
    return PyUnicode_FromString(self->cpu->errmsg);
}

static PyObject *core_stats(CPU *c, PyObject *ops);

/* {dispatch op: helper calls} from native code while profiling (CPU.st_native_helper_op) */
static PyObject *native_helper_ops(CPU *c)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int op = 0; op < (int)(sizeof c->st_native_helper_op / sizeof(uint64_t)); op++) {
        if (!c->st_native_helper_op[op])
            continue;
        PyObject *k = PyLong_FromLong(op), *v = PyLong_FromUnsignedLongLong(c->st_native_helper_op[op]);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyObject *Cpu_stats(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    PyObject *ops = native_helper_ops(c);
    if (!ops)
        return NULL;
    PyObject *d = core_stats(c, ops);
    if (!d)
        return NULL;
    PyObject *decoded = PyLong_FromUnsignedLongLong(self->st_decoded);
    PyObject *bells = PyLong_FromUnsignedLongLong(self->st_doorbells);
    PyObject *alarms = PyLong_FromUnsignedLongLong(self->st_alarms);
    if (!decoded || !bells || !alarms || PyDict_SetItemString(d, "decoded_exits", decoded) < 0 ||
        PyDict_SetItemString(d, "doorbells_rung", bells) < 0 || PyDict_SetItemString(d, "alarm_kicks", alarms) < 0) {
        Py_XDECREF(decoded);
        Py_XDECREF(bells);
        Py_XDECREF(alarms);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(decoded);
    Py_DECREF(bells);
    Py_DECREF(alarms);
    return d;
}

static PyObject *core_stats(CPU *c, PyObject *ops)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:N}", "insns", (unsigned long long)(c->st_insns + c->st_native_insns),
                         "translated_blocks", (unsigned long long)c->st_translated, "decoded_insns",
                         (unsigned long long)c->st_decoded_insns, "decode_ns",
                         (unsigned long long)c->st_decode_ns, "exec_ns", (unsigned long long)c->st_exec_ns,
                         "invalidations", (unsigned long long)c->st_invalidations,
                         "slow_mem", (unsigned long long)c->st_slow_mem,
                         "slow_mem_ns", (unsigned long long)c->st_slow_mem_ns,
                         "gil_wait_ns", (unsigned long long)c->st_gil_wait_ns,
                         "pm_timer_reads", (unsigned long long)c->st_pm_timer_reads,
                         "published_reads", (unsigned long long)c->st_published_reads,
                         "native_insns", (unsigned long long)c->st_native_insns,
                         "native_helper_insns", (unsigned long long)c->st_native_helper,
                         "native_blocks", (unsigned long long)c->st_native_blocks,
                         "native_compile_ns", (unsigned long long)c->st_native_compile_ns,
                         "native_chained", (unsigned long long)c->st_native_chained,
                         "native_indirect", (unsigned long long)c->st_native_indirect,
                         "native_helper_ops", ops);
}

/* set_pm_timer(port, origin_ns, bits): answer reads of the 4 bytes at `port` as the
 * ACPI PM timer (see tcg.h); port 0 sends them to the VMM again. Not while run() executes. */
static PyObject *Cpu_set_pm_timer(CpuObject *self, PyObject *args)
{
    unsigned int port, bits;
    long long origin;
    if (!PyArg_ParseTuple(args, "ILI", &port, &origin, &bits))
        return NULL;
    if (port > 0xfffc || (bits != 24 && bits != 32)) {
        PyErr_Format(PyExc_ValueError, "PM timer: port %#x, %u bits: want a port up to 0xfffc, 24 or 32 bits",
                     port, bits);
        return NULL;
    }
    CPU *c = self->cpu;
    c->pm_timer_origin_ns = origin;
    c->pm_timer_mask = (1ull << bits) - 1;
    c->pm_timer_port = (uint16_t)port;
    Py_RETURN_NONE;
}

static PyObject *Cpu_set_profiling(CpuObject *self, PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
    self->cpu->profiling = on;
    Py_RETURN_NONE;
}

/* the native tier: executions before a block is compiled, or None to keep every
 * block interpreted; blocks compiled so far go with the cache, so the choice holds
 * from the first block on */
static PyObject *Cpu_set_native_threshold(CpuObject *self, PyObject *args)
{
    PyObject *arg;
    if (!PyArg_ParseTuple(args, "O", &arg))
        return NULL;
    CPU *c = self->cpu;
    int t = NATIVE_OFF;
    if (arg != Py_None) {
        long v = PyLong_AsLong(arg);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 0 || v > 1000000000) {
            PyErr_SetString(PyExc_ValueError, "native threshold must be 0..1000000000 or None");
            return NULL;
        }
        t = (int)v;
    }
    if (t != NATIVE_OFF && !c->nat_arena) {
        PyErr_SetString(PyExc_OSError, "no executable memory for the native tier");
        return NULL;
    }
    c->native_threshold = t;
    block_cache_flush(c);
    Py_RETURN_NONE;
}

static PyObject *Cpu_get_native_threshold(CpuObject *self, void *closure)
{
    if (self->cpu->native_threshold < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->cpu->native_threshold);
}

/* --trace profile's sampler, from another thread while run() executes: where the
 * guest is (a racy read of an aligned word: a sample, not state), None while halted */
static PyObject *Cpu_sample_rip(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    if (c->halted)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(*(volatile uint64_t *)&c->rip);
}

static PyObject *Cpu_host_tsc_hz(CpuObject *self, PyObject *unused)
{
    (void)self;
    return PyLong_FromUnsignedLongLong(host_tsc_hz());
}

static PyObject *Cpu_invalidate(CpuObject *self, PyObject *args)
{
    unsigned long long gpa, size;
    if (!PyArg_ParseTuple(args, "KK", &gpa, &size))
        return NULL;
    /* may run while another thread is inside run(): queued, applied by the vCPU thread */
    request_invalidate(self->cpu, gpa, size);
    Py_RETURN_NONE;
}

static PyObject *Cpu_flush(CpuObject *self, PyObject *unused)
{
    block_cache_flush(self->cpu);
    tlb_flush(self->cpu, 1);
    Py_RETURN_NONE;
}

static PyObject *Cpu_get_halted(CpuObject *self, void *closure)
{
    return PyBool_FromLong(self->cpu->halted);
}

static int Cpu_set_halted(CpuObject *self, PyObject *v, void *closure)
{
    int t = PyObject_IsTrue(v);
    if (t < 0)
        return -1;
    self->cpu->halted = t;
    return 0;
}

static PyObject *Cpu_get_xmm(CpuObject *self, PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n))
        return NULL;
    if (n < 0 || n > 15) {
        PyErr_SetString(PyExc_ValueError, "xmm index");
        return NULL;
    }
    return PyBytes_FromStringAndSize((char *)self->cpu->xmm[n], 16);
}

static PyObject *Cpu_set_xmm(CpuObject *self, PyObject *args)
{
    int n;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iy*", &n, &b))
        return NULL;
    if (n < 0 || n > 15 || b.len != 16) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "xmm index or size");
        return NULL;
    }
    memcpy(self->cpu->xmm[n], b.buf, 16);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* x87 state: (fcw, fsw, ftw, 80 bytes of R0-R7 in physical order, 10 bytes each) */
static PyObject *Cpu_get_fpu(CpuObject *self, PyObject *unused)
{
    CPU *c = self->cpu;
    uint8_t regs[80];
    for (int k = 0; k < 8; k++)
        memcpy(regs + 10 * k, c->fpregs[k], 10);
    return Py_BuildValue("(HHHy#)", c->fcw, c->fsw, c->ftw, (char *)regs, (Py_ssize_t)80);
}

static PyObject *Cpu_set_fpu(CpuObject *self, PyObject *args)
{
    CPU *c = self->cpu;
    unsigned short fcw, fsw, ftw;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "HHHy*", &fcw, &fsw, &ftw, &b))
        return NULL;
    if (b.len != 80) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "x87 registers: 80 bytes");
        return NULL;
    }
    c->fcw = fcw;
    c->fsw = fsw;
    c->ftw = ftw;
    for (int k = 0; k < 8; k++) {
        memcpy(c->fpregs[k], (uint8_t *)b.buf + 10 * k, 10);
        memset(c->fpregs[k] + 10, 0, 6);
    }
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyMethodDef Cpu_methods[] = {
    { "add_ram", (PyCFunction)Cpu_add_ram, METH_VARARGS, "add_ram(gpa, writable_buffer, readonly=False)" },
    { "clear_ram", (PyCFunction)Cpu_clear_ram, METH_NOARGS, "release every RAM buffer" },
    { "set_ram_readonly", (PyCFunction)Cpu_set_ram_readonly, METH_VARARGS,
      "set_ram_readonly(gpa, readonly): write-protect the region at gpa (or open it)" },
    { "run", (PyCFunction)Cpu_run, METH_NOARGS, "run until an exit; returns the exit kind" },
    { "run_decoded", (PyCFunction)Cpu_run_decoded, METH_O,
      "run_decoded(access): run(), one port or MMIO access returned decoded (kvmpy.hv.exits)" },
    { "watch_memory", (PyCFunction)Cpu_watch_memory, METH_VARARGS,
      "watch_memory(memory, generation, protection_generation, regions): what run_decoded compares" },
    { "add_doorbell", (PyCFunction)Cpu_add_doorbell, METH_VARARGS,
      "thread-safe: add_doorbell(fd, addr, size, datamatch, pio): such writes signal fd, no exit" },
    { "remove_doorbell", (PyCFunction)Cpu_remove_doorbell, METH_VARARGS, "thread-safe: remove_doorbell(fd)" },
    { "set_port_queue", (PyCFunction)Cpu_set_port_queue, METH_O,
      "set_port_queue(PortQueue or None): one-byte OUTs to its ports wait there, no exit" },
    { "kick_at", (PyCFunction)Cpu_kick_at, METH_O,
      "thread-safe: kick_at(monotonic_ns or None): run() returns EXIT_INTR from then on, as after kick()" },
    { "get_regs", (PyCFunction)Cpu_get_regs, METH_NOARGS, NULL },
    { "set_regs", (PyCFunction)Cpu_set_regs, METH_VARARGS, NULL },
    { "get_sregs", (PyCFunction)Cpu_get_sregs, METH_NOARGS, NULL },
    { "set_sregs", (PyCFunction)Cpu_set_sregs, METH_VARARGS, NULL },
    { "get_msr", (PyCFunction)Cpu_get_msr, METH_VARARGS, NULL },
    { "set_msr", (PyCFunction)Cpu_set_msr, METH_VARARGS, NULL },
    { "kick", (PyCFunction)Cpu_kick, METH_NOARGS, "thread-safe: run() returns EXIT_INTR soon" },
    { "request_interrupt", (PyCFunction)Cpu_request_interrupt, METH_VARARGS, "thread-safe" },
    { "set_cpuid", (PyCFunction)Cpu_set_cpuid, METH_VARARGS, NULL },
    { "request_nmi", (PyCFunction)Cpu_request_nmi, METH_NOARGS, "thread-safe: NMI (vector 2, blocked until IRET)" },
    { "request_init", (PyCFunction)Cpu_request_init, METH_NOARGS,
      "thread-safe: INIT, power-on state then wait for a SIPI (applied by run())" },
    { "request_sipi", (PyCFunction)Cpu_request_sipi, METH_VARARGS,
      "thread-safe: SIPI(vector): a waiting CPU starts in real mode at vector<<12" },
    { "request_irq_window", (PyCFunction)Cpu_request_irq_window, METH_NOARGS,
      "thread-safe: run() returns EXIT_INTR as soon as an interrupt can be taken" },
    { "reset", (PyCFunction)Cpu_reset, METH_VARARGS | METH_KEYWORDS,
      "reset(wait_sipi=False): power-on state now (run() must not be executing)" },
    { "exit_access", (PyCFunction)Cpu_exit_access, METH_NOARGS, NULL },
    { "error", (PyCFunction)Cpu_error, METH_NOARGS, NULL },
    { "stats", (PyCFunction)Cpu_stats, METH_NOARGS, NULL },
    { "set_native_threshold", (PyCFunction)Cpu_set_native_threshold, METH_VARARGS,
      "executions before a block runs as host code; None: never" },
    { "set_profiling", (PyCFunction)Cpu_set_profiling, METH_VARARGS, "time the slow memory paths" },
    { "set_pm_timer", (PyCFunction)Cpu_set_pm_timer, METH_VARARGS, "answer the ACPI PM timer's reads without exits" },
    { "sample_rip", (PyCFunction)Cpu_sample_rip, METH_NOARGS, "thread-safe: rip now, None if halted" },
    { "host_tsc_hz", (PyCFunction)Cpu_host_tsc_hz, METH_NOARGS, "the frequency the guest's TSC runs at" },
    { "invalidate", (PyCFunction)Cpu_invalidate, METH_VARARGS, "drop translations of guest RAM written behind our back (DMA)" },
    { "flush", (PyCFunction)Cpu_flush, METH_NOARGS, NULL },
    { "get_xmm", (PyCFunction)Cpu_get_xmm, METH_VARARGS, NULL },
    { "set_xmm", (PyCFunction)Cpu_set_xmm, METH_VARARGS, NULL },
    { "get_fpu", (PyCFunction)Cpu_get_fpu, METH_NOARGS, "(fcw, fsw, ftw, R0-R7 as 80 bytes)" },
    { "set_fpu", (PyCFunction)Cpu_set_fpu, METH_VARARGS, NULL },
    { NULL }
};

static PyObject *Cpu_get_wait_sipi(CpuObject *self, void *closure)
{
    return PyBool_FromLong(self->cpu->wait_sipi);
}

static PyObject *Cpu_get_interruptible(CpuObject *self, void *closure)
{
    return PyBool_FromLong(cpu_interruptible(self->cpu));
}

static PyObject *Cpu_get_nmi_blocked(CpuObject *self, void *closure)
{
    return PyBool_FromLong(self->cpu->nmi_blocked);
}

static PyGetSetDef Cpu_getset[] = {
    { "halted", (getter)Cpu_get_halted, (setter)Cpu_set_halted, NULL, NULL },
    { "wait_sipi", (getter)Cpu_get_wait_sipi, NULL, "waiting for a SIPI (run() executes nothing)", NULL },
    { "interruptible", (getter)Cpu_get_interruptible, NULL,
      "IF=1, no interrupt shadow, no exit in progress: a requested vector is taken now", NULL },
    { "nmi_blocked", (getter)Cpu_get_nmi_blocked, NULL, "an NMI handler runs (until its IRET)", NULL },
    { "native_threshold", (getter)Cpu_get_native_threshold, NULL,
      "executions before a block runs as host code; None: the native tier is off", NULL },
    { NULL }
};

static PyTypeObject CpuType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmpy._tcg.Cpu",
    .tp_basicsize = sizeof(CpuObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cpu_init,
    .tp_dealloc = (destructor)Cpu_dealloc,
    .tp_methods = Cpu_methods,
    .tp_getset = Cpu_getset,
    .tp_doc = "x86 translator vCPU",
};

static PyObject *tcg_start_tsc_calibration(PyObject *module, PyObject *unused)
{
    (void)module;
    start_tsc_calibration();
    Py_RETURN_NONE;
}

static PyMethodDef tcg_functions[] = {
    { "start_tsc_calibration", tcg_start_tsc_calibration, METH_NOARGS,
      "begin measuring the host TSC's frequency now; Cpu.host_tsc_hz() waits only for what is left of it" },
    { NULL }
};

static struct PyModuleDef tcg_module = {
    PyModuleDef_HEAD_INIT, "_tcg", "kvmpy C translator (x86 CPU)", -1, tcg_functions,
};

PyMODINIT_FUNC PyInit__tcg(void)
{
    if (PyType_Ready(&CpuType) < 0 || PyType_Ready(&PortQueueType) < 0)
        return NULL;
    str_generation = PyUnicode_InternFromString("generation");
    str_protection_generation = PyUnicode_InternFromString("protection_generation");
    str_regions = PyUnicode_InternFromString("regions");
    if (!str_generation || !str_protection_generation || !str_regions)
        return NULL;
    PyObject *m = PyModule_Create(&tcg_module);
    if (!m)
        return NULL;
    PyModule_AddIntConstant(m, "RUN_RESYNC_MEMORY", RUN_RESYNC_MEMORY);
    Py_INCREF(&CpuType);
    PyModule_AddObject(m, "Cpu", (PyObject *)&CpuType);
    Py_INCREF(&PortQueueType);
    PyModule_AddObject(m, "PortQueue", (PyObject *)&PortQueueType);
    return m;
}
