"""One training run's state: model, EMA, optimizer, generator, counters; one step at a time.

``Trainer.step`` takes one optimizer step: a batch drawn from the run's generator, the loss
of ``train_losses.training_losses`` (times the importance weights under ``vlb``), a
global-norm gradient clip, Adam at ``train_config.lr_at``, then the EMA update
ema <- decay ema + (1 - decay) model, decay = min(ema_decay, (1 + n) / (10 + n)) with warmup.

A run directory holds ``state.pt`` (model, EMA, optimizer, step, generator state, sampler
history, TrainConfig, loss history; written atomically, loaded with ``weights_only=True``),
``ema.pt`` (a float32 EMA checkpoint, ``checkpoint.save_checkpoint``) and
``loss_history.json``. A run resumes from ``state.pt`` or, when only weights survive (GPU
machines lose their disk), from an EMA checkpoint (``init_from_weights``: model = EMA =
those weights, fresh optimizer, step counters carried on).

All randomness of a step (batch indices, flips, t, noise, and a seed for dropout that is
used inside ``torch.random.fork_rng``) comes from one seeded CPU ``torch.Generator``, so a
resumed CPU run takes bit-identical steps to an uninterrupted one.

Under torchrun (a `distributed.World` of W processes) the network is wrapped in
DistributedDataParallel and ``batch_size`` stays the step's whole (effective) batch: every
rank draws the whole batch's randomness from the same generator and trains on its
contiguous 1/W of the rows; DDP averages the gradients, so a step is the one-process step
on the same batch (to float rounding), with the same learning-rate recipe, and the run's
state (generator included) is the same on every rank: rank 0 saves it, and it resumes on
any number of processes. Dropout masks are drawn per rank (seed + rank): with dropout > 0
the steps equal the one-process steps in distribution, not bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from diffcodec import distributed
from diffcodec.checkpoint import save_checkpoint
from diffcodec.config import DiffusionConfig, ModelConfig, config_to_dict
from diffcodec.diffusion import q_sample
from diffcodec.errors import DiffcodecError
from diffcodec.schedule import make_schedule
from diffcodec.torch_files import load_plain
from diffcodec.train_config import TrainConfig, lr_at, train_config_to_dict
from diffcodec.train_losses import ImportanceSampler, training_losses
from diffcodec.unet import UNet

STATE_FORMAT = "diffcodec-train-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"
EMA_FILE = "ema.pt"
HISTORY_FILE = "loss_history.json"


def _build_model(model_config: ModelConfig, seed: int) -> UNet:
    """A freshly initialised network, seeded without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(model_config)


class Trainer:
    """Model, EMA, optimizer, generator and counters of one run; ``step`` takes one step."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, diffusion_config: DiffusionConfig,
                 device: torch.device | str = "cpu", world: distributed.World = distributed.SINGLE) -> None:
        if config.batch_size % world.size:
            raise DiffcodecError(f"the batch of {config.batch_size} images does not divide among {world.size} "
                                 "processes; give a --batch-size that is a multiple of the process count")
        self.config = config
        self.world = world
        self.rows = distributed.shard(config.batch_size, world)  # this rank's rows of each batch
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
        self.forward = self.model
        if world.distributed:  # gradients averaged over the ranks in backward
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if use_cuda else None)
        if use_cuda and config.compile:
            self.forward = torch.compile(self.forward)

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
        whole = self.draw_batch(images)  # the whole batch's draws, the same on every rank
        rows = slice(self.rows.start, self.rows.stop)
        d = {k: v if k == "seed" else self.to_device(v[rows]) for k, v in whole.items()}
        x0 = images[d["idx"].to(images.device)].to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x0 = torch.where(d["flip"][:, None, None, None], x0.flip(3), x0)
        t, noise, weights = d["t"], d["noise"], d["weights"]
        x_t = q_sample(self.schedule, x0, t, noise)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step_count)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(d["seed"]) + self.world.rank)
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
        loss = loss.detach()
        if self.world.distributed:  # the whole batch's loss and L_t terms, on every rank
            loss = distributed.all_mean(loss, self.world)
        if self.sampler is not None:
            vb = losses["vb_bpd"].detach()
            if self.world.distributed:
                t, vb = whole["t"].to(dev), distributed.all_concat(vb, self.world)
            self.sampler.update(t, vb)
        self.step_count += 1
        self.images_seen += cfg.batch_size
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
    state = load_plain(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DiffcodecError(f"{path}: not a diffcodec training state")
    if state.get("version") != STATE_VERSION:
        raise DiffcodecError(f"{path}: training state version {state.get('version')!r}; expected {STATE_VERSION}")
    return state
