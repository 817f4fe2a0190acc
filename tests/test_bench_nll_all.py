"""bench.nll_all: the whole-test-set report by Monte Carlo over timesteps, run here or rebuilt
from an earlier `diffcodec nll --t-samples --save-terms --json` run (tiny random model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import nll_all  # noqa: E402
from diffcodec.cli import main as cli_main  # noqa: E402
from diffcodec.errors import DiffcodecError  # noqa: E402


def test_run_writes_an_estimate_whose_terms_add_up(tiny_checkpoint, images_npz, tmp_path):
    out = tmp_path / "all.json"
    assert nll_all.main([str(images_npz), "-c", str(tiny_checkpoint), "--t-samples", "3", "--batch-size", "4",
                         "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 5 and r["num_steps"] == 1000 and r["t_samples"] == 3
    assert r["estimator"] == "monte-carlo over timesteps" and r["provenance"]["command"].startswith("python -m bench")
    parts = sum(v["mean"] for v in r["terms_bpd"].values())
    assert parts == pytest.approx(r["bits_per_dim"], rel=1e-9)
    assert r["bits_per_dim_stderr"] > 0
    p = r["per_image_bpd_percentiles"]
    assert p["1"] <= p["50"] <= p["99"]


def test_report_of_a_saved_cli_run_matches_the_cli(tiny_checkpoint, images_npz, tmp_path, capsys):
    terms, cli_json = tmp_path / "t.npz", tmp_path / "r.json"
    assert cli_main(["nll", str(images_npz), "-c", str(tiny_checkpoint), "--t-samples", "2", "--json", "-q",
                     "--save-terms", str(terms)]) == 0
    cli_json.write_text(capsys.readouterr().out)
    out = tmp_path / "all.json"
    assert nll_all.main(["-c", str(tiny_checkpoint), "--terms", str(terms), "--cli-json", str(cli_json),
                         "--cli-command", "diffcodec nll ...", "--out", str(out)]) == 0
    r, cli = json.loads(out.read_text()), json.loads(cli_json.read_text())
    assert r["bits_per_dim"] == pytest.approx(cli["bits_per_dim"], rel=1e-12)
    assert r["terms_bpd"]["L_0"]["mean"] == pytest.approx(cli["terms_bpd"]["L_0"], rel=1e-12)
    assert r["t_samples"] == 2 and r["provenance"]["nll_command"] == "diffcodec nll ..."
    # another model's run is refused
    cli_json.write_text(json.dumps({**cli, "fingerprint": "0" * 16}))
    with pytest.raises(DiffcodecError, match="model 0000000000000000"):
        nll_all.main(["-c", str(tiny_checkpoint), "--terms", str(terms), "--cli-json", str(cli_json),
                      "--out", str(out)])
    with pytest.raises(DiffcodecError, match="--cli-json"):
        nll_all.main(["-c", str(tiny_checkpoint), "--terms", str(terms), "--out", str(out)])
