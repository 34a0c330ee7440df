/* Shared helpers of the memfd feature tests: a context with given threads/flags, counter balance. */
#ifndef DS_TEST_MEMFD_HELPERS_H
#define DS_TEST_MEMFD_HELPERS_H

#include <sys/mman.h>

#include "dynsnap/memfd.h"
#include "helpers.h"

static inline struct ds_memfd_ctx *t_ctx(unsigned threads, unsigned flags)
{
	struct ds_memfd_config cfg = { .threads = threads, .flags = flags };
	struct ds_memfd_ctx *c = NULL;

	if (ds_memfd_ctx_create(&c, &cfg))
		return NULL;
	return c;
}

static inline int t_memfd_balanced(const struct ds_memfd_ctx *c)
{
	struct ds_memfd_counters k;

	ds_memfd_ctx_counters(c, &k);
	if (k.memfds_created != k.memfds_closed || k.maps_created != k.maps_freed ||
	    k.fds_opened != k.fds_closed || k.threads_started != k.threads_joined) {
		fprintf(stderr, "unbalanced: memfds %llu/%llu maps %llu/%llu fds %llu/%llu threads %llu/%llu\n",
			(unsigned long long)k.memfds_created, (unsigned long long)k.memfds_closed,
			(unsigned long long)k.maps_created, (unsigned long long)k.maps_freed,
			(unsigned long long)k.fds_opened, (unsigned long long)k.fds_closed,
			(unsigned long long)k.threads_started, (unsigned long long)k.threads_joined);
		return 0;
	}
	return 1;
}

/* 1 if the memfd's first n bytes equal p. */
static inline int t_memfd_equals(int fd, const unsigned char *p, size_t n)
{
	void *m;
	int same;

	if (!n)
		return 1;
	m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		return 0;
	same = memcmp(m, p, n) == 0;
	munmap(m, n);
	return same;
}

#endif
