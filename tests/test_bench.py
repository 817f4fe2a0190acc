"""The bench scripts' pure parts: cumulative rate, Table 4 rows, term groups, the CI comparison,
provenance, and small end-to-end runs of nll / speed / plot with the tiny random model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench.common import provenance, resolve_data, write_json  # noqa: E402
from bench.nll import (  # noqa: E402
    PAPER_TABLE4,
    compare_to_reference,
    grouped_terms,
    markdown_tables,
    rate_distortion,
    table4_rows,
)
from diffcodec.errors import DiffcodecError  # noqa: E402
from diffcodec.likelihood import BoundResult  # noqa: E402


def synthetic_result(num_images: int = 3, timesteps: np.ndarray | None = None, seed: int = 0) -> BoundResult:
    timesteps = np.arange(1000) if timesteps is None else np.asarray(timesteps)
    rng = np.random.default_rng(seed)
    k = len(timesteps)
    return BoundResult(
        prior_bits=rng.uniform(0, 1, num_images),
        terms_bits=rng.uniform(0, 100, (num_images, k)),
        xstart_mse=rng.uniform(0, 1000, (num_images, k)),
        timesteps=timesteps.astype(np.int64),
        num_dims=np.full(num_images, 3072, dtype=np.int64),
    )


def test_cumulative_rate_is_prior_plus_the_terms_of_steps_already_sent():
    r = synthetic_result()
    rd = rate_distortion(r, 1000)
    d = 3072
    assert np.array_equal(rd.reverse_time, np.arange(1, 1001))
    # reverse time 1 (x_T known): only L_T has been paid
    assert rd.rate_bpd[0] == pytest.approx((r.prior_bits / d).mean())
    # reverse time T (x_1 known): L_T + L_1 + ... + L_{T-1}, not L_0
    assert rd.rate_bpd[-1] == pytest.approx(((r.prior_bits + r.terms_bits[:, 1:].sum(1)) / d).mean())
    # reverse time r = T - t + 1 <-> code column t - 1; rate = L_T + sum of columns >= t
    t = 400
    i = int(np.flatnonzero(rd.reverse_time == 1000 - t + 1)[0])
    assert rd.rate_bpd[i] == pytest.approx(((r.prior_bits + r.terms_bits[:, t:].sum(1)) / d).mean())
    assert rd.rmse_255[i] == pytest.approx(math.sqrt(r.xstart_mse[:, t - 1].mean()))
    assert np.all(np.diff(rd.rate_bpd) >= 0)
    assert rd.lossless_bpd == pytest.approx(r.total_bpd.mean())
    per_image = (r.prior_bits + r.terms_bits[:, t:].sum(1)) / d
    assert rd.rate_bpd_stderr[i] == pytest.approx(per_image.std(ddof=1) / math.sqrt(3))


def test_respaced_chain_reverse_times_follow_the_original_timesteps():
    r = synthetic_result(timesteps=np.array([0, 333, 666, 999]))
    rd = rate_distortion(r, 1000)
    assert rd.reverse_time.tolist() == [1, 334, 667, 1000]
    rows = table4_rows(rd, 1000)
    assert [row["reverse_time"] for row in rows] == sorted(PAPER_TABLE4, reverse=True)
    used = {row["reverse_time"]: row["reverse_time_used"] for row in rows}
    assert used[1000] == 1000 and used[300] == 334 and used[700] == 667 and used[100] == 1


def test_table4_rows_at_full_T_read_the_exact_reverse_times():
    r = synthetic_result()
    rd = rate_distortion(r, 1000)
    rows = table4_rows(rd, 1000)
    assert len(rows) == 10
    for row in rows:
        assert row["reverse_time_used"] == row["reverse_time"]
        i = row["reverse_time"] - 1
        assert row["rate_bpd"] == rd.rate_bpd[i] and row["rmse_255"] == rd.rmse_255[i]
        assert (row["paper_rate_bpd"], row["paper_rmse_255"]) == PAPER_TABLE4[row["reverse_time"]]


def test_grouped_terms_partition_the_bound():
    r = synthetic_result()
    g = grouped_terms(r)
    assert list(g) == ["L_T", "L_0", "L_1..L_9", "L_10..L_99", "L_100..L_T-1"]
    assert sum(v["mean"] for v in g.values()) == pytest.approx(r.total_bpd.mean())
    assert [g[k]["steps"] for k in list(g)[1:]] == [1, 9, 90, 900]
    assert g["L_1..L_9"]["mean"] == pytest.approx((r.terms_bits[:, 1:10].sum(1) / 3072).mean())
    # a respaced chain without steps in 1..9 has no such group, and still sums to the total
    rs = synthetic_result(timesteps=np.array([0, 50, 500, 999]))
    gs = grouped_terms(rs)
    assert "L_1..L_9" not in gs
    assert sum(v["mean"] for v in gs.values()) == pytest.approx(rs.total_bpd.mean())


def test_markdown_tables_hold_both_sides_of_table4():
    from bench.nll import summarize_run
    from diffcodec.evaluate import NllRun
    from diffcodec.schedule import make_schedule

    run = NllRun(synthetic_result(), make_schedule("linear", 1000), 3, 10.0, "cpu", "cpu: test")
    payload = {"provenance": {"model": {"path": "x.pt", "fingerprint": "abc"}, "seed": 0, "device": "cpu",
                              "command": "python -m bench.nll"},
               "num_images": 3, "num_timesteps": 1000, "runs": [summarize_run(run, 1000)]}
    md = markdown_tables(payload)
    bpd_part, table4_part = md.split("Table 4")
    ours = {row["reverse_time"]: row for row in payload["runs"][0]["table4"]}
    for r, (rate, rmse) in PAPER_TABLE4.items():
        line = next(ln for ln in table4_part.splitlines() if ln.startswith(f"| {r} |"))
        assert f"{rate:.5f}" in line and f"{rmse:.3f}" in line
        assert f"{ours[r]['rate_bpd']:.5f}" in line and f"{ours[r]['rmse_255']:.3f}" in line
    assert f"| 1000 | {payload['runs'][0]['bits_per_dim']:.4f} ± " in bpd_part and "abc" in md


def test_ci_comparison_accepts_a_rerun_and_noise_redraws_and_rejects_a_shift():
    rng = np.random.default_rng(1)
    ref_values = 4.0 + 0.2 * rng.standard_normal(16)
    reference = {"per_image_bpd": ref_values.tolist()}
    assert compare_to_reference(ref_values + 1e-6, reference).ok  # float noise across machines
    redraw = ref_values + 0.01 * rng.standard_normal(16)  # another noise draw: scatter around zero
    assert compare_to_reference(redraw, reference).ok
    worse = compare_to_reference(ref_values + 0.01, reference)  # every image 0.01 bits/dim worse
    assert not worse.ok and worse.diff_bpd == pytest.approx(0.01)
    assert not compare_to_reference(ref_values - 0.01, reference).ok  # a dropped term also fails
    assert compare_to_reference(ref_values[:4], reference).ok  # a prefix of the images
    with pytest.raises(ValueError):
        compare_to_reference(np.zeros(17), reference)


def test_provenance_records_code_device_command_and_model(tiny_checkpoint):
    from diffcodec.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    p = provenance(None, loaded, 7, command="python -m bench.nll -n 2")
    assert set(p) >= {"git", "versions", "device", "seed", "command", "model"}
    assert p["seed"] == 7 and p["command"] == "python -m bench.nll -n 2"
    assert set(p["versions"]) >= {"torch", "numpy", "constriction", "diffcodec"}
    assert p["device"].startswith("cpu: ") and "cores" in p["device"]
    assert p["model"]["fingerprint"] == loaded.fingerprint and p["model"]["meta"] == {"weights": "random"}
    assert p["git"]["commit"] is None or len(p["git"]["commit"]) == 40


def test_write_json_is_strict_and_replaces_atomically(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": float("nan"), "y": np.arange(3), "z": np.float64(1.5)})
    assert json.loads(path.read_text()) == {"x": None, "y": [0, 1, 2], "z": 1.5}
    write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_resolve_data_names_the_missing_path(tmp_path):
    with pytest.raises(DiffcodecError, match="nowhere"):
        resolve_data(tmp_path / "nowhere")


@pytest.fixture
def tiny_shard(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "shard.npz"
    np.savez(path, x=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), y=np.zeros(3, dtype=np.int64))
    return path


def test_nll_speed_and_plot_end_to_end(tmp_path, tiny_checkpoint, tiny_shard):
    from bench import nll, plot, speed

    out = tmp_path / "reports" / "nll.json"
    assert nll.main([str(tiny_shard), "-c", str(tiny_checkpoint), "-n", "3", "--steps", "8,4", "-b", "2",
                     "--out", str(out), "-q"]) == 0
    payload = json.loads(out.read_text())
    assert [r["steps"] for r in payload["runs"]] == [8, 4]
    run = payload["runs"][0]
    assert run["bits_per_dim"] == pytest.approx(np.mean(run["per_image_bpd"]))
    assert run["figure5"]["lossless_bpd"] == pytest.approx(run["bits_per_dim"])
    assert payload["provenance"]["command"].startswith("python -m bench.nll ")
    assert (out.with_suffix(".md")).read_text() == markdown_tables(payload)

    assert speed.main([str(tiny_shard), "-c", str(tiny_checkpoint), "-n", "2", "-k", "2", "--batch-sizes", "2",
                       "--repeats", "1", "--out", str(tmp_path / "reports" / "speed.json")]) == 0

    assert plot.main(["--reports", str(tmp_path / "reports")]) == 0
    made = {p.name for p in (tmp_path / "reports").iterdir()}
    assert {"figure5.png", "rmse_vs_t.png", "terms_vs_t.png", "bpd_by_steps.png", "README.md"} <= made
    readme = (tmp_path / "reports" / "README.md").read_text()
    assert "train_default.json absent" in readme and payload["provenance"]["command"] in readme


def test_nll_refuses_missing_data_with_a_clear_error(tmp_path, tiny_checkpoint):
    from bench import nll

    with pytest.raises(DiffcodecError, match="no such data"):
        nll.main([str(tmp_path / "absent"), "-c", str(tiny_checkpoint), "--out", str(tmp_path / "n.json")])


def test_a_reference_for_other_weights_asks_to_be_regenerated(tiny_checkpoint):
    from bench.nll import reference_mismatch
    from diffcodec.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    assert reference_mismatch({"fingerprint": loaded.fingerprint}, loaded) is None
    why = reference_mismatch({"fingerprint": "0123456789abcdef"}, loaded)
    assert why is not None and "regenerate" in why and "--ci-reference" in why and loaded.fingerprint in why


def test_lossless_baselines_only_codes_every_image_exactly(tiny_checkpoint, images_npz, tmp_path):
    from bench import lossless

    out = tmp_path / "baselines.json"
    assert lossless.main([str(images_npz), "-c", str(tiny_checkpoint), "-n", "3", "--baselines-only",
                          "--kodak", "none", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    base = r["baselines_cifar"]
    assert base["num_images"] == 3 and "stream" not in r
    assert base["png"]["exact"] and 0 < base["png"]["bits_per_dim"] and base["png"]["bytes"] > 3 * 3072 / 2


def test_lossless_stream_records_its_network_limit(tiny_checkpoint, images_npz, tmp_path):
    from bench import lossless
    from diffcodec.codec.bitsback.file import BOOTSTRAP_PARAMS
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.data import read_images
    from diffcodec.errors import DiffcodecError

    loaded = load_checkpoint(tiny_checkpoint)
    images = read_images(images_npz, limit=4).images
    rec = lossless.code_stream(loaded, images, 3, bound=False, batch=2, bootstrap=False)
    rec.update(lossless.network_limit(loaded, rec))
    assert rec["exact"] and sum(rec["chunks"]) == 4
    per_call = rec["network_seconds_per_call"]
    assert set(per_call) == {str(b) for b in rec["chunks"]} and all(t > 0 for t in per_call.values())
    limit = sum(3 * per_call[str(b)] for b in rec["chunks"])
    assert rec["network_limit_seconds"] == pytest.approx(limit)
    assert rec["encode_fraction_of_network_limit"] == pytest.approx(limit / rec["encode_wall_seconds"])
    assert rec["decode_fraction_of_network_limit"] == pytest.approx(limit / rec["decode_wall_seconds"])
    # an earlier report: its streams are timed (the bootstrap's calls counted), the command recorded
    old = {"provenance": {"model": {"fingerprint": loaded.fingerprint}},
           "stream": {"chunks": [1, 2], "num_steps": 4, "bootstrap_tiles": 1, "encode_wall_seconds": 10.0,
                      "decode_wall_seconds": 8.0}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert lossless.main(["-c", str(tiny_checkpoint), "--add-network-limit", str(path)]) == 0
    r = json.loads(path.read_text())
    t = r["stream"]["network_seconds_per_call"]
    assert set(t) == {"1", "2"}
    assert r["stream"]["network_limit_seconds"] == pytest.approx(
        4 * (t["1"] + t["2"]) + BOOTSTRAP_PARAMS.num_steps * t["1"])
    assert r["stream"]["decode_fraction_of_network_limit"] == pytest.approx(r["stream"]["network_limit_seconds"] / 8)
    assert "--add-network-limit" in r["provenance"]["network_limit"]["command"]
    path.write_text(json.dumps({**old, "provenance": {"model": {"fingerprint": "0" * 16}}}))
    with pytest.raises(DiffcodecError, match="model 0000000000000000"):
        lossless.main(["-c", str(tiny_checkpoint), "--add-network-limit", str(path)])
    with pytest.raises(DiffcodecError, match="no such file"):
        lossless.main(["-c", str(tiny_checkpoint), "--add-network-limit", str(tmp_path / "missing.json")])


def test_coder_overhead_books_every_operation(tiny_checkpoint, images_npz, tmp_path):
    from scipy.stats import norm

    from bench import coder_overhead

    x, m, s = np.array([0.0, 3.0, -7.0]), np.array([0.2, 0.0, 1.0]), np.array([1.0, 2.0, 0.5])
    expected = -np.log2(norm.cdf((x - m + 0.5) / s) - norm.cdf((x - m - 0.5) / s)).sum()
    assert coder_overhead.bin_bits(x, m, s) == pytest.approx(expected, rel=1e-9)
    out = tmp_path / "overhead.json"
    assert coder_overhead.main([str(images_npz), "-c", str(tiny_checkpoint), "-n", "2", "--steps", "3",
                                "--windows", "5,8", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["window_sigmas"] for row in r["rows"]] == [5, 8]
    for row in r["rows"]:
        kinds = row["by_kind_bpd"]
        assert sum(v["actual"] for v in kinds.values()) == pytest.approx(row["net_bpd"], rel=1e-9)
        assert row["coder_overhead_bpd"] == pytest.approx(row["net_bpd"] - row["ideal_bpd"])
        assert row["net_bpd"] > 0 and math.isfinite(row["coder_overhead_pct"])  # a random model: any size


def test_exact_sizes_repeats_the_arithmetics_in_turn_and_reports_medians(tiny_checkpoint, images_npz, tmp_path):
    """`bench.exact_sizes --repeats`: every arithmetic codes the same bytes each repeat, each
    time is the median of its repeats, the ratios come from the medians; unknown names refused."""
    import json

    from bench import exact_sizes

    out = tmp_path / "sizes.json"
    assert exact_sizes.main([str(images_npz), "-c", str(tiny_checkpoint), "--lossless-images", "1",
                             "--progressive-images", "0", "--repeats", "2", "--arithmetics", "float32,exact2",
                             "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["repeats"] == 2 and set(payload["runs"]) == {"lossless-float32", "lossless-exact2"}
    for rec in payload["runs"].values():
        assert rec["exact_round_trip"]
        for t in ("encode_s", "decode_s", "encode_cpu_s", "decode_cpu_s"):
            assert len(rec["repeats"][t]) == 2 and rec[t] == pytest.approx(sum(rec["repeats"][t]) / 2)
    runs, ratio = payload["runs"], payload["contract2_vs_float32"]["lossless"]
    assert ratio["decode_cpu"] == runs["lossless-exact2"]["decode_cpu_s"] / runs["lossless-float32"]["decode_cpu_s"]
    per = [a / b for a, b in zip(runs["lossless-exact2"]["repeats"]["encode_cpu_s"],
                                 runs["lossless-float32"]["repeats"]["encode_cpu_s"])]
    assert ratio["paired"]["encode_cpu"] == {"per_repeat": per, "median": pytest.approx(sum(per) / 2)}
    with pytest.raises(DiffcodecError, match="--arithmetics"):
        exact_sizes.main([str(images_npz), "-c", str(tiny_checkpoint), "--arithmetics", "float16",
                          "--out", str(out)])
