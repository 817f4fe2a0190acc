"""exact_net: the UNet under the exact arithmetic contract.

The central check is an independent, slow re-implementation of the whole fixed-point
network in numpy (`_Reference`): every convolution, linear layer, attention product and
GroupNorm sum is an int64 sum of integers (no torch matmul, no BLAS), bit widths come from
the fan-in by integer arithmetic (`int.bit_length`, no log2), and the network is walked from
the config and the state dict alone (not from the torch modules). Only the elementwise
transcendentals call `diffcodec.exact` (exp, sin_cos), which test_exact.py checks against
libm. The torch exact network must equal it bit for bit. Then: invariance to thread count,
batch size, batch order and (in subprocesses) the CPU kernels torch, oneDNN and MKL pick;
and a golden hash of the shipped model's exact output, so that any change to the exact
arithmetic is caught and has to be a deliberate format change.
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
import torch.nn.functional as F
from torch import nn

from diffcodec import exact
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec.entropy import seeded_words
from diffcodec.config import ModelConfig
from diffcodec.exact_net import ExactConv2d, ExactLinear, exact_network, output_digest
from diffcodec.unet import UNet

REPO = Path(__file__).resolve().parents[1]

# One torch thread (the thread-count test sets its own): on a shared 2-core machine spinning
# OpenMP threads make this module several times slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The brief's tiny network (one channel per GroupNorm group, attention on 4x4 = 16 tokens)
# and a wider one (2-4 channels per group, two heads, attention on 8x8 = 64 tokens, odd
# fan-ins such as 108 * 9).
TINY = ModelConfig(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                   learn_sigma=True)
WIDE = ModelConfig(image_size=8, ch=36, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                   learn_sigma=True, num_heads=2)

# sha256 of the float64 (little-endian) output bits of the shipped model's exact network on
# `_golden_inputs()`. Changing it is changing the exact-path file format (CONTRACT_VERSION).
GOLDEN_DEFAULT_SHA256 = "fbedcfe30cc3501dead4439f28bb4e08b89a60d32856ebcae685b801ea3a5e25"


def random_model(config: ModelConfig, seed: int = 0) -> UNet:
    """A UNet with every parameter random (zero-initialised layers too, so the output depends
    on every layer); norm weights around 1, float32 like a loaded checkpoint."""
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


def random_inputs(config: ModelConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 images of mixed scales (unit noise, an all-zero image, 1e3, 1e-3, uniform) and
    integer timesteps (0 and 999 included)."""
    g = torch.Generator().manual_seed(seed)
    s = config.image_size
    x = torch.randn(batch, config.in_channels, s, s, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 0.0, 1e3, 1e-3, 2.0] * batch, dtype=torch.float64)[:batch]
    x = x * scales[:, None, None, None]
    t = torch.randint(0, 1000, (batch,), generator=g).to(torch.float64)
    t[:2] = torch.tensor([0.0, 999.0])[: min(batch, 2)]
    return x, t


# ------------------------------------------------------------------ the numpy reference


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def _affine_bits(fan_in: int) -> tuple[int, int]:
    """Activation and weight bits: a + w = 55 - max(1, ceil log2 fan_in), split evenly."""
    budget = 55 - max(1, _ceil_log2(fan_in))
    return budget // 2, budget - budget // 2


def _quantize(x: np.ndarray, bits: int, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 q, int64 shift): q = round-half-even(x 2^shift), shift = bits - 1 - e where
    max |x| over ``axes`` < 2^e <= 2 max |x|, clamped to [-1000, 1000]."""
    m = np.abs(x).max(axis=axes, keepdims=True)
    shift = np.clip(bits - 1 - np.frexp(m)[1].astype(np.int64), -1000, 1000)
    q = np.round(x * np.ldexp(1.0, shift))
    assert np.all(np.abs(q) <= 2.0 ** (bits - 1))
    return q.astype(np.int64), shift


def _assert_exact(acc: np.ndarray) -> None:
    assert np.abs(acc).max(initial=0) <= 2**53, "a sum left the exact range of binary64"


def _groups(channels: int) -> int:
    return max(g for g in range(1, 33) if channels % g == 0)


class _Reference:
    """The exact network in numpy, from a config and a state dict (float32 tensors)."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
        self.c = config
        self.p = {k: v.detach().to(torch.float64).numpy() for k, v in state.items()}

    # -- leaves

    def conv(self, name: str, x: np.ndarray, stride: int = 1) -> np.ndarray:
        w, bias = self.p[name + ".weight"], self.p[name + ".bias"]
        out, cin, kh, kw = w.shape
        a_bits, w_bits = _affine_bits(cin * kh * kw)
        wq, w_shift = _quantize(w.reshape(out, -1), w_bits, (1,))
        wq = wq.reshape(w.shape)
        xq, x_shift = _quantize(x, a_bits, (1, 2, 3))
        pad = kh // 2
        xp = np.pad(xq, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        b, _, h, wd = x.shape
        oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
        acc = np.zeros((b, out, oh, ow), dtype=np.int64)
        for i in range(kh):
            for j in range(kw):
                window = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
                acc += np.einsum("oc,bcyx->boyx", wq[:, :, i, j], window)
        _assert_exact(acc)
        x_scale = np.ldexp(1.0, -x_shift)  # [b, 1, 1, 1]
        w_scale = np.ldexp(1.0, -w_shift).reshape(1, out, 1, 1)
        return acc.astype(np.float64) * x_scale * w_scale + bias.reshape(1, out, 1, 1)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        w, bias = self.p[name + ".weight"], self.p[name + ".bias"]
        a_bits, w_bits = _affine_bits(w.shape[1])
        wq, w_shift = _quantize(w, w_bits, (1,))
        xq, x_shift = _quantize(x, a_bits, (1,))
        acc = np.einsum("bi,oi->bo", xq, wq)
        _assert_exact(acc)
        return acc.astype(np.float64) * np.ldexp(1.0, -x_shift) * np.ldexp(1.0, -w_shift).reshape(1, -1) + bias

    def norm(self, name: str, x: np.ndarray) -> np.ndarray:
        b, c, h, w = x.shape
        g = _groups(c)
        n = (c // g) * h * w
        bits = (55 - _ceil_log2(n)) // 2
        q, shift = _quantize(x, bits, (1, 2, 3))
        qg = q.reshape(b, g, n)
        s1, s2 = qg.sum(-1, keepdims=True), (qg * qg).sum(-1, keepdims=True)
        _assert_exact(s2)
        mean_q = s1.astype(np.float64) / float(n)
        var_q = np.maximum(s2.astype(np.float64) / float(n) - mean_q * mean_q, 0.0)
        inv = np.ldexp(1.0, -shift).reshape(b, 1, 1)
        var = var_q * inv * inv
        rstd = 1.0 / np.sqrt(var + 1e-5)
        y = ((qg.astype(np.float64) * inv - mean_q * inv) * rstd).reshape(b, c, h, w)
        return y * self.p[name + ".weight"].reshape(1, c, 1, 1) + self.p[name + ".bias"].reshape(1, c, 1, 1)

    @staticmethod
    def exp(x: np.ndarray) -> np.ndarray:
        return exact.exp(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def silu(self, x: np.ndarray) -> np.ndarray:
        return x / (1.0 + self.exp(-x))

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """[b, heads, tokens, d]: integer q k^T, integer weights round(2^P e^(z - max z))."""
        tokens, d = q.shape[-2:]
        qk_bits = (55 - max(1, _ceil_log2(d))) // 2
        qq, q_shift = _quantize(q, qk_bits, (1, 2, 3))
        kq, k_shift = _quantize(k, qk_bits, (1, 2, 3))
        scores = np.einsum("bhtd,bhsd->bhts", qq, kq)
        _assert_exact(scores)
        logits = scores.astype(np.float64) * np.ldexp(1.0, -(q_shift + k_shift)) * (1.0 / math.sqrt(d))
        z = logits - logits.max(axis=-1, keepdims=True)
        budget = 54 - _ceil_log2(tokens)
        p_bits = budget // 2
        weights = np.round(self.exp(z) * float(2**p_bits))
        assert np.all(weights.max(axis=-1) == 2.0**p_bits)  # e^0 is exactly 1
        wi = weights.astype(np.int64)
        vq, v_shift = _quantize(v, budget - p_bits, (1, 2, 3))
        num = np.einsum("bhts,bhsd->bhtd", wi, vq)
        den = wi.sum(axis=-1, keepdims=True)
        _assert_exact(num)
        return num.astype(np.float64) / den.astype(np.float64) * np.ldexp(1.0, -v_shift)

    def embedding(self, t: np.ndarray) -> np.ndarray:
        half = self.c.ch // 2
        freqs = self.exp(np.arange(half, dtype=np.float64) * -9.210340371976184 / float(max(half - 1, 1)))
        sin, cos = exact.sin_cos(torch.from_numpy(t[:, None] * freqs[None]))
        emb = np.concatenate([sin.numpy(), cos.numpy()], axis=1)
        return np.pad(emb, ((0, 0), (0, 1))) if self.c.ch % 2 else emb

    # -- blocks

    def resblock(self, name: str, x: np.ndarray, temb: np.ndarray) -> np.ndarray:
        h = self.conv(name + ".conv1", self.silu(self.norm(name + ".norm1", x)))
        h = h + self.linear(name + ".temb_proj", self.silu(temb))[:, :, None, None]
        h = self.conv(name + ".conv2", self.silu(self.norm(name + ".norm2", h)))
        skip = self.conv(name + ".skip", x) if name + ".skip.weight" in self.p else x
        return skip + h

    def attnblock(self, name: str, x: np.ndarray) -> np.ndarray:
        b, c, h, w = x.shape
        heads = self.c.num_heads
        qkv = self.conv(name + ".qkv", self.norm(name + ".norm", x)).reshape(b, 3, heads, c // heads, h * w)
        q, k, v = (qkv[:, i].transpose(0, 1, 3, 2) for i in range(3))
        out = self.attention(q, k, v).transpose(0, 1, 3, 2).reshape(b, c, h, w)
        return x + self.conv(name + ".proj", out)

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        c = self.c
        levels = len(c.ch_mult)
        attn = {i for i in range(levels) if c.image_size // 2**i in c.attn_resolutions}
        temb = self.linear("temb.2", self.silu(self.linear("temb.0", self.embedding(t))))
        h = self.conv("conv_in", x)
        skips, idx = [h], 0
        for level in range(levels):
            for _ in range(c.num_res_blocks):
                h = self.resblock(f"down.{idx}.0", h, temb)
                if level in attn:
                    h = self.attnblock(f"down.{idx}.1", h)
                skips.append(h)
                idx += 1
            if level != levels - 1:
                h = self.conv(f"down.{idx}.0.conv", h, stride=2)
                skips.append(h)
                idx += 1
        h = self.resblock("mid.2", self.attnblock("mid.1", self.resblock("mid.0", h, temb)), temb)
        idx = 0
        for level in reversed(range(levels)):
            for _ in range(c.num_res_blocks + 1):
                h = self.resblock(f"up.{idx}.0", np.concatenate([h, skips.pop()], axis=1), temb)
                if level in attn:
                    h = self.attnblock(f"up.{idx}.1", h)
                idx += 1
            if level != 0:
                h = self.conv(f"up.{idx}.0.conv", h.repeat(2, axis=2).repeat(2, axis=3))
                idx += 1
        assert not skips
        return self.conv("conv_out", self.silu(self.norm("norm_out", h)))


# ------------------------------------------------------------------ bit-exactness


@pytest.mark.parametrize("config", [TINY, WIDE], ids=["tiny", "wide"])
def test_exact_network_equals_the_independent_numpy_reference_bit_for_bit(config):
    """The torch exact network (unfold + BLAS float64 matmuls, torch reductions) and the
    numpy reference (int64 sums everywhere) give identical float64 bits on inputs of mixed
    scales (an all-zero image included) and timesteps 0..999: every rule of the fixed point
    (bit widths, scales, rounding, GroupNorm's formula order, integer softmax weights) is
    what the docstrings say, and the torch products are exact."""
    model = random_model(config, seed=3)
    x, t = random_inputs(config, 5)
    with torch.no_grad():
        got = exact_network(model)(x, t).numpy()
    ref = _Reference(config, model.state_dict())(x.numpy(), t.numpy())
    assert got.dtype == np.float64 and got.shape == (5, config.out_channels, config.image_size, config.image_size)
    assert np.all(np.isfinite(got))
    mismatch = got != ref
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ, max {np.abs(got - ref).max()}"


class _Float64Embedding(nn.Module):
    """The sinusoidal embedding in float64 (torch's libm; the float UNet's is float32, whose
    argument rounding at t ~ 1000 alone moves the output by ~1e-5)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
        args = t.to(torch.float64)[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def float64_network(model: UNet) -> UNet:
    net = copy.deepcopy(model).double().eval()
    net.embed = _Float64Embedding(model.config.ch)
    return net


def _layer_cases(kinds: tuple[str, ...]):
    """(name, torch output, reference output) for every leaf of the wide network whose type
    name is in ``kinds``, on random inputs with mixed per-sample scales and nonzero means."""
    from diffcodec.exact_net import ExactAttention, ExactGroupNorm, ExactSiLU, ExactTimestepEmbedding

    model = random_model(WIDE, seed=13)
    net = exact_network(model)
    ref = _Reference(WIDE, model.state_dict())
    g = torch.Generator().manual_seed(14)
    sample_scales = torch.tensor([1.0, 1e-4, 37.0, 0.0, 3e-2, 5.0], dtype=torch.float64)

    def rand(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.3
        return x * sample_scales[: shape[0]].reshape(-1, *([1] * (len(shape) - 1)))

    with torch.no_grad():
        for name, m in net.named_modules():
            if type(m).__name__ not in kinds:
                continue
            if isinstance(m, ExactConv2d):
                x = rand(6, m.w_int.shape[1] // (m.kernel_size[0] * m.kernel_size[1]), 8, 8)
                yield name, m(x), ref.conv(name, x.numpy(), stride=m.stride[0])
            elif isinstance(m, ExactLinear):
                x = rand(6, m.w_int.shape[1])
                yield name, m(x), ref.linear(name, x.numpy())
            elif isinstance(m, ExactGroupNorm):
                x = rand(6, m.weight.shape[0], 8, 8)
                yield name, m(x), ref.norm(name, x.numpy())
            elif isinstance(m, ExactAttention):
                q, k, v = rand(6, 2, 64, 36), rand(6, 2, 64, 36), rand(6, 2, 64, 36)
                yield name, m(q, k, v), ref.attention(q.numpy(), k.numpy(), v.numpy())
            elif isinstance(m, ExactSiLU):
                x = rand(6, 1000) * 20
                yield name, m(x), ref.silu(x.numpy())
            elif isinstance(m, ExactTimestepEmbedding):
                t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0], dtype=torch.float64)
                yield name, m(t), ref.embedding(t.numpy())


def test_every_exact_layer_equals_its_reference_layer_bit_for_bit():
    """Layer by layer (every conv, linear, GroupNorm and attention of the wide network, the
    SiLU and the timestep embedding) on random inputs of mixed per-sample scales: identical
    bits. The whole-network test cannot see an ulp change inside a layer whose output the
    next convolution re-quantizes to ~25 bits (a GroupNorm dividing by sqrt(var + eps)
    instead of multiplying by its reciprocal passes it); this one does."""
    kinds = ("ExactConv2d", "ExactLinear", "ExactGroupNorm", "ExactAttention", "ExactSiLU", "ExactTimestepEmbedding")
    seen = set()
    for name, got, expected in _layer_cases(kinds):
        seen.add(name.split(".")[-1] if "attention" in name else name)
        assert got.dtype == torch.float64 and np.array_equal(got.numpy(), expected), name
    assert len(seen) > 35 and "attention" in seen and "embed" in seen and "norm_out" in seen


def test_every_exact_group_norm_equals_its_reference_bit_for_bit():
    """Every GroupNorm of the wide network (2 to 4 channels per group) equals the reference
    bit for bit (numpy's sqrt: correctly rounded, as the contract's rule 1 requires of every
    sqrt; torch's CPU sqrt is not on MKL builds, so exact_net uses `exact.sqrt`)."""
    cases = list(_layer_cases(("ExactGroupNorm",)))
    assert len(cases) > 10
    for name, got, expected in cases:
        assert np.array_equal(got.numpy(), expected), name


@pytest.mark.parametrize("config", [TINY, WIDE], ids=["tiny", "wide"])
def test_exact_network_is_close_to_the_float64_network(config):
    """The fixed point changes the function by quantization noise only: against the UNet in
    float64 (float64 embedding too) the exact output of an input of scale 1 to 1e3 differs by
    < 1e-5 of the output's scale (measured: <= 2e-6 over seeds), and it does differ (it is not the
    float network). Off-scale inputs lose more: the all-zero image ~1e-5 and a 1e-3-scale
    image up to ~8e-5, because GroupNorm quantizes the whole sample with one step and a group
    whose spread is small next to the sample's max (a bias-dominated channel) keeps few bits
    after its mean is subtracted; bounded here by 5e-4."""
    model = random_model(config, seed=4)
    x, t = random_inputs(config, 5, seed=2)
    with torch.no_grad():
        exact_out = exact_network(model)(x, t)
        float_out = float64_network(model)(x, t)
    scale = float_out.abs().amax(dim=(1, 2, 3), keepdim=True)
    rel = ((exact_out - float_out).abs() / scale).amax(dim=(1, 2, 3))
    on_scale = [0, 2, 4]  # random_inputs' scales are 1, 0, 1e3, 1e-3, 2
    assert torch.all(rel[on_scale] < 1e-5), rel
    assert torch.all(rel < 5e-4), rel
    assert torch.all(rel[on_scale] > 0)


def test_exact_network_leaves_the_model_alone_and_keeps_no_float_layers():
    """exact_network copies: the float model keeps its float32 parameters and its output; the
    copy has no parameters and no Conv2d / Linear / GroupNorm / SiLU / Attention left."""
    model = random_model(TINY, seed=5)
    x, t = random_inputs(TINY, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x.float(), t)
        net = exact_network(model)
        y1 = model(x.float(), t)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(y0, y1)
    assert not list(net.parameters())
    float_leaves = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.SiLU)
    assert not [m for m in net.modules() if isinstance(m, float_leaves)]
    assert not [m for m in net.modules() if type(m).__name__ in ("Attention", "TimestepEmbedding")]


def test_every_affine_layer_keeps_its_dot_products_below_2_53():
    """In the shipped-size layers of a network: the stored weights are integers with
    |w| <= 2^(weight_bits - 1) and fan_in 2^(act_bits - 1) 2^(weight_bits - 1) <= 2^53."""
    net = exact_network(random_model(WIDE, seed=6))
    layers = [m for m in net.modules() if isinstance(m, (ExactConv2d, ExactLinear))]
    assert len(layers) > 20
    for m in layers:
        fan_in = m.w_int.shape[1]
        assert torch.equal(m.w_int, torch.round(m.w_int))
        assert m.w_int.abs().max() <= 2.0 ** (m.weight_bits - 1)
        assert fan_in * 2 ** (m.act_bits - 1) * 2 ** (m.weight_bits - 1) <= 2**53


def test_exact_forward_calls_no_float_layer_and_no_libm_transcendental(monkeypatch):
    """The forward pass never reaches torch's exp/log/sin/cos/tanh/sigmoid/softmax, the fused
    attention, silu or the float conv/linear/group_norm kernels (any such call raises here),
    and still produces the same bits as without the traps."""
    model = random_model(TINY, seed=7)
    x, t = random_inputs(TINY, 3)
    net = exact_network(model)
    with torch.no_grad():
        expected = net(x, t)

    def trap(*args, **kwargs):
        raise AssertionError("a float / libm op was called in the exact network")

    for mod, names in ((torch, ("exp", "log", "sin", "cos", "tanh", "sigmoid", "softmax", "pow", "erf")),
                       (torch.Tensor, ("exp", "log", "sin", "cos", "tanh", "sigmoid", "softmax", "pow", "erf")),
                       (F, ("silu", "softmax", "scaled_dot_product_attention", "conv2d", "linear", "group_norm")),
                       (math, ("exp", "log", "sin", "cos", "tanh", "pow", "erf"))):
        for name in names:
            monkeypatch.setattr(mod, name, trap)
    with torch.no_grad():
        got = net(x, t)
    monkeypatch.undo()
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ invariance


def _bits(y: torch.Tensor) -> bytes:
    return y.detach().contiguous().numpy().astype("<f8").tobytes()


def test_output_is_the_same_bits_alone_in_a_batch_and_in_any_batch_order():
    """Each image's output depends only on that image and its timestep: a sample computed
    alone, inside a batch of 16, and inside the same batch permuted gives identical bits."""
    net = exact_network(random_model(WIDE, seed=8))
    x, t = random_inputs(WIDE, 16, seed=3)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch = net(x, t)
        permuted = net(x[perm], t[perm])
        alone = [net(x[i:i + 1], t[i:i + 1]) for i in (0, 1, 7, 15)]
        pair = net(x[[15, 7]], t[[15, 7]])
    assert _bits(permuted) == _bits(batch[perm])
    for i, y in zip((0, 1, 7, 15), alone):
        assert _bits(y) == _bits(batch[i:i + 1])
    assert _bits(pair) == _bits(batch[[15, 7]])


def test_output_is_the_same_bits_at_one_and_two_threads():
    """Intra-op parallelism (torch / OpenMP / MKL splitting the matmuls and reductions) does
    not change a bit. The thread count is restored by conftest's autouse fixture."""
    net = exact_network(random_model(WIDE, seed=9))
    x, t = random_inputs(WIDE, 8, seed=4)
    with torch.no_grad():
        torch.set_num_threads(1)
        one = net(x, t)
        torch.set_num_threads(2)
        two = net(x, t)
    assert _bits(one) == _bits(two)


def test_output_does_not_depend_on_the_input_dtype():
    """The same pixel values given as float32 or float64 give the same bits (the docstring:
    inputs may be any float dtype)."""
    net = exact_network(random_model(TINY, seed=10))
    x, t = random_inputs(TINY, 3)
    x = x.float().double()  # values representable in float32
    with torch.no_grad():
        assert _bits(net(x.float(), t)) == _bits(net(x, t))


def test_timestep_dtype_does_not_matter():
    """Integer timesteps as int64 or float64 tensors give the same bits."""
    net = exact_network(random_model(TINY, seed=11))
    x, t = random_inputs(TINY, 3)
    with torch.no_grad():
        assert _bits(net(x, t.to(torch.int64))) == _bits(net(x, t))


def test_output_digest_is_a_hash_of_the_output_bits():
    """output_digest is blake2b over the little-endian float64 bytes (any input dtype), and
    a one-ulp change of one value changes it."""
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = hashlib.blake2b(y.numpy().astype("<f8").tobytes(), digest_size=4).digest()
    assert output_digest(y) == expected and len(output_digest(y, 8)) == 8
    z = y.clone()
    z[1, 2, 3, 3] = torch.nextafter(z[1, 2, 3, 3], torch.tensor(math.inf, dtype=torch.float64))
    assert output_digest(z) != expected


# ------------------------------------------------------------------ other kernels, other processes

_SUBPROCESS_SCRIPT = r"""
import hashlib, json, sys
import torch
from diffcodec.checkpoint import load_checkpoint
from diffcodec.config import ModelConfig
from diffcodec.exact_net import exact_network
from diffcodec.unet import UNet

work = sys.argv[1]
saved = torch.load(work + "/saved.pt", weights_only=True)
model = UNet(ModelConfig(**saved["config"]))
model.load_state_dict(saved["state"])
with torch.no_grad():
    small = exact_network(model)(saved["x"], saved["t"])
    default = exact_network(load_checkpoint(None).model)(saved["gx"], saved["gt"])
digest = lambda y: hashlib.sha256(y.numpy().astype("<f8").tobytes()).hexdigest()
print(json.dumps({"small": digest(small), "default": digest(default),
                  "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}))
"""


def _golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32x32 inputs from SplitMix64 words (the same on every machine and numpy/torch
    version): uniform noise in [-1.5, 1.5), and a smooth ramp plus small noise; t = 10, 700."""
    u = seeded_words(2 * 3 * 32 * 32, 2024).astype(np.float64) / 2.0**32 * 3.0 - 1.5  # words < 2^32
    u = u.reshape(2, 3, 32, 32)
    ramp = np.linspace(-1.0, 1.0, 32)
    u[1] = ramp[None, :, None] * ramp[None, None, :] + 0.05 * u[1]
    return torch.from_numpy(u), torch.tensor([10.0, 700.0], dtype=torch.float64)


def test_golden_inputs_are_what_they_say():
    """The golden inputs are reproducible from integers (words below 2^32, so the scale is
    exact) and in range: a change to seeded_words would be caught here, not as a hash."""
    x, t = _golden_inputs()
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float64 and t.tolist() == [10.0, 700.0]
    assert float(x[0].min()) >= -1.5 and float(x[0].max()) < 1.5 and float(x[0].std()) > 0.8
    words = seeded_words(8, 2024)
    assert np.all(words < 2**32) and len(set(words.tolist())) == 8


def _sha(y: torch.Tensor) -> str:
    return hashlib.sha256(_bits(y)).hexdigest()


def test_shipped_model_exact_output_matches_the_golden_hash():
    """The shipped model's exact network on two fixed inputs gives the recorded output bits
    (GOLDEN_DEFAULT_SHA256), and that output is the float64 network's to < 2e-5 of its
    scale per image (measured: 1.6e-6, 3.2e-6), so the golden value is of a sane output."""
    loaded = load_checkpoint(None)
    x, t = _golden_inputs()
    with torch.no_grad():
        y = exact_network(loaded.model)(x, t)
        ref = float64_network(loaded.model)(x, t)
    rel = ((y - ref).abs().amax(dim=(1, 2, 3)) / ref.abs().amax(dim=(1, 2, 3)))
    assert torch.all(rel < 2e-5), rel
    assert _sha(y) == GOLDEN_DEFAULT_SHA256


# (environment, what torch must report) per subprocess: the ATen SIMD kernels (the elementwise
# exp / sin / cos / silu steps, reductions), oneDNN's ISA, MKL's dgemm code path (the matmuls),
# OpenMP thread counts. Three processes, each changing several at once, to keep it quick.
_ENVIRONMENTS = [
    ({"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
      "OMP_NUM_THREADS": "1"}, {"capability": "DEFAULT", "threads": 1}),
    ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
      "OMP_NUM_THREADS": "2"}, {"capability": "AVX2", "threads": 2}),
    ({"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}, {"threads": 1}),
]


def test_exact_output_is_the_same_bits_under_other_cpu_kernels_and_thread_counts(tmp_path):
    """Fresh processes that force other kernels (ATen's scalar and AVX2 paths instead of this
    machine's best, oneDNN limited to SSE4.1 / AVX2, MKL's SSE4.2, AVX2 and conditional-
    reproducibility code paths) and other OpenMP thread counts compute the wide test
    network's and the shipped model's exact outputs (the latter on 16x16 crops of the golden
    inputs, to keep it quick) with the same bits as this process."""
    model = random_model(WIDE, seed=12)
    x, t = random_inputs(WIDE, 5, seed=5)
    gx, gt = _golden_inputs()
    gx = gx[..., 8:24, 8:24].contiguous()
    torch.save({"config": dict(WIDE.__dict__), "state": model.state_dict(), "x": x, "t": t, "gx": gx, "gt": gt},
               tmp_path / "saved.pt")
    (tmp_path / "run.py").write_text(_SUBPROCESS_SCRIPT)
    with torch.no_grad():
        expected = {"small": _sha(exact_network(model)(x, t)),
                    "default": _sha(exact_network(load_checkpoint(None).model)(gx, gt))}
    procs = []
    for env_extra, _ in _ENVIRONMENTS:
        env = {k: v for k, v in os.environ.items()
               if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")}
        env.update(env_extra, PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    for (env_extra, expect), proc in zip(_ENVIRONMENTS, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        got = json.loads(out.strip().splitlines()[-1])
        for key, value in expect.items():
            assert got[key] == value, (env_extra, got)
        assert got["small"] == expected["small"], env_extra
        assert got["default"] == expected["default"], env_extra
