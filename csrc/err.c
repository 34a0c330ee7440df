/* err.c: formats the first-failure error record (operation, path, detail, strerror) kept by each context. */
#include "err.h"

#include <stdio.h>
#include <string.h>

int __ds_err_vset(struct ds_err *r, int err, const char *op, const char *path, const char *fmt, va_list ap)
{
	char buf[256], detail[256];
	const char *text;

	if (r->msg[0])
		return err;
	text = strerror_r(-err, buf, sizeof(buf));
	detail[0] = 0;
	if (fmt)
		vsnprintf(detail, sizeof(detail), fmt, ap);
	snprintf(r->op, sizeof(r->op), "%s", op);
	snprintf(r->path, sizeof(r->path), "%s", path ? path : "");
	snprintf(r->msg, sizeof(r->msg), "%s%s%s: %s%s%s", op, path ? " " : "", path ? path : "",
		 detail[0] ? detail : text, detail[0] ? " - " : "", detail[0] ? text : "");
	return err;
}

void __ds_err_clear(struct ds_err *r)
{
	r->msg[0] = r->op[0] = r->path[0] = 0;
}

const char *ds_err_msg(const struct ds_err *r) { return r->msg; }
const char *ds_err_op(const struct ds_err *r) { return r->op; }
const char *ds_err_path(const struct ds_err *r) { return r->path; }
