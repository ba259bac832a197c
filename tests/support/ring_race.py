"""A native thread racing the Python side of a virtqueue over one u16 of guest RAM,
as a driver on another vCPU does: it either stores two values there in turn
(STORE_PAIR), or watches the field and counts the values other than the two the
device stores there in turn (WATCH_PAIR).

Built with cffi on first use (gcc, as setup.py builds the product's modules).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from cffi import FFI

CDEF = """
struct racer;
struct racer *racer_start(uintptr_t addr, int mode, uint16_t a, uint16_t b);
uint64_t racer_changes(struct racer *r);
void racer_stop(struct racer *r, uint64_t out[3]);
"""

SOURCE = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

enum { STORE_PAIR, WATCH_PAIR };

struct racer {
    volatile uint16_t *p;
    uint16_t a, b;
    int mode;
    atomic_int started, stop;
    _Atomic uint64_t changes;
    uint64_t bad, first_bad;
    pthread_t thread;
};

static void *run(void *arg)
{
    struct racer *r = arg;
    uint16_t last = *r->p;
    atomic_store(&r->started, 1);
    while (!atomic_load_explicit(&r->stop, memory_order_relaxed)) {
        if (r->mode == STORE_PAIR) {
            *r->p = r->a;
            *r->p = r->b;
            continue;
        }
        uint16_t v = *r->p;
        if (v == last)
            continue;
        r->changes++;
        if (v != r->a && v != r->b && r->bad++ == 0)
            r->first_bad = (uint64_t)last << 16 | v;
        last = v;
    }
    return 0;
}

struct racer *racer_start(uintptr_t addr, int mode, uint16_t a, uint16_t b)
{
    struct racer *r = calloc(1, sizeof *r);
    if (!r)
        return 0;
    r->p = (volatile uint16_t *)addr;
    r->mode = mode;
    r->a = a;
    r->b = b;
    if (pthread_create(&r->thread, 0, run, r)) {
        free(r);
        return 0;
    }
    while (!atomic_load(&r->started))
        ;
    return r;
}

uint64_t racer_changes(struct racer *r)
{
    return atomic_load(&r->changes);
}

void racer_stop(struct racer *r, uint64_t out[3])
{
    atomic_store(&r->stop, 1);
    pthread_join(r->thread, 0);
    out[0] = r->changes;
    out[1] = r->bad;
    out[2] = r->first_bad;
    free(r);
}
"""

STORE_PAIR, WATCH_PAIR = 0, 1
MODULE = "_kvmpy_test_ring_race"


def build(directory: Path):
    """The compiled helper module (ffi, lib), built in ``directory``."""
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, SOURCE, extra_compile_args=["-O2", "-pthread"], extra_link_args=["-pthread"])
    path = ffi.compile(tmpdir=str(directory))
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module.ffi, module.lib


class Racer:
    """``with Racer(helper, addr, mode, a, b) as r:`` runs the thread for the block;
    then ``r.changes``, ``r.bad`` and ``r.first_bad`` (last, seen) are set."""

    def __init__(self, helper, addr: int, mode: int, a: int = 0, b: int = 0) -> None:
        self.ffi, self.lib = helper
        self.args = (addr, mode, a, b)
        self.changes = self.bad = 0
        self.first_bad: tuple[int, int] | None = None

    def __enter__(self) -> "Racer":
        self.handle = self.lib.racer_start(*self.args)
        if self.handle == self.ffi.NULL:
            raise OSError("racer thread did not start")
        return self

    def changes_so_far(self) -> int:
        """What a watching thread has seen change while it runs."""
        return self.lib.racer_changes(self.handle)

    def __exit__(self, *exc) -> None:
        out = self.ffi.new("uint64_t[3]")
        self.lib.racer_stop(self.handle, out)
        self.changes, self.bad = out[0], out[1]
        if self.bad:
            self.first_bad = (out[2] >> 16, out[2] & 0xFFFF)
