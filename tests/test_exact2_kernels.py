"""exact2_kernels: contract 2's kernels, each C kernel against its torch twin, bit for bit.

The C kernels (diffcodec/csrc/exact2.c) run on the CPU, the torch twins on a GPU (and on a CPU
without the compiled library): a file encoded on one must decode on the other, so every
kernel is checked against its twin on random and edge inputs (zeros, constants, huge and tiny
magnitudes, values at the clamps), on one thread and on two. Also: the C SiLUs equal
`exact.silu` and `silu32`, the C constants equal the Python ones, every instruction-set level
of the library computes the same bits, no level's machine code holds a fused multiply-add,
the int8 parts recombine to the integers and stay in [-64, 63], and the int8 products are
exact at the parts' extremes under every oneDNN ISA (subprocesses).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec import exact, native
from diffcodec import exact2_kernels as K

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not K.NATIVE_ON, reason="the C kernels are not built here: only the twins run")]


@pytest.fixture
def twin(monkeypatch):
    """Call ``fn(*args)`` with the C kernels on one thread and on two (every kernel threaded,
    however small), then with the torch twins; check both C results equal and return (C,
    twin)."""
    def run(fn, *args):
        monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 1 << 62)
        serial = fn(*args)
        monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(native, "_threads", 2)
        threaded = fn(*args)
        _same(serial, threaded)
        monkeypatch.setattr(K, "NATIVE_ON", False)
        slow = fn(*args)
        monkeypatch.setattr(K, "NATIVE_ON", True)
        return serial, slow
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


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits (NaN payloads and signed zeros included)."""
    view = {torch.float64: np.int64, torch.float32: np.int32}[a.dtype]
    return a.dtype == b.dtype and np.array_equal(a.contiguous().numpy().view(view), b.contiguous().numpy().view(view))


def _silu_inputs() -> torch.Tensor:
    return torch.cat([torch.linspace(-800.0, 800.0, 20001, dtype=torch.float64),
                      torch.tensor([0.0, -0.0, 1e-300, -1e-300, 5e-324, -5e-324, 700.0, -700.0, 709.0, -745.0,
                                    K.SILU_ARGMIN, 1e308, -1e308, 87.0, -87.0, 88.5, -88.5, 1e-40, -1e-40,
                                    float("inf"), -float("inf")], dtype=torch.float64),
                      torch.randn(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 7])


def _silu32_native(y: torch.Tensor, threads: int = 1) -> torch.Tensor:
    out = torch.empty_like(y)
    K._C.silu32(native.address(y), native.address(out), y.numel(), threads)
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_silus_equal_their_torch_functions_bit_for_bit(monkeypatch, threads):
    """The binary64 SiLU (the softmax's exponential is the same code) equals `exact.silu`, on
    ordinary values and at the extremes (+-0, subnormals, the clamps, +-1e308, +-inf); the
    binary32 SiLU of GroupNorm's kernels equals `silu32`, and stays within 2 binary32 ulps of
    libm's y sigmoid(y) where it is not tiny. A NaN gives a NaN."""
    monkeypatch.setattr(native, "_threads", threads)
    monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0 if threads > 1 else 1 << 62)
    y = _silu_inputs()
    assert _bits_equal(K.silu64(y.view(-1, 2)), exact.silu(y).view(-1, 2))  # the kernel the network calls
    assert torch.isnan(K.silu64(torch.tensor([float("nan")], dtype=torch.float64))).all()
    y32 = y.clamp(-3e38, 3e38).to(torch.float32)
    got = _silu32_native(y32, threads)
    assert _bits_equal(got, K.silu32(y32))
    assert torch.isnan(_silu32_native(torch.tensor([float("nan")]))).all()
    want = (y32.double() * torch.sigmoid(y32.double())).numpy()
    got = got.numpy()
    ordinary = np.abs(want) > 1e-30
    assert np.all(np.abs(got[ordinary] - want[ordinary]) <= 2 * np.spacing(np.abs(want[ordinary]).astype(np.float32)))


def test_the_c_constants_are_the_python_ones():
    """csrc/exact2.c writes its constants as hex literals: each equals the Python value it
    stands for (binary64, or binary32 widened exactly)."""
    out = np.zeros(64)
    n = K._C.constants(out.ctypes.data)
    f32 = [K.LN2_HI_F32, K.LN2_LO_F32, K.INV_LN2_F32, K.EXP32_ARG_LIMIT, *K.EXP32_COEFFS, K.SILU_MIN_F32,
           K.SILU_ARGMIN_F32]
    want = [K.QMAX, exact.INV_LN2, exact.LN2_HI, exact.LN2_LO, exact.EXP_ARG_LIMIT, *exact._INV_FACTORIAL,
            *(float(v) for v in f32)]
    assert n == len(want) == 33
    assert [v.hex() for v in out[:n].tolist()] == [float(v).hex() for v in want]


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


def test_im2col_planes_equals_its_twin_and_the_values_im2col(twin):
    """The PLANES windows (3x3 with symmetric and 'end' padding, stride 2, 1x1) = the torch
    twin = `im2col` of the same parts (the zero point outside the image)."""
    planes = torch.randint(0, 128, (2, 3, 5, 6, 7), generator=torch.Generator().manual_seed(40)).to(torch.uint8)
    for k, stride, pads in ((3, 1, (1, 1, 1, 1)), (3, 2, (0, 0, 1, 1)), (1, 1, (0, 0, 0, 0))):
        fast, slow = twin(lambda p: K.im2col_planes(p, k, stride, pads), planes)
        _same(fast, slow)
        for i in range(2):
            want = K.im2col(planes[i].to(torch.int64) - K.ZERO_POINT, k, stride, pads)
            assert torch.equal(fast[i].to(torch.int64) - K.ZERO_POINT, want)


@pytest.mark.parametrize("form", [K.PLANES, K.VALUES])
def test_quantize_equals_its_twin(twin, form):
    for dtype in (torch.float32, torch.float64):
        x = _activations(6, 37, 13, seed=2).to(dtype)
        r, _ = K.inverse_scales(K.absmax(x))
        r[0] *= 1.5  # some values beyond QMAX: the clamp
        _same(*twin(K.quantize, x, r, form))
        _same(*twin(K.quantize_dynamic, x, form))


def test_the_planes_form_holds_the_integers_in_the_parts_ranges():
    x = _activations(6, 37, 13, seed=2)
    planes, s = K.quantize_dynamic(x, K.PLANES)
    values, s2 = K.quantize_dynamic(x, K.VALUES)
    assert torch.equal(s, s2) and planes.dtype == torch.uint8 and planes.shape == (2, 6, 37, 13)
    hi, lo = planes.to(torch.int64) - K.ZERO_POINT
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


@pytest.mark.parametrize("form", [K.PLANES, K.VALUES])
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
    b, h, w, c, k, stride, pads = case
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-K.QMAX, K.QMAX + 1, (b, h, w, c), generator=g).to(torch.float64)
    weight = torch.randint(-K.QMAX, K.QMAX + 1, (3, c, k, k), generator=g).to(torch.float64)
    cols = K.im2col(x, k, stride, pads)
    got = cols @ weight.permute(0, 2, 3, 1).reshape(3, -1).T
    top, left, bottom, right = pads
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom)),
                                      weight, stride=stride)
    assert torch.equal(got, want.permute(0, 2, 3, 1).reshape(-1, 3))


def test_int_weights_parts_and_values():
    from diffcodec.exact2_products import WMAX, IntWeights

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
    hi_lo, hi = iw.parts()
    assert hi_lo.shape == (80, 30, 3, 3) and hi.shape == (40, 30, 3, 3)
    assert int(hi_lo.min()) >= -64 and int(hi_lo.max()) <= 63  # the int8 convolutions' non-saturating range
    assert torch.equal(hi, iw.hi.view(40, 3, 3, 30).permute(0, 3, 1, 2))
    assert torch.equal(hi_lo, torch.cat([hi, 16 * iw.lo.view(40, 3, 3, 30).permute(0, 3, 1, 2)]))  # (w_hi ; 16 w_lo)


def test_int_weights_rely_on_a_read_back_only_when_it_gives_the_same_integers():
    from diffcodec.exact2_products import IntWeights

    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(10))
    iw = IntWeights(w)
    hi, lo = (t.clone() for t in iw.hi_lo())
    wrong = (hi.clone(), lo.clone())
    wrong[1][2, 5] += 1
    assert not iw.rely_on(lambda: wrong, hi, lo)  # keeps its own
    assert iw._own is not None and torch.equal(iw.hi, hi) and torch.equal(iw.lo, lo)
    reads = []
    assert iw.rely_on(lambda: reads.append(1) or (hi.clone(), lo.clone()), hi, lo)
    assert iw._own is None and len(reads) == 1  # let go of its own: checked once
    assert torch.equal(iw.ints, IntWeights(w).ints) and len(reads) > 1  # read back when asked


def test_a_layer_keeps_its_weights_once_in_the_forms_its_products_use():
    """After products at many outputs (oneDNN's packed weights) and at few (the int8 matrices),
    on one thread and on two (packed again), a layer holds no int8 parts of its own; they read
    back as the same integers, and the products are the same as a fresh layer's."""
    from diffcodec.exact2_products import IntConv, int_mm_verified, qconv_verified

    if not (qconv_verified() and int_mm_verified()):
        pytest.skip("oneDNN's int8 convolution or matrix product is not exact here: the binary64 products")
    g = torch.Generator().manual_seed(11)
    conv = torch.nn.Conv2d(24, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(16, 24, 3, 3, generator=g))
    layer, fresh = IntConv(conv, (1, 1, 1, 1)), IntConv(conv, (1, 1, 1, 1))
    want = fresh.weights.hi_lo()
    planes = torch.randint(0, 128, (2, 3, 8, 8, 24), generator=g, dtype=torch.uint8)
    saved = torch.get_num_threads()
    try:
        for threads, images in ((1, 3), (1, 1), (2, 3)):  # 192 outputs: packed; 64: matrices; repacked
            torch.set_num_threads(threads)
            got, _, _ = layer.products(planes[:, :images])
            assert layer.weights._own is None
            assert all(torch.equal(a, b) for a, b in zip(layer.weights.hi_lo(), want))
            assert torch.equal(K.sums(got), K.sums(fresh.products(planes[:, :images])[0]))
    finally:
        torch.set_num_threads(saved)
    assert layer._packed is not None and layer._matrices is not None
    import gc
    import weakref
    gc.disable()
    try:  # no reference cycle through the read-back: the layer goes with its last name
        gone = weakref.ref(layer)
        del layer
        assert gone() is None
    finally:
        gc.enable()


def _int8_products(g: torch.Generator, m: int, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Random int8 products (Gh [m, 2n], Gl [m, n]) binary32 at their bounds' scale, and the
    sums v they stand for (binary64)."""
    gh, gl = (torch.randint(-2**23, 2**23, (m, k * n), generator=g).to(torch.float64) for k in (2, 1))
    return (gh.float(), gl.float()), gh[:, :n] * 1024 + (gh[:, n:] + gl) * 8


def _int32_products(g: torch.Generator, products: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The same products as int32 matrix products with their zero point's shares (random
    shares of 1x1 products' size, added to the products)."""
    (gh, gl), n = products, products[1].shape[1]
    zh, zl = (torch.randint(-2**22, 2**22, (k * n,), generator=g, dtype=torch.int32) for k in (2, 1))
    return gh.to(torch.int32) + zh, gl.to(torch.int32) + zl, zh, zl


@pytest.mark.parametrize("parts", ["values", "binary32", "int32"])
@pytest.mark.parametrize("mode", ["plain", "add", "residual", "float64"])
def test_epilogue_equals_its_twin_and_combines_the_products(twin, parts, mode):
    """The sums v, the int8 convolutions' binary32 products and the int8 matrix products'
    int32 ones less their zero point's shares: the same outputs, C kernel and twin."""
    g = torch.Generator().manual_seed(10)
    m, n, pixels = 24, 7, 6
    products, v = _int8_products(g, m, n)
    if parts == "int32":
        products = _int32_products(g, products)
    G = products if parts != "values" else v
    s_x = torch.rand(m // pixels, generator=g, dtype=torch.float64) * 1e-3
    s_w = torch.rand(n, generator=g, dtype=torch.float64) * 1e-3
    bias = torch.randn(n, generator=g)
    kwargs = {"add": {"add": torch.randn(m // pixels, n, generator=g)},
              "residual": {"residual": torch.randn(m, n, generator=g)},
              "float64": {"float64": True}, "plain": {}}[mode]
    if mode == "float64":
        bias = bias.to(torch.float64)
    fast, slow = twin(lambda *a: K.epilogue(*a, **kwargs), G, pixels, s_x, s_w, bias)
    _same(fast, slow)

    def written(*args):  # into a given tensor (`exact_net2` writes a batch's slices so)
        out = torch.full((m, n), float("nan"), dtype=fast.dtype)
        assert K.epilogue(*args, **kwargs, out=out) is out
        return out
    for into in twin(written, G, pixels, s_x, s_w, bias):
        _same(into, fast)
    if parts != "values":  # the same output as from the sums themselves
        assert torch.equal(K.sums(products), v)
        _same(fast, K.epilogue(v, pixels, s_x, s_w, bias, **kwargs))


def test_epilogue_refuses_products_that_do_not_match():
    g = torch.Generator().manual_seed(12)
    (gh, gl), _ = _int8_products(g, 6, 4)
    ones, zeros = torch.ones(1, dtype=torch.float64), torch.zeros(4)
    with pytest.raises(ValueError, match="do not match"):
        K.epilogue((gh[:, :6], gl), 6, ones, torch.ones(4, dtype=torch.float64), zeros)
    ih, il, zh, zl = _int32_products(g, (gh, gl))
    with pytest.raises(ValueError, match="do not match"):
        K.epilogue((ih, il, zh[:4], zl), 6, ones, torch.ones(4, dtype=torch.float64), zeros)
    with pytest.raises(ValueError, match="int32 products and shares"):
        K.epilogue((ih, il, zh.long(), zl), 6, ones, torch.ones(4, dtype=torch.float64), zeros)
    for out in (torch.empty(6, 4, dtype=torch.float64), torch.empty(5, 4), torch.empty(4, 6).T):
        with pytest.raises(ValueError, match="out must be a contiguous torch.float32"):
            K.epilogue((gh, gl), 6, ones, torch.ones(4, dtype=torch.float64), zeros, out=out)


def test_softmax_weights_equal_their_twin(twin):
    """Including rows of one token and a negative c (the exponent's argument then clamped at
    +700 as `exact.exp` clamps it; numba's kernel did not)."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(-2**30, 2**30, (12, 33), generator=g).to(torch.float64)
    c = torch.tensor([1e-9, 1e-7, 3e-8, 0.0, 1.0, 1e-6] * 2, dtype=torch.float64)
    fast, slow = twin(lambda s: K.softmax_weights(s.clone(), c, 24), scores)
    _same(fast, slow)
    assert torch.all(fast[0].amax(dim=1) == 2**24) and torch.all(fast[1] == fast[0].sum(dim=1))
    _same(*twin(lambda s: K.softmax_weights(s.clone(), c, 12), scores[:, :1]))
    small = torch.randint(-2**10, 2**10, (4, 9), generator=g).to(torch.float64)
    c_neg = torch.tensor([-1e-3, -1.0, -1e300, 0.5], dtype=torch.float64)
    fast, slow = twin(lambda s: K.softmax_weights(s.clone(), c_neg, 3), small)
    _same(fast[0], slow[0])  # (weights up to 8 e^700: their sums are not exact, so their order shows)


_PRODUCT_SCRIPT = r"""
import json, torch
from diffcodec import exact2_kernels as K
from diffcodec.exact2_products import MATRIX_MAX_ROWS, IntConv, int_mm_verified, qconv_verified
torch.manual_seed(0)
ok = qconv_verified() and int_mm_verified()
cases = set()
for c, n, size, k, stride, pads, up in [(16, 8, 6, 3, 1, (1, 1, 1, 1), 1), (24, 5, 8, 3, 2, (0, 0, 1, 1), 1),
                                        (16, 8, 12, 3, 1, (1, 1, 1, 1), 1), (24, 5, 16, 3, 2, (0, 0, 1, 1), 1),
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
        planes, _ = K.quantize_dynamic(x.reshape(3, -1, c), K.PLANES)
        values, _ = K.quantize_dynamic(x.reshape(3, -1, c), K.VALUES)
        G, h, w = layer.products(K.grid(planes, size, size), up)
        V, h2, w2 = layer.products(K.grid(values, size, size), up)
        # torch._int_mm's int32 products: 1x1, or few outputs (on `im2col_planes`' windows)
        matrix = (k == 1 and stride == 1 and pads == (0, 0, 0, 0)) or 3 * h * w <= MATRIX_MAX_ROWS
        cases.add(matrix)
        ok &= isinstance(G, tuple) and len(G) == (4 if matrix else 2) and V.dtype == torch.float64
        ok &= all(t.dtype == (torch.int32 if matrix else torch.float32) for t in G)
        ok &= (h, w) == (h2, w2) and torch.equal(K.sums(G), V)
ok &= cases == {True, False}  # both paths ran
print(json.dumps({"exact": bool(ok), "verified": qconv_verified() and int_mm_verified()}))
"""


@pytest.mark.slow
def test_int8_convolutions_give_the_exact_products_under_every_onednn_isa():
    """oneDNN's int8 convolutions (the PLANES products: a_hi's and a_lo's) and, for 1x1
    layers, its int8 matrix products (torch._int_mm, less the zero point's shares) give the
    same sums as the binary64 product of the same integers, for 3x3 (strides 1 and 2, 'end'
    padding, upsampled input, 3 input channels), 1x1 (also on one pixel: a linear layer) and
    a fan-in of 4032, on saturated and random operands, with oneDNN capped at SSE4.1, AVX2
    and AVX-512 without VNNI (kernels that add u8 x s8 pairs in int16 with saturation) and
    uncapped; `qconv_verified` and `int_mm_verified` pass under each."""
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


_LEVELS = {"v4": 4, "v3": 3, "base": 1, "generic": 1}


def _libraries() -> dict[str, str]:
    """The built exact2 libraries this CPU can run, by level."""
    found = {level: native._path("exact2", level) for level in _LEVELS}
    return {level: path for level, path in found.items() if path and _LEVELS[level] <= native.cpu_level()}


@pytest.mark.parametrize("level", ["v4", "v3", "base"])
def test_no_level_of_the_library_holds_a_fused_multiply_add(level):
    """-ffp-contract=off: the compiler forms no a * b + c with one rounding, at any level (the
    AVX2 and AVX-512 builds may use every other instruction of theirs)."""
    objdump = shutil.which("objdump")
    path = native._path("exact2", level)
    if objdump is None or path is None:
        pytest.skip("no objdump, or no library of this level")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    assert "mulp" in asm or "mulsd" in asm
    assert not re.search(r"\bv?f(n)?m(add|sub)", asm), "a fused multiply-add"


def _battery() -> list:
    """Every kernel on seeded inputs (edge values included), large enough for several threads."""
    out = []
    g = torch.Generator().manual_seed(21)
    for b, p, c in [(6, 300, 24), (3, 9, 5)]:
        x = _activations(b, p, c, seed=22)
        x.view(-1)[::97] = 0.0
        out.append(K.absmax(x))
        for form in (K.PLANES, K.VALUES):
            out.append(K.quantize_dynamic(x, form))
            out.append(K.quantize_dynamic(x.double(), form))
            r = torch.rand(b, generator=g, dtype=torch.float64) * 1e4
            out.append(K.quantize(x, r, form))
        out.append(K.group_stats(x, exact.pow2(torch.randint(-20, 20, (b,), generator=g))))
        groups = 4 if c % 4 == 0 else 1
        weight = 1.0 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
        bias = 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
        scale, shift = torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)
        for silu in (True, False):
            out.append(K.norm_plan(x, groups, weight, bias, 1e-5, silu, scale, shift))
            for form in (K.PLANES, K.VALUES):
                out.append(K.group_norm_operand(x, groups, weight, bias, 1e-5, silu, form))
                out.append(K.group_norm_operand(x, groups, weight, bias, 1e-6, silu, form, scale, shift))
    m, n, pixels = 600, 40, 100
    products, v = _int8_products(g, m, n)
    s_x, s_w = torch.rand(m // pixels, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    bias32, add = torch.randn(n, generator=g), torch.randn(m // pixels, n, generator=g)
    residual = torch.randn(m, n, generator=g)
    for G in (v, products):
        out += [K.epilogue(G, pixels, s_x, s_w, bias32), K.epilogue(G, pixels, s_x, s_w, bias32, add=add),
                K.epilogue(G, pixels, s_x, s_w, bias32, residual=residual),
                K.epilogue(G, pixels, s_x, s_w, bias32.double(), float64=True)]
    scores = torch.randint(-2**30, 2**30, (96, 40), generator=g).to(torch.float64)
    out.append(K.softmax_weights(scores, torch.rand(96, generator=g, dtype=torch.float64) * 1e-8, 20))
    out.append(K.quantize_heads(torch.randn(3, 40, 3, 2, 24, generator=g) * 5))
    out.append(K.im2col_planes(torch.randint(0, 128, (2, 4, 9, 9, 16), generator=g).to(torch.uint8), 3, 1,
                               (1, 1, 1, 1)))
    y = _silu_inputs()
    out += [K.silu64(y), _silu32_native(y.clamp(-3e38, 3e38).float())]
    return out


def test_every_level_of_the_library_computes_the_same_bits(monkeypatch):
    """The AVX-512, AVX2 and SSE2 builds (each this CPU can run, loaded side by side) give the
    same bits for every kernel, on one thread and on two."""
    libraries = _libraries()
    if len(libraries) < 2:
        pytest.skip("one library level only on this machine")
    results = {}
    for level, path in libraries.items():
        monkeypatch.setattr(K, "_C", K._Lib(ctypes.CDLL(path)))
        for threads in (1, 2):
            monkeypatch.setattr(native, "_threads", threads)
            monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0 if threads > 1 else 1 << 62)
            results[level, threads] = _battery()
    first, *others = results
    for key in others:
        _same(tuple(results[first]), tuple(results[key]))
