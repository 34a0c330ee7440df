# Thin Cython binding of the C I/O engine (csrc/include/dynsnap/io.h); the public API is dynsnap_core.io.
# cython: language_level=3, boundscheck=False, wraparound=False
import os

from cpython.buffer cimport PyBUF_ANY_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from posix.uio cimport iovec

from dynsnap_counters cimport add_counts
from dynsnap_err cimport err_fields
from dynsnap_io cimport *

from dynsnap_core.errors import oserror

BACKENDS = {"auto": DS_IO_AUTO, "io_uring": DS_IO_URING, "aio": DS_IO_AIO, "psync": DS_IO_PSYNC}
DEFAULT_BLOCK_SIZE = DS_IO_DEFAULT_BLOCK_SIZE
DEFAULT_QUEUE_DEPTH = DS_IO_DEFAULT_QUEUE_DEPTH
ALIGN = DS_IO_ALIGN

_FIELDS = ("rings_created", "rings_freed", "buffers_created", "buffers_freed",
           "registered_created", "registered_freed", "fds_opened", "fds_closed")
_totals = dict.fromkeys(_FIELDS, 0)


def debug_counters():
    """Rings, buffers, buffer registrations and fds created/freed by every engine call so far."""
    return dict(_totals)


def probe(str name):
    """0 if the backend initialises here, else -errno."""
    return ds_io_backend_probe(BACKENDS[name])


cdef class _Engine:
    """One C engine for one call: configuration, last error, counters."""
    cdef ds_io_engine *e

    def __cinit__(self, str engine, bint direct, bint checksum, bint fsync, block_size, queue_depth,
                  unsigned progress_ms=100, bint fixed_buffers=True):
        cdef ds_io_config cfg
        cdef int rc
        if engine not in BACKENDS:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(BACKENDS)}")
        cfg.backend = BACKENDS[engine]
        cfg.block_size = block_size or 0
        cfg.queue_depth = queue_depth or 0
        cfg.direct = direct
        cfg.checksum = checksum
        cfg.fsync = fsync
        cfg.no_fixed_buffers = not fixed_buffers
        cfg.progress_ms = progress_ms
        rc = ds_io_engine_create(&self.e, &cfg)
        if rc:
            raise ValueError(f"invalid I/O configuration (block_size={block_size}: must be a multiple "
                             f"of {DS_IO_ALIGN} up to 1 GiB; queue_depth={queue_depth}: 1..4096)")

    def __dealloc__(self):
        cdef ds_io_counters c
        if self.e is not NULL:
            ds_io_engine_counters(self.e, &c)
            add_counts(_totals, c)
            ds_io_engine_destroy(self.e)

    @property
    def backend(self):
        return ds_io_backend_name(ds_io_engine_backend(self.e)).decode()

    cdef error(self, int rc):
        op, path, msg = err_fields(ds_io_engine_err(self.e), "io")
        exc = oserror(rc, op, path)
        if msg:
            exc.strerror = msg
        return exc


class _Progress:
    def __init__(self, fn):
        self.fn = fn
        self.exc = None


cdef int _progress_cb(void *arg, uint64_t done, uint64_t total) noexcept nogil:
    with gil:
        p = <object>arg
        try:
            p.fn(done, total)
        except BaseException as exc:  # re-raised by copy_files once the C side cleaned up
            p.exc = exc
            return 1
    return 0


def copy_files(list srcs, list dsts, *, str engine="auto", bint direct=True, bint checksum=True,
               bint fsync=True, block_size=None, queue_depth=None, progress=None,
               unsigned progress_ms=100, bint fixed_buffers=True):
    """Copy srcs[i] -> dsts[i]; returns (backend, [(size, xxh3, direct), ...])."""
    cdef _Engine eng = _Engine(engine, direct, checksum, fsync, block_size, queue_depth,
                               progress_ms, fixed_buffers)
    cdef size_t n = len(srcs), i
    cdef const char **sp = NULL
    cdef const char **dp = NULL
    cdef ds_io_file_result *res = NULL
    cdef int rc
    cdef ds_io_progress_fn cb = NULL
    cdef void *cbarg = NULL
    if len(dsts) != n:
        raise ValueError("srcs and dsts differ in length")
    bsrc = [os.fsencode(s) for s in srcs]
    bdst = [os.fsencode(d) for d in dsts]
    prog = _Progress(progress) if progress is not None else None
    if prog is not None:
        cb = _progress_cb
        cbarg = <void *>prog
    sp = <const char **>calloc(n + 1, sizeof(char *))
    dp = <const char **>calloc(n + 1, sizeof(char *))
    res = <ds_io_file_result *>calloc(n + 1, sizeof(ds_io_file_result))
    try:
        if sp is NULL or dp is NULL or res is NULL:
            raise MemoryError()
        for i in range(n):
            sp[i] = bsrc[i]
            dp[i] = bdst[i]
        with nogil:
            rc = ds_io_copy_files(eng.e, n, sp, dp, res, cb, cbarg)
        if prog is not None and prog.exc is not None:
            raise prog.exc
        if rc:
            raise eng.error(rc)
        return eng.backend, [(res[i].size, res[i].xxh3, bool(res[i].direct)) for i in range(n)]
    finally:
        free(sp)
        free(dp)
        free(res)


def hash_file(path, *, str engine="auto", bint direct=True, block_size=None, queue_depth=None,
              bint fixed_buffers=True):
    """Returns (backend, size, xxh3, direct)."""
    cdef _Engine eng = _Engine(engine, direct, True, False, block_size, queue_depth, 100, fixed_buffers)
    cdef ds_io_file_result res
    cdef int rc
    bpath = os.fsencode(path)
    cdef const char *p = bpath
    with nogil:
        rc = ds_io_hash_file(eng.e, p, &res)
    if rc:
        raise eng.error(rc)
    return eng.backend, res.size, res.xxh3, bool(res.direct)


def read_into(path, buffer, size_t offset=0, *, str engine="auto", bint direct=True,
              block_size=None, queue_depth=None):
    """Read the whole file into buffer[offset:]; returns (backend, bytes read)."""
    cdef _Engine eng = _Engine(engine, direct, False, False, block_size, queue_depth)
    cdef Py_buffer view
    cdef int rc
    cdef uint64_t n = 0
    cdef char *base
    bpath = os.fsencode(path)
    cdef const char *p = bpath
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        if offset > <size_t>view.len:
            raise ValueError(f"offset {offset} is past the end of a buffer of {view.len} bytes")
        base = <char *>view.buf + offset
        with nogil:
            rc = ds_io_read_into(eng.e, p, base, <size_t>view.len - offset, &n)
        if rc:
            raise eng.error(rc)
        return eng.backend, n
    finally:
        PyBuffer_Release(&view)


def write_buffers(path, buffers, *, str engine="auto", bint fsync=True, block_size=None,
                  queue_depth=None, bint direct=True):
    """Create/truncate path and write the buffers in order; returns (backend, size, xxh3, direct)."""
    cdef _Engine eng = _Engine(engine, direct, True, fsync, block_size, queue_depth, 100, False)
    cdef list bufs = list(buffers)
    cdef size_t n = len(bufs), i, got = 0
    cdef Py_buffer *views = <Py_buffer *>calloc(n + 1, sizeof(Py_buffer))
    cdef iovec *iov = <iovec *>calloc(n + 1, sizeof(iovec))
    cdef ds_io_file_result res
    cdef int rc
    bpath = os.fsencode(path)
    cdef const char *p = bpath
    try:
        if views is NULL or iov is NULL:
            raise MemoryError()
        for i in range(n):
            PyObject_GetBuffer(bufs[i], &views[i], PyBUF_ANY_CONTIGUOUS)
            got += 1
            iov[i].iov_base = views[i].buf
            iov[i].iov_len = <size_t>views[i].len
        with nogil:
            rc = ds_io_write_buffers(eng.e, p, n, iov, &res)
        if rc:
            raise eng.error(rc)
        return eng.backend, res.size, res.xxh3, bool(res.direct)
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        free(views)
        free(iov)
