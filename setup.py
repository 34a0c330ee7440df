"""Compiled extensions of dynsnap-core: CMake builds the C/C++ core (libdynsnap.a) once, every extension links it."""
import os
import shlex
import subprocess
import sys

from Cython.Build import cythonize
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = sorted(os.path.join(d, f) for d, _, fs in os.walk("csrc") for f in fs if f.endswith((".c", ".cpp", ".h")))
DEPENDS = CORE + ["CMakeLists.txt"]   # relink the modules whenever the C core changes


def deps():
    """Include dirs, library dirs and link args for liburing, libaio and xxhash."""
    prefix = os.environ.get("DYNSNAP_DEPS_PREFIX")
    if prefix:
        lib = os.path.join(prefix, "lib")
        return [os.path.join(prefix, "include")], [lib], [f"-Wl,-rpath,{lib}"]
    inc, libdirs = [], []
    try:
        out = subprocess.run(["pkg-config", "--cflags-only-I", "--libs-only-L", "liburing"],
                             capture_output=True, text=True, check=True).stdout
        for tok in shlex.split(out):
            (inc if tok.startswith("-I") else libdirs).append(tok[2:])
    except (OSError, subprocess.CalledProcessError):
        pass
    return inc, libdirs, []


def cmake():
    """The first cmake on PATH that runs (a pyenv shim of a pip cmake fails inside pip's isolated build env)."""
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/bin", "/usr/bin"]:
        exe = os.path.join(d, "cmake")
        if os.access(exe, os.X_OK) and subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
            return exe
    return None


class BuildExt(build_ext):
    """Builds the `dynsnap` static library once (CMake: strict flags, no sanitizers; the same sources with the
    same flags through the Python build's compiler where a machine has no CMake), then links it into each module."""

    def run(self):
        build = os.path.join(os.path.abspath(self.build_temp), "core")
        exe = cmake()
        if not exe or subprocess.run([exe, "-S", HERE, "-B", build, "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                                      "-DDYNSNAP_TESTS=OFF", "-DDYNSNAP_SANITIZE=OFF"]).returncode != 0:
            print("setup.py: " + ("CMake failed to configure" if exe else "no CMake") +
                  ": building libdynsnap.a with the Python build's compiler", file=sys.stderr)
            self.build_core_without_cmake(build)
        else:
            subprocess.run([exe, "--build", build, "--target", "dynsnap", f"-j{os.cpu_count() or 1}"], check=True)
        for ext in self.extensions:
            ext.extra_objects = [os.path.join(build, "libdynsnap.a")]
        super().run()

    def build_core_without_cmake(self, build):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
        cc = new_compiler()
        customize_compiler(cc)
        strict = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-fPIC"]
        inc = ["csrc/include", "csrc"] + INC
        objs = cc.compile([f for f in CORE if f.endswith(".c")], output_dir=build, include_dirs=inc,
                          extra_postargs=["-std=c11"] + strict)
        objs += cc.compile([f for f in CORE if f.endswith(".cpp")], output_dir=build, include_dirs=inc,
                           extra_postargs=["-std=c++17"] + strict)
        cc.create_static_lib(objs, "dynsnap", output_dir=build)


INC, LIBDIRS, LINK = deps()
CORE_INC = ["csrc/include"] + INC


def c_core_extension(name: str, pyx: str) -> Extension:
    """A Cython module over the C core's public headers."""
    return Extension(name, sources=[pyx], include_dirs=CORE_INC + ["csrc"], library_dirs=LIBDIRS,
                     libraries=["uring", "aio"], extra_compile_args=["-O2", "-D_GNU_SOURCE", "-Wno-unused-function"],
                     extra_link_args=LINK, depends=DEPENDS)


def cxx_extension(name: str, src: str) -> Pybind11Extension:
    """A pybind11 module over the core's C++ pieces."""
    return Pybind11Extension(name, sources=[src], include_dirs=CORE_INC, cxx_std=17, depends=DEPENDS,
                             extra_compile_args=["-O2", "-Wall", "-Wextra"], libraries=["dl", "pthread"])


setup(
    ext_modules=cythonize([c_core_extension("dynsnap_core._lib._io", "bindings/_io.pyx"),          # the I/O engine
                           c_core_extension("dynsnap_core._lib._memfd", "bindings/_memfd.pyx")],   # memfd restore
                          language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})
    + [cxx_extension("dynsnap_core._lib._cudaprobe", "bindings/cudaprobe.cpp"),  # CUDA probe
       cxx_extension("dynsnap_core._lib._h2d", "bindings/_h2d.cpp"),             # weights: pinned H2D pipeline
       # not a Python module: a plain shared object torch's CUDAPluggableAllocator loads (gms torch_pool)
       Extension("dynsnap_core._lib._gmspool", sources=["bindings/gms/gms_pool.c"], libraries=["pthread"],
                 extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])],
    cmdclass={"build_ext": BuildExt},
)
