"""bench.progressive_checks: the check schedule computed from levels is the codec's own, and
the costs it reports add up."""

import numpy as np

from bench.progressive_checks import check_schedule, from_report
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.codec.progressive.syntax import kl_of_level


def test_schedule_follows_the_nominal_kl_and_ends_on_the_last_stage():
    params = ProgressiveParams(num_steps=6, check_min_bits=128)
    levels = [0, 27, 33, 35, 37, 36]  # nominal KL 0, 8, 64, 128, 256, 181 bits
    due = check_schedule(levels, params, 3072)
    assert due.tolist() == [False, False, False, True, True, True]
    assert sum(kl_of_level(v) for v in levels[:4]) >= 128 > sum(kl_of_level(v) for v in levels[:3])
    assert not check_schedule(levels, ProgressiveParams(num_steps=6, check_bits=0), 3072).any()


def test_costs_add_up_on_a_synthetic_report():
    levels = [0, 27, 33, 35, 37, 36]
    real = np.cumsum([5, 20, 150, 260, 190, 170, 900]).tolist()  # K + 1 cumulative payload bits
    report = {"num_dims": 3072, "per_image": [{"levels": levels, "real_bits": real, "header_bits": 200}]}
    params = ProgressiveParams(num_steps=6)
    r = from_report(report, params)
    im = r["images"][0]
    assert im["num_checks"] == 3 and im["check_bits"] == 48 and im["group_ends"] == [3, 4, 5]
    assert im["full_rate_bits_with_checks"] - im["full_rate_bits"] == 48
    over = np.array(im["prefix_overhead_pct"])
    # stages 0..2 arrive with stage 3's group: its bits plus one check
    assert np.isclose(over[0], 100 * (real[3] + 16 - real[0]) / (real[0] + 200))
    assert np.all(over > 0) and np.isclose(over[-1], 100 * 48 / (real[-1] + 200))
