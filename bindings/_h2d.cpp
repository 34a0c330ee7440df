// _h2d: the pybind11 layer over the pinned storage/host -> GPU copy engine (csrc/h2d.cpp, dynsnap/h2d.h).
// It converts arguments and results and releases the GIL while the engine works; nothing else.
#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "dynsnap/h2d.h"

namespace py = pybind11;
namespace h2d = ds::h2d;

namespace {

py::dict probe()
{
    h2d::ProbeResult p;
    {
        py::gil_scoped_release nogil;
        p = h2d::probe();
    }
    py::dict out;
    out["ok"] = p.ok;
    out["error"] = p.error.empty() ? py::object(py::none()) : py::object(py::str(p.error));
    out["devices"] = p.devices;
    out["driver_version"] = p.has_version ? py::object(py::int_(p.driver_version)) : py::object(py::none());
    return out;
}

void htod(const h2d::Device &d, h2d::DevicePtr dst, py::buffer src)
{
    py::buffer_info bi = src.request();
    size_t n = size_t(bi.size) * size_t(bi.itemsize);
    py::gil_scoped_release nogil;
    d.htod(dst, bi.ptr, n);
}

void dtoh(const h2d::Device &d, py::buffer dst, h2d::DevicePtr src)
{
    py::buffer_info bi = dst.request(true);
    size_t n = size_t(bi.size) * size_t(bi.itemsize);
    py::gil_scoped_release nogil;
    d.dtoh(bi.ptr, src, n);
}

// sources: list of dicts {path | addr + map_size, size, digest (int or None)}
// jobs: list of (source index, offset, nbytes, device pointer)
// direct: 0 buffered, 1 O_DIRECT, 2 auto; host_mode: 0 auto, 1 register, 2 staged; copy=False reads only
py::dict load(h2d::Device &d, py::list sources, py::list jobs, size_t chunk, int threads, int nbuf, int direct,
              int host_mode, bool copy)
{
    std::vector<h2d::Source> src(sources.size());
    for (size_t i = 0; i < src.size(); i++) {
        py::dict s = sources[i].cast<py::dict>();
        if (s.contains("path") && !s["path"].is_none())
            src[i].path = s["path"].cast<std::string>();
        else {
            src[i].addr = s["addr"].cast<uintptr_t>();
            src[i].map_size = s["map_size"].cast<uint64_t>();
        }
        src[i].size = s["size"].cast<uint64_t>();
        if (s.contains("digest") && !s["digest"].is_none()) {
            src[i].has_digest = true;
            src[i].digest = s["digest"].cast<uint64_t>();
        }
    }
    std::vector<h2d::Job> jv;
    jv.reserve(jobs.size());
    for (py::handle h : jobs) {
        py::tuple t = h.cast<py::tuple>();
        jv.push_back({t[0].cast<size_t>(), t[1].cast<uint64_t>(), t[2].cast<uint64_t>(), t[3].cast<h2d::DevicePtr>()});
    }
    h2d::LoadOptions opt;
    opt.chunk = chunk;
    opt.threads = threads;
    opt.nbuf = nbuf;
    opt.direct = direct;
    opt.host_mode = host_mode;
    opt.copy = copy;
    h2d::LoadResult r;
    {
        py::gil_scoped_release nogil;  // the engine's load lock is taken without the GIL: no lock-order deadlock
        r = d.load(src, jv, opt);
    }
    py::dict out;
    out["ok"] = r.ok;
    out["kind"] = r.kind;
    out["error"] = r.error;
    out["code"] = r.code;
    out["source"] = r.source;
    out["bytes"] = r.bytes;
    out["seconds"] = r.seconds;
    py::list directs;
    for (bool b : r.direct)
        directs.append(b);
    out["direct"] = directs;
    out["host_mode"] = r.host_mode;
    out["pinned_bytes"] = r.pinned_bytes;
    return out;
}

}  // namespace

PYBIND11_MODULE(_h2d, m)
{
    m.doc() = "Pinned multi-stream storage/host -> GPU copies through libcuda.so.1 loaded at run time.";
    py::register_exception<h2d::CudaError>(m, "CudaCallError", PyExc_RuntimeError);
    m.attr("HASH_CHUNK") = size_t(DS_DIGEST_CHUNK);
    m.def("probe", &probe, "{ok, error, devices, driver_version}; never raises, works without CUDA.");
    py::class_<h2d::Device>(m, "Device")
        .def(py::init<int>(), py::arg("ordinal"))
        .def("close", &h2d::Device::close)
        .def("name", &h2d::Device::name)
        .def("mem_info", &h2d::Device::mem_info, "(free, total) bytes")
        .def("alloc", &h2d::Device::alloc, py::arg("nbytes"))
        .def("free", &h2d::Device::free, py::arg("ptr"))
        .def("htod", &htod, py::arg("dst"), py::arg("src"))
        .def("dtoh", &dtoh, py::arg("dst"), py::arg("src"))
        .def_property_readonly("pinned_bytes", &h2d::Device::pinned_bytes)
        .def("load", &load, py::arg("sources"), py::arg("jobs"), py::arg("chunk"), py::arg("threads"),
             py::arg("nbuf"), py::arg("direct"), py::arg("host_mode"), py::arg("copy") = true);
}
