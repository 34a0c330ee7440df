/* Copy and hash round trip: sizes around block and page boundaries, every backend, direct and buffered. */
#include "helpers.h"

static const size_t sizes[] = { 0, 1, 4095, 4096, 4097, (1u << 20) + 3, 3u * (1u << 20) + 4097 };
#define NS (sizeof(sizes) / sizeof(sizes[0]))

static int one(const char *dir, int backend, int direct, size_t bs, unsigned qd)
{
	struct ds_io_config cfg = { .backend = backend, .direct = direct, .checksum = 1, .fsync = 1,
				    .block_size = bs, .queue_depth = qd };
	struct ds_io_file_result res[NS], h;
	char src[NS][256], dst[NS][256];
	const char *sp[NS], *dp[NS];
	unsigned char *data[NS], *back;
	struct ds_io_engine *e;
	size_t i, n;
	int ret;

	CHECK(ds_io_engine_create(&e, &cfg) == 0, "create");
	for (i = 0; i < NS; i++) {
		snprintf(src[i], 256, "%s/src-%zu", dir, i);
		snprintf(dst[i], 256, "%s/dst-%d-%d-%zu-%u-%zu", dir, backend, direct, bs, qd, i);
		data[i] = t_random(sizes[i], (unsigned)(i + 7));
		CHECK(t_write_file(src[i], data[i], sizes[i]) == 0, "write %s", src[i]);
		sp[i] = src[i];
		dp[i] = dst[i];
	}
	ret = ds_io_copy_files(e, NS, sp, dp, res, NULL, NULL);
	CHECK(ret == 0, "copy (%s): %s", ds_io_backend_name(backend), ds_err_msg(ds_io_engine_err(e)));
	CHECK(ds_io_engine_backend(e) == backend, "backend %d", ds_io_engine_backend(e));
	for (i = 0; i < NS; i++) {
		back = t_read_file(dst[i], &n);
		CHECK(back && n == sizes[i], "size of %s: %zu != %zu", dst[i], n, sizes[i]);
		CHECK(!sizes[i] || !memcmp(back, data[i], n), "content of %s", dst[i]);
		CHECK(res[i].size == sizes[i], "result size");
		CHECK(res[i].xxh3 == XXH3_64bits(data[i], sizes[i]), "xxh3 of %s", dst[i]);
		CHECK(ds_io_hash_file(e, dst[i], &h) == 0, "hash: %s", ds_err_msg(ds_io_engine_err(e)));
		CHECK(h.size == sizes[i] && h.xxh3 == res[i].xxh3, "hash_file of %s", dst[i]);
		free(back);
		free(data[i]);
		unlink(dst[i]);
		unlink(src[i]);
	}
	/* destination exists: EEXIST naming the file, existing file untouched */
	CHECK(t_write_file(src[0], "x", 1) == 0, "write");
	CHECK(t_write_file(dst[0], "keep", 4) == 0, "write");
	ret = ds_io_copy_files(e, 1, sp, dp, res, NULL, NULL);
	CHECK(ret == -EEXIST, "dst exists: %d", ret);
	CHECK(strstr(ds_err_msg(ds_io_engine_err(e)), dst[0]), "message names the file: %s", ds_err_msg(ds_io_engine_err(e)));
	back = t_read_file(dst[0], &n);
	CHECK(back && n == 4, "existing file kept");
	free(back);
	unlink(dst[0]);
	/* missing source */
	unlink(src[0]);
	ret = ds_io_copy_files(e, 1, sp, dp, res, NULL, NULL);
	CHECK(ret == -ENOENT, "missing source: %d", ret);
	CHECK(access(dst[0], F_OK) != 0, "no destination for a missing source");
	CHECK(t_counters_balanced(e), "counters");
	ds_io_engine_destroy(e);
	return T_PASS;
}

int main(void)
{
	char dir[256];
	int b, d, ran = 0;

	if (!t_tmpdir(dir, sizeof(dir), "copy"))
		return T_FAIL;
	for (b = DS_IO_URING; b <= DS_IO_PSYNC; b++) {
		if (ds_io_backend_probe(b)) {
			fprintf(stderr, "skip backend %s: cannot initialise\n", ds_io_backend_name(b));
			continue;
		}
		for (d = 0; d <= 1; d++) {
			/* 0, 0: the default 64 MiB pool and (1 MiB, 2): exactly 2 MiB, both huge-page aligned */
			if (one(dir, b, d, 0, 0) || one(dir, b, d, 4096, 3) || one(dir, b, d, 65536, 1) ||
			    one(dir, b, d, 1u << 20, 2)) {
				fprintf(stderr, "FAIL backend %s direct %d\n", ds_io_backend_name(b), d);
				t_rmrf(dir);
				return T_FAIL;
			}
			ran++;
		}
	}
	t_rmrf(dir);
	printf("copy round trip: %d backend/direct combinations passed\n", ran);
	return ran ? T_PASS : T_SKIP;
}
