"""Configuration records for the network and the diffusion, and named presets.

Both records are frozen dataclasses saved inside every checkpoint (as plain dicts), so a
checkpoint alone says how to rebuild and evaluate its model. ``config_from_dict`` checks
every field of a saved record (type and range: ``model_config_problem``,
``diffusion_config_problem``) before anything is built from it, so a malformed checkpoint
is a one-line ``DiffcodecError`` naming the field, never a traceback from a layer.

Limits. Every model, diffcodec's own or another's (`external`), passes the same two checks
before any layer is built or any schedule computed; the limits are several times what any
released DDPM uses, so a file beyond them is refused in one line rather than allocated:

    field                        limit           largest of the releases diffcodec reads (model)
    image_size                   4096            256 (DDPM LSUN / CelebA-HQ, diffusers ddpm-*-256)
    channels per level           4096            512 (DDPM 256 px, Improved DDPM ImageNet 64)
      (ch x ch_mult[i])
    levels (len(ch_mult))        8               6 (256 px models)
    num_res_blocks               8               3 (Improved DDPM)
    parameters                   2 x 10^9        114M (DDPM 256 px), 52.5M (Improved DDPM CIFAR-10)
    num_timesteps (T)            100,000         4000 (Improved DDPM)

(num_heads must divide every attention width, so it is at most 4096 too.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffcodec.diffusion import VAR_TYPES
from diffcodec.errors import DiffcodecError
from diffcodec.schedule import SCHEDULES


@dataclass(frozen=True)
class ModelConfig:
    """The UNet: base channels, per-level multipliers, attention resolutions (in pixels)."""

    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    learn_sigma: bool = False  # output 2 * in_channels channels: eps and the variance v
    num_heads: int = 1
    norm_eps: float = 1e-5  # every GroupNorm's epsilon (the paper's TF code and diffusers' DDPM models: 1e-6)
    downsample_padding: str = "symmetric"  # one of DOWNSAMPLE_PADDINGS
    time_embedding: str = "ddpm"  # one of TIME_EMBEDDINGS
    timestep_scale: float = 1.0  # the network sees t x this (Improved DDPM's rescale_timesteps: 1000 / T)
    scale_shift_norm: bool = False  # ResBlocks: norm(h) (1 + scale) + shift from the embedding (Improved DDPM)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


DOWNSAMPLE_PADDINGS = ("symmetric", "end")
"""How the stride-2 downsampling convolution pads: ``symmetric`` one zero row/column on each
side (diffcodec's own models); ``end`` one after the end only (TensorFlow's 'SAME' at stride 2:
the paper's code, and diffusers' ``downsample_padding=0``)."""


TIME_EMBEDDINGS = ("ddpm", "improved")
"""The sinusoidal timestep embedding of width d = ch, half = d // 2: ``ddpm`` [sin, cos] of
t 10000^(-i / (half - 1)) (the paper's code, diffusers' freq_shift=1); ``improved`` [cos, sin]
of t 10000^(-i / half) (Improved DDPM's)."""


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the reverse variance the model was trained for."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    var_type: str = "fixedlarge"


# Append-only: preset names appear in checkpoints and reports.
PRESETS: dict[str, tuple[ModelConfig, DiffusionConfig]] = {
    # The paper's CIFAR-10 model (35.7M parameters), L_simple, fixedlarge.
    "ddpm-cifar10": (ModelConfig(), DiffusionConfig()),
    # Same shape, learned-range variances (Improved DDPM's hybrid loss), cosine schedule.
    "ddpm-cifar10-learned": (
        ModelConfig(learn_sigma=True),
        DiffusionConfig(schedule="cosine", var_type="learned_range"),
    ),
    # 9.0M parameters: ch 64 (the "what a GPU minute buys" probes of ../shared/docs/DESIGN.md).
    "small-learned": (
        ModelConfig(ch=64, dropout=0.1, learn_sigma=True),
        DiffusionConfig(schedule="linear", var_type="learned_range"),
    ),
    # A few hundred thousand parameters: trains on a CPU in minutes.
    "cpu-small": (
        ModelConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, learn_sigma=True),
        DiffusionConfig(schedule="linear", var_type="learned_range"),
    ),
    # "small-learned" without dropout (short GPU runs see each image ~100 times, too few to overfit).
    "small-learned-nodrop": (
        ModelConfig(ch=64, dropout=0.0, learn_sigma=True),
        DiffusionConfig(schedule="linear", var_type="learned_range"),
    ),
    # The same network on Improved DDPM's cosine schedule (more steps at low noise, where the bits are).
    "small-cosine": (
        ModelConfig(ch=64, dropout=0.0, learn_sigma=True),
        DiffusionConfig(schedule="cosine", var_type="learned_range"),
    ),
    # For tests: a network small enough that T = 1000 calls take seconds.
    "tiny": (
        ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, num_heads=1),
        DiffusionConfig(),
    ),
    # For tests of learned variances (hybrid / vlb losses): "tiny" with learned-range variances.
    "tiny-learned": (
        ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, num_heads=1,
                    learn_sigma=True),
        DiffusionConfig(var_type="learned_range"),
    ),
}


def preset(name: str) -> tuple[ModelConfig, DiffusionConfig]:
    if name not in PRESETS:
        raise DiffcodecError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def config_to_dict(config: ModelConfig | DiffusionConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


SECTIONS = {ModelConfig: "model", DiffusionConfig: "diffusion"}  # field names in messages: model.ch, ...
IMAGE_CHANNELS = 3  # every image is uint8 RGB (``data``), so the network sees 3 channels
# The limits of the module docstring's table.
MAX_IMAGE_SIZE = 4096  # pixels per side of a training image / evaluation tile
MAX_CHANNELS = 4096  # the width of every level, ch x ch_mult[i]
MAX_LEVELS = 8  # len(ch_mult)
MAX_RES_BLOCKS = 8  # num_res_blocks
MAX_PARAMETERS = 2_000_000_000  # the UNet's (8 GB as float32)
MAX_TIMESTEPS = 100_000  # T; the paper uses 1000, Improved DDPM up to 4000


def show(value: Any, width: int = 40) -> str:
    """A value for a one-line message: its ASCII repr, cut to ``width`` characters; a value too
    deep or too long to print (a nested list, an integer of thousands of digits) says so."""
    try:
        text = ascii(value)
    except (RecursionError, ValueError):
        text = f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= width else text[:width - 3] + "..."


def model_config_problem(c: ModelConfig) -> str | None:
    """The first field of ``c`` that no working UNet has, as 'model.<field> must ..., got ...'.

    Requirements (the limits: the module docstring's table): image_size in [1,
    MAX_IMAGE_SIZE] and a multiple of 2^(len(ch_mult) - 1) (the UNet halves it len(ch_mult) - 1
    times); in_channels = 3; ch >= 1; ch_mult a list of 1 to MAX_LEVELS integers >= 1; every
    width ch x ch_mult[i] at most MAX_CHANNELS; num_res_blocks in [0, MAX_RES_BLOCKS];
    attention resolutions >= 1; dropout in [0, 1); norm_eps in (0, 1); downsample_padding and
    time_embedding known names; timestep_scale in (0, 1e6]; num_heads >= 1 and dividing the
    width of every attention block (the middle one, ch x ch_mult[-1], and those of the levels
    named in attn_resolutions); at most MAX_PARAMETERS parameters, counted on a network built on
    the meta device (no memory) once every other field is known to be in range.
    """
    if not 1 <= c.image_size <= MAX_IMAGE_SIZE:
        return f"model.image_size must be in [1, {MAX_IMAGE_SIZE}], got {show(c.image_size)}"
    if c.in_channels != IMAGE_CHANNELS:
        return f"model.in_channels must be {IMAGE_CHANNELS} (RGB), got {show(c.in_channels)}"
    if not 1 <= c.ch <= MAX_CHANNELS:
        return f"model.ch must be in [1, {MAX_CHANNELS}], got {show(c.ch)}"
    if not 1 <= len(c.ch_mult) <= MAX_LEVELS or min(c.ch_mult) < 1:
        return f"model.ch_mult must be a list of 1 to {MAX_LEVELS} integers >= 1, got {show(list(c.ch_mult))}"
    if c.ch * max(c.ch_mult) > MAX_CHANNELS:
        return (f"model.ch x model.ch_mult must be at most {MAX_CHANNELS} channels per level, got "
                f"{show(c.ch)} x {show(list(c.ch_mult))}")
    if not 0 <= c.num_res_blocks <= MAX_RES_BLOCKS:
        return f"model.num_res_blocks must be in [0, {MAX_RES_BLOCKS}], got {show(c.num_res_blocks)}"
    if c.attn_resolutions and min(c.attn_resolutions) < 1:
        return f"model.attn_resolutions must be integers >= 1, got {show(list(c.attn_resolutions))}"
    if not 0.0 <= c.dropout < 1.0:  # NaN fails too
        return f"model.dropout must be in [0, 1), got {c.dropout}"
    if c.num_heads < 1:
        return f"model.num_heads must be >= 1, got {show(c.num_heads)}"
    if not 0.0 < c.norm_eps < 1.0:  # NaN fails too
        return f"model.norm_eps must be in (0, 1), got {c.norm_eps}"
    if c.time_embedding not in TIME_EMBEDDINGS:
        return f"model.time_embedding must be one of {', '.join(TIME_EMBEDDINGS)}, got {show(c.time_embedding)}"
    if not 0.0 < c.timestep_scale <= 1e6:  # NaN fails too
        return f"model.timestep_scale must be in (0, 1e6], got {c.timestep_scale}"
    if c.downsample_padding not in DOWNSAMPLE_PADDINGS:
        return (f"model.downsample_padding must be one of {', '.join(DOWNSAMPLE_PADDINGS)}, "
                f"got {show(c.downsample_padding)}")
    divisor = 2 ** (len(c.ch_mult) - 1)
    if c.image_size % divisor:
        return f"model.image_size must be a multiple of {divisor} (len(ch_mult) = {len(c.ch_mult)}), got {c.image_size}"
    widths = {c.ch * c.ch_mult[-1]} | {c.ch * m for i, m in enumerate(c.ch_mult)
                                      if c.image_size // 2**i in c.attn_resolutions}
    if any(w % c.num_heads for w in widths):
        return f"model.num_heads must divide the attention widths {sorted(widths)}, got {show(c.num_heads)}"
    from diffcodec.unet import parameter_shapes  # unet imports this module

    count = sum(math.prod(shape) for shape in parameter_shapes(c).values())
    if count > MAX_PARAMETERS:
        return f"model must have at most {MAX_PARAMETERS:,} parameters, this config has {count:,}"
    return None


def diffusion_config_problem(c: DiffusionConfig) -> str | None:
    """The first field of ``c`` that no diffusion has, as 'diffusion.<field> must ..., got ...'.

    Requirements: a known schedule and variance type; num_timesteps in [1, MAX_TIMESTEPS]
    with every beta_t of the schedule in (0, 1), so that every abar_t > 0 and
    x^_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) is finite (the linear schedule scales
    its betas by 1000 / T, so it needs T = 1 or T > 20).
    """
    if c.schedule not in SCHEDULES:
        return f"diffusion.schedule must be one of {', '.join(SCHEDULES)}, got {show(c.schedule)}"
    if c.var_type not in VAR_TYPES:
        return f"diffusion.var_type must be one of {', '.join(VAR_TYPES)}, got {show(c.var_type)}"
    if not 1 <= c.num_timesteps <= MAX_TIMESTEPS:
        return f"diffusion.num_timesteps must be in [1, {MAX_TIMESTEPS}], got {show(c.num_timesteps)}"
    betas = SCHEDULES[c.schedule](c.num_timesteps)
    if not bool(np.all((betas > 0) & (betas < 1))):
        return (f"diffusion.num_timesteps must give {c.schedule} betas in (0, 1), got {c.num_timesteps} "
                f"(max beta {betas.max():.3g})")
    return None


def _field_value(section: str, name: str, default: Any, value: Any) -> tuple[Any, str | None]:
    """``value`` as the type of the field's ``default``, or the problem with it."""
    where = f"{section}.{name}"
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            return None, f"{where} must be a list of integers, got {show(value)}"
        return tuple(value), None
    if isinstance(default, bool):
        return value, None if isinstance(value, bool) else f"{where} must be true or false, got {show(value)}"
    if isinstance(default, int):
        return value, None if _is_int(value) else f"{where} must be an integer, got {show(value)}"
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > 1e300:
            return None, f"{where} must be a number, got {show(value)}"
        return float(value), None
    return value, None if isinstance(value, str) else f"{where} must be a string, got {show(value)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_from_dict(cls: type, data: Any, *, where: str) -> Any:
    """Rebuild a config record saved as a dict, validating every field.

    Fields missing from ``data`` take the record's defaults. Anything else wrong (not a
    mapping, an unknown field, a value of the wrong type, one outside its range: see
    ``model_config_problem`` / ``diffusion_config_problem``) is a one-line DiffcodecError
    ``<where>: corrupt checkpoint config: <section>.<field> must ..., got ...``.
    """
    section = SECTIONS[cls]

    def corrupt(problem: str) -> DiffcodecError:
        return DiffcodecError(f"{where}: corrupt checkpoint config: {problem}")

    if not isinstance(data, dict):
        raise corrupt(f"{section} is not a mapping, got {type(data).__name__}")
    defaults = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise corrupt(f"unknown {section} fields {show(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name], problem = _field_value(section, name, getattr(defaults, name), value)
        if problem is not None:
            raise corrupt(problem)
    config = cls(**kwargs)
    problem = model_config_problem(config) if cls is ModelConfig else diffusion_config_problem(config)
    if problem is not None:
        raise corrupt(problem)
    return config
