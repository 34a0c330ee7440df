/* Parallel fill: several segments of one file into memfds with 1..8 threads and every flag; content and digest exact. */
#include "test_memfd_helpers.h"

int main(void)
{
	static const unsigned flagsets[] = { 0, DS_MEMFD_POPULATE, DS_MEMFD_THP, DS_MEMFD_THP | DS_MEMFD_POPULATE,
					     DS_MEMFD_DIRECT, DS_MEMFD_SEAL | DS_MEMFD_DIRECT | DS_MEMFD_POPULATE };
	static const unsigned threads[] = { 1, 2, 3, 8 };
	const size_t size = (21u << 20) + 12345;   /* odd size: unaligned tails, a partial hash chunk */
	char dir[256], path[300];
	unsigned char *data;
	size_t f, t, i;

	if (!t_tmpdir(dir, sizeof(dir), "mfill"))
		return T_FAIL;
	snprintf(path, sizeof(path), "%s/image", dir);
	data = t_random(size, 11);
	CHECK(t_write_file(path, data, size) == 0, "write %s", path);
	/* the reference digest equals the parallel one over any thread count */
	for (f = 0; f < sizeof(flagsets) / sizeof(flagsets[0]); f++) {
		for (t = 0; t < sizeof(threads) / sizeof(threads[0]); t++) {
			struct ds_memfd_segment segs[4] = {
				{ .path = path, .offset = 0, .length = size, .name = "all" },
				{ .path = path, .offset = 4096, .length = 9u << 20, .name = "aligned" },
				{ .path = path, .offset = 777, .length = 3u << 20, .name = "unaligned" },
				{ .path = path, .offset = size, .length = 0, .name = "empty" },
			};
			struct ds_memfd_result res[4];
			struct ds_memfd_ctx *c = t_ctx(threads[t], flagsets[f]);

			CHECK(c, "ctx");
			for (i = 0; i < 4; i++) {
				segs[i].expect = ds_memfd_digest(data + segs[i].offset, segs[i].length);
				segs[i].check = 1;
			}
			CHECK(ds_memfd_restore(c, 4, segs, res) == 0, "flags %#x threads %u: %s", flagsets[f],
			      threads[t], ds_err_msg(ds_memfd_ctx_err(c)));
			for (i = 0; i < 4; i++) {
				struct stat st;

				CHECK(res[i].fd >= 0 && res[i].size == segs[i].length, "result %zu", i);
				CHECK(res[i].digest == segs[i].expect, "digest %zu", i);
				CHECK(t_memfd_equals(res[i].fd, data + segs[i].offset, segs[i].length), "content %zu", i);
				CHECK(fstat(res[i].fd, &st) == 0 && (uint64_t)st.st_size == res[i].map_size, "size");
				if (flagsets[f] & DS_MEMFD_SEAL) {
					int seals = fcntl(res[i].fd, F_GET_SEALS);

					CHECK(res[i].sealed && (seals & F_SEAL_WRITE) && (seals & F_SEAL_SHRINK), "sealed");
					CHECK(mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, res[i].fd, 0) ==
					      MAP_FAILED, "a sealed memfd refuses writable mappings");
				}
				CHECK(ds_memfd_close(c, res[i].fd) == 0, "close");
			}
			CHECK(t_memfd_balanced(c), "counters");
			ds_memfd_ctx_destroy(c);
		}
	}
	/* ds_memfd_hash and ds_memfd_copy agree with the reference */
	{
		struct ds_memfd_ctx *c = t_ctx(4, 0);
		unsigned char *copy = malloc(size);
		uint64_t h = 0;

		CHECK(c && copy, "alloc");
		CHECK(ds_memfd_hash(c, data, size, &h) == 0 && h == ds_memfd_digest(data, size), "hash");
		CHECK(ds_memfd_copy(c, copy, data, size) == 0 && !memcmp(copy, data, size), "copy");
		CHECK(ds_memfd_hash(c, data, 0, &h) == 0 && h == ds_memfd_digest(data, 0), "empty hash");
		CHECK(t_memfd_balanced(c), "counters");
		ds_memfd_ctx_destroy(c);
		free(copy);
	}
	free(data);
	t_rmrf(dir);
	return T_PASS;
}
