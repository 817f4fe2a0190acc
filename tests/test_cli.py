"""`diffcodec nll` end to end on a tiny model, and one-line errors on bad input."""

import json

import numpy as np
import torch
import pytest
from PIL import Image

from diffcodec.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_nll_json_terms_add_up(tiny_checkpoint, images_npz, tmp_path, capsys):
    terms_file = tmp_path / "terms.npz"
    code, out, err = run(["nll", images_npz, "-c", tiny_checkpoint, "-n", 4, "--steps", 20, "--json", "-q",
                          "--batch-size", 3, "--save-terms", terms_file], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["num_images"] == 4 and r["num_steps"] == 20 and r["num_timesteps"] == 1000
    assert r["bits_per_dim"] == pytest.approx(r["L_T_bpd"] + r["kl_terms_bpd"] + r["L_0_bpd"], rel=1e-9)
    assert sum(r["terms_bpd"].values()) == pytest.approx(r["bits_per_dim"], rel=1e-9)
    assert r["bits_per_dim"] > 0 and r["bits_per_dim_stderr"] > 0
    saved = np.load(terms_file)
    assert saved["terms_bits"].shape == (4, 20)
    total_bpd = (saved["prior_bits"] + saved["terms_bits"].sum(1)) / saved["num_dims"]
    assert total_bpd.mean() == pytest.approx(r["bits_per_dim"], rel=1e-9)
    # the same seed reproduces the numbers; the batch size is part of the recipe
    code, out2, _ = run(["nll", images_npz, "-c", tiny_checkpoint, "-n", 4, "--steps", 20, "--json", "-q",
                         "--batch-size", 3], capsys)
    assert json.loads(out2)["bits_per_dim"] == r["bits_per_dim"]


def test_nll_t_samples_estimates_the_same_bound(tiny_checkpoint, images_npz, capsys):
    args = ["nll", images_npz, "-c", tiny_checkpoint, "-n", 4, "--steps", 20, "--json", "-q"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    whole = json.loads(out)
    code, out, err = run([*args, "--t-samples", 19], capsys)
    assert code == 0, err
    drawn = json.loads(out)
    assert whole["estimator"] == "whole chain" and whole["t_samples"] is None
    assert drawn["estimator"] == "monte-carlo over timesteps" and drawn["t_samples"] == 19
    assert drawn["L_T_bpd"] == whole["L_T_bpd"]
    assert drawn["bits_per_dim"] == pytest.approx(drawn["L_T_bpd"] + drawn["kl_terms_bpd"] + drawn["L_0_bpd"])
    # an untrained tiny model's terms are nearly flat in t: 19 draws of 19 steps land near the sum
    assert drawn["kl_terms_bpd"] == pytest.approx(whole["kl_terms_bpd"], rel=0.2)
    code, out, err = run([*args[:-2], "-q", "--t-samples", 8], capsys)
    assert code == 0 and "KL terms estimated from 8 drawn timesteps" in out


def test_nll_text_summary_and_tiled_image(tiny_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    code, out, err = run(["nll", tmp_path / "odd.png", "-c", tiny_checkpoint, "--steps", 5, "-q"], capsys)
    assert code == 0, err
    assert "bits/dim" in out and "L_0 (decoder)" in out and "(4 tiles)" in out


def one_line_error(code, err, phrase):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffcodec: error:"), err
    assert phrase in lines[0], lines[0]


def test_nll_bad_inputs_give_one_line_errors(tiny_checkpoint, images_npz, tmp_path, capsys):
    c = ["-c", tiny_checkpoint, "--steps", 3, "-q"]
    one_line_error(*run(["nll", tmp_path / "nope.png", *c], capsys)[::2], "no such file")
    (tmp_path / "notes.txt").write_text("not an image")
    one_line_error(*run(["nll", tmp_path / "notes.txt", *c], capsys)[::2], "notes.txt")
    Image.new("L", (32, 32)).save(tmp_path / "gray.png")
    one_line_error(*run(["nll", tmp_path / "gray.png", *c], capsys)[::2], "8-bit RGB")
    np.savez(tmp_path / "layout.npz", x=np.zeros((2, 3, 32, 32), dtype=np.uint8))
    one_line_error(*run(["nll", tmp_path / "layout.npz", *c], capsys)[::2], "layout.npz")
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    one_line_error(*run(["nll", images_npz, "-c", tmp_path / "bad.pt"], capsys)[::2], "bad.pt")
    one_line_error(*run(["nll", images_npz, *c, "--steps", 5000], capsys)[::2], "--steps")
    one_line_error(*run(["nll", images_npz, *c, "--device", "tpu9"], capsys)[::2], "device")
    if not torch.cuda.is_available():
        one_line_error(*run(["nll", images_npz, *c, "--device", "cpu", "--bf16"], capsys)[::2], "--bf16")
    (tmp_path / "exists.npz").write_bytes(b"keep me")
    one_line_error(*run(["nll", images_npz, *c, "--save-terms", tmp_path / "exists.npz"], capsys)[::2], "--force")
    assert (tmp_path / "exists.npz").read_bytes() == b"keep me"


def test_argument_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nll", "x.png", "--num-images", "0"])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_codec_bad_inputs_are_refused_before_any_work(tiny_checkpoint, images_npz, tmp_path, capsys):
    """Devices this machine cannot use, a step count outside 1..T, an image larger than the
    format holds and outputs that cannot be written: one line, exit 2, nothing written."""
    c = ["-c", tiny_checkpoint, "-q", "-n", 1]
    out = tmp_path / "x.dfc"
    one_line_error(*run(["encode", images_npz, "-o", out, *c, "--device", "bogus"], capsys)[::2], "unknown device")
    if not torch.cuda.is_available():
        one_line_error(*run(["encode", images_npz, "-o", out, *c, "--device", "cuda"], capsys)[::2], "no CUDA")
    one_line_error(*run(["encode", images_npz, "-o", out, *c, "--progressive", "--steps", 100000], capsys)[::2],
                   "between 1 and T = 1000")
    one_line_error(*run(["encode", images_npz, "-o", out, *c, "--steps", 1001], capsys)[::2], "between 1 and T")
    one_line_error(*run(["encode", images_npz, "-o", tmp_path / "missing" / "x.dfc", *c], capsys)[::2],
                   "does not exist")
    one_line_error(*run(["encode", images_npz, "-o", tmp_path, "--force", *c], capsys)[::2], "is a directory")
    Image.fromarray(np.zeros((1, 65537, 3), np.uint8)).save(tmp_path / "wide.png")
    one_line_error(*run(["encode", tmp_path / "wide.png", "-o", out, "-c", tiny_checkpoint, "-q"], capsys)[::2],
                   "out of range")
    assert not out.exists()
    assert run(["encode", images_npz, "-o", out, *c, "--steps", 2, "--lossless", "--no-bound", "--no-bootstrap"],
               capsys)[0] == 0
    for device, phrase in (("bogus", "unknown device"), ("cuda:7", "CUDA")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        one_line_error(*run(["decode", out, "-o", tmp_path / "y.png", "-c", tiny_checkpoint, "--device", device],
                            capsys)[::2], phrase)
    one_line_error(*run(["decode", tmp_path, "-o", tmp_path / "y.png"], capsys)[::2], "is a directory")
    one_line_error(*run(["decode", out, "-o", tmp_path / "missing" / "y.png", "-c", tiny_checkpoint], capsys)[::2],
                   "does not exist")
    assert not (tmp_path / "y.png").exists()


def test_seeds_out_of_range_and_unknown_presets_are_usage_errors(capsys):
    for argv in (["nll", "x.png", "--seed", "99999999999999999999999"], ["nll", "x.png", "--seed", "-1"],
                 ["train", "d", "-o", "r", "--seed", "99999999999999999999999"],
                 ["train", "d", "-o", "r", "--preset", "huge"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("seed must be in" in err or "invalid choice" in err), err
        assert len(err.strip().splitlines()) == 1 and err.startswith("diffcodec "), err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "cpu-small" in capsys.readouterr().out


def test_a_one_image_file_stores_no_name_and_decodes_into_a_folder_as_its_stem(tiny_checkpoint, tmp_path, capsys):
    """Format 4: `encode` of one image stores no name (the decoder's -o names the output);
    decoding it into a directory names the PNG after the .dfc file. Several images keep their
    names and decode to one PNG each, named from them."""
    from diffcodec.codec.api import read_header

    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    flags = ["-c", tiny_checkpoint, "--steps", 2, "--lossless", "--no-bootstrap", "--no-bound", "--float64", "-q",
             "--device", "cpu"]
    code, _, err = run(["encode", tmp_path / "a.png", "-o", tmp_path / "photo.dfc", *flags], capsys)
    assert code == 0, err
    assert [im.name for im in read_header((tmp_path / "photo.dfc").read_bytes()).images] == [""]
    code, out, err = run(["decode", tmp_path / "photo.dfc", "-o", tmp_path / "out", "-c", tiny_checkpoint, "-q",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo.png")), np.asarray(Image.open(tmp_path / "a.png")))
    (tmp_path / "both").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "both" / name).write_bytes((tmp_path / name).read_bytes())
    code, _, err = run(["encode", tmp_path / "both", "-o", tmp_path / "two.dfc", *flags], capsys)
    assert code == 0, err
    assert [im.name for im in read_header((tmp_path / "two.dfc").read_bytes()).images] == ["a.png", "b.png"]
    code, _, err = run(["decode", tmp_path / "two.dfc", "-o", tmp_path / "out2", "-c", tiny_checkpoint, "-q",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a.png", "b.png"]


def test_batch_size_sets_a_progressive_codecs_batch_and_decode_refuses_it_for_lossless(tiny_checkpoint, tmp_path,
                                                                                        capsys):
    """`decode --batch-size`: a progressive file decodes to the same pixels in batches of one
    tile (and `encode --batch-size 1` writes the same file); a lossless file, whose chunks are
    its own, refuses the flag in one line (exit 2)."""
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")  # 2 tiles
    common = ["-c", tiny_checkpoint, "-q", "--device", "cpu"]
    code, _, err = run(["encode", tmp_path / "a.png", "-o", tmp_path / "p.dfc", "--progressive", "--steps", 2,
                        *common], capsys)
    assert code == 0, err
    code, _, err = run(["encode", tmp_path / "a.png", "-o", tmp_path / "p1.dfc", "--progressive", "--steps", 2,
                        "--batch-size", 1, *common], capsys)
    assert code == 0 and (tmp_path / "p1.dfc").read_bytes() == (tmp_path / "p.dfc").read_bytes(), err
    for batch in (None, 1):
        out = tmp_path / f"p{batch}.png"
        code, _, err = run(["decode", tmp_path / "p.dfc", "-o", out, *common]
                           + ([] if batch is None else ["--batch-size", batch]), capsys)
        assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pNone.png")), np.asarray(Image.open(tmp_path / "a.png")))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p1.png")), np.asarray(Image.open(tmp_path / "a.png")))
    code, _, err = run(["encode", tmp_path / "a.png", "-o", tmp_path / "l.dfc", "--lossless", "--steps", 2,
                        "--no-bootstrap", "--no-bound", *common], capsys)
    assert code == 0, err
    code, _, err = run(["decode", tmp_path / "l.dfc", "-o", tmp_path / "l.png", "--batch-size", 4, *common], capsys)
    assert code == 2 and "--batch-size applies to progressive files" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "l.png").exists()
