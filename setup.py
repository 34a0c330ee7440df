"""Compiled extensions of dynsnap-core: the C I/O engine (Cython) and the CUDA probe (pybind11)."""
import os
import shlex
import subprocess

from Cython.Build import cythonize
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc")) if f.endswith(".c"))
HEADERS = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join("csrc")) for f in fs if f.endswith(".h"))
DEPENDS = CSRC + HEADERS          # relink the modules whenever the C core changes
STRICT = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE"]


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


class BuildExt(build_ext):
    """Compiles csrc/*.c with the strict C flags, then links them into the Cython module."""

    def build_extension(self, ext):
        strict = STRICT_SOURCES.get(ext.name)
        if strict:
            objs = self.compiler.compile(strict, output_dir=self.build_temp,
                                         include_dirs=ext.include_dirs, extra_postargs=STRICT)
            ext.extra_objects = list(objs)
        super().build_extension(ext)


INC, LIBDIRS, LINK = deps()


def c_core_extension(name: str, pyx: str) -> Extension:
    """A Cython module linked with the whole C core (csrc/*.c, compiled with the strict flags)."""
    return Extension(name, sources=[pyx], include_dirs=["csrc/include", "csrc"] + INC, library_dirs=LIBDIRS,
                     libraries=["uring", "aio"], extra_compile_args=["-O2", "-D_GNU_SOURCE", "-Wno-unused-function"],
                     extra_link_args=LINK, depends=DEPENDS)


io_ext = c_core_extension("dynsnap_core._lib._io", "bindings/_io.pyx")            # the I/O engine
memfd_ext = c_core_extension("dynsnap_core._lib._memfd", "bindings/_memfd.pyx")   # parallel memfd restoration
STRICT_SOURCES = {io_ext.name: CSRC, memfd_ext.name: CSRC}

probe_ext = Pybind11Extension(
    "dynsnap_core._lib._cudaprobe",
    sources=["bindings/cudaprobe.cpp"],
    cxx_std=17,
    libraries=["dl"],
)

h2d_ext = Pybind11Extension(  # weights (issue 6): pinned multi-stream H2D pipeline, libcuda dlopen()ed
    "dynsnap_core._lib._h2d",
    sources=["bindings/_h2d.cpp"],
    include_dirs=INC,
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
    libraries=["dl", "pthread"],
)

setup(
    ext_modules=cythonize([io_ext, memfd_ext], language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False}) + [probe_ext, h2d_ext],
    cmdclass={"build_ext": BuildExt},
)
