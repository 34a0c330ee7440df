"""``dynsnap demo`` (``run``) and the workers it and the benchmarks start (``worker``, ``llm_worker``)."""
