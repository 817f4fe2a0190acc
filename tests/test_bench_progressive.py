"""bench.progressive end to end on the tiny model: tiled crops, per-stage rates that add up,
lossy baselines on the same images, and the Kodak rate-distortion figure from its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import plot as bench_plot  # noqa: E402
from bench import progressive as bench_progressive  # noqa: E402
from diffcodec.errors import DiffcodecError  # noqa: E402


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 3, yy * 2, (xx + yy) * 2], axis=-1) % 256
    return np.clip(base + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)


def test_center_crop_takes_the_middle_and_refuses_a_larger_size():
    img = np.arange(70 * 80 * 3, dtype=np.int64).reshape(70, 80, 3).astype(np.uint8)
    crop = bench_progressive.center_crop(img, 64)
    assert crop.shape == (64, 64, 3) and np.array_equal(crop, img[3:67, 8:72])
    with pytest.raises(DiffcodecError, match="larger"):
        bench_progressive.center_crop(img, 96)


def test_lossy_baselines_rise_in_rate_and_quality():
    rng = np.random.default_rng(0)
    images = [smooth_image(rng, 32, 32), smooth_image(rng, 32, 32)]
    curves = bench_progressive.lossy_baselines(images)
    assert {"JPEG (Pillow, 4:2:0)", "WebP (method 6)"} <= set(curves)
    for name, points in curves.items():
        bpp = np.array([p[0] for p in points])
        psnr = np.array([p[1] for p in points])
        assert np.all(bpp > 0) and np.all(np.isfinite(psnr)), name
        # sorted by rate; the best setting is clearly better than the worst
        assert np.all(np.diff(bpp) >= 0) and psnr[-1] > psnr[0] + 2, name


def test_progressive_bench_codes_tiled_crops_and_the_kodak_figure_is_drawn(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(rng, 70, 80)).save(folder / f"im{i}.png")
    reports = tmp_path / "reports"
    out = reports / "progressive_kodak.json"
    assert bench_progressive.main([str(folder), "-c", str(tiny_checkpoint), "-n", "2", "--crop", "64",
                                   "--steps", "3", "--chunk-bits", "6", "--log2-candidates", "10",
                                   "--perturb", "0", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["crop"] == 64 and payload["image_shape"] == [64, 64, 3] and payload["num_dims"] == 64 * 64 * 3
    for row in payload["per_image"]:
        assert len(row["real_bits"]) == 4 and np.all(np.diff(row["real_bits"]) >= 0)
        assert len(row["psnr_xstart"]) == 3 and len(row["psnr_ddim"]) == 3
        # the bound covers all four tiles: the pixel stage alone costs bits on each of them
        assert row["bound_bits"][-1] > 4 * 32 * 32 * 3 * 0.5
        assert len(row["sample_bits"]) == 3  # log2 q/p of each RCC stage's sent latent
    summary = payload["summary"]
    ratio = summary["full_rate"]["rcc_sample_over_kl"]
    assert 0.0 < ratio < 1.5 and summary["stages"][1]["sample_over_kl"] is not None
    assert "deliver" in (reports / "progressive_kodak.md").read_text()
    assert payload["lossy_baselines"]["JPEG (Pillow, 4:2:0)"]
    assert bench_plot.main(["--reports", str(reports)]) == 0
    assert (reports / "rate_distortion_kodak.png").stat().st_size > 10_000
    readme = (reports / "README.md").read_text()
    assert "Rate–distortion on Kodak (2 Kodak images, central 64x64 crops)" in readme


def test_progressive_bench_refuses_a_crop_that_is_not_a_tile_multiple(tmp_path, tiny_checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "a.png")
    with pytest.raises(DiffcodecError, match="multiple of 32"):
        bench_progressive.main([str(folder), "-c", str(tiny_checkpoint), "--crop", "48", "--out",
                                str(tmp_path / "p.json")])
