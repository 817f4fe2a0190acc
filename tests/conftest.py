"""Shared fixtures: tiny seeded models saved as checkpoints, and the shared data folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec.checkpoint import save_checkpoint
from diffcodec.config import preset
from diffcodec.unet import UNet

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_model(seed: int = 0, *, learn_sigma: bool = False, scale: float = 0.02) -> tuple[UNet, object, object]:
    """The `tiny` preset with seeded weights; zero-initialised layers get small seeded noise
    so the network's output depends on its input."""
    import dataclasses

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
