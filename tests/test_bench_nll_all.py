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
    # the report names the machine that ran the nll command
    assert r["provenance"]["device"] == cli["device_name"] and cli["device_name"].startswith("cpu: ")


def test_bad_saved_runs_are_one_line_errors(tiny_checkpoint, images_npz, tmp_path, capsys):
    terms, cli_json = tmp_path / "t.npz", tmp_path / "r.json"
    assert cli_main(["nll", str(images_npz), "-c", str(tiny_checkpoint), "--t-samples", "2", "--json", "-q",
                     "-n", "3", "--save-terms", str(terms)]) == 0
    cli = json.loads(capsys.readouterr().out)
    cli_json.write_text(json.dumps(cli))
    base = ["-c", str(tiny_checkpoint), "--out", str(tmp_path / "all.json")]
    with pytest.raises(DiffcodecError, match="no such file"):
        nll_all.main([*base, "--terms", str(tmp_path / "missing.npz"), "--cli-json", str(cli_json)])
    with pytest.raises(DiffcodecError, match="no such file"):
        nll_all.main([*base, "--terms", str(terms), "--cli-json", str(tmp_path / "missing.json")])
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(DiffcodecError, match="not a `diffcodec nll --save-terms` file"):
        nll_all.main([*base, "--terms", str(tmp_path / "junk.npz"), "--cli-json", str(cli_json)])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DiffcodecError, match="not a `diffcodec nll --save-terms` file"):
        nll_all.main([*base, "--terms", str(tmp_path / "other.npz"), "--cli-json", str(cli_json)])
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(DiffcodecError, match="not the JSON output"):
        nll_all.main([*base, "--terms", str(terms), "--cli-json", str(tmp_path / "junk.json")])
    cli_json.write_text(json.dumps({**cli, "num_images": 4}))
    with pytest.raises(DiffcodecError, match="3 images"):
        nll_all.main([*base, "--terms", str(terms), "--cli-json", str(cli_json)])
    # an older run's JSON without device_name: the report says what it does not know
    cli_json.write_text(json.dumps({k: v for k, v in cli.items() if k != "device_name"}))
    assert nll_all.main([*base, "--terms", str(terms), "--cli-json", str(cli_json)]) == 0
    r = json.loads((tmp_path / "all.json").read_text())
    assert r["provenance"]["device"] == "cpu (kind only: not recorded by the run)"
    # from the shell: one line on stderr, exit status 2
    capsys.readouterr()
    assert nll_all.run_main(nll_all.main, [*base, "--terms", str(tmp_path / "missing.npz"),
                                           "--cli-json", str(cli_json)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.npz: no such file" in err and "\n" not in err
