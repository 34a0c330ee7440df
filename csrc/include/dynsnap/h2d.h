// dynsnap/h2d.h: the pinned multi-stream storage/host -> GPU copy engine (C++17); libcuda.so.1 is dlopen()ed.
//
// A load is a list of sources (files, or page-aligned host mappings such as memfds) and a list of jobs
// (source, offset, nbytes, device pointer). Sources are cut into chunks (a multiple of DS_DIGEST_CHUNK,
// so the region digest of dynsnap/digest.h is checked chunk by chunk); N worker threads each own a
// non-blocking CUDA stream and NBUF pinned buffers of a ring kept by the Device between loads.
//
// Errors: argument errors throw std::invalid_argument (std::out_of_range for a device the driver does not
// see) before anything is done; a failed driver call outside a load throws CudaError; a driver that cannot
// be loaded throws std::runtime_error("CUDA driver unavailable: ..."). Failures during a load never throw:
// they come back in LoadResult (the first failure wins).
//
// Global state: the driver's function table, loaded once per process on first use (dlopen of
// libcuda.so.1, thread-safe) and never unloaded; it holds no per-load or per-device state.
#ifndef DYNSNAP_H2D_H
#define DYNSNAP_H2D_H

#ifndef __cplusplus
#error "dynsnap/h2d.h is a C++ API"
#endif

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dynsnap/digest.h"

namespace ds::h2d {

using DevicePtr = unsigned long long;  // CUdeviceptr

// A failed CUDA driver call: "NAME in op: text (CUresult N)"; code is the CUresult.
struct CudaError : std::runtime_error {
    int code;
    CudaError(int rc, const std::string &op);
};

struct ProbeResult {
    bool ok = false;
    std::string error;        // why not ok; "" when ok
    int devices = 0;
    bool has_version = false;
    int driver_version = 0;   // when has_version
};
// Loads the driver (once) and counts devices; never throws.
ProbeResult probe() noexcept;

struct Source {
    std::string path;        // a file when non-empty
    uintptr_t addr = 0;      // otherwise a host mapping: page-aligned, map_size >= size bytes mapped
    uint64_t map_size = 0;
    uint64_t size = 0;       // bytes of the source (the digest's length)
    bool has_digest = false; // check the region digest of the whole source
    uint64_t digest = 0;
};

struct Job {
    size_t source;           // index into the sources
    uint64_t off, n;         // bytes [off, off + n) of the source
    DevicePtr dst;           // to device memory here
};

struct LoadOptions {
    size_t chunk = 0;        // bytes per work item, a positive multiple of DS_DIGEST_CHUNK
    int threads = 1;         // clamped to [1, 64] and to the number of chunks
    int nbuf = 2;            // pinned buffers per thread, clamped to [2, 16]
    int direct = 0;          // 0 buffered, 1 O_DIRECT, 2 auto (O_DIRECT unless the file is mostly cached)
    int host_mode = 0;       // host sources: 0 auto (register, else staged), 1 register, 2 staged
    bool copy = true;        // false: read (and hash) every source whole, copy nothing (storage limit)
};

struct LoadResult {
    bool ok = false;
    std::string kind;        // "" when ok, else cuda | io | truncated | checksum | oom
    std::string error;       // the first failure's message
    int code = 0;            // errno or CUresult of the first failure
    long source = -1;        // the source it concerned, or -1
    uint64_t bytes = 0;      // bytes of all jobs
    double seconds = 0;      // wall time of the copy
    std::vector<bool> direct;  // per source: read with O_DIRECT
    std::string host_mode;   // "" (no host source), "register" or "staged"
    size_t pinned_bytes = 0; // the ring's size after the load
};

// One CUDA device (its primary context retained) and its pinned ring. Loads on one Device are serialised.
class Device {
  public:
    explicit Device(int ordinal);
    ~Device();
    Device(const Device &) = delete;
    Device &operator=(const Device &) = delete;

    void close();            // frees the ring and releases the context; idempotent
    std::string name() const;
    std::pair<size_t, size_t> mem_info() const;  // (free, total) bytes
    DevicePtr alloc(size_t nbytes) const;
    void free(DevicePtr p) const;
    void htod(DevicePtr dst, const void *src, size_t n) const;
    void dtoh(void *dst, DevicePtr src, size_t n) const;
    size_t pinned_bytes() const;
    LoadResult load(const std::vector<Source> &sources, const std::vector<Job> &jobs, const LoadOptions &opt);

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace ds::h2d

#endif  // DYNSNAP_H2D_H
