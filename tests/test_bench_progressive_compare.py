"""bench.progressive_compare: rates of progressive runs interpolated at equal PSNR."""

import json

import pytest

from bench import progressive_compare as pc


def fake_run(rates, psnrs, min_stage_bits=0.0):
    stages = [{"stage": i, "real_with_header_bpd": r, "psnr_xstart": p} for i, (r, p) in enumerate(zip(rates, psnrs))]
    stages.append({"stage": len(rates), "real_with_header_bpd": 5.0, "psnr_xstart": float("inf")})
    return {"params": {"num_steps": len(rates), "chunk_bits": 14.0, "log2_candidates": 16,
                       "min_stage_bits": min_stage_bits},
            "summary": {"num_images": 2, "stages": stages,
                        "full_rate": {"real_with_header_bpd": 5.0, "bound_bpd": 4.0},
                        "seconds": {"decode": {"mean_per_image": 1.5}}}}


def test_rate_at_psnr_interpolates_and_stops_at_the_last_latent():
    run = fake_run([0.1, 0.3, 0.5], [10.0, 20.0, 30.0])
    assert pc.rate_at_psnr(run, 15.0) == pytest.approx(0.2)
    assert pc.rate_at_psnr(run, 5.0) == pytest.approx(0.1)
    assert pc.rate_at_psnr(run, 30.0) == pytest.approx(0.5)
    assert pc.rate_at_psnr(run, 31.0) is None
    # a PSNR that dips is read on its running maximum: the first prefix that reached it
    assert pc.rate_at_psnr(fake_run([0.1, 0.2, 0.4], [10.0, 9.0, 30.0]), 10.0) == pytest.approx(0.1)


def test_main_writes_one_row_per_run(tmp_path, capsys):
    paths = []
    for m, rates in ((0.0, [0.1, 0.3, 0.5]), (32.0, [0.2, 0.4, 0.6])):
        path = tmp_path / f"run{int(m)}.json"
        path.write_text(json.dumps(fake_run(rates, [10.0, 20.0, 30.0], m)))
        paths.append(str(path))
    out = tmp_path / "cmp.md"
    assert pc.main([*paths, "--psnr", "15,35", "--out", str(out)]) == 0
    text = out.read_text()
    assert "min_stage_bits 0 (run0.json) | 2 | 0.2000 | - | 5.0000 | 4.0000 | 1.5 |" in text
    assert "min_stage_bits 32 (run32.json) | 2 | 0.3000 | - |" in text
