# The debug counter totals both bindings keep: each engine or context adds its counters when it is freed.


cdef inline void add_counts(dict totals, dict counts):
    """Add counts (a C counters struct, which Cython hands over as {field: value}) to the module's totals."""
    for name in totals:
        totals[name] += counts[name]
