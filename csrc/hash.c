/* XXH3-64 streaming state, header-only xxhash (no runtime library needed). */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "engine.h"

struct __ds_hash {
	XXH3_state_t st;
};

struct __ds_hash *__ds_hash_new(struct ds_io_engine *e)
{
	struct __ds_hash *h = __ds_buf_alloc(e, sizeof(*h)); /* 4096-aligned covers XXH's 64 */

	if (h)
		XXH3_64bits_reset(&h->st);
	return h;
}

void __ds_hash_free(struct ds_io_engine *e, struct __ds_hash *h)
{
	__ds_buf_free(e, h);
}

void __ds_hash_update(struct __ds_hash *h, const void *p, size_t n)
{
	XXH3_64bits_update(&h->st, p, n);
}

uint64_t __ds_hash_digest(struct __ds_hash *h)
{
	return XXH3_64bits_digest(&h->st);
}
