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
        monkeypatch.setattr(K, "NUMBA_ON", False)
        slow = fn(*args)
        monkeypatch.setattr(K, "NUMBA_ON", True)
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


def test_silu_ports_equal_their_torch_functions_bit_for_bit():
    """The binary64 SiLU (the softmax's exponential is the same code) equals `exact.silu`; the
    binary32 SiLU of GroupNorm's kernels equals `silu32`, and stays within 2 binary32 ulps of
    libm's y sigmoid(y) where it is not tiny."""
    y = torch.cat([torch.linspace(-800.0, 800.0, 20001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-300, -1e-300, 700.0, -700.0, 709.0, -745.0, K.SILU_ARGMIN, 1e308,
                                 -1e308, 87.0, -87.0, 88.5, -88.5], dtype=torch.float64),
                   torch.randn(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 7])
    port64 = K.numba.njit(lambda v: np.array([K._silu64(e) for e in v]))
    assert np.array_equal(port64(y.numpy()), exact.silu(y).numpy())
    assert torch.equal(K.silu64(y.view(2, -1)), exact.silu(y).view(2, -1))  # the kernel the network calls
    y32 = y.clamp(-3e38, 3e38).to(torch.float32)
    port32 = K.numba.njit(lambda v: np.array([K._silu32(e) for e in v], dtype=np.float32))
    got = port32(y32.numpy())
    assert np.array_equal(got, K.silu32(y32).numpy())
    want = (y32.double() * torch.sigmoid(y32.double())).numpy()
    ordinary = np.abs(want) > 1e-30
    assert np.all(np.abs(got[ordinary] - want[ordinary]) <= 2 * np.spacing(np.abs(want[ordinary]).astype(np.float32)))


def test_quantize_heads_equals_its_twin_and_quantize_dynamic_per_part(twin):
    """Attention's fused q/k/v quantization = its torch twin = `quantize_dynamic` (VALUES) of
    each part laid out [B, heads tokens, d], including an all-zero part and a huge one."""
    b, tokens, heads, d = 3, 17, 2, 5
    qkv = torch.randn(b, tokens, 3, heads, d, generator=torch.Generator().manual_seed(4))
    qkv[1, :, 0] = 0.0
    qkv[2, :, 2] *= 1e30
    fast, slow = twin(K.quantize_heads, qkv)
    _same(fast, slow)
    for i in range(3):
        values, s = K.quantize_dynamic(qkv[:, :, i].permute(0, 2, 1, 3).reshape(b, heads * tokens, d), K.VALUES)
        _same((fast[0][i], fast[1][i]), (values.view(b, heads, tokens, d), s))
    assert torch.all(fast[0][0, 1] == 0) and fast[1][0, 1] == 0


@pytest.mark.parametrize("form", [K.STACKED, K.VALUES])
def test_quantize_equals_its_twin(twin, form):
    for dtype in (torch.float32, torch.float64):
        x = _activations(6, 37, 13, seed=2).to(dtype)
        r, _ = K.inverse_scales(K.absmax(x))
        r[0] *= 1.5  # some values beyond QMAX: the clamp
        _same(*twin(K.quantize, x, r, form))
        _same(*twin(K.quantize_dynamic, x, form))


def test_the_stacked_form_holds_the_integers_in_the_parts_ranges():
    x = _activations(6, 37, 13, seed=2)
    stacked, s = K.quantize_dynamic(x, K.STACKED)
    values, s2 = K.quantize_dynamic(x, K.VALUES)
    assert torch.equal(s, s2) and stacked.dtype == torch.uint8 and stacked.shape == (6, 37, 26)
    hi, lo = stacked[..., :13].to(torch.int64) - K.ZERO_POINT, stacked[..., 13:].to(torch.int64) - K.ZERO_POINT
    assert int(hi.min()) >= -63 and int(hi.max()) <= 63 and int(lo.min()) >= -64 and int(lo.max()) <= 63
    assert torch.equal((hi * K.PART_SCALE + lo).to(torch.float64), values)
    assert int(values.abs().max()) == K.QMAX


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


@pytest.mark.parametrize("form", [K.STACKED, K.VALUES])
@pytest.mark.parametrize("silu", [True, False])
def test_norm_act_and_the_fused_group_norm_equal_their_twins(twin, form, silu):
    x = _activations(6, 50, 8, seed=5)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(6, 8, generator=g) * 3
    c = torch.randn(6, 8, generator=g)
    r = torch.tensor([500.0, 0.0, 0.25, 1e9, 3000.0, 77.0], dtype=torch.float32)
    _same(*twin(K.norm_act, x, a, c, silu, r, form))
    weight = 1.0 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64)
    bias = 0.2 * torch.randn(8, generator=g, dtype=torch.float64)
    _same(*twin(K.group_norm_operand, x, 4, weight, bias, 1e-5, silu, form))
    scale, shift = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    _same(*twin(K.group_norm_operand, x, 2, weight, bias, 1e-6, silu, form, scale, shift))


@pytest.mark.parametrize("case", [(2, 8, 8, 5, 3, 1, (1, 1, 1, 1)), (3, 8, 6, 4, 3, 2, (1, 1, 1, 1)),
                                  (2, 8, 8, 4, 3, 2, (0, 0, 1, 1)), (1, 5, 7, 2, 1, 1, (0, 0, 0, 0))])
def test_im2col_is_the_convolution_s_column_matrix(case):
    from diffcodec.exact2_products import im2col

    b, h, w, c, k, stride, pads = case
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-K.QMAX, K.QMAX + 1, (b, h, w, c), generator=g).to(torch.float64)
    weight = torch.randint(-K.QMAX, K.QMAX + 1, (3, c, k, k), generator=g).to(torch.float64)
    cols = im2col(x, k, stride, pads)
    got = cols @ weight.permute(0, 2, 3, 1).reshape(3, -1).T
    top, left, bottom, right = pads
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom)),
                                      weight, stride=stride)
    assert torch.equal(got, want.permute(0, 2, 3, 1).reshape(-1, 3))


def test_int_weights_parts_blocks_and_values():
    from diffcodec.exact2_products import TWO_BLOCK_MAX_FAN_IN, WMAX, IntWeights

    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 30, 3, 3, generator=g)
    w[3] = 0.0  # an all-zero output channel: scale 0
    w[5, 7, 1, 1] = 1e6  # one huge weight
    iw = IntWeights(w)
    ints = iw.ints
    assert ints.shape == (40, 270) and int(ints.abs().max()) == WMAX and torch.all(ints[3] == 0) and iw.scale[3] == 0
    assert torch.all(ints.abs().amax(dim=1)[iw.scale > 0] == WMAX)  # each channel's max reaches WMAX
    assert int(iw.hi.min()) >= -63 and int(iw.hi.max()) <= 63 and int(iw.lo.min()) >= -4 and int(iw.lo.max()) <= 3
    assert torch.equal(iw.values, torch.cat([ints, -iw.lo.to(torch.int64)], 1).T.to(torch.float64))
    blocks, nb = iw.blocks(270)
    assert nb == 2 and blocks.shape == (80, 60, 3, 3) and int(blocks.min()) >= -64 and int(blocks.max()) <= 63
    hi = iw.hi.view(40, 3, 3, 30).permute(0, 3, 1, 2)
    assert torch.equal(blocks[:40, :30], hi) and not blocks[:40, 30:].any()  # (w_hi | 0)
    lo16 = 16 * iw.lo.view(40, 3, 3, 30).permute(0, 3, 1, 2)
    assert torch.equal(blocks[40:, 30:], hi) and torch.equal(blocks[40:, :30], lo16)  # (16 w_lo | w_hi)
    assert iw.blocks(TWO_BLOCK_MAX_FAN_IN + 1)[1] == 3


@pytest.mark.parametrize("blocks", [0, 2, 3])
@pytest.mark.parametrize("mode", ["plain", "add", "residual", "float64"])
def test_epilogue_equals_its_twin_and_combines_the_blocks(twin, blocks, mode):
    g = torch.Generator().manual_seed(10)
    m, n, pixels = 24, 7, 6
    parts = [torch.randint(-2**23, 2**23, (m, n), generator=g).to(torch.float64) for _ in range(3)]
    v = parts[0] * 1024 + (parts[1] + (parts[2] if blocks == 3 else 0)) * 8  # the sums the blocks stand for
    G = torch.cat(parts[:blocks], dim=1).to(torch.float32) if blocks else v
    s_x = torch.rand(m // pixels, generator=g, dtype=torch.float64) * 1e-3
    s_w = torch.rand(n, generator=g, dtype=torch.float64) * 1e-3
    bias = torch.randn(n, generator=g)
    kwargs = {"add": {"add": torch.randn(m // pixels, n, generator=g)},
              "residual": {"residual": torch.randn(m, n, generator=g)},
              "float64": {"float64": True}, "plain": {}}[mode]
    if mode == "float64":
        bias = bias.to(torch.float64)
    fast, slow = twin(lambda *a: K.epilogue(*a, **kwargs), G, blocks, pixels, s_x, s_w, bias)
    _same(fast, slow)
    if blocks:  # the same output as from the sums themselves
        _same(fast, K.epilogue(v, 0, pixels, s_x, s_w, bias, **kwargs))


def test_softmax_weights_equal_their_twin(twin):
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(-2**30, 2**30, (12, 33), generator=g).to(torch.float64)
    c = torch.tensor([1e-9, 1e-7, 3e-8, 0.0, 1.0, 1e-6] * 2, dtype=torch.float64)
    fast, slow = twin(lambda s: K.softmax_weights(s.clone(), c, 24), scores)
    _same(fast, slow)
    assert torch.all(fast[0].amax(dim=1) == 2**24) and torch.all(fast[1] == fast[0].sum(dim=1))


_PRODUCT_SCRIPT = r"""
import json, torch
from diffcodec import exact2_kernels as K
from diffcodec.exact2_products import IntConv, qconv_verified
torch.manual_seed(0)
ok = qconv_verified()
for c, n, size, k, stride, pads, up in [(16, 8, 6, 3, 1, (1, 1, 1, 1), 1), (24, 5, 8, 3, 2, (0, 0, 1, 1), 1),
                                        (32, 12, 4, 3, 1, (1, 1, 1, 1), 2), (448, 4, 3, 3, 1, (1, 1, 1, 1), 1),
                                        (40, 24, 5, 1, 1, (0, 0, 0, 0), 1), (3, 8, 6, 3, 1, (1, 1, 1, 1), 1),
                                        (256, 40, 1, 1, 1, (0, 0, 0, 0), 1)]:
    conv = torch.nn.Conv2d(c, n, k, stride=stride)
    with torch.no_grad():  # half the weights at +-max (their integers +-QMAX), the rest random
        conv.weight.copy_(torch.where(torch.rand(conv.weight.shape) < 0.5, torch.sign(torch.randn(conv.weight.shape)),
                                      torch.rand(conv.weight.shape) * 2 - 1))
    layer = IntConv(conv, pads)
    for case in range(2):
        x = torch.randn(3, size, size, c) if case else torch.sign(torch.randn(3, size, size, c))
        x[0] = 5.0  # every integer +QMAX
        stacked, _ = K.quantize_dynamic(x.reshape(3, -1, c), K.STACKED)
        values, _ = K.quantize_dynamic(x.reshape(3, -1, c), K.VALUES)
        G, h, w, blocks = layer.products(stacked.view(3, size, size, -1), up)
        V, h2, w2, none = layer.products(values.view(3, size, size, -1), up)
        ok &= blocks in (2, 3) and none == 0
        ok &= (h, w) == (h2, w2) and torch.equal(K._sums_torch(G, blocks), V)
print(json.dumps({"exact": bool(ok), "verified": qconv_verified()}))
"""


@pytest.mark.slow
def test_int8_convolutions_give_the_exact_products_under_every_onednn_isa():
    """oneDNN's int8 convolution (the STACKED products, two or three blocks) gives the same
    sums as the binary64 product of the same integers, for 3x3 (strides 1 and 2, 'end'
    padding, upsampled input, 3 input channels), 1x1 (also on one pixel: a linear layer) and
    a fan-in of 4032 (three blocks), on saturated and
    random operands, with oneDNN capped at SSE4.1, AVX2 and AVX-512 without VNNI (kernels
    that add u8 x s8 pairs in int16 with saturation) and uncapped; `qconv_verified` passes
    under each."""
    procs = []
    for isa in ("SSE41", "AVX2", "AVX512_CORE", None):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        env["PYTHONPATH"] = str(REPO)
        procs.append((isa, subprocess.Popen([sys.executable, "-c", _PRODUCT_SCRIPT], env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for isa, proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert '"exact": true' in out and '"verified": true' in out, (isa, out)


def test_no_kernel_is_compiled_with_a_fused_multiply_add():
    """numba compiles without fast-math, so LLVM may not contract a * b + c: after a forward
    of a small network (every kernel and form runs), each kernel body is compiled afresh
    (uncached, so its machine code can be read) for every signature it ran with, and no
    fused multiply-add instruction appears."""
    from tests.test_exact_net2 import VARIANT, random_inputs, random_model
    from diffcodec.exact_net2 import exact_network2

    x, t = random_inputs(VARIANT, 2)
    with torch.no_grad():
        exact_network2(random_model(VARIANT))(x, t)
    # every kernel with floating-point arithmetic (the rest move or compare values); the group
    # norm holds the statistics, the coefficients, the bound and both activations' loops
    kernels = [K._group_norm_nb[True, K.STACKED], K._group_norm_nb[False, K.VALUES], K._quantize_dynamic_nb[K.STACKED],
               K._epilogue_stacked_nb[2], K._epilogue_values_nb, K._epilogue64_stacked_nb[2], K._softmax_weights_nb,
               K._silu64_nb, K._quantize_heads_nb]
    for kernel in kernels:
        sigs = set(kernel.serial.signatures) | set(kernel.parallel.signatures)
        assert sigs, kernel.py_func.__name__
        fresh = K.numba.njit(kernel.py_func, error_model="numpy")
        sig = sorted(sigs, key=str)[0]
        fresh.compile(sig)
        asm = fresh.inspect_asm(sig)
        assert "mul" in asm and not re.search(r"\bv?f(n)?m(add|sub)", asm), f"{kernel.py_func.__name__}: an FMA"


def test_every_kernel_closes_over_constants_only_so_numba_s_cache_finds_it():
    """numba keys a cached closure by its pickled cell contents; a compiled function pickles
    differently in every process, so a kernel closing over one is recompiled in each process
    (tens of seconds before the first exact call). Every compiled kernel here closes over
    plain constants, and each one's cache key is the same when computed twice."""
    kernels = [v for v in vars(K).values() if isinstance(v, K._Kernel)]
    kernels += [k for v in vars(K).values() if isinstance(v, dict) for k in v.values() if isinstance(k, K._Kernel)]
    assert len(kernels) >= 15
    for kernel in kernels:
        for cell in kernel.py_func.__closure__ or ():
            assert isinstance(cell.cell_contents, (bool, int, str)), (kernel.py_func.__qualname__, cell.cell_contents)


def test_every_cached_kernel_reads_and_writes_numba_s_cache_under_the_inter_process_lock():
    """Two processes compiling the same kernel at once (two ranks on a fresh install) can race
    in numba's cache files (data file numbers taken from an index each read alone). Every
    cached dispatcher's load and save go through `_locked_cache`, and a load leaves the lock
    file in the cache folder."""
    kernels = [v for v in vars(K).values() if isinstance(v, K._Kernel)]
    kernels += [k for v in vars(K).values() if isinstance(v, dict) for k in v.values() if isinstance(k, K._Kernel)]
    for dispatcher in [d for k in kernels for d in (k.serial, k.parallel)] + [K._norm_coefficients_nb]:
        for name in ("load_overload", "save_overload"):
            assert getattr(dispatcher._cache, name).__qualname__.endswith("locked.<locals>.call"), name
    x = np.ones((2, 3, 4), np.float32)
    K._absmax_nb.serial(x, 1)
    assert (Path(K._absmax_nb.serial._cache._cache_path) / "diffcodec-numba.lock").is_file()
