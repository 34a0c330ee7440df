"""Private compiled modules of dynsnap_core (_io: the C I/O engine, _cudaprobe: CUDA driver probe)."""
