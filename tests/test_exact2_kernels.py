"""exact2_kernels: contract 2's kernels, each numba kernel against its torch twin, bit for bit.

The numba kernels run on the CPU, the torch twins on a GPU (and on a CPU without numba): a
file encoded on one must decode on the other, so every kernel is checked against its twin
on random and edge inputs (zeros, constants, huge and tiny magnitudes, values at the
clamps). Also: SiLU's scalar port equals `exact.silu`, the int8 parts recombine to the
integers and stay in [-64, 63], the int8 products are exact at the parts' extremes under
every oneDNN ISA (subprocesses), and no kernel's machine code holds a fused multiply-add.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec import exact
from diffcodec import exact2_kernels as K

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not K.numba_available(), reason="numba is not installed: only the twins run")]


@pytest.fixture
def twin(monkeypatch):
    """Call ``fn(*args)`` once with numba and once with the torch twins; return both results."""
    def run(fn, *args):
        fast = fn(*args)
        monkeypatch.setenv("DIFFCODEC_NO_NUMBA", "1")
        slow = fn(*args)
        monkeypatch.delenv("DIFFCODEC_NO_NUMBA")
        return fast, slow
    return run


def _same(a, b) -> None:
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
        return
    if not isinstance(a, torch.Tensor):
        assert a == b
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b) if not a.is_floating_point() else np.array_equal(a.numpy(), b.numpy(), equal_nan=True)


def _activations(b: int, p: int, c: int, seed: int) -> torch.Tensor:
    """float32 [B, P, C]: per image a different scale (1, 0, 1e4, 1e-6, 3, constant), an offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, c, generator=g) + 0.2
    scales = torch.tensor([1.0, 0.0, 1e4, 1e-6, 3.0, 1.0])[:b]
    x = x * scales.repeat(b // len(scales) + 1)[:b, None, None]
    if b > 5:
        x[5] = -2.5
    return x.contiguous()


def test_silu_port_equals_exact_silu_bit_for_bit():
    y = torch.cat([torch.linspace(-800.0, 800.0, 20001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-300, -1e-300, 700.0, -700.0, 709.0, -745.0, K.SILU_ARGMIN, 1e308,
                                 -1e308], dtype=torch.float64),
                   torch.randn(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 7])
    port = K.numba.njit(lambda v: np.array([K._silu64(e) for e in v]))
    assert np.array_equal(port(y.numpy()), exact.silu(y).numpy())


@pytest.mark.parametrize("form", [K.PARTS, K.VALUES])
def test_quantize_equals_its_twin(twin, form):
    for dtype in (torch.float32, torch.float64):
        x = _activations(6, 37, 13, seed=2).to(dtype)
        r, _ = K.inverse_scales(K.absmax(x))
        r[0] *= 1.5  # some values beyond QMAX: the clamp
        _same(*twin(K.quantize, x, r, form))


def test_absmax_group_stats_and_norm_plan_equal_their_twins(twin):
    x = _activations(6, 64, 12, seed=3)
    _same(*twin(K.absmax, x))
    _same(*twin(K.group_stats, x, exact.pow2(torch.tensor([3, -4, 20, 10, 0, 7]))))
    g = torch.Generator().manual_seed(4)
    weight = 1.0 + 0.3 * torch.randn(12, generator=g, dtype=torch.float64)
    weight[0] = -0.7  # a negative gamma: y decreasing in x
    bias = 0.2 * torch.randn(12, generator=g, dtype=torch.float64)
    scale, shift = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    for silu in (True, False):
        _same(*twin(K.norm_plan, x, 4, weight, bias, 1e-5, silu))
        _same(*twin(K.norm_plan, x, 3, weight, bias, 1e-6, silu, scale, shift))


@pytest.mark.parametrize("form", [K.PARTS, K.VALUES])
@pytest.mark.parametrize("silu", [True, False])
def test_norm_act_equals_its_twin(twin, form, silu):
    x = _activations(6, 50, 8, seed=5)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(6, 8, generator=g, dtype=torch.float64) * 3
    c = torch.randn(6, 8, generator=g, dtype=torch.float64)
    r = torch.tensor([500.0, 0.0, 0.25, 1e9, 3000.0, 77.0], dtype=torch.float64)
    _same(*twin(K.norm_act, x, a, c, silu, r, form))


@pytest.mark.parametrize("case", [
    (2, 8, 8, 16, 3, 1, (1, 1, 1, 1), 1), (3, 8, 6, 4, 3, 2, (1, 1, 1, 1), 1), (2, 8, 8, 8, 3, 2, (0, 0, 1, 1), 1),
    (2, 4, 4, 3, 3, 1, (1, 1, 1, 1), 2), (1, 5, 7, 2, 1, 1, (0, 0, 0, 0), 1), (2, 4, 6, 12, 3, 1, (1, 1, 1, 1), 2)])
def test_im2col_equals_its_twin_for_parts_and_values(twin, case):
    b, h, w, c, k, stride, pads, up = case
    parts = torch.randint(-64, 64, (2, b, h, w, c), dtype=torch.int8, generator=torch.Generator().manual_seed(7))
    _same(*twin(K.im2col, parts, k, stride, pads, up))
    values = parts[0].to(torch.float64) * K.PART_SCALE + parts[1].to(torch.float64)  # the same integers
    cols, out_h, out_w = K.im2col(values, k, stride, pads, up)
    part_cols = K.im2col(parts, k, stride, pads, up)[0].view(2, -1, k * k * c).to(torch.float64)
    assert cols.shape == (b * out_h * out_w, k * k * c)
    assert torch.equal(cols, part_cols[0] * K.PART_SCALE + part_cols[1])


def test_split_weights_recombine_to_the_integers_within_the_safe_range():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 300, generator=g)
    w[3] = 0.0  # an all-zero row: scale 0
    w[5, 7] = 1e6  # one huge weight
    parts, values, scale = K.split_weights(w)
    assert parts.dtype == torch.int8 and parts.shape == (300, 80)
    assert int(parts.min()) >= -64 and int(parts.max()) <= 63
    ints = parts[:, :40].to(torch.int64) * K.PART_SCALE + parts[:, 40:].to(torch.int64)
    assert torch.equal(ints.to(torch.float64), values)
    assert int(values.abs().max()) == K.QMAX and torch.all(values[:, 3] == 0) and scale[3] == 0
    assert torch.all(values.abs().amax(dim=0)[scale > 0] == K.QMAX)  # each row's max reaches QMAX


@pytest.mark.parametrize("parts", [True, False])
@pytest.mark.parametrize("mode", ["plain", "add", "residual", "float64"])
def test_epilogue_equals_its_twin(twin, parts, mode):
    g = torch.Generator().manual_seed(10)
    m, n, pixels = 24, 7, 6
    cols = torch.randint(-64, 64, (2 * m, 50), dtype=torch.int8, generator=g)
    w_parts = torch.randint(-64, 64, (50, 2 * n), dtype=torch.int8, generator=g)
    G = torch._int_mm(cols, w_parts)
    if not parts:  # the same dot products as binary64 values
        hi, lo = cols[:m].to(torch.float64), cols[m:].to(torch.float64)
        wv = w_parts[:, :n].to(torch.float64) * 128 + w_parts[:, n:].to(torch.float64)
        G = (hi * 128 + lo) @ wv
    S = torch.rand(m // pixels, n, generator=g, dtype=torch.float64) * 1e-5
    bias = torch.randn(n, generator=g)
    kwargs = {"add": {"add": torch.randn(m // pixels, n, generator=g)},
              "residual": {"residual": torch.randn(m, n, generator=g)},
              "float64": {"float64": True}, "plain": {}}[mode]
    if mode == "float64":
        bias = bias.to(torch.float64)
    _same(*twin(lambda *a: K.epilogue(*a, **kwargs), G, parts, pixels, S, bias))


def test_softmax_weights_equal_their_twin(twin):
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(-2**30, 2**30, (12, 33), generator=g).to(torch.float64)
    c = torch.tensor([1e-9, 1e-7, 3e-8, 0.0, 1.0, 1e-6] * 2, dtype=torch.float64)
    fast, slow = twin(lambda s: K.softmax_weights(s.clone(), c, 24), scores)
    _same(fast, slow)
    assert torch.all(fast[0].amax(dim=1) == 2**24) and torch.all(fast[1] == fast[0].sum(dim=1))


_PRODUCT_SCRIPT = r"""
import json, torch
torch.manual_seed(0)
ok = True
for m, k, n in [(1, 7, 5), (33, 576, 128), (40, 2304, 24), (17, 4608, 8)]:
    for lo, hi in [(-64, 64), (63, 64), (-64, -63)]:
        a = torch.randint(lo, hi, (m, k), dtype=torch.int8)
        for b in (torch.randint(-64, 64, (n, k), dtype=torch.int8).T, torch.full((k, n), lo, dtype=torch.int8),
                  torch.full((k, n), -64 if lo > 0 else 63, dtype=torch.int8)):
            exact = a.to(torch.float64) @ b.to(torch.float64)
            ok &= torch.equal(torch._int_mm(a, b).to(torch.float64), exact)
print(json.dumps({"exact": bool(ok)}))
"""


@pytest.mark.slow
def test_int8_products_are_exact_at_the_parts_extremes_under_every_onednn_isa():
    """Operands at -64 and 63 (and random in [-64, 63]), fan-ins up to 4608: torch._int_mm
    equals the exact product with oneDNN capped at SSE4.1, AVX2 and AVX-512 without VNNI
    (kernels that add u8 x s8 pairs in int16 with saturation) and uncapped. (Measured here:
    operands at +-127 do saturate under those caps; the range is what makes them exact.)"""
    procs = []
    for isa in ("SSE41", "AVX2", "AVX512_CORE", None):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        procs.append((isa, subprocess.Popen([sys.executable, "-c", _PRODUCT_SCRIPT], env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for isa, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert '"exact": true' in out, (isa, out)


def test_no_kernel_is_compiled_with_a_fused_multiply_add():
    """numba compiles without fast-math, so LLVM may not contract a * b + c: checked in the
    machine code of a fresh (uncached, inspectable) compilation of every kernel on this CPU."""
    b, p, c = 2, 40, 8
    x = np.random.default_rng(0).standard_normal((b, p, c)).astype(np.float32)
    a2, c2, r = np.ones((b, c)), np.zeros((b, c)), np.ones(b)
    parts, values = np.zeros((2, b, p, c), np.int8), np.zeros((b, p, c))
    s1 = np.zeros((b, c), np.int64)
    G = np.zeros((4, 6), np.int32)
    calls = [
        (K._norm_silu_parts_nb, (x, a2, c2, r, parts, 2)), (K._norm_values_nb, (x, a2, c2, r, values, 2)),
        (K._quantize_parts_nb, (x, r, parts, 2)), (K._group_stats_nb, (x, r, 2)),
        (K._norm_coefficients_nb, (s1, s1, x[:, 0], x[:, 0], np.zeros(b, np.int64), 80, 2, np.ones(c), np.ones(c),
                                   1e-5, x[:, 0], x[:, 0], True, True)),
        (K._epilogue_parts_nb, (G, 1, np.ones((2, 3)), np.ones(3, np.float32), np.ones((2, 3), np.float32),
                                np.ones((2, 3), np.float32), 1, np.zeros((2, 3), np.float32))),
        (K._epilogue64_parts_nb, (G, 1, np.ones((2, 3)), np.ones(3), np.zeros((2, 3)))),
        (K._softmax_weights_nb, (np.zeros((3, 5)), np.ones(3), 2.0**20)),
    ]
    for kernel, args in calls:
        fresh = K.numba.njit(kernel.py_func, error_model="numpy")
        fresh(*args)
        asm = "\n".join(fresh.inspect_asm().values())
        assert asm, kernel
        assert not re.search(r"\bv?f(n)?m(add|sub)", asm), f"{kernel.__name__} has a fused multiply-add"
