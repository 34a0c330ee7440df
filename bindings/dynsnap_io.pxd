# Cython declarations mirroring csrc/include/dynsnap/io.h (all nogil).
from libc.stdint cimport uint64_t
from posix.uio cimport iovec

from dynsnap_err cimport ds_err

cdef extern from "dynsnap/io.h" nogil:
    enum:
        DS_IO_AUTO
        DS_IO_URING
        DS_IO_AIO
        DS_IO_PSYNC
        DS_IO_DEFAULT_BLOCK_SIZE
        DS_IO_DEFAULT_QUEUE_DEPTH
        DS_IO_ALIGN

    struct ds_io_config:
        int backend
        size_t block_size
        unsigned queue_depth
        int direct
        int checksum
        int fsync
        int no_fixed_buffers
        unsigned progress_ms

    struct ds_io_counters:
        uint64_t rings_created, rings_freed
        uint64_t buffers_created, buffers_freed
        uint64_t registered_created, registered_freed
        uint64_t fds_opened, fds_closed

    struct ds_io_file_result:
        uint64_t size
        uint64_t xxh3
        int direct

    ctypedef int (*ds_io_progress_fn)(void *arg, uint64_t done_bytes, uint64_t total_bytes)

    struct ds_io_engine:
        pass

    int ds_io_engine_create(ds_io_engine **out, const ds_io_config *cfg)
    void ds_io_engine_destroy(ds_io_engine *e)
    const ds_err *ds_io_engine_err(const ds_io_engine *e)
    int ds_io_engine_backend(const ds_io_engine *e)
    void ds_io_engine_counters(const ds_io_engine *e, ds_io_counters *out)
    int ds_io_backend_probe(int backend)
    const char *ds_io_backend_name(int backend)
    int ds_io_copy_files(ds_io_engine *e, size_t n, const char *const *src,
                         const char *const *dst, ds_io_file_result *res,
                         ds_io_progress_fn progress, void *progress_arg)
    int ds_io_hash_file(ds_io_engine *e, const char *path, ds_io_file_result *res)
    int ds_io_read_into(ds_io_engine *e, const char *path, void *buf, size_t len, uint64_t *nread)
    int ds_io_write_buffers(ds_io_engine *e, const char *path, size_t n,
                            const iovec *bufs, ds_io_file_result *res)
