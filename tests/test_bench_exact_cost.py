"""bench.exact_cost: the bound under the float32, float64 and exact networks on the same noise and
timesteps, and the paired differences (tiny seeded model, two synthetic images)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from conftest import as_loaded, seeded_model, synthetic_images

from bench import exact_cost
from diffcodec.checkpoint import save_checkpoint
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.evaluate import run_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def setup(tmp_path):
    """A learned-variance seeded model saved as a float32 checkpoint, and two 32x32 images."""
    model, mc, dc = seeded_model(3, learn_sigma=True)
    ckpt = tmp_path / "seeded.pt"
    save_checkpoint(ckpt, model, mc, dc, meta={"weights": "seeded"}, dtype=torch.float32)
    data = tmp_path / "two.npz"
    np.savez_compressed(data, x=np.stack(synthetic_images([(32, 32), (32, 32)])), y=np.zeros(2, dtype=np.uint8))
    return ckpt, data, as_loaded(model, mc, dc)


def test_paired_bound_under_three_arithmetics(setup, tmp_path):
    ckpt, data, loaded = setup
    out = tmp_path / "cost.json"
    assert exact_cost.main(["--data", str(data), "-c", str(ckpt), "-n", "2", "-b", "2", "--t-samples", "2",
                            "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "exact_cost" and r["num_images"] == 2 and r["num_timesteps"] == 1000
    assert r["provenance"]["command"].startswith("python -m bench.exact_cost") and out.with_suffix(".md").is_file()
    est = r["estimator"]
    assert est["t_samples"] == 2 and est["calls_per_tile"] == 3 and est["steps"] == 1000
    assert list(r["arithmetics"]) == ["float32", "float64", "exact"]
    bpd = {k: np.array(v["per_image_bpd"]) for k, v in r["arithmetics"].items()}
    for v in r["arithmetics"].values():
        assert len(v["per_image_bpd"]) == 2 and v["bits_per_dim"] > 0 and v["seconds_per_tile_call"] > 0
        assert sum(v["terms_bpd"].values()) == pytest.approx(v["bits_per_dim"], rel=1e-9)
    assert set(r["differences"]) == {"exact-float32", "exact-float64"}
    for key, d in r["differences"].items():
        a, b = key.split("-")
        assert d["per_image_bpd"] == pytest.approx((bpd[a] - bpd[b]).tolist(), abs=1e-12)
        assert d["mean_bpd"] == pytest.approx(float((bpd[a] - bpd[b]).mean()), abs=1e-12)
        # paired: same noise and timesteps, so the arithmetics differ by rounding only
        assert abs(d["relative_percent"]) < 1.0 and d["within_target"]
        assert d["max_abs_per_image_bpd"] < 0.01 * bpd[b].min()
    # the float32 column is the `nll` job's own number (same pilot, proposal, seeds and batches)
    nll = run_nll(loaded, read_images(data), batch_size=2, seed=0, device=torch.device("cpu"), progress=False,
                  t_samples=2)
    np.testing.assert_array_equal(bpd["float32"], nll.result.total_bpd)


def test_summed_respaced_chain_and_errors(setup, tmp_path, capsys):
    ckpt, data, _ = setup
    out = tmp_path / "chain.json"
    assert exact_cost.main(["--data", str(data), "-c", str(ckpt), "-n", "2", "--t-samples", "0", "--steps", "3",
                            "--arithmetics", "exact,float32", "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["estimator"]["steps"] == 3 and r["estimator"]["t_samples"] is None and r["estimator"]["pilot"] is None
    assert list(r["arithmetics"]) == ["float32", "exact"] and list(r["differences"]) == ["exact-float32"]
    assert "| exact |" in capsys.readouterr().out
    with pytest.raises(DiffcodecError, match="--steps"):
        exact_cost.main(["--data", str(data), "-c", str(ckpt), "-n", "2", "--steps", "5000", "--out", str(out)])
    with pytest.raises(DiffcodecError, match="fewer than"):
        exact_cost.main(["--data", str(data), "-c", str(ckpt), "-n", "3", "--out", str(out)])
