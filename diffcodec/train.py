"""The ``diffcodec train`` job: time-boxed, resumable training on CIFAR-10 train images.

``train`` runs a ``trainer.Trainer`` until ``minutes`` of wall time (this piece) or a total
step count, saving the run directory (``trainer``: state.pt, ema.pt, loss_history.json)
every few minutes and at the end; it resumes exactly from state.pt (``resume``) or starts
from a checkpoint's weights (``init``). Losses: ``train_losses``; recipes and
hyperparameters: ``train_config``. Training data is refused when it looks like the test set.

Under torchrun (``world``) every rank runs this loop on its share of each batch
(`trainer`: DistributedDataParallel; ``--batch-size`` is the whole step's batch, so the
learning-rate recipe is unchanged); rank 0 decides when to stop (its clock), logs, saves
and exports; the others only train.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcodec import distributed
from diffcodec.checkpoint import load_checkpoint
from diffcodec.config import DiffusionConfig, ModelConfig, config_from_dict, preset
from diffcodec.errors import DiffcodecError
from diffcodec.train_config import make_train_config, train_config_from_dict, validate_train_config
from diffcodec.trainer import STATE_FILE, Trainer, read_state

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
    world: distributed.World = distributed.SINGLE,
) -> TrainResult:
    """Train until ``minutes`` of wall time (this piece) or total step ``max_steps``; save.

    ``resume``: a run directory (or state.pt) to continue exactly. ``init``: a checkpoint
    whose weights start the run (model = EMA = weights; fresh optimizer). ``overrides``:
    TrainConfig fields (lr, batch_size, ...) that replace the recipe's or the resumed run's.
    """
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    if not world.is_main:
        def log(line: str) -> None:  # progress from rank 0 only
            pass
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

    images_np = load_training_images(data, image_size=model_config.image_size, allow_test_data=allow_test_data,
                                     limit=data_limit)
    if config.batch_size % world.size:
        raise DiffcodecError(f"--batch-size {config.batch_size} does not divide among {world.size} processes; "
                             "give a multiple of the process count (it is the whole step's batch)")
    try:  # only once the data and the settings are known good: a refused run leaves no folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffcodecError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None
    images = torch.from_numpy(images_np).to(device)
    distributed.ready(world)
    trainer = Trainer(config, model_config, diffusion_config, device, world)
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
        f"starting at step {trainer.step_count}"
        + (f"; {world.size} processes (DDP), {config.batch_size // world.size} images each per step"
           if world.distributed else ""))
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
            if distributed.rank0_says(now + step_seconds > deadline, world):  # all ranks stop together
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
                if world.is_main:
                    trainer.save(run_dir)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        stopped = "interrupted"
        log("train: interrupted; saving")
    trainer.record(trainer.train_seconds)
    try:
        piece, fp = time.monotonic() - start, None
        if world.is_main:
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
