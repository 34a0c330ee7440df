/* The engine object: configuration, last error, resource counters and small syscall helpers. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "fd.h"

#define __DS_HUGE (2u << 20) /* x86-64 and arm64-4K transparent huge page */

int ds_io_engine_create(struct ds_io_engine **out, const struct ds_io_config *cfg)
{
	struct ds_io_engine *e;

	*out = NULL;
	if (cfg->backend < DS_IO_AUTO || cfg->backend > DS_IO_PSYNC)
		return -EINVAL;
	if (cfg->block_size && (cfg->block_size % DS_IO_ALIGN || cfg->block_size > (1u << 30)))
		return -EINVAL;
	if (cfg->queue_depth > 4096)
		return -EINVAL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->cfg = *cfg;
	if (!e->cfg.block_size)
		e->cfg.block_size = DS_IO_DEFAULT_BLOCK_SIZE;
	if (!e->cfg.queue_depth)
		e->cfg.queue_depth = DS_IO_DEFAULT_QUEUE_DEPTH;
	e->backend_used = cfg->backend;
	*out = e;
	return 0;
}

void ds_io_engine_destroy(struct ds_io_engine *e)
{
	free(e);
}

const struct ds_err *ds_io_engine_err(const struct ds_io_engine *e) { return &e->err; }
int ds_io_engine_backend(const struct ds_io_engine *e) { return e->backend_used; }

void ds_io_engine_counters(const struct ds_io_engine *e, struct ds_io_counters *out)
{
	*out = e->cnt;
}

const char *ds_io_backend_name(int backend)
{
	switch (backend) {
	case DS_IO_AUTO: return "auto";
	case DS_IO_URING: return "io_uring";
	case DS_IO_AIO: return "aio";
	case DS_IO_PSYNC: return "psync";
	}
	return "unknown";
}

int ds_io_backend_probe(int backend)
{
	struct ds_io_config cfg = { .backend = backend };
	struct ds_io_engine *e;
	struct __ds_backend b;
	int ret;

	ret = ds_io_engine_create(&e, &cfg);
	if (ret)
		return ret;
	ret = __ds_backend_open(e, &b, 4);
	if (!ret)
		__ds_backend_close(&b);
	ds_io_engine_destroy(e);
	return ret;
}

int __ds_fail(struct ds_io_engine *e, int err, const char *op, const char *path, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	__ds_err_vset(&e->err, err, op, path, fmt, ap);
	va_end(ap);
	return err;
}

void *__ds_buf_alloc(struct ds_io_engine *e, size_t len)
{
	size_t align = len >= __DS_HUGE ? __DS_HUGE : DS_IO_ALIGN;
	void *p = NULL;

	len = (len + DS_IO_ALIGN - 1) / DS_IO_ALIGN * DS_IO_ALIGN;
	if (posix_memalign(&p, align, len ? len : DS_IO_ALIGN))
		return NULL;
	/*
	 * Back pools of 2 MiB and more with transparent huge pages where the system allows it: an
	 * O_DIRECT block then spans a few physically contiguous segments and goes to the device as
	 * one request, not one per max_segments 4 KiB pages (254 on virtio-blk: ~1 MiB requests;
	 * RESULTS.md, CPU machine, run 3). Best effort: without THP the pool just stays in 4 KiB pages.
	 */
	if (align == __DS_HUGE)
		(void)madvise(p, len / __DS_HUGE * __DS_HUGE, MADV_HUGEPAGE);
	e->cnt.buffers_created++;
	return p;
}

void __ds_buf_free(struct ds_io_engine *e, void *p)
{
	if (!p)
		return;
	free(p);
	e->cnt.buffers_freed++;
}

int __ds_open(struct ds_io_engine *e, const char *path, int flags, int mode)
{
	return __ds_fd_open(path, flags, mode, &e->cnt.fds_opened);
}

int __ds_close(struct ds_io_engine *e, int fd)
{
	return __ds_fd_close(fd, &e->cnt.fds_closed);
}

int __ds_set_direct(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		return 0;
	if (fcntl(fd, F_SETFL, fl | O_DIRECT) < 0)
		return 0;
	return 1;
}

uint64_t __ds_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int __ds_fsync_parent(struct ds_io_engine *e, const char *path)
{
	char dir[4096];
	const char *slash = strrchr(path, '/');
	size_t len = slash ? (size_t)(slash - path) : 0;
	int fd, ret;

	if (len >= sizeof(dir))
		return __ds_fail(e, -ENAMETOOLONG, "fsync", path, NULL);
	if (!slash)
		strcpy(dir, ".");
	else if (!len)
		strcpy(dir, "/");
	else {
		memcpy(dir, path, len);
		dir[len] = 0;
	}
	fd = __ds_open(e, dir, O_RDONLY | O_DIRECTORY, 0);
	if (fd < 0)
		return __ds_fail(e, fd, "open", dir, NULL);
	ret = fsync(fd) < 0 ? -errno : 0;
	__ds_close(e, fd);
	if (ret)
		return __ds_fail(e, ret, "fsync", dir, NULL);
	return 0;
}
