"""native: which compiled library runs (the best level the CPU and ATEN_CPU_CAPABILITY allow,
none when switched off or stale), and that diffcodec no longer loads numba (its ~130 MiB of
LLVM was what kept contract 2's memory above float32's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffcodec import native

REPO = Path(__file__).resolve().parents[1]
built = pytest.mark.skipif(native.library("exact2") is None, reason="the native kernels are not built here "
                           "(no compiler at install time): the torch twins run")

LEVEL_SCRIPT = """
import json, sys
from diffcodec import native
print(json.dumps({n: native.level(n) for n in ("exact2", "rcc_pool")}))
"""


def _child(script: str, **env: str) -> dict:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@built
@pytest.mark.parametrize("capability, level", [("default", "base"), ("avx2", "v3"), (None, None)])
def test_the_level_follows_the_cpu_and_atens_cap(capability, level):
    """ATEN_CPU_CAPABILITY=default takes the SSE2 library, avx2 the AVX2 one (where the CPU has
    it); uncapped, the best the CPU has."""
    if native.level("exact2") in ("generic", None):
        pytest.skip("not x86-64: one generic library")
    env = {} if capability is None else {"ATEN_CPU_CAPABILITY": capability}
    got = _child(LEVEL_SCRIPT, **env)
    best = {4: "v4", 3: "v3", 1: "base"}[native.cpu_level()]
    expected = best if level is None else level if native.cpu_level() >= {"base": 1, "v3": 3}[level] else best
    assert got == {"exact2": expected, "rcc_pool": expected}


def test_switched_off_every_kernel_runs_its_twin():
    assert _child(LEVEL_SCRIPT, DIFFCODEC_NO_NATIVE="1") == {"exact2": None, "rcc_pool": None}


@built
def test_a_library_older_than_its_sources_is_stale_in_a_source_checkout_only(tmp_path):
    path = native._path("exact2", native.level("exact2"))
    sources = tmp_path / "diffcodec" / "csrc"
    sources.mkdir(parents=True)
    (sources / "exact2.c").write_text("/* newer */")
    assert not native._stale(path, "exact2", sources)  # no setup.py: an installed package
    (tmp_path / "setup.py").write_text("")
    assert not native._stale(path, "exact2", tmp_path / "missing")
    assert native._stale(path, "exact2", sources)
    os.utime(sources / "exact2.c", (time.time() - 1e8, time.time() - 1e8))
    assert not native._stale(path, "exact2", sources)


def test_threads_follow_torch_for_large_work_only(monkeypatch):
    monkeypatch.setattr(native, "_threads", 0)
    assert native.threads(native.PARALLEL_MIN_WORK - 1) == 1
    assert native.threads(native.PARALLEL_MIN_WORK) == torch.get_num_threads()
    monkeypatch.setattr(native, "_threads", 3)
    assert native.threads(10**9) == 3


NO_NUMBA_SCRIPT = """
import json, sys
import numpy as np
from diffcodec.codec import api
from diffcodec.codec.progressive.params import ProgressiveParams
sys.path.insert(0, "tests")
from conftest import as_loaded, seeded_model, synthetic_images
model = as_loaded(*seeded_model(0))
images = synthetic_images([(32, 32)], seed=3)
params = ProgressiveParams(num_steps=2, chunk_bits=6.0, log2_candidates=8)
coded = api.encode(images, model=model, mode="progressive", progressive_params=params, workers=1)
back = api.decode(coded.data, model=model, device="cpu")
assert np.array_equal(back.images[0], images[0])
print(json.dumps({"numba": sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "llvmlite"))}))
"""


def test_a_portable_progressive_round_trip_loads_no_numba():
    """The exact network (contract 2) and the candidate search run without numba or llvmlite
    in the process (its LLVM held ~130 MiB)."""
    assert _child(NO_NUMBA_SCRIPT) == {"numba": []}


def test_sync_threads_sets_the_kernels_thread_count_to_torchs(monkeypatch):
    monkeypatch.setattr(native, "_threads", 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        native.sync_threads()
        assert native.threads(native.PARALLEL_MIN_WORK) == 2
    finally:
        torch.set_num_threads(before)
        native.sync_threads()
