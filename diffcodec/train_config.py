"""How to train: the TrainConfig record, per-preset recipes, the learning-rate schedule.

A TrainConfig is saved in every training state (``trainer.STATE_FILE``) and in the meta of
exported checkpoints, as a plain dict (``train_config_to_dict``); ``train_config_from_dict``
refuses unknown fields and ``validate_train_config`` every out-of-range value, with a
one-line DiffcodecError.

Learning rate of step n (0-based): lr (n + 1) / warmup_steps while n < warmup_steps, then lr.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from diffcodec.config import preset
from diffcodec.errors import DiffcodecError

LOSSES = ("simple", "hybrid", "vlb")


@dataclass(frozen=True)
class TrainConfig:
    """How to train one preset. Defaults are the paper's CIFAR-10 recipe."""

    preset: str = "ddpm-cifar10"
    loss: str = "simple"
    lr: float = 2e-4  # Adam
    warmup_steps: int = 5000  # linear learning-rate warmup, then constant
    batch_size: int = 128
    grad_clip: float = 1.0  # global gradient-norm clip
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): a usable EMA early on
    flip: bool = True  # random horizontal flips
    seed: int = 0
    hybrid_lambda: float = 0.001  # weight of L_vlb in the hybrid loss
    vlb_history: int = 10  # importance sampler: recent L_t kept per t
    vlb_uniform_prob: float = 0.001  # importance sampler: uniform mixture weight
    log_every: int = 25  # steps per loss-history record
    bf16: bool = True  # bf16 autocast of the network on CUDA (CPU always runs fp32)
    compile: bool = False  # torch.compile the network on CUDA


# Per-preset training recipes (overrides of TrainConfig's paper defaults).
RECIPES: dict[str, dict[str, Any]] = {
    # Ho et al. 2020: L_simple, Adam 2e-4, warmup 5000, clip 1, batch 128, flips, EMA 0.9999.
    "ddpm-cifar10": {},
    # Improved DDPM (Nichol & Dhariwal 2021) CIFAR-10: hybrid loss, Adam 1e-4, no warmup.
    "ddpm-cifar10-learned": {"loss": "hybrid", "lr": 1e-4, "warmup_steps": 0},
    # The GPU probes of ../shared/docs/DESIGN.md: batch 256, Adam 4e-4, EMA 0.999.
    "small-learned": {"loss": "hybrid", "lr": 4e-4, "warmup_steps": 500, "batch_size": 256, "ema_decay": 0.999},
    "small-learned-nodrop": {"loss": "hybrid", "lr": 4e-4, "warmup_steps": 500, "batch_size": 256, "ema_decay": 0.999},
    "small-cosine": {"loss": "hybrid", "lr": 4e-4, "warmup_steps": 500, "batch_size": 256, "ema_decay": 0.999},
    # A CPU run of tens of minutes: a few thousand steps.
    "cpu-small": {"loss": "hybrid", "lr": 1e-3, "warmup_steps": 200, "batch_size": 64, "ema_decay": 0.999},
    # Tests.
    "tiny": {"lr": 1e-3, "warmup_steps": 0, "batch_size": 8, "ema_decay": 0.99, "log_every": 5},
    "tiny-learned": {"loss": "hybrid", "lr": 1e-3, "warmup_steps": 0, "batch_size": 8, "ema_decay": 0.99,
                     "log_every": 5},
}


def make_train_config(preset_name: str, **overrides: Any) -> TrainConfig:
    """The preset's recipe with ``overrides`` (None values are ignored), validated."""
    preset(preset_name)  # DiffcodecError for an unknown preset
    fields = {**RECIPES.get(preset_name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return validate_train_config(TrainConfig(preset=preset_name, **fields))


def validate_train_config(c: TrainConfig) -> TrainConfig:
    if c.loss not in LOSSES:
        raise DiffcodecError(f"unknown loss {c.loss!r}; known: {', '.join(LOSSES)}")
    if c.loss == "hybrid" and preset(c.preset)[1].var_type != "learned_range":
        raise DiffcodecError(f"the hybrid loss trains learned variances; preset {c.preset!r} has fixed ones "
                             "(use --loss simple or vlb, or a *-learned preset)")
    checks = [(c.lr > 0, "learning rate must be positive"), (c.warmup_steps >= 0, "warmup must be >= 0"),
              (c.batch_size >= 1, "batch size must be >= 1"), (c.grad_clip > 0, "grad clip must be positive"),
              (0 <= c.ema_decay < 1, "EMA decay must be in [0, 1)"), (c.log_every >= 1, "log_every must be >= 1"),
              (c.vlb_history >= 1, "vlb_history must be >= 1"), (0 < c.vlb_uniform_prob <= 1, "bad vlb_uniform_prob")]
    for ok, message in checks:
        if not ok:
            raise DiffcodecError(message)
    return c


def train_config_to_dict(c: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(c)


def train_config_from_dict(data: Any, *, where: str) -> TrainConfig:
    if not isinstance(data, dict):
        raise DiffcodecError(f"{where}: TrainConfig is not a mapping")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - names
    if unknown:
        raise DiffcodecError(f"{where}: unknown TrainConfig fields {sorted(unknown)}")
    return validate_train_config(TrainConfig(**data))


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup, then constant."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr
