# Cython declarations mirroring csrc/include/dynsnap/err.h (all nogil), and the one reading of a record that
# both bindings turn into their exceptions.

cdef extern from "dynsnap/err.h" nogil:
    struct ds_err:
        pass

    const char *ds_err_msg(const ds_err *r)
    const char *ds_err_op(const ds_err *r)
    const char *ds_err_path(const ds_err *r)


cdef inline tuple err_fields(const ds_err *r, str default_op):
    """(operation, else default_op; path, else None; message, else "") of a C error record."""
    import os
    return (ds_err_op(r).decode() or default_op, os.fsdecode(ds_err_path(r)) or None,
            ds_err_msg(r).decode(errors="replace"))
