/* fd.c: counted open/close (O_CLOEXEC, EINTR handling) for the contexts' resource counters. */
#include "fd.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

int __ds_fd_open(const char *path, int flags, int mode, uint64_t *opened)
{
	int fd;

	do
		fd = open(path, flags | O_CLOEXEC, mode);
	while (fd < 0 && errno == EINTR);
	if (fd < 0)
		return -errno;
	(*opened)++;
	return fd;
}

int __ds_fd_close(int fd, uint64_t *closed)
{
	if (fd < 0)
		return 0;
	(*closed)++;
	if (close(fd) < 0 && errno != EINTR)
		return -errno;
	return 0;
}
