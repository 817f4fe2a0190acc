"""bench.rcc_methods and bench.rcc_chain: the selection rules choose as defined, the metrics
score an exact sample as exact, the greedy rule delivers more per index bit than PFR at equal
candidates, and the chain bench writes ordinary progressive streams with its chunk account."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import rcc_chain, rcc_methods  # noqa: E402
from diffcodec.codec import rcc  # noqa: E402
from diffcodec.errors import DiffcodecError  # noqa: E402
from diffcodec.likelihood import BoundResult  # noqa: E402

LN2 = math.log(2.0)


def test_one_dimensional_rules_choose_as_defined():
    rng = np.random.default_rng(0)
    v, log_t = rng.standard_normal((50, 300)), np.log(np.cumsum(rng.standard_exponential((50, 300)), axis=1))
    gumbel = -np.log(rng.standard_exponential((50, 300)))
    mu = 2.0
    assert np.array_equal(rcc_methods.select_1d("greedy", mu, v, log_t, gumbel), v.argmax(1))
    assert np.array_equal(rcc_methods.select_1d("pfr", mu, v, log_t, gumbel), (log_t - mu * v).argmin(1))
    assert np.array_equal(rcc_methods.select_1d("tempered", mu, v, log_t, gumbel),
                          (log_t - rcc_methods.TEMPER * mu * v).argmin(1))
    # minimal random coding draws n with probability w_n / sum w (Gumbel-max)
    w = np.array([0.0, 1.0, 2.0])
    g = -np.log(rng.standard_exponential((40_000, 3)))
    picks = rcc_methods.select_1d("mrc", 1.0, np.broadcast_to(w, (40_000, 3)), np.zeros((40_000, 3)), g)
    freq = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(freq, np.exp(w) / np.exp(w).sum(), atol=0.01)
    with pytest.raises(ValueError):
        rcc_methods.select_1d("best", mu, v, log_t, gumbel)


def test_an_exact_sample_scores_as_exact():
    rng = np.random.default_rng(1)
    kl = 10.0
    mu = math.sqrt(2 * kl * LN2)
    row = rcc_methods.score_cell(kl, 16.0, "greedy", np.zeros(20_000, np.int64), rng.normal(mu, 1.0, 20_000))
    assert abs(row["delivery"] - 1.0) < 0.03 and abs(row["shift_share"] - 1.0) < 0.01
    assert abs(row["sample_std"] - 1.0) < 0.02 and row["law_kl_bits"] < 0.01
    assert row["index_bits"] == 16.0 and row["index_per_delivered"] == pytest.approx(16.0 / row["delivered_bits"])


def test_greedy_delivers_more_per_index_bit_than_pfr_at_equal_candidates():
    rows = rcc_methods.part_a([14.0], [16], 200, np.random.default_rng(2), lambda msg: None)
    by_rule = {r["rule"]: r for r in rows}
    assert set(by_rule) == set(rcc_methods.RULES_1D)
    greedy, pfr, mrc = by_rule["greedy"], by_rule["pfr"], by_rule["mrc"]
    assert greedy["index_per_delivered"] < pfr["index_per_delivered"] - 0.05
    assert greedy["delivery"] > 0.9 and pfr["delivery"] < 0.8
    assert mrc["index_per_delivered"] > pfr["index_per_delivered"]  # MRC pays log2 N and delivers less
    assert greedy["sample_std"] < 0.5 < pfr["sample_std"]  # not a sample of q: its spread is squeezed


def test_chunk_kl_matches_the_codec_kl_and_the_index_costs_add_up():
    rng = np.random.default_rng(3)
    d = 9
    qm, qv, pv = rng.normal(size=d), rng.normal(size=d) * 0.3, rng.normal(size=d) * 0.3
    lw = rcc.LogWeight.of_gaussians(qm, qv, np.zeros(d), pv)
    assert rcc_methods.chunk_kl_bits(lw.a, lw.b) == pytest.approx(rcc.gaussian_kl_bits(qm, qv, 0, pv).sum())
    # indices 8..15 of chunks of KL 4: relative exponent 0 always (0 bits) + 3 mantissa bits
    assert rcc_methods.relative_index_bits(np.arange(8, 16), np.full(8, 4.0)) == 3.0


def test_real_chunk_rules_cover_every_rule_and_the_oracle_split_finds_the_shift():
    d = 8
    a, b = np.zeros(d), np.zeros(d)
    b[[5, 6]] = 3.0  # all the KL (9 nats) in dimensions 5 and 6
    out = rcc_methods.real_chunk_rules(a, b, -9.0, 12, np.random.default_rng(4))
    assert {"pfr", "tempered", "mrc", "greedy"} <= set(out)
    assert all(f"sp-{k} P2M1-{m}" in out for k in ("greedy", "pfr") for m in ("random", "oracle"))
    assert all(np.isfinite(v[1]) for v in out.values())
    assert out["greedy"][0] == 12.0 and math.isnan(out["pfr"][0]) and out["sp-greedy P2M1-oracle"][0] == 16.0  # 2^12 x 2^4 bins
    assert out["greedy"][1] >= out["pfr"][1]  # the largest log w of the same candidates
    # a shift along the first 4 dimensions only (the split ones, random or oracle): the one searched
    # bin (of 16) is their positive orthant, and the best of 2^12 candidates there delivers more
    # than the best of 2^12 unrestricted ones (3.7 +- 0.7 bits over 20 chunks)
    b = np.zeros(d)
    b[:4] = 3.0
    runs = [rcc_methods.real_chunk_rules(a, b, -18.0, 12, np.random.default_rng(10 + i)) for i in range(20)]
    for mode in ("random", "oracle"):
        assert np.mean([r[f"sp-greedy P2M1-{mode}"][1] - r["greedy"][1] for r in runs]) > 1.0


def synthetic_chunks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    dims = np.array([6, 10, 300, 8])
    a = [np.full(d, -0.05) for d in dims]
    b = [rng.normal(size=d) * (3.0 / math.sqrt(d)) for d in dims]
    return {"stage": np.array([10, 30, 44, 47]), "dims": dims, "a": np.concatenate(a), "b": np.concatenate(b),
            "c": np.array([-2.0] * 4), "kl_bits": np.array([rcc_methods.chunk_kl_bits(x, y) for x, y in zip(a, b)]),
            "codec_log2_n": np.full(4, 16.0)}


def test_script_writes_json_and_markdown(tmp_path):
    chunks = tmp_path / "chunks.npz"
    np.savez_compressed(chunks, **synthetic_chunks(np.random.default_rng(5)))
    out = tmp_path / "rcc_methods.json"
    assert rcc_methods.main(["--kl-bits", "8,14", "--log2-candidates", "10", "--trials", "40", "--chunks",
                             str(chunks), "--real-chunks", "2", "--chain", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {(r["kl_bits"], r["rule"]) for r in payload["part_a"]} == {
        (k, r) for k in (8.0, 14.0) for r in rcc_methods.RULES_1D}
    part_b = payload["part_b"]
    assert part_b["chunks_used"] == 2 and part_b["stages"] and all(s != 44 for s in part_b["stages"])  # 300 dims > 256
    assert {r["rule"] for r in part_b["rows"]} >= {"pfr", "greedy", "sp-pfr P4M16-oracle"}
    assert set(payload["search_seconds"]) == set(rcc.SELECTION_RULES)
    assert payload["provenance"]["command"].startswith("python -m bench.rcc_methods")
    md = out.with_suffix(".md").read_text()
    assert "| 2^10 | 14 | greedy |" in md and "## B. Real chunks" in md and "46..49" in md
    # --refresh-chains re-reads chain runs into the same JSON without simulating again
    assert rcc_methods.main(["--refresh-chains", "--chain", "--out", str(out)]) == 0
    refreshed = json.loads(out.read_text())
    assert refreshed["part_a"] == payload["part_a"] and refreshed["chains"] == []
    assert refreshed["provenance"]["chains_refreshed_by"].startswith("python -m bench.rcc_methods --refresh-chains")


def test_script_rejects_bad_arguments():
    with pytest.raises(SystemExit) as e:
        rcc_methods.main(["--trials", "1"])
    assert e.value.code == 2


def test_recording_selector_sums_what_its_choices_deliver():
    rng = np.random.default_rng(6)
    tasks = []
    for c, d in enumerate((3, 17)):
        lw = rcc.LogWeight.of_gaussians(rng.normal(size=d), np.full(d, -0.2), np.zeros(d), np.zeros(d))
        tasks.append((lw, (1, 2, c), 500))
    selector = rcc_chain.RecordingSelector("greedy")
    chosen = selector(tasks, workers=1)
    assert chosen == rcc.greedy_select_many(tasks)
    delivered = sum(lw(rcc.pfr_decode(key, n, len(lw.a))[None])[0] for (lw, key, _), n in zip(tasks, chosen)) / LN2
    assert selector.totals["candidates"] == 1000 and selector.totals["chunks"] == 2 and selector.totals["log2_candidates"] == pytest.approx(2 * math.log2(500))
    assert selector.totals["delivered_bits"] == pytest.approx(delivered)
    assert selector.totals["kl_bits"] == pytest.approx(sum(rcc_methods.chunk_kl_bits(lw.a, lw.b) for lw, _, _ in tasks))
    with pytest.raises(DiffcodecError, match="unknown rule"):
        rcc_chain.RecordingSelector("best")
    # a stage below small_stage_bits: each chunk's budget cut to 2^ceil(KL + pad) (KLs 7.8 and 12.3 bits)
    wide = [(lw, key, 4096) for lw, key, _ in tasks]
    kls = [rcc_methods.chunk_kl_bits(lw.a, lw.b) for lw, _, _ in wide]
    small = rcc_chain.RecordingSelector("greedy", small_stage_bits=1e9, small_stage_pad=1.0)
    small(wide)
    assert small.totals["candidates"] == sum(min(4096, 2 ** math.ceil(k + 1.0)) for k in kls) == 512 + 4096
    large = rcc_chain.RecordingSelector("greedy", small_stage_bits=sum(kls), small_stage_pad=1.0)
    large(wide)  # a stage of exactly that KL is not small
    assert large.totals["candidates"] == 2 * 4096


def test_bound_psnrs_read_stages_in_stream_order():
    mse = np.array([[1.0, 100.0, 10_000.0], [1.0, 100.0, 10_000.0]])  # two tiles, code steps 0..2
    bound = BoundResult(np.zeros(2), np.zeros((2, 3)), mse, np.arange(3), np.full(2, 3072))
    psnr = rcc_chain.bound_psnrs(bound)
    expected = [10 * math.log10(255**2 / m) for m in (10_000.0, 100.0, 1.0)]  # stage 0 = code step K-1
    assert psnr == pytest.approx(expected)


def test_chain_bench_codes_ordinary_streams_and_accounts_for_the_chunks(tmp_path, tiny_checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    yy, xx = np.mgrid[0:32, 0:32]
    Image.fromarray(np.stack([xx * 6, yy * 5, (xx + yy) * 3], -1).astype(np.uint8)).save(folder / "a.png")
    runs = {}
    for rule in rcc.SELECTION_RULES:
        out = tmp_path / f"rcc_chain_{rule}.json"
        # bench.progressive decodes each full stream and raises unless it is the image, bit for bit
        assert rcc_chain.main([str(folder), "-c", str(tiny_checkpoint), "--rule", rule, "-n", "1", "--steps", "4",
                               "--chunk-bits", "6", "--pad-bits", "4", "--log2-candidates", "10",
                               "--no-baselines", "--no-ddim", "--out", str(out)]) == 0
        runs[rule] = json.loads(out.read_text())
        sel = runs[rule]["selection"]
        assert sel["rule"] == rule and sel["chunks"] > 0 and sel["kl_bits"] > 0
        assert 0 < sel["index_bits_real"] <= runs[rule]["per_image"][0]["real_bits"][-2]
        assert len(runs[rule]["per_image"][0]["bound_psnr"]) == 4
        assert [r["psnr"] for r in runs[rule]["bound_curve"]] == rcc_chain.PSNRS
        assert runs[rule]["provenance"]["command"].startswith("python -m bench.rcc_chain")
        assert "Selection rule: **" + rule in out.with_suffix(".md").read_text()
    assert runs["greedy"]["selection"]["delivery"] > runs["pfr"]["selection"]["delivery"]
    # and bench.rcc_methods reports them: the excess over the bound and its account, the PSNR table
    chains = [rcc_methods.chain_summary(tmp_path / f"rcc_chain_{rule}.json", runs[rule]) for rule in runs]
    for c in chains:
        assert c["real_excess_bpd"] == pytest.approx(c["payload_bpd"] - c["bound_bpd"])
        assert c["candidates_per_image"] > 0 and len(c["over_bound_own_curve"]) == len(rcc_methods.CHAIN_PSNRS)
    text = "\n".join(rcc_methods.chain_lines(chains))
    assert "| greedy, pad 4 |" in text and "| ... / bound, own curve |" in text
