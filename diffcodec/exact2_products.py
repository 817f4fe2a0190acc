"""The matrix products of exact-arithmetic contract 2: exact dot products of 14-bit integers.

Every convolution and linear layer of `exact_net2` computes v[b, y, x, n] = sum_k a_k w_nk,
the exact integer dot product of its quantized input window (|a| <= QMAX) and its quantized
weights (|w| <= QMAX; `IntWeights`). Two backends give those same integers, chosen per
layer for speed (`IntConv.form`):

- STACKED (the CPU, when oneDNN's int8 convolution is there and passes `qconv_verified`):
  the operand's two int8 parts per integer (`exact2_kernels`, uint8 with zero point 64)
  stacked along the channels, and ONE grouped (groups = 2) int8 convolution whose 4N output
  channels are the four part products (a_hi, a_lo) x (w_hi, w_lo), written as binary32 with
  output scale 1 and no bias. Each is an integer of magnitude at most K 64 64, below 2^24
  for fan-ins K <= `QCONV_MAX_FAN_IN`, so binary32 holds it exactly; the epilogue combines
  them into v = 2^14 hh + 2^7 (hl + lh) + ll. oneDNN's int8 kernels accumulate in int32
  (VNNI, AMX) or add pairs of u8 x s8 products in int16 with saturation (vpmaddubsw: AVX2
  and AVX-512 without VNNI); the parts, u8 in [0, 127] and s8 in [-64, 63], keep every such
  pair below 2^15 (2 x 127 x 64), so no kernel saturates (measured: operands at +-127 do
  saturate under those instruction sets; tests/test_exact2_kernels.py). On this project's
  CPU (AMX) the four products take less time than the float32 network's one convolution
  (reports/exact.md).
- VALUES (a GPU, a CPU without the int8 convolution, fan-ins above 4096, tiny fan-ins where
  it is faster): the integers themselves in binary64, an im2col and one binary64 matrix
  product: every partial sum is an integer below 2^53 (K QMAX^2 < 2^53 for K < 2^26), exact
  in any order, on any BLAS, thread count or device.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from diffcodec import exact2_kernels as K

QCONV_MAX_FAN_IN = 4096
"""Largest fan-in whose part products (|p| <= K 64 64 <= 2^24) binary32 holds exactly."""
QCONV_MIN_CHANNELS = 8
"""Input channels below which the VALUES product is faster (the first convolution's 3)."""


def _onednn_qconv():
    ops = getattr(torch.ops, "onednn", None)
    try:
        return ops.qconv_prepack, ops.qconv2d_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.lru_cache(maxsize=64)
def _unit_scales(n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n_out, dtype=torch.float32), torch.zeros(n_out, dtype=torch.int64)


def _qconv_call(packed, x_u8: torch.Tensor, n_out: int, stride: int, padding: int) -> torch.Tensor:
    """oneDNN's int8 convolution of uint8 NCHW (channels-last) x, zero point 64, groups 2:
    binary32 [B, n_out, Ho, Wo] (channels-last), scales 1, no bias."""
    _, conv = _onednn_qconv()
    ones, zeros = _unit_scales(n_out)
    return conv(x_u8, 1.0, K.ZERO_POINT, packed, ones, zeros, None,
                [stride, stride], [padding, padding], [1, 1], 2, 1.0, 0, torch.float32, "none", [], "")


def _qconv_pack(w8: torch.Tensor, stride: int, padding: int):
    prepack, _ = _onednn_qconv()
    return prepack(w8, torch.ones(w8.shape[0], dtype=torch.float32), 1.0, K.ZERO_POINT, [stride, stride],
                   [padding, padding], [1, 1], 2, None)


@functools.lru_cache(maxsize=1)
def qconv_verified() -> bool:
    """Whether oneDNN's int8 convolution is here and computes the exact part products: once
    per process, on operands at the parts' extremes and random ones, 3x3 (stride 1 and 2)
    and 1x1 kernels, against binary64 products of the same integers. False (the VALUES
    path everywhere) when the op is missing, raises, or differs anywhere."""
    if _onednn_qconv() is None:
        return False
    g = torch.Generator().manual_seed(0x5EED)
    try:
        for c, n, size, k, stride in ((16, 8, 7, 3, 1), (24, 16, 9, 3, 2), (40, 24, 5, 1, 1), (448, 8, 4, 3, 1)):
            for case in range(3):
                if case == 0:  # every part at its most negative or most positive
                    hi = torch.where(torch.rand(2, c, size, size, generator=g) < 0.5, -63, 63)
                    w = torch.where(torch.rand(4 * n, c, k, k, generator=g) < 0.5, -64, 63)
                else:
                    hi = torch.randint(-63, 64, (2, c, size, size), generator=g)
                    w = torch.randint(-64, 64, (4 * n, c, k, k), generator=g)
                lo = torch.full_like(hi, 63 if case == 1 else -64) if case else hi.clamp(-64, 63)
                x = torch.cat([hi, lo], dim=1)  # [B, 2C, s, s] parts
                pad = k // 2
                got = _qconv_call(_qconv_pack(w.to(torch.int8), stride, pad),
                                  (x + K.ZERO_POINT).to(torch.uint8).contiguous(memory_format=torch.channels_last),
                                  4 * n, stride, pad)
                want = F.conv2d(x.to(torch.float64), w.to(torch.float64), stride=stride, padding=pad, groups=2)
                if got.dtype != torch.float32 or not torch.equal(got.to(torch.float64), want):
                    return False
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


class IntWeights(torch.nn.Module):
    """A layer's weights [N, C, kh, kw] (or [N, K]) as 14-bit integers per output channel,
    clamp(rint(w QMAX / max |w_n|)), with the value of one integer per channel, max |w_n| / QMAX
    (binary64 [N]). Kept as int16 [N, K] (fan-in ordered kernel row, kernel column, channel,
    as `im2col`), as binary64 values [K, N] for the VALUES product (`values`, made at first
    use: 8 bytes a weight) and, for convolutions, as the int8 parts of the grouped
    convolution, [4N, C, kh, kw] = (w_hi; w_lo; w_hi; w_lo)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().to("cpu", torch.float64)
        w2 = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w
        r, s = K.inverse_scales(w2.abs().amax(dim=1))
        ints = K._quantize_torch(w2, r[:, None])  # [N, K]
        self.register_buffer("ints", ints.to(torch.int16))
        self.register_buffer("scale", s)
        self._values: torch.Tensor | None = None
        if w.dim() == 4:
            hi, lo = K.split(ints.view(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2))
            self.register_buffer("parts", torch.cat([hi, lo, hi, lo]).to(torch.int8))

    @property
    def values(self) -> torch.Tensor:
        if self._values is None or self._values.device != self.ints.device:
            self._values = self.ints.to(torch.float64).T.contiguous()
        return self._values


def im2col(values: torch.Tensor, k: int, stride: int, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """[B, H, W, C] -> the column matrix [B Ho Wo, k k C] (columns: kernel row, kernel
    column, channel) of a k x k convolution with zero padding ``pads`` = (top, left, bottom,
    right). Data movement only."""
    b, h, w, c = values.shape
    top, left, bottom, right = pads
    out_h, out_w = (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1
    src = F.pad(values, (0, 0, left, right, top, bottom))
    cols = torch.cat([src[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
                      for i in range(k) for j in range(k)], dim=3)
    return cols.reshape(b * out_h * out_w, k * k * c)


class IntConv(torch.nn.Module):
    """The integer products of one convolution (module docstring): `products(operand)` ->
    (G, Ho, Wo, stacked) with G the four part products [M, 4N] (binary32; stacked True) or
    the dot products [M, N] (binary64)."""

    def __init__(self, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.weights = IntWeights(conv.weight)
        self.k, self.stride, self.pads = conv.kernel_size[0], conv.stride[0], pads
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self._packed: dict[int, object] = {}  # oneDNN's packed int8 weights per torch thread count
        self._qconv_refused = False  # oneDNN could not run this layer: VALUES from then on

    def form(self, device: torch.device) -> str:
        """STACKED where oneDNN's int8 convolution runs (DIFFCODEC_NO_INT8=1: never, which is
        a GPU's path on a CPU), else VALUES."""
        fan_in = self.in_channels * self.k * self.k
        if (device.type == "cpu" and self.in_channels >= QCONV_MIN_CHANNELS and fan_in <= QCONV_MAX_FAN_IN
                and not self._qconv_refused and not os.environ.get("DIFFCODEC_NO_INT8") and qconv_verified()):
            return K.STACKED
        return K.VALUES

    def products(self, operand: torch.Tensor, up: int = 1) -> tuple[torch.Tensor, int, int, bool]:
        """operand [B, H, W, 2C] uint8 (STACKED) or [B, H, W, C] binary64 (VALUES), on the
        input grid upsampled ``up`` times (nearest)."""
        if up > 1:  # nearest upsampling: one copy
            b, h, w, c = operand.shape
            operand = operand[:, :, None, :, None, :].expand(b, h, up, w, up, c).reshape(b, h * up, w * up, c)
        top, left, bottom, right = self.pads
        if operand.dtype == torch.uint8:
            try:
                return (*self._stacked_products(operand), True)
            except RuntimeError:  # oneDNN cannot make this primitive (it happens for some channel counts)
                self._qconv_refused = True
                hi, lo = operand.to(torch.float64).sub_(K.ZERO_POINT).chunk(2, dim=3)
                operand = hi.mul_(K.PART_SCALE).add_(lo)  # the same integers as VALUES
        if operand.dtype != torch.uint8:
            cols = im2col(operand, self.k, self.stride, self.pads)
            out_h = (operand.shape[1] + top + bottom - self.k) // self.stride + 1
            out_w = (operand.shape[2] + left + right - self.k) // self.stride + 1
            return torch.mm(cols, self.weights.values), out_h, out_w, False
        raise AssertionError("unreachable")

    def _stacked_products(self, operand: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        top, left, bottom, right = self.pads
        x = operand.permute(0, 3, 1, 2)  # NCHW, channels-last in memory
        if (top, left) != (bottom, right) or top != left:  # asymmetric ('end') padding: pad with the zero point
            x = F.pad(x, (left, right, top, bottom), value=K.ZERO_POINT).contiguous(memory_format=torch.channels_last)
            padding = 0
        else:
            padding = top
        threads = torch.get_num_threads()
        if threads not in self._packed:  # oneDNN may not run weights packed for another thread count
            self._packed[threads] = _qconv_pack(self.weights.parts, self.stride, padding)
        y = _qconv_call(self._packed[threads], x, 4 * self.out_channels, self.stride, padding)
        return y.permute(0, 2, 3, 1).reshape(-1, 4 * self.out_channels), y.shape[2], y.shape[3]
