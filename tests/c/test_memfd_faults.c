/* Bad input: segment beyond EOF, missing file, checksum mismatch, bad config, hugetlb without pages; nothing leaks. */
#include "test_memfd_helpers.h"

int main(void)
{
	const size_t size = 5u << 20;
	char dir[256], path[300], missing[300];
	struct ds_memfd_result res[2];
	struct ds_memfd_config bad = { .chunk_size = 12345 };
	struct ds_memfd_ctx *c;
	unsigned char *data;
	int ret;

	if (!t_tmpdir(dir, sizeof(dir), "mfault"))
		return T_FAIL;
	snprintf(path, sizeof(path), "%s/image", dir);
	snprintf(missing, sizeof(missing), "%s/nope", dir);
	data = t_random(size, 5);
	CHECK(t_write_file(path, data, size) == 0, "write");
	CHECK(ds_memfd_ctx_create(&c, &bad) == -EINVAL && !c, "bad chunk size");
	c = t_ctx(3, DS_MEMFD_POPULATE);
	CHECK(c, "ctx");
	{
		/* the first segment is fine, the second runs past the end: nothing is handed out */
		struct ds_memfd_segment segs[2] = { { .path = path, .length = 4096 },
						    { .path = path, .offset = 4096, .length = size } };

		ret = ds_memfd_restore(c, 2, segs, res);
		CHECK(ret == -EINVAL, "beyond EOF: %d", ret);
		CHECK(strstr(ds_err_msg(ds_memfd_ctx_err(c)), "beyond the end of the file") &&
		      strstr(ds_err_msg(ds_memfd_ctx_err(c)), path), "message: %s", ds_err_msg(ds_memfd_ctx_err(c)));
		CHECK(res[0].fd == -1 && res[1].fd == -1, "no fds");
		CHECK(t_memfd_balanced(c), "counters");
	}
	ds_memfd_ctx_destroy(c);
	c = t_ctx(2, 0);
	{
		struct ds_memfd_segment segs[1] = { { .path = missing, .length = 1 } };

		CHECK(ds_memfd_restore(c, 1, segs, res) == -ENOENT, "missing file");
		const struct ds_err *er = ds_memfd_ctx_err(c);

		CHECK(strstr(ds_err_msg(er), "open") && strstr(ds_err_msg(er), missing), "msg %s", ds_err_msg(er));
		CHECK(!strcmp(ds_err_op(er), "open") && !strcmp(ds_err_path(er), missing), "op %s path %s",
		      ds_err_op(er), ds_err_path(er));
		CHECK(t_memfd_balanced(c), "counters");
	}
	ds_memfd_ctx_destroy(c);
	c = t_ctx(2, DS_MEMFD_SEAL);
	{
		struct ds_memfd_segment segs[2] = {
			{ .path = path, .length = size, .check = 1 },
			{ .path = path, .length = size, .check = 1 },
		};

		segs[0].expect = ds_memfd_digest(data, size);
		data[size / 2] ^= 1;   /* the manifest was made from other content */
		segs[1].expect = ds_memfd_digest(data, size);
		ret = ds_memfd_restore(c, 2, segs, res);
		CHECK(ret == -EBADMSG, "mismatch: %d", ret);
		CHECK(strstr(ds_err_msg(ds_memfd_ctx_err(c)), "checksum mismatch"), "msg %s", ds_err_msg(ds_memfd_ctx_err(c)));
		CHECK(res[0].fd == -1 && res[1].fd == -1, "no region handed out");
		CHECK(t_memfd_balanced(c), "counters");
	}
	ds_memfd_ctx_destroy(c);
	c = t_ctx(2, DS_MEMFD_HUGETLB);
	{
		struct ds_memfd_segment segs[1] = { { .path = path, .length = size } };

		ret = ds_memfd_restore(c, 1, segs, res);
		if (ret == 0) {          /* huge pages configured on this machine */
			CHECK(res[0].hugetlb && res[0].map_size >= size, "hugetlb result");
			ds_memfd_close(c, res[0].fd);
		} else {
			CHECK(ret == -ENOMEM || ret == -EINVAL || ret == -ENOSYS, "hugetlb: %d %s", ret,
			      ds_err_msg(ds_memfd_ctx_err(c)));
			CHECK(ds_err_msg(ds_memfd_ctx_err(c))[0], "a message");
			CHECK(res[0].fd == -1, "no fd");
		}
		CHECK(t_memfd_balanced(c), "counters");
	}
	ds_memfd_ctx_destroy(c);
	free(data);
	t_rmrf(dir);
	return T_PASS;
}
