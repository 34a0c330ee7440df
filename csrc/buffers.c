/* Whole-file reads into caller memory and ordered writes of caller buffers, blocks kept in flight. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"

struct req {
	char *buf;
	uint64_t off;
	size_t len, done;
};

struct xfer {
	struct ds_io_engine *e;
	struct __ds_backend b;
	const char *path;
	int op, fd, direct;
	struct req *reqs;
	unsigned *freel, nfree;
	struct __ds_cqe *cqes;
};

static int xfer_init(struct xfer *x, struct ds_io_engine *e, const char *path, int op)
{
	unsigned qd = e->cfg.queue_depth, t;

	memset(x, 0, sizeof(*x));
	x->e = e;
	x->path = path;
	x->op = op;
	x->fd = -1;
	__ds_err_clear(&e->err);
	x->reqs = calloc(qd, sizeof(*x->reqs));
	x->freel = calloc(qd, sizeof(*x->freel));
	x->cqes = calloc(qd, sizeof(*x->cqes));
	if (!x->reqs || !x->freel || !x->cqes)
		return __ds_fail(e, -ENOMEM, op == __DS_OP_READ ? "read" : "write", path, NULL);
	for (t = 0; t < qd; t++)
		x->freel[x->nfree++] = t;
	return 0;
}

static void xfer_fini(struct xfer *x)
{
	if (x->b.kind) {
		__ds_backend_drain(&x->b);
		__ds_backend_close(&x->b);
	}
	free(x->reqs);
	free(x->freel);
	free(x->cqes);
}

static int xfer_submit(struct xfer *x, unsigned t)
{
	struct req *r = &x->reqs[t];

	return __ds_backend_prep(&x->b, x->op, x->fd, r->buf + r->done, r->len - r->done,
				 r->off + r->done, t);
}

/* Reap at least one completion and handle short transfers. */
static int xfer_reap(struct xfer *x, unsigned min)
{
	const char *what = x->op == __DS_OP_READ ? "read" : "write";
	int n, k, ret;

	n = __ds_backend_reap(&x->b, x->cqes, x->e->cfg.queue_depth, min);
	if (n < 0)
		return __ds_fail(x->e, n, "wait", x->path, NULL);
	for (k = 0; k < n; k++) {
		unsigned t = x->cqes[k].tag;
		long long res = x->cqes[k].res;
		struct req *r = &x->reqs[t];

		if (res == -EAGAIN || res == -EINTR)
			res = 0;
		else if (res < 0)
			return __ds_fail(x->e, (int)res, what, x->path, NULL);
		else if (res == 0 && x->op == __DS_OP_READ)
			return __ds_fail(x->e, -EIO, what, x->path,
					 "file truncated while reading (EOF at %llu)",
					 (unsigned long long)(r->off + r->done));
		else if (res == 0)
			return __ds_fail(x->e, -ENOSPC, what, x->path, "wrote nothing");
		r->done += (size_t)res;
		if (r->done < r->len && x->direct && r->done % DS_IO_ALIGN)
			return __ds_fail(x->e, x->op == __DS_OP_READ ? -EIO : -ENOSPC, what, x->path,
					 "short O_DIRECT transfer at %llu", (unsigned long long)(r->off + r->done));
		if (r->done < r->len) {
			ret = xfer_submit(x, t);
			if (ret)
				return __ds_fail(x->e, ret, what, x->path, "cannot queue");
		} else {
			x->freel[x->nfree++] = t;
		}
	}
	return 0;
}

/* A free request tag, reaping completions until one is free; -errno on failure. */
static int xfer_take(struct xfer *x)
{
	int ret;

	while (!x->nfree) {
		ret = xfer_reap(x, 1);
		if (ret)
			return ret;
	}
	return (int)x->freel[--x->nfree];
}

static int xfer_start(struct xfer *x, unsigned t, char *buf, size_t len, uint64_t off)
{
	int ret;

	x->reqs[t].buf = buf;
	x->reqs[t].off = off;
	x->reqs[t].len = len;
	x->reqs[t].done = 0;
	ret = xfer_submit(x, t);
	if (ret)
		return __ds_fail(x->e, ret, x->op == __DS_OP_READ ? "read" : "write", x->path, "cannot queue");
	/* io_uring/AIO: hand it to the kernel now, so the device never waits for our hashing or copying */
	ret = __ds_backend_submit(&x->b);
	if (ret)
		return __ds_fail(x->e, ret, x->op == __DS_OP_READ ? "read" : "write", x->path, "submit");
	return 0;
}

static int xfer_push(struct xfer *x, char *buf, size_t len, uint64_t off)
{
	int t = xfer_take(x);

	if (t < 0)
		return t;
	return xfer_start(x, (unsigned)t, buf, len, off);
}

static int xfer_wait_all(struct xfer *x)
{
	int ret;

	while (x->b.inflight || x->b.queued) {
		ret = xfer_reap(x, 1);
		if (ret)
			return ret;
	}
	return 0;
}

int ds_io_read_into(struct ds_io_engine *e, const char *path, void *buf, size_t len,
		    uint64_t *nread)
{
	struct xfer x;
	struct stat st;
	uint64_t size, off, head;
	int ret, direct = 0, tfd = -1;
	size_t bs = e->cfg.block_size;
	ssize_t r;

	*nread = 0;
	ret = xfer_init(&x, e, path, __DS_OP_READ);
	if (ret)
		goto out;
	ret = x.fd = __ds_open(e, path, O_RDONLY, 0);
	if (ret < 0) {
		ret = __ds_fail(e, ret, "open", path, NULL);
		goto out;
	}
	if (fstat(x.fd, &st) < 0) {
		ret = __ds_fail(e, -errno, "stat", path, NULL);
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		ret = __ds_fail(e, -EINVAL, "read", path, "not a regular file");
		goto out;
	}
	size = (uint64_t)st.st_size;
	if (size > len) {
		ret = __ds_fail(e, -EOVERFLOW, "read", path, "file of %llu bytes does not fit a buffer of %zu",
				(unsigned long long)size, len);
		goto out;
	}
	/* O_DIRECT for the aligned head when the buffer allows it; the tail goes through the page cache */
	head = size;
	if (e->cfg.direct && !((uintptr_t)buf % DS_IO_ALIGN) && size >= DS_IO_ALIGN)
		direct = __ds_set_direct(x.fd);
	if (direct)
		head = size / DS_IO_ALIGN * DS_IO_ALIGN;
	x.direct = direct;
	ret = __ds_backend_open(e, &x.b, e->cfg.queue_depth);
	if (ret)
		goto out;
	for (off = 0; off < head; off += bs) {
		ret = xfer_push(&x, (char *)buf + off, head - off < bs ? head - off : bs, off);
		if (ret)
			goto out;
	}
	ret = xfer_wait_all(&x);
	if (ret)
		goto out;
	if (head < size) {
		ret = tfd = __ds_open(e, path, O_RDONLY, 0);
		if (ret < 0) {
			ret = __ds_fail(e, ret, "open", path, NULL);
			goto out;
		}
		for (off = head; off < size; off += (uint64_t)r) {
			do
				r = pread(tfd, (char *)buf + off, size - off, (off_t)off);
			while (r < 0 && errno == EINTR);
			if (r < 0) {
				ret = __ds_fail(e, -errno, "read", path, NULL);
				goto out;
			}
			if (r == 0) {
				ret = __ds_fail(e, -EIO, "read", path, "file truncated while reading (EOF at %llu)",
						(unsigned long long)off);
				goto out;
			}
		}
	}
	*nread = size;
	ret = 0;
out:
	xfer_fini(&x);
	__ds_close(e, tfd);
	__ds_close(e, x.fd);
	return ret;
}

/*
 * O_DIRECT write of the stream bufs[0..n): pieces that are page-aligned in memory and in the file go
 * straight from the caller's memory; everything else is gathered into aligned staging blocks (one per
 * request tag). The last block is zero-padded to the alignment and the file truncated to size after.
 */
static int write_direct(struct xfer *x, size_t n, const struct iovec *bufs, struct __ds_hash *h,
			char *pool, uint64_t *size)
{
	size_t bs = x->e->cfg.block_size, i, p, fill = 0;
	uint64_t off = 0;	/* file offset of the first byte not yet handed to a request: aligned when t < 0 */
	int t = -1, ret;

	for (i = 0; i < n; i++) {
		for (p = 0; p < bufs[i].iov_len;) {
			char *src = (char *)bufs[i].iov_base + p;
			size_t left = bufs[i].iov_len - p, len;

			if (t < 0 && !((uintptr_t)src % DS_IO_ALIGN) && left >= DS_IO_ALIGN) {
				len = (left < bs ? left : bs) / DS_IO_ALIGN * DS_IO_ALIGN;
				__ds_hash_update(h, src, len);
				ret = xfer_push(x, src, len, off);
				if (ret)
					return ret;
				off += len;
				p += len;
				continue;
			}
			if (t < 0) {
				t = xfer_take(x);
				if (t < 0)
					return t;
				fill = 0;
			}
			len = left < bs - fill ? left : bs - fill;
			memcpy(pool + (size_t)t * bs + fill, src, len);
			__ds_hash_update(h, src, len);
			fill += len;
			p += len;
			if (fill == bs) {
				ret = xfer_start(x, (unsigned)t, pool + (size_t)t * bs, bs, off);
				if (ret)
					return ret;
				off += bs;
				t = -1;
			}
		}
	}
	if (t >= 0) {
		size_t padded = (fill + DS_IO_ALIGN - 1) / DS_IO_ALIGN * DS_IO_ALIGN;

		memset(pool + (size_t)t * bs + fill, 0, padded - fill);
		ret = xfer_start(x, (unsigned)t, pool + (size_t)t * bs, padded, off);
		if (ret)
			return ret;
		off += fill;
	}
	*size = off;
	return 0;
}

int ds_io_write_buffers(struct ds_io_engine *e, const char *path, size_t n,
			const struct iovec *bufs, struct ds_io_file_result *res)
{
	struct __ds_hash *h = NULL;
	struct xfer x;
	size_t bs = e->cfg.block_size, i, p;
	uint64_t off = 0, total = 0;
	char *pool = NULL;
	int ret, created = 0;

	memset(res, 0, sizeof(*res));
	ret = xfer_init(&x, e, path, __DS_OP_WRITE);
	if (ret)
		goto out;
	h = __ds_hash_new(e);
	if (!h) {
		ret = __ds_fail(e, -ENOMEM, "hash", path, NULL);
		goto out;
	}
	ret = x.fd = __ds_open(e, path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (ret < 0) {
		ret = __ds_fail(e, ret, "create", path, NULL);
		goto out;
	}
	created = 1;
	for (i = 0; i < n; i++)
		total += bufs[i].iov_len;
	/* O_DIRECT where the file system takes it: no page-cache copy, no writeback storm at fdatasync */
	if (e->cfg.direct && total >= DS_IO_ALIGN && __ds_set_direct(x.fd)) {
		pool = __ds_buf_alloc(e, bs * e->cfg.queue_depth);
		if (!pool) {
			ret = __ds_fail(e, -ENOMEM, "write", path, "cannot allocate %u staging blocks of %zu bytes",
					e->cfg.queue_depth, bs);
			goto out;
		}
		x.direct = 1;
		/* allocate up front: writes inside i_size are not extending, so io_uring issues them inline */
		ret = fallocate(x.fd, 0, 0, (off_t)((total + DS_IO_ALIGN - 1) / DS_IO_ALIGN * DS_IO_ALIGN));
		if (ret < 0 && errno == ENOSPC) {
			ret = __ds_fail(e, -ENOSPC, "write", path, "cannot allocate %llu bytes",
					(unsigned long long)total);
			goto out;
		}
	}
	ret = __ds_backend_open(e, &x.b, e->cfg.queue_depth);
	if (ret)
		goto out;
	if (x.direct) {
		ret = write_direct(&x, n, bufs, h, pool, &off);
		if (ret)
			goto out;
	} else {
		for (i = 0; i < n; i++) {
			for (p = 0; p < bufs[i].iov_len; p += bs) {
				size_t len = bufs[i].iov_len - p < bs ? bufs[i].iov_len - p : bs;
				char *b = (char *)bufs[i].iov_base + p;

				__ds_hash_update(h, b, len);
				ret = xfer_push(&x, b, len, off);
				if (ret)
					goto out;
				off += len;
			}
		}
	}
	ret = xfer_wait_all(&x);
	if (ret)
		goto out;
	if (x.direct && ftruncate(x.fd, (off_t)off) < 0) {
		ret = __ds_fail(e, -errno, "truncate", path, NULL);
		goto out;
	}
	if (e->cfg.fsync && fdatasync(x.fd) < 0) {
		ret = __ds_fail(e, -errno, "fsync", path, NULL);
		goto out;
	}
	if (e->cfg.fsync) {
		ret = __ds_fsync_parent(e, path);
		if (ret)
			goto out;
	}
	res->size = off;
	res->xxh3 = __ds_hash_digest(h);
	res->direct = x.direct;
	ret = 0;
out:
	xfer_fini(&x);
	if (x.fd >= 0) {
		int cret = __ds_close(e, x.fd);

		if (cret && !ret)
			ret = __ds_fail(e, cret, "close", path, NULL);
	}
	if (ret && created)
		unlink(path);
	__ds_hash_free(e, h);
	__ds_buf_free(e, pool);
	return ret;
}
