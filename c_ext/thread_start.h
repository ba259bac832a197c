/* Starting a native helper thread (an I/O thread, the coalesced ring's watcher, the
 * translator's alarm) that takes no signal.
 *
 * Signals are the Python main thread's business: CPython's handlers only set a flag
 * that thread reads, so a signal delivered to a helper would interrupt its system
 * calls for nothing and land where no handler runs. A thread starts with its
 * creator's mask: the creator blocks every signal around pthread_create and then
 * puts its own mask back, as QEMU starts its iothreads.
 *
 * One header for the three native builds (the KVM bindings, the data planes, the
 * translator), which stay separate modules: device models may not import the KVM one. */
#ifndef KVMPY_THREAD_START_H
#define KVMPY_THREAD_START_H

#include <pthread.h>
#include <signal.h>

/* pthread_create's result: 0, or the error number. */
static inline int kvmpy_start_thread_without_signals(pthread_t *thread, void *(*main)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int r = pthread_create(thread, NULL, main, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return r;
}

#endif
