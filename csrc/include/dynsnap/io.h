/* dynsnap I/O engine: streaming file copy, hash, read-into and write-buffers over io_uring, AIO or psync. */
#ifndef DYNSNAP_IO_H
#define DYNSNAP_IO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "dynsnap/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Backends, in the order `auto` tries them. */
enum ds_io_backend {
	DS_IO_AUTO = 0,
	DS_IO_URING = 1,
	DS_IO_AIO = 2,
	DS_IO_PSYNC = 3,
};

#define DS_IO_DEFAULT_BLOCK_SIZE (4u << 20)  /* best or near-best read and write in the sweep (RESULTS.md) */
#define DS_IO_DEFAULT_QUEUE_DEPTH 16u
#define DS_IO_ALIGN 4096u

/* Tunables of one engine; zero-initialise and set what you need. */
struct ds_io_config {
	int backend;              /* enum ds_io_backend */
	size_t block_size;        /* 0: DS_IO_DEFAULT_BLOCK_SIZE; must be a multiple of DS_IO_ALIGN */
	unsigned queue_depth;     /* 0: DS_IO_DEFAULT_QUEUE_DEPTH; 1..4096 */
	int direct;               /* try O_DIRECT (falls back to buffered where unsupported) */
	int checksum;             /* compute XXH3-64 of each file */
	int fsync;                /* fdatasync written files and fsync their directories */
	int no_fixed_buffers;     /* io_uring: do not register the block buffers */
	unsigned progress_ms;     /* minimum interval between progress calls; 0 calls after every block */
};

/* Resources the engine created and freed (tests assert each pair balances). */
struct ds_io_counters {
	uint64_t rings_created, rings_freed;       /* io_uring rings and AIO contexts */
	uint64_t buffers_created, buffers_freed;   /* block buffers and hash states */
	uint64_t registered_created, registered_freed; /* io_uring buffer registrations */
	uint64_t fds_opened, fds_closed;
};

struct ds_io_file_result {
	uint64_t size;
	uint64_t xxh3;            /* valid when checksum was on */
	int direct;               /* the data fds really ran with O_DIRECT */
};

/* Called from the calling thread; a non-zero return aborts the operation with -ECANCELED. */
typedef int (*ds_io_progress_fn)(void *arg, uint64_t done_bytes, uint64_t total_bytes);

struct ds_io_engine;

int ds_io_engine_create(struct ds_io_engine **out, const struct ds_io_config *cfg);
void ds_io_engine_destroy(struct ds_io_engine *e);

/* The last operation's first failure (dynsnap/err.h: message, operation, path); empty if it succeeded. */
const struct ds_err *ds_io_engine_err(const struct ds_io_engine *e);
/* Backend that ran the last operation (never DS_IO_AUTO once an operation ran). */
int ds_io_engine_backend(const struct ds_io_engine *e);
void ds_io_engine_counters(const struct ds_io_engine *e, struct ds_io_counters *out);

/* 0 if the backend initialises here (a ring or AIO context is opened and closed again). */
int ds_io_backend_probe(int backend);
const char *ds_io_backend_name(int backend);

/*
 * Copy n regular files src[i] -> dst[i] (dst must not exist), keeping the queue full across
 * files. Fills res[i]. On failure returns -errno, removes every destination file it had not
 * finished, and leaves the message in the engine. No ring stays open after return.
 */
int ds_io_copy_files(struct ds_io_engine *e, size_t n, const char *const *src,
		     const char *const *dst, struct ds_io_file_result *res,
		     ds_io_progress_fn progress, void *progress_arg);

/* Size and XXH3-64 of a file, read once. */
int ds_io_hash_file(struct ds_io_engine *e, const char *path, struct ds_io_file_result *res);

/* Read the whole file into buf (capacity len); -EOVERFLOW if it does not fit. *nread = size. */
int ds_io_read_into(struct ds_io_engine *e, const char *path, void *buf, size_t len,
		    uint64_t *nread);

/* Create or truncate path and write the buffers in order; res gets size and XXH3. */
int ds_io_write_buffers(struct ds_io_engine *e, const char *path, size_t n,
			const struct iovec *bufs, struct ds_io_file_result *res);

#ifdef __cplusplus
}
#endif
#endif /* DYNSNAP_IO_H */
