"""The DDPM UNet (Ho et al. 2020, Appendix B), with optional learned-variance channels.

Wide ResNet blocks with GroupNorm and a projected sinusoidal timestep embedding, self-
attention at the levels whose resolution is in ``attn_resolutions``, stride-2 conv
downsampling and nearest upsampling with skip connections. The paper's CIFAR-10 model is
``ModelConfig()`` (ch 128, ch_mult (1,2,2,2), 2 blocks, attention at 16x16): 35.7M
parameters. It is fully convolutional: attention is placed by level, so other input sizes
that are multiples of 2^(levels-1) work too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffcodec.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, kind: str = "ddpm", scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] -> [B, dim] (float32); ``kind`` and ``scale``:
    `config.TIME_EMBEDDINGS`, ``ModelConfig.timestep_scale``."""
    half = dim // 2
    divisor = max(half - 1, 1) if kind == "ddpm" else half
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / divisor)
    args = (t.float() if scale == 1.0 else t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)] if kind == "ddpm" else [torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """`timestep_embedding` as a module (no parameters), so the exact network can swap it."""

    def __init__(self, dim: int, kind: str = "ddpm", scale: float = 1.0) -> None:
        super().__init__()
        self.dim, self.kind, self.scale = dim, kind, scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.kind, self.scale)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over [B, heads, tokens, d] (no parameters; swappable)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the most groups up to 32 that divide ``channels`` (32 for multiples of 32)."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``takes_embedding``: `UNet.forward` calls it as ``block(h, temb)`` (a block that stands in
    for it, such as the exact network's, says the same). With ``scale_shift``, the embedding's projection is 2 x out_ch wide: (scale, shift), and
    norm2(h) (1 + scale) + shift takes the place of norm2(h + projection) (Improved DDPM)."""

    takes_embedding = True

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, eps: float = 1e-5,
                 scale_shift: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = group_norm(out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        emb = self.temb_proj(self.act(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(self.act(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(ch, eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))
        self.attention = Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = self.attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; ``padding`` 'symmetric' (one zero on each side) or 'end' (one after
    the end only: TensorFlow's 'SAME', as the paper's code and diffusers' DDPM models)."""

    def __init__(self, ch: int, padding: str = "symmetric") -> None:
        super().__init__()
        self.pad_end = padding == "end"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.pad_end else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_end else x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps-prediction network: (x_t [B,C,H,W], t [B]) -> [B, C or 2C, H, W]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        ch, temb_ch, eps, ss = config.ch, 4 * config.ch, config.norm_eps, config.scale_shift_norm
        levels = len(config.ch_mult)
        attn_levels = {i for i in range(levels) if config.image_size // 2**i in config.attn_resolutions}
        self.embed = TimestepEmbedding(ch, config.time_embedding, config.timestep_scale)
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def block(in_ch: int, out_ch: int, level: int) -> nn.ModuleList:
            layers: list[nn.Module] = [ResBlock(in_ch, out_ch, temb_ch, config.dropout, eps, ss)]
            if level in attn_levels:
                layers.append(AttnBlock(out_ch, config.num_heads, eps))
            return nn.ModuleList(layers)

        self.down = nn.ModuleList()
        skip_chs, cur = [ch], ch
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(block(cur, ch * mult, level))
                cur = ch * mult
                skip_chs.append(cur)
            if level != levels - 1:
                self.down.append(nn.ModuleList([Downsample(cur, config.downsample_padding)]))
                skip_chs.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, config.dropout, eps, ss),
                                  AttnBlock(cur, config.num_heads, eps),
                                  ResBlock(cur, cur, temb_ch, config.dropout, eps, ss)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(block(cur + skip_chs.pop(), ch * mult, level))
                cur = ch * mult
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
        self.norm_out = group_norm(cur, eps)
        self.act_out = nn.SiLU()
        self.conv_out = zero_init(nn.Conv2d(cur, config.out_channels, 3, padding=1))
        self.divisor = 2 ** (levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ValueError(f"image sides must be multiples of {self.divisor}, got {tuple(x.shape[-2:])}")
        temb = self.temb(self.embed(t).to(x.dtype))  # float64 networks too
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, temb) if getattr(layer, "takes_embedding", False) else layer(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layers in self.up:
            if getattr(layers[0], "takes_embedding", False):
                h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = layer(h, temb) if getattr(layer, "takes_embedding", False) else layer(h)
        return self.conv_out(self.act_out(self.norm_out(h)))


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``UNet(config)``'s tensors, from a network built on the meta
    device (no memory; 0.2 s for the largest config `config.model_config_problem` lets through)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
