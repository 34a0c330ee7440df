// CUDA driver probe for `dynsnap doctor`: dlopen()s libcuda.so.1 at run time, never links it.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace {

const char *const kCheckpointSymbols[] = {
    "cuCheckpointProcessLock",    "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",  "cuCheckpointProcessGetState",   "cuCheckpointProcessGetRestoreThreadId",
};

py::dict probe()
{
    py::dict out;
    out["driver_loaded"] = false;
    out["driver_version"] = py::none();
    out["checkpoint_api"] = false;
    out["error"] = py::none();

    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *err = dlerror();
        out["error"] = std::string("dlopen libcuda.so.1: ") + (err ? err : "unknown error");
        return out;
    }
    out["driver_loaded"] = true;
    using GetVersion = int (*)(int *);
    auto get_version = reinterpret_cast<GetVersion>(dlsym(lib, "cuDriverGetVersion"));
    if (get_version) {
        int version = 0;
        int rc = get_version(&version);  // callable without cuInit
        if (rc == 0)
            out["driver_version"] = version;
        else
            out["error"] = "cuDriverGetVersion failed with CUresult " + std::to_string(rc);
    } else {
        out["error"] = "libcuda.so.1 has no cuDriverGetVersion";
    }
    bool all = true;
    std::string missing;
    for (const char *sym : kCheckpointSymbols) {
        if (!dlsym(lib, sym)) {
            all = false;
            missing += missing.empty() ? sym : std::string(", ") + sym;
        }
    }
    out["checkpoint_api"] = all;
    if (!all && out["error"].is_none())
        out["error"] = "driver lacks the checkpoint API (missing " + missing + ")";
    dlclose(lib);
    return out;
}

}  // namespace

PYBIND11_MODULE(_cudaprobe, m)
{
    m.doc() = "Probe the CUDA driver (libcuda.so.1) at run time without linking it.";
    m.def("probe", &probe,
          "Returns {driver_loaded, driver_version, checkpoint_api, error}; works without CUDA.");
}
