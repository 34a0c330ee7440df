/* dynsnap region digest: the one definition of the chunked XXH3-64 digest of snapshot regions and weight shards. */
#ifndef DYNSNAP_DIGEST_H
#define DYNSNAP_DIGEST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * The region digest of len bytes: XXH3-64, seeded with len, over the little-endian XXH3-64 of each
 * DS_DIGEST_CHUNK-byte chunk (the last one shorter; none when len is 0). Chunks hash independently,
 * so threads compute them in any order while they fill, dump or copy; ds_digest_combine folds them.
 * Fixed by the snapshot and weights formats: changing it invalidates every stored digest.
 */
#define DS_DIGEST_CHUNK (8u << 20)

/* Number of chunk hashes of a len-byte region. */
size_t ds_digest_nchunks(uint64_t len);
/* XXH3-64 of one chunk (n <= DS_DIGEST_CHUNK; the caller cuts the region). */
uint64_t ds_digest_chunk(const void *p, size_t n);
/* The region digest from its nchunks chunk hashes, in order, and the region's length. */
uint64_t ds_digest_combine(const uint64_t *hashes, size_t nchunks, uint64_t len);
/* The region digest of a buffer, single-threaded (the reference). */
uint64_t ds_digest_region(const void *p, size_t len);

/*
 * One chunk's hash fed in pieces (equal to ds_digest_chunk over their concatenation): for callers that
 * hash each piece while it is still in cache. create/destroy pair; reset before each chunk.
 */
struct ds_digest_stream;
int ds_digest_stream_create(struct ds_digest_stream **out);  /* 0 or -ENOMEM */
void ds_digest_stream_destroy(struct ds_digest_stream *s);   /* NULL is a no-op */
void ds_digest_stream_reset(struct ds_digest_stream *s);
void ds_digest_stream_update(struct ds_digest_stream *s, const void *p, size_t n);
uint64_t ds_digest_stream_final(struct ds_digest_stream *s);

#ifdef __cplusplus
}
#endif
#endif /* DYNSNAP_DIGEST_H */
