/* err.h: the first-failure error record shared by the I/O engine and the memfd context (private). */
#ifndef DYNSNAP_ERR_H
#define DYNSNAP_ERR_H

#include <stdarg.h>

struct __ds_err {
	char op[32];            /* the failing operation, e.g. "pwrite" */
	char path[4096];        /* the file it concerned, or "" */
	char msg[512 + 4096];   /* "op path: detail - strerror" */
};

/* Record -err for op/path with an optional printf detail, unless a failure is already recorded (the first
 * failure is the cause; later ones are its consequences). Returns err. Not locked: callers serialise. */
int __ds_err_vset(struct __ds_err *r, int err, const char *op, const char *path, const char *fmt, va_list ap);

#endif
