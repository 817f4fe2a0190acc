"""The exact network: the UNet under the arithmetic contract of `exact`, for the codecs.

`exact_network(model)` returns a copy of a float `UNet` whose layers compute the same
function in fixed point, so that its output is the same bits on every CPU and GPU, at any
thread count, batch size or batch order:

- Conv2d and Linear (`ExactConv2d`, `ExactLinear`): weights are integers with one
  power-of-two scale per output channel, quantized from the float32 weights when the copy is
  made (round half to even of w 2^s: exact, so every machine gets the same integers and
  nothing extra needs storing); inputs are integers with one power-of-two scale per image
  (`exact.quantize`). The product is an im2col (`F.unfold`, data movement only) and a
  binary64 matrix product of integer operands whose bit widths are chosen from the fan-in
  so every partial sum stays below 2^53 (`exact.operand_bits`): exact in any order on any
  BLAS. The integer accumulator times the two scales is exact; the bias is one rounded add.
- GroupNorm (`ExactGroupNorm`): the group sums of x and x^2 over integer-valued inputs
  (exact, below 2^53), then mean, variance and 1 / sqrt(var + eps) by the basic operations.
- SiLU, the attention softmax and the sinusoidal timestep embedding use `exact.exp` and
  `exact.sin_cos`; the softmax weights are integers (2^P e^(z - max)), so their sum and the
  weighted sum of the (integer) values are exact, divided once at the end.

The network's structure (`unet.UNet.forward`) is shared with the float model: only the
leaf modules are swapped. The output is float64.
"""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffcodec import exact
from diffcodec.unet import Attention, TimestepEmbedding, UNet

LN_10000 = 9.210340371976184  # ln(10000), a literal (the float model uses math.log(10000.0))


def _split_bits(fan_in: int) -> tuple[int, int]:
    """(activation bits, weight bits) for a dot product over ``fan_in`` terms."""
    act_bits = exact.operand_bits(fan_in)
    return act_bits, exact.operand_bits(fan_in, act_bits)


class _ExactAffine(nn.Module):
    """Integer weights [out, fan_in] with per-output-channel power-of-two scales, and a bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out_features, fan_in = weight.shape[0], int(np.prod(weight.shape[1:]))
        self.act_bits, self.weight_bits = _split_bits(fan_in)
        w_int, w_shift = exact.quantize(weight.detach().reshape(out_features, fan_in), self.weight_bits, dims=(1,))
        self.register_buffer("w_int", w_int)
        self.register_buffer("w_scale", exact.pow2(-w_shift).reshape(out_features))
        b = torch.zeros(out_features, dtype=exact.F64) if bias is None else bias.detach().to(exact.F64)
        self.register_buffer("bias", b)

    def _finish(self, acc: torch.Tensor, x_shift: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Integer accumulator [B, out, ...] -> float64 value: acc 2^-x_shift 2^-w_shift + bias."""
        shape = [1] * acc.ndim
        shape[channel_dim] = -1
        x_scale = exact.pow2(-x_shift).reshape(-1, *([1] * (acc.ndim - 1)))
        return acc * x_scale * self.w_scale.reshape(shape) + self.bias.reshape(shape)


class ExactConv2d(_ExactAffine):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv.weight, conv.bias)
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("exact network: only plain zero-padded convolutions are supported")
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, shift = exact.quantize(x, self.act_bits, dims=(1, 2, 3))
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            cols, out_h, out_w = q.reshape(b, q.shape[1], h * w), h, w
        else:
            cols = F.unfold(q, self.kernel_size, padding=self.padding, stride=self.stride)
            out_h = (h + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
            out_w = (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        acc = torch.matmul(self.w_int, cols)  # [B, out, L]: integers below 2^53, exact
        return self._finish(acc, shift, 1).reshape(b, -1, out_h, out_w)


class ExactLinear(_ExactAffine):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, shift = exact.quantize(x, self.act_bits, dims=(1,))
        return self._finish(torch.matmul(q, self.w_int.T), shift, 1)


class ExactGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, float(norm.eps)
        self.register_buffer("weight", norm.weight.detach().to(exact.F64))
        self.register_buffer("bias", norm.bias.detach().to(exact.F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = (c // self.num_groups) * h * w
        bits = (exact.MANTISSA_LIMIT_BITS + 2 - exact.ceil_log2(n)) // 2  # n 2^(2 bits - 2) <= 2^53
        q, shift = exact.quantize(x, bits, dims=(1, 2, 3))
        qg = q.reshape(b, self.num_groups, n)
        mean_q = exact.divide(qg.sum(-1, keepdim=True), float(n))
        var_q = (exact.divide((qg * qg).sum(-1, keepdim=True), float(n)) - mean_q * mean_q).clamp(min=0.0)
        inv = exact.pow2(-shift).reshape(b, 1, 1)
        var = var_q * inv * inv
        rstd = exact.divide(torch.ones_like(var), exact.sqrt(var + self.eps))
        y = ((qg * inv - mean_q * inv) * rstd).reshape(b, c, h, w)
        return y * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)


class ExactSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exact.silu(x)


class ExactAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with integer q, k, v and integer softmax weights."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, tokens, d = q.shape
        qk_bits = exact.operand_bits(d)
        q_int, q_shift = exact.quantize(q, qk_bits, dims=(1, 2, 3))
        k_int, k_shift = exact.quantize(k, qk_bits, dims=(1, 2, 3))
        scores = torch.matmul(q_int, k_int.transpose(-1, -2))  # exact integers
        logits = scores * exact.pow2(-(q_shift + k_shift)) * (1.0 / math.sqrt(d))
        z = logits - logits.amax(dim=-1, keepdim=True)
        budget = exact.MANTISSA_LIMIT_BITS + 1 - exact.ceil_log2(tokens)  # 2^P tokens 2^(b_v - 1) <= 2^53
        weight_bits = budget // 2
        weights = torch.round(exact.exp(z) * float(2**weight_bits))  # integers in [0, 2^P]
        v_int, v_shift = exact.quantize(v, budget - weight_bits, dims=(1, 2, 3))
        num = torch.matmul(weights, v_int)  # exact integers
        den = weights.sum(dim=-1, keepdim=True)  # exact, >= 2^P (the max's weight)
        return exact.divide(num, den.expand_as(num)) * exact.pow2(-v_shift)


class ExactTimestepEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        i = torch.arange(half, dtype=exact.F64)
        freqs = exact.exp(exact.divide(i * -LN_10000, float(max(half - 1, 1))))
        sin, cos = exact.sin_cos(t.to("cpu", exact.F64)[:, None] * freqs[None])
        emb = torch.cat([sin, cos], dim=1)
        return (F.pad(emb, (0, 1)) if self.dim % 2 else emb).to(t.device)


_SWAPS = {
    nn.Conv2d: ExactConv2d, nn.Linear: ExactLinear, nn.GroupNorm: ExactGroupNorm, nn.SiLU: lambda m: ExactSiLU(),
    Attention: lambda m: ExactAttention(), TimestepEmbedding: lambda m: ExactTimestepEmbedding(m.dim),
}


def _float64_input(module: nn.Module, args: tuple) -> tuple:
    """The exact network takes x_t as float64 whatever its dtype (exact for float32 and
    float64 inputs), so the timestep embedding is never rounded to a narrower type."""
    x, *rest = args
    return (x.to(exact.F64), *rest)


def exact_network(model: UNet) -> UNet:
    """A copy of ``model`` (left untouched) computing under the exact contract, on the CPU,
    in eval mode; move it with ``.to(device)``. Inputs may be any float dtype; outputs float64."""
    if not isinstance(model, UNet):
        raise TypeError(f"exact_network: expected a diffcodec UNet, got {type(model).__name__}")
    net = copy.deepcopy(model).to("cpu").eval()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            swap = _SWAPS.get(type(child))
            if swap is not None:
                setattr(parent, name, swap(child))
    net.register_forward_pre_hook(_float64_input)
    leftover = [type(m).__name__ for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm))]
    if leftover or any(p.numel() for p in net.parameters()):
        raise ValueError(f"exact network: layers left in float: {sorted(set(leftover))}")
    return net


def output_digest(output: torch.Tensor, size: int = 4) -> bytes:
    """A short hash of a float64 output's bits (the early-refusal check of coded files)."""
    arr = output.detach().to("cpu", exact.F64).contiguous().numpy()
    return hashlib.blake2b(arr.astype("<f8").tobytes(), digest_size=size).digest()
