/* fd.h: counted open/close shared by the I/O engine and the memfd context (private). */
#ifndef DYNSNAP_FD_H
#define DYNSNAP_FD_H

#include <stdint.h>

/* open(2) with O_CLOEXEC added, retried on EINTR; on success counts it in *opened. Returns the fd or -errno. */
int __ds_fd_open(const char *path, int flags, int mode, uint64_t *opened);
/* close(2) of fd if >= 0, counted in *closed; never retried (Linux releases the fd even on EINTR).
 * Returns 0, or -errno of a failed close other than EINTR. */
int __ds_fd_close(int fd, uint64_t *closed);

#endif
