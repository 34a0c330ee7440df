/* Private: the engine object, the backend interface and helpers shared by the I/O engine's .c files. */
#ifndef DYNSNAP_ENGINE_H
#define DYNSNAP_ENGINE_H

#include "err.h"
#include <libaio.h>
#include <liburing.h>
#include <stdarg.h>

#include "dynsnap/io.h"

struct ds_io_engine {
	struct ds_io_config cfg;
	int backend_used;
	struct ds_io_counters cnt;
	struct ds_err err;      /* first failure: op, path, message */
};

/* One completed request: tag as given to __ds_backend_prep, res = bytes or -errno. */
struct __ds_cqe {
	unsigned tag;
	long long res;
};

enum { __DS_OP_READ = 0, __DS_OP_WRITE = 1 };

/* At most `depth` requests in flight, each with a distinct tag < depth. */
struct __ds_backend {
	int kind;
	unsigned depth;
	unsigned queued;      /* prepared, not yet submitted */
	unsigned inflight;    /* submitted, not yet reaped */
	int fixed;            /* io_uring buffers registered */
	struct ds_io_engine *e;
	struct io_uring ring;
	io_context_t aio;
	struct iocb *iocbs;
	struct iocb **iocbp;
	struct io_event *events;
	struct __ds_cqe *done; /* psync: completed at prep time */
	unsigned ndone;
};

int __ds_backend_open(struct ds_io_engine *e, struct __ds_backend *b, unsigned depth);
void __ds_backend_close(struct __ds_backend *b);
/* io_uring only, best effort: register n buffers (index = tag). 0 or -errno. */
int __ds_backend_register(struct __ds_backend *b, const struct iovec *iov, unsigned n);
int __ds_backend_prep(struct __ds_backend *b, int op, int fd, void *buf, size_t len,
		      uint64_t off, unsigned tag);
int __ds_backend_submit(struct __ds_backend *b);
/* Submit what is queued and reap between min and max completions; returns the count or -errno. */
int __ds_backend_reap(struct __ds_backend *b, struct __ds_cqe *out, unsigned max, unsigned min);
/* Wait for everything in flight and drop the results (after an error). */
void __ds_backend_drain(struct __ds_backend *b);

/* Record a failure: err is -errno; returns err. */
int __ds_fail(struct ds_io_engine *e, int err, const char *op, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

void *__ds_buf_alloc(struct ds_io_engine *e, size_t len);
void __ds_buf_free(struct ds_io_engine *e, void *p);
int __ds_open(struct ds_io_engine *e, const char *path, int flags, int mode);
int __ds_close(struct ds_io_engine *e, int fd);
/* Try to switch fd to O_DIRECT; 1 if it is now direct, 0 if the file system refused. */
int __ds_set_direct(int fd);
uint64_t __ds_now_ms(void);
/* fsync the directory holding path. */
int __ds_fsync_parent(struct ds_io_engine *e, const char *path);

/* hash.c: XXH3-64 streaming, without exposing xxhash.h to the other files. */
struct __ds_hash;
struct __ds_hash *__ds_hash_new(struct ds_io_engine *e);
void __ds_hash_free(struct ds_io_engine *e, struct __ds_hash *h);
void __ds_hash_update(struct __ds_hash *h, const void *p, size_t n);
uint64_t __ds_hash_digest(struct __ds_hash *h);

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
/* ASan cannot see kernel writes: make sure what we hand to the kernel is not poisoned. */
#define __DS_CHECK_KBUF(p, n) do { if (__asan_region_is_poisoned((void *)(p), (n))) __builtin_trap(); } while (0)
#else
#define __DS_CHECK_KBUF(p, n) do { (void)(p); (void)(n); } while (0)
#endif

#endif
