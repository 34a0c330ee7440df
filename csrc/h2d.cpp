// h2d.cpp: the pinned multi-stream storage/host -> GPU copy engine (dynsnap/h2d.h); dlopen()s libcuda.so.1.
//
// Sources are cut into chunks (a multiple of DS_DIGEST_CHUNK, so the region digest can be checked chunk by
// chunk); N worker threads each own a non-blocking CUDA stream and NBUF pinned buffers (a ring, at least
// double-buffered). A worker preads a chunk (O_DIRECT when the file is not in the page cache) into its next
// buffer, issues cuMemcpyHtoDAsync for every job piece in the chunk, records the buffer's event, hashes the
// chunk while the DMA runs, and before reusing a buffer waits for its event. Buffered reads of a file with
// a digest are hashed in 512 KiB pieces as they are read instead. Host sources are either registered chunk
// by chunk (cuMemHostRegister, read-only) and copied directly, or staged through the pinned ring when
// registration is not supported. Every CUresult is checked; every resource is freed on every path.
//
// The one piece of global state is the driver's function table (driver() below): loaded once per process
// under std::call_once and never unloaded (other users of libcuda keep it mapped anyway).
#include "dynsnap/h2d.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dynsnap/digest.h"

namespace ds::h2d {

namespace {

constexpr size_t kHashChunk = DS_DIGEST_CHUNK;
constexpr size_t kAlign = 4096;

// ---- the slice of the CUDA driver API we use (types as in cuda.h, 64-bit CUdeviceptr) ----
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = DevicePtr;
using CUcontext = struct CUctx_st *;
using CUstream = struct CUstream_st *;
using CUevent = struct CUevent_st *;
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned CU_MEMHOSTALLOC_PORTABLE = 0x1;
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x1;
constexpr unsigned CU_MEMHOSTREGISTER_READ_ONLY = 0x8;

struct Driver {
    void *lib = nullptr;
    CUresult (*cuInit)(unsigned) = nullptr;
    CUresult (*cuDriverGetVersion)(int *) = nullptr;
    CUresult (*cuDeviceGetCount)(int *) = nullptr;
    CUresult (*cuDeviceGet)(CUdevice *, int) = nullptr;
    CUresult (*cuDeviceGetName)(char *, int, CUdevice) = nullptr;
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice) = nullptr;
    CUresult (*cuDevicePrimaryCtxRelease)(CUdevice) = nullptr;
    CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
    CUresult (*cuMemGetInfo)(size_t *, size_t *) = nullptr;
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = nullptr;
    CUresult (*cuMemFree)(CUdeviceptr) = nullptr;
    CUresult (*cuMemHostAlloc)(void **, size_t, unsigned) = nullptr;
    CUresult (*cuMemFreeHost)(void *) = nullptr;
    CUresult (*cuMemHostRegister)(void *, size_t, unsigned) = nullptr;
    CUresult (*cuMemHostUnregister)(void *) = nullptr;
    CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void *, size_t, CUstream) = nullptr;
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = nullptr;
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = nullptr;
    CUresult (*cuStreamCreate)(CUstream *, unsigned) = nullptr;
    CUresult (*cuStreamDestroy)(CUstream) = nullptr;
    CUresult (*cuStreamSynchronize)(CUstream) = nullptr;
    CUresult (*cuEventCreate)(CUevent *, unsigned) = nullptr;
    CUresult (*cuEventDestroy)(CUevent) = nullptr;
    CUresult (*cuEventRecord)(CUevent, CUstream) = nullptr;
    CUresult (*cuEventSynchronize)(CUevent) = nullptr;
    CUresult (*cuGetErrorName)(CUresult, const char **) = nullptr;
    CUresult (*cuGetErrorString)(CUresult, const char **) = nullptr;
    std::string error;  // why the driver is unusable; "" when it loaded
};

template <typename F>
bool sym(void *lib, F &fn, const char *name, std::string &missing)
{
    fn = reinterpret_cast<F>(dlsym(lib, name));
    if (!fn)
        missing += missing.empty() ? name : std::string(", ") + name;
    return fn != nullptr;
}

// Loaded once per process and never unloaded (other users of libcuda keep it mapped anyway).
Driver &driver()
{
    static Driver d;
    static std::once_flag once;
    std::call_once(once, [] {
        d.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!d.lib) {
            const char *e = dlerror();
            d.error = std::string("dlopen libcuda.so.1: ") + (e ? e : "unknown error");
            return;
        }
        std::string m;
        sym(d.lib, d.cuInit, "cuInit", m);
        sym(d.lib, d.cuDriverGetVersion, "cuDriverGetVersion", m);
        sym(d.lib, d.cuDeviceGetCount, "cuDeviceGetCount", m);
        sym(d.lib, d.cuDeviceGet, "cuDeviceGet", m);
        sym(d.lib, d.cuDeviceGetName, "cuDeviceGetName", m);
        sym(d.lib, d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", m);
        sym(d.lib, d.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", m);
        sym(d.lib, d.cuCtxSetCurrent, "cuCtxSetCurrent", m);
        sym(d.lib, d.cuMemGetInfo, "cuMemGetInfo_v2", m);
        sym(d.lib, d.cuMemAlloc, "cuMemAlloc_v2", m);
        sym(d.lib, d.cuMemFree, "cuMemFree_v2", m);
        sym(d.lib, d.cuMemHostAlloc, "cuMemHostAlloc", m);
        sym(d.lib, d.cuMemFreeHost, "cuMemFreeHost", m);
        sym(d.lib, d.cuMemHostRegister, "cuMemHostRegister_v2", m);
        sym(d.lib, d.cuMemHostUnregister, "cuMemHostUnregister", m);
        sym(d.lib, d.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", m);
        sym(d.lib, d.cuMemcpyHtoD, "cuMemcpyHtoD_v2", m);
        sym(d.lib, d.cuMemcpyDtoH, "cuMemcpyDtoH_v2", m);
        sym(d.lib, d.cuStreamCreate, "cuStreamCreate", m);
        sym(d.lib, d.cuStreamDestroy, "cuStreamDestroy_v2", m);
        sym(d.lib, d.cuStreamSynchronize, "cuStreamSynchronize", m);
        sym(d.lib, d.cuEventCreate, "cuEventCreate", m);
        sym(d.lib, d.cuEventDestroy, "cuEventDestroy_v2", m);
        sym(d.lib, d.cuEventRecord, "cuEventRecord", m);
        sym(d.lib, d.cuEventSynchronize, "cuEventSynchronize", m);
        sym(d.lib, d.cuGetErrorName, "cuGetErrorName", m);
        sym(d.lib, d.cuGetErrorString, "cuGetErrorString", m);
        if (!m.empty()) {
            d.error = "libcuda.so.1 lacks " + m;
            return;
        }
        CUresult rc = d.cuInit(0);
        if (rc != CUDA_SUCCESS) {
            const char *name = nullptr;
            if (d.cuGetErrorName(rc, &name) != CUDA_SUCCESS || !name)
                name = "unknown";
            d.error = std::string("cuInit failed: ") + name + " (" + std::to_string(rc) + ")";
        }
    });
    return d;
}

std::string cu_msg(CUresult rc, const std::string &op)
{
    Driver &d = driver();
    const char *name = nullptr, *text = nullptr;
    if (!d.cuGetErrorName || d.cuGetErrorName(rc, &name) != CUDA_SUCCESS || !name)
        name = "CUDA_ERROR_UNKNOWN";
    if (!d.cuGetErrorString || d.cuGetErrorString(rc, &text) != CUDA_SUCCESS || !text)
        text = "";
    return std::string(name) + " in " + op + (text[0] ? std::string(": ") + text : std::string()) +
           " (CUresult " + std::to_string(rc) + ")";
}

void check(CUresult rc, const char *op)
{
    if (rc != CUDA_SUCCESS)
        throw CudaError(rc, op);
}

Driver &ready_driver()
{
    Driver &d = driver();
    if (!d.error.empty())
        throw std::runtime_error("CUDA driver unavailable: " + d.error);
    return d;
}

struct Src : Source {     // a source while it loads
    int fd = -1;
    bool direct = false;
    std::vector<uint64_t> hashes;
};

struct Piece {            // a job inside its source
    uint64_t off, n;
    CUdeviceptr dst;
};

struct Item {
    size_t src;
    uint64_t off, len;
};

// First failure wins; later ones are dropped. kind: cuda | io | truncated | checksum | oom
struct Failure {
    std::mutex mu;
    std::atomic<bool> failed{false};
    std::string kind, message;
    int code = 0;
    long source = -1;
    void set(const std::string &k, const std::string &m, int c, long s)
    {
        std::lock_guard<std::mutex> g(mu);
        if (failed.load())
            return;
        kind = k;
        message = m;
        code = c;
        source = s;
        failed.store(true);
    }
};

// Resident fraction of a file in the page cache (mincore over a read-only mapping); -1 if unknown.
double resident_fraction(int fd, uint64_t size)
{
    if (size == 0)
        return 1.0;
    void *m = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return -1.0;
    size_t pages = (size + kAlign - 1) / kAlign;
    std::vector<unsigned char> vec(pages);
    double frac = -1.0;
    if (mincore(m, size, vec.data()) == 0) {
        size_t in = 0;
        for (unsigned char v : vec)
            in += v & 1;
        frac = double(in) / double(pages);
    }
    munmap(m, size);
    return frac;
}

}  // namespace

struct Device::Impl {
  public:
    explicit Impl(int ordinal) : ordinal_(ordinal)
    {
        Driver &d = ready_driver();
        int count = 0;
        check(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
        if (ordinal < 0 || ordinal >= count)
            throw std::out_of_range("no CUDA device " + std::to_string(ordinal) + " (the driver sees " +
                                    std::to_string(count) + ")");
        check(d.cuDeviceGet(&dev_, ordinal), "cuDeviceGet");
        check(d.cuDevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
        retained_ = true;
    }
    ~Impl() { close(); }

    void close()
    {
        if (!retained_)
            return;
        Driver &d = driver();
        if (d.cuCtxSetCurrent(ctx_) == CUDA_SUCCESS)
            free_ring();
        d.cuDevicePrimaryCtxRelease(dev_);
        retained_ = false;
    }

    void current() const
    {
        if (!retained_)
            throw std::runtime_error("device " + std::to_string(ordinal_) + " is closed");
        check(driver().cuCtxSetCurrent(ctx_), "cuCtxSetCurrent");
    }

    std::string name() const
    {
        char buf[256] = {0};
        check(driver().cuDeviceGetName(buf, sizeof(buf) - 1, dev_), "cuDeviceGetName");
        return buf;
    }

    std::pair<size_t, size_t> mem_info() const
    {
        current();
        size_t f = 0, t = 0;
        check(driver().cuMemGetInfo(&f, &t), "cuMemGetInfo");
        return {f, t};
    }

    CUdeviceptr alloc(size_t n) const
    {
        current();
        CUdeviceptr p = 0;
        check(driver().cuMemAlloc(&p, n ? n : 1), "cuMemAlloc");
        return p;
    }

    void free(CUdeviceptr p) const
    {
        current();
        check(driver().cuMemFree(p), "cuMemFree");
    }

    void htod(CUdeviceptr dst, const void *src, size_t n) const
    {
        current();
        check(driver().cuMemcpyHtoD(dst, src, n), "cuMemcpyHtoD");
    }

    void dtoh(void *dst, CUdeviceptr src, size_t n) const
    {
        current();
        check(driver().cuMemcpyDtoH(dst, src, n), "cuMemcpyDtoH");
    }

    size_t pinned_bytes() const { return ring_.size() * ring_chunk_; }

    LoadResult load(const std::vector<Source> &sources, const std::vector<Job> &jobs, const LoadOptions &opt)
    {
        if (opt.chunk == 0 || opt.chunk % kHashChunk)
            throw std::invalid_argument("chunk must be a positive multiple of 8 MiB");
        int threads = std::max(1, std::min(opt.threads, 64));
        int nbuf = std::max(2, std::min(opt.nbuf, 16));
        std::vector<Src> src(sources.size());
        for (size_t i = 0; i < src.size(); i++) {
            static_cast<Source &>(src[i]) = sources[i];
            if (src[i].path.empty() && (src[i].addr % kAlign || src[i].map_size < src[i].size))
                throw std::invalid_argument("host source " + std::to_string(i) +
                                            " must be page-aligned and mapped for its whole size");
        }
        std::vector<std::vector<Piece>> per(src.size());
        for (const Job &job : jobs) {
            size_t s = job.source;
            Piece j{job.off, job.n, job.dst};
            if (s >= src.size() || j.off + j.n > src[s].size || j.off + j.n < j.off)
                throw std::invalid_argument("job outside its source (source " + std::to_string(s) + ")");
            if (j.n)
                per[s].push_back(j);
        }
        for (auto &v : per) {
            std::sort(v.begin(), v.end(), [](const Piece &a, const Piece &b) { return a.off < b.off; });
            for (size_t k = 1; k < v.size(); k++)
                if (v[k - 1].off + v[k - 1].n > v[k].off)
                    throw std::invalid_argument("jobs overlap inside one source");
        }
        LoadResult out;
        Failure fail;
        {
            std::lock_guard<std::mutex> busy(load_mu_);  // one load at a time owns the ring
            auto t0 = std::chrono::steady_clock::now();
            run(src, per, opt.chunk, threads, nbuf, opt.direct, opt.host_mode, opt.copy, fail, out.host_mode);
            out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        for (auto &v : per)
            for (auto &j : v)
                out.bytes += j.n;
        for (auto &s : src)
            out.direct.push_back(s.direct);
        out.ok = !fail.failed.load();
        out.kind = fail.kind;
        out.error = fail.message;
        out.code = fail.code;
        out.source = fail.source;
        out.pinned_bytes = pinned_bytes();
        return out;
    }

  private:
    int ordinal_;
    CUdevice dev_ = 0;
    CUcontext ctx_ = nullptr;
    bool retained_ = false;
    std::mutex load_mu_;        // one load at a time per device owns the ring
    std::vector<void *> ring_;  // pinned buffers, kept between loads
    size_t ring_chunk_ = 0;

    void free_ring()
    {
        for (void *p : ring_)
            driver().cuMemFreeHost(p);
        ring_.clear();
        ring_chunk_ = 0;
    }

    // Called with the context current; keeps the ring when it is already big enough.
    void ensure_ring(size_t n, size_t chunk)
    {
        if (ring_.size() >= n && ring_chunk_ >= chunk)
            return;
        n = std::max(n, ring_.size());  // grow to cover every path used so far: no thrash between paths
        chunk = std::max(chunk, ring_chunk_);
        free_ring();
        ring_.reserve(n);
        for (size_t i = 0; i < n; i++) {
            void *p = nullptr;
            CUresult rc = driver().cuMemHostAlloc(&p, chunk, CU_MEMHOSTALLOC_PORTABLE);
            if (rc != CUDA_SUCCESS) {
                free_ring();
                throw CudaError(rc, "cuMemHostAlloc (pinned ring)");
            }
            ring_.push_back(p);
        }
        ring_chunk_ = chunk;
    }

    static void open_files(std::vector<Src> &src, int direct, Failure &fail)
    {
        for (size_t i = 0; i < src.size() && !fail.failed.load(); i++) {
            Src &s = src[i];
            if (s.path.empty())
                continue;
            int fd = open(s.path.c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                int e = errno;
                fail.set("io", "open " + s.path + ": " + strerror(e), e, long(i));
                return;
            }
            struct stat st;
            if (fstat(fd, &st) != 0) {
                int e = errno;
                ::close(fd);
                fail.set("io", "fstat " + s.path + ": " + strerror(e), e, long(i));
                return;
            }
            if (uint64_t(st.st_size) < s.size) {
                ::close(fd);
                fail.set("truncated", "shard " + s.path + " is truncated: " + std::to_string(st.st_size) +
                                          " bytes, the manifest says " + std::to_string(s.size), EIO, long(i));
                return;
            }
            bool want = direct == 1 || (direct == 2 && s.size >= chunk_floor() &&
                                        resident_fraction(fd, s.size) < 0.5);
            if (want) {
                int dfd = open(s.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
                if (dfd >= 0) {  // EINVAL: the file system has no O_DIRECT; stay buffered
                    ::close(fd);
                    fd = dfd;
                    s.direct = true;
                }
            }
            s.fd = fd;
        }
    }

    static uint64_t chunk_floor() { return 1u << 20; }

    void run(std::vector<Src> &src, const std::vector<std::vector<Piece>> &per, size_t chunk, int threads,
             int nbuf, int direct, int host_mode, bool copy, Failure &fail, std::string &used_host_mode)
    {
        std::vector<Item> items;
        for (size_t i = 0; i < src.size(); i++) {
            if (src[i].has_digest)
                src[i].hashes.assign((src[i].size + kHashChunk - 1) / kHashChunk, 0);
            bool needed = !copy || src[i].has_digest || !per[i].empty();
            for (uint64_t off = 0; needed && off < src[i].size; off += chunk)
                items.push_back({i, off, std::min<uint64_t>(chunk, src[i].size - off)});
        }
        threads = int(std::min<size_t>(size_t(threads), std::max<size_t>(items.size(), 1)));
        bool any_host = false;
        for (auto &s : src)
            any_host |= s.path.empty();
        std::atomic<int> hmode{host_mode == 2 ? 2 : 1};  // 1 register, 2 staged
        try {
            current();
            ensure_ring(size_t(threads) * size_t(nbuf), chunk);
        } catch (CudaError &e) {
            fail.set(e.code == CUDA_ERROR_OUT_OF_MEMORY ? "oom" : "cuda", e.what(), e.code, -1);
        } catch (std::exception &e) {
            fail.set("cuda", e.what(), 0, -1);
        }
        if (!fail.failed.load())
            open_files(src, direct, fail);
        if (!fail.failed.load() && !items.empty()) {
            std::atomic<size_t> next{0};
            std::vector<std::thread> pool;
            try {
                for (int t = 0; t < threads; t++)
                    pool.emplace_back(
                        [&, t] { worker(t, src, per, items, next, nbuf, host_mode, copy, hmode, fail); });
            } catch (std::exception &e) {  // thread creation failed: stop the ones started
                fail.set("io", std::string("starting copy threads: ") + e.what(), EAGAIN, -1);
            }
            for (auto &th : pool)
                th.join();
        }
        for (auto &s : src)
            if (s.fd >= 0) {
                ::close(s.fd);
                s.fd = -1;
            }
        used_host_mode = !any_host ? "" : hmode.load() == 1 ? "register" : "staged";
        if (fail.failed.load())
            return;
        for (size_t i = 0; i < src.size(); i++) {
            if (!src[i].has_digest)
                continue;
            uint64_t got = ds_digest_combine(src[i].hashes.data(), src[i].hashes.size(), src[i].size);
            if (got != src[i].digest) {
                char buf[96];
                snprintf(buf, sizeof(buf), "digest %016llx, the manifest says %016llx", (unsigned long long)got,
                         (unsigned long long)src[i].digest);
                fail.set("checksum", "checksum mismatch in shard " +
                                         (src[i].path.empty() ? "#" + std::to_string(i) : src[i].path) + ": " + buf,
                         EIO, long(i));
                return;
            }
        }
    }

    struct Slot {
        void *buf = nullptr;
        CUevent ev = nullptr;
        bool pending = false;
        void *registered = nullptr;  // host chunk registered for this slot's copies
    };

    void worker(int t, std::vector<Src> &src, const std::vector<std::vector<Piece>> &per,
                const std::vector<Item> &items, std::atomic<size_t> &next, int nbuf, int host_mode, bool copy,
                std::atomic<int> &hmode, Failure &fail)
    {
        Driver &d = driver();
        CUstream stream = nullptr;
        std::vector<Slot> slots(static_cast<size_t>(nbuf));
        const std::vector<Piece> no_jobs;  // copy == false: read only
        long cur_src = -1;
        // Waits for a slot's copies and drops its registration; false (with the failure set) on error.
        auto settle = [&](Slot &s) -> bool {
            bool ok = true;
            if (s.pending) {
                CUresult rc = d.cuEventSynchronize(s.ev);
                s.pending = false;
                if (rc != CUDA_SUCCESS) {
                    fail.set("cuda", cu_msg(rc, "cuEventSynchronize"), rc, cur_src);
                    ok = false;
                }
            }
            if (s.registered) {
                CUresult rc = d.cuMemHostUnregister(s.registered);
                s.registered = nullptr;
                if (rc != CUDA_SUCCESS && ok) {
                    fail.set("cuda", cu_msg(rc, "cuMemHostUnregister"), rc, cur_src);
                    ok = false;
                }
            }
            return ok;
        };
        try {
            check(d.cuCtxSetCurrent(ctx_), "cuCtxSetCurrent");
            check(d.cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
            for (int k = 0; k < nbuf; k++) {
                slots[size_t(k)].buf = ring_[size_t(t) * size_t(nbuf) + size_t(k)];
                check(d.cuEventCreate(&slots[size_t(k)].ev, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
            }
            size_t k = 0;
            while (!fail.failed.load()) {
                size_t i = next.fetch_add(1);
                if (i >= items.size())
                    break;
                const Item &it = items[i];
                Src &s = src[it.src];
                cur_src = long(it.src);
                Slot &slot = slots[k++ % slots.size()];
                if (!settle(slot))
                    break;
                const char *data = nullptr;
                bool hashed = false;
                if (!s.path.empty()) {
                    // Buffered reads with a digest hash each piece while the kernel's copy of it is still in
                    // this core's cache: the bytes cross host memory three times (read, write, DMA) instead
                    // of four. O_DIRECT reads never pass through the CPU: hashed after, as host sources are.
                    hashed = s.has_digest && !s.direct;
                    if (!(hashed ? read_chunk_hashing(s, it, static_cast<char *>(slot.buf), fail)
                                 : read_chunk(s, it, static_cast<char *>(slot.buf), fail)))
                        break;
                    data = static_cast<const char *>(slot.buf);
                } else {
                    char *p = reinterpret_cast<char *>(s.addr) + it.off;
                    if (hmode.load() == 1) {
                        size_t rlen = std::min<uint64_t>((it.len + kAlign - 1) / kAlign * kAlign, s.map_size - it.off);
                        CUresult rc = d.cuMemHostRegister(p, rlen,
                                                          CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_READ_ONLY);
                        if (rc == CUDA_SUCCESS) {
                            slot.registered = p;
                            data = p;
                        } else if (host_mode == 1) {
                            throw CudaError(rc, "cuMemHostRegister");
                        } else {
                            hmode.store(2);  // not supported here: stage through the pinned ring from now on
                        }
                    }
                    if (!data) {
                        std::memcpy(slot.buf, p, it.len);
                        data = static_cast<const char *>(slot.buf);
                    }
                }
                // Every job piece inside [it.off, it.off + it.len): jobs are sorted and disjoint.
                const std::vector<Piece> &v = copy ? per[it.src] : no_jobs;
                auto first = std::partition_point(v.begin(), v.end(),
                                                  [&](const Piece &j) { return j.off + j.n <= it.off; });
                for (auto j = first; j != v.end() && j->off < it.off + it.len; ++j) {
                    uint64_t a = std::max(j->off, it.off), b = std::min(j->off + j->n, it.off + it.len);
                    check(d.cuMemcpyHtoDAsync(j->dst + (a - j->off), data + (a - it.off), size_t(b - a), stream),
                          "cuMemcpyHtoDAsync");
                }
                if (copy) {
                    check(d.cuEventRecord(slot.ev, stream), "cuEventRecord");
                    slot.pending = true;
                }
                if (s.has_digest && !hashed)  // hash while the DMA reads the same buffer
                    for (uint64_t o = 0; o < it.len; o += kHashChunk)
                        s.hashes[(it.off + o) / kHashChunk] = ds_digest_chunk(data + o, size_t(std::min<uint64_t>(kHashChunk, it.len - o)));
            }
        } catch (CudaError &e) {
            fail.set(e.code == CUDA_ERROR_OUT_OF_MEMORY ? "oom" : "cuda", e.what(), e.code, cur_src);
        } catch (std::exception &e) {
            fail.set("io", e.what(), 0, cur_src);
        }
        // Never free, reuse or unregister memory the GPU may still read: drain the stream (copies that
        // were issued but not yet covered by an event included), then settle every slot.
        bool drained = true;
        if (stream) {
            CUresult rc = d.cuStreamSynchronize(stream);
            if (rc != CUDA_SUCCESS) {
                fail.set("cuda", cu_msg(rc, "cuStreamSynchronize"), rc, cur_src);
                drained = false;
            }
        }
        for (auto &slot : slots) {
            if (!drained)
                slot.pending = slot.ev != nullptr && slot.pending;  // still try each event
            settle(slot);
            if (slot.ev)
                d.cuEventDestroy(slot.ev);
        }
        if (stream)
            d.cuStreamDestroy(stream);
    }

    static bool read_buffered(Src &s, const Item &it, char *buf, uint64_t got, Failure &fail)
    {
        int fd = open(s.path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            fail.set("io", "open " + s.path + ": " + strerror(e), e, long(it.src));
            return false;
        }
        while (got < it.len) {
            ssize_t q = pread(fd, buf + got, size_t(it.len - got), off_t(it.off + got));
            if (q < 0 && errno == EINTR)
                continue;
            if (q <= 0) {
                int e = q < 0 ? errno : EIO;
                ::close(fd);
                if (q < 0)
                    fail.set("io", "read " + s.path + " at " + std::to_string(it.off + got) + ": " + strerror(e), e,
                             long(it.src));
                else
                    fail.set("truncated", "shard " + s.path + " is truncated: it ends at " +
                                              std::to_string(it.off + got) + " bytes, the manifest says " +
                                              std::to_string(s.size), EIO, long(it.src));
                return false;
            }
            got += uint64_t(q);
        }
        ::close(fd);
        return true;
    }

    // Reads [it.off, it.off + it.len) through the page cache in pieces small enough to stay in a core's
    // cache, folding each into the running xxh3 of its 8 MiB hash chunk (streaming xxh3 equals one-shot).
    static bool read_chunk_hashing(Src &s, const Item &it, char *buf, Failure &fail)
    {
        constexpr uint64_t kPiece = uint64_t(512) << 10;
        ds_digest_stream *st = nullptr;
        if (ds_digest_stream_create(&st)) {
            fail.set("io", "xxh3 state: out of memory", ENOMEM, long(it.src));
            return false;
        }
        std::unique_ptr<ds_digest_stream, void (*)(ds_digest_stream *)> own(st, ds_digest_stream_destroy);
        for (uint64_t h = 0; h < it.len; h += kHashChunk) {
            uint64_t hlen = std::min<uint64_t>(kHashChunk, it.len - h);
            ds_digest_stream_reset(st);
            for (uint64_t p = 0; p < hlen; p += kPiece) {
                uint64_t plen = std::min<uint64_t>(kPiece, hlen - p);
                char *dst = buf + h + p;
                uint64_t got = 0;
                while (got < plen) {
                    ssize_t r = pread(s.fd, dst + got, size_t(plen - got), off_t(it.off + h + p + got));
                    if (r < 0 && errno == EINTR)
                        continue;
                    if (r < 0) {
                        int e = errno;
                        fail.set("io", "read " + s.path + " at " + std::to_string(it.off + h + p + got) + ": " +
                                           strerror(e), e, long(it.src));
                        return false;
                    }
                    if (r == 0) {
                        fail.set("truncated", "shard " + s.path + " is truncated: it ends at " +
                                                  std::to_string(it.off + h + p + got) + " bytes, the manifest says " +
                                                  std::to_string(s.size), EIO, long(it.src));
                        return false;
                    }
                    got += uint64_t(r);
                }
                ds_digest_stream_update(st, dst, size_t(plen));
            }
            s.hashes[(it.off + h) / kHashChunk] = ds_digest_stream_final(st);
        }
        return true;
    }

    static bool read_chunk(Src &s, const Item &it, char *buf, Failure &fail)
    {
        uint64_t want = it.len, got = 0;
        // O_DIRECT needs aligned lengths: read whole pages, the file (shard) is padded or ends there.
        uint64_t ask = s.direct ? (want + kAlign - 1) / kAlign * kAlign : want;
        while (got < want) {
            ssize_t r = pread(s.fd, buf + got, size_t(ask - got), off_t(it.off + got));
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                int e = errno;
                fail.set("io", "read " + s.path + " at " + std::to_string(it.off + got) + ": " + strerror(e), e,
                         long(it.src));
                return false;
            }
            if (r == 0) {
                fail.set("truncated", "shard " + s.path + " is truncated: it ends at " +
                                          std::to_string(it.off + got) + " bytes, the manifest says " +
                                          std::to_string(s.size), EIO, long(it.src));
                return false;
            }
            got += uint64_t(r);
            if (s.direct && got < want && got % kAlign)  // a short O_DIRECT read mid-chunk: finish buffered
                return read_buffered(s, it, buf, got, fail);
        }
        return true;
    }
};

CudaError::CudaError(int rc, const std::string &op) : std::runtime_error(cu_msg(rc, op)), code(rc) {}

Device::Device(int ordinal) : impl_(std::make_unique<Impl>(ordinal)) {}
Device::~Device() = default;
void Device::close() { impl_->close(); }
std::string Device::name() const { return impl_->name(); }
std::pair<size_t, size_t> Device::mem_info() const { return impl_->mem_info(); }
DevicePtr Device::alloc(size_t nbytes) const { return impl_->alloc(nbytes); }
void Device::free(DevicePtr p) const { impl_->free(p); }
void Device::htod(DevicePtr dst, const void *src, size_t n) const { impl_->htod(dst, src, n); }
void Device::dtoh(void *dst, DevicePtr src, size_t n) const { impl_->dtoh(dst, src, n); }
size_t Device::pinned_bytes() const { return impl_->pinned_bytes(); }
LoadResult Device::load(const std::vector<Source> &sources, const std::vector<Job> &jobs, const LoadOptions &opt)
{
    return impl_->load(sources, jobs, opt);
}

ProbeResult probe() noexcept
{
    ProbeResult out;
    try {
        Driver &d = driver();
        out.ok = d.error.empty();
        out.error = d.error;
        if (!d.error.empty())
            return out;
        int v = 0, n = 0;
        if (d.cuDriverGetVersion(&v) == CUDA_SUCCESS) {
            out.has_version = true;
            out.driver_version = v;
        }
        CUresult rc = d.cuDeviceGetCount(&n);
        if (rc == CUDA_SUCCESS)
            out.devices = n;
        else {
            out.ok = false;
            out.error = cu_msg(rc, "cuDeviceGetCount");
        }
        if (n == 0 && rc == CUDA_SUCCESS) {
            out.ok = false;
            out.error = "the CUDA driver sees no GPU";
        }
    } catch (std::exception &e) {  // std::bad_alloc building a message
        out.ok = false;
        out.error = e.what();
    }
    return out;
}

}  // namespace ds::h2d
