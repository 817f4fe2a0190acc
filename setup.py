"""Builds diffcodec's compiled CPU kernels (diffcodec/csrc/*.c; `diffcodec/native.py` loads them).

The kernels are plain C loaded with ctypes, not Python extension modules: one shared library
per kernel file and instruction-set level on x86-64 (`_native_exact2_v4`: AVX-512, `_v3`: AVX2,
`_base`: SSE2), so that the loader can pick the best level the CPU has, or a lower one when
ATEN_CPU_CAPABILITY caps torch's (the portability tests run both). Every level computes the
same bits: the code is IEEE-754 operation by operation (-ffp-contract=off: no fused
multiply-add; never fast-math), and vector width changes no result. OpenMP (GCC's, the
runtime torch itself uses on Linux) spreads a kernel over torch's threads where the compiler
has it; elsewhere the kernels run on one thread. A failed build leaves diffcodec working on
its torch twins (the same bits, slower): `diffcodec.native.available()` says which runs.
"""

from __future__ import annotations

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ("exact2", "rcc_pool")  # diffcodec/csrc/<name>.c: one library per file and level
DEPENDS = ["diffcodec/csrc/kernels.h"]
X86_LEVELS = {  # explicit feature flags (older compilers lack -march=x86-64-v3 / -v4)
    "v4": ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c", "-mlzcnt", "-mmovbe",
           "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512cd"],
    "v3": ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c", "-mlzcnt", "-mmovbe"],
    "base": [],
}
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


class BuildNative(build_ext):
    """Adds the compiler's flags: IEEE arithmetic, optimisation, OpenMP where it works."""

    def build_extension(self, ext: Extension) -> None:
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:
            flags = ["/O2", "/fp:precise", "/openmp"]
        else:
            flags = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
            if X86:
                flags += X86_LEVELS[ext.name.rsplit("_", 1)[1]]
        openmp = not msvc and sys.platform != "darwin"  # Apple's clang has no OpenMP
        ext.extra_compile_args = flags + (["-fopenmp"] if openmp else [])
        ext.extra_link_args = ["-fopenmp"] if openmp else []
        try:
            super().build_extension(ext)
        except Exception as error:  # no OpenMP in this compiler: one thread per kernel
            if not openmp:
                raise
            print(f"diffcodec: building {ext.name} without OpenMP ({error})", file=sys.stderr)
            ext.extra_compile_args, ext.extra_link_args = flags, []
            super().build_extension(ext)


levels = list(X86_LEVELS) if X86 else ["generic"]
setup(
    ext_modules=[Extension(f"diffcodec._native_{name}_{level}", [f"diffcodec/csrc/{name}.c", "diffcodec/csrc/module.c"],
                           depends=DEPENDS, optional=True, define_macros=[("DC_MODULE", f"_native_{name}_{level}")])
                 for name in KERNELS for level in levels],
    cmdclass={"build_ext": BuildNative},
)
