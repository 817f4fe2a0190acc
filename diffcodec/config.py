"""Configuration records for the network and the diffusion, and named presets.

Both records are frozen dataclasses saved inside every checkpoint (as plain dicts), so a
checkpoint alone says how to rebuild and evaluate its model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


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


def config_from_dict(cls: type, data: Any, *, where: str) -> Any:
    """Rebuild a config record, refusing unknown or ill-typed fields with a DiffcodecError."""
    if not isinstance(data, dict):
        raise DiffcodecError(f"{where}: {cls.__name__} is not a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise DiffcodecError(f"{where}: unknown {cls.__name__} fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
                raise DiffcodecError(f"{where}: {cls.__name__}.{name} must be a list of integers")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise DiffcodecError(f"{where}: {cls.__name__}.{name} must be true or false")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise DiffcodecError(f"{where}: {cls.__name__}.{name} must be a number")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise DiffcodecError(f"{where}: {cls.__name__}.{name} must be a string")
        kwargs[name] = value
    config = cls(**kwargs)
    if isinstance(config, DiffusionConfig):
        if config.schedule not in SCHEDULES:
            raise DiffcodecError(f"{where}: unknown noise schedule {config.schedule!r}")
        if config.var_type not in VAR_TYPES:
            raise DiffcodecError(f"{where}: unknown variance type {config.var_type!r}")
        if config.num_timesteps < 1:
            raise DiffcodecError(f"{where}: num_timesteps must be positive")
    return config
