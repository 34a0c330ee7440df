# Cython declarations mirroring csrc/include/dynsnap/memfd.h (all nogil).
from libc.stdint cimport uint64_t

from dynsnap_err cimport ds_err

cdef extern from "dynsnap/memfd.h" nogil:
    enum:
        DS_MEMFD_DEFAULT_CHUNK
        DS_MEMFD_HASH_CHUNK
        DS_MEMFD_MAX_THREADS
        DS_MEMFD_HUGETLB
        DS_MEMFD_THP
        DS_MEMFD_POPULATE
        DS_MEMFD_SEAL
        DS_MEMFD_DIRECT
        DS_MEMFD_FSYNC

    struct ds_memfd_config:
        unsigned threads
        size_t chunk_size
        size_t block_size
        unsigned flags

    struct ds_memfd_counters:
        uint64_t memfds_created, memfds_closed
        uint64_t maps_created, maps_freed
        uint64_t fds_opened, fds_closed
        uint64_t threads_started, threads_joined

    struct ds_memfd_segment:
        const char *path
        uint64_t offset
        uint64_t length
        const char *name
        uint64_t expect
        int check

    struct ds_memfd_result:
        int fd
        uint64_t size
        uint64_t map_size
        uint64_t digest
        int hugetlb
        int sealed

    struct ds_memfd_ctx:
        pass

    int ds_memfd_ctx_create(ds_memfd_ctx **out, const ds_memfd_config *cfg)
    void ds_memfd_ctx_destroy(ds_memfd_ctx *c)
    const ds_err *ds_memfd_ctx_err(const ds_memfd_ctx *c)
    void ds_memfd_ctx_counters(const ds_memfd_ctx *c, ds_memfd_counters *out)
    unsigned ds_memfd_ctx_threads(const ds_memfd_ctx *c)
    int ds_memfd_create(ds_memfd_ctx *c, const char *name, uint64_t size, int *fd, uint64_t *map_size)
    int ds_memfd_close(ds_memfd_ctx *c, int fd)
    int ds_memfd_restore(ds_memfd_ctx *c, size_t n, const ds_memfd_segment *segs, ds_memfd_result *res)
    int ds_memfd_dump(ds_memfd_ctx *c, size_t n, const int *fds, const uint64_t *sizes,
                      const char *const *paths, ds_memfd_result *res)
    int ds_memfd_hash(ds_memfd_ctx *c, const void *p, size_t len, uint64_t *digest)
    int ds_memfd_copy(ds_memfd_ctx *c, void *dst, const void *src, size_t len)
    uint64_t ds_memfd_digest(const void *p, size_t len)
    int ds_memfd_reserve(size_t len, void **addr)
    int ds_memfd_attach(int fd, void *addr, size_t len, int writable)
    int ds_memfd_detach(void *addr, size_t len)
    int ds_memfd_release(void *addr, size_t len)
