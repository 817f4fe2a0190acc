"""bench.progressive_compare: rates of progressive runs interpolated at equal PSNR."""

import json

import pytest

from bench import progressive_compare as pc
from diffcodec.errors import DiffcodecError


def fake_run(rates, psnrs, min_stage_bits=0.0):
    stages = [{"stage": i, "real_with_header_bpd": r, "bound_bpd": r / 2, "psnr_xstart": p}
              for i, (r, p) in enumerate(zip(rates, psnrs))]
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
    assert "min_stage_bits 0 (run0.json) | 2 | 0.2000 | - | 5.0000 | 4.0000 | - | - | 1.5 |" in text
    assert "min_stage_bits 32 (run32.json) | 2 | 0.3000 | - |" in text
    # the second table: real over the bound of the same stages (fake bound = half the real rate)
    assert "min_stage_bits 0 (run0.json) | 2.00 | - | 1.25 |" in text


def test_images_option_recomputes_the_summary_on_the_first_images(tmp_path):
    def row(scale):  # one image of a 2-step chain on 4 dims: cumulative real bits, per-stage terms
        return {"timesteps": [999, 0, -1], "real_bits": [0.0, 4.0 * scale, 12.0 * scale],
                "analytic_bits": [0.0, 2.0 * scale, 8.0 * scale], "bound_bits": [0.0, 2.0 * scale, 6.0 * scale],
                "header_bits": 0.0, "psnr_xstart": [5.0, 20.0 * scale], "psnr_ddim": None,
                "num_chunks": [0, 1], "sample_bits": [0.0, 1.0 * scale],
                "encode_seconds": 1.0, "decode_seconds": 1.0, "encode_breakdown": {}, "decode_breakdown": {}}
    from bench.progressive import summarize

    rows = [row(1.0), row(2.0)]
    run = {**fake_run([0.1], [10.0]), "num_dims": 4, "per_image": rows, "summary": summarize(rows, 4)}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    one = pc.first_images(json.loads(path.read_text()), 1, str(path))
    assert one["summary"]["num_images"] == 1
    assert one["summary"]["full_rate"]["real_bpd"] == pytest.approx(3.0)  # 12 bits / 4 dims, image 0 only
    assert one["summary"]["full_rate"]["rcc_sample_over_kl"] == pytest.approx(0.5)
    assert run["summary"]["full_rate"]["real_bpd"] == pytest.approx(4.5)  # both images
    with pytest.raises(DiffcodecError, match="fewer than --images 3"):
        pc.main([str(path), "--images", "3"])


def test_codec_bpp_at_psnr_interpolates_and_marks_what_its_smallest_file_already_reaches():
    points = [[0.9, 40.0, "q90"], [0.3, 20.0, "q10"]]  # unsorted, as a run may store them
    assert pc.codec_bpp_at_psnr(points, 30.0) == (pytest.approx(0.6), False)
    assert pc.codec_bpp_at_psnr(points, 15.0) == (pytest.approx(0.3), True)
    assert pc.codec_bpp_at_psnr(points, 45.0) == (None, False)


def test_runs_with_baselines_get_the_classical_table_and_the_psnrs_won(tmp_path):
    run = fake_run([0.1, 0.3, 0.5], [10.0, 20.0, 30.0])  # bits/dim; x 3 = bits per pixel
    run["per_image"] = [{}, {}]
    run["lossy_baselines"] = {"Slow codec": [[1.0, 12.0, "a"], [3.0, 32.0, "b"]],
                              "Lean codec": [[0.3, 20.0, "c"], [0.9, 40.0, "d"]]}
    path = tmp_path / "kodak.json"
    path.write_text(json.dumps(run))
    out = tmp_path / "cmp.md"
    assert pc.main([str(path), "--psnr", "15,30,35", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| diffcodec real prefixes, header included (K=3 chunk 14 2^16 min_stage_bits 0) | 0.600 | 1.500 | - |" in text
    assert "| the bound of the same stages | 0.300 | 0.750 | - |" in text
    assert "| Slow codec | 1.300 | 2.800 | - |" in text
    assert "| Lean codec | ≤0.300 | 0.600 | 0.750 |" in text
    assert "Fewer bits than every classical codec at: none of these PSNRs." in text
    del run["lossy_baselines"]["Lean codec"]
    path.write_text(json.dumps(run))
    assert pc.main([str(path), "--psnr", "15,30,35", "--out", str(tmp_path / "cmp2.md")]) == 0
    assert "Fewer bits than every classical codec at: 15, 30 dB." in (tmp_path / "cmp2.md").read_text()
    # a subset of the images has no baselines measured on it: no classical table
    run["summary"]["num_images"] = 1
    assert pc.classical_table(str(path), run, [15.0]) == []
