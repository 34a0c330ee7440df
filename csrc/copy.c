/* Streaming copy and hash of many files: a pool of aligned blocks kept in flight across files, inline XXH3. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"

#define ROUNDUP(x) (((x) + DS_IO_ALIGN - 1) / DS_IO_ALIGN * DS_IO_ALIGN)

struct slot {
	char *buf;
	int file;          /* index into copy.files */
	uint64_t off;      /* of the block in the file */
	size_t len;        /* data bytes of the block */
	size_t done;       /* bytes finished in the current phase */
	int writing;       /* 0: reading, 1: writing */
	int rdone, hashed, written;
};

struct afile {
	int used;
	size_t idx;
	int sfd, dfd, sdirect, ddirect, created;
	uint64_t size, next_read, next_hash;
	unsigned refs;
	struct __ds_hash *h;
};

struct copy {
	struct ds_io_engine *e;
	struct __ds_backend b;
	size_t n;
	const char *const *src, *const *dst;
	struct ds_io_file_result *res;
	int hash_only, checksum, direct;
	size_t bs;
	unsigned qd, nfree, nfiles;
	char *pool;
	struct slot *slots;
	unsigned *freel;
	struct __ds_cqe *cqes;
	struct afile *files;
	size_t next_file;
	int cur;
	uint64_t done_bytes, total_bytes, last_ms;
	ds_io_progress_fn progress;
	void *progress_arg;
};

static const char *dpath(struct copy *c, struct afile *a)
{
	return c->hash_only ? c->src[a->idx] : c->dst[a->idx];
}

static int finish_file(struct copy *c, int fi)
{
	struct afile *a = &c->files[fi];
	struct ds_io_file_result *r = &c->res[a->idx];
	int ret = 0;

	if (!c->hash_only) {
		if (a->ddirect && a->size % DS_IO_ALIGN && ftruncate(a->dfd, (off_t)a->size) < 0)
			return __ds_fail(c->e, -errno, "truncate", dpath(c, a), NULL);
		if (c->e->cfg.fsync && fdatasync(a->dfd) < 0)
			return __ds_fail(c->e, -errno, "fsync", dpath(c, a), NULL);
		ret = __ds_close(c->e, a->dfd);
		a->dfd = -1;
		if (ret)
			return __ds_fail(c->e, ret, "close", dpath(c, a), NULL);
	}
	__ds_close(c->e, a->sfd);
	a->sfd = -1;
	r->size = a->size;
	r->xxh3 = a->h ? __ds_hash_digest(a->h) : 0;
	r->direct = a->sdirect && (c->hash_only || a->ddirect);
	__ds_hash_free(c->e, a->h);
	a->h = NULL;
	a->used = 0;
	c->nfiles--;
	return 0;
}

static int open_next(struct copy *c)
{
	size_t i = c->next_file++;
	struct afile *a = NULL;
	struct stat st;
	unsigned k;
	int fd;

	for (k = 0; k <= c->qd; k++)
		if (!c->files[k].used) {
			a = &c->files[k];
			break;
		}
	if (!a)
		return __ds_fail(c->e, -EIO, "open", c->src[i], "internal error: no free file entry");
	memset(a, 0, sizeof(*a));
	a->used = 1;
	a->idx = i;
	a->sfd = a->dfd = -1;
	c->nfiles++;
	fd = __ds_open(c->e, c->src[i], O_RDONLY, 0);
	if (fd < 0)
		return __ds_fail(c->e, fd, "open", c->src[i], NULL);
	a->sfd = fd;
	if (fstat(fd, &st) < 0)
		return __ds_fail(c->e, -errno, "stat", c->src[i], NULL);
	if (!S_ISREG(st.st_mode))
		return __ds_fail(c->e, -EINVAL, "open", c->src[i], "not a regular file");
	a->size = (uint64_t)st.st_size;
	a->sdirect = c->direct && a->size >= DS_IO_ALIGN && __ds_set_direct(fd);
	if (a->sdirect)
		posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	if (!c->hash_only) {
		fd = __ds_open(c->e, c->dst[i], O_WRONLY | O_CREAT | O_EXCL, (int)(st.st_mode & 0777));
		if (fd < 0)
			return __ds_fail(c->e, fd, "create", c->dst[i], NULL);
		a->dfd = fd;
		a->created = 1;
		a->ddirect = c->direct && a->size >= DS_IO_ALIGN && __ds_set_direct(fd);
		/* allocate up front: O_DIRECT writes inside the allocation are not extending ones */
		if (a->ddirect && fallocate(fd, 0, 0, (off_t)ROUNDUP(a->size)) < 0 && errno == ENOSPC)
			return __ds_fail(c->e, -ENOSPC, "write", c->dst[i], "cannot allocate %llu bytes",
					 (unsigned long long)a->size);
	}
	if (c->checksum) {
		a->h = __ds_hash_new(c->e);
		if (!a->h)
			return __ds_fail(c->e, -ENOMEM, "hash", c->src[i], NULL);
	}
	if (!a->size)
		return finish_file(c, (int)(a - c->files));
	c->cur = (int)(a - c->files);
	return 0;
}

static int submit_read(struct copy *c, unsigned t)
{
	struct slot *s = &c->slots[t];
	struct afile *a = &c->files[s->file];
	size_t len = a->sdirect ? ROUNDUP(s->len) - s->done : s->len - s->done;

	return __ds_backend_prep(&c->b, __DS_OP_READ, a->sfd, s->buf + s->done, len, s->off + s->done, t);
}

static int submit_write(struct copy *c, unsigned t)
{
	struct slot *s = &c->slots[t];
	struct afile *a = &c->files[s->file];
	size_t len = a->ddirect ? ROUNDUP(s->len) - s->done : s->len - s->done;

	return __ds_backend_prep(&c->b, __DS_OP_WRITE, a->dfd, s->buf + s->done, len, s->off + s->done, t);
}

static int fill(struct copy *c)
{
	struct afile *a;
	struct slot *s;
	unsigned t;
	int ret;

	while (c->nfree) {
		if (c->cur < 0) {
			if (c->next_file >= c->n || c->nfiles > c->qd)
				break;
			ret = open_next(c);
			if (ret)
				return ret;
			continue;
		}
		a = &c->files[c->cur];
		t = c->freel[--c->nfree];
		s = &c->slots[t];
		s->file = c->cur;
		s->off = a->next_read;
		s->len = a->size - a->next_read < c->bs ? a->size - a->next_read : c->bs;
		s->done = 0;
		s->writing = s->rdone = 0;
		s->hashed = !c->checksum;
		s->written = c->hash_only;
		a->next_read += s->len;
		a->refs++;
		if (a->next_read == a->size)
			c->cur = -1;
		ret = submit_read(c, t);
		if (ret)
			return __ds_fail(c->e, ret, "read", c->src[a->idx], "cannot queue");
	}
	return 0;
}

static int release(struct copy *c, unsigned t)
{
	struct slot *s = &c->slots[t];
	struct afile *a = &c->files[s->file];

	if (!s->rdone || !s->hashed || !s->written)
		return 0;
	c->freel[c->nfree++] = t;
	c->done_bytes += s->len;
	s->rdone = 0;
	a->refs--;
	if (!a->refs && a->next_read == a->size && c->cur != s->file)
		return finish_file(c, s->file);
	return 0;
}

/* Hash the blocks of file fi that are next in file order; blocks may complete out of order. */
static int hash_chain(struct copy *c, int fi)
{
	struct afile *a = &c->files[fi];
	unsigned t;
	int found, ret;

	do {
		found = 0;
		for (t = 0; t < c->qd; t++) {
			struct slot *s = &c->slots[t];

			if (s->rdone && !s->hashed && s->file == fi && s->off == a->next_hash) {
				__ds_hash_update(a->h, s->buf, s->len);
				a->next_hash += s->len;
				s->hashed = 1;
				found = 1;
				ret = release(c, t);
				if (ret || !a->used)
					return ret;
				break;
			}
		}
	} while (found);
	return 0;
}

static int on_read(struct copy *c, unsigned t, long long res)
{
	struct slot *s = &c->slots[t];
	struct afile *a = &c->files[s->file];
	size_t want = s->len - s->done;
	int fi = s->file, ret;

	if (res == -EAGAIN || res == -EINTR)
		return submit_read(c, t);
	if (res < 0)
		return __ds_fail(c->e, (int)res, "read", c->src[a->idx], NULL);
	if (res == 0)
		return __ds_fail(c->e, -EIO, "read", c->src[a->idx],
				 "file truncated while reading (EOF at %llu of %llu bytes)",
				 (unsigned long long)(s->off + s->done), (unsigned long long)a->size);
	s->done += (size_t)res < want ? (size_t)res : want;
	if (s->done < s->len) {
		if (a->sdirect && s->done % DS_IO_ALIGN)
			return __ds_fail(c->e, -EIO, "read", c->src[a->idx],
					 "file truncated while reading (EOF at %llu of %llu bytes)",
					 (unsigned long long)(s->off + s->done), (unsigned long long)a->size);
		return submit_read(c, t);
	}
	s->rdone = 1;
	if (a->ddirect && s->len % DS_IO_ALIGN)
		memset(s->buf + s->len, 0, ROUNDUP(s->len) - s->len);
	if (!c->hash_only) {
		s->writing = 1;
		s->done = 0;
		ret = submit_write(c, t);
		if (ret)
			return __ds_fail(c->e, ret, "write", c->dst[a->idx], "cannot queue");
	}
	if (c->checksum)
		return hash_chain(c, fi);
	return release(c, t);
}

static int on_write(struct copy *c, unsigned t, long long res)
{
	struct slot *s = &c->slots[t];
	struct afile *a = &c->files[s->file];
	size_t want = (a->ddirect ? ROUNDUP(s->len) : s->len) - s->done;

	if (res == -EAGAIN || res == -EINTR)
		return submit_write(c, t);
	if (res < 0)
		return __ds_fail(c->e, (int)res, "write", c->dst[a->idx], NULL);
	if (res == 0)
		return __ds_fail(c->e, -ENOSPC, "write", c->dst[a->idx], "wrote nothing");
	s->done += (size_t)res < want ? (size_t)res : want;
	if ((size_t)res < want) {
		if (a->ddirect && s->done % DS_IO_ALIGN)
			return __ds_fail(c->e, -ENOSPC, "write", c->dst[a->idx], "short direct write");
		return submit_write(c, t);
	}
	s->written = 1;
	return release(c, t);
}

static int report(struct copy *c, int force)
{
	uint64_t now;

	if (!c->progress)
		return 0;
	now = __ds_now_ms();
	if (!force && now - c->last_ms < c->e->cfg.progress_ms)
		return 0;
	c->last_ms = now;
	if (c->progress(c->progress_arg, c->done_bytes, c->total_bytes))
		return __ds_fail(c->e, -ECANCELED, "copy", NULL, "cancelled by the progress callback");
	return 0;
}

static int fsync_dirs(struct copy *c)
{
	const char *prev = NULL;
	size_t i, plen = 0;
	int ret;

	for (i = 0; i < c->n; i++) {
		const char *slash = strrchr(c->dst[i], '/');
		size_t len = slash ? (size_t)(slash - c->dst[i]) : 0;

		/* consecutive files in one directory: sync it once */
		if (prev && len == plen && !strncmp(prev, c->dst[i], len))
			continue;
		ret = __ds_fsync_parent(c->e, c->dst[i]);
		if (ret)
			return ret;
		prev = c->dst[i];
		plen = len;
	}
	return 0;
}

static int run(struct copy *c)
{
	struct ds_io_engine *e = c->e;
	struct stat st;
	unsigned t;
	size_t i;
	int ret, n, k;

	for (i = 0; i < c->n; i++) {
		if (stat(c->src[i], &st) < 0)
			return __ds_fail(e, -errno, "stat", c->src[i], NULL);
		c->total_bytes += (uint64_t)st.st_size;
	}
	c->slots = calloc(c->qd, sizeof(*c->slots));
	c->freel = calloc(c->qd, sizeof(*c->freel));
	c->cqes = calloc(c->qd, sizeof(*c->cqes));
	c->files = calloc(c->qd + 1, sizeof(*c->files));
	if (!c->slots || !c->freel || !c->cqes || !c->files)
		return __ds_fail(e, -ENOMEM, "copy", NULL, NULL);
	c->pool = __ds_buf_alloc(e, c->bs * c->qd);
	if (!c->pool)
		return __ds_fail(e, -ENOMEM, "copy", NULL, "cannot allocate %u blocks of %zu bytes", c->qd, c->bs);
	for (t = 0; t < c->qd; t++) {
		c->slots[t].buf = c->pool + (size_t)t * c->bs;
		c->freel[c->nfree++] = c->qd - 1 - t;
	}
	ret = __ds_backend_open(e, &c->b, c->qd);
	if (ret)
		return ret;
	{
		struct iovec *iov = calloc(c->qd, sizeof(*iov));

		if (iov) {
			for (t = 0; t < c->qd; t++) {
				iov[t].iov_base = c->slots[t].buf;
				iov[t].iov_len = c->bs;
			}
			__ds_backend_register(&c->b, iov, c->qd); /* best effort */
			free(iov);
		}
	}
	c->last_ms = __ds_now_ms();
	for (;;) {
		ret = fill(c);
		if (ret)
			return ret;
		if (!c->b.inflight && !c->b.queued)
			break;
		n = __ds_backend_reap(&c->b, c->cqes, c->qd, 1);
		if (n < 0)
			return __ds_fail(e, n, "wait", NULL, "%s completion", ds_io_backend_name(c->b.kind));
		for (k = 0; k < n; k++) {
			struct slot *s = &c->slots[c->cqes[k].tag];

			ret = s->writing ? on_write(c, c->cqes[k].tag, c->cqes[k].res)
					 : on_read(c, c->cqes[k].tag, c->cqes[k].res);
			if (ret)
				return ret;
			/* requeue freed blocks before hashing the next completion: the device never idles on us */
			if (c->nfree) {
				ret = fill(c);
				if (!ret)
					ret = __ds_backend_submit(&c->b);
				if (ret)
					return ret < 0 && !c->e->err.msg[0]
						? __ds_fail(e, ret, "submit", NULL, "%s", ds_io_backend_name(c->b.kind)) : ret;
			}
		}
		ret = report(c, 0);
		if (ret)
			return ret;
	}
	if (c->next_file < c->n || c->nfiles)
		return __ds_fail(e, -EIO, "copy", NULL, "internal error: queue ran dry with work left");
	if (!c->hash_only && e->cfg.fsync) {
		ret = fsync_dirs(c);
		if (ret)
			return ret;
	}
	return report(c, 1);
}

static void cleanup(struct copy *c, int failed)
{
	unsigned k;

	if (c->b.kind) {
		__ds_backend_drain(&c->b);
		__ds_backend_close(&c->b);
	}
	for (k = 0; c->files && k <= c->qd; k++) {
		struct afile *a = &c->files[k];

		if (!a->used)
			continue;
		__ds_close(c->e, a->sfd);
		__ds_close(c->e, a->dfd);
		if (failed && a->created)
			unlink(c->dst[a->idx]);
		__ds_hash_free(c->e, a->h);
	}
	__ds_buf_free(c->e, c->pool);
	free(c->slots);
	free(c->freel);
	free(c->cqes);
	free(c->files);
}

static int copy_or_hash(struct ds_io_engine *e, size_t n, const char *const *src,
			const char *const *dst, struct ds_io_file_result *res, int hash_only,
			ds_io_progress_fn progress, void *arg)
{
	struct copy c = {       /* every member not named here starts zero */
		.e = e, .n = n, .src = src, .dst = dst, .res = res,
		.hash_only = hash_only, .checksum = e->cfg.checksum || hash_only, .direct = e->cfg.direct,
		.bs = e->cfg.block_size, .qd = e->cfg.queue_depth, .cur = -1,
		.progress = progress, .progress_arg = arg,
	};
	int ret;

	__ds_err_clear(&e->err);
	memset(res, 0, n * sizeof(*res));
	ret = run(&c);
	cleanup(&c, ret != 0);
	return ret;
}

int ds_io_copy_files(struct ds_io_engine *e, size_t n, const char *const *src,
		     const char *const *dst, struct ds_io_file_result *res,
		     ds_io_progress_fn progress, void *progress_arg)
{
	return copy_or_hash(e, n, src, dst, res, 0, progress, progress_arg);
}

int ds_io_hash_file(struct ds_io_engine *e, const char *path, struct ds_io_file_result *res)
{
	const char *src[1] = { path };

	return copy_or_hash(e, 1, src, NULL, res, 1, NULL, NULL);
}
