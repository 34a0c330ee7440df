/* Fixed-address attach: reserve, attach a memfd, detach to PROT_NONE (no memfd left mapped), re-attach at the same address. */
#include <setjmp.h>
#include <signal.h>

#include "test_memfd_helpers.h"

static int maps_mention(const char *needle)
{
	char line[1024];
	FILE *f = fopen("/proc/self/maps", "r");
	int found = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strstr(line, needle))
			found = 1;
	fclose(f);
	return found;
}

int main(void)
{
	const size_t size = 6u << 20;
	struct ds_memfd_ctx *c = t_ctx(2, 0);
	unsigned char *data = t_random(size, 9), *p;
	void *addr = NULL, *m;
	uint64_t before;
	int fd;

	CHECK(c, "ctx");
	CHECK(ds_memfd_create(c, "dynsnap-attach-test", size, &fd, NULL) == 0, "create");
	CHECK(ds_memfd_reserve(size, &addr) == 0 && addr, "reserve");
	CHECK(ds_memfd_attach(fd, addr, size, 1) == 0, "attach");
	p = addr;
	memcpy(p, data, size);
	before = ds_memfd_digest(p, size);
	CHECK(maps_mention("dynsnap-attach-test") == 1, "mapped");
	CHECK(ds_memfd_detach(addr, size) == 0, "detach");
	CHECK(maps_mention("dynsnap-attach-test") == 0, "no memfd mapping after detach");
	/* the range is still ours: a hint-less mmap does not land inside it */
	m = mmap(addr, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	CHECK(m == MAP_FAILED && errno == EEXIST, "still reserved");
	CHECK(ds_memfd_attach(fd, addr, size, 0) == 0, "re-attach read-only");
	CHECK(ds_memfd_digest(p, size) == before && !memcmp(p, data, size), "same content at the same address");
	CHECK(ds_memfd_attach(fd, (char *)addr + 1, 4096, 0) == -EINVAL, "unaligned");
	CHECK(ds_memfd_release(addr, size) == 0, "release");
	ds_memfd_close(c, fd);
	CHECK(t_memfd_balanced(c), "counters");
	ds_memfd_ctx_destroy(c);
	free(data);
	return T_PASS;
}
