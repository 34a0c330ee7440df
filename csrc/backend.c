/* The three request backends behind one small interface: io_uring (liburing), Linux AIO (libaio), psync. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"

/* ---------------------------------------------------------------- io_uring */

static int uring_open(struct __ds_backend *b)
{
	/* single issuer + deferred task work: completions are processed when we wait, in this thread */
	int ret = io_uring_queue_init(b->depth, &b->ring,
				      IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);

	if (ret == -EINVAL)
		ret = io_uring_queue_init(b->depth, &b->ring, 0);
	return ret;
}

static int uring_prep(struct __ds_backend *b, int op, int fd, void *buf, size_t len,
		      uint64_t off, unsigned tag)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);

	if (!sqe)
		return -EBUSY;	/* cannot happen: at most depth requests are outstanding */
	if (b->fixed && op == __DS_OP_READ)
		io_uring_prep_read_fixed(sqe, fd, buf, (unsigned)len, off, (int)tag);
	else if (b->fixed)
		io_uring_prep_write_fixed(sqe, fd, buf, (unsigned)len, off, (int)tag);
	else if (op == __DS_OP_READ)
		io_uring_prep_read(sqe, fd, buf, (unsigned)len, off);
	else
		io_uring_prep_write(sqe, fd, buf, (unsigned)len, off);
	io_uring_sqe_set_data64(sqe, tag);
	return 0;
}

static int uring_submit(struct __ds_backend *b)
{
	int ret;

	while (b->queued) {
		ret = io_uring_submit(&b->ring);
		if (ret == -EINTR || ret == -EAGAIN)
			continue;
		if (ret < 0)
			return ret;
		b->inflight += (unsigned)ret;
		b->queued -= (unsigned)ret < b->queued ? (unsigned)ret : b->queued;
	}
	return 0;
}

static int uring_reap(struct __ds_backend *b, struct __ds_cqe *out, unsigned max, unsigned min)
{
	struct io_uring_cqe *cqes[64], *cqe;
	unsigned got = 0, n, i;
	int ret;

	while (got < max) {
		n = io_uring_peek_batch_cqe(&b->ring, cqes, max - got < 64 ? max - got : 64);
		if (!n) {
			if (got >= min)
				break;
			ret = io_uring_wait_cqe(&b->ring, &cqe);
			if (ret == -EINTR || ret == -EAGAIN || ret == -ETIME)
				continue;
			if (ret < 0)
				return ret;
			continue;
		}
		for (i = 0; i < n; i++) {
			out[got].tag = (unsigned)io_uring_cqe_get_data64(cqes[i]);
			out[got].res = cqes[i]->res;
			got++;
		}
		io_uring_cq_advance(&b->ring, n);
	}
	b->inflight -= got;
	return (int)got;
}

/* ---------------------------------------------------------------- Linux AIO */

static int aio_open(struct __ds_backend *b)
{
	int ret;

	b->iocbs = calloc(b->depth, sizeof(*b->iocbs));
	b->iocbp = calloc(b->depth, sizeof(*b->iocbp));
	b->events = calloc(b->depth, sizeof(*b->events));
	if (!b->iocbs || !b->iocbp || !b->events)
		return -ENOMEM;
	memset(&b->aio, 0, sizeof(b->aio));
	ret = io_setup((int)b->depth, &b->aio);
	return ret < 0 ? ret : 0;
}

static int aio_prep(struct __ds_backend *b, int op, int fd, void *buf, size_t len,
		    uint64_t off, unsigned tag)
{
	struct iocb *cb = &b->iocbs[tag];

	if (op == __DS_OP_READ)
		io_prep_pread(cb, fd, buf, len, (long long)off);
	else
		io_prep_pwrite(cb, fd, buf, len, (long long)off);
	cb->data = (void *)(uintptr_t)tag;
	b->iocbp[b->queued] = cb;
	return 0;
}

static int aio_submit(struct __ds_backend *b)
{
	unsigned done = 0;
	int ret;

	while (done < b->queued) {
		ret = io_submit(b->aio, (long)(b->queued - done), b->iocbp + done);
		if (ret == -EINTR)
			continue;
		if (ret < 0) {
			/* keep the unsubmitted ones at the front so a drain does not wait for them */
			memmove(b->iocbp, b->iocbp + done, (b->queued - done) * sizeof(*b->iocbp));
			b->queued -= done;
			b->inflight += done;
			return ret;
		}
		done += (unsigned)ret;
	}
	b->inflight += done;
	b->queued = 0;
	return 0;
}

static int aio_reap(struct __ds_backend *b, struct __ds_cqe *out, unsigned max, unsigned min)
{
	int ret, i;

	if (max > b->depth)
		max = b->depth;
	do
		ret = io_getevents(b->aio, (long)min, (long)max, b->events, NULL);
	while (ret == -EINTR);
	if (ret < 0)
		return ret;
	for (i = 0; i < ret; i++) {
		out[i].tag = (unsigned)(uintptr_t)b->events[i].data;
		/* res is unsigned long: a negative errno comes back as a huge value */
		out[i].res = (long long)(long)b->events[i].res;
	}
	b->inflight -= (unsigned)ret;
	return ret;
}

/* ---------------------------------------------------------------- psync */

static int psync_prep(struct __ds_backend *b, int op, int fd, void *buf, size_t len,
		      uint64_t off, unsigned tag)
{
	ssize_t r;

	do
		r = op == __DS_OP_READ ? pread(fd, buf, len, (off_t)off) : pwrite(fd, buf, len, (off_t)off);
	while (r < 0 && errno == EINTR);
	b->done[b->ndone].tag = tag;
	b->done[b->ndone].res = r < 0 ? -errno : r;
	b->ndone++;
	return 0;
}

static int psync_reap(struct __ds_backend *b, struct __ds_cqe *out, unsigned max, unsigned min)
{
	unsigned n = b->ndone < max ? b->ndone : max;

	(void)min;
	memcpy(out, b->done, n * sizeof(*out));
	memmove(b->done, b->done + n, (b->ndone - n) * sizeof(*out));
	b->ndone -= n;
	b->inflight -= n;
	return (int)n;
}

/* ---------------------------------------------------------------- common */

static void backend_free(struct __ds_backend *b)
{
	free(b->iocbs);
	free(b->iocbp);
	free(b->events);
	free(b->done);
	b->iocbs = NULL;
	b->iocbp = NULL;
	b->events = NULL;
	b->done = NULL;
}

static int backend_try(struct __ds_backend *b, int kind)
{
	int ret;

	b->kind = kind;
	switch (kind) {
	case DS_IO_URING:
		ret = uring_open(b);
		break;
	case DS_IO_AIO:
		ret = aio_open(b);
		break;
	default:
		b->done = calloc(b->depth, sizeof(*b->done));
		ret = b->done ? 0 : -ENOMEM;
		break;
	}
	if (ret) {
		backend_free(b);
		return ret;
	}
	if (kind != DS_IO_PSYNC)
		b->e->cnt.rings_created++;
	return 0;
}

int __ds_backend_open(struct ds_io_engine *e, struct __ds_backend *b, unsigned depth)
{
	int want = e->cfg.backend, ret, k;

	memset(b, 0, sizeof(*b));
	b->e = e;
	b->depth = depth ? depth : 1;
	if (want != DS_IO_AUTO) {
		ret = backend_try(b, want);
		if (ret)
			return __ds_fail(e, ret, "init", NULL, "cannot initialise the %s backend",
					 ds_io_backend_name(want));
	} else {
		for (k = DS_IO_URING; k <= DS_IO_PSYNC; k++)
			if (!backend_try(b, k))
				break;
	}
	e->backend_used = b->kind;
	return 0;
}

void __ds_backend_close(struct __ds_backend *b)
{
	if (b->fixed) {
		io_uring_unregister_buffers(&b->ring);
		b->e->cnt.registered_freed++;
		b->fixed = 0;
	}
	if (b->kind == DS_IO_URING) {
		io_uring_queue_exit(&b->ring);
		b->e->cnt.rings_freed++;
	} else if (b->kind == DS_IO_AIO) {
		io_destroy(b->aio);
		b->e->cnt.rings_freed++;
	}
	backend_free(b);
	b->kind = DS_IO_AUTO;
}

int __ds_backend_register(struct __ds_backend *b, const struct iovec *iov, unsigned n)
{
	int ret;

	if (b->kind != DS_IO_URING || b->e->cfg.no_fixed_buffers)
		return -EOPNOTSUPP;
	ret = io_uring_register_buffers(&b->ring, iov, n);
	if (ret)
		return ret;
	b->fixed = 1;
	b->e->cnt.registered_created++;
	return 0;
}

int __ds_backend_prep(struct __ds_backend *b, int op, int fd, void *buf, size_t len,
		      uint64_t off, unsigned tag)
{
	int ret;

	__DS_CHECK_KBUF(buf, len);
	switch (b->kind) {
	case DS_IO_URING:
		ret = uring_prep(b, op, fd, buf, len, off, tag);
		break;
	case DS_IO_AIO:
		ret = aio_prep(b, op, fd, buf, len, off, tag);
		break;
	default:
		ret = psync_prep(b, op, fd, buf, len, off, tag);
		b->inflight++;
		return ret;
	}
	if (!ret)
		b->queued++;
	return ret;
}

int __ds_backend_submit(struct __ds_backend *b)
{
	if (b->kind == DS_IO_URING)
		return uring_submit(b);
	if (b->kind == DS_IO_AIO)
		return aio_submit(b);
	return 0;
}

int __ds_backend_reap(struct __ds_backend *b, struct __ds_cqe *out, unsigned max, unsigned min)
{
	int ret = __ds_backend_submit(b);

	if (ret)
		return ret;
	if (min > b->inflight)
		min = b->inflight;
	if (b->kind == DS_IO_URING)
		return uring_reap(b, out, max, min);
	if (b->kind == DS_IO_AIO)
		return aio_reap(b, out, max, min);
	return psync_reap(b, out, max, min);
}

void __ds_backend_drain(struct __ds_backend *b)
{
	struct __ds_cqe tmp[64];

	if (__ds_backend_submit(b) < 0)
		b->queued = 0; /* never submitted: nothing to wait for */
	while (b->inflight) {
		if (__ds_backend_reap(b, tmp, 64, 1) < 0)
			break;
	}
}
