"""bench.rcc_redundancy: the thresholded PFR simulation selects as the brute-force search
does, exact chunks deliver their KL at a positive index redundancy, starved ones do not,
and the script's JSON feeds bench.plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import plot as bench_plot  # noqa: E402
from bench.rcc_redundancy import FULL_PREFIX, index_entropy_bits, main, measure, pfr_trial  # noqa: E402

LN2 = math.log(2.0)


def brute_force_trial(mu: float, num_candidates: int, rng: np.random.Generator) -> tuple[int, float]:
    v = rng.standard_normal(num_candidates)
    log_t = np.log(np.cumsum(rng.standard_exponential(num_candidates)))
    n = int(np.argmin(log_t - mu * v))
    return n, float(v[n])


def test_thresholded_search_matches_brute_force_in_law():
    # 16-bit chunk, 2^16 candidates: many winners lie beyond the fully drawn prefix
    mu, n = math.sqrt(2 * 16 * LN2), 1 << 16
    fast = [pfr_trial(mu, n, np.random.default_rng(10_000 + i)) for i in range(600)]
    slow = [brute_force_trial(mu, n, np.random.default_rng(20_000 + i)) for i in range(600)]
    assert sum(i >= FULL_PREFIX for i, _ in fast) > 200
    for a, b in ((np.array([v for _, v in fast]), np.array([v for _, v in slow])),
                 (np.log2(1.0 + np.array([i for i, _ in fast])), np.log2(1.0 + np.array([i for i, _ in slow])))):
        stderr = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * stderr


def test_exact_chunks_pay_a_positive_redundancy_and_deliver_their_kl():
    row = measure(4.0, 16, 800, np.random.default_rng(0))
    assert 1.0 < row["redundancy_bits"] < 4.5
    assert abs(row["shift_fraction"] - 1.0) < 0.08 and abs(row["sample_std"] - 1.0) < 0.1
    assert abs(row["delivered_bits"] - 4.0) < 0.6


def test_a_starved_chunk_pays_less_than_its_kl_and_delivers_less():
    row = measure(20.0, 12, 400, np.random.default_rng(1))
    assert row["redundancy_bits"] < -4.0
    assert row["shift_fraction"] < 0.8 and row["delivered_bits"] < 14.0


def test_index_entropy_counts_exponent_and_mantissa():
    # all indices 8..15: exponent 4 always (0 bits) plus 3 mantissa bits
    assert index_entropy_bits(np.arange(8, 16)) == 3.0
    # exponents 1 and 2 equally often (index 0 has exponent 0): 1 bit + Miller-Madow + mean mantissa 0.5
    got = index_entropy_bits(np.array([1, 2, 3, 1, 2, 3]))
    assert abs(got - (0.9183 + 1 / (12 * LN2) + 2 / 3)) < 1e-3


def test_script_writes_json_markdown_and_the_plot_draws_it(tmp_path):
    out = tmp_path / "rcc_redundancy.json"
    assert main(["--kl-bits", "2,14", "--log2-candidates", "12,16", "--trials", "50", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {(r["kl_bits"], r["log2_candidates"]) for r in payload["rows"]} == {(2.0, 12), (2.0, 16), (14.0, 12), (14.0, 16)}
    assert payload["provenance"]["command"].startswith("python -m bench.rcc_redundancy")
    md = out.with_suffix(".md").read_text()
    assert "| 14 |" in md and "2^16" in md
    assert bench_plot.main(["--reports", str(tmp_path)]) == 0
    assert (tmp_path / "rcc_redundancy.png").stat().st_size > 10_000
    assert "14-bit chunks, 2^16 candidates" in (tmp_path / "README.md").read_text()


def test_script_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--trials", "1"])
    assert e.value.code == 2
