"""bench.photo end to end on the tiny model: each command in its own process, the OS's
figures and the timed network calls recorded, every round trip checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import photo  # noqa: E402
from diffcodec.errors import DiffcodecError  # noqa: E402


def test_photo_bench_runs_the_cli_and_checks_each_round_trip(tmp_path, tiny_checkpoint):
    image = tmp_path / "a.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "photo.json"
    common = [str(image), "--crop", "40", "-c", str(tiny_checkpoint), "--threads", "1", "--out", str(out)]
    assert photo.main([*common, "--modes", "lossless"]) == 0
    first = json.loads(out.read_text())["rows"]
    assert photo.main([*common, "--modes", "default", "--update"]) == 0  # keeps the lossless row
    r = json.loads(out.read_text())
    assert r["rows"][1] == first[0] and r["rows"][0]["commit"]["commit"] == first[0]["commit"]["commit"]
    assert (r["width"], r["height"], r["tiles"]) == (40, 40, 4)
    assert [row["mode"] for row in r["rows"]] == ["default", "lossless"]  # in MODES order
    for row in r["rows"]:
        assert row["round_trip"] and row["file_bytes"] > 0
        assert row["bits_per_pixel"] == pytest.approx(8 * row["file_bytes"] / 1600)
        for side in ("encode", "decode"):
            c = row[side]
            assert c["wall_seconds"] > c["network_seconds"] > 0 and c["peak_rss_mib"] > 50 and c["cpu_seconds"] > 0
            assert 0 < c["network_share"] < 1 and c["network_max_batch"] >= 1
            assert c["network_seconds_by_arithmetic"].keys() == {"exact"}  # the default arithmetic only
            assert c["command"].startswith("diffcodec ") and "WORK/" in c["command"]  # not the temporary folder
    lossless = r["rows"][1]
    assert lossless["lossless"] and "--lossless" in lossless["encode"]["command"]
    # the decoder made the same network calls as the encoder's chain (K steps over the tiles)
    assert lossless["decode"]["network_image_forwards"] == lossless["encode"]["network_image_forwards"]
    assert "| lossless encode |" in out.with_suffix(".md").read_text()


def test_photo_bench_refuses_bad_requests(tmp_path):
    with pytest.raises(DiffcodecError, match="no such image"):
        photo.main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "p.json")])
    with pytest.raises(DiffcodecError, match="unknown mode"):  # before anything runs
        photo.main([str(tmp_path / "missing.png"), "--modes", "lossy", "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
