"""exact_net2: the UNet under exact-arithmetic contract 2.

The central check is an independent, slow re-implementation of the whole network in numpy
(`_Reference2`), walked from the config and the state dict alone: every convolution and
linear layer the int64 sum of a w - a_lo w_lo over 14-bit activations and 10-bit weights,
every attention product an int64 sum (no torch matmul, no int8 convolution, no C kernel), GroupNorm's sums int64, every rounding written out (binary32 where the
contract says binary32, and its binary32 SiLU written out in numpy). Only the binary64
transcendentals call `diffcodec.exact` (exp, silu, sin_cos: the timestep MLP and the
softmax), which test_exact.py checks against libm. The network must equal it bit for bit, on random inputs and on
adversarial ones at the contract's bounds (every weight and activation at +-QMAX, so every
int8 part at the edge of its range and every dot product at its largest). Then: invariance
to thread count, batch size and order, input dtype, the CPU kernels torch, oneDNN and diffcodec's
C kernels pick (subprocesses), the torch twins (no C kernels), and a golden hash of the shipped model's
output, so that any change to contract 2's arithmetic is caught.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffcodec import exact, native
from diffcodec.checkpoint import load_checkpoint
from diffcodec.config import ModelConfig
from diffcodec.exact2_kernels import QMAX
from diffcodec.exact2_products import WMAX
from diffcodec.exact_net2 import exact_network2
from diffcodec.unet import UNet

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelConfig(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                   learn_sigma=True)
WIDE = ModelConfig(image_size=8, ch=36, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                   learn_sigma=True, num_heads=2)
# Improved DDPM's and diffusers' variants: scale-shift norms, 'end' padding of the downsampling
# convolution, the other timestep embedding; fan-ins from 12 x 9 up to 512 (the int8-parts form).
VARIANT = ModelConfig(image_size=8, ch=64, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                      learn_sigma=False, num_heads=4, scale_shift_norm=True, downsample_padding="end",
                      time_embedding="improved", timestep_scale=0.25, norm_eps=1e-6)

# sha256 of the float64 (little-endian) output bits of the shipped model's contract-2 network
# on `_golden_inputs()`. Changing it is changing the exact-path file format (a new contract).
GOLDEN_DEFAULT_SHA256 = "2813dcfb363f605f010aac34b4850c7edd37a944d72419123ed8d1f07dd3c91f"


def random_model(config: ModelConfig, seed: int = 0) -> UNet:
    """A UNet with every parameter random (zero-initialised layers too), float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UNet(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def adversarial_model(config: ModelConfig, seed: int = 0) -> UNet:
    """Every weight of magnitude exactly 1 (random signs), so each quantizes to +-WMAX: every
    int8 weight part at the edge of its range, every sum of +-QMAX activations at its
    largest (fan-in x QMAX x WMAX)."""
    model = random_model(config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0))
    return model


def random_inputs(config: ModelConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 images of mixed scales (unit noise, all zeros, 1e3, 1e-3, 2, constant) and
    integer timesteps (0 and 999 included)."""
    g = torch.Generator().manual_seed(seed)
    s = config.image_size
    x = torch.randn(batch, config.in_channels, s, s, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 0.0, 1e3, 1e-3, 2.0, 1.0] * batch, dtype=torch.float64)[:batch]
    x = x * scales[:, None, None, None]
    if batch > 5:
        x[5] = 0.75  # a constant image: every GroupNorm group of zero variance at the input
    t = torch.randint(0, 1000, (batch,), generator=g).to(torch.float64)
    t[:2] = torch.tensor([0.0, 999.0])[: min(batch, 2)]
    return x, t


# ------------------------------------------------------------------ the numpy reference


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def _scales(m: np.ndarray, top: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """(top / m, m / top) per row, 0 where m == 0."""
    m = np.asarray(m, dtype=np.float64)
    safe = np.where(m == 0, 1.0, m)
    return np.where(m == 0, 0.0, float(top) / safe), np.where(m == 0, 0.0, safe / float(top))


def _to_int(v: np.ndarray, r: np.ndarray, top: int = QMAX) -> np.ndarray:
    """clamp(rint(v r), +-top) as int64 (r broadcast)."""
    a = np.rint(v * r)
    assert np.all(np.isfinite(a))
    return np.clip(a, -top, top).astype(np.int64)


def _low_part(a: np.ndarray, base: int, half: int) -> np.ndarray:
    """a - base floor((a + half) / base): an activation's (base 128) or weight's (base 8) low part."""
    return a - base * np.floor_divide(a + half, base)


def _silu(y: np.ndarray) -> np.ndarray:
    return exact.silu(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))).numpy()


_F32 = np.float32
_EXP32 = [_F32(1.0 / math.factorial(n)) for n in range(8)]


def _silu32(y: np.ndarray) -> np.ndarray:
    """Contract 2's binary32 SiLU, written out in numpy binary32: t = clamp(-y, +-87),
    k = rint(t / ln 2), r = (t - k ln2_hi) - k ln2_lo, Horner to r^7, times 2^k, y / (1 + e)."""
    y = np.asarray(y, dtype=_F32)
    t = np.clip(-y, _F32(-87.0), _F32(87.0))
    k = np.rint(t * _F32(1.4426950408889634))
    r = (t - k * _F32(0.693145751953125)) - k * _F32(1.4286068203094173e-06)
    p = r * _EXP32[7] + _EXP32[6]
    for n in range(5, -1, -1):
        p = p * r + _EXP32[n]
    e = p * np.ldexp(_F32(1.0), k.astype(np.int32))
    out = y / (e + _F32(1.0))
    assert out.dtype == _F32
    return out


def _exp(y: np.ndarray) -> np.ndarray:
    return exact.exp(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))).numpy()


def _assert_exact(acc: np.ndarray) -> None:
    assert np.abs(acc).max(initial=0) < 2**53, "a sum left the exact range of binary64"


class _Reference2:
    """Contract 2 in numpy, from a config and a state dict (float32 tensors). Activations are
    float32 [B, H, W, C]; an integer operand is (int64 [B, H, W, C], value of one [B])."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
        self.c = config
        self.p = {k: v.detach().numpy() for k, v in state.items()}

    # -- leaves

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image by its max |x| (in x's own precision)."""
        m = np.abs(x).reshape(x.shape[0], -1).max(axis=1).astype(np.float64)
        r, s = _scales(m)
        return _to_int(x.astype(np.float64), r.reshape(-1, *([1] * (x.ndim - 1)))), s

    def _weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """10-bit integers [N, K] (fan-in: kernel row, kernel column, channel) and their scales."""
        w = self.p[name + ".weight"].astype(np.float64)
        w2 = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1) if w.ndim == 4 else w
        r, s = _scales(np.abs(w2).max(axis=1), WMAX)
        return _to_int(w2, r[:, None], WMAX), s

    @staticmethod
    def _sums(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Contract 2's sum over the last axis of a [..., K] and w [N, K]: sum (a w - a_lo w_lo)."""
        a_lo, w_lo = _low_part(a, 128, 64), _low_part(w, 8, 4)
        return np.einsum("...k,nk->...n", a, w) - np.einsum("...k,nk->...n", a_lo, w_lo)

    def _finish(self, name: str, acc: np.ndarray, s_x: np.ndarray, add=None, residual=None, out64=False):
        """acc int64 [B, ..., N] -> fl32(acc S) + bias (then + add[b] or residual + y), or binary64."""
        _assert_exact(acc)
        _, s_w = self._weights(name)
        S = (s_x[:, None] * s_w[None, :]).reshape(acc.shape[0], *([1] * (acc.ndim - 2)), -1)
        bias = self.p[name + ".bias"]
        if out64:
            return acc.astype(np.float64) * S + bias.astype(np.float64)
        y = (acc.astype(np.float64) * S).astype(np.float32) + bias
        if add is not None:
            y = y + add.reshape(add.shape[0], *([1] * (y.ndim - 2)), -1)
        if residual is not None:
            y = residual + y
        assert y.dtype == np.float32
        return y

    def conv(self, name: str, operand: tuple[np.ndarray, np.ndarray], *, stride: int = 1, pads=None, up: int = 1,
             add=None, residual=None, out64: bool = False) -> np.ndarray:
        a, s_x = operand
        wq, _ = self._weights(name)
        n, cin, kh, kw = self.p[name + ".weight"].shape
        if up > 1:
            a = a.repeat(up, axis=1).repeat(up, axis=2)
        top, left, bottom, right = pads if pads is not None else (kh // 2,) * 4
        ap = np.pad(a, ((0, 0), (top, bottom), (left, right), (0, 0)))
        b, hp, wp, _ = ap.shape
        oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
        w4 = wq.reshape(n, kh, kw, cin)
        acc = np.zeros((b, oh, ow, n), dtype=np.int64)
        for i in range(kh):
            for j in range(kw):
                window = ap[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
                acc += self._sums(window, w4[:, i, j])
        return self._finish(name, acc, s_x, add, residual, out64)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        a, s_x = self.quantize(x)
        wq, _ = self._weights(name)
        return self._finish(name, self._sums(a, wq), s_x)

    def norm(self, name: str, x: np.ndarray, silu: bool, scale=None, shift=None) -> tuple[np.ndarray, np.ndarray]:
        """GroupNorm (+ SiLU) of x [B, H, W, C] float32 -> the next layer's integer operand."""
        b, h, w, c = x.shape
        groups = max(g for g in range(1, 33) if c % g == 0)
        n = (c // groups) * h * w
        bits = (55 - _ceil_log2(n)) // 2
        m = np.abs(x).reshape(b, -1).max(axis=1).astype(np.float64)
        e = np.frexp(m)[1].astype(np.int64)
        shift_e = np.clip(bits - 1 - e, -1000, 1000)
        xs = x.reshape(b, h * w, c).astype(np.float64)
        q = np.rint(xs * np.ldexp(1.0, shift_e)[:, None, None]).astype(np.int64)
        s1 = q.sum(axis=1).reshape(b, groups, c // groups).sum(axis=2)
        s2 = (q * q).sum(axis=1).reshape(b, groups, c // groups).sum(axis=2)
        _assert_exact(s2)
        mean_q = s1.astype(np.float64) / float(n)
        var_q = np.maximum(s2.astype(np.float64) / float(n) - mean_q * mean_q, 0.0)
        inv = np.ldexp(1.0, -shift_e)[:, None]
        mean, var = mean_q * inv, var_q * inv * inv
        eps = float(self.c.norm_eps)
        rstd = 1.0 / np.sqrt(var + eps)
        gamma, beta = self.p[name + ".weight"].astype(np.float64), self.p[name + ".bias"].astype(np.float64)
        a = np.repeat(rstd, c // groups, axis=1) * gamma
        cc = beta - np.repeat(mean, c // groups, axis=1) * a
        if scale is not None:
            one_plus = 1.0 + scale.astype(np.float64)
            a, cc = a * one_plus, cc * one_plus + shift.astype(np.float64)
        a32, c32 = a.astype(_F32), cc.astype(_F32)  # from here on binary32
        x32 = x.reshape(b, h * w, c)
        y = x32 * a32[:, None, :] + c32[:, None, :]
        f = _silu32(y) if silu else y
        # the scale: max |f(y)| bounded from each channel's extreme inputs (y is monotone in x)
        y1 = x32.min(axis=1) * a32 + c32
        y2 = x32.max(axis=1) * a32 + c32
        lo, hi = np.minimum(y1, y2), np.maximum(y1, y2)
        if silu:
            bound = np.maximum(np.abs(_silu32(lo)), np.abs(_silu32(hi)))
            holds_min = (lo < _F32(-1.2784645427610738)) & (hi > _F32(-1.2784645427610738))
            bound = np.where(holds_min, np.maximum(bound, _F32(0.27846454276107380)), bound)
        else:
            bound = np.maximum(np.abs(lo), np.abs(hi))
        r, s = _scales(bound.max(axis=1).astype(np.float64))
        q = np.rint(f * r.astype(_F32)[:, None, None])
        assert q.dtype == _F32 and np.all(np.isfinite(q))
        return np.clip(q, -QMAX, QMAX).astype(np.int64).reshape(b, h, w, c), s

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """[b, heads, tokens, d] float32 -> float32: integer q k^T, integer weights."""
        tokens, d = q.shape[-2:]
        (qi, sq), (ki, sk), (vi, sv) = self.quantize(q), self.quantize(k), self.quantize(v)
        scores = np.einsum("bhtd,bhsd->bhts", qi, ki)
        _assert_exact(scores)
        c = (sq * sk) * (1.0 / math.sqrt(d))
        z = (scores - scores.max(axis=-1, keepdims=True)).astype(np.float64) * c[:, None, None, None]
        p_bits = min(30, 53 - 14 - _ceil_log2(tokens))
        weights = np.rint(_exp(np.maximum(z, -700.0)) * float(2**p_bits)).astype(np.int64)
        assert np.all(weights.max(axis=-1) == 2**p_bits)  # e^0 is exactly 1
        num = np.einsum("bhts,bhsd->bhtd", weights, vi)
        _assert_exact(num)
        den = weights.sum(axis=-1, keepdims=True)
        return ((num.astype(np.float64) / den.astype(np.float64)) * sv[:, None, None, None]).astype(np.float32)

    def embedding(self, t: np.ndarray) -> np.ndarray:
        half = self.c.ch // 2
        ddpm = self.c.time_embedding == "ddpm"
        divisor = float(max(half - 1, 1) if ddpm else half)
        i = np.arange(half, dtype=np.float64)
        freqs = _exp(i * -9.210340371976184 / divisor)
        tt = t.astype(np.float64) if self.c.timestep_scale == 1.0 else t.astype(np.float64) * self.c.timestep_scale
        sin, cos = exact.sin_cos(torch.from_numpy(tt[:, None] * freqs[None]))
        parts = [sin.numpy(), cos.numpy()] if ddpm else [cos.numpy(), sin.numpy()]
        emb = np.concatenate(parts, axis=1)
        return np.pad(emb, ((0, 0), (0, 1))) if self.c.ch % 2 else emb

    # -- blocks

    def resblock(self, name: str, x: np.ndarray, temb: np.ndarray) -> np.ndarray:
        emb = self.linear(name + ".temb_proj", _silu(temb.astype(np.float64)))
        op1 = self.norm(name + ".norm1", x, silu=True)
        if self.c.scale_shift_norm:
            n = emb.shape[1] // 2
            h = self.conv(name + ".conv1", op1)
            op2 = self.norm(name + ".norm2", h, silu=True, scale=emb[:, :n], shift=emb[:, n:])
        else:
            h = self.conv(name + ".conv1", op1, add=emb)
            op2 = self.norm(name + ".norm2", h, silu=True)
        skip = self.conv(name + ".skip", self.quantize(x)) if name + ".skip.weight" in self.p else x
        return self.conv(name + ".conv2", op2, residual=skip)

    def attnblock(self, name: str, x: np.ndarray) -> np.ndarray:
        b, h, w, c = x.shape
        heads = self.c.num_heads
        qkv = self.conv(name + ".qkv", self.norm(name + ".norm", x, silu=False)).reshape(b, h * w, 3, heads, -1)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        out = self.attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return self.conv(name + ".proj", self.quantize(out), residual=x)

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        c = self.c
        levels = len(c.ch_mult)
        attn = {i for i in range(levels) if c.image_size // 2**i in c.attn_resolutions}
        temb = self.linear("temb.2", _silu(self.linear("temb.0", self.embedding(t)).astype(np.float64)))
        h = self.conv("conv_in", self.quantize(x.transpose(0, 2, 3, 1).astype(np.float64)))
        skips, idx = [h], 0
        for level in range(levels):
            for _ in range(c.num_res_blocks):
                h = self.resblock(f"down.{idx}.0", h, temb)
                if level in attn:
                    h = self.attnblock(f"down.{idx}.1", h)
                skips.append(h)
                idx += 1
            if level != levels - 1:
                pads = (0, 0, 1, 1) if c.downsample_padding == "end" else None
                h = self.conv(f"down.{idx}.0.conv", self.quantize(h), stride=2, pads=pads)
                skips.append(h)
                idx += 1
        h = self.resblock("mid.2", self.attnblock("mid.1", self.resblock("mid.0", h, temb)), temb)
        idx = 0
        for level in reversed(range(levels)):
            for _ in range(c.num_res_blocks + 1):
                h = self.resblock(f"up.{idx}.0", np.concatenate([h, skips.pop()], axis=3), temb)
                if level in attn:
                    h = self.attnblock(f"up.{idx}.1", h)
                idx += 1
            if level != 0:
                h = self.conv(f"up.{idx}.0.conv", self.quantize(h), up=2)
                idx += 1
        assert not skips
        out = self.conv("conv_out", self.norm("norm_out", h, silu=True), out64=True)
        return out.transpose(0, 3, 1, 2)


def _run(model: UNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return exact_network2(model)(x, t)


# ------------------------------------------------------------------ bit-exactness


@pytest.mark.parametrize("config", [TINY, WIDE, VARIANT], ids=["tiny", "wide", "variant"])
def test_exact_network2_equals_the_independent_numpy_reference_bit_for_bit(config):
    """The fast network (int8 parts through oneDNN, binary64 products, C kernels) and the
    numpy reference (int64 sums of the 14-bit integers everywhere) give identical float64
    bits on inputs of mixed scales (an all-zero and a constant image included), timesteps
    0..999, and the scale-shift / 'end'-padding / improved-embedding variants."""
    model = random_model(config, seed=3)
    x, t = random_inputs(config, 6)
    got = _run(model, x, t).numpy()
    ref = _Reference2(config, model.state_dict())(x.numpy(), t.numpy())
    assert got.dtype == np.float64 and got.shape == (6, config.out_channels, config.image_size, config.image_size)
    assert np.all(np.isfinite(got))
    mismatch = got != ref
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ, max {np.abs(got - ref).max()}"


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "binary64"])
@pytest.mark.parametrize("chunk_bytes", [1, 40_000], ids=["one-image", "some-images"])
@pytest.mark.parametrize("config", [WIDE, VARIANT], ids=["wide", "variant"])
def test_products_made_a_few_images_at_a_time_give_the_same_bits(config, chunk_bytes, int8, monkeypatch):
    """`exact_net2.PRODUCT_CHUNK_BYTES` small enough that every layer takes its products one
    image at a time (1 byte), or 1 to 5 by layer (40,000 bytes; a batch of 5 leaves
    remainders): the numpy reference's bits still, through the int8 products and through the
    binary64 ones, with upsampling, residuals, embeddings added and the binary64 output layer."""
    from diffcodec import exact2_products, exact_net2
    monkeypatch.setattr(exact_net2, "PRODUCT_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(exact2_products, "INT8_OFF", not int8)
    model = random_model(config, seed=21)
    x, t = random_inputs(config, 5, seed=22)
    net = exact_network2(model)
    calls = []
    for conv in (m for m in net.modules() if isinstance(m, exact2_products.IntConv)):
        conv.products = (lambda f: lambda op, up=1: calls.append(op.shape[-4]) or f(op, up))(conv.products)
    with torch.no_grad():
        got = net(x, t).numpy()
    assert set(calls) == {1} if chunk_bytes == 1 else {1, 2, 5} <= set(calls), calls  # the batch split, by layer
    forms = {m.form(torch.device("cpu")) for m in net.modules() if isinstance(m, exact2_products.IntConv)}
    assert forms == {"planes" if int8 and exact2_products.qconv_verified() else "values"}, forms
    ref = _Reference2(config, model.state_dict())(x.numpy(), t.numpy())
    mismatch = got != ref
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ, max {np.abs(got - ref).max()}"


@pytest.mark.parametrize("config", [WIDE, VARIANT], ids=["wide", "variant"])
def test_exact_network2_equals_the_reference_at_the_bounds(config):
    """Every weight quantizes to +-WMAX (`adversarial_model`) and the inputs are saturated
    (+-1e4 and signs): each layer's operands sit at the edges of the int8 parts' ranges and
    its sums near their bounds, where a saturating or overflowing product would show. Still
    identical to the int64 reference."""
    model = adversarial_model(config, seed=5)
    g = torch.Generator().manual_seed(6)
    s = config.image_size
    x = torch.where(torch.rand(4, config.in_channels, s, s, generator=g) < 0.5, -1e4, 1e4).to(torch.float64)
    x[1] = 1e4  # every pixel at the max: each im2col row all +QMAX
    t = torch.tensor([0.0, 999.0, 3.0, 500.0], dtype=torch.float64)
    got = _run(model, x, t).numpy()
    ref = _Reference2(config, model.state_dict())(x.numpy(), t.numpy())
    assert np.all(np.isfinite(got))
    assert np.array_equal(got, ref)


def _float64_network(model: UNet) -> UNet:
    from tests.test_exact_net import float64_network  # the float64 UNet with a float64 embedding

    return float64_network(model)


@pytest.mark.parametrize("config", [TINY, WIDE], ids=["tiny", "wide"])
def test_exact_network2_is_close_to_the_float64_network(config):
    """14-bit activations, 10-bit weights: the output is within 3e-2 of the float64 network's
    scale per image on these random networks (measured 0.3 % to 1.2 %; 0.3 % on the shipped
    model), on inputs of ordinary scale."""
    model = random_model(config, seed=7)
    x, t = random_inputs(config, 5, seed=8)
    keep = [0, 2, 4]  # skip the all-zero and the 1e-3 image: their outputs are all bias
    with torch.no_grad():
        y = exact_network2(model)(x[keep], t[keep])
        ref = _float64_network(model)(x[keep], t[keep])
    rel = (y - ref).abs().amax(dim=(1, 2, 3)) / ref.abs().amax(dim=(1, 2, 3))
    assert torch.all(rel < 3e-2), rel


def test_exact_network2_leaves_the_model_alone_and_keeps_no_float_layers():
    model = random_model(TINY, seed=1)
    before = copy.deepcopy(model.state_dict())
    tensors = [*model.parameters(), *model.buffers()]
    net = exact_network2(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.numel() for p in net.parameters())
    # built from the model's own tensors (`exact_net.cpu_copy`: no copy of the weights), none kept
    assert [*model.parameters(), *model.buffers()] == tensors
    addresses = {t.data_ptr() for t in tensors}
    assert not any(b.data_ptr() in addresses for b in net.buffers())
    kinds = {type(m).__name__ for m in net.modules()}
    assert not kinds & {"Conv2d", "Linear", "GroupNorm", "ResBlock", "AttnBlock", "Downsample", "Upsample", "SiLU"}
    with pytest.raises(TypeError):
        exact_network2(nn.Linear(2, 2))


def _bits(y: torch.Tensor) -> bytes:
    return y.contiguous().numpy().astype("<f8").tobytes()


def test_output_is_the_same_bits_alone_in_a_batch_and_in_any_batch_order():
    model = random_model(WIDE, seed=9)
    net = exact_network2(model)
    x, t = random_inputs(WIDE, 6, seed=10)
    with torch.no_grad():
        full = net(x, t)
        order = torch.tensor([3, 0, 5, 1, 4, 2])
        shuffled = net(x[order], t[order])
        alone = [net(x[i:i + 1], t[i:i + 1]) for i in range(6)]
    assert _bits(shuffled) == _bits(full[order])
    for i in range(6):
        assert _bits(alone[i]) == _bits(full[i:i + 1])


def test_output_is_the_same_bits_at_one_and_two_threads():
    model = random_model(WIDE, seed=11)
    net = exact_network2(model)
    x, t = random_inputs(WIDE, 4, seed=12)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one = net(x, t)
        torch.set_num_threads(2)
        with torch.no_grad():
            two = net(x, t)
    finally:
        torch.set_num_threads(saved)
    assert _bits(one) == _bits(two)


def test_output_does_not_depend_on_the_input_dtype():
    model = random_model(TINY, seed=13)
    net = exact_network2(model)
    x, t = random_inputs(TINY, 3, seed=14)
    x32 = x.to(torch.float32)
    with torch.no_grad():
        assert _bits(net(x32, t)) == _bits(net(x32.to(torch.float64), t.to(torch.long)))


def _golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    from tests.test_exact_net import _golden_inputs as golden

    return golden()


def _sha(y: torch.Tensor) -> str:
    return hashlib.sha256(_bits(y)).hexdigest()


def test_shipped_model_contract2_output_is_close_to_float64_and_matches_the_golden_hash():
    """The shipped model's contract-2 output on the golden inputs: within 5e-3 of the float64
    network's scale per image (measured 1.4e-3 and 2.8e-3), and pinned by hash."""
    loaded = load_checkpoint(None)
    x, t = _golden_inputs()
    with torch.no_grad():
        y = exact_network2(loaded.model)(x, t)
        ref = _float64_network(loaded.model)(x, t)
    rel = (y - ref).abs().amax(dim=(1, 2, 3)) / ref.abs().amax(dim=(1, 2, 3))
    assert torch.all(rel < 5e-3), rel
    assert _sha(y) == GOLDEN_DEFAULT_SHA256


# (environment, what the subprocess must report): ATen's scalar / AVX2 kernels, oneDNN capped
# at SSE4.1 / AVX2 / AVX-512 without VNNI (the int8 products then go through vpmaddubsw, which
# saturates pairs in int16: the operand ranges make that impossible), the C kernels' SSE2 and
# AVX2 libraries (ATEN_CPU_CAPABILITY caps their level too) and this machine's, the torch twins
# instead of them, other thread counts; and the path a GPU takes (torch twins, binary64
# products), on this CPU.
_ENVIRONMENTS = [
    {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1"},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DIFFCODEC_NO_NATIVE": "1", "OMP_NUM_THREADS": "1"},
    # a GPU's code path on this CPU: the torch twins and binary64 products everywhere
    {"DIFFCODEC_NO_NATIVE": "1", "DIFFCODEC_NO_INT8": "1", "OMP_NUM_THREADS": "2"},
]
_CLEARED = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DIFFCODEC_NO_NATIVE",
            "DIFFCODEC_NO_INT8", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")

_SUBPROCESS_SCRIPT = r"""
import hashlib, json, sys, torch
from diffcodec.checkpoint import load_checkpoint
from diffcodec.config import ModelConfig
from diffcodec.exact_net2 import exact_network2
from diffcodec.unet import UNet
saved = torch.load(sys.argv[1] + "/saved.pt", weights_only=False)
model = UNet(ModelConfig(**saved["config"])).eval()
model.load_state_dict(saved["state"])
def sha(y):
    return hashlib.sha256(y.contiguous().numpy().astype("<f8").tobytes()).hexdigest()
with torch.no_grad():
    small = sha(exact_network2(model)(saved["x"], saved["t"]))
    default = sha(exact_network2(load_checkpoint(None).model)(saved["gx"], saved["gt"]))
from diffcodec import native
print(json.dumps({"small": small, "default": default, "threads": torch.get_num_threads(),
                  "capability": torch.backends.cpu.get_cpu_capability(), "native": native.level("exact2")}))
"""


@pytest.mark.slow
def test_contract2_output_is_the_same_bits_under_other_cpu_kernels_and_thread_counts(tmp_path):
    """Fresh processes with other ATen, oneDNN and C kernel code paths (module comment), the
    torch twins, and other thread counts compute the adversarial variant network's and the
    shipped model's outputs (on 16x16 crops of the golden inputs) with this process's bits."""
    model = adversarial_model(VARIANT, seed=12)
    x, t = random_inputs(VARIANT, 5, seed=5)
    gx, gt = _golden_inputs()
    gx = gx[..., 8:24, 8:24].contiguous()
    torch.save({"config": {k: getattr(VARIANT, k) for k in VARIANT.__dataclass_fields__},
                "state": model.state_dict(), "x": x, "t": t, "gx": gx, "gt": gt}, tmp_path / "saved.pt")
    (tmp_path / "run.py").write_text(_SUBPROCESS_SCRIPT)
    with torch.no_grad():
        expected = {"small": _sha(exact_network2(model)(x, t)),
                    "default": _sha(exact_network2(load_checkpoint(None).model)(gx, gt))}
    procs = []
    for extra in _ENVIRONMENTS:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(extra, PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    for extra, proc in zip(_ENVIRONMENTS, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["threads"] == int(extra["OMP_NUM_THREADS"]), (extra, got)
        if "ATEN_CPU_CAPABILITY" in extra:
            assert got["capability"] == extra["ATEN_CPU_CAPABILITY"].upper(), (extra, got)
        if "DIFFCODEC_NO_NATIVE" in extra:
            assert got["native"] is None, (extra, got)
        elif native.level("exact2") not in (None, "generic"):  # the C kernels at the level the cap allows
            cap = {"default": 1, "avx2": 3}.get(extra.get("ATEN_CPU_CAPABILITY"), 4)
            want = {4: "v4", 3: "v3", 1: "base"}[min(cap, native.cpu_level())]
            assert got["native"] == want, (extra, got)
        assert got["small"] == expected["small"], extra
        assert got["default"] == expected["default"], extra
