"""Pooled candidates (progressive stream versions 4 to 6): the normals (Box-Muller pairs;
version 6: the table) are the same bits from the C kernels (csrc/rcc_pool.c, every library
level), the numpy reference and the torch twin (any thread count, another process); the
search picks the PFR argmin (version 4) or the largest log q/p (versions 5 and 6, greedy),
the C minima exactly the rule's (ties to the smaller index); the sent sample delivers about
the chunk KL (greedy: more); streams of versions 3 to 6 round trip."""

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec import native
from diffcodec.codec import rcc, rcc_pool as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
needs_native = pytest.mark.skipif(not R._use_native(), reason="no rcc_pool C library (the torch twins run)")


def native_levels() -> list[tuple[str, str]]:
    """(level, path) of each built rcc_pool library this CPU can run (v4, v3, base)."""
    cpu = native.cpu_level()
    found = []
    for level, rank in native.LEVELS:
        path = native._path("rcc_pool", level)
        if path is not None and rank <= cpu:
            found.append((level, path))
    return found


def bits(x) -> np.ndarray:
    """The binary32 bits of an array or tensor (int32), for bit-for-bit comparisons."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


def reference_rows(key: int, rows: np.ndarray, h: int, normals: str = "box_muller") -> np.ndarray:
    """float32 [R, h x per_draw]: pool rows by the numpy reference (`draws_np`, then
    `box_muller_np` or `table_normals_np`)."""
    z = R.draws_np(key, rows[:, None] * h + np.arange(h)[None])
    if normals == "table":
        return R.table_normals_np(z).reshape(len(rows), 4 * h)
    lo, hi = R.box_muller_np(z)
    return np.stack([lo, hi], axis=-1).reshape(len(rows), 2 * h)


def reference_samples(plan: R.StagePlan, indices: np.ndarray) -> np.ndarray:
    """`samples` by the numpy reference."""
    keys = plan.pool_keys()
    out = np.empty(len(plan.perm), dtype=np.float32)
    for c in range(plan.num_chunks):
        row = reference_rows(int(keys[c // plan.chunks_per_pool]), np.array([indices[c] ^ plan.offsets[c]]),
                             plan.draws_per_row, plan.normals)[0]
        dims = plan.perm[plan.bounds[c] : plan.bounds[c + 1]]
        out[dims] = row[: len(dims)]
    return out


def stage_problem(num_dims: int, num_chunks: int, kl_per_chunk_bits: float, seed: int = 0,
                  normals: str = "box_muller"):
    """A stage's Gaussians q, p (float64 [D] each: means and log variances) with about
    ``kl_per_chunk_bits`` per chunk, and its plan (pad 2, at most 2^16 candidates)."""
    rng = np.random.default_rng(seed)
    pm, pv = rng.normal(size=num_dims), rng.normal(size=num_dims) * 0.3
    qv = pv + rng.normal(size=num_dims) * 0.2 - 0.4
    direction = rng.normal(size=num_dims)
    qm = pm + np.exp(0.5 * pv) * direction  # scaled below to the wanted KL
    kl = rcc.gaussian_kl_bits(qm, qv, pm, pv).sum()
    target = kl_per_chunk_bits * num_chunks
    lo, hi = 0.0, 1.0
    while rcc.gaussian_kl_bits(pm + hi * (qm - pm), qv, pm, pv).sum() < target:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        kl = rcc.gaussian_kl_bits(pm + mid * (qm - pm), qv, pm, pv).sum()
        lo, hi = (mid, hi) if kl < target else (lo, mid)
    qm = pm + lo * (qm - pm)
    perm = rng.permutation(num_dims)
    plan = R.plan_stage(seed, 5, perm, num_chunks, kl_per_chunk_bits, 2.0, 16, normals=normals)
    return (qm, qv, pm, pv), plan


def chunk_kl_bits(plan: R.StagePlan, gaussians) -> np.ndarray:
    kl = rcc.gaussian_kl_bits(*gaussians)
    return np.add.reduceat(kl[plan.perm], plan.bounds[:-1])


def reference_select(plan: R.StagePlan, gaussians, counts: np.ndarray, rule: str = "pfr") -> list[np.ndarray]:
    """For each chunk: the float64 scores log T_k - log w(u_k) (greedy: -log w(u_k)) over
    k < counts[c] (numpy)."""
    a, b = R.log_weight_coefficients(*gaussians)
    log_times = R.arrival_log_times(plan, int(counts.max())).astype(np.float64)
    if rule == "greedy":
        log_times[:] = 0.0
    keys = plan.pool_keys()
    scores = []
    for c in range(plan.num_chunks):
        k = np.arange(counts[c])
        rows = reference_rows(int(keys[c // plan.chunks_per_pool]), k ^ plan.offsets[c], plan.draws_per_row,
                              plan.normals)
        dims = plan.perm[plan.bounds[c] : plan.bounds[c + 1]]
        u = rows[:, : len(dims)].astype(np.float64)
        scores.append(log_times[k] - (u * u) @ a[dims] - u @ b[dims])
    return scores


# ------------------------------------------------------------------------------ the normals


def test_draws_are_splitmix64_in_numpy_torch_and_python():
    key = R.stream_key(7, 3, R.POOL_STREAM, 2)
    counters = np.array([0, 1, 2, 1000, 2**40 + 5], dtype=np.uint64)
    z = R.draws_np(key, counters)
    assert [int(v) for v in z] == [R.mix64(key + (int(i) + 1) * R.GAMMA) for i in counters]
    zt = R.draws_torch(torch.tensor(R._signed(key)), torch.from_numpy(counters.astype(np.int64)))
    assert np.array_equal(zt.numpy().view(np.uint64), z)
    assert len({R.stream_key(0, s, w) for s in range(4) for w in range(4)}) == 16
    with pytest.raises(ValueError):
        R.stream_key(0, -1)


def test_box_muller_is_the_same_bits_from_numpy_torch_and_the_c_kernel():
    """2^18 draws and the edge cases (the largest radius, radius 0, each octant's ends): the
    reference, the torch twin and the C kernel (`dc_rcc_box_muller`, serial and over threads)
    agree bit for bit, and stay within 6e-7 of libm's Box-Muller."""
    edges = [0, 2**64 - 1, 0xFFFFFF << 40, 0xFFFFFF] + [o << 21 for o in range(8)] + [(o << 21) - 1 for o in
                                                                                      range(1, 9)]
    z = np.concatenate([np.array(edges, dtype=np.uint64), R.draws_np(R.stream_key(1, 2, 3), np.arange(1 << 18))])
    c, s = R.box_muller_np(z)
    ct, st = R.box_muller_torch(torch.from_numpy(z.view(np.int64)))
    assert np.array_equal(bits(c), bits(ct)) and np.array_equal(bits(s), bits(st))
    if R._use_native():
        for threads in (1, 2):
            cn, sn = R.native_box_muller(z, threads)
            assert np.array_equal(bits(cn), bits(c)) and np.array_equal(bits(sn), bits(s))
    u1 = ((z >> np.uint64(40)).astype(np.float64) + 1) * 2.0**-24
    angle = (z & np.uint64(0xFFFFFF)).astype(np.float64) * (2 * math.pi / 2**24)
    radius = np.sqrt(-2 * np.log(u1))
    assert np.abs(c - radius * np.cos(angle)).max() < 6e-7 and np.abs(s - radius * np.sin(angle)).max() < 6e-7
    assert c.max() == pytest.approx(math.sqrt(48 * math.log(2)), rel=1e-6)


@needs_native
def test_the_c_kernels_constants_and_draws_are_this_modules():
    """csrc/rcc_pool.c writes the format constants as literals: each is the bits of this
    module's (binary32 roundings, SplitMix64's words, the table's field, the row alignment),
    and its draws are `draws_np`'s (counters at 0, large, wrapping)."""
    f, n = R.native_constants()
    assert np.array_equal(bits(f), bits(np.array(R.NATIVE_FLOAT_CONSTANTS, dtype=np.float32)))
    assert [int(v) for v in n] == [int(v) for v in R.NATIVE_INT_CONSTANTS]
    assert R.NATIVE_INT_CONSTANTS[:3] == (R._signed(R.GAMMA), R._signed(R.MIX1), R._signed(R.MIX2))
    assert R.NATIVE_INT_CONSTANTS[3:] == (R.TABLE_BITS, R.TABLE_MASK, R.ROW_ALIGN, R.BM_SQRT2_BITS, -(1 << 31))
    assert R.NATIVE_FLOAT_CONSTANTS == (R.BM_ONE, R.BM_HALF, R.BM_TWO, R.BM_LN2, R.BM_ANGLE, *R.BM_LOG, *R.BM_SIN,
                                        *R.BM_COS)
    counters = np.concatenate([np.array([0, 1, 2**40 + 5, 2**63, 2**64 - 2, 2**64 - 1], dtype=np.uint64),
                               np.arange(1000, dtype=np.uint64) * np.uint64(0x123456789)])
    for key in (0, 2**64 - 1, R.stream_key(7, 3, R.POOL_STREAM, 2)):
        assert np.array_equal(R.native_draws(key, counters), R.draws_np(key, counters))


def test_the_normal_table_is_the_pinned_mid_quantiles_of_a_standard_normal():
    """Version 6's table: the shipped file (SHA-256 pinned), N(0, 1)'s quantiles at (k + 1/2) /
    2^16 within one binary32 ulp of scipy's here (how it was made), exactly antisymmetric,
    increasing, mean 0, variance 0.99998; four 16-bit fields per draw, low bits first."""
    from scipy.special import ndtri

    t = R.normal_table()
    assert t.dtype == np.float32 and t.shape == (1 << 16,) and not t.flags.writeable
    want = ndtri((np.arange(1 << 16) + 0.5) / (1 << 16))
    assert np.all(np.abs(t - want) <= np.spacing(np.abs(want).astype(np.float32)))
    assert np.array_equal(t, -t[::-1]) and np.all(np.diff(t) > 0)
    assert t.astype(np.float64).mean() == 0.0 and t.astype(np.float64).var() == pytest.approx(0.99998, abs=1e-5)
    z = np.array([0x0003_0002_0001_0000, 0xFFFF_8000_7FFF_1234], dtype=np.uint64)
    assert np.array_equal(R.table_normals_np(z), t[[[0, 1, 2, 3], [0x1234, 0x7FFF, 0x8000, 0xFFFF]]])


def test_a_damaged_or_missing_normal_table_is_refused(tmp_path, monkeypatch):
    from diffcodec.errors import DiffcodecError

    bad = tmp_path / "normal_quantiles.f32"
    data = bytearray(R.TABLE_PATH.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    for path, why in ((bad, "damaged"), (tmp_path / "absent.f32", "missing")):
        monkeypatch.setattr(R, "TABLE_PATH", path)
        R.normal_table.cache_clear()
        with pytest.raises(DiffcodecError, match=why):
            R.normal_table()
    monkeypatch.undo()
    R.normal_table.cache_clear()
    assert R.normal_table().shape == (1 << 16,)


def test_table_normals_are_the_same_bits_from_numpy_and_torch():
    """2^18 draws and the edges (every field 0 or 0xFFFF): the reference and the torch twin
    agree bit for bit (the C kernels against the reference: the rows and samples tests
    below, parametrized over both kinds of normals)."""
    z = np.concatenate([np.array([0, 2**64 - 1, 0xFFFF, 0xFFFF << 48], dtype=np.uint64),
                        R.draws_np(R.stream_key(1, 2, 3), np.arange(1 << 18))])
    ref = R.table_normals_np(z)
    assert np.array_equal(bits(R.table_normals_torch(torch.from_numpy(z.view(np.int64)))), bits(ref))


@needs_native
@pytest.mark.parametrize("normals", R.NORMALS)
def test_pool_rows_kernel_serial_parallel_numpy_and_torch_agree(normals):
    """The search's rows (`native_rows`: [u^2; u] columns) on one thread and two: the
    reference's bits, for whole vectors and tails of rows (37: not a multiple of any vector
    width; 300: more than a block of table reads), far rows too; the torch twin's as well."""
    keys = np.array([R.stream_key(0, 1, R.POOL_STREAM, p) for p in range(3)], dtype=np.uint64)
    for h, rows, row0 in ((5, 128, 192), (3, 37, 2**40 + 7), (2, 300, 64)):
        ref = np.stack([reference_rows(int(k), row0 + np.arange(rows), h, normals) for k in keys])  # [P, R, w]
        w = ref.shape[-1]
        for threads in (1, 2):
            buf = R.native_rows(keys, row0, h, rows, normals, threads)
            assert buf.shape == (3, 2 * w, rows)
            assert np.array_equal(bits(buf[:, w:]), bits(ref.transpose(0, 2, 1)))
            assert np.array_equal(bits(buf[:, :w]), bits((ref * ref).transpose(0, 2, 1)))
        twin = R.pool_rows_torch(torch.from_numpy(keys.view(np.int64)), torch.arange(row0, row0 + rows), h, normals)
        assert np.array_equal(bits(twin), bits(ref))


@pytest.mark.parametrize("normals", R.NORMALS)
def test_samples_are_the_same_bits_from_the_kernel_the_reference_and_the_twin(normals, monkeypatch):
    rng = np.random.default_rng(1)
    for num_dims, num_chunks, kappa in [(3072, 40, 12.0), (1000, 7, 3.0), (50, 50, 20.0), (3072, 1, 0.0),
                                        (1001, 7, 3.0), (1002, 7, 3.0), (1003, 7, 3.0)]:
        plan = R.plan_stage(3, 2, rng.permutation(num_dims), num_chunks, kappa, 2.0, 16, normals=normals)
        assert plan.num_candidates == R.stage_candidates(kappa, 2.0, 16)
        assert np.all(plan.offsets % min(R.ROW_ALIGN, plan.num_candidates) == 0)
        assert np.all(plan.offsets < plan.num_candidates)
        indices = rng.integers(0, 1 << 16, num_chunks)
        ref = reference_samples(plan, indices)
        assert np.array_equal(bits(R.samples(plan, indices)), bits(ref))
        assert np.array_equal(bits(R.samples_torch(plan, indices)), bits(ref))
        again = pickle.loads(pickle.dumps(plan))  # what the plan caches (addresses) is not pickled
        assert "_sample_args" in plan.__dict__ or not R._use_native()
        assert "_sample_args" not in again.__dict__ and np.array_equal(bits(R.samples(again, indices)), bits(ref))
        with monkeypatch.context() as m:  # the C kernel over two threads (whatever the size)
            m.setattr(native, "PARALLEL_MIN_WORK", 1)
            torch.set_num_threads(2)
            assert np.array_equal(bits(R.samples(plan, indices)), bits(ref))
            torch.set_num_threads(1)
        with monkeypatch.context() as m:  # without the C library: the torch twin
            m.setattr(R, "_use_native", lambda: False)
            assert np.array_equal(bits(R.samples(plan, indices)), bits(ref))


_CHILD = """
import hashlib, json, numpy as np, torch
torch.set_num_threads(1)
from diffcodec import native
from diffcodec.codec import rcc_pool as R
digests = []
for normals in R.NORMALS:
    rng = np.random.default_rng(1)
    plan = R.plan_stage(3, 2, rng.permutation(3072), 40, 12.0, 2.0, 16, normals=normals)
    digests.append(hashlib.sha256(R.samples(plan, rng.integers(0, 1 << 16, 40)).tobytes()).hexdigest())
print(json.dumps({"native": R._use_native(), "level": native.level("rcc_pool"), "digest": digests}))
"""


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": "1"}, {"DIFFCODEC_NO_NATIVE": "1"},
                                 {"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}])
def test_samples_are_the_same_bits_in_another_process(env):
    """Another process with one OpenMP thread, without the C kernels (the torch twin), or
    with torch's vector units capped at AVX2 or at none (the loader then picks the v3 or the
    base library): the same digests, both kinds of normals."""
    here = []
    for normals in R.NORMALS:
        rng = np.random.default_rng(1)
        plan = R.plan_stage(3, 2, rng.permutation(3072), 40, 12.0, 2.0, 16, normals=normals)
        here.append(hashlib.sha256(R.samples(plan, rng.integers(0, 1 << 16, 40)).tobytes()).hexdigest())
    child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=child_env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["digest"] == here
    assert child["native"] == ("DIFFCODEC_NO_NATIVE" not in env and R._use_native())
    if child["native"] and env.get("ATEN_CPU_CAPABILITY") == "default":
        assert child["level"] == "base"
    elif child["native"] and env.get("ATEN_CPU_CAPABILITY") == "avx2":
        assert child["level"] == ("v3" if native.cpu_level() >= 3 else "base")


@needs_native
@pytest.mark.parametrize("normals", R.NORMALS)
def test_every_library_level_makes_the_same_bits(normals, monkeypatch):
    """Each built level of the rcc_pool library that this CPU runs (AVX-512, AVX2, SSE2: other
    vector widths and gathers), loaded directly: the reference's normals, rows and samples
    and the same search choices as the level `native` picks, bit for bit."""
    z = R.draws_np(R.stream_key(1, 2, 3), np.arange(1 << 12))
    c, s = R.box_muller_np(z)
    keys = np.array([R.stream_key(0, 1, R.POOL_STREAM, p) for p in range(2)], dtype=np.uint64)
    rows = np.stack([reference_rows(int(k), 64 + np.arange(100), 7, normals) for k in keys])
    w = rows.shape[-1]
    rng = np.random.default_rng(4)
    plan = R.plan_stage(3, 2, rng.permutation(1003), 7, 9.0, 2.0, 16, normals=normals)
    indices = rng.integers(0, plan.num_candidates, plan.num_chunks)
    ref = reference_samples(plan, indices)
    gaussians, search = stage_problem(400, 10, 8.0, seed=3, normals=normals)
    a, b = R.log_weight_coefficients(*gaussians)
    chosen = R.select(search, a, b)
    levels = native_levels()
    assert native.level("rcc_pool") in [level for level, _ in levels]
    for level, path in levels:
        kernels = R._Native(ctypes.CDLL(path))
        monkeypatch.setattr(R, "_native", lambda kernels=kernels: kernels)
        for threads in (1, 2):
            cn, sn = R.native_box_muller(z, threads)
            assert np.array_equal(bits(cn), bits(c)) and np.array_equal(bits(sn), bits(s)), level
            buf = R.native_rows(keys, 64, 7, 100, normals, threads)
            assert np.array_equal(bits(buf[:, w:]), bits(rows.transpose(0, 2, 1))), level
            assert np.array_equal(bits(buf[:, :w]), bits((rows * rows).transpose(0, 2, 1))), level
        assert np.array_equal(bits(R.samples(plan, indices)), bits(ref)), level
        assert np.array_equal(R.select(search, a, b), chosen), level


def test_the_avx_libraries_have_no_fused_multiply_add():
    """-ffp-contract=off: no FMA instruction in the v3 / v4 rcc_pool libraries (one would round
    a product and a sum once, other bits than the reference's)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    paths = [p for p in (native._path("rcc_pool", level) for level in ("v4", "v3")) if p is not None]
    if not paths:
        pytest.skip("no AVX rcc_pool library built")
    for path in paths:
        text = subprocess.run([objdump, "-d", path], capture_output=True, text=True, check=True).stdout
        assert "vcvt" in text or "vmul" in text  # a disassembly of vector code
        for fma in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"):
            assert fma not in text, (path, fma)


# ------------------------------------------------------------------------------ the search


def reference_pick(scores, row0, first, stride, offsets, counts, log_times, best_v, best_k):
    """`native_pick`'s rule in numpy: each chunk's (value, k) minimum of log_times[k] -
    scores[p, j, n] over k = (row0 + n) XOR r_c below its count and its previous best
    (float32 differences; ties: the smaller k)."""
    best_v, best_k = best_v.copy(), best_k.copy()
    Q, g, R_ = scores.shape
    for p in range(Q):
        for j in range(g):
            c = first + p * stride + j
            k = (row0 + np.arange(R_)) ^ offsets[c]
            ok = k < counts[c]
            if not ok.any():
                continue
            v = log_times[k[ok]] - scores[p, j][ok]  # float32
            cand_v = np.concatenate([v, [best_v[c]]])
            cand_k = np.concatenate([k[ok], [best_k[c]]])
            vmin = cand_v.min()
            best_v[c], best_k[c] = vmin, cand_k[cand_v == vmin].min()
    return best_v, best_k


@needs_native
def test_the_pick_kernel_is_the_rules_minimum_with_ties_to_the_smaller_index():
    """The C minima (`native_pick`, one thread and two) on scores full of ties (multiples of
    a power of two), counts below, at and above ROW_ALIGN, previous bests that tie, beat or
    lose, short blocks (R = N < ROW_ALIGN): the reference rule's value and index exactly
    (the kernel that it replaced, numba's, gave the same on these, checked once)."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.choice([16, 32, 64, 1024, 4096]))
        rows = min(n, int(rng.choice([64, 256, 1024])))
        row0 = int(rng.integers(0, n // rows)) * rows
        q, g = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        stride = g + int(rng.integers(0, 2))
        first = int(rng.integers(0, 3))
        m = first + (q - 1) * stride + g + int(rng.integers(0, 3))
        align = min(R.ROW_ALIGN, n)
        offsets = (rng.integers(0, n // align, m) * align).astype(np.int64)
        counts = (np.int64(1) << rng.integers(0, int(np.log2(n)) + 2, m)).astype(np.int64)
        quant = float(rng.choice([0.25, 1.0, 4.0]))
        scores = (np.round(rng.normal(size=(q, g, rows)) * 3 / quant) * quant).astype(np.float32)
        log_times = np.zeros(2 * n, np.float32)
        if trial % 2:
            log_times[:] = np.round(rng.normal(size=2 * n) / quant) * quant
        best_v = (np.round(rng.normal(size=m) * 3 / quant) * quant - 3).astype(np.float32)
        best_v[rng.random(m) < 0.3] = np.inf
        best_k = rng.integers(0, 2 * n, m).astype(np.int64)
        want_v, want_k = reference_pick(scores, row0, first, stride, offsets, counts, log_times, best_v, best_k)
        for threads in (1, 2):
            got_v, got_k = best_v.copy(), best_k.copy()
            R.native_pick(scores, row0, first, stride, offsets, counts, log_times, got_v, got_k, threads)
            # values equal as numbers (a minimum 0 may be either zero), indices exactly
            assert np.array_equal(got_v, want_v) and np.array_equal(got_k, want_k), (trial, threads)


@pytest.mark.parametrize("kappa", [3.0, 9.0])
def test_search_picks_the_reference_argmin_on_every_path(kappa, monkeypatch):
    """`select` (C rows, one batched product, C minima; one thread and two: the same choice),
    `select_torch` and the pure torch fallback all pick, for every chunk, an index whose
    float64 score is the reference minimum over k < the chunk's count (up to float32
    rounding), counts chunk by chunk."""
    gaussians, plan = stage_problem(600, 24, kappa, seed=int(kappa))
    counts = R.chunk_counts(chunk_kl_bits(plan, gaussians), 2.0, 16)
    counts[::5] = plan.num_candidates  # some chunks at N, some below or above it
    scores = reference_select(plan, gaussians, counts)
    a, b = R.log_weight_coefficients(*gaussians)
    picks = {"select": R.select(plan, a, b, counts), "torch": R.select_torch(plan, a, b, counts)}
    with monkeypatch.context() as m:
        m.setattr(native, "PARALLEL_MIN_WORK", 1)
        torch.set_num_threads(2)
        assert np.array_equal(R.select(plan, a, b, counts), picks["select"])
        torch.set_num_threads(1)
    monkeypatch.setattr(R, "_use_native", lambda: False)
    picks["fallback"] = R.select(plan, a, b, counts)
    for name, idx in picks.items():
        assert np.all(idx < counts), name
        for c in range(plan.num_chunks):
            assert scores[c][idx[c]] <= scores[c].min() + 1e-4, (name, c)
    assert np.mean(picks["select"] == picks["torch"]) >= 0.9


def test_version_5_caps_a_pool_at_2_to_the_24_normals_and_the_syntax_agrees_with_the_plan():
    """Version 5's N: 2^min(ceil(kappa + pad), L) as version 4's, at most 2^24 / 2h (a stage of
    one 3072-dim chunk: 2^12; of 75 41-dim chunks: 2^16); the decoder's index range
    (`Syntax.index_range`) is the plan's N at every level of a 32x32x3 tile."""
    from diffcodec.codec.progressive.params import ProgressiveParams
    from diffcodec.codec.progressive.syntax import NUM_LEVELS, Syntax

    assert R.stage_candidates(10.0, 8.0, 16) == 1 << 16  # version 4's rule: no cap
    assert R.stage_candidates(10.0, 8.0, 16, R.pool_row_width(3072, 1)) == 1 << 12
    assert R.stage_candidates(10.0, 8.0, 16, R.pool_row_width(3072, 2)) == 1 << 13
    assert R.stage_candidates(13.9, 8.0, 16, R.pool_row_width(3072, 75)) == 1 << 16
    assert R.stage_candidates(1.0, 2.0, 16, R.pool_row_width(3072, 1)) == 1 << 3  # below the cap
    assert R.pool_row_width(3072, 75) == 42 and R.pool_row_width(41, 1) == 42
    perm = np.arange(3072)
    syntax = Syntax(ProgressiveParams(), 3072)
    for level in range(1, NUM_LEVELS, 3):
        n, kappa = syntax.chunking(level)
        plan = R.plan_stage(0, 1, perm, n, kappa, 8.0, 16, cap_pool_normals=True)
        assert plan.num_candidates == syntax.index_range(level)
        assert plan.num_candidates * 2 * plan.draws_per_row <= R.POOL_NORMALS


@pytest.mark.parametrize("normals", R.NORMALS)
@pytest.mark.parametrize("kappa", [3.0, 9.0])
def test_greedy_search_picks_the_largest_log_weight_on_every_path(kappa, normals, monkeypatch):
    """Versions 5 and 6's rule: every path picks, for each chunk, an index below N whose log
    q/p is the reference maximum over the stage's N candidates (up to float32 rounding)."""
    gaussians, plan = stage_problem(600, 24, kappa, seed=7 + int(kappa), normals=normals)
    counts = np.full(plan.num_chunks, plan.num_candidates, dtype=np.int64)
    scores = reference_select(plan, gaussians, counts, "greedy")
    a, b = R.log_weight_coefficients(*gaussians)
    picks = {"select": R.select(plan, a, b, rule="greedy"), "torch": R.select_torch(plan, a, b, rule="greedy")}
    with monkeypatch.context() as m:
        m.setattr(native, "PARALLEL_MIN_WORK", 1)
        torch.set_num_threads(2)
        assert np.array_equal(R.select(plan, a, b, rule="greedy"), picks["select"])
        torch.set_num_threads(1)
    monkeypatch.setattr(R, "_use_native", lambda: False)
    picks["fallback"] = R.select(plan, a, b, rule="greedy")
    pfr = R.select(plan, a, b)
    for name, idx in picks.items():
        assert np.all(idx < plan.num_candidates), name
        for c in range(plan.num_chunks):
            assert scores[c][idx[c]] <= scores[c].min() + 1e-4, (name, c)
    assert np.mean(picks["select"] == picks["torch"]) >= 0.9
    assert np.mean(picks["select"] == pfr) < 0.9  # another rule, other choices (measured 0.2-0.7 of chunks alike)
    with pytest.raises(ValueError, match="unknown selection rule"):
        R.select(plan, a, b, rule="best")


@pytest.mark.parametrize("normals", R.NORMALS)
@pytest.mark.parametrize("block", [None, 1 << 14])
def test_search_blocks_of_several_pools_and_a_short_last_pool(block, normals, monkeypatch):
    """N = 2^10 (G = 4 chunks a pool), 10 chunks: pools of 4, 4 and 2, in one block of rows
    and several pools (the default block) or 8 blocks of 128 rows, a pool each (a 2^14-element
    block); the C search and the torch one choose alike (up to near ties) and each choice
    is the reference argmin."""
    if block is not None:
        monkeypatch.setattr(R, "SEARCH_BLOCK_ELEMENTS", block)
    gaussians, plan = stage_problem(400, 10, 8.0, seed=3, normals=normals)
    rows, pools = R._blocking(plan.row_width, plan.chunks_per_pool, plan.num_candidates, plan.num_pools)
    assert (rows, pools) == ((1024, 3) if block is None else (128, 1))
    assert (plan.num_candidates, plan.chunks_per_pool, plan.num_pools) == (1024, 4, 3)
    a, b = R.log_weight_coefficients(*gaussians)
    counts = np.full(plan.num_chunks, plan.num_candidates, dtype=np.int64)
    scores = reference_select(plan, gaussians, counts)
    idx = R.select(plan, a, b)
    for c in range(plan.num_chunks):
        assert scores[c][idx[c]] <= scores[c].min() + 1e-4
    assert np.mean(idx == R.select_torch(plan, a, b)) >= 0.9
    with pytest.raises(ValueError):
        R.select(plan, a, b, np.full(plan.num_chunks, 3))  # counts are powers of two


def test_sent_samples_deliver_about_the_stage_kl():
    """The PFR choice is a sample of about q: its log q/p (what the stage delivers) is the KL
    on average where the candidates suffice; at 2^ceil(KL_c + 2) candidates per chunk it falls
    short by as much in version 4 as in version 3 (`rcc`: each chunk its own candidates).
    Four stages of 64 chunks of 6 bits each."""
    delivered, total = {3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0}, 0.0
    for seed in range(4):
        gaussians, plan = stage_problem(64 * 20, 64, 6.0, seed=seed)
        kl = chunk_kl_bits(plan, gaussians)
        counts = R.chunk_counts(kl, 2.0, 16)
        lw = rcc.LogWeight.of_gaussians(*gaussians)
        u = R.samples(plan, R.select(plan, *R.log_weight_coefficients(*gaussians), counts))
        delivered[4] += float(lw(u[None].astype(np.float64))[0]) / math.log(2)
        greedy = R.samples(plan, R.select(plan, *R.log_weight_coefficients(*gaussians), rule="greedy"))
        delivered[5] += float(lw(greedy[None].astype(np.float64))[0]) / math.log(2)
        table = dataclasses.replace(plan, normals="table")  # version 6: the same choice, table normals
        greedy = R.samples(table, R.select(table, *R.log_weight_coefficients(*gaussians), rule="greedy"))
        delivered[6] += float(lw(greedy[None].astype(np.float64))[0]) / math.log(2)
        chunks = np.split(plan.perm, plan.bounds[1:-1])
        tasks = [(rcc.LogWeight.of_gaussians(*(g[d] for g in gaussians)), (4, seed, 1 + c), int(counts[c]))
                 for c, d in enumerate(chunks)]
        found = rcc.pfr_select_many(tasks)
        u3 = np.empty_like(u)
        for d, sample in zip(chunks, rcc.pfr_decode_many([(t[1], i, len(d)) for t, i, d in zip(tasks, found, chunks)])):
            u3[d] = sample
        delivered[3] += float(lw(u3[None].astype(np.float64))[0]) / math.log(2)
        total += float(kl.sum())
    # measured: version 3 0.74, version 4 0.86 of the KL (a spread of a few bits per chunk)
    assert 0.6 * total < delivered[4] < 1.1 * total, (delivered, total)
    assert delivered[4] > delivered[3] - 0.1 * total, (delivered, total)
    # version 5's greedy choice among the stage's N (2^ceil(6 + 2) = 256 here) delivers more
    # (measured: 0.97 of the KL, version 4 0.86)
    assert delivered[5] > max(0.9 * total, delivered[4] + 0.05 * total), (delivered, total)
    # version 6's table normals as well as Box-Muller's (measured: 0.97 of the KL both)
    assert abs(delivered[6] - delivered[5]) < 0.03 * total, (delivered, total)


# ------------------------------------------------------------------------------ streams


def test_versions_3_to_6_round_trip_and_version_6_is_the_default():
    """A tiny model's stream in each version decodes bit for bit (its prefixes too); the
    versions draw or choose other candidates, so their payloads differ. Versions 5 and 6's
    chunk indices are uniform on [0, N): log2 N bits each, whatever was chosen."""
    from diffcodec.codec.progressive import codec as pg
    from diffcodec.codec.progressive.params import ProgressiveParams
    from diffcodec.images import to_model_input
    from test_codec_progressive import denoiser, seeded_tiny, test_image

    assert ProgressiveParams().version == 6 and ProgressiveParams().pack()[0] == 6
    model, dc = seeded_tiny(0)
    fn = denoiser(model)
    x0 = to_model_input(test_image(1, seed=2))
    params = ProgressiveParams(num_steps=4, log2_candidates=12, chunk_bits=6.0, pad_bits=3.0, seed=5, num_tiles=1,
                               tile_size=16)
    payloads = {}
    for version in (3, 4, 5, 6):  # versions 5 and 6 at their default pad: every chunk's N at the cap, 2^12
        p = dataclasses.replace(params, version=version, pad_bits=8.0 if version >= 5 else params.pad_bits)
        enc = pg.encode(fn, dc, x0, p)
        back = ProgressiveParams.unpack(enc.params.pack(), num_tiles=1, tile_size=16)
        assert back.version == version
        dec = pg.decode(fn, dc, enc.payload, back)
        assert dec.complete and torch.equal(dec.x0, x0)
        for stages in range(1, p.num_stages):
            part = pg.decode(fn, dc, enc.payload, back, num_bits=int(enc.prefix_bits[stages - 1]))
            assert part.stages >= stages
        payloads[version] = enc.payload
        # what the sent latents deliver tracks the KL (stage 0 is free in every version); greedy more
        if version < 5:
            assert enc.sample_bits[1:].sum() == pytest.approx(enc.kl_bits[1:-1].sum(), rel=0.25)
        else:
            assert enc.sample_bits[1:].sum() > enc.kl_bits[1:-1].sum()
    assert len(set(payloads.values())) == 4
