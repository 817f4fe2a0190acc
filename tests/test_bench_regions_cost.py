"""bench.regions_cost end to end on the tiny model: one image coded in one region and in
regions under two seeds, each file decoded back, the paired summary and the markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import regions_cost  # noqa: E402
from diffcodec.errors import DiffcodecError  # noqa: E402


def test_regions_cost_pairs_one_region_with_regions_per_seed(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "a.png")  # 2 x 2 tiles
    out = tmp_path / "rc.json"
    assert regions_cost.main([str(tmp_path / "a.png"), "--crop", "0", "--region-tiles", "1", "--seeds", "1,2",
                              "--steps", "3", "-c", str(tiny_checkpoint), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert (payload["tiles"], payload["regions"]) == (4, 4)
    assert [(r["seed"], r["region_tiles"]) for r in payload["rows"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    by = {(r["seed"], r["region_tiles"]): r for r in payload["rows"]}
    change = np.mean([by[s, 1]["file_bytes"] / by[s, 0]["file_bytes"] - 1 for s in (1, 2)])
    assert payload["summary"]["file_bytes_change"]["mean"] == pytest.approx(change)
    assert all(r["bound_bits"] > 0 and r["file_over_bound"] == pytest.approx(8 * r["file_bytes"] / r["bound_bits"])
               for r in payload["rows"])
    md = out.with_suffix(".md").read_text()
    assert "| 1 | 4 |" in md and "paired over seeds [1, 2]" in md


def test_regions_cost_refuses_an_image_of_one_region(tmp_path, tiny_checkpoint):
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DiffcodecError, match="one region"):
        regions_cost.main([str(tmp_path / "b.png"), "--crop", "0", "-c", str(tiny_checkpoint),
                           "--out", str(tmp_path / "x.json")])
