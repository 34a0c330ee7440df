/* dynsnap memfd restore: create memfds and fill/dump/hash/copy them with a pool of threads; fixed-address mappings. */
#ifndef DYNSNAP_MEMFD_H
#define DYNSNAP_MEMFD_H

#include <stddef.h>
#include <stdint.h>

#include "dynsnap/digest.h"
#include "dynsnap/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DS_MEMFD_DEFAULT_CHUNK (8u << 20)   /* work unit of one thread, and the digest's chunk */
#define DS_MEMFD_HASH_CHUNK DS_DIGEST_CHUNK  /* fixed: the region digest is defined over 8 MiB chunks */
#define DS_MEMFD_MAX_THREADS 256u

/* Flags of ds_memfd_config.flags. */
enum {
	DS_MEMFD_HUGETLB = 1 << 0,   /* MFD_HUGETLB (size rounded up to the huge page size); -ENOMEM/-EINVAL if none */
	DS_MEMFD_THP = 1 << 1,       /* madvise(MADV_HUGEPAGE) on the fill mapping, best effort */
	DS_MEMFD_POPULATE = 1 << 2,  /* MADV_POPULATE_WRITE each chunk before reading into it (best effort) */
	DS_MEMFD_SEAL = 1 << 3,      /* after a verified fill: seal shrink, grow and write */
	DS_MEMFD_DIRECT = 1 << 4,    /* read/write the files with O_DIRECT where aligned and supported */
	DS_MEMFD_FSYNC = 1 << 5,     /* dump: fdatasync each file and fsync its directory */
};

struct ds_memfd_config {
	unsigned threads;     /* 0: online CPUs, at most 16 */
	size_t chunk_size;    /* work unit; 0: DS_MEMFD_DEFAULT_CHUNK; a multiple of DS_MEMFD_HASH_CHUNK */
	size_t block_size;    /* bytes per read/write syscall; 0: 1 MiB; a multiple of 4096 dividing the chunk */
	unsigned flags;
};

/* Resources created and freed (tests assert each pair balances). */
struct ds_memfd_counters {
	uint64_t memfds_created, memfds_closed;   /* closed by ds_memfd_close or on failure */
	uint64_t maps_created, maps_freed;
	uint64_t fds_opened, fds_closed;          /* source/destination files */
	uint64_t threads_started, threads_joined;
};

/* One memfd filled from bytes [offset, offset + length) of a file. */
struct ds_memfd_segment {
	const char *path;
	uint64_t offset;
	uint64_t length;
	const char *name;       /* memfd name (shows in /proc/PID/maps as /memfd:NAME); NULL: "dynsnap" */
	uint64_t expect;        /* expected digest (ds_memfd_digest) when check is set */
	int check;
};

struct ds_memfd_result {
	int fd;                 /* restore: the new memfd (O_CLOEXEC), owned by the caller; dump: -1 */
	uint64_t size;          /* content bytes */
	uint64_t map_size;      /* memfd size (>= size: hugetlb rounds up) */
	uint64_t digest;        /* ds_memfd_digest of the content */
	int hugetlb;            /* backed by hugetlb pages */
	int sealed;
};

struct ds_memfd_ctx;

int ds_memfd_ctx_create(struct ds_memfd_ctx **out, const struct ds_memfd_config *cfg);
void ds_memfd_ctx_destroy(struct ds_memfd_ctx *c);
/* The first failure of the last operation (dynsnap/err.h: message, operation, path); empty if none. */
const struct ds_err *ds_memfd_ctx_err(const struct ds_memfd_ctx *c);
void ds_memfd_ctx_counters(const struct ds_memfd_ctx *c, struct ds_memfd_counters *out);
unsigned ds_memfd_ctx_threads(const struct ds_memfd_ctx *c);

/* An empty memfd of size bytes (rounded up for hugetlb); *fd is O_CLOEXEC. */
int ds_memfd_create(struct ds_memfd_ctx *c, const char *name, uint64_t size, int *fd, uint64_t *map_size);
/* Close a memfd made by this context (counted). */
int ds_memfd_close(struct ds_memfd_ctx *c, int fd);

/*
 * Create n memfds and fill each from its segment with the context's threads, hashing each chunk
 * as it lands. -EINVAL when a segment lies beyond the end of its file, -EIO when a file turns out
 * shorter while reading, -EBADMSG when a checked digest does not match. On failure every memfd
 * this call created is closed and res[i].fd is -1.
 */
int ds_memfd_restore(struct ds_memfd_ctx *c, size_t n, const struct ds_memfd_segment *segs,
		     struct ds_memfd_result *res);

/* Write the first sizes[i] bytes of memfd fds[i] to a new file paths[i] (must not exist), in
 * parallel, with digests. On failure the files this call created are removed. */
int ds_memfd_dump(struct ds_memfd_ctx *c, size_t n, const int *fds, const uint64_t *sizes,
		  const char *const *paths, struct ds_memfd_result *res);

/* Digest of a buffer with the context's threads (equal to ds_memfd_digest). */
int ds_memfd_hash(struct ds_memfd_ctx *c, const void *p, size_t len, uint64_t *digest);
/* memcpy with the context's threads. */
int ds_memfd_copy(struct ds_memfd_ctx *c, void *dst, const void *src, size_t len);

/* The region digest (ds_digest_region of dynsnap/digest.h), single-threaded reference. */
uint64_t ds_memfd_digest(const void *p, size_t len);

/* Fixed-address mappings (no context: pure syscalls). */
/* Reserve len bytes of address space (PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE). */
int ds_memfd_reserve(size_t len, void **addr);
/* Map fd's first len bytes MAP_SHARED|MAP_FIXED at addr (inside a reservation); writable or read-only. */
int ds_memfd_attach(int fd, void *addr, size_t len, int writable);
/* Replace the mapping at addr with a fresh PROT_NONE reservation in one step (no window). */
int ds_memfd_detach(void *addr, size_t len);
/* Give the range back entirely. */
int ds_memfd_release(void *addr, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* DYNSNAP_MEMFD_H */
