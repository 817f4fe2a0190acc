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
        b = torch.zeros(out_features, dtype=exact.F64) if bias is None else bias.detach().to(exact.F64, copy=True)
        self.register_buffer("bias", b)

    def _finish(self, acc: torch.Tensor, x_shift: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Integer accumulator [B, out, ...] -> float64 value: acc 2^-x_shift 2^-w_shift + bias.

        The same three correctly rounded operations, left to right, as the plain expression;
        the first makes a new tensor (dense, in acc's layout), the other two work in place."""
        shape = [1] * acc.ndim
        shape[channel_dim] = -1
        x_scale = exact.pow2(-x_shift).reshape(-1, *([1] * (acc.ndim - 1)))
        return torch.mul(acc, x_scale).mul_(self.w_scale.reshape(shape)).add_(self.bias.reshape(shape))


GROUP_BYTES = 8 << 20
"""Size a convolution's column matrix may reach before the batch is cut into sample groups:
a temporary this size is reused from the heap (a larger one is mapped and page-faulted afresh
on every call, which costs more than the copy) and stays near the cache."""


class ExactConv2d(_ExactAffine):
    """A Conv2d on integer operands, computed channels-last.

    ``w_int`` is [out, fan_in] with the fan-in ordered (kernel row, kernel column, input
    channel), quantized from ``weight.permute(0, 2, 3, 1)``: the same integers and per-row
    scales as any other column order, laid out so that a kernel row's [out, kw in] matrix is
    a strided view BLAS takes as is. The input is quantized straight into a zero-padded
    channels-last buffer [B, H + 2p, W + 2p, C] (one pass), then, for groups of samples
    (`GROUP_BYTES`):

    - stride 1 on large maps (every 3x3 and 1x1 convolution of the UNet at 16x16 and up):
      flattened, the padded buffer is a matrix with one row per padded pixel, and output
      pixel (b, y, x) is the sum over taps (i, j) of row (b, y + i, x + j) times tap matrix
      (i, j). The kw column taps are gathered side by side (a cat of kw row ranges, offsets
      j), and each kernel row i is then one matrix product of a row range of that (offset
      i (W + 2p)); the kh products are summed into an accumulator over the padded grid, whose
      border rows are computed and dropped (a share (H + 2p)(W + 2p) / HW of the work);
    - otherwise (strides, small maps where the border share is large): an im2col of strided
      slices (cat along channels) and one matrix product.

    All sums are of integer products below 2^53 (`exact.operand_bits`), so any grouping,
    order, BLAS or device gives the same integers. The result is a channels-last tensor
    (memory format), which the elementwise layers after it keep; the network's output is made
    contiguous at the end (`exact_network`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if (conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
                or isinstance(conv.padding, str)):
            raise ValueError("exact network: only plain zero-padded convolutions are supported")
        super().__init__(conv.weight.detach().permute(0, 2, 3, 1), conv.bias)
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = exact.as_f64(x)
        b, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        hp, wp = h + 2 * ph, w + 2 * pw
        shift = exact.quantize_shift(x, self.act_bits, (1, 2, 3))
        xp = x.new_empty(b, hp, wp, c)  # round(x 2^shift), zero-padded, channels-last
        if ph:
            xp[:, :ph].zero_()
            xp[:, ph + h:].zero_()
        if pw:
            xp[:, ph:ph + h, :pw].zero_()
            xp[:, ph:ph + h, pw + w:].zero_()
        inner = xp[:, ph:ph + h, pw:pw + w]
        torch.mul(x.permute(0, 2, 3, 1), exact.pow2(shift).reshape(b, 1, 1, 1), out=inner).round_()
        out_features = self.w_int.shape[0]
        rows_of_taps = self.w_int.view(out_features, kh, kw * c)  # [out, kernel row, (j, c)]
        shifted = (sh, sw) == (1, 1) and 10 * hp * wp <= 13 * out_h * out_w
        if shifted:
            acc = x.new_empty(b, hp, wp, out_features)
            per_sample = hp * wp * kw * c * 8
        else:
            acc = x.new_empty(b, out_h, out_w, out_features)
            per_sample = out_h * out_w * kh * kw * c * 8
        group = max(1, GROUP_BYTES // per_sample)
        for start in range(0, b, group):
            part = slice(start, min(b, start + group))
            out = acc[part].view(-1, out_features)
            if shifted:
                rows = xp[part].view(-1, c)
                m = rows.shape[0] - (kw - 1)
                cols = torch.cat([rows[j:j + m] for j in range(kw)], dim=1) if kw > 1 else rows
                n = m - (kh - 1) * wp  # output rows computed: every valid pixel is below n
                term = x.new_empty(n, out_features) if kh > 1 else None
                for i in range(kh):
                    product = torch.mm(cols[i * wp:i * wp + n], rows_of_taps[:, i].T, out=out[:n] if i == 0 else term)
                    if i:
                        out[:n].add_(product)  # integer sums below 2^53: exact
            else:
                cols = torch.cat([xp[part, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                                  for i in range(kh) for j in range(kw)], dim=3)
                torch.mm(cols.view(-1, kh * kw * c), self.w_int.T, out=out)
        return self._finish(acc[:, :out_h, :out_w].permute(0, 3, 1, 2), shift, 1)


class ExactLinear(_ExactAffine):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, shift = exact.quantize(x, self.act_bits, dims=(1,))
        return self._finish(torch.matmul(q, self.w_int.T), shift, 1)


class ExactGroupNorm(nn.Module):
    """GroupNorm with exact group sums, in the input's layout (NCHW or channels-last).

    The per-element chain is the plain form's, operation for operation:
    ((q 2^-s - mean_q 2^-s) rstd) weight + bias, done in place in q's buffer."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, float(norm.eps)
        self.register_buffer("weight", norm.weight.detach().to(exact.F64, copy=True))
        self.register_buffer("bias", norm.bias.detach().to(exact.F64, copy=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = exact.as_f64(x)
        b, c, h, w = x.shape
        g = self.num_groups
        n = (c // g) * h * w
        bits = (exact.MANTISSA_LIMIT_BITS + 2 - exact.ceil_log2(n)) // 2  # n 2^(2 bits - 2) <= 2^53
        q, shift = exact.quantize(x, bits, dims=(1, 2, 3))
        if q.is_contiguous():  # [b, g, c/g, h w]: a group is one block of memory
            qg, stat_shape, channel_shape = q.view(b, g, c // g, h * w), (b, g, 1, 1), (1, g, c // g, 1)
            pixels_by_channel = q.view(b, c, h * w).transpose(1, 2)
        else:  # channels-last (the layout of an exact convolution's output): [b, h w, g, c/g]
            qg = q.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g)  # a view when q is channels-last
            stat_shape, channel_shape = (b, 1, g, 1), (1, 1, g, c // g)
            pixels_by_channel = qg.view(b, h * w, c)
        # Group sums of q and q^2: per-channel sums over the pixels as a product with a row of
        # ones (a strided reduction over [b, h w, g, c/g] is several times slower), then over
        # the group's channels. Integers below 2^53 throughout: exact in any order.
        ones = q.new_ones(b, 1, h * w)
        total = torch.bmm(ones, pixels_by_channel).view(b, g, c // g).sum(2).reshape(stat_shape)
        squares = torch.bmm(ones, pixels_by_channel * pixels_by_channel).view(b, g, c // g).sum(2).reshape(stat_shape)
        mean_q = exact.divide(total, float(n))
        var_q = (exact.divide(squares, float(n)) - mean_q * mean_q).clamp(min=0.0)
        inv = exact.pow2(-shift).reshape(b, 1, 1, 1)
        var = var_q * inv * inv
        rstd = exact.divide(torch.ones_like(var), exact.sqrt(var + self.eps))
        y = qg.mul_(inv).sub_(mean_q * inv).mul_(rstd)
        y = y.mul_(self.weight.reshape(channel_shape)).add_(self.bias.reshape(channel_shape))
        if q.is_contiguous():
            return y.view(b, c, h, w)
        return y.view(b, h, w, c).permute(0, 3, 1, 2)


class ExactSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exact.silu(x)


class ExactAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with integer q, k, v and integer softmax weights.

    The elementwise steps work in place on the scores' buffer: the same operations, in the
    same order, as the plain expressions written in their comments."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tokens, d = q.shape[-2:]
        qk_bits = exact.operand_bits(d)
        q_int, q_shift = exact.quantize(q, qk_bits, dims=(1, 2, 3))
        k_int, k_shift = exact.quantize(k, qk_bits, dims=(1, 2, 3))
        scores = torch.matmul(q_int, k_int.transpose(-1, -2))  # exact integers
        del q_int, k_int
        # logits = scores 2^-(q_shift + k_shift) (1 / sqrt d); z = logits - max(logits)
        z = scores.mul_(exact.pow2(-(q_shift + k_shift))).mul_(1.0 / math.sqrt(d))
        z = z.sub_(z.amax(dim=-1, keepdim=True))
        budget = exact.MANTISSA_LIMIT_BITS + 1 - exact.ceil_log2(tokens)  # 2^P tokens 2^(b_v - 1) <= 2^53
        weight_bits = budget // 2
        weights = exact.exp(z).mul_(float(2**weight_bits)).round_()  # integers in [0, 2^P]
        del z, scores
        v_int, v_shift = exact.quantize(v, budget - weight_bits, dims=(1, 2, 3))
        num = torch.matmul(weights, v_int)  # exact integers
        den = weights.sum(dim=-1, keepdim=True)  # exact, >= 2^P (the max's weight)
        return torch.div(num, den, out=num).mul_(exact.pow2(-v_shift))  # tensor / tensor: correctly rounded


class ExactTimestepEmbedding(nn.Module):
    """`unet.timestep_embedding` (either kind, t scaled by one correctly rounded product). The
    last few embeddings are kept by their timesteps' bits: a codec calls the network many
    times at one t."""

    CACHED = 8

    def __init__(self, dim: int, kind: str = "ddpm", scale: float = 1.0) -> None:
        super().__init__()
        self.dim, self.kind, self.scale = dim, kind, float(scale)
        self._cache: dict[tuple[bytes, str], torch.Tensor] = {}

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.detach().to("cpu", exact.F64).contiguous().numpy().tobytes(), str(t.device))
        emb = self._cache.get(key)
        if emb is None:
            emb = self._embed(t)
            if len(self._cache) >= self.CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = emb
        return emb.clone()

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        i = torch.arange(half, dtype=exact.F64)
        freqs = exact.exp(exact.divide(i * -LN_10000, float(max(half - 1, 1) if self.kind == "ddpm" else half)))
        t64 = t.to("cpu", exact.F64)
        sin, cos = exact.sin_cos((t64 if self.scale == 1.0 else t64 * self.scale)[:, None] * freqs[None])
        emb = torch.cat([sin, cos] if self.kind == "ddpm" else [cos, sin], dim=1)
        return (F.pad(emb, (0, 1)) if self.dim % 2 else emb).to(t.device)


_SWAPS = {
    nn.Conv2d: ExactConv2d, nn.Linear: ExactLinear, nn.GroupNorm: ExactGroupNorm, nn.SiLU: lambda m: ExactSiLU(),
    Attention: lambda m: ExactAttention(), TimestepEmbedding: lambda m: ExactTimestepEmbedding(m.dim, m.kind, m.scale),
}


def _float64_input(module: nn.Module, args: tuple) -> tuple:
    """The exact network takes x_t as float64 whatever its dtype (exact for float32 and
    float64 inputs), so the timestep embedding is never rounded to a narrower type."""
    x, *rest = args
    return (x.to(exact.F64), *rest)


def cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree on the CPU, in eval mode, for the exact networks to
    swap their layers into. A CPU model's copy holds the original's parameters and buffers
    themselves, not copies: the swaps read the weights into integer or binary64 layers and
    drop the float layers, so a copy of the weights would only raise the build's peak memory
    (by the weights' size: 34 MiB for the default model). A model elsewhere (a GPU) is copied
    whole and moved, leaving the original where it is."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device.type != "cpu" for t in tensors):
        return copy.deepcopy(model).to("cpu").eval()
    return copy.deepcopy(model, {id(t): t for t in tensors}).eval()


def exact_network(model: UNet) -> UNet:
    """A copy of ``model`` (left untouched) computing under the exact contract, on the CPU,
    in eval mode; move it with ``.to(device)``. Inputs may be any float dtype; outputs float64."""
    if not isinstance(model, UNet):
        raise TypeError(f"exact_network: expected a diffcodec UNet, got {type(model).__name__}")
    net = cpu_copy(model)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            swap = _SWAPS.get(type(child))
            if swap is not None:
                setattr(parent, name, swap(child))
    net.register_forward_pre_hook(_float64_input)
    leftover = [type(m).__name__ for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm))]
    if leftover or any(p.numel() for p in net.parameters()):
        raise ValueError(f"exact network: layers left in float: {sorted(set(leftover))}")
    net.register_forward_hook(_contiguous_output)
    return net


def _contiguous_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The exact layers hand activations on channels-last (`ExactConv2d`); the network's
    output is returned in the ordinary contiguous layout (a copy: no value changes)."""
    return output.contiguous()


def output_digest(output: torch.Tensor, size: int = 4) -> bytes:
    """A short hash of a float64 output's bits (the early-refusal check of coded files)."""
    arr = output.detach().to("cpu", exact.F64).contiguous().numpy()
    return hashlib.blake2b(arr.astype("<f8").tobytes(), digest_size=size).digest()
