/* digest.c: the region digest (chunked XXH3-64, see dynsnap/digest.h), header-only xxhash inlined here only. */
#include "dynsnap/digest.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

struct ds_digest_stream {
	XXH3_state_t st;
};

size_t ds_digest_nchunks(uint64_t len)
{
	return (size_t)((len + DS_DIGEST_CHUNK - 1) / DS_DIGEST_CHUNK);
}

uint64_t ds_digest_chunk(const void *p, size_t n)
{
	return XXH3_64bits(p, n);
}

/* The seeded reset reads the old seed: start from a zeroed state. */
static void __ds_digest_seed(XXH3_state_t *st, uint64_t len)
{
	memset(st, 0, sizeof(*st));
	XXH3_64bits_reset_withSeed(st, len);
}

static void __ds_digest_fold(XXH3_state_t *st, uint64_t h)
{
	unsigned char le[8];
	int b;

	for (b = 0; b < 8; b++)
		le[b] = (unsigned char)(h >> (8 * b));
	XXH3_64bits_update(st, le, sizeof(le));
}

uint64_t ds_digest_combine(const uint64_t *hashes, size_t nchunks, uint64_t len)
{
	XXH3_state_t st;
	size_t i;

	__ds_digest_seed(&st, len);
	for (i = 0; i < nchunks; i++)
		__ds_digest_fold(&st, hashes[i]);
	return XXH3_64bits_digest(&st);
}

uint64_t ds_digest_region(const void *p, size_t len)
{
	XXH3_state_t st;
	size_t off, n;

	__ds_digest_seed(&st, len);
	for (off = 0; off < len; off += n) {
		n = len - off < DS_DIGEST_CHUNK ? len - off : DS_DIGEST_CHUNK;
		__ds_digest_fold(&st, ds_digest_chunk((const char *)p + off, n));
	}
	return XXH3_64bits_digest(&st);
}

int ds_digest_stream_create(struct ds_digest_stream **out)
{
	/* XXH3_state_t wants 64-byte alignment; aligned_alloc needs a multiple of it as the size. */
	size_t sz = (sizeof(struct ds_digest_stream) + 63) / 64 * 64;
	struct ds_digest_stream *s = aligned_alloc(64, sz);

	*out = NULL;
	if (!s)
		return -ENOMEM;
	memset(s, 0, sz);
	XXH3_64bits_reset(&s->st);
	*out = s;
	return 0;
}

void ds_digest_stream_destroy(struct ds_digest_stream *s)
{
	free(s);
}

void ds_digest_stream_reset(struct ds_digest_stream *s)
{
	XXH3_64bits_reset(&s->st);
}

void ds_digest_stream_update(struct ds_digest_stream *s, const void *p, size_t n)
{
	XXH3_64bits_update(&s->st, p, n);
}

uint64_t ds_digest_stream_final(struct ds_digest_stream *s)
{
	return XXH3_64bits_digest(&s->st);
}
