/* A source that shrinks while it is copied or hashed: -EIO "file truncated while reading", no partial file. */
#include "helpers.h"

struct shrink {
	const char *path;
	int calls;
};

/* Called after every completed block (progress_ms = 0): cut the source after the first one. */
static int cut(void *arg, uint64_t done, uint64_t total)
{
	struct shrink *s = arg;

	(void)done;
	(void)total;
	if (s->calls++ == 0 && truncate(s->path, 8192))
		return 1;
	return 0;
}

int main(void)
{
	char dir[256], src[300], dst[300];
	const char *sp[1] = { src }, *dp[1] = { dst };
	struct ds_io_file_result res;
	struct ds_io_engine *e;
	unsigned char *data;
	int b, d, ret;

	if (!t_tmpdir(dir, sizeof(dir), "trunc"))
		return T_FAIL;
	snprintf(src, sizeof(src), "%s/src", dir);
	snprintf(dst, sizeof(dst), "%s/dst", dir);
	data = t_random(8u << 20, 3);
	for (b = DS_IO_URING; b <= DS_IO_PSYNC; b++) {
		if (ds_io_backend_probe(b))
			continue;
		for (d = 0; d <= 1; d++) {
			struct ds_io_config cfg = { .backend = b, .direct = d, .checksum = 1, .fsync = 1,
						    .block_size = 65536, .queue_depth = 4 };
			struct shrink s = { src, 0 };

			CHECK(t_write_file(src, data, 8u << 20) == 0, "write");
			CHECK(ds_io_engine_create(&e, &cfg) == 0, "create");
			ret = ds_io_copy_files(e, 1, sp, dp, &res, cut, &s);
			CHECK(ret == -EIO, "%s direct %d: ret %d (%s)", ds_io_backend_name(b), d, ret,
			      ds_err_msg(ds_io_engine_err(e)));
			CHECK(strstr(ds_err_msg(ds_io_engine_err(e)), "truncated while reading"), "message: %s",
			      ds_err_msg(ds_io_engine_err(e)));
			CHECK(strstr(ds_err_msg(ds_io_engine_err(e)), src), "message names the source");
			CHECK(access(dst, F_OK) != 0, "partial destination removed");
			CHECK(t_counters_balanced(e), "counters");
			ds_io_engine_destroy(e);
		}
	}
	free(data);
	t_rmrf(dir);
	return T_PASS;
}
