"""cffi API-mode build of the KVM bindings.

The struct declarations below end in ``...;`` so the C compiler, reading the real
<linux/kvm.h>, decides every layout and offset; nothing is packed by hand. Only
the fields kvmpy touches are named.
"""

import os

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(r"""
typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;
typedef int... __s32;
int ioctl(int fd, unsigned long request, ...);

#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQ_LINE_STATUS ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SIGNAL_MSI ...
#define KVM_REGISTER_COALESCED_MMIO ...
#define KVM_UNREGISTER_COALESCED_MMIO ...
#define KVM_COALESCED_MMIO_PAGE_OFFSET ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_CLOCK ...
#define KVM_SET_TSC_KHZ ...
#define KVM_GET_TSC_KHZ ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MEM_READONLY ...
#define KVM_MEM_LOG_DIRTY_PAGES ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_COALESCED_MMIO ...
#define KVM_CAP_COALESCED_PIO ...
#define KVM_CAP_EXIT_ON_EMULATION_FAILURE ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_SYNC_MMU ...
#define KVM_CAP_IRQ_INJECT_STATUS ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_X2APIC_API ...
#define KVM_CAP_SPLIT_IRQCHIP ...

struct kvm_dirty_log {
    __u32 slot;
    union { void *dirty_bitmap; __u64 padding2; };
    ...;
};

struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr;
    __u64 memory_size; __u64 userspace_addr; ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags; ...;
};

struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[...]; ...;
};
struct kvm_fpu { __u16 fcw; __u32 mxcsr; ...; };

struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };

struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags;
    __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };

struct kvm_pit_config { __u32 flags; ...; };
struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 pad; };
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; __u32 pad[8]; } u;
    ...;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; __u32 pio; ...; };
struct kvm_coalesced_mmio { __u64 phys_addr; __u32 len; __u32 pio; __u8 data[8]; ...; };
struct kvm_coalesced_mmio_ring { __u32 first; __u32 last; struct kvm_coalesced_mmio coalesced_mmio[]; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_irqchip { __u32 chip_id; ...; };
struct kvm_pit_state2 { __u32 flags; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; ...; };

/* struct kvm_run's exit payloads are anonymous in the header; the accessors in
   the C source below hand out typed pointers into them. */
struct kvmpy_run_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct kvmpy_run_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct kvmpy_run_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct kvmpy_run_system_event { __u32 type; __u32 ndata; __u64 data0; };
struct kvmpy_run_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };
struct kvmpy_run_emulation_failure { __u32 suberror; __u32 ndata; __u64 flags; __u8 insn_size; __u8 insn_bytes[15]; };

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    ...;
};
struct kvmpy_run_io *kvmpy_run_io(struct kvm_run *run);
struct kvmpy_run_mmio *kvmpy_run_mmio(struct kvm_run *run);
struct kvmpy_run_internal *kvmpy_run_internal(struct kvm_run *run);
struct kvmpy_run_system_event *kvmpy_run_system_event(struct kvm_run *run);
struct kvmpy_run_fail_entry *kvmpy_run_fail_entry(struct kvm_run *run);
struct kvmpy_run_emulation_failure *kvmpy_run_emulation_failure(struct kvm_run *run);
__u64 kvmpy_run_hw_exit_reason(struct kvm_run *run);
/* The vCPU run loop in C (see the source below): which port and MMIO ranges a
   device claims, kept current by the accelerator, and what the loop served. */
struct kvmpy_exit_map;
struct kvmpy_loop_stats { __u64 pio_served; __u64 mmio_served; __u64 returned; __u64 decoded; __u64 published_served; };
struct kvmpy_exit_map *kvmpy_exit_map_new(void);
void kvmpy_exit_map_free(struct kvmpy_exit_map *map);
int kvmpy_exit_map_set(struct kvmpy_exit_map *map, int pio, const __u64 *ranges, size_t n);
int kvmpy_exit_map_claimed(struct kvmpy_exit_map *map, int pio, __u64 addr);
__u32 *kvmpy_exit_map_published_cell(struct kvmpy_exit_map *map, __u32 port);
#define KVMPY_PUBLISHED ...
#define KVMPY_PUBLISHED_MAX ...
/* One per vCPU: what the loop runs and what it decoded (see the source below). */
struct kvmpy_vcpu_loop {
    int fd; struct kvm_run *run; size_t run_size;
    struct kvmpy_exit_map *map;
    struct kvm_coalesced_mmio_ring *ring;
    struct kvmpy_loop_stats stats;
    __u64 access[4];
    ...;
};
int kvmpy_run_loop(struct kvmpy_vcpu_loop *loop);
int kvmpy_run_decoded(struct kvmpy_vcpu_loop *loop);
#define KVMPY_DECODED_PIO_WRITE ...
#define KVMPY_DECODED_PIO_READ ...
#define KVMPY_DECODED_MMIO_WRITE ...
#define KVMPY_DECODED_MMIO_READ ...
#define KVMPY_DECODED_AFTER_QUEUED ...
int kvmpy_install_kick_handler(int signo);
#define KVMPY_UNCLAIMED_NOTED_MAX ...
__u32 kvmpy_coalesced_take(struct kvm_coalesced_mmio_ring *ring, __u32 max, __u64 *head, unsigned char *run, __u32 cap);
/* The ring's watcher: a thread that wakes Python only when writes wait (see the source). */
struct kvmpy_ring_watch;
struct kvmpy_ring_watch *kvmpy_ring_watch_start(struct kvm_coalesced_mmio_ring *ring, int wake_fd, int interval_ms,
                                                int idle_interval_ms, int idle_after_ms, int *err);
void kvmpy_ring_watch_stop(struct kvmpy_ring_watch *w);
__u64 kvmpy_ring_watch_looks(struct kvmpy_ring_watch *w);
__u64 kvmpy_ring_watch_wakes(struct kvmpy_ring_watch *w);
""")

ffibuilder.set_source("kvmpy.hv.kvm._kvm_cffi", r"""
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* Typed views of kvm_run's anonymous exit union. Each struct mirrors the
   member it views, and the static asserts make the compiler prove it. */
struct kvmpy_run_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct kvmpy_run_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct kvmpy_run_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct kvmpy_run_system_event { __u32 type; __u32 ndata; __u64 data0; };
struct kvmpy_run_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };
struct kvmpy_run_emulation_failure { __u32 suberror; __u32 ndata; __u64 flags; __u8 insn_size; __u8 insn_bytes[15]; };

#define KVMPY_SAME(ours, field, theirs) \
    _Static_assert(offsetof(struct ours, field) == offsetof(struct kvm_run, theirs.field) - offsetof(struct kvm_run, theirs), #ours "." #field)
KVMPY_SAME(kvmpy_run_io, direction, io); KVMPY_SAME(kvmpy_run_io, size, io);
KVMPY_SAME(kvmpy_run_io, port, io); KVMPY_SAME(kvmpy_run_io, count, io);
KVMPY_SAME(kvmpy_run_io, data_offset, io);
KVMPY_SAME(kvmpy_run_mmio, phys_addr, mmio); KVMPY_SAME(kvmpy_run_mmio, data, mmio);
KVMPY_SAME(kvmpy_run_mmio, len, mmio); KVMPY_SAME(kvmpy_run_mmio, is_write, mmio);
KVMPY_SAME(kvmpy_run_internal, suberror, internal); KVMPY_SAME(kvmpy_run_internal, ndata, internal);
KVMPY_SAME(kvmpy_run_internal, data, internal);
KVMPY_SAME(kvmpy_run_system_event, type, system_event); KVMPY_SAME(kvmpy_run_system_event, ndata, system_event);
_Static_assert(offsetof(struct kvmpy_run_system_event, data0) == offsetof(struct kvm_run, system_event.data[0]) - offsetof(struct kvm_run, system_event), "system_event.data");
KVMPY_SAME(kvmpy_run_fail_entry, hardware_entry_failure_reason, fail_entry);
KVMPY_SAME(kvmpy_run_fail_entry, cpu, fail_entry);
KVMPY_SAME(kvmpy_run_emulation_failure, suberror, emulation_failure);
KVMPY_SAME(kvmpy_run_emulation_failure, ndata, emulation_failure);
KVMPY_SAME(kvmpy_run_emulation_failure, flags, emulation_failure);
KVMPY_SAME(kvmpy_run_emulation_failure, insn_size, emulation_failure);
KVMPY_SAME(kvmpy_run_emulation_failure, insn_bytes, emulation_failure);

static struct kvmpy_run_io *kvmpy_run_io(struct kvm_run *r) { return (void *)&r->io; }
static struct kvmpy_run_mmio *kvmpy_run_mmio(struct kvm_run *r) { return (void *)&r->mmio; }
static struct kvmpy_run_internal *kvmpy_run_internal(struct kvm_run *r) { return (void *)&r->internal; }
static struct kvmpy_run_system_event *kvmpy_run_system_event(struct kvm_run *r) { return (void *)&r->system_event; }
static struct kvmpy_run_fail_entry *kvmpy_run_fail_entry(struct kvm_run *r) { return (void *)&r->fail_entry; }
static struct kvmpy_run_emulation_failure *kvmpy_run_emulation_failure(struct kvm_run *r) { return (void *)&r->emulation_failure; }
static __u64 kvmpy_run_hw_exit_reason(struct kvm_run *r) { return r->hw.hardware_exit_reason; }

/* --- the run loop ----------------------------------------------------------------
   Python calls kvmpy_run_loop (or kvmpy_run_decoded, the vCPU thread's fast path)
   once per exit it must see; in between, with the GIL
   released (cffi drops it around every call), the loop answers the port and MMIO
   accesses no device claims exactly as kvmpy.devices.bus.Bus does: reads are all
   ones (a floating bus), writes are dropped. It also answers the one-byte reads
   of a claimed port whose device published the answer (KVMPY_PUBLISHED). Under
   nested KVM each return to Python costs tens of microseconds of interpreter
   time; these answers cost none.

   Bus.read/write log each unclaimed address once at debug level, up to 256 per
   bus; to keep that, the first access to each new unclaimed address (while fewer
   than KVMPY_UNCLAIMED_NOTED_MAX have been noted) goes to Python, which logs it;
   later ones stay here. A hostile guest sweeping addresses thus costs Python at
   most 256 exits per bus.

   The map is written by whichever thread changes a bus (a vCPU reprogramming a
   BAR, the main thread placing devices) and read by every vCPU's loop: a mutex
   keeps each lookup on one whole version. It is held for a bitmap test or a
   binary search, never across KVM_RUN. */
#include <pthread.h>
#include <signal.h>
#include "thread_start.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>

/* The vCPU kick: a handler that does nothing, installed without SA_RESTART, so the
   signal only ends KVM_RUN with EINTR. Installed here rather than with Python's
   signal module because CPython puts SIG_DFL back on the handlers it installed when
   the interpreter finalizes, and a kick that arrives late (a stop that gave up
   waiting for a vCPU) would then kill the process with SIGUSR1. */
static void kvmpy_kick_noop(int signo) { (void)signo; }

static int kvmpy_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmpy_kick_noop;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL);
}

#define KVMPY_UNCLAIMED_NOTED_MAX 256
#define KVMPY_PORTS 65536
/* Port reads a device answers ahead of time: a register whose read has no side
   effect and whose value no write the accelerator may queue (the coalesced ring)
   can change, such as the UART's LSR while nothing is latched and loopback is off.
   The device model decides the value and stores it in its cell, the answer in the
   low byte with KVMPY_PUBLISHED set, or 0 while the read needs the model; the loop
   answers a one-byte read of that port from the cell and stays in the guest. The
   store is one aligned 32-bit word, so a loop sees the old answer or the new one,
   and the model stores before it returns from the access that changed the value:
   a read overlapping that access may see either, a later one the new. */
#define KVMPY_PUBLISHED 0x100u
#define KVMPY_PUBLISHED_MAX 8

struct kvmpy_mmio_range { __u64 base, end; };
struct kvmpy_loop_stats { __u64 pio_served; __u64 mmio_served; __u64 returned; __u64 decoded; __u64 published_served; };

struct kvmpy_exit_map {
    pthread_mutex_t lock;
    unsigned char ports[KVMPY_PORTS / 8];
    struct kvmpy_mmio_range *mmio;   /* sorted by base, not overlapping (Bus refuses overlaps) */
    size_t n_mmio;
    unsigned char ports_noted[KVMPY_PORTS / 8];
    unsigned n_ports_noted;
    __u64 mmio_noted[KVMPY_UNCLAIMED_NOTED_MAX];
    unsigned n_mmio_noted;
    /* Published reads (kvmpy_exit_map_published_cell): slots are only ever added. */
    __u32 published_port[KVMPY_PUBLISHED_MAX];
    __u32 published_word[KVMPY_PUBLISHED_MAX];
    unsigned n_published;
};

static struct kvmpy_exit_map *kvmpy_exit_map_new(void)
{
    struct kvmpy_exit_map *map = calloc(1, sizeof(*map));
    if (map != NULL && pthread_mutex_init(&map->lock, NULL) != 0) {
        free(map);
        return NULL;
    }
    return map;
}

static void kvmpy_exit_map_free(struct kvmpy_exit_map *map)
{
    if (map == NULL)
        return;
    pthread_mutex_destroy(&map->lock);
    free(map->mmio);
    free(map);
}

/* ranges: n pairs (base, end), end exclusive, sorted by base: the whole bus. */
static int kvmpy_exit_map_set(struct kvmpy_exit_map *map, int pio, const __u64 *ranges, size_t n)
{
    if (pio) {
        unsigned char ports[KVMPY_PORTS / 8];
        memset(ports, 0, sizeof(ports));
        for (size_t i = 0; i < n; i++) {
            __u64 end = ranges[2 * i + 1] < KVMPY_PORTS ? ranges[2 * i + 1] : KVMPY_PORTS;
            for (__u64 p = ranges[2 * i]; p < end; p++)
                ports[p / 8] |= (unsigned char)(1u << (p % 8));
        }
        pthread_mutex_lock(&map->lock);
        memcpy(map->ports, ports, sizeof(ports));
        pthread_mutex_unlock(&map->lock);
        return 0;
    }
    struct kvmpy_mmio_range *fresh = NULL;
    if (n > 0) {
        fresh = malloc(n * sizeof(*fresh));
        if (fresh == NULL)
            return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
            fresh[i].base = ranges[2 * i];
            fresh[i].end = ranges[2 * i + 1];
        }
    }
    pthread_mutex_lock(&map->lock);
    struct kvmpy_mmio_range *old = map->mmio;
    map->mmio = fresh;
    map->n_mmio = n;
    pthread_mutex_unlock(&map->lock);
    free(old);
    return 0;
}

static int kvmpy_port_claimed_locked(struct kvmpy_exit_map *map, __u64 port)
{
    return port < KVMPY_PORTS && (map->ports[port / 8] >> (port % 8)) & 1;
}

static int kvmpy_mmio_claimed_locked(struct kvmpy_exit_map *map, __u64 addr)
{
    size_t lo = 0, hi = map->n_mmio;       /* the last range with base <= addr */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (map->mmio[mid].base <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 && addr < map->mmio[lo - 1].end;
}

static int kvmpy_exit_map_claimed(struct kvmpy_exit_map *map, int pio, __u64 addr)
{
    pthread_mutex_lock(&map->lock);
    int claimed = pio ? kvmpy_port_claimed_locked(map, addr) : kvmpy_mmio_claimed_locked(map, addr);
    pthread_mutex_unlock(&map->lock);
    return claimed;
}

/* port's cell for its published read (see KVMPY_PUBLISHED), 0 (nothing published)
   when new; the same cell for the same port; NULL when every slot is taken. */
static __u32 *kvmpy_exit_map_published_cell(struct kvmpy_exit_map *map, __u32 port)
{
    __u32 *cell = NULL;
    pthread_mutex_lock(&map->lock);
    for (unsigned i = 0; i < map->n_published && cell == NULL; i++)
        if (map->published_port[i] == port)
            cell = &map->published_word[i];
    if (cell == NULL && map->n_published < KVMPY_PUBLISHED_MAX && port < KVMPY_PORTS) {
        unsigned i = map->n_published++;
        map->published_port[i] = port;
        map->published_word[i] = 0;
        cell = &map->published_word[i];
    }
    pthread_mutex_unlock(&map->lock);
    return cell;
}

/* 1 and *value: a claimed port's published answer to a one-byte read; 0: the
   device must see the read (nothing published, or the port is no longer claimed:
   a cell outlives the device that had it only as a stale slot, never an answer). */
static int kvmpy_published_read(struct kvmpy_exit_map *map, __u32 port, unsigned char *value)
{
    int found = 0;
    pthread_mutex_lock(&map->lock);
    if (kvmpy_port_claimed_locked(map, port)) {
        for (unsigned i = 0; i < map->n_published; i++) {
            if (map->published_port[i] == port) {
                __u32 word = __atomic_load_n(&map->published_word[i], __ATOMIC_ACQUIRE);
                if (word & KVMPY_PUBLISHED) {
                    *value = (unsigned char)word;
                    found = 1;
                }
                break;
            }
        }
    }
    pthread_mutex_unlock(&map->lock);
    return found;
}

/* 1: the loop answers this access itself; 0: Python must see it (a device claims
   it, or it is a new unclaimed address that Bus has yet to log). */
static int kvmpy_serve_here(struct kvmpy_exit_map *map, int pio, __u64 addr)
{
    int here = 0;
    pthread_mutex_lock(&map->lock);
    if (pio) {
        if (kvmpy_port_claimed_locked(map, addr))
            here = 0;
        else if ((map->ports_noted[addr / 8] >> (addr % 8)) & 1)
            here = 1;
        else if (map->n_ports_noted < KVMPY_UNCLAIMED_NOTED_MAX) {
            map->ports_noted[addr / 8] |= (unsigned char)(1u << (addr % 8));
            map->n_ports_noted++;
        } else
            here = 1;
    } else if (!kvmpy_mmio_claimed_locked(map, addr)) {
        here = 1;
        if (map->n_mmio_noted < KVMPY_UNCLAIMED_NOTED_MAX) {
            unsigned i;
            for (i = 0; i < map->n_mmio_noted && map->mmio_noted[i] != addr; i++)
                ;
            if (i == map->n_mmio_noted) {
                map->mmio_noted[map->n_mmio_noted++] = addr;
                here = 0;
            }
        }
    }
    pthread_mutex_unlock(&map->lock);
    return here;
}

/* A vCPU's run loop: its kvm_run, the claimed map (NULL: return after every exit,
   for the tracer and the profiler), the VM's coalesced-write ring as this vCPU maps
   it (NULL where there is none), what the loop answered itself, and the access
   kvmpy_run_decoded last returned: address, size and, for a write, the value; the
   fourth word is where Python puts a read's value for the next call. */
struct kvmpy_vcpu_loop {
    int fd;
    struct kvm_run *run;
    size_t run_size;
    struct kvmpy_exit_map *map;
    struct kvm_coalesced_mmio_ring *ring;
    struct kvmpy_loop_stats stats;
    __u64 access[4];
    unsigned char *answer_to;   /* where the next kvmpy_run_decoded puts access[3] */
    unsigned answer_len;
};

/* KVM_RUN until an exit Python must see. >= 0: its run->exit_reason;
   -errno: KVM_RUN failed (-EINTR after a kick or immediate_exit). */
static int kvmpy_run_loop(struct kvmpy_vcpu_loop *loop)
{
    struct kvm_run *run = loop->run;
    struct kvmpy_exit_map *map = loop->map;
    /* The caller of this entry completes reads in kvm_run itself. */
    loop->answer_to = NULL;
    for (;;) {
        if (ioctl(loop->fd, KVM_RUN, 0) < 0)
            return -errno;
        if (map == NULL)
            break;
        if (run->exit_reason == KVM_EXIT_IO) {
            if (!kvmpy_serve_here(map, 1, run->io.port)) {
                unsigned char value;
                if (run->io.direction == KVM_EXIT_IO_IN && run->io.size == 1 && run->io.count == 1
                        && run->io.data_offset < loop->run_size
                        && kvmpy_published_read(map, run->io.port, &value)) {
                    *((unsigned char *)run + run->io.data_offset) = value;
                    loop->stats.published_served++;
                    continue;
                }
                break;
            }
            if (run->io.direction == KVM_EXIT_IO_IN) {
                __u64 n = (__u64)run->io.size * run->io.count;
                /* Out of bounds: Python reports it as an internal error. */
                if (run->io.data_offset > loop->run_size || n > loop->run_size - run->io.data_offset)
                    break;
                memset((char *)run + run->io.data_offset, 0xff, n);
            }
            loop->stats.pio_served++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!kvmpy_serve_here(map, 0, run->mmio.phys_addr))
                break;
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, run->mmio.len < 8 ? run->mmio.len : 8);
            loop->stats.mmio_served++;
            continue;
        }
        break;
    }
    loop->stats.returned++;
    return (int)run->exit_reason;
}

/* kvmpy_run_decoded's answers beside KVM's exit reasons (all below 256): one port
   or MMIO access, its address, size and written value in loop->access. */
#define KVMPY_DECODED_PIO_WRITE 0x100
#define KVMPY_DECODED_PIO_READ 0x101
#define KVMPY_DECODED_MMIO_WRITE 0x102
#define KVMPY_DECODED_MMIO_READ 0x103
/* Added to the above when the coalesced ring held writes at that exit: the device
   must see those first, and draining them is Python's. */
#define KVMPY_DECODED_AFTER_QUEUED 0x200

static __u64 kvmpy_le_load(const unsigned char *p, unsigned n)
{
    __u64 v = 0;
    for (unsigned i = n; i-- > 0;)
        v = (v << 8) | p[i];
    return v;
}

/* The coalesced ring's oldest write, and the byte writes to the same port that
   follow it, for CoalescedPio.drain: head gets its address, length (at most 8)
   and value; a byte write's run (up to cap bytes, itself first) goes to run.
   Returns how many entries that is (0: the ring is empty). Nothing is consumed:
   the caller advances ring->first once the device has them, so a vCPU finding
   the ring non-empty meanwhile waits for the drain rather than overtaking it.
   Called with the drain's lock held; the kernel only ever appends. */
static __u32 kvmpy_coalesced_take(struct kvm_coalesced_mmio_ring *ring, __u32 max, __u64 *head,
                                  unsigned char *run, __u32 cap)
{
    __u32 first = ring->first;
    /* The kernel fills an entry before it publishes it by moving last. */
    __u32 last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);
    if (first == last || first >= max || last >= max || cap == 0)
        return 0;
    struct kvm_coalesced_mmio *e = &ring->coalesced_mmio[first];
    __u32 len = e->len < 8 ? e->len : 8;
    head[0] = e->phys_addr;
    head[1] = len;
    head[2] = kvmpy_le_load(e->data, len);
    if (len != 1)
        return 1;
    __u32 n = 0;
    for (__u32 i = first; i != last && n < cap; i = (i + 1) % max) {
        struct kvm_coalesced_mmio *x = &ring->coalesced_mmio[i];
        if (x->phys_addr != e->phys_addr || x->len != 1 || x->pio != e->pio)
            break;
        run[n++] = x->data[0];
    }
    return n;
}

/* --- the ring's watcher ---------------------------------------------------------
   A guest that writes to a queued port and then makes no exit (a spin with
   interrupts off, a halt in the in-kernel irqchip) leaves its writes in the ring
   until something drains it. A timer on Python's event loop did, 100 times a
   second whatever the ring held: each tick a wake of the loop's thread and a run of
   the interpreter, which in a nested L1 took a tenth of its one CPU away from the
   guest. This thread looks at the ring's two indices every interval_ms and wakes
   the loop (a write to wake_fd, an eventfd it watches) only when writes wait; the
   drain itself stays Python's, under its lock. It reads the ring and writes one
   eventfd, nothing else; stop_fd (an eventfd of its own) ends its wait at once.

   A guest whose console has been quiet for idle_after_ms (no new write in the
   ring: KVM's producer index has not moved) is looked at every idle_interval_ms
   instead, until the next write: 100 wakes a second of a thread on the L1's one
   CPU each preempt the vCPU (6 s of its CPU during the TCP rows' transfers), for
   writes a quiet guest does not make. The price is the first bytes after a quiet
   spell, which wait up to idle_interval_ms (a halted guest's; one that exits is
   drained at its exit). */
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <unistd.h>

struct kvmpy_ring_watch {
    struct kvm_coalesced_mmio_ring *ring;
    int wake_fd, stop_fd, interval_ms, idle_interval_ms, idle_after_ms;
    pthread_t thread;
    __u64 looks, wakes;     /* what it did, for tests and curiosity */
};

static void *kvmpy_ring_watch_main(void *arg)
{
    struct kvmpy_ring_watch *w = arg;
    prctl(PR_SET_NAME, "kvmpy-ringwatch", 0, 0, 0);
    struct pollfd stop = {.fd = w->stop_fd, .events = POLLIN};
    __u32 seen_last = __atomic_load_n(&w->ring->last, __ATOMIC_RELAXED);
    int timeout = w->interval_ms, quiet_ms = 0;
    for (;;) {
        int r = poll(&stop, 1, timeout);
        if (r > 0)
            break;
        if (r < 0 && errno != EINTR)
            break;
        __atomic_add_fetch(&w->looks, 1, __ATOMIC_RELAXED);
        __u32 first = __atomic_load_n(&w->ring->first, __ATOMIC_RELAXED);
        __u32 last = __atomic_load_n(&w->ring->last, __ATOMIC_ACQUIRE);
        if (first != last) {
            __u64 one = 1;
            if (write(w->wake_fd, &one, sizeof one) == sizeof one)
                __atomic_add_fetch(&w->wakes, 1, __ATOMIC_RELAXED);
        }
        if (last != seen_last) {
            seen_last = last;
            quiet_ms = 0;
            timeout = w->interval_ms;
        } else if (timeout == w->interval_ms && (quiet_ms += w->interval_ms) >= w->idle_after_ms) {
            timeout = w->idle_interval_ms;
        }
    }
    return NULL;
}

static struct kvmpy_ring_watch *kvmpy_ring_watch_start(struct kvm_coalesced_mmio_ring *ring, int wake_fd,
                                                       int interval_ms, int idle_interval_ms, int idle_after_ms,
                                                       int *err)
{
    struct kvmpy_ring_watch *w = calloc(1, sizeof *w);
    if (w == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    w->ring = ring;
    w->wake_fd = wake_fd;
    w->interval_ms = interval_ms;
    w->idle_interval_ms = idle_interval_ms < interval_ms ? interval_ms : idle_interval_ms;
    w->idle_after_ms = idle_after_ms;
    w->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (w->stop_fd < 0) {
        *err = errno;
        free(w);
        return NULL;
    }
    int r = kvmpy_start_thread_without_signals(&w->thread, kvmpy_ring_watch_main, w);
    if (r) {
        *err = r;
        close(w->stop_fd);
        free(w);
        return NULL;
    }
    return w;
}

/* Ends the thread (at once: it waits on stop_fd) and frees w; wake_fd is the caller's. */
static void kvmpy_ring_watch_stop(struct kvmpy_ring_watch *w)
{
    __u64 one = 1;
    while (write(w->stop_fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    pthread_join(w->thread, NULL);
    close(w->stop_fd);
    free(w);
}

static __u64 kvmpy_ring_watch_looks(struct kvmpy_ring_watch *w) { return __atomic_load_n(&w->looks, __ATOMIC_RELAXED); }
static __u64 kvmpy_ring_watch_wakes(struct kvmpy_ring_watch *w) { return __atomic_load_n(&w->wakes, __ATOMIC_RELAXED); }

/* kvmpy_run_decoded without the queued-writes flag. */
static int kvmpy_run_decoded_access(struct kvmpy_vcpu_loop *loop)
{
    struct kvm_run *run = loop->run;
    if (loop->answer_to != NULL) {
        for (unsigned i = 0; i < loop->answer_len; i++)
            loop->answer_to[i] = (unsigned char)(loop->access[3] >> (8 * i));
    }
    int reason = kvmpy_run_loop(loop);
    if (reason == KVM_EXIT_IO && run->io.count == 1
            && (run->io.size == 1 || run->io.size == 2 || run->io.size == 4)
            && run->io.data_offset <= loop->run_size - run->io.size) {
        unsigned char *data = (unsigned char *)run + run->io.data_offset;
        loop->stats.decoded++;
        loop->access[0] = run->io.port;
        loop->access[1] = run->io.size;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            loop->access[2] = kvmpy_le_load(data, run->io.size);
            return KVMPY_DECODED_PIO_WRITE;
        }
        loop->answer_to = data;
        loop->answer_len = run->io.size;
        return KVMPY_DECODED_PIO_READ;
    }
    if (reason == KVM_EXIT_MMIO && run->mmio.len >= 1 && run->mmio.len <= 8) {
        loop->stats.decoded++;
        loop->access[0] = run->mmio.phys_addr;
        loop->access[1] = run->mmio.len;
        if (run->mmio.is_write) {
            loop->access[2] = kvmpy_le_load(run->mmio.data, run->mmio.len);
            return KVMPY_DECODED_MMIO_WRITE;
        }
        loop->answer_to = run->mmio.data;
        loop->answer_len = run->mmio.len;
        return KVMPY_DECODED_MMIO_READ;
    }
    return reason;
}

/* kvmpy_run_loop for the vCPU thread's own loop: Python reads one access from
   loop->access (no struct walk through cffi) and puts the value a read gave in
   loop->access[3], stored here before KVM_RUN completes the instruction with it.
   One argument, because cffi passes a single one without building a tuple.
   An access made while the coalesced ring holds writes comes back decoded all the
   same, plus KVMPY_DECODED_AFTER_QUEUED (the device must see those writes first,
   and draining is Python's): a console polling LSR before each queued THR write
   makes such an access every byte. Everything else returns as from
   kvmpy_run_loop: string and rep accesses, odd sizes. */
static int kvmpy_run_decoded(struct kvmpy_vcpu_loop *loop)
{
    int code = kvmpy_run_decoded_access(loop);
    if (code >= KVMPY_DECODED_PIO_WRITE && loop->ring != NULL && loop->ring->first != loop->ring->last)
        code += KVMPY_DECODED_AFTER_QUEUED;
    return code;
}
""", include_dirs=["c_ext"], depends=[os.path.join("c_ext", "thread_start.h")])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
