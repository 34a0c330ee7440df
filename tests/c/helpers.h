/* Shared helpers of the C feature tests: temp dirs, random files, comparisons, backend loop. */
#ifndef DS_TEST_HELPERS_H
#define DS_TEST_HELPERS_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "dynsnap/io.h"

#define T_PASS 0
#define T_FAIL 1
#define T_SKIP 77

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "%s:%d: check failed: %s: ", \
	__FILE__, __LINE__, #cond); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); return T_FAIL; } } while (0)

static inline unsigned char *t_random(size_t n, unsigned seed)
{
	unsigned char *p = malloc(n ? n : 1);
	size_t i;

	for (i = 0; i < n; i++) {
		seed = seed * 1103515245u + 12345u;
		p[i] = (unsigned char)(seed >> 16);
	}
	return p;
}

static inline int t_write_file(const char *path, const void *p, size_t n)
{
	FILE *f = fopen(path, "wb");

	if (!f)
		return -errno;
	if (n && fwrite(p, 1, n, f) != n) {
		fclose(f);
		return -EIO;
	}
	return fclose(f) ? -errno : 0;
}

/* Returns malloc'ed content, size in *n, NULL if missing. */
static inline unsigned char *t_read_file(const char *path, size_t *n)
{
	struct stat st;
	unsigned char *p;
	FILE *f;

	if (stat(path, &st))
		return NULL;
	f = fopen(path, "rb");
	if (!f)
		return NULL;
	p = malloc(st.st_size ? (size_t)st.st_size : 1);
	*n = fread(p, 1, (size_t)st.st_size, f);
	fclose(f);
	return p;
}

/* A fresh directory under the working directory (the build dir: a real disk file system). */
static inline char *t_tmpdir(char *buf, size_t n, const char *tag)
{
	snprintf(buf, n, "./tmp-%s-XXXXXX", tag);
	return mkdtemp(buf);
}

static inline void t_rmrf(const char *dir)
{
	char cmd[4200];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", dir);
}

static inline int t_counters_balanced(struct ds_io_engine *e)
{
	struct ds_io_counters c;

	ds_io_engine_counters(e, &c);
	if (c.rings_created != c.rings_freed || c.buffers_created != c.buffers_freed ||
	    c.registered_created != c.registered_freed || c.fds_opened != c.fds_closed) {
		fprintf(stderr, "unbalanced: rings %llu/%llu buffers %llu/%llu registered %llu/%llu fds %llu/%llu\n",
			(unsigned long long)c.rings_created, (unsigned long long)c.rings_freed,
			(unsigned long long)c.buffers_created, (unsigned long long)c.buffers_freed,
			(unsigned long long)c.registered_created, (unsigned long long)c.registered_freed,
			(unsigned long long)c.fds_opened, (unsigned long long)c.fds_closed);
		return 0;
	}
	return 1;
}

#endif
