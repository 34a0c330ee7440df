# Thin Cython binding of parallel memfd restoration (csrc/include/dynsnap/memfd.h); the public API is dynsnap_core.memfd.
# cython: language_level=3, boundscheck=False, wraparound=False
import os

from cpython.buffer cimport PyBUF_ANY_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

from dynsnap_counters cimport add_counts
from dynsnap_err cimport err_fields
from dynsnap_memfd cimport *

from dynsnap_core.errors import oserror

HUGETLB = DS_MEMFD_HUGETLB
THP = DS_MEMFD_THP
POPULATE = DS_MEMFD_POPULATE
SEAL = DS_MEMFD_SEAL
DIRECT = DS_MEMFD_DIRECT
FSYNC = DS_MEMFD_FSYNC
DEFAULT_CHUNK = DS_MEMFD_DEFAULT_CHUNK
HASH_CHUNK = DS_MEMFD_HASH_CHUNK

_FIELDS = ("memfds_created", "memfds_closed", "maps_created", "maps_freed", "fds_opened", "fds_closed",
           "threads_started", "threads_joined")
_totals = dict.fromkeys(_FIELDS, 0)


def debug_counters():
    """Memfds, mappings, file fds and threads created/freed by every context so far (memfds_closed
    counts those closed by C; the Python layer counts its own closes)."""
    return dict(_totals)


class MemfdCError(OSError):
    """An OSError that also carries the C operation name (``op``)."""


cdef class _Ctx:
    cdef ds_memfd_ctx *c

    def __cinit__(self, unsigned threads, unsigned flags, size_t chunk_size=0, size_t block_size=0):
        cdef ds_memfd_config cfg
        cfg.threads = threads
        cfg.flags = flags
        cfg.chunk_size = chunk_size
        cfg.block_size = block_size
        if ds_memfd_ctx_create(&self.c, &cfg):
            raise ValueError(f"invalid memfd configuration (threads={threads}: at most {DS_MEMFD_MAX_THREADS}; "
                             f"chunk_size={chunk_size}: a multiple of {DS_MEMFD_HASH_CHUNK}; "
                             f"block_size={block_size}: a multiple of 4096 dividing {DS_MEMFD_HASH_CHUNK})")

    def __dealloc__(self):
        cdef ds_memfd_counters k
        if self.c is not NULL:
            ds_memfd_ctx_counters(self.c, &k)
            add_counts(_totals, k)
            ds_memfd_ctx_destroy(self.c)

    @property
    def threads(self):
        return ds_memfd_ctx_threads(self.c)

    cdef error(self, int rc):
        op, path, msg = err_fields(ds_memfd_ctx_err(self.c), "memfd")
        base = oserror(rc, op, path)
        exc = MemfdCError(base.errno, base.strerror)
        exc.filename = path
        exc.op = op
        if msg:
            exc.strerror = msg
        return exc


def restore(list segs, unsigned threads=0, unsigned flags=0, size_t chunk_size=0, size_t block_size=0):
    """segs: [(path, offset, length, name, expect_or_None)] -> (threads, [(fd, size, map_size, digest, hugetlb, sealed)])."""
    cdef _Ctx ctx = _Ctx(threads, flags, chunk_size, block_size)
    cdef size_t n = len(segs), i
    cdef ds_memfd_segment *sp = <ds_memfd_segment *>calloc(n + 1, sizeof(ds_memfd_segment))
    cdef ds_memfd_result *res = <ds_memfd_result *>calloc(n + 1, sizeof(ds_memfd_result))
    cdef int rc
    keep = []
    try:
        if sp is NULL or res is NULL:
            raise MemoryError()
        for i in range(n):
            path, offset, length, name, expect = segs[i]
            bp = os.fsencode(path)
            bn = (name or "dynsnap").encode()[:240]
            keep += [bp, bn]
            sp[i].path = bp
            sp[i].offset = offset
            sp[i].length = length
            sp[i].name = bn
            sp[i].check = expect is not None
            sp[i].expect = expect if expect is not None else 0
        with nogil:
            rc = ds_memfd_restore(ctx.c, n, sp, res)
        if rc:
            raise ctx.error(rc)
        return ctx.threads, [(res[i].fd, res[i].size, res[i].map_size, res[i].digest, bool(res[i].hugetlb),
                              bool(res[i].sealed)) for i in range(n)]
    finally:
        free(sp)
        free(res)


def dump(list fds, list sizes, list paths, unsigned threads=0, unsigned flags=0):
    """Write memfds to new files; returns (threads, [(size, digest)])."""
    cdef _Ctx ctx = _Ctx(threads, flags)
    cdef size_t n = len(fds), i
    cdef int *fp = <int *>calloc(n + 1, sizeof(int))
    cdef uint64_t *sz = <uint64_t *>calloc(n + 1, sizeof(uint64_t))
    cdef const char **pp = <const char **>calloc(n + 1, sizeof(char *))
    cdef ds_memfd_result *res = <ds_memfd_result *>calloc(n + 1, sizeof(ds_memfd_result))
    cdef int rc
    if len(sizes) != n or len(paths) != n:
        raise ValueError("fds, sizes and paths differ in length")
    bpaths = [os.fsencode(p) for p in paths]
    try:
        if fp is NULL or sz is NULL or pp is NULL or res is NULL:
            raise MemoryError()
        for i in range(n):
            fp[i] = fds[i]
            sz[i] = sizes[i]
            pp[i] = bpaths[i]
        with nogil:
            rc = ds_memfd_dump(ctx.c, n, fp, sz, pp, res)
        if rc:
            raise ctx.error(rc)
        return ctx.threads, [(res[i].size, res[i].digest) for i in range(n)]
    finally:
        free(fp)
        free(sz)
        free(pp)
        free(res)


def create(str name, uint64_t size, bint hugetlb=False):
    """A new empty memfd -> (fd, map_size)."""
    cdef _Ctx ctx = _Ctx(1, DS_MEMFD_HUGETLB if hugetlb else 0)
    cdef int fd = -1, rc
    cdef uint64_t ms = 0
    bn = name.encode()[:240]
    cdef const char *p = bn
    with nogil:
        rc = ds_memfd_create(ctx.c, p, size, &fd, &ms)
    if rc:
        raise ctx.error(rc)
    return fd, ms


def hash_buffer(buffer, unsigned threads=0):
    """Region digest of a buffer with a thread pool."""
    cdef _Ctx ctx = _Ctx(threads, 0)
    cdef Py_buffer view
    cdef uint64_t h = 0
    cdef int rc
    PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS)
    try:
        with nogil:
            rc = ds_memfd_hash(ctx.c, view.buf, <size_t>view.len, &h)
        if rc:
            raise ctx.error(rc)
        return h
    finally:
        PyBuffer_Release(&view)


def hash_address(uintptr_t addr, size_t size, unsigned threads=0):
    """Region digest of raw memory (a mapped region)."""
    cdef _Ctx ctx = _Ctx(threads, 0)
    cdef uint64_t h = 0
    cdef int rc
    with nogil:
        rc = ds_memfd_hash(ctx.c, <const void *>addr, size, &h)
    if rc:
        raise ctx.error(rc)
    return h


def copy(dst, src, unsigned threads=0):
    """dst[:len(src)] = src with a thread pool."""
    cdef _Ctx ctx = _Ctx(threads, 0)
    cdef Py_buffer d, s
    cdef int rc
    PyObject_GetBuffer(dst, &d, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_ANY_CONTIGUOUS)
        try:
            if s.len > d.len:
                raise ValueError(f"source ({s.len} bytes) is larger than the destination ({d.len} bytes)")
            with nogil:
                rc = ds_memfd_copy(ctx.c, d.buf, s.buf, <size_t>s.len)
            if rc:
                raise ctx.error(rc)
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&d)


def digest(buffer):
    """Single-threaded reference digest."""
    cdef Py_buffer view
    cdef uint64_t h
    PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS)
    try:
        with nogil:
            h = ds_memfd_digest(view.buf, <size_t>view.len)
        return h
    finally:
        PyBuffer_Release(&view)


def reserve(size_t size):
    """Reserve address space (PROT_NONE); returns its address."""
    cdef void *addr = NULL
    cdef int rc = ds_memfd_reserve(size, &addr)
    if rc:
        raise oserror(rc, "reserve address space", f"{size} bytes")
    return <uintptr_t>addr


def attach(int fd, uintptr_t addr, size_t size, bint writable):
    cdef int rc = ds_memfd_attach(fd, <void *>addr, size, writable)
    if rc:
        raise oserror(rc, f"mmap fd {fd} at {addr:#x}", f"{size} bytes")


def detach(uintptr_t addr, size_t size):
    cdef int rc = ds_memfd_detach(<void *>addr, size)
    if rc:
        raise oserror(rc, f"detach {addr:#x}", f"{size} bytes")


def release(uintptr_t addr, size_t size):
    cdef int rc = ds_memfd_release(<void *>addr, size)
    if rc:
        raise oserror(rc, f"munmap {addr:#x}", f"{size} bytes")
