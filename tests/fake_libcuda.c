/* A fake libcuda.so.1 for CPU tests of the _h2d pipeline: device memory is malloc'ed, async copies are
 * deferred until an event recorded after them (or the stream) is synchronised, so a pinned buffer
 * reused too early shows up as wrong data. FAKE_CUDA_FREE_BYTES caps cuMemGetInfo's free memory;
 * FAKE_CUDA_NO_REGISTER makes cuMemHostRegister fail (not supported). Counts live allocations. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
struct op { CUdeviceptr dst; const void *src; size_t n; };
struct CUstream_st { struct op *ops; size_t n, cap, done; };
struct CUevent_st { struct CUstream_st *s; size_t upto; };
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long live_host, live_dev, live_streams, live_events, live_registered;
static int ctx_dummy;

static void run_until(struct CUstream_st *s, size_t upto)
{
	for (; s->done < upto && s->done < s->n; s->done++)
		memcpy((void *)(uintptr_t)s->ops[s->done].dst, s->ops[s->done].src, s->ops[s->done].n);
}
CUresult cuInit(unsigned f) { (void)f; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int o) { if (o != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetName(char *b, int n, int d) { (void)d; strncpy(b, "Fake GPU", (size_t)n); return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { (void)d; *c = &ctx_dummy; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int d) { (void)d; return 0; }
CUresult cuCtxSetCurrent(void *c) { (void)c; return 0; }
CUresult cuMemGetInfo_v2(size_t *f, size_t *t)
{
	const char *e = getenv("FAKE_CUDA_FREE_BYTES");
	*t = (size_t)1 << 40;
	*f = e ? (size_t)strtoull(e, NULL, 10) : *t;
	return 0;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n)
{
	void *m = malloc(n);
	if (!m) return 2;
	memset(m, 0xAB, n);
	pthread_mutex_lock(&mu); live_dev++; pthread_mutex_unlock(&mu);
	*p = (CUdeviceptr)(uintptr_t)m;
	return 0;
}
CUresult cuMemFree_v2(CUdeviceptr p) { free((void *)(uintptr_t)p); pthread_mutex_lock(&mu); live_dev--; pthread_mutex_unlock(&mu); return 0; }
CUresult cuMemHostAlloc(void **p, size_t n, unsigned f)
{
	(void)f;
	if (posix_memalign(p, 4096, n)) return 2;
	pthread_mutex_lock(&mu); live_host++; pthread_mutex_unlock(&mu);
	return 0;
}
CUresult cuMemFreeHost(void *p) { free(p); pthread_mutex_lock(&mu); live_host--; pthread_mutex_unlock(&mu); return 0; }
CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned f)
{
	(void)p; (void)n; (void)f;
	if (getenv("FAKE_CUDA_NO_REGISTER")) return 801;
	pthread_mutex_lock(&mu); live_registered++; pthread_mutex_unlock(&mu);
	return 0;
}
CUresult cuMemHostUnregister(void *p) { (void)p; pthread_mutex_lock(&mu); live_registered--; pthread_mutex_unlock(&mu); return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *s, size_t n, struct CUstream_st *st)
{
	pthread_mutex_lock(&mu);
	if (st->n == st->cap) {
		st->cap = st->cap ? st->cap * 2 : 64;
		st->ops = realloc(st->ops, st->cap * sizeof(*st->ops));
	}
	st->ops[st->n++] = (struct op){d, s, n};
	pthread_mutex_unlock(&mu);
	return 0;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *s, size_t n) { memcpy((void *)(uintptr_t)d, s, n); return 0; }
CUresult cuMemcpyDtoH_v2(void *d, CUdeviceptr s, size_t n) { memcpy(d, (void *)(uintptr_t)s, n); return 0; }
CUresult cuStreamCreate(struct CUstream_st **s, unsigned f) { (void)f; *s = calloc(1, sizeof(**s)); pthread_mutex_lock(&mu); live_streams++; pthread_mutex_unlock(&mu); return 0; }
CUresult cuStreamDestroy_v2(struct CUstream_st *s) { free(s->ops); free(s); pthread_mutex_lock(&mu); live_streams--; pthread_mutex_unlock(&mu); return 0; }
CUresult cuStreamSynchronize(struct CUstream_st *s) { pthread_mutex_lock(&mu); run_until(s, s->n); pthread_mutex_unlock(&mu); return 0; }
CUresult cuEventCreate(struct CUevent_st **e, unsigned f) { (void)f; *e = calloc(1, sizeof(**e)); pthread_mutex_lock(&mu); live_events++; pthread_mutex_unlock(&mu); return 0; }
CUresult cuEventDestroy_v2(struct CUevent_st *e) { free(e); pthread_mutex_lock(&mu); live_events--; pthread_mutex_unlock(&mu); return 0; }
CUresult cuEventRecord(struct CUevent_st *e, struct CUstream_st *s) { pthread_mutex_lock(&mu); e->s = s; e->upto = s->n; pthread_mutex_unlock(&mu); return 0; }
CUresult cuEventSynchronize(struct CUevent_st *e) { pthread_mutex_lock(&mu); if (e->s) run_until(e->s, e->upto); pthread_mutex_unlock(&mu); return 0; }
CUresult cuGetErrorName(CUresult rc, const char **s) { *s = rc == 2 ? "CUDA_ERROR_OUT_OF_MEMORY" : rc == 801 ? "CUDA_ERROR_NOT_SUPPORTED" : "CUDA_ERROR_FAKE"; return 0; }
CUresult cuGetErrorString(CUresult rc, const char **s) { (void)rc; *s = "fake"; return 0; }
/* not CUDA: leak counters for the tests */
long fake_live(int which) { long v[] = {live_host, live_dev, live_streams, live_events, live_registered}; return v[which]; }
