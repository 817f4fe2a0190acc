"""The lossy-codec workflow through the CLI on a tiny seeded model (16x16 tiles, K = 6): encode
with a rate target in one command, `info`, `cut`, `decode` of cut, lossy and damaged files,
and the one-line refusals (exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffcodec.cli import main
from diffcodec.exact import CONTRACT_VERSION

from conftest import seeded_checkpoint, synthetic_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K = ["--steps", 6, "--chunk-bits", 4, "--device", "cpu", "-q"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(result, phrase: str) -> None:
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("diffcodec: error:") and phrase in lines[0], err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint, a 24x20 image (two padded tiles) and its whole progressive file."""
    tmp = tmp_path_factory.mktemp("cli_files")
    ckpt = seeded_checkpoint(tmp / "tiny.pt")
    img = synthetic_images([(24, 20)], seed=6)[0]
    Image.fromarray(img).save(tmp / "img.png")
    assert main([str(a) for a in ["encode", tmp / "img.png", "-o", tmp / "full.dfc", "-c", ckpt, "--progressive",
                                  *K]]) == 0
    return tmp, ckpt, img


def info(path, ckpt, capsys) -> dict:
    code, out, err = run(["info", path, "-c", ckpt, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_info_lists_versions_model_images_and_cut_points(setup, capsys):
    tmp, ckpt, img = setup
    r = info(tmp / "full.dfc", ckpt, capsys)
    assert (r["mode"], r["version"], r["contract"], r["stream_version"]) == ("progressive", 5, CONTRACT_VERSION, 6)
    assert r["model_matches"] and len(r["model_id"]) == 8 and len(r["probe"]) == 8
    assert r["images"] == [{"name": "", "height": 24, "width": 20}] and r["pixels"] == 480
    assert (r["num_steps"], r["num_stages"], r["file_stages"], r["cut_short"]) == (6, 7, 7, False)
    points = r["cut_points"]
    assert len(points) >= 3 and points[-1]["stages"] == 7 and points[-1]["offset"] == r["file_bytes"]
    assert all(p["bits_per_pixel"] == pytest.approx(8 * p["cut_bytes"] / 480) for p in points)
    code, text, _ = run(["info", tmp / "full.dfc", "-c", ckpt], capsys)
    assert code == 0 and "format 5" in text and "whole stream" in text and "cut points" in text
    assert f"offset {points[0]['offset']:>9,}" in text
    # another model's file: described from its header, no cut points
    r = info(tmp / "full.dfc", seeded_checkpoint(tmp / "other.pt", 5), capsys)
    assert not r["model_matches"] and not r["cut_points"] and "encoded with model" in r["model_note"]


def test_encode_to_a_target_then_cut_then_decode(setup, capsys):
    """The issue's workflow: a file of at most X bpp (or Y dB) in one command, inspect it, cut it further."""
    tmp, ckpt, img = setup
    full = info(tmp / "full.dfc", ckpt, capsys)["cut_points"]
    bpp = (full[1]["bits_per_pixel"] + full[2]["bits_per_pixel"]) / 2
    code, out, err = run(["encode", tmp / "img.png", "-o", tmp / "small.dfc", "-c", ckpt, "--bpp", bpp, "--json",
                          *K], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["target"] == f"--bpp {bpp:g}" and not rep["lossless"] and rep["bits_per_pixel"] <= bpp
    assert rep["file_stages"] == full[1]["stages"] and rep["min_psnr_db"] > 0
    small = info(tmp / "small.dfc", ckpt, capsys)
    assert small["file_stages"] == full[1]["stages"] and small["cut_short"] is False
    assert [p["stages"] for p in small["cut_points"]] == [p["stages"] for p in full[:2]]
    code, out, err = run(["decode", tmp / "small.dfc", "-o", tmp / "small.png", "-c", ckpt, "--device", "cpu"], capsys)
    assert code == 0 and f"a lossy file: it ends at stage {full[1]['stages']}" in out, (out, err)
    code, out, err = run(["decode", tmp / "small.dfc", "-o", tmp / "upto.png", "-c", ckpt, "--device", "cpu",
                          "--upto", 7], capsys)  # more stages than the file has: it still ends where it ends
    assert code == 0 and f"a lossy file: it ends at stage {full[1]['stages']}" in out, (out, err)
    # --psnr: the encoder's PSNR is the decoded image's
    code, out, err = run(["encode", tmp / "img.png", "-o", tmp / "p.dfc", "-c", ckpt, "--psnr", rep["min_psnr_db"] - 0.01,
                          "--json", *K], capsys)
    assert code == 0 and json.loads(out)["file_stages"] == full[1]["stages"], err
    # cut the small file further, then decode it: the image `decode --bits` of the original gives
    code, out, err = run(["cut", tmp / "small.dfc", "-o", tmp / "smaller.dfc", "-c", ckpt, "--stage",
                          full[0]["stages"], "--json"], capsys)
    assert code == 0, err
    c = json.loads(out)
    assert c["stages"] == full[0]["stages"] and c["file_bytes"] == (tmp / "smaller.dfc").stat().st_size
    for name, extra in (("a.png", []), ("b.png", ["--bits", c["decode_bits_equivalent"]])):
        src = tmp / ("smaller.dfc" if not extra else "small.dfc")
        assert run(["decode", src, "-o", tmp / name, "-c", ckpt, "--device", "cpu", *extra], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp / "a.png")), np.asarray(Image.open(tmp / "b.png")))


def test_a_stream_in_regions_is_inspected_cut_and_decoded(setup, capsys):
    """A file whose stream is in regions (an image of more tiles than the encoder's regions:
    here regions of 2 tiles of a 6-tile image): `info` says so and lists its cut points, a cut
    file decodes to what `decode --bits` of the whole one gives, and the whole file decodes
    to the image."""
    from diffcodec.codec import api
    from diffcodec.codec.progressive.params import ProgressiveParams

    tmp, ckpt, _ = setup
    img = synthetic_images([(48, 32)], seed=8)[0]  # 3 x 2 tiles of 16
    enc = api.encode([img], checkpoint=str(ckpt), mode="progressive",
                     progressive_params=ProgressiveParams(num_steps=6, chunk_bits=4.0, region_tiles=2))
    (tmp / "regions.dfc").write_bytes(enc.data)
    r = info(tmp / "regions.dfc", ckpt, capsys)
    assert (r["regions"], r["region_tiles"], r["num_stages"]) == (3, 2, 7) and r["whole"]
    code, text, _ = run(["info", tmp / "regions.dfc", "-c", ckpt], capsys)
    assert code == 0 and "7 stages, each in 3 regions of 2 tiles" in text
    point = r["cut_points"][1]
    code, out, err = run(["cut", tmp / "regions.dfc", "-o", tmp / "regions_cut.dfc", "-c", ckpt, "--stage",
                          point["stages"], "--json"], capsys)
    assert code == 0, err
    c = json.loads(out)
    for name, src, extra in (("rc.png", "regions_cut.dfc", []),
                             ("rb.png", "regions.dfc", ["--bits", c["decode_bits_equivalent"]]),
                             ("rw.png", "regions.dfc", [])):
        assert run(["decode", tmp / src, "-o", tmp / name, "-c", ckpt, "--device", "cpu", *extra], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp / "rc.png")), np.asarray(Image.open(tmp / "rb.png")))
    assert np.array_equal(np.asarray(Image.open(tmp / "rw.png")), img)


def test_cut_short_and_damaged_files_are_told_apart(setup, capsys):
    tmp, ckpt, img = setup
    data = (tmp / "full.dfc").read_bytes()
    points = info(tmp / "full.dfc", ckpt, capsys)["cut_points"]
    (tmp / "head.dfc").write_bytes(data[: points[-2]["offset"] + 3])  # `head -c`: still a valid prefix
    code, out, err = run(["decode", tmp / "head.dfc", "-o", tmp / "head.png", "-c", ckpt, "--device", "cpu"], capsys)
    assert code == 0 and f"the file is cut short ({points[-2]['offset'] + 3:,} of {len(data):,} bytes)" in out
    assert f"stage {points[-2]['stages']} of 7" in out
    r = info(tmp / "head.dfc", ckpt, capsys)
    assert r["cut_short"] and r["cut_points"][-1]["stages"] == points[-2]["stages"]
    bad = bytearray(data)
    bad[points[-2]["offset"] - 3] ^= 0x20  # the last latent group, in a file of its full length
    (tmp / "bad.dfc").write_bytes(bytes(bad))
    code, out, err = run(["decode", tmp / "bad.dfc", "-o", tmp / "bad.png", "-c", ckpt, "--device", "cpu"], capsys)
    assert code == 3 and "the file is damaged" in err and "cut short" not in out + err
    code, out, err = run(["info", tmp / "bad.dfc", "-c", ckpt], capsys)
    assert code == 3 and "DAMAGED" in out and "the file is damaged" in err
    refused(run(["cut", tmp / "bad.dfc", "-o", tmp / "x.dfc", "-c", ckpt, "--stage", points[0]["stages"]], capsys),
            "damaged")
    assert not (tmp / "x.dfc").exists()


def test_bad_targets_and_cuts_are_one_line_refusals_that_write_nothing(setup, capsys):
    tmp, ckpt, img = setup
    out = tmp / "never.dfc"
    enc = ["encode", tmp / "img.png", "-o", out, "-c", ckpt, *K]
    refused(run([*enc, "--size", 10], capsys), "the smallest file these images make")
    refused(run([*enc, "--lossless", "--psnr", 30], capsys), "progressive file's rate target")
    refused(run([*enc, "--no-bootstrap"], capsys), "--no-bootstrap applies to --lossless")
    refused(run([*enc, "--psnr", "inf"], capsys), "positive finite")
    with pytest.raises(SystemExit):  # one target at a time (argparse: exit 2)
        main([str(a) for a in [*enc, "--psnr", 30, "--bpp", 1]])
    capsys.readouterr()
    points = info(tmp / "full.dfc", ckpt, capsys)["cut_points"]
    cut = ["cut", tmp / "full.dfc", "-o", out, "-c", ckpt]
    refused(run([*cut, "--stage", 7], capsys), "past the end")
    refused(run([*cut, "--size", 5], capsys), "the smallest cut of this file")
    refused(run([*cut, "--bpp", 1000], capsys), "past the end")
    inside = next(n for n in range(1, 8) if n not in [p["stages"] for p in points])
    refused(run([*cut, "--stage", inside], capsys), "inside a checked group")
    assert run(["encode", tmp / "img.png", "-o", tmp / "ll.dfc", "-c", ckpt, "--lossless", "--steps", 2,
                "--no-bound", "--no-bootstrap", "--device", "cpu", "-q"], capsys)[0] == 0
    refused(run(["cut", tmp / "ll.dfc", "-o", out, "-c", ckpt, "--stage", 1], capsys), "only progressive files")
    r = info(tmp / "ll.dfc", ckpt, capsys)
    assert r["mode"] == "bits-back lossless" and r["version"] == 4 and not r["cut_points"]
    assert not out.exists()


def test_encode_with_no_mode_flag_ends_at_40_db(setup, capsys):
    """The default: a progressive file that ends at the first boundary where the image reaches 40 dB."""
    tmp, ckpt, img = setup
    code, out, err = run(["encode", tmp / "img.png", "-o", tmp / "default.dfc", "-c", ckpt, "--json", *K], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["mode"] == "progressive" and rep["target"] == "--psnr 40"
    assert rep["lossless"] or rep["min_psnr_db"] >= 40.0


def test_a_target_applies_to_each_shard_of_a_set_and_the_lossy_set_decodes(setup, capsys):
    tmp, ckpt, img = setup
    folder = tmp / "two"
    folder.mkdir()
    for i, im in enumerate(synthetic_images([(16, 16), (20, 12)], seed=9)):
        Image.fromarray(im).save(folder / f"{i}.png")
    code, out, err = run(["encode", folder, "-o", tmp / "set.dfcset", "-c", ckpt, "--shards", 2, "--size", 400,
                          "--json", *K], capsys)
    assert code == 0, err
    shards = json.loads(out)["shards"]
    assert len(shards) == 2 and all(s["file_bytes"] <= 400 for s in shards)
    code, out, err = run(["decode", tmp / "set.dfcset", "-o", tmp / "set_out", "-c", ckpt, "--device", "cpu", "-q",
                          "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["num_images"] == 2 and not r["verified"] and len(r["lossy_shards"]) == 2
