/* read_into and write_buffers round trip with every backend, aligned and unaligned buffers. */
#include "helpers.h"

int main(void)
{
	static const size_t sizes[] = { 0, 1, 4095, 4096, 4097, (1u << 20) + 3 };
	char dir[256], path[300];
	struct ds_io_file_result res;
	struct ds_io_engine *e;
	size_t i, n;
	uint64_t got;
	int b, ret;

	if (!t_tmpdir(dir, sizeof(dir), "bufs"))
		return T_FAIL;
	snprintf(path, sizeof(path), "%s/f", dir);
	for (b = DS_IO_URING; b <= DS_IO_PSYNC; b++) {
		struct ds_io_config cfg = { .backend = b, .direct = 1, .checksum = 1, .fsync = 1,
					    .block_size = 65536, .queue_depth = 8 };

		if (ds_io_backend_probe(b))
			continue;
		CHECK(ds_io_engine_create(&e, &cfg) == 0, "create");
		for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			size_t sz = sizes[i];
			unsigned char *data = t_random(sz, (unsigned)i), *back, *al = NULL;
			struct iovec iov[3] = {
				{ data, sz / 3 }, { data + sz / 3, 0 }, { data + sz / 3, sz - sz / 3 } };

			ret = ds_io_write_buffers(e, path, 3, iov, &res);
			CHECK(ret == 0, "write_buffers: %s", ds_err_msg(ds_io_engine_err(e)));
			CHECK(res.size == sz && res.xxh3 == XXH3_64bits(data, sz), "result");
			back = t_read_file(path, &n);
			CHECK(n == sz && (!sz || !memcmp(back, data, sz)), "written content");
			free(back);
			/* unaligned destination (page cache) and aligned one (O_DIRECT head + tail) */
			back = malloc(sz + 1);
			ret = ds_io_read_into(e, path, back + 1, sz, &got);
			CHECK(ret == 0 && got == sz, "read_into: %s", ds_err_msg(ds_io_engine_err(e)));
			CHECK(!sz || !memcmp(back + 1, data, sz), "read_into content");
			CHECK(posix_memalign((void **)&al, 4096, sz + 4096) == 0, "alloc");
			ret = ds_io_read_into(e, path, al, sz, &got);
			CHECK(ret == 0 && got == sz, "aligned read_into: %s", ds_err_msg(ds_io_engine_err(e)));
			CHECK(!sz || !memcmp(al, data, sz), "aligned read_into content");
			if (sz) {
				ret = ds_io_read_into(e, path, al, sz - 1, &got);
				CHECK(ret == -EOVERFLOW, "too small a buffer: %d", ret);
			}
			free(al);
			free(back);
			free(data);
		}
		/* O_DIRECT writes: page-aligned caller memory (zero copy) next to unaligned pieces (staged) */
		{
			size_t sz = 5 * 65536 + 4097, cut1 = 65536 + 3, cut2 = 3 * 65536;
			unsigned char *data = t_random(sz, 99), *al = NULL, *back;
			struct iovec iov[3];

			CHECK(posix_memalign((void **)&al, 4096, sz) == 0, "alloc");
			memcpy(al, data, sz);
			iov[0] = (struct iovec){ al, 8192 };			/* aligned, at offset 0 */
			iov[1] = (struct iovec){ data + 8192, cut1 - 8192 };	/* unaligned: staged */
			iov[2] = (struct iovec){ al + cut1, sz - cut1 };	/* aligned memory, odd offset */
			ret = ds_io_write_buffers(e, path, 3, iov, &res);
			CHECK(ret == 0, "direct write_buffers: %s", ds_err_msg(ds_io_engine_err(e)));
			CHECK(res.size == sz && res.xxh3 == XXH3_64bits(data, sz), "direct result");
			back = t_read_file(path, &n);
			CHECK(n == sz && !memcmp(back, data, sz), "direct content");
			free(back);
			iov[0] = (struct iovec){ al, cut2 };			/* aligned, whole blocks */
			iov[1] = (struct iovec){ al + cut2, sz - cut2 };	/* aligned, odd tail */
			ret = ds_io_write_buffers(e, path, 2, iov, &res);
			CHECK(ret == 0 && res.size == sz && res.xxh3 == XXH3_64bits(data, sz),
			      "aligned write_buffers: %s", ds_err_msg(ds_io_engine_err(e)));
			back = t_read_file(path, &n);
			CHECK(n == sz && !memcmp(back, data, sz), "aligned content");
			free(back);
			free(al);
			free(data);
		}
		ret = ds_io_read_into(e, "/nonexistent/x", NULL, 0, &got);
		CHECK(ret == -ENOENT && strstr(ds_err_msg(ds_io_engine_err(e)), "/nonexistent/x"), "missing file");
		CHECK(!strcmp(ds_err_op(ds_io_engine_err(e)), "open") &&
		      !strcmp(ds_err_path(ds_io_engine_err(e)), "/nonexistent/x"), "op %s path %s",
		      ds_err_op(ds_io_engine_err(e)), ds_err_path(ds_io_engine_err(e)));
		CHECK(t_counters_balanced(e), "counters");
		ds_io_engine_destroy(e);
	}
	t_rmrf(dir);
	return T_PASS;
}
