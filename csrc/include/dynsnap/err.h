/* dynsnap error record: the first failure of an I/O engine or a memfd context (operation, path, message). */
#ifndef DYNSNAP_ERR_H
#define DYNSNAP_ERR_H

#ifdef __cplusplus
extern "C" {
#endif

/* Owned by its engine or context (ds_io_engine_err, ds_memfd_ctx_err); valid while that lives. */
struct ds_err;

/* Message of the first failure ("write /x/y: No space left on device"), "" if none. */
const char *ds_err_msg(const struct ds_err *r);
/* Operation ("open", "read", "write", "fsync", ...) of the first failure, "" if none. */
const char *ds_err_op(const struct ds_err *r);
/* Path the first failure concerned, "" if none or if it concerned no file. */
const char *ds_err_path(const struct ds_err *r);

#ifdef __cplusplus
}
#endif

#endif
