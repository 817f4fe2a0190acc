"""bench.plot and what it calls: every report JSON it knows becomes its figures and README
section (bench.figures, bench.readme_sections), missing ones a note; the shared labels and rows
(bench.report_data)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import plot  # noqa: E402
from bench.common import write_json  # noqa: E402
from bench.figures import loss_rows, psnr_of_rmse  # noqa: E402
from bench.report_data import DESIGN_LOSSY_BASELINES, lossy_baselines  # noqa: E402


def test_plot_draws_other_engineers_json_and_falls_back_to_documented_baselines(tmp_path):
    stages = [{"stage": k, "timestep": t, "real_bpd": r, "real_with_header_bpd": r + 0.3, "analytic_bpd": a,
               "psnr_xstart": p, "psnr_ddim": None, "chunks": 1.0}
              for k, (t, r, a, p) in enumerate([(999, 0.01, 0.0, 5.0), (500, 0.2, 0.15, 12.0), (0, 2.0, 1.8, 40.0),
                                                (-1, 5.0, 4.5, None)])]
    prog = {"kind": "progressive", "params": {"num_steps": 3, "spacing": "quadratic"},
            "provenance": {"command": "python -m bench.progressive", "device": "cpu: test",
                           "model": {"fingerprint": "feedfacefeedface"}},
            "summary": {"num_images": 2, "stages": stages,
                        "full_rate": {"real_bpd": 5.0, "real_with_header_bpd": 5.3, "analytic_bpd": 4.5,
                                      "overhead_vs_analytic": 0.11}}}
    write_json(tmp_path / "progressive.json", prog)
    write_json(tmp_path / "train_default.json",
               {"meta": {"preset": "tiny"}, "columns": ["step", "loss", "images_seen", "seconds"],
                "rows": [[1, 1.0, 64, 1.0], [2, 0.5, 128, 2.0], [3, 0.25, 192, 3.0]]})
    write_json(tmp_path / "lossless.json",
               {"provenance": {"command": "python -m bench.lossless", "device": "cpu: test"},
                "stream": {"num_images": 2, "num_steps": 10, "file_bpd": 4.5, "net_bpd": 4.3, "bound_bpd": 4.25},
                "kodak": {"image": "k1.png", "num_steps": 100, "file_bpd": 3.41,
                          "baselines_same_image": {"jpegxl_lossless": {"bits_per_dim": 3.13}}},
                "per_image": {"default": {"num_steps": 10, "num_images": 2, "file_bpd_mean": 5.6},
                              "no_bootstrap": {"num_steps": 10, "num_images": 2, "file_bpd_mean": 22.1}},
                "baselines_cifar": {"png": {"bits_per_dim": 5.87}, "webp_lossless": {"bits_per_dim": 4.7}}})
    write_json(tmp_path / "lossless_1000.json",
               {"provenance": {"command": "python -m bench.lossless -n 1000", "device": "cpu: test"},
                "stream": {"num_images": 1000, "num_steps": 100, "file_bpd": 3.64, "net_bpd": 3.595,
                           "bound_bpd": 3.578, "overhead_file_pct": 1.73, "overhead_net_pct": 0.48,
                           "header_bytes": 10191, "initial_bits": 55360, "exact": True,
                           "network_limit_seconds": 2400.0, "encode_wall_seconds": 3200.0,
                           "decode_wall_seconds": 3000.0, "encode_fraction_of_network_limit": 0.75,
                           "decode_fraction_of_network_limit": 0.8}})
    write_json(tmp_path / "nll_test_all.json",
               {"provenance": {"command": "python -m bench.nll_all --terms t.npz", "nll_command": "diffcodec nll x",
                               "device": "cpu: test", "model": {"fingerprint": "feedfacefeedface"}},
                "bits_per_dim": 3.61, "bits_per_dim_stderr": 0.006, "num_images": 10000, "num_steps": 1000,
                "t_samples": 8, "seconds": 3600.0,
                "terms_bpd": {"L_T": {"mean": 0.0, "stderr": 0.0}, "L_0": {"mean": 1.45, "stderr": 0.003}},
                "per_image_bpd_percentiles": {"1": 2.1, "10": 2.8, "50": 3.6, "90": 4.4, "99": 5.0}})
    write_json(tmp_path / "lossless_baselines.json",
               {"provenance": {"command": "python -m bench.lossless -n 10000 --baselines-only", "device": "cpu: test"},
                "counting_rule": "whole files",
                "baselines_cifar": {"num_images": 10000, "png": {"bits_per_dim": 5.9, "exact": True,
                                                                   "cpu_seconds": 12.0}}})
    write_json(tmp_path / "coder_overhead.json",
               {"provenance": {"command": "python -m bench.coder_overhead", "device": "cpu: test"},
                "num_images": 16, "num_steps": 100,
                "rows": [{"window_sigmas": 5, "net_bpd": 3.7, "ideal_bpd": 3.698, "coder_overhead_bpd": 0.002,
                          "coder_overhead_pct": 0.054}]})
    write_json(tmp_path / "lossless_kodak.json",
               {"provenance": {"command": "python -m bench.lossless --kodak-only", "device": "cpu: test"},
                "kodak": {"image": "k1.png", "num_tiles": 384, "num_steps": 100, "file_bpd": 3.408, "exact": True,
                          "encode_cpu_seconds": 1000.0, "decode_cpu_seconds": 900.0, "encode_peak_rss_mib": 1400.0,
                          "decode_peak_rss_mib": 1100.0,
                          "baselines_same_image": {"png": {"bits_per_dim": 5.28, "cpu_seconds": 0.5}}}})
    assert plot.main(["--reports", str(tmp_path)]) == 0
    made = {p.name for p in tmp_path.iterdir()}
    assert {"progressive_rate.png", "rate_distortion.png", "loss_curve.png", "lossless.png", "README.md"} <= made
    assert "figure5.png" not in made  # no nll.json: skipped, with a note
    readme = (tmp_path / "README.md").read_text()
    assert "one file per image, progressive bootstrap (K=10, 2 images) | 5.600" in readme
    assert "analytic 4.5000 (+11.0%) (this file predates the bound column)" in readme
    assert "one file per image, --no-bootstrap: seeded start (K=10, 2 images) | 22.100" in readme
    assert "| bits-back, k1.png (K=100, one file) | 3.410 |" in readme
    assert "| JPEG-XL lossless (effort 9), k1.png | 3.130 |" in readme
    assert "## Lossless: one Kodak image at K = 100 (lossless_kodak.json)" in readme
    assert "| bits-back, k1.png (384 tiles, exact: True) | 3.408 | 1000 CPU-s, peak 1400 MiB | 900 CPU-s" in readme
    assert "| PNG (Pillow, optimize), same image | 5.280 |" in readme
    assert "## Lossless: classical codecs on 10,000 CIFAR-10 test images (lossless_baselines.json)" in readme
    assert "| PNG (Pillow, optimize) | 5.900 | True | 12 |" in readme
    assert "| 5 sigmas | 3.7000 | 3.6980 | +0.0020 (+0.05%) |" in readme
    assert "## Bits/dim on all 10,000 CIFAR-10 test images (Monte Carlo over timesteps)" in readme
    assert "| **3.6100 ± 0.0060** | 0.00000 ± 0.00000 | 1.45000 ± 0.00300 |" in readme
    assert "`diffcodec nll x`, reported by `python -m bench.nll_all --terms t.npz`" in readme and "60 minutes" in readme
    assert "## Lossless: 1000 CIFAR-10 test images in one stream (lossless_1000.json)" in readme
    assert "| whole file (header included) | 3.6400 | +1.73% |" in readme and "started on seeded words" in readme
    assert (readme.count("of the limit's speed") == 1  # only lossless_1000.json's stream was timed
            and "2400 s each way; the codec took 3200 s to encode (75% of the limit's speed) and 3000 s to decode "
                "(80%)." in readme)
    assert "nll.json absent" in readme and "feedfacefeedface" in readme and "DESIGN.md" in readme
    assert "| PNG (Pillow, optimize) | 5.870 |" in readme and "| bound on the same images (K=10) | 4.250 |" in readme


def test_lossy_baselines_prefer_measured_ones_and_fall_back_to_design_md():
    base, where = lossy_baselines(None, {"kind": "lossless", "lossy_baselines": {"JPEG": [[1.0, 20.0]]}})
    assert base == {"JPEG": [(1.0, 20.0)]} and "measured" in where and "lossless" in where
    base, where = lossy_baselines({"kind": "progressive"}, None)
    assert base is DESIGN_LOSSY_BASELINES and "DESIGN.md" in where


def test_psnr_of_rmse_and_loss_rows_of_both_training_layouts():
    assert psnr_of_rmse(np.array([255.0, 25.5])).tolist() == pytest.approx([0.0, 20.0])
    columns = {"columns": ["step", "loss", "images_seen", "seconds"],
               "rows": [[1, 1.0, 64, 1.0], [2, 0.5, 128, 2.0], [3, 0.25, 192, 3.0]]}
    history = {"history": [{"step": s, "loss": v, "images_seen": n} for s, v, n, _ in columns["rows"]]}
    for train in (columns, history):
        step, loss, seen = loss_rows(train)
        assert step.tolist() == [1, 2, 3] and loss.tolist() == [1.0, 0.5, 0.25] and seen.tolist() == [64, 128, 192]


def test_readme_progressive_quotes_the_bound_and_the_sample_share_when_the_file_has_them():
    from bench.readme_sections import readme_progressive
    full = {"real_bpd": 4.7, "real_with_header_bpd": 4.8, "analytic_bpd": 4.6, "overhead_vs_analytic": 0.028,
            "bound_bpd": 3.8, "overhead_vs_bound": 0.25, "rcc_sample_over_kl": 0.729}
    prog = {"provenance": {"command": "python -m bench.progressive", "device": "cpu: test",
                           "model": {"fingerprint": "feedfacefeedface"}},
            "summary": {"full_rate": full}}
    text = "\n".join(readme_progressive(prog))
    assert "the bound of the same chain 3.8000 (+25.0%)" in text
    assert "deliver 0.729 of their stages' KL" in text
