"""The matrix products of exact-arithmetic contract 2: exact integer sums of integer operands.

Every convolution and linear layer of `exact_net2` computes, for each output, the integer

    v = sum_k (a_k w_k - a_lo,k w_lo,k)

of its quantized input window (14-bit a, |a| <= QMAX = 8063, in parts a = 128 a_hi + a_lo,
a_hi in [-63, 63], a_lo in [-64, 63]: `exact2_kernels`) and its quantized weights (10-bit w,
|w| <= `WMAX`, per output channel, in parts w = 8 w_hi + w_lo, w_hi in [-63, 63], w_lo in
[-4, 3]: `IntWeights`). The dropped a_lo w_lo (at most 256 a term, below the rounding of
a 14-bit a times a 10-bit w) is what lets the int8 products below carry the rest in three
products of the layer's size instead of four:

    v = 1024 sum a_hi w_hi + 8 (sum a_hi (16 w_lo) + sum a_lo w_hi).

Operand widths chosen by measurement (bench.exact_bits, reports/exact.md): 13-bit
activations with 10-bit weights cost +0.004 % of the bound against float32. Two backends give
the same integers, chosen per layer for speed (`IntConv.form`):

- PLANES (the CPU, when oneDNN's int8 convolution is there and passes `qconv_verified`):
  the operand's parts as two uint8 planes (zero point 64: `exact2_kernels.PLANES`) and two
  int8 convolutions, a_hi's with the 2N output channels (w_hi ; 16 w_lo) and a_lo's with
  w_hi, written as binary32 with output scale 1 and no bias. Each output sums K products of
  magnitude at most 63 x 64, an integer below 2^24 for fan-ins K <= `QCONV_MAX_FAN_IN`, so
  binary32 holds it exactly. oneDNN's int8 kernels accumulate in int32 (VNNI, AMX) or add
  pairs of u8 x s8 products in int16 with saturation (vpmaddubsw: AVX2 and AVX-512 without
  VNNI); every operand here is u8 in [0, 127] or s8 in [-64, 63], so each pair stays below
  2^15 (2 x 127 x 64) and no kernel saturates (measured: operands at the int8 extremes do
  saturate under those instruction sets; bench.int8_saturation). (Until 2026-12-07 the
  parts were stacked along the channels into one convolution over 2C channels, with a
  block of zero weights (2 or 3 output blocks); the same integers, 4/3 to 2x the work:
  reports/exact.md.) A 1x1 convolution (and a linear layer) is a matrix product of the
  planes themselves, so it goes through `torch._int_mm` instead (oneDNN's int8 matrix
  product, int32 out: 3 to 27 times faster than its 1x1 convolution on a 2-core AMD EPYC,
  whose every call costs about 30 us), on the planes' bytes read as int8 (in [0, 127]: the
  parts plus the zero point) with the same weights; the zero point's share of each sum, 64
  times the weights' column sum, is subtracted in the epilogue (exact int32 differences).
  So is a k x k convolution with few outputs (`MATRIX_MAX_ROWS`), on its windows
  (`exact2_kernels.im2col_planes`, the zero point outside the image).
  Operands in [0, 127] x [-64, 63] are exact under every oneDNN instruction set
  (`int_mm_verified`, tests/test_exact2_kernels.py: made unsigned by adding 128, each u8 x s8
  pair stays within 2 x 255 x 64 < 2^15).
- VALUES (a GPU, a CPU without the int8 convolution, fan-ins above 4161): the integers themselves in binary64, an im2col, and one
  binary64 product of [a | a_lo] with [w ; -w_lo]: every partial sum an integer below 2^53,
  exact in any order, on any BLAS, thread count or device.
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffcodec import exact
from diffcodec import exact2_kernels as K
from diffcodec.runtime import release_freed_memory

WMAX = 507
"""Largest magnitude of a quantized weight: 8 w_hi + w_lo with w_hi = floor((w + 4) / 8) in
[-63, 63] and w_lo in [-4, 3]; 10 bits."""
W_PART_SCALE = 8
MATRIX_MAX_ROWS = 128
"""Up to this many output pixels a call (4x4 and 8x8 layers at small batches), a k x k
convolution's products are an `exact2_kernels.im2col_planes` and `torch._int_mm` rather than
oneDNN's int8 convolution, whose 30-70 us a call dominate there (2-core AMD EPYC)."""
QCONV_MAX_FAN_IN = 4161
"""Largest fan-in whose int8 products (|.| <= K 63 64) binary32 holds exactly."""
INT8_OFF = bool(os.environ.get("DIFFCODEC_NO_INT8"))
"""DIFFCODEC_NO_INT8=1 when diffcodec was imported: the VALUES products everywhere (a GPU's
path, on a CPU), read once."""


@functools.cache
def _onednn_qconv():
    """oneDNN's (prepack, convolution) ops, looked up once (None where torch lacks them); the
    convolution's plain overload, called directly (the packet's own dispatch costs ~5 us a call)."""
    ops = getattr(torch.ops, "onednn", None)
    try:
        return ops.qconv_prepack, ops.qconv2d_pointwise.default
    except (AttributeError, RuntimeError):
        return None


@functools.lru_cache(maxsize=64)
def _unit_scales(n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n_out, dtype=torch.float32), torch.zeros(n_out, dtype=torch.int64)


def _qconv_call(packed, x_u8: torch.Tensor, n_out: int, stride: int, padding: int) -> torch.Tensor:
    """oneDNN's int8 convolution of uint8 NCHW (channels-last) x, zero point 64: binary32
    [B, n_out, Ho, Wo] (channels-last), scales 1, no bias."""
    _, conv = _onednn_qconv()
    ones, zeros = _unit_scales(n_out)
    return conv(x_u8, 1.0, K.ZERO_POINT, packed, ones, zeros, None,
                [stride, stride], [padding, padding], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")


def _qconv_pack(w8: torch.Tensor, stride: int, padding: int):
    prepack, _ = _onednn_qconv()
    return prepack(w8, torch.ones(w8.shape[0], dtype=torch.float32), 1.0, K.ZERO_POINT, [stride, stride],
                   [padding, padding], [1, 1], 1, None)


@functools.lru_cache(maxsize=1)
def qconv_verified() -> bool:
    """Whether oneDNN's int8 convolution is here and computes exact integer sums: once per
    process, on operands at the ranges' extremes and random ones, 3x3 (stride 1 and 2) and
    1x1 kernels (also on one pixel), 3 to 448 channels, fan-ins up to 4032, against binary64
    products of the same integers. False (the VALUES path everywhere) when the op is missing,
    raises, or differs anywhere."""
    if _onednn_qconv() is None:
        return False
    g = torch.Generator().manual_seed(0x5EED)
    try:
        for c, n, size, k, stride in ((3, 8, 7, 3, 1), (6, 8, 7, 3, 1), (16, 8, 7, 3, 1), (24, 16, 9, 3, 2),
                                      (40, 24, 5, 1, 1), (448, 8, 4, 3, 1), (256, 40, 1, 1, 1)):
            for case in range(3):
                if case == 0:  # every operand at its most negative or most positive
                    x = torch.where(torch.rand(2, c, size, size, generator=g) < 0.5, -64, 63)
                    w = torch.where(torch.rand(n, c, k, k, generator=g) < 0.5, -64, 63)
                else:
                    x = torch.randint(-64, 64, (2, c, size, size), generator=g)
                    w = torch.randint(-64, 64, (n, c, k, k), generator=g)
                    x[:, : c // 2] = 63 if case == 1 else -64
                pad = k // 2
                got = _qconv_call(_qconv_pack(w.to(torch.int8), stride, pad),
                                  (x + K.ZERO_POINT).to(torch.uint8).contiguous(memory_format=torch.channels_last),
                                  n, stride, pad)
                want = F.conv2d(x.to(torch.float64), w.to(torch.float64), stride=stride, padding=pad)
                if got.dtype != torch.float32 or not torch.equal(got.to(torch.float64), want):
                    return False
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _int_mm_exact(x: torch.Tensor, w: torch.Tensor) -> bool:
    return torch.equal(torch._int_mm(x, w).to(torch.float64), x.to(torch.float64) @ w.to(torch.float64))


@functools.lru_cache(maxsize=1)
def int_mm_verified() -> bool:
    """Whether `torch._int_mm` is here and computes exact integer sums on the matrix
    products' operands (planes' bytes in [0, 127] read as int8, weights in [-64, 63]): once per process, at
    the ranges' extremes and on random ones, 1 to 300 rows, fan-ins 3 to 4032, against
    binary64 products of the same integers. False (the int8 convolutions then) when the op
    is missing, raises, or differs anywhere."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0x1A7)
    try:
        for m, k, n in ((1, 256, 512), (17, 3, 8), (64, 128, 24), (300, 448, 40), (5, 4032, 16)):
            for a_val in (0, 127):
                for w_val in (-64, 63):
                    if not _int_mm_exact(torch.full((m, k), a_val, dtype=torch.int8),
                                         torch.full((k, n), w_val, dtype=torch.int8)):
                        return False
            x = torch.randint(0, 128, (m, k), generator=g).to(torch.int8)
            w = torch.randint(-64, 64, (k, n), generator=g).to(torch.int8)
            if not _int_mm_exact(x, w):
                return False
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


_BUILD_ROWS_ELEMENTS = 1 << 18
"""`IntWeights` quantizes about this many weights at a time (its binary64 and int64 copies:
a few MiB, not 40 bytes a weight of the largest layer at once)."""


class IntWeights(torch.nn.Module):
    """A layer's weights [N, C, kh, kw] (or [N, K]) as 10-bit integers per output channel,
    w = clamp(rint(w_float WMAX / max |w_n|)), in parts w = 8 w_hi + w_lo (int8 [N, K] each,
    fan-in ordered kernel row, kernel column, channel, as `exact2_kernels.im2col`), with the value of one
    integer per channel, max |w_n| / WMAX (binary64 [N]). `values`: [w ; -w_lo] in binary64
    [2K, N] for the VALUES product (made at each use; `IntConv` keeps them in its taps' order);
    `parts`: the int8 convolutions' weights (module docstring), made at each use.

    Once a layer has made the form its products use (oneDNN's packed weights, the int8
    matrices), the parts are read back from it when needed (`rely_on`) rather than kept twice:
    2 bytes a weight less (17 MiB for the default model)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach().to("cpu")
        self.kernel = tuple(weight.shape[2:]) if weight.dim() == 4 else None
        n = weight.shape[0]
        parts = torch.empty((2, n, weight[0].numel()), dtype=torch.int8)  # (w_hi, w_lo) [N, K]
        scale = torch.empty(n, dtype=torch.float64)
        step = max(1, _BUILD_ROWS_ELEMENTS // max(1, weight[0].numel()))
        for i in range(0, n, step):  # a few output channels at a time: the binary64 and int64 copies stay small
            w = weight[i:i + step].to(torch.float64)
            w2 = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w
            m = w2.abs().amax(dim=1)
            safe = torch.where(m == 0, 1.0, m)
            r = torch.where(m == 0, 0.0, exact.divide(torch.full_like(m, float(WMAX)), safe))
            scale[i:i + step] = torch.where(m == 0, 0.0, exact.divide(m, float(WMAX)))
            ints = torch.round(w2 * r[:, None]).clamp_(-WMAX, WMAX).to(torch.int64)  # [rows, K]
            hi = torch.div(ints + W_PART_SCALE // 2, W_PART_SCALE, rounding_mode="floor")
            parts[0, i:i + step] = hi
            parts[1, i:i + step] = ints - hi * W_PART_SCALE
        self.register_buffer("scale", scale)
        self._own: tuple[torch.Tensor, torch.Tensor] | None = (parts[0], parts[1])
        self._read_back: Callable[[], Callable[[], tuple[torch.Tensor, torch.Tensor]]] | None = None

    def hi_lo(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_hi, w_lo), int8 [N, K] each, on the CPU: its own, or read back (`rely_on`)."""
        return self._own if self._own is not None else self._read_back()()

    def rely_on(self, read_back: Callable[[], tuple[torch.Tensor, torch.Tensor]], hi: torch.Tensor,
                lo: torch.Tensor) -> bool:
        """Let go of its own parts if ``read_back()`` gives (w_hi, w_lo) = (``hi``, ``lo``), the
        ones a form was just made of (checked now, once per form made); else keep (or take
        back) ``hi`` and ``lo``. Whether it now relies on ``read_back``."""
        got = read_back()
        if torch.equal(got[0], hi) and torch.equal(got[1], lo):
            # a layer's own method held weakly: no reference cycle, so the network goes with its last name
            self._own = None
            self._read_back = weakref.WeakMethod(read_back) if inspect.ismethod(read_back) else lambda: read_back
            return True
        self._own, self._read_back = (hi.contiguous(), lo.contiguous()), None
        return False

    @property
    def hi(self) -> torch.Tensor:
        return self.hi_lo()[0]

    @property
    def lo(self) -> torch.Tensor:
        return self.hi_lo()[1]

    @property
    def ints(self) -> torch.Tensor:
        """The 10-bit integers [N, K] (int64)."""
        hi, lo = self.hi_lo()
        return hi.to(torch.int64) * W_PART_SCALE + lo.to(torch.int64)

    @property
    def values(self) -> torch.Tensor:
        return torch.cat([self.ints, -self.lo.to(torch.int64)], dim=1).to(torch.float64).T.contiguous().to(
            self.scale.device)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 convolutions' weights: (w_hi ; 16 w_lo) [2N, C, kh, kw] for a_hi's plane
        and w_hi [N, C, kh, kw] for a_lo's."""
        w_hi, w_lo = self.hi_lo()
        n = w_hi.shape[0]
        kh, kw = self.kernel
        hi, lo = [t.view(n, kh, kw, -1).permute(0, 3, 1, 2) for t in (w_hi, w_lo)]  # [N, C, kh, kw]
        return torch.cat([hi, lo * 16]).contiguous(), hi.contiguous()


def values_columns(values: torch.Tensor) -> torch.Tensor:
    """[..., K] integers (binary64) -> [..., 2K]: (a | a_lo), the VALUES product's operand."""
    hi = torch.div(values + 64, K.PART_SCALE, rounding_mode="floor")
    return torch.cat([values, values - hi * K.PART_SCALE], dim=-1)


class IntConv(torch.nn.Module):
    """The integer products of one convolution (module docstring): `products(operand)` ->
    (G, Ho, Wo) with G the two int8 convolutions' outputs (Gh [M, 2N], Gl [M, N], binary32)
    or the sums v themselves [M, N] (binary64), as `exact2_kernels.epilogue` takes them."""

    def __init__(self, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.weights = IntWeights(conv.weight)
        self.k, self.stride, self.pads = conv.kernel_size[0], conv.stride[0], pads
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.fan_in = self.in_channels * self.k * self.k
        self._packed: tuple[int, object, object] | None = None  # (thread count, oneDNN's packed weights x 2)
        self._matrices: tuple[torch.Tensor, ...] | None = None  # `_matrix_products`' weights and zero point shares
        self._taps: torch.Tensor | None = None  # `_tap_values`, made once per device
        self._cpu_form: str | None = None  # `form` on the CPU, once known

    def form(self, device: torch.device) -> str:
        """PLANES where oneDNN's int8 convolution runs (DIFFCODEC_NO_INT8=1: never, which is
        a GPU's path on a CPU), else VALUES (decided once per layer for the CPU)."""
        if device.type != "cpu":
            return K.VALUES
        if self._cpu_form is None:
            # every channel count, the first convolution's 3 too (0.14 vs 0.25 ms at batch 1 on this CPU)
            self._cpu_form = (K.PLANES if self.fan_in <= QCONV_MAX_FAN_IN and not INT8_OFF and qconv_verified()
                              else K.VALUES)
        return self._cpu_form

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The output's (Ho, Wo) for an input of h x w pixels (after any upsampling)."""
        top, left, bottom, right = self.pads
        return (h + top + bottom - self.k) // self.stride + 1, (w + left + right - self.k) // self.stride + 1

    def product_bytes(self, device: torch.device) -> int:
        """Bytes of the products (and the VALUES path's im2col) per output pixel: what
        `products` allocates for each row of the output."""
        if self.form(device) == K.PLANES:
            return 12 * self.out_channels  # Gh [., 2N] and Gl [., N], binary32 or int32
        return 8 * self.out_channels + 16 * self.fan_in  # v [., N] and (a | a_lo) [., 2K], binary64

    def products(self, operand: torch.Tensor, up: int = 1) -> tuple[K.Sums, int, int]:
        """operand [2, B, H, W, C] uint8 (PLANES) or [B, H, W, C] binary64 (VALUES), on the
        input grid upsampled ``up`` times (nearest)."""
        if up > 1:  # nearest upsampling: one copy
            *lead, h, w, c = operand.shape
            operand = (operand[..., :, None, :, None, :].expand(*lead, h, up, w, up, c)
                       .reshape(*lead, h * up, w * up, c))
        if operand.dtype == torch.uint8:
            try:
                return self._int8_products(operand)
            except RuntimeError:  # oneDNN cannot make this primitive (it happens for some channel counts)
                self._cpu_form = K.VALUES  # oneDNN could not run this layer: VALUES from then on
                hi, lo = operand.to(torch.float64).sub_(K.ZERO_POINT)
                operand = hi.mul_(K.PART_SCALE).add_(lo)  # the same integers as VALUES
        cols = K.im2col(values_columns(operand), self.k, self.stride, self.pads)  # (a | a_lo) per tap
        out_h, out_w = self.output_size(operand.shape[1], operand.shape[2])
        return torch.mm(cols, self._tap_values()), out_h, out_w

    def _tap_values(self) -> torch.Tensor:
        """`IntWeights.values` reordered for `exact2_kernels.im2col`'s columns of (a | a_lo): per tap, the C
        weights then the C negated low parts; made once per device (a layer's products may come a
        few images at a time)."""
        if self._taps is None or self._taps.device != self.weights.scale.device:
            kk, c = self.k * self.k, self.in_channels
            v = self.weights.values  # [2K, N]: w (tap, channel), then -w_lo (tap, channel)
            self._taps = torch.cat([v[:kk * c].view(kk, c, -1), v[kk * c:].view(kk, c, -1)], dim=1).reshape(
                2 * kk * c, -1)
        return self._taps

    def _int8_products(self, operand: torch.Tensor) -> tuple[K.Sums, int, int]:
        """The PLANES products of ``operand`` [2, B, H, W, C] (each plane contiguous; the pair
        need not be: a slice of images)."""
        top, left, bottom, right = self.pads
        _, b, h, w, c = operand.shape
        out_h, out_w = self.output_size(h, w)
        if int_mm_verified():
            if self.k == 1 and self.stride == 1 and self.pads == (0, 0, 0, 0):
                return self._matrix_products(*(plane.reshape(b * h * w, c) for plane in operand)), h, w
            if b * out_h * out_w <= MATRIX_MAX_ROWS:  # few outputs: oneDNN's per-call cost dominates
                return self._matrix_products(*K.im2col_planes(operand, self.k, self.stride, self.pads)), out_h, out_w
        x_hi, x_lo = (plane.permute(0, 3, 1, 2) for plane in operand)  # NCHW views, channels-last
        if (top, left) != (bottom, right) or top != left:  # asymmetric ('end') padding: pad with the zero point
            x_hi, x_lo = (F.pad(x, (left, right, top, bottom), value=K.ZERO_POINT).contiguous(
                memory_format=torch.channels_last) for x in (x_hi, x_lo))
            padding = 0
        else:
            padding = top
        threads = torch.get_num_threads()
        if self._packed is None or self._packed[0] != threads:  # oneDNN may not run weights packed for others
            w_hi, w_lo = self.weights.hi_lo()
            hi_lo, hi = self.weights.parts()
            self._packed = (threads, _qconv_pack(hi_lo, self.stride, padding), _qconv_pack(hi, self.stride, padding))
            del hi_lo, hi
            self.weights.rely_on(self._read_back, w_hi, w_lo)
            del w_hi, w_lo
            # the pages of what packing freed handed back now: made among a first call's
            # activations, they would stay resident (a first call at batch 1 peaked 360 MiB
            # instead of 321 with the default model; reports/exact.md)
            release_freed_memory()
        _, w_hi_lo, w_hi = self._packed
        n = self.out_channels
        g_hi = _qconv_call(w_hi_lo, x_hi, 2 * n, self.stride, padding)  # a_hi's, [B, 2N, Ho, Wo] channels-last
        g_lo = _qconv_call(w_hi, x_lo, n, self.stride, padding)  # a_lo's
        out_h, out_w = g_hi.shape[2], g_hi.shape[3]
        return (g_hi.permute(0, 2, 3, 1).reshape(-1, 2 * n), g_lo.permute(0, 2, 3, 1).reshape(-1, n)), out_h, out_w

    def _read_back(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_hi, w_lo) [N, K] int8 read back from a form made of them: the int8 matrices, or
        oneDNN's packed (w_hi ; 16 w_lo) reordered to plain (`IntWeights.rely_on`)."""
        n = self.out_channels
        if self._matrices is not None:
            both = self._matrices[0].T  # [2N, K]
        elif self._packed is not None:
            both = self._packed[1].to_dense().permute(0, 2, 3, 1).reshape(2 * n, -1)  # [2N, C, kh, kw] -> [2N, K]
        else:
            raise RuntimeError("exact network: a layer's integer weights are in no form")  # unreachable by design
        return both[:n].contiguous(), torch.div(both[n:], 16, rounding_mode="floor").contiguous()

    def _matrix_products(self, rows_hi: torch.Tensor, rows_lo: torch.Tensor) -> K.Sums:
        """The products from the planes' windows [M, K] each (a 1x1 convolution's planes
        themselves, or `exact2_kernels.im2col_planes`; module docstring): int32 (Ih [M, 2N],
        Il [M, N]) and the zero point's shares (Zh [2N], Zl [N])."""
        if self._matrices is None:  # (w_hi ; 16 w_lo) [K, 2N] int8, K in im2col's order; w_hi is its first N columns
            hi, lo = self.weights.hi_lo()
            both = torch.cat([hi, lo * 16]).T.contiguous()
            shares = K.ZERO_POINT * both.sum(dim=0, dtype=torch.int32)
            self._matrices = (both, both[:, :self.out_channels], shares, shares[:self.out_channels])
            self.weights.rely_on(self._read_back, hi, lo)
            del hi, lo
            release_freed_memory()  # as after packing
        w_hi_lo, w_hi, z_hi_lo, z_hi = self._matrices
        # the bytes a_part + 64, in [0, 127]: the same integers as int8
        return (torch._int_mm(rows_hi.view(torch.int8), w_hi_lo), torch._int_mm(rows_lo.view(torch.int8), w_hi),
                z_hi_lo, z_hi)
