/* Dump memfds to files in parallel (digests, O_DIRECT, fsync), restore them back; an existing file is refused. */
#include "test_memfd_helpers.h"

int main(void)
{
	const size_t sizes[3] = { (17u << 20) + 100, 4096, 0 };
	char dir[256], paths[3][300];
	const char *pp[3] = { paths[0], paths[1], paths[2] };
	struct ds_memfd_result res[3], back[3];
	struct ds_memfd_segment segs[3];
	unsigned char *data[3];
	uint64_t sz[3];
	int fds[3];
	struct ds_memfd_ctx *c;
	size_t i, n;

	if (!t_tmpdir(dir, sizeof(dir), "mdump"))
		return T_FAIL;
	c = t_ctx(4, DS_MEMFD_DIRECT | DS_MEMFD_FSYNC);
	CHECK(c, "ctx");
	for (i = 0; i < 3; i++) {
		void *m = NULL;

		snprintf(paths[i], sizeof(paths[i]), "%s/region%zu", dir, i);
		data[i] = t_random(sizes[i], (unsigned)i + 1);
		sz[i] = sizes[i];
		CHECK(ds_memfd_create(c, "src", sizes[i], &fds[i], NULL) == 0, "create");
		if (sizes[i]) {
			m = mmap(NULL, sizes[i], PROT_READ | PROT_WRITE, MAP_SHARED, fds[i], 0);
			CHECK(m != MAP_FAILED, "map");
			memcpy(m, data[i], sizes[i]);
			munmap(m, sizes[i]);
		}
	}
	CHECK(ds_memfd_dump(c, 3, fds, sz, pp, res) == 0, "dump: %s", ds_err_msg(ds_memfd_ctx_err(c)));
	for (i = 0; i < 3; i++) {
		unsigned char *got = t_read_file(paths[i], &n);

		CHECK(got && n == sizes[i] && !memcmp(got, data[i], n), "file %zu", i);
		CHECK(res[i].digest == ds_memfd_digest(data[i], sizes[i]), "digest %zu", i);
		free(got);
		segs[i] = (struct ds_memfd_segment){ .path = paths[i], .length = sizes[i], .expect = res[i].digest,
						     .check = 1 };
	}
	CHECK(ds_memfd_restore(c, 3, segs, back) == 0, "restore: %s", ds_err_msg(ds_memfd_ctx_err(c)));
	for (i = 0; i < 3; i++) {
		CHECK(t_memfd_equals(back[i].fd, data[i], sizes[i]), "round trip %zu", i);
		ds_memfd_close(c, back[i].fd);
	}
	/* dumping onto existing files: EEXIST, and the files that were there stay */
	CHECK(ds_memfd_dump(c, 3, fds, sz, pp, res) == -EEXIST, "exists");
	CHECK(strstr(ds_err_msg(ds_memfd_ctx_err(c)), paths[0]), "msg %s", ds_err_msg(ds_memfd_ctx_err(c)));
	CHECK(access(paths[0], F_OK) == 0, "the existing file is kept");
	for (i = 0; i < 3; i++) {
		ds_memfd_close(c, fds[i]);
		free(data[i]);
	}
	CHECK(t_memfd_balanced(c), "counters");
	ds_memfd_ctx_destroy(c);
	t_rmrf(dir);
	return T_PASS;
}
