/* Parallel memfd restoration: create memfds, fill/dump/hash/copy them in chunks with a pthread pool, fixed mappings. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fd.h"
#include "dynsnap/digest.h"
#include "dynsnap/memfd.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
/* ASan cannot see kernel writes: make sure what we hand to the kernel is not poisoned. */
#define __DS_MCHECK_KBUF(p, n) do { if (__asan_region_is_poisoned((void *)(p), (n))) __builtin_trap(); } while (0)
#else
#define __DS_MCHECK_KBUF(p, n) do { (void)(p); (void)(n); } while (0)
#endif

#define __DS_ALIGN 4096u
#define __DS_HPAGE (2u << 20)   /* PMD-sized transparent huge page (x86-64, arm64 with 4 KiB pages) */

struct ds_memfd_ctx {
	struct ds_memfd_config cfg;
	struct ds_memfd_counters cnt;
	pthread_mutex_t lock;        /* guards the error fields (threads report failures) */
	struct ds_err err;            /* first failure: op, path, message (under lock) */
};

enum { __DS_FILL, __DS_DUMP, __DS_HASH, __DS_COPY };

/* One region a job works on. */
struct __ds_item {
	char *map;                /* fill/dump/hash: the region's bytes; copy: destination */
	const char *src;          /* copy: source */
	uint64_t len;
	int fd, dfd;              /* file (buffered, O_DIRECT or -1) */
	uint64_t file_off;
	const char *path;
	uint64_t *hashes;         /* one per DS_MEMFD_HASH_CHUNK; NULL: no hashing */
};

struct __ds_unit {
	size_t item;
	uint64_t off, len;
};

struct __ds_job {
	struct ds_memfd_ctx *c;
	int op;
	size_t nitems, nunits;
	struct __ds_item *items;
	struct __ds_unit *units;
	atomic_size_t next;
	atomic_int failed;
	atomic_int err;          /* the first unit's -errno */
};

static int __ds_mfail(struct ds_memfd_ctx *c, int err, const char *op, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

static int __ds_mfail(struct ds_memfd_ctx *c, int err, const char *op, const char *path, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&c->lock);
	va_start(ap, fmt);
	__ds_err_vset(&c->err, err, op, path, fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&c->lock);
	return err;
}

static unsigned __ds_online_cpus(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	if (n < 1)
		return 1;
	return n > 16 ? 16u : (unsigned)n;
}

int ds_memfd_ctx_create(struct ds_memfd_ctx **out, const struct ds_memfd_config *cfg)
{
	struct ds_memfd_ctx *c;
	int ret;

	*out = NULL;
	if (cfg->threads > DS_MEMFD_MAX_THREADS)
		return -EINVAL;
	if (cfg->chunk_size && (cfg->chunk_size % DS_MEMFD_HASH_CHUNK || cfg->chunk_size > (1ull << 34)))
		return -EINVAL;
	if (cfg->block_size && (cfg->block_size % __DS_ALIGN ||
				DS_MEMFD_HASH_CHUNK % cfg->block_size))
		return -EINVAL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	ret = pthread_mutex_init(&c->lock, NULL);
	if (ret) {
		free(c);
		return -ret;
	}
	c->cfg = *cfg;
	if (!c->cfg.threads)
		c->cfg.threads = __ds_online_cpus();
	if (!c->cfg.chunk_size)
		c->cfg.chunk_size = DS_MEMFD_DEFAULT_CHUNK;
	if (!c->cfg.block_size)
		c->cfg.block_size = 1u << 20;
	*out = c;
	return 0;
}

void ds_memfd_ctx_destroy(struct ds_memfd_ctx *c)
{
	if (!c)
		return;
	pthread_mutex_destroy(&c->lock);
	free(c);
}

const struct ds_err *ds_memfd_ctx_err(const struct ds_memfd_ctx *c) { return &c->err; }
unsigned ds_memfd_ctx_threads(const struct ds_memfd_ctx *c) { return c->cfg.threads; }

void ds_memfd_ctx_counters(const struct ds_memfd_ctx *c, struct ds_memfd_counters *out)
{
	*out = c->cnt;
}

/* ---- the digest (dynsnap/digest.h) ---- */

uint64_t ds_memfd_digest(const void *p, size_t len)
{
	return ds_digest_region(p, len);
}

/* ---- the worker pool ---- */

/* Read len bytes at file offset off into p; O_DIRECT for the aligned part when we have such an fd. */
static int __ds_read_full(struct ds_memfd_ctx *c, struct __ds_item *it, char *p, uint64_t off, size_t len)
{
	size_t done = 0;
	ssize_t r;

	while (done < len) {
		size_t want = len - done;
		uint64_t at = it->file_off + off + done;
		int fd = it->fd;

		if (it->dfd >= 0 && !(at % __DS_ALIGN) && !((uintptr_t)(p + done) % __DS_ALIGN) &&
		    want >= __DS_ALIGN) {
			fd = it->dfd;
			want &= ~(size_t)(__DS_ALIGN - 1);
		}
		__DS_MCHECK_KBUF(p + done, want);
		r = pread(fd, p + done, want, (off_t)at);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EINVAL && fd == it->dfd) {   /* O_DIRECT refused here: buffered from now on */
				it->dfd = -1;
				continue;
			}
			return __ds_mfail(c, -errno, "read", it->path, "at offset %llu",
					  (unsigned long long)at);
		}
		if (r == 0)
			return __ds_mfail(c, -EIO, "read", it->path,
					  "file truncated while reading (end of file at %llu, expected %llu more bytes)",
					  (unsigned long long)at, (unsigned long long)(len - done));
		done += (size_t)r;
	}
	return 0;
}

static int __ds_write_full(struct ds_memfd_ctx *c, struct __ds_item *it, const char *p, uint64_t off, size_t len)
{
	size_t done = 0;
	ssize_t r;

	while (done < len) {
		size_t want = len - done;
		uint64_t at = off + done;
		int fd = it->fd;

		if (it->dfd >= 0 && !(at % __DS_ALIGN) && !((uintptr_t)(p + done) % __DS_ALIGN) &&
		    want >= __DS_ALIGN) {
			fd = it->dfd;
			want &= ~(size_t)(__DS_ALIGN - 1);
		}
		r = pwrite(fd, p + done, want, (off_t)at);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EINVAL && fd == it->dfd) {
				it->dfd = -1;
				continue;
			}
			return __ds_mfail(c, -errno, "write", it->path, "at offset %llu",
					  (unsigned long long)at);
		}
		if (r == 0)
			return __ds_mfail(c, -EIO, "write", it->path, "no progress at offset %llu",
					  (unsigned long long)at);
		done += (size_t)r;
	}
	return 0;
}

static int __ds_do_unit(struct __ds_job *j, const struct __ds_unit *u)
{
	struct ds_memfd_ctx *c = j->c;
	struct __ds_item *it = &j->items[u->item];
	size_t bs = c->cfg.block_size;
	uint64_t off, end = u->off + u->len;
	struct ds_digest_stream *st = NULL;
	int ret = 0;

	if (j->op == __DS_COPY) {
		memcpy(it->map + u->off, it->src + u->off, u->len);
		return 0;
	}
	if (it->hashes && ds_digest_stream_create(&st))
		return __ds_mfail(c, -ENOMEM, "aligned_alloc", it->path, "digest state");
	if (j->op == __DS_FILL && (c->cfg.flags & DS_MEMFD_POPULATE))
		(void)madvise(it->map + u->off, u->len, MADV_POPULATE_WRITE);  /* best effort (kernel >= 5.14) */
	for (off = u->off; off < end;) {
		uint64_t hend = off + DS_MEMFD_HASH_CHUNK < end ? off + DS_MEMFD_HASH_CHUNK : end;
		uint64_t b;

		if (st)
			ds_digest_stream_reset(st);
		for (b = off; b < hend; b += bs) {
			size_t n = hend - b < bs ? (size_t)(hend - b) : bs;

			if (atomic_load_explicit(&j->failed, memory_order_relaxed)) {
				ret = -ECANCELED;
				goto out;
			}
			if (j->op == __DS_FILL)
				ret = __ds_read_full(c, it, it->map + b, b, n);
			else if (j->op == __DS_DUMP)
				ret = __ds_write_full(c, it, it->map + b, b, n);
			if (ret)
				goto out;
			if (st)
				ds_digest_stream_update(st, it->map + b, n);
		}
		if (st)
			it->hashes[off / DS_MEMFD_HASH_CHUNK] = ds_digest_stream_final(st);
		off = hend;
	}
out:
	ds_digest_stream_destroy(st);
	return ret;
}

static void *__ds_worker(void *arg)
{
	struct __ds_job *j = arg;
	size_t i;
	int ret, zero = 0;

	while ((i = atomic_fetch_add(&j->next, 1)) < j->nunits) {
		if (atomic_load(&j->failed))
			break;
		ret = __ds_do_unit(j, &j->units[i]);
		if (ret) {
			atomic_compare_exchange_strong(&j->err, &zero, ret);
			atomic_store(&j->failed, 1);
			break;
		}
	}
	return NULL;
}

/* Split the items into units and run them on the pool; 0 or the first error. */
static int __ds_run(struct __ds_job *j)
{
	struct ds_memfd_ctx *c = j->c;
	pthread_t tids[DS_MEMFD_MAX_THREADS];
	size_t i, k = 0, nthreads, started = 0;
	uint64_t off;
	int ret = 0;

	j->nunits = 0;
	for (i = 0; i < j->nitems; i++)
		j->nunits += (size_t)((j->items[i].len + c->cfg.chunk_size - 1) / c->cfg.chunk_size);
	j->units = calloc(j->nunits ? j->nunits : 1, sizeof(*j->units));
	if (!j->units)
		return __ds_mfail(c, -ENOMEM, "allocate", NULL, "%zu work units", j->nunits);
	for (i = 0; i < j->nitems; i++)
		for (off = 0; off < j->items[i].len; off += c->cfg.chunk_size) {
			j->units[k].item = i;
			j->units[k].off = off;
			j->units[k].len = j->items[i].len - off < c->cfg.chunk_size ?
					  j->items[i].len - off : c->cfg.chunk_size;
			k++;
		}
	atomic_init(&j->next, 0);
	atomic_init(&j->failed, 0);
	atomic_init(&j->err, 0);
	nthreads = c->cfg.threads < j->nunits ? c->cfg.threads : j->nunits;
	if (nthreads <= 1) {
		__ds_worker(j);
	} else {
		for (i = 0; i < nthreads; i++) {
			ret = pthread_create(&tids[i], NULL, __ds_worker, j);
			if (ret) {
				__ds_mfail(c, -ret, "pthread_create", NULL, "thread %zu of %zu", i + 1, nthreads);
				atomic_store(&j->failed, 1);
				ret = -ret;
				break;
			}
			c->cnt.threads_started++;
			started++;
		}
		if (started == 0 && !ret)
			__ds_worker(j);
		for (i = 0; i < started; i++) {
			pthread_join(tids[i], NULL);
			c->cnt.threads_joined++;
		}
	}
	free(j->units);
	j->units = NULL;
	if (ret)
		return ret;
	if (atomic_load(&j->failed))
		return atomic_load(&j->err) ? atomic_load(&j->err) : -EIO;
	return 0;
}

/* ---- memfds and mappings ---- */

static int __ds_open_counted(struct ds_memfd_ctx *c, const char *path, int flags, int mode)
{
	return __ds_fd_open(path, flags, mode, &c->cnt.fds_opened);
}

static void __ds_close_counted(struct ds_memfd_ctx *c, int *fd)
{
	(void)__ds_fd_close(*fd, &c->cnt.fds_closed);  /* the fd is released whatever close says */
	*fd = -1;
}

int ds_memfd_create(struct ds_memfd_ctx *c, const char *name, uint64_t size, int *fd, uint64_t *map_size)
{
	unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
	const char *nm = name && name[0] ? name : "dynsnap";
	uint64_t sz = size;
	struct stat st;
	int f;

	*fd = -1;
	if (c->cfg.flags & DS_MEMFD_HUGETLB)
		flags |= MFD_HUGETLB;
	f = memfd_create(nm, flags);
	if (f < 0)
		return __ds_mfail(c, -errno, "memfd_create", nm, (c->cfg.flags & DS_MEMFD_HUGETLB) ?
				  "hugetlb memfd unavailable on this kernel" : NULL);
	c->cnt.memfds_created++;
	if (c->cfg.flags & DS_MEMFD_HUGETLB) {   /* hugetlbfs sizes and maps whole huge pages only */
		if (fstat(f, &st) < 0) {
			int err = -errno;

			ds_memfd_close(c, f);
			return __ds_mfail(c, err, "fstat", nm, "hugetlb memfd");
		}
		if (st.st_blksize > 0)
			sz = (size + (uint64_t)st.st_blksize - 1) / (uint64_t)st.st_blksize * (uint64_t)st.st_blksize;
	}
	if (ftruncate(f, (off_t)sz) < 0) {
		int err = -errno;

		ds_memfd_close(c, f);
		return __ds_mfail(c, err, "ftruncate", nm, "memfd to %llu bytes", (unsigned long long)sz);
	}
	*fd = f;
	if (map_size)
		*map_size = sz;
	return 0;
}

int ds_memfd_close(struct ds_memfd_ctx *c, int fd)
{
	if (fd < 0)
		return 0;
	c->cnt.memfds_closed++;
	if (close(fd) < 0 && errno != EINTR)
		return -errno;
	return 0;
}

/* Shared mapping of fd's first len bytes. With thp (and len >= 2 MiB) the mapping starts on a 2 MiB
 * boundary, so huge shmem folios can be mapped by PMDs (the kernel aligns shmem mappings only while
 * shmem THP is enabled host-wide), and MADV_HUGEPAGE is applied before any page is touched. */
static int __ds_map(struct ds_memfd_ctx *c, int fd, uint64_t len, int prot, int thp, const char *what, char **out)
{
	uint64_t plen, rlen;
	char *r = NULL, *at;
	void *p;
	int err;

	*out = NULL;
	if (!len)
		return 0;
	thp = thp && len >= __DS_HPAGE;
	if (thp) {
		/* over-reserve by 2 MiB, map at the first 2 MiB boundary inside, give the slack back */
		plen = (len + __DS_ALIGN - 1) / __DS_ALIGN * __DS_ALIGN;
		rlen = plen + __DS_HPAGE;
		p = mmap(NULL, (size_t)rlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED)
			return __ds_mfail(c, -errno, "mmap", what, "reserving %llu bytes of address space",
					  (unsigned long long)rlen);
		r = p;
		at = r + (__DS_HPAGE - (uintptr_t)r % __DS_HPAGE) % __DS_HPAGE;
		p = mmap(at, (size_t)len, prot, MAP_SHARED | MAP_FIXED, fd, 0);
		if (p == MAP_FAILED) {
			err = -errno;
			if (munmap(r, (size_t)rlen) < 0)
				return __ds_mfail(c, -errno, "munmap", what, "address space reservation");
			goto fail;
		}
		if ((at > r && munmap(r, (size_t)(at - r)) < 0) ||
		    (r + rlen > at + plen && munmap(at + plen, (size_t)(r + rlen - (at + plen))) < 0)) {
			err = -errno;
			(void)munmap(r, (size_t)rlen);   /* the whole range: already failing, report the first error */
			return __ds_mfail(c, err, "munmap", what, "slack of the 2 MiB-aligned mapping");
		}
		/* EINVAL: a kernel without THP; the fill works with small pages */
		if (madvise(at, (size_t)len, MADV_HUGEPAGE) < 0 && errno != EINVAL) {
			err = -errno;
			if (munmap(at, (size_t)len) < 0)
				return __ds_mfail(c, -errno, "munmap", what, "%llu bytes", (unsigned long long)len);
			return __ds_mfail(c, err, "madvise", what, "MADV_HUGEPAGE on %llu bytes",
					  (unsigned long long)len);
		}
	} else {
		p = mmap(NULL, (size_t)len, prot, MAP_SHARED, fd, 0);
		if (p == MAP_FAILED) {
			err = -errno;
			goto fail;
		}
	}
	c->cnt.maps_created++;
	*out = p;
	return 0;
fail:
	if (err == -ENOMEM && (c->cfg.flags & DS_MEMFD_HUGETLB))
		return __ds_mfail(c, err, "mmap", what, "no free hugetlb pages for %llu bytes "
				  "(see vm.nr_hugepages)", (unsigned long long)len);
	return __ds_mfail(c, err, "mmap", what, "%llu bytes", (unsigned long long)len);
}

static void __ds_unmap(struct ds_memfd_ctx *c, char **p, uint64_t len)
{
	if (!*p)
		return;
	if (munmap(*p, (size_t)len) < 0)   /* a bug (e.g. a length that splits a huge page): say so */
		__ds_mfail(c, -errno, "munmap", NULL, "%llu bytes at %p", (unsigned long long)len, (void *)*p);
	c->cnt.maps_freed++;
	*p = NULL;
}

static void __ds_free_items(struct ds_memfd_ctx *c, struct __ds_item *items, size_t n, const uint64_t *map_len)
{
	size_t i;

	if (!items)
		return;
	for (i = 0; i < n; i++) {
		__ds_unmap(c, &items[i].map, map_len ? map_len[i] : items[i].len);
		__ds_close_counted(c, &items[i].fd);
		__ds_close_counted(c, &items[i].dfd);
		free(items[i].hashes);
	}
	free(items);
}

static struct __ds_item *__ds_new_items(size_t n, int hashing)
{
	struct __ds_item *items = calloc(n ? n : 1, sizeof(*items));
	size_t i;

	if (!items)
		return NULL;
	for (i = 0; i < n; i++) {
		items[i].fd = -1;
		items[i].dfd = -1;
	}
	(void)hashing;
	return items;
}

static int __ds_alloc_hashes(struct ds_memfd_ctx *c, struct __ds_item *it)
{
	it->hashes = calloc(ds_digest_nchunks(it->len) + 1, sizeof(uint64_t));
	if (!it->hashes)
		return __ds_mfail(c, -ENOMEM, "allocate", it->path, "digest table");
	return 0;
}

static char *__ds_hex(uint64_t v, char *buf)
{
	snprintf(buf, 17, "%016llx", (unsigned long long)v);
	return buf;
}

int ds_memfd_restore(struct ds_memfd_ctx *c, size_t n, const struct ds_memfd_segment *segs,
		     struct ds_memfd_result *res)
{
	struct __ds_job j = { .c = c, .op = __DS_FILL, .nitems = n };
	uint64_t *maplen = calloc(n ? n : 1, sizeof(uint64_t));
	struct stat st;
	size_t i;
	int ret = 0;

	for (i = 0; i < n; i++) {
		memset(&res[i], 0, sizeof(res[i]));
		res[i].fd = -1;
	}
	j.items = __ds_new_items(n, 1);
	if (!j.items || !maplen) {
		free(maplen);
		free(j.items);
		return __ds_mfail(c, -ENOMEM, "allocate", NULL, "%zu segments", n);
	}
	/* open and check every source before any memory is committed */
	for (i = 0; i < n && !ret; i++) {
		struct __ds_item *it = &j.items[i];

		it->path = segs[i].path;
		it->file_off = segs[i].offset;
		it->len = segs[i].length;
		ret = __ds_open_counted(c, segs[i].path, O_RDONLY, 0);
		if (ret < 0) {
			ret = __ds_mfail(c, ret, "open", segs[i].path, NULL);
			break;
		}
		it->fd = ret;
		ret = 0;
		if (fstat(it->fd, &st) < 0) {
			ret = __ds_mfail(c, -errno, "stat", segs[i].path, NULL);
			break;
		}
		if (!S_ISREG(st.st_mode)) {
			ret = __ds_mfail(c, -EINVAL, "open", segs[i].path, "not a regular file");
			break;
		}
		if (segs[i].offset > (uint64_t)st.st_size || segs[i].length > (uint64_t)st.st_size - segs[i].offset) {
			ret = __ds_mfail(c, -EINVAL, "segment", segs[i].path,
					 "bytes [%llu, %llu) lie beyond the end of the file (%llu bytes)",
					 (unsigned long long)segs[i].offset,
					 (unsigned long long)(segs[i].offset + segs[i].length),
					 (unsigned long long)st.st_size);
			break;
		}
		if (c->cfg.flags & DS_MEMFD_DIRECT) {
			int d = __ds_open_counted(c, segs[i].path, O_RDONLY | O_DIRECT, 0);

			if (d >= 0)
				it->dfd = d;   /* else: the file system refuses O_DIRECT, read buffered */
		}
		ret = __ds_alloc_hashes(c, it);
	}
	for (i = 0; i < n && !ret; i++) {
		ret = ds_memfd_create(c, segs[i].name, segs[i].length, &res[i].fd, &maplen[i]);
		if (ret)
			break;
		res[i].size = segs[i].length;
		res[i].map_size = maplen[i];
		res[i].hugetlb = !!(c->cfg.flags & DS_MEMFD_HUGETLB);
		/* hugetlbfs aligns its mappings itself and needs no advice */
		ret = __ds_map(c, res[i].fd, maplen[i], PROT_READ | PROT_WRITE,
			       (c->cfg.flags & DS_MEMFD_THP) && !(c->cfg.flags & DS_MEMFD_HUGETLB),
			       segs[i].name ? segs[i].name : segs[i].path, &j.items[i].map);
	}
	if (!ret)
		ret = __ds_run(&j);
	for (i = 0; i < n && !ret; i++) {
		char a[17], b[17];

		res[i].digest = ds_digest_combine(j.items[i].hashes, ds_digest_nchunks(j.items[i].len), j.items[i].len);
		if (segs[i].check && res[i].digest != segs[i].expect)
			ret = __ds_mfail(c, -EBADMSG, "verify", segs[i].path,
					 "checksum mismatch in bytes [%llu, %llu): digest %s, expected %s",
					 (unsigned long long)segs[i].offset,
					 (unsigned long long)(segs[i].offset + segs[i].length),
					 __ds_hex(res[i].digest, a), __ds_hex(segs[i].expect, b));
	}
	/* drop our mappings and source fds; the memfds stay */
	__ds_free_items(c, j.items, n, maplen);
	for (i = 0; i < n && !ret; i++) {
		if (!(c->cfg.flags & DS_MEMFD_SEAL))
			continue;
		if (fcntl(res[i].fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) < 0)
			ret = __ds_mfail(c, -errno, "seal", segs[i].name ? segs[i].name : segs[i].path, NULL);
		else
			res[i].sealed = 1;
	}
	free(maplen);
	if (ret) {
		for (i = 0; i < n; i++) {
			ds_memfd_close(c, res[i].fd);
			res[i].fd = -1;
		}
	}
	return ret;
}

int ds_memfd_dump(struct ds_memfd_ctx *c, size_t n, const int *fds, const uint64_t *sizes,
		  const char *const *paths, struct ds_memfd_result *res)
{
	struct __ds_job j = { .c = c, .op = __DS_DUMP, .nitems = n };
	char *created = calloc(n ? n : 1, 1);
	uint64_t *maplen = calloc(n ? n : 1, sizeof(uint64_t));
	struct stat st;
	size_t i;
	int ret = 0;

	j.items = __ds_new_items(n, 1);
	if (!j.items || !created || !maplen) {
		free(maplen);
		free(created);
		free(j.items);
		return __ds_mfail(c, -ENOMEM, "allocate", NULL, "%zu regions", n);
	}
	for (i = 0; i < n && !ret; i++) {
		struct __ds_item *it = &j.items[i];
		int fd;

		memset(&res[i], 0, sizeof(res[i]));
		res[i].fd = -1;
		it->path = paths[i];
		it->len = sizes[i];
		if (fstat(fds[i], &st) < 0) {
			ret = __ds_mfail(c, -errno, "stat", paths[i], "memfd %d", fds[i]);
			break;
		}
		if ((uint64_t)st.st_size < sizes[i]) {
			ret = __ds_mfail(c, -EINVAL, "dump", paths[i], "memfd %d holds %llu bytes, asked for %llu",
					 fds[i], (unsigned long long)st.st_size, (unsigned long long)sizes[i]);
			break;
		}
		/* whole blocks: a hugetlb memfd maps (and unmaps) whole huge pages only */
		maplen[i] = sizes[i];
		if (st.st_blksize > 0)
			maplen[i] = (sizes[i] + (uint64_t)st.st_blksize - 1) / (uint64_t)st.st_blksize *
				    (uint64_t)st.st_blksize;
		ret = __ds_map(c, fds[i], maplen[i], PROT_READ, 0, paths[i], &it->map);
		if (ret)
			break;
		fd = __ds_open_counted(c, paths[i], O_WRONLY | O_CREAT | O_EXCL, 0644);
		if (fd < 0) {
			ret = __ds_mfail(c, fd, "open", paths[i], NULL);
			break;
		}
		it->fd = fd;
		created[i] = 1;
		if (sizes[i] && fallocate(fd, 0, 0, (off_t)sizes[i]) < 0 && errno != EOPNOTSUPP) {
			ret = __ds_mfail(c, -errno, "fallocate", paths[i], "%llu bytes", (unsigned long long)sizes[i]);
			break;
		}
		if (c->cfg.flags & DS_MEMFD_DIRECT) {
			int d = __ds_open_counted(c, paths[i], O_WRONLY | O_DIRECT, 0);

			if (d >= 0)
				it->dfd = d;
		}
		ret = __ds_alloc_hashes(c, it);
	}
	if (!ret)
		ret = __ds_run(&j);
	for (i = 0; i < n && !ret; i++) {
		res[i].size = sizes[i];
		res[i].map_size = sizes[i];
		res[i].digest = ds_digest_combine(j.items[i].hashes, ds_digest_nchunks(sizes[i]), sizes[i]);
		if ((c->cfg.flags & DS_MEMFD_FSYNC) && fdatasync(j.items[i].fd) < 0)
			ret = __ds_mfail(c, -errno, "fsync", paths[i], NULL);
	}
	if (!ret && (c->cfg.flags & DS_MEMFD_FSYNC)) {
		for (i = 0; i < n && !ret; i++) {
			char dir[4096];
			const char *slash = strrchr(paths[i], '/');
			int dfd;

			if (!slash)
				snprintf(dir, sizeof(dir), ".");
			else
				snprintf(dir, sizeof(dir), "%.*s", (int)(slash == paths[i] ? 1 : slash - paths[i]),
					 paths[i]);
			dfd = __ds_open_counted(c, dir, O_RDONLY | O_DIRECTORY, 0);
			if (dfd < 0) {
				ret = __ds_mfail(c, dfd, "open", dir, NULL);
				break;
			}
			if (fsync(dfd) < 0)
				ret = __ds_mfail(c, -errno, "fsync", dir, NULL);
			__ds_close_counted(c, &dfd);
		}
	}
	__ds_free_items(c, j.items, n, maplen);
	free(maplen);
	if (ret)
		for (i = 0; i < n; i++)
			if (created[i] && unlink(paths[i]) < 0)
				__ds_mfail(c, -errno, "unlink", paths[i], "removing a partial dump");
	free(created);
	return ret;
}

int ds_memfd_hash(struct ds_memfd_ctx *c, const void *p, size_t len, uint64_t *digest)
{
	struct __ds_item it = { .map = (char *)p, .len = len, .fd = -1, .dfd = -1, .path = "buffer" };
	struct __ds_job j = { .c = c, .op = __DS_HASH, .nitems = 1, .items = &it };
	int ret;

	ret = __ds_alloc_hashes(c, &it);
	if (!ret)
		ret = __ds_run(&j);
	if (!ret)
		*digest = ds_digest_combine(it.hashes, ds_digest_nchunks(len), len);
	free(it.hashes);
	return ret;
}

int ds_memfd_copy(struct ds_memfd_ctx *c, void *dst, const void *src, size_t len)
{
	struct __ds_item it = { .map = dst, .src = src, .len = len, .fd = -1, .dfd = -1, .path = "buffer" };
	struct __ds_job j = { .c = c, .op = __DS_COPY, .nitems = 1, .items = &it };

	return __ds_run(&j);
}

int ds_memfd_reserve(size_t len, void **addr)
{
	void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	*addr = NULL;
	if (p == MAP_FAILED)
		return -errno;
	*addr = p;
	return 0;
}

int ds_memfd_attach(int fd, void *addr, size_t len, int writable)
{
	int prot = PROT_READ | (writable ? PROT_WRITE : 0);
	void *p;

	if ((uintptr_t)addr % __DS_ALIGN)
		return -EINVAL;
	p = mmap(addr, len, prot, MAP_SHARED | MAP_FIXED, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	return 0;
}

int ds_memfd_detach(void *addr, size_t len)
{
	void *p;

	if ((uintptr_t)addr % __DS_ALIGN)
		return -EINVAL;
	p = mmap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
	if (p == MAP_FAILED)
		return -errno;
	return 0;
}

int ds_memfd_release(void *addr, size_t len)
{
	if (munmap(addr, len) < 0)
		return -errno;
	return 0;
}
