"""Shared fixtures: tiny seeded models saved as checkpoints, and the shared data folder; the
bits-back tests' machine-independent seeded models and synthetic images (test_codec_bitsback.py,
test_golden.py)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec.checkpoint import LoadedModel, fingerprint, save_checkpoint
from diffcodec.config import preset
from diffcodec.codec.entropy import seeded_words
from diffcodec.unet import UNet

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (the project's addopts: one worker per core): one torch thread per worker,
    # and for the processes tests start, so that workers never oversubscribe the cores
    # (spinning OpenMP threads on a busy 2-core machine run ~25x slower)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_model(seed: int = 0, *, learn_sigma: bool = False, scale: float = 0.02) -> tuple[UNet, object, object]:
    """The `tiny` preset with seeded weights; zero-initialised layers get small seeded noise
    so the network's output depends on its input."""
    mc, dc = preset("tiny")
    if learn_sigma:
        mc = dataclasses.replace(mc, learn_sigma=True)
        dc = dataclasses.replace(dc, var_type="learned_range")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the default init draws from the global generator
        torch.manual_seed(seed)
        model = UNet(mc)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval(), mc, dc


def seeded_model(seed: int = 0, *, learn_sigma: bool = False, out_scale: float = 0.05, image_size: int = 32):
    """The `tiny` preset with every parameter set from SplitMix64 words (no torch RNG, so the
    same on every machine and torch version). ``out_scale`` shrinks the output layer: 0.05
    gives a sane model (small eps), 1.0 a wild one; ``image_size``: its tile size."""
    mc, dc = preset("tiny")
    mc = dataclasses.replace(mc, image_size=image_size)
    if learn_sigma:
        mc = dataclasses.replace(mc, learn_sigma=True)
        dc = dataclasses.replace(dc, var_type="learned_range")
    model = UNet(mc)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            u = seeded_words(p.numel(), seed * 1000 + i).astype(np.float64) / 2.0**31 - 1.0
            if p.dim() > 1:
                scale = math.sqrt(3.0 / p[0].numel())
            else:
                scale = 0.1
            if name.startswith("conv_out"):
                scale *= out_scale
            value = torch.from_numpy(u * scale).float().reshape(p.shape)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                value += 1.0
            p.copy_(value)
    return model.eval(), mc, dc


def seeded_checkpoint(path: Path, seed: int = 4, *, image_size: int = 16) -> Path:
    """`seeded_model` saved as a float32 checkpoint file at ``path`` (for tests of the CLI)."""
    model, mc, dc = seeded_model(seed, image_size=image_size)
    save_checkpoint(path, model, mc, dc, meta={"weights": "test"}, dtype=torch.float32)
    return path


def as_loaded(model, mc, dc) -> LoadedModel:
    return LoadedModel(model, mc, dc, fingerprint(model.state_dict()), {"weights": "test"}, "<test>")


def synthetic_images(sizes, seed: int = 0) -> list[np.ndarray]:
    """Smooth gradients plus noise (deterministic, no numpy Generator)."""
    out = []
    for n, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
        noise = (seeded_words(h * w * 3, seed * 100 + n) % 41).reshape(h, w, 3).astype(np.int64) - 20
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    model, mc, dc = tiny_model()
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, mc, dc, meta={"weights": "random"}, dtype=torch.float16)
    return path


@pytest.fixture
def cifar_test_dir() -> Path:
    path = SHARED_DATA / "cifar10" / "test"
    if not path.is_dir():
        pytest.skip(f"{path} not present: the CIFAR-10 test shards live in ../shared/data beside the repo")
    return path


@pytest.fixture
def images_npz(tmp_path):
    """Five random 32x32 RGB images in a CIFAR-10-style .npz shard."""
    rng = np.random.default_rng(0)
    path = tmp_path / "imgs.npz"
    np.savez_compressed(path, x=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), y=np.arange(5, dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on a shared 2-core machine oversubscribed OpenMP threads spin (10x slower). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Scripts under test set torch's thread count for the whole process (``--threads``): put
    it back after every test, so that one test's choice does not slow every later one."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
