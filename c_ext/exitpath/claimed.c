/*
 * kvmpy.vcpu._claimed: the vCPU loop's claimed accesses served without the
 * interpreter's loop (kvmpy/vcpu/runner.py calls serve() where the backend offers
 * a native entry, DecodedExits.native).
 *
 * Under nested KVM a claimed port or MMIO access cost about 60 us of Python per
 * exit in the L1, most of it not the device's method but the loop around it: a
 * cffi call, the bytecode deciding what came back, the accessor's lookup, the
 * answer's store. Here that loop is C: it enters the guest through the backend's
 * own C entry (without the GIL), looks the address up in the bus's accessors
 * (Bus.accessors, the same dict the Python loop reads, fetched at every exit
 * because the bus replaces it when its map changes), and calls the device's read or
 * write, still Python, with the offset and size as the Python loop would.
 *
 * It returns to Python for everything else, so the rules stay in runner.py: an exit
 * that is no single access, an access no accessor is known for yet (runner.py asks
 * the bus, which resolves and keeps it, or notes an unclaimed one), an access made
 * while port writes were queued when the caller has no drain, and
 * DECODED_SERVED once the host's control_pending is set after an access (a device
 * asked for a reset or power-off: no vCPU may run on). A device's exception
 * (Exception, not BaseException) goes to device_error(code, address, exception),
 * as the Python loop's _device_error; a read that raised answers all-ones.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* kvmpy/hv/exits.py's; tests/test_claimed_serve.py checks that they are the same. */
#define DECODED_PIO_WRITE 0x100
#define DECODED_PIO_READ 0x101
#define DECODED_MMIO_WRITE 0x102
#define DECODED_MMIO_READ 0x103
#define DECODED_AFTER_QUEUED 0x200
#define DECODED_SERVED 0x400

typedef int (*run_decoded_fn)(void *state);

static PyObject *str_accessors, *str_control_pending;

/* Calls device_error(code, address, exc) with the raised Exception; 0, or -1 with
   an exception set (a BaseException that is not an Exception, or device_error's own). */
static int report_device_error(PyObject *device_error, int code, PyObject *key)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *code_obj = PyLong_FromLong(code);
    PyObject *r = NULL;
    if (code_obj != NULL) {
        PyObject *argv[3] = {code_obj, key, value != NULL ? value : Py_None};
        r = PyObject_Vectorcall(device_error, argv, 3, NULL);
        Py_DECREF(code_obj);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* One decoded access through its accessor. 1: served; 0: no accessor known (the
   caller returns the code to Python); -1: an exception to raise. */
static int serve_access(int code, uint64_t *access, PyObject *bus, PyObject *device_error)
{
    uint64_t size = access[1];
    if (size < 1 || size > 8)
        return 0;
    PyObject *accessors = PyObject_GetAttr(bus, str_accessors);
    if (accessors == NULL)
        return -1;
    if (!PyDict_Check(accessors)) {
        Py_DECREF(accessors);
        return 0;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(access[0]);
    if (key == NULL) {
        Py_DECREF(accessors);
        return -1;
    }
    PyObject *acc = PyDict_GetItemWithError(accessors, key);
    Py_XINCREF(acc);
    Py_DECREF(accessors);
    if (acc == NULL || !PyTuple_Check(acc) || PyTuple_GET_SIZE(acc) != 3) {
        Py_XDECREF(acc);
        Py_DECREF(key);
        return PyErr_Occurred() ? -1 : 0;
    }
    uint64_t mask = size == 8 ? ~(uint64_t)0 : (((uint64_t)1 << (8 * size)) - 1);
    int ok = -1;
    PyObject *size_obj = PyLong_FromUnsignedLongLong(size);
    if (size_obj == NULL)
        goto out;
    if (code == DECODED_PIO_READ || code == DECODED_MMIO_READ) {
        PyObject *argv[2] = {PyTuple_GET_ITEM(acc, 2), size_obj};
        PyObject *r = PyObject_Vectorcall(PyTuple_GET_ITEM(acc, 0), argv, 2, NULL);
        if (r != NULL) {
            uint64_t v = PyLong_AsUnsignedLongLongMask(r);
            Py_DECREF(r);
            if (!(v == (uint64_t)-1 && PyErr_Occurred())) {
                access[3] = v & mask;
                ok = 1;
            }
        }
        if (ok < 0) {
            access[3] = mask;
            ok = report_device_error(device_error, code, key) < 0 ? -1 : 1;
        }
    } else {
        PyObject *value = PyLong_FromUnsignedLongLong(access[2]);
        if (value == NULL)
            goto out;
        PyObject *argv[3] = {PyTuple_GET_ITEM(acc, 2), size_obj, value};
        PyObject *r = PyObject_Vectorcall(PyTuple_GET_ITEM(acc, 1), argv, 3, NULL);
        Py_DECREF(value);
        if (r != NULL) {
            Py_DECREF(r);
            ok = 1;
        } else {
            ok = report_device_error(device_error, code, key) < 0 ? -1 : 1;
        }
    }
out:
    Py_XDECREF(size_obj);
    Py_DECREF(acc);
    Py_DECREF(key);
    return ok;
}

/* serve(run, state, access, pio_bus, mmio_bus, host, drain, device_error) -> code.
   run: the address of the backend's int (*)(void *state), callable without the GIL;
   state: its argument's address; access: the address of its uint64_t[4]
   (DecodedExits' access). drain: the queued port writes' drain, or None. */
static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "serve() takes 8 arguments");
        return NULL;
    }
    run_decoded_fn run = (run_decoded_fn)PyLong_AsVoidPtr(args[0]);
    void *state = PyLong_AsVoidPtr(args[1]);
    uint64_t *access = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (run == NULL || access == NULL) {
        PyErr_SetString(PyExc_ValueError, "serve(): null entry or access");
        return NULL;
    }
    PyObject *pio = args[3], *mmio = args[4], *host = args[5], *drain = args[6], *device_error = args[7];
    for (;;) {
        int code;
        Py_BEGIN_ALLOW_THREADS
        code = run(state);
        Py_END_ALLOW_THREADS
        if (code >= DECODED_PIO_WRITE + DECODED_AFTER_QUEUED && code <= DECODED_MMIO_READ + DECODED_AFTER_QUEUED) {
            /* The queued writes reach their devices before this access does. */
            if (drain == Py_None)
                return PyLong_FromLong(code);
            PyObject *r = PyObject_CallNoArgs(drain);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
            code -= DECODED_AFTER_QUEUED;
        }
        if (code < DECODED_PIO_WRITE || code > DECODED_MMIO_READ)
            return PyLong_FromLong(code);
        int served = serve_access(code, access, code >= DECODED_MMIO_WRITE ? mmio : pio, device_error);
        if (served < 0)
            return NULL;
        if (served == 0)
            return PyLong_FromLong(code);
        PyObject *pending = PyObject_GetAttr(host, str_control_pending);
        if (pending == NULL)
            return NULL;
        int set = PyObject_IsTrue(pending);
        Py_DECREF(pending);
        if (set < 0)
            return NULL;
        if (set)
            return PyLong_FromLong(DECODED_SERVED);
    }
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(run, state, access, pio_bus, mmio_bus, host, drain, device_error) -> code: enter the guest "
     "and serve claimed single accesses until an exit Python must see (see c_ext/exitpath/claimed.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmpy.vcpu._claimed",
    "The vCPU loop's claimed accesses served in C (c_ext/exitpath/claimed.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__claimed(void)
{
    str_accessors = PyUnicode_InternFromString("accessors");
    str_control_pending = PyUnicode_InternFromString("control_pending");
    if (str_accessors == NULL || str_control_pending == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "DECODED_SERVED", DECODED_SERVED) < 0
            || PyModule_AddIntConstant(m, "DECODED_PIO_WRITE", DECODED_PIO_WRITE) < 0
            || PyModule_AddIntConstant(m, "DECODED_PIO_READ", DECODED_PIO_READ) < 0
            || PyModule_AddIntConstant(m, "DECODED_MMIO_WRITE", DECODED_MMIO_WRITE) < 0
            || PyModule_AddIntConstant(m, "DECODED_MMIO_READ", DECODED_MMIO_READ) < 0
            || PyModule_AddIntConstant(m, "DECODED_AFTER_QUEUED", DECODED_AFTER_QUEUED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
