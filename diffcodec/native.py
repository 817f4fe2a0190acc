"""The compiled CPU kernels (diffcodec/csrc/*.c, built by setup.py), loaded with ctypes.

Each kernel file `csrc/<name>.c` is built into one shared library per instruction-set level
on x86-64 (`_native_<name>_v4`: AVX-512, `_v3`: AVX2, `_base`: SSE2; elsewhere `_generic`);
`library(name)` loads the best level that both the CPU and torch's ATEN_CPU_CAPABILITY allow,
so the portability tests that cap torch's vector units cap these too. Every level computes
the same bits (csrc/kernels.h's rules). Without a built library (no compiler at install
time), or with DIFFCODEC_NO_NATIVE set when diffcodec is imported, `library` gives None and
the callers run their torch twins: the same bits, slower. A kernel's threads:
`threads(work)`, torch's count (read by `sync_threads`) for work of at least
PARALLEL_MIN_WORK elements, else one (a parallel region costs ~5-50 us)."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

PARALLEL_MIN_WORK = 1 << 16
"""Elements from which a kernel runs on torch's threads."""
LEVELS = (("v4", 4), ("v3", 3), ("base", 1), ("generic", 1))  # best first
_TORCH_LEVELS = {"AVX512": 4, "AVX2": 3}  # torch.backends.cpu.get_cpu_capability(); others: 1
OFF = os.environ.get("DIFFCODEC_NO_NATIVE", "") != ""
"""DIFFCODEC_NO_NATIVE was set when diffcodec was imported: only the torch twins run."""

i64, f64, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


def _torch_level() -> int:
    try:
        return _TORCH_LEVELS.get(torch.backends.cpu.get_cpu_capability(), 1)
    except AttributeError:  # pragma: no cover - torch < 2.1
        return 4


def _path(name: str, level: str) -> str | None:
    spec = importlib.util.find_spec(f"diffcodec._native_{name}_{level}")
    return spec.origin if spec is not None and spec.origin else None


def _stale(path: str, name: str, folder: Path = Path(__file__).with_name("csrc")) -> bool:
    """A library older than its sources: a source checkout (setup.py beside the package: an
    editable install, or a build in place) whose C changed since its build. An installed
    package is never stale (its files' times are the installer's)."""
    if not (folder.parent.parent / "setup.py").is_file():
        return False
    built = os.path.getmtime(path)
    sources = [folder / f"{name}.c", folder / "kernels.h", folder / "module.c"]
    return any(s.is_file() and s.stat().st_mtime > built for s in sources)


@functools.lru_cache(maxsize=None)
def cpu_level() -> int:
    """4: AVX-512 (F, BW, DQ, VL, CD), 3: AVX2 (FMA, BMI1/2), 1: neither (asked of a baseline library)."""
    for name in ("exact2", "rcc_pool"):
        path = _path(name, "base") or _path(name, "generic")
        if path is not None:
            try:
                return int(ctypes.CDLL(path).dc_cpu_level())
            except OSError:  # a broken build: `library` says so
                continue
    return 1


@functools.lru_cache(maxsize=None)
def library(name: str) -> ctypes.CDLL | None:
    """`csrc/<name>.c`'s library at the best level allowed, or None (the torch twins run)."""
    if OFF:
        return None
    allowed = min(cpu_level(), _torch_level())
    for level, rank in LEVELS:
        path = _path(name, level)
        if path is None or rank > allowed:
            continue
        if _stale(path, name):
            print(f"diffcodec: {Path(path).name} is older than diffcodec/csrc: rebuild it with "
                  "`pip install -e .` (the torch twins run meanwhile)", file=sys.stderr)
            return None
        try:
            return ctypes.CDLL(path)
        except OSError as error:  # a broken build (an undefined symbol): the twins, said once
            print(f"diffcodec: cannot load {Path(path).name} ({error}); the torch twins run", file=sys.stderr)
            return None
    return None


def level(name: str) -> str | None:
    """The level of `library(name)` ("v4", "v3", "base", "generic"), None without one."""
    lib = library(name)
    return None if lib is None else Path(lib._name).name.split(".")[0].rsplit("_", 1)[1]


def bind(lib: ctypes.CDLL, symbol: str, *argtypes, restype=None):
    """``lib``'s function ``symbol`` with its C argument and result types (ctypes)."""
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


_threads = 0


def sync_threads() -> None:
    """The kernels' thread count follows torch's (`runtime.use_threads` sets it)."""
    global _threads
    _threads = torch.get_num_threads()


def threads(work: int) -> int:
    """Threads for a kernel over ``work`` elements: torch's count, or one for small work."""
    if work < PARALLEL_MIN_WORK:
        return 1
    return _threads or torch.get_num_threads()


def address(a: torch.Tensor | np.ndarray) -> int:
    """The data pointer of a contiguous CPU tensor or numpy array (what the kernels take)."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a.ctypes.data
