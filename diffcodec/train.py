"""Training: eps-prediction with the paper's L_simple, Improved DDPM's hybrid loss or L_vlb.

Losses (per image, averaged over the batch):

- ``simple``: L_simple = mean over dimensions of ||eps - eps_theta(x_t, t)||^2, t uniform.
- ``hybrid``: L_simple + lambda * T * L_t with lambda = 0.001 (Improved DDPM). L_t is the
  bound term ``likelihood.vb_term_bits`` of the sampled t in bits/dim, computed from the
  network output with the eps channels DETACHED, so it trains only the learned-range
  variance channels (the mean is trained by L_simple alone). t uniform.
- ``vlb``: L_t in bits/dim with importance-sampled t (Improved DDPM): a history of the 10
  most recent L_t per t; once every t has 10 entries, t is drawn with p_t proportional to
  sqrt(E[L_t^2]) (mixed with 0.1% uniform) and each sample is weighted by 1 / (T p_t), so
  the loss stays an unbiased estimate of L_vlb / T. Gradients reach mean and variance.

A run directory holds ``state.pt`` (model, EMA, optimizer, step, generator state, sampler
history, TrainConfig, loss history; written atomically, loaded with ``weights_only=True``),
``ema.pt`` (a float32 EMA checkpoint, ``checkpoint.save_checkpoint``) and
``loss_history.json``. Runs are time-boxed (``minutes``) and resumable from ``state.pt``
or, when only weights survive (GPU machines lose their disk), from an EMA checkpoint
(``init``: model = EMA = those weights, fresh optimizer, step counters carried on).

All randomness of a step (batch indices, flips, t, noise, and a seed for dropout that is
used inside ``torch.random.fork_rng``) comes from one seeded CPU ``torch.Generator``, so a
resumed CPU run takes bit-identical steps to an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffcodec.checkpoint import load_checkpoint, save_checkpoint
from diffcodec.config import DiffusionConfig, ModelConfig, config_from_dict, config_to_dict, preset
from diffcodec.diffusion import p_mean_variance, q_posterior_mean_variance, q_sample, split_model_output
from diffcodec.errors import DiffcodecError
from diffcodec.losses import LN2, discretized_gaussian_log_likelihood_nats, flat_sum, normal_kl_nats
from diffcodec.schedule import Schedule, make_schedule
from diffcodec.unet import UNet

LOSSES = ("simple", "hybrid", "vlb")
STATE_FORMAT = "diffcodec-train-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"
EMA_FILE = "ema.pt"
HISTORY_FILE = "loss_history.json"


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
    # DESIGN.md's GPU probes: batch 256, Adam 4e-4, EMA 0.999.
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


# ------------------------------------------------------------------------------ losses


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def vb_terms_bpd(
    s: Schedule, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, var_type: str
) -> torch.Tensor:
    """Paper L_t of each row in bits/dim [B] (float32, differentiable), x^_0 not clipped.

    Both branches are computed for every row, without a host sync (no data-dependent
    indexing): the KL for every row, the decoder term -log p(x_0 | x_1) for every row with
    the KL rows' inputs replaced by harmless values (mean x_0, log scale 0), so that the
    branch a row does not use stays finite and contributes exactly zero gradient.
    """
    num_dims = x0[0].numel()
    p = p_mean_variance(s, output, x_t, t, var_type=var_type, clip_denoised=False)
    q_mean, _, q_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    kl_bits = flat_sum(normal_kl_nats(q_mean, q_log_var, p.mean, p.log_variance).double()) / LN2
    is_decoder = (t == 0).reshape(-1, 1, 1, 1)
    mean = torch.where(is_decoder, p.mean, x0)
    log_scale = torch.where(is_decoder, 0.5 * p.log_variance, torch.zeros_like(p.log_variance))
    nll_bits = -flat_sum(discretized_gaussian_log_likelihood_nats(x0, mean=mean, log_scale=log_scale)) / LN2
    return (torch.where(t == 0, nll_bits, kl_bits) / num_dims).float()


def training_losses(
    s: Schedule,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    loss: str,
    var_type: str,
    hybrid_lambda: float = 0.001,
) -> dict[str, torch.Tensor]:
    """Per-image losses [B] from the network output [B, C or 2C, H, W] at code steps t [B].

    Returns ``loss`` (what to minimise, before importance weights), ``mse`` (L_simple term,
    per dimension) and, for hybrid/vlb, ``vb_bpd`` (L_t in bits/dim).
    """
    output = output.float()
    eps, v = split_model_output(output, var_type, x0.shape[1])
    mse = mean_flat((noise - eps) ** 2)
    if loss == "simple":
        return {"loss": mse, "mse": mse}
    if loss == "hybrid":
        if v is None:
            raise DiffcodecError("the hybrid loss needs learned-range variances")
        frozen_mean = torch.cat([eps.detach(), v], dim=1)  # stop-gradient: L_vlb trains only v
        vb = vb_terms_bpd(s, frozen_mean, x0, x_t, t, var_type=var_type)
        return {"loss": mse + hybrid_lambda * s.num_steps * vb, "mse": mse, "vb_bpd": vb}
    if loss == "vlb":
        vb = vb_terms_bpd(s, output, x0, x_t, t, var_type=var_type)
        return {"loss": vb, "mse": mse.detach(), "vb_bpd": vb}
    raise DiffcodecError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")


class ImportanceSampler:
    """Improved DDPM's t sampler for L_vlb: p_t proportional to sqrt(E[L_t^2]) over the last
    ``history`` values of each L_t, mixed with ``uniform_prob`` of uniform; uniform until
    every t has a full history. ``sample`` returns t [B] and weights 1 / (T p_t) [B]."""

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.num_steps, self.history_len, self.uniform_prob = num_steps, history, uniform_prob
        self.history = torch.zeros(num_steps, history, dtype=torch.float64)
        self.count = torch.zeros(num_steps, dtype=torch.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self.count == self.history_len).all())

    def probs(self) -> torch.Tensor:
        """p_t [T] (float64)."""
        T = self.num_steps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.history.pow(2).mean(dim=1).sqrt()
        if not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = w / w.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probs()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * p[t])
        return t, weights.float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record L_t values (any unit, consistently) of the sampled steps t [B]."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.count[ti])
            if n == self.history_len:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = li
            else:
                self.history[ti, n] = li
                self.count[ti] = n + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["history"].shape != self.history.shape or state["count"].shape != self.count.shape:
            raise DiffcodecError("the saved importance-sampler history does not fit this schedule")
        self.history = state["history"].to(torch.float64).clone()
        self.count = state["count"].to(torch.int64).clone()


# -------------------------------------------------------------------------------- data

_TEST_NAME = re.compile(r"test", re.IGNORECASE)


def training_source(path: str | os.PathLike, *, allow_test_data: bool = False) -> str:
    """The path to give ``data.read_images`` for TRAINING images, refusing test-set data.

    Refused (unless ``allow_test_data``): a ``:test`` suffix, a file or folder whose name
    contains "test", a folder whose shards/images have "test" in their names. Official
    CIFAR-10 folders and archives are read with ``:train`` (data_batch_1..5).
    """
    raw = os.fspath(path)
    split = None
    m = re.fullmatch(r"(.+):(test|train)", raw)
    if not os.path.exists(raw) and m is not None:
        raw, split = m.group(1), m.group(2)
    if not os.path.exists(raw):
        raise DiffcodecError(f"{raw}: no such file or directory")
    why = None
    if split == "test":
        why = "the ':test' split"
    elif _TEST_NAME.search(os.path.basename(os.path.normpath(raw))):
        why = f"its name {os.path.basename(os.path.normpath(raw))!r}"
    cifar_like = False
    if why is None and os.path.isdir(raw):
        inner = os.path.join(raw, "cifar-10-batches-py")
        folder = inner if os.path.isdir(inner) else raw
        names = sorted(os.listdir(folder))
        cifar_like = any(n.startswith("data_batch_") or n == "test_batch" for n in names)
        if not cifar_like:
            tests = [n for n in names if _TEST_NAME.search(n) and os.path.isfile(os.path.join(folder, n))]
            if tests:
                why = f"files named like the test set ({', '.join(tests[:3])})"
    elif why is None:
        cifar_like = raw.lower().endswith((".tar.gz", ".tgz", ".tar"))
    if why is not None and not allow_test_data:
        raise DiffcodecError(f"{raw}: looks like TEST data ({why}); training uses the train split only "
                             "(pass --allow-test-data to override)")
    if cifar_like and split is None:
        return raw + ":train"
    return raw if split is None else f"{raw}:{split}"


def load_training_images(
    path: str | os.PathLike, *, image_size: int, allow_test_data: bool = False, limit: int | None = None
) -> np.ndarray:
    """All training images as one uint8 array [N, S, S, 3] (S = the model's image size)."""
    from diffcodec.data import read_images

    images = read_images(training_source(path, allow_test_data=allow_test_data), limit=limit).as_array()
    if images.shape[1:3] != (image_size, image_size):
        raise DiffcodecError(f"{path}: images are {images.shape[2]}x{images.shape[1]}; "
                             f"the model trains on {image_size}x{image_size}")
    return images


# ------------------------------------------------------------------------------ trainer


def _build_model(model_config: ModelConfig, seed: int) -> UNet:
    """A freshly initialised network, seeded without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(model_config)


class Trainer:
    """Model, EMA, optimizer, generator and counters of one run; ``step`` takes one step."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, diffusion_config: DiffusionConfig,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self.model_config, self.diffusion_config = model_config, diffusion_config
        self.device = torch.device(device)
        self.schedule = make_schedule(diffusion_config.schedule, diffusion_config.num_timesteps)
        self.original_t = torch.from_numpy(self.schedule.timesteps).to(self.device)
        self.model = _build_model(model_config, config.seed).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        use_cuda = self.device.type == "cuda"
        # fused Adam on CUDA: one kernel for all parameters (same update and state as the default)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=use_cuda or None)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = (ImportanceSampler(self.schedule.num_steps, config.vlb_history, config.vlb_uniform_prob)
                        if config.loss == "vlb" else None)
        self.step_count = 0
        self.images_seen = 0
        self.train_seconds = 0.0
        self.history: list[tuple[int, float, int, float]] = []  # (step, loss, images_seen, seconds)
        self._window_sum: torch.Tensor | float = 0.0
        self._window_n = 0
        self.autocast = use_cuda and config.bf16
        if use_cuda:
            torch.backends.cudnn.benchmark = True
        self.forward = torch.compile(self.model) if (use_cuda and config.compile) else self.model

    # -- one step

    def draw_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch indices, flips, t (+ importance weights), noise and a dropout seed, from the generator."""
        g, b = self.generator, self.config.batch_size
        idx = torch.randint(images.shape[0], (b,), generator=g)
        flip = torch.rand(b, generator=g) < 0.5 if self.config.flip else torch.zeros(b, dtype=torch.bool)
        if self.sampler is not None:
            t, weights = self.sampler.sample(b, g)
        else:
            t, weights = torch.randint(self.schedule.num_steps, (b,), generator=g), torch.ones(b)
        c, h, w = self.model_config.in_channels, images.shape[1], images.shape[2]
        noise = torch.randn(b, c, h, w, generator=g)
        seed = torch.randint(0, 2**62, (1,), generator=g)
        return {"idx": idx, "flip": flip, "t": t, "weights": weights, "noise": noise, "seed": seed}

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device; to a GPU through pinned memory, without
        making the host wait for the GPU."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def step(self, images: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch from ``images`` (uint8 [N, H, W, C] on any device).

        Returns the batch loss (a detached 0-d tensor on the training device).
        """
        cfg, dev = self.config, self.device
        d = self.draw_batch(images)
        d = {k: v if k == "seed" else self.to_device(v) for k, v in d.items()}
        x0 = images[d["idx"].to(images.device)].to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x0 = torch.where(d["flip"][:, None, None, None], x0.flip(3), x0)
        t, noise, weights = d["t"], d["noise"], d["weights"]
        x_t = q_sample(self.schedule, x0, t, noise)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step_count)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(d["seed"]))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                output = self.forward(x_t, self.original_t[t])
            losses = training_losses(self.schedule, output, x0, x_t, t, noise, loss=cfg.loss,
                                     var_type=self.diffusion_config.var_type, hybrid_lambda=cfg.hybrid_lambda)
            loss = (losses["loss"] * weights).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        if self.sampler is not None:
            self.sampler.update(t, losses["vb_bpd"])
        self.step_count += 1
        self.images_seen += cfg.batch_size
        loss = loss.detach()
        self._window_sum = self._window_sum + loss
        self._window_n += 1
        return loss

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, (1 + self.step_count) / (10 + self.step_count))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    def record(self, seconds: float) -> float | None:
        """Close a loss-history window: append (step, mean loss, images seen, seconds)."""
        if self._window_n == 0:
            return None
        mean = float(self._window_sum) / self._window_n
        if not math.isfinite(mean):
            raise DiffcodecError(f"training diverged: the loss is {mean} at step {self.step_count} "
                                 "(the last saved state is kept; try a lower --lr)")
        self.history.append((self.step_count, mean, self.images_seen, seconds))
        self._window_sum, self._window_n = 0.0, 0
        return mean

    # -- state

    def meta(self) -> dict[str, Any]:
        return {"weights": "ema", "preset": self.config.preset, "loss": self.config.loss,
                "steps": self.step_count, "train_images_seen": self.images_seen,
                "train_seconds": round(self.train_seconds, 3), "train_config": train_config_to_dict(self.config)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "train_config": train_config_to_dict(self.config),
            "model_config": config_to_dict(self.model_config),
            "diffusion_config": config_to_dict(self.diffusion_config),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "step": self.step_count,
            "images_seen": self.images_seen,
            "train_seconds": float(self.train_seconds),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 4),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.generator.set_state(state["generator"])
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.history = [(int(s), float(l), int(n), float(sec)) for s, l, n, sec in state["history"].tolist()]

    def init_from_weights(self, loaded_model: torch.nn.Module, meta: dict[str, Any]) -> None:
        """Continue from (EMA) weights alone: model = EMA = those weights, fresh optimizer."""
        state = loaded_model.state_dict()
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        self.step_count = int(meta.get("steps", 0) or 0)
        self.images_seen = int(meta.get("train_images_seen", 0) or 0)
        self.train_seconds = float(meta.get("train_seconds", 0.0) or 0.0)
        # a fresh stream of randomness, different from the one that produced these weights
        self.generator.manual_seed(self.config.seed + 1_000_003 * (self.step_count + 1))

    def save(self, run_dir: str | os.PathLike) -> None:
        """Write state.pt (atomically), the fp32 EMA checkpoint and the loss history."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / (STATE_FILE + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, run_dir / STATE_FILE)
        save_checkpoint(run_dir / EMA_FILE, self.ema, self.model_config, self.diffusion_config, meta=self.meta())
        write_history_json(run_dir / HISTORY_FILE, self.history, self.meta())

    def export(self, path: str | os.PathLike) -> str:
        """fp16 EMA weights as a diffcodec checkpoint; returns its fingerprint."""
        return save_checkpoint(path, self.ema, self.model_config, self.diffusion_config, meta=self.meta(),
                               dtype=torch.float16)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def write_history_json(path: str | os.PathLike, history: list[tuple[int, float, int, float]],
                       meta: dict[str, Any]) -> None:
    """The loss history as JSON: {"meta": ..., "columns": [...], "rows": [[step, loss, images_seen, seconds]]}."""
    payload = {"meta": meta, "columns": ["step", "loss", "images_seen", "seconds"],
               "rows": [[int(s), float(l), int(n), round(float(sec), 3)] for s, l, n, sec in history]}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """A run directory's state.pt (or the file itself), validated."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise DiffcodecError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DiffcodecError(f"{path}: not a readable training state ({first[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DiffcodecError(f"{path}: not a diffcodec training state")
    if state.get("version") != STATE_VERSION:
        raise DiffcodecError(f"{path}: training state version {state.get('version')!r}; expected {STATE_VERSION}")
    return state


# -------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    steps: int  # total steps of the run (all pieces)
    steps_this_piece: int
    images_seen: int
    train_seconds: float  # all pieces
    piece_seconds: float
    images_per_second: float  # this piece
    final_loss: float | None  # mean of the last history window
    stopped: str  # "time box", "steps", "interrupted"
    export_path: str | None
    export_fingerprint: str | None


def _fmt_minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def train(
    data: str | os.PathLike,
    *,
    run_dir: str | os.PathLike,
    preset_name: str | None = None,
    loss: str | None = None,
    minutes: float | None = None,
    max_steps: int | None = None,
    resume: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    allow_test_data: bool = False,
    data_limit: int | None = None,
    save_minutes: float = 5.0,
    progress_seconds: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train until ``minutes`` of wall time (this piece) or total step ``max_steps``; save.

    ``resume``: a run directory (or state.pt) to continue exactly. ``init``: a checkpoint
    whose weights start the run (model = EMA = weights; fresh optimizer). ``overrides``:
    TrainConfig fields (lr, batch_size, ...) that replace the recipe's or the resumed run's.
    """
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    if minutes is None and max_steps is None:
        raise DiffcodecError("give a time box (--minutes) or a step count (--steps)")
    if minutes is not None and not minutes > 0:
        raise DiffcodecError("--minutes must be positive")
    if resume is not None and init is not None:
        raise DiffcodecError("--resume and --init exclude each other")
    run_dir = Path(run_dir)
    if resume is None and (run_dir / STATE_FILE).exists():
        raise DiffcodecError(f"{run_dir} already holds a training run; pass --resume to continue it "
                             "or choose another --out")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    device = torch.device(device)

    state = loaded = None
    if resume is not None:
        state = read_state(resume)
        config = train_config_from_dict(state["train_config"], where=str(resume))
        for name, value in (("preset", preset_name), ("loss", loss)):
            if value is not None and value != getattr(config, name):
                raise DiffcodecError(f"{resume}: the run trains {name} {getattr(config, name)!r}, not {value!r}")
        config = validate_train_config(dataclasses.replace(config, **overrides))
        model_config = config_from_dict(ModelConfig, state["model_config"], where=str(resume))
        diffusion_config = config_from_dict(DiffusionConfig, state["diffusion_config"], where=str(resume))
    elif init is not None:
        loaded = load_checkpoint(init, device="cpu")
        ckpt_preset = loaded.meta.get("preset")
        name = preset_name or ckpt_preset
        if name is None:
            raise DiffcodecError(f"{init}: the checkpoint names no preset; pass --preset")
        if (loaded.model_config, loaded.diffusion_config) != preset(name):
            raise DiffcodecError(f"{init}: the checkpoint's model is not preset {name!r}")
        ckpt_loss = loaded.meta.get("loss") if name == ckpt_preset else None
        config = make_train_config(name, loss=loss or ckpt_loss, **overrides)
        model_config, diffusion_config = loaded.model_config, loaded.diffusion_config
    else:
        if preset_name is None:
            raise DiffcodecError("pass --preset (or --resume / --init)")
        config = make_train_config(preset_name, loss=loss, **overrides)
        model_config, diffusion_config = preset(preset_name)

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffcodecError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None
    images_np = load_training_images(data, image_size=model_config.image_size, allow_test_data=allow_test_data,
                                     limit=data_limit)
    images = torch.from_numpy(images_np).to(device)
    trainer = Trainer(config, model_config, diffusion_config, device)
    if state is not None:
        trainer.load_state_dict(state)
    elif loaded is not None:
        trainer.init_from_weights(loaded.model, loaded.meta)
    del state, loaded
    if max_steps is not None and trainer.step_count >= max_steps:
        raise DiffcodecError(f"the run is already at step {trainer.step_count} >= --steps {max_steps}")

    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"train: preset {config.preset} ({n_params / 1e6:.2f}M parameters), loss {config.loss}, "
        f"{len(images_np)} images, batch {config.batch_size}, lr {config.lr:g}, device {device}, "
        f"starting at step {trainer.step_count}")
    start = time.monotonic()
    deadline = start + minutes * 60.0 if minutes is not None else math.inf
    last_save = last_progress = start
    progress_images, progress_sum, progress_n = 0, 0.0, 0
    start_step, base_seconds = trainer.step_count, trainer.train_seconds
    stopped = "time box"
    step_seconds = 0.0  # duration of the last step, to stop before overrunning the box
    try:
        while True:
            if max_steps is not None and trainer.step_count >= max_steps:
                stopped = "steps"
                break
            now = time.monotonic()
            if now + step_seconds > deadline:
                stopped = "time box"
                break
            loss_value = trainer.step(images)
            after = time.monotonic()
            step_seconds = after - now
            trainer.train_seconds = base_seconds + (after - start)
            progress_images += config.batch_size
            progress_sum, progress_n = progress_sum + loss_value, progress_n + 1
            if trainer.step_count % config.log_every == 0:
                trainer.record(trainer.train_seconds)
            if after - last_progress >= progress_seconds:
                mean = float(progress_sum) / progress_n
                eta = deadline - after
                if max_steps is not None:
                    eta = min(eta, (max_steps - trainer.step_count) * (after - start)
                              / max(1, trainer.step_count - start_step))
                log(f"train: step {trainer.step_count} loss {mean:.4f} "
                    f"{progress_images / (after - last_progress):.1f} img/s "
                    f"elapsed {_fmt_minutes(after - start)} eta {_fmt_minutes(eta)}")
                last_progress, progress_images, progress_sum, progress_n = after, 0, 0.0, 0
            if after - last_save >= save_minutes * 60.0:
                trainer.save(run_dir)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        stopped = "interrupted"
        log("train: interrupted; saving")
    trainer.record(trainer.train_seconds)
    try:
        trainer.save(run_dir)
        piece = time.monotonic() - start
        fp = trainer.export(export) if export is not None else None
    except OSError as e:
        raise DiffcodecError(f"cannot write the run's files ({e.strerror or e}: {e.filename or run_dir})") from None
    steps_piece = trainer.step_count - start_step
    final = trainer.history[-1][1] if trainer.history else None
    log(f"train: stopped ({stopped}) at step {trainer.step_count} after {_fmt_minutes(piece)}; "
        f"state in {run_dir}" + (f"; EMA weights exported to {export}" if export else ""))
    return TrainResult(
        run_dir=str(run_dir), steps=trainer.step_count, steps_this_piece=steps_piece,
        images_seen=trainer.images_seen, train_seconds=trainer.train_seconds, piece_seconds=piece,
        images_per_second=steps_piece * config.batch_size / piece if piece > 0 else math.nan,
        final_loss=final, stopped=stopped, export_path=str(export) if export else None, export_fingerprint=fp,
    )
