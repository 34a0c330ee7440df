/* The torch pool allocator of the GPU memory service (bindings/gms/gms_pool.c) under the sanitizers: bump
 * allocation, alignment, exhaustion, reuse once all is freed, one range at a time, bad ranges, threads. The
 * allocator only hands out addresses (never dereferenced), so a made-up range is enough. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../bindings/gms/gms_pool.c"

#define T_FAIL 1
#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "%s:%d: check failed: %s: ", \
	__FILE__, __LINE__, #cond); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); return T_FAIL; } } while (0)

#define BASE ((uint64_t)0x7f0000000000ull)
#define NTHREADS 8
#define PER 1000

static void *worker(void *arg)
{
	uintptr_t *out = arg;
	for (int i = 0; i < PER; i++)
		out[i] = (uintptr_t)gms_pool_alloc(300, 0, NULL);
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
	return x < y ? -1 : x > y;
}

int main(void)
{
	uint64_t b, s, u, l;
	static uintptr_t got[NTHREADS * PER];
	pthread_t th[NTHREADS];

	CHECK(gms_pool_set(0, 1 << 20, 0) == -EINVAL, "null base");
	CHECK(gms_pool_set(BASE + 1, 1 << 20, 0) == -EINVAL, "unaligned base");
	CHECK(gms_pool_set(BASE, 0, 0) == -EINVAL, "empty range");
	CHECK(gms_pool_alloc(16, 0, NULL) == NULL, "no range yet");
	CHECK(gms_pool_set(BASE, 1 << 20, 0) == 0, "set");
	void *a = gms_pool_alloc(1, 0, NULL), *c = gms_pool_alloc(1000, 0, NULL);
	CHECK((uint64_t)(uintptr_t)a == BASE && (uint64_t)(uintptr_t)c == BASE + 512, "%p %p", a, c);
	CHECK(gms_pool_alloc(1 << 20, 0, NULL) == NULL, "exhausted");
	CHECK(gms_pool_alloc(16, 1, NULL) == NULL, "other device");
	CHECK(gms_pool_alloc(SIZE_MAX, 0, NULL) == NULL, "overflow");
	CHECK(gms_pool_set(BASE + (1ull << 30), 1 << 20, 0) == -EBUSY, "busy");
	CHECK(gms_pool_clear() == -EBUSY, "clear busy");
	gms_pool_free(a, 1, 0, NULL);
	gms_pool_stats(&b, &s, &u, &l);
	CHECK(u == 1536 && l == 1, "used %llu live %llu", (unsigned long long)u, (unsigned long long)l);
	gms_pool_free(c, 1000, 0, NULL);
	gms_pool_stats(&b, &s, &u, &l);
	CHECK(b == BASE && s == 1 << 20 && u == 0 && l == 0, "reset after the last free");
	CHECK(gms_pool_set(BASE, (uint64_t)NTHREADS * PER * 512, 0) == 0, "set for threads");
	for (int i = 0; i < NTHREADS; i++)
		CHECK(pthread_create(&th[i], NULL, worker, got + i * PER) == 0, "pthread_create");
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(th[i], NULL);
	qsort(got, NTHREADS * PER, sizeof got[0], cmp);
	for (int i = 0; i < NTHREADS * PER; i++)
		CHECK(got[i] == BASE + (uint64_t)i * 512, "allocation %d at %#lx", i, (unsigned long)got[i]);
	for (int i = 0; i < NTHREADS * PER; i++)
		gms_pool_free((void *)got[i], 300, 0, NULL);
	CHECK(gms_pool_clear() == 0, "clear");
	printf("test_gms_pool: ok\n");
	return 0;
}
