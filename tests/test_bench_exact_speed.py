"""bench.exact_speed: the four networks side by side, the ratios with their targets, the profile."""

from __future__ import annotations

import json

import pytest

from bench import exact_speed
from diffcodec.errors import DiffcodecError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_four_networks_side_by_side_with_ratios_profile_and_markdown(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert exact_speed.main(["--checkpoint", str(tiny_checkpoint), "--batch-sizes", "1,2", "--threads", "1",
                             "--repeats", "1", "--profile", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [(r["threads"], r["batch_size"]) for r in payload["rows"]] == [(1, 1), (1, 2)]
    for row in payload["rows"]:
        assert set(row["networks"]) == set(exact_speed.NETWORKS)
        speed = {n: rec["image_forwards_per_second"] for n, rec in row["networks"].items()}
        assert row["contract2_speed_vs_float32"] == pytest.approx(speed["exact2"] / speed["float32"])
        assert row["contract2_speed_vs_contract1"] == pytest.approx(speed["exact2"] / speed["exact1"])
    assert payload["rows"][0]["target_vs_float32"] == 0.8
    prof = payload["profile"]
    assert set(prof) == {"float32", "exact1", "exact2"}
    assert "convolution" in prof["exact1"]["parts"] and "products" in prof["exact2"]["parts"]
    for rec in prof.values():  # the parts add up to the measured total (the rest is "other")
        assert sum(rec["parts"].values()) == pytest.approx(rec["seconds_per_call"], rel=1e-6)
    md = out.with_suffix(".md").read_text()
    assert "exact, contract 2 (fwd/s)" in md and "(>= 0.8: " in md
    assert "c2/float32" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(tiny_checkpoint):
    with pytest.raises(DiffcodecError, match="must be positive"):
        exact_speed.main(["--checkpoint", str(tiny_checkpoint), "--threads", "0", "--out", "/dev/null"])
