/* err.h: the first-failure error record shared by the I/O engine and the memfd context (its layout is private;
 * dynsnap/err.h declares the accessors). */
#ifndef DYNSNAP_PRIVATE_ERR_H
#define DYNSNAP_PRIVATE_ERR_H

#include <stdarg.h>

#include "dynsnap/err.h"

struct ds_err {
	char op[32];            /* the failing operation, e.g. "pwrite" */
	char path[4096];        /* the file it concerned, or "" */
	char msg[512 + 4096];   /* "op path: detail - strerror" */
};

/* Record -err for op/path with an optional printf detail, unless a failure is already recorded (the first
 * failure is the cause; later ones are its consequences). Returns err. Not locked: callers serialise. */
int __ds_err_vset(struct ds_err *r, int err, const char *op, const char *path, const char *fmt, va_list ap);
/* Forget the recorded failure (a new operation starts). */
void __ds_err_clear(struct ds_err *r);

#endif
