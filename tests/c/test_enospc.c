/* ENOSPC on a small tmpfs: -ENOSPC naming the file and no partial destination (root only, else skip). */
#include <sys/mount.h>

#include "helpers.h"

int main(void)
{
	char dir[256], src[300], dst[300], mnt[300];
	struct ds_io_file_result res, w;
	struct ds_io_engine *e;
	unsigned char *data;
	const char *sp[1] = { src }, *dp[1] = { dst };
	struct iovec iov;
	int b, ret, failed = 0;

	if (geteuid() != 0) {
		fprintf(stderr, "skip: needs root to mount a tmpfs\n");
		return T_SKIP;
	}
	if (!t_tmpdir(dir, sizeof(dir), "enospc"))
		return T_FAIL;
	snprintf(src, sizeof(src), "%s/src", dir);
	snprintf(mnt, sizeof(mnt), "%s/mnt", dir);
	snprintf(dst, sizeof(dst), "%s/mnt/dst", dir);
	if (mkdir(mnt, 0755) || mount("tmpfs", mnt, "tmpfs", 0, "size=1m")) {
		fprintf(stderr, "skip: cannot mount tmpfs: %s\n", strerror(errno));
		t_rmrf(dir);
		return T_SKIP;
	}
	data = t_random(3u << 20, 1);
	if (t_write_file(src, data, 3u << 20))
		failed = 1;
	for (b = DS_IO_URING; b <= DS_IO_PSYNC && !failed; b++) {
		struct ds_io_config cfg = { .backend = b, .direct = 1, .checksum = 1, .fsync = 1 };

		if (ds_io_backend_probe(b))
			continue;
		if (ds_io_engine_create(&e, &cfg))
			return T_FAIL;
		ret = ds_io_copy_files(e, 1, sp, dp, &res, NULL, NULL);
		if (ret != -ENOSPC || !strstr(ds_err_msg(ds_io_engine_err(e)), dst) || access(dst, F_OK) == 0) {
			fprintf(stderr, "copy %s: ret %d msg '%s' exists %d\n", ds_io_backend_name(b), ret,
				ds_err_msg(ds_io_engine_err(e)), access(dst, F_OK) == 0);
			failed = 1;
		}
		iov.iov_base = data;
		iov.iov_len = 3u << 20;
		ret = ds_io_write_buffers(e, dst, 1, &iov, &w);
		if (ret != -ENOSPC || !strstr(ds_err_msg(ds_io_engine_err(e)), dst) || access(dst, F_OK) == 0) {
			fprintf(stderr, "write_buffers %s: ret %d msg '%s'\n", ds_io_backend_name(b), ret,
				ds_err_msg(ds_io_engine_err(e)));
			failed = 1;
		}
		if (!t_counters_balanced(e))
			failed = 1;
		ds_io_engine_destroy(e);
	}
	free(data);
	umount2(mnt, MNT_DETACH);
	t_rmrf(dir);
	return failed ? T_FAIL : T_PASS;
}
