/* `auto` picks the first backend that initialises and reports it; probing leaves nothing open. */
#include "helpers.h"

int main(void)
{
	struct ds_io_config cfg = { .backend = DS_IO_AUTO, .checksum = 1 };
	struct ds_io_file_result res;
	struct ds_io_engine *e;
	int want = DS_IO_PSYNC, b;

	for (b = DS_IO_PSYNC; b >= DS_IO_URING; b--)
		if (!ds_io_backend_probe(b))
			want = b;
	CHECK(ds_io_engine_create(&e, &cfg) == 0, "create");
	CHECK(ds_io_engine_backend(e) == DS_IO_AUTO, "no backend before an operation");
	CHECK(ds_io_hash_file(e, "/proc/self/exe", &res) == 0, "hash: %s", ds_err_msg(ds_io_engine_err(e)));
	CHECK(ds_io_engine_backend(e) == want, "auto chose %s, expected %s",
	      ds_io_backend_name(ds_io_engine_backend(e)), ds_io_backend_name(want));
	CHECK(t_counters_balanced(e), "counters");
	ds_io_engine_destroy(e);
	cfg.block_size = 1000;
	CHECK(ds_io_engine_create(&e, &cfg) == -EINVAL, "unaligned block size refused");
	printf("auto backend: %s\n", ds_io_backend_name(want));
	return T_PASS;
}
