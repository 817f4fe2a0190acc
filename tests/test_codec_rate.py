"""Rate control (codec.rate), cut points and cuts (codec.fileinfo), and format 5's cut-or-damaged
verdict, through `codec.api` on a tiny seeded model (16x16 tiles, K = 6, two images of three
tiles in one file: four checked latent boundaries and the lossless end)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from diffcodec.codec import api, fileinfo
from diffcodec.codec.container import Container, pack, unpack
from diffcodec.codec.rate import SQUARED_ERROR_BLOCK, RateTarget, psnr_db, squared_error
from diffcodec.errors import DamagedFileError, DiffcodecError

from conftest import as_loaded, seeded_model, synthetic_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = {"mode": "progressive", "steps": 6, "chunk_bits": 4.0, "device": "cpu"}
SIZES = [(12, 14), (16, 16)]
PIXELS = sum(h * w for h, w in SIZES)


@pytest.fixture(scope="module")
def coded():
    """The model, the images, the whole progressive file, its cut points, and the worst image's
    PSNR of the decoder's image at each cut point."""
    loaded = as_loaded(*seeded_model(4, image_size=16))
    images = synthetic_images(SIZES, seed=2)
    full = api.encode(images, ["a", "b"], model=loaded, **SETTINGS)
    info = fileinfo.describe(full.data, loaded)
    worst = {p.stages: min(psnr_db(x, y) for x, y in zip(api.decode(full.data, model=loaded, upto=p.stages,
                                                                    device="cpu").images, images))
             for p in info.cut_points}
    return loaded, images, full, info, worst


def encode(coded, target: RateTarget | None, progress=None):
    loaded, images = coded[:2]
    return api.encode(images, ["a", "b"], model=loaded, target=target, progress=progress, **SETTINGS)


def test_the_whole_file_records_its_length_and_stages_and_has_cut_points(coded):
    loaded, images, full, info, worst = coded
    h = unpack(full.data).header
    assert (h.version, h.stages, h.stream_bytes) == (5, 7, len(unpack(full.data).payload))
    stages = [p.stages for p in info.cut_points]
    assert len(stages) >= 4 and stages[-1] == 7 and stages == sorted(stages)  # the lossless end last
    assert info.cut_short is False and not info.damage and info.file_stages == 7
    offsets = [p.offset for p in info.cut_points]
    assert offsets == sorted(offsets) and offsets[-1] == len(full.data)
    for p in info.cut_points[:-1]:  # `head -c OFFSET` keeps exactly those stages, and says it is cut short
        d = api.decode(full.data[: p.offset], model=loaded, device="cpu")
        assert d.stages == p.stages and d.truncated and not d.damage and not d.verified
        assert p.bits_per_pixel == pytest.approx(8 * p.cut_bytes / PIXELS)
    assert worst[7] == math.inf and all(worst[a] < worst[b] for a, b in zip(stages, stages[1:]))


def test_psnr_target_ends_at_the_first_boundary_that_reaches_it_and_stops_computing(coded):
    loaded, images, full, info, worst = coded
    points = info.cut_points
    middle = points[len(points) // 2]  # a lossy boundary with one before it
    before = points[len(points) // 2 - 1]
    target = RateTarget("psnr", (worst[before.stages] + worst[middle.stages]) / 2)
    calls = []
    r = encode(coded, target, progress=lambda *c: calls.append(c))
    assert r.encoded.stages == middle.stages and unpack(r.data).header.stages == middle.stages
    assert calls[-1] == ("encode", middle.stages, 7)  # stages 0 .. S - 1 coded, none after
    d = api.decode(r.data, model=loaded, device="cpu")
    assert d.stages == middle.stages and not d.truncated and not d.damage and not d.verified
    assert d.file_stages == middle.stages
    decoded = [psnr_db(x, y) for x, y in zip(d.images, images)]
    assert list(r.psnr) == decoded and min(decoded) >= target.value  # the encoder measured the decoder's image
    assert min(decoded) == worst[middle.stages]  # the same image as the whole file's stages up to there
    assert len(r.data) <= middle.cut_bytes + 4
    # a PSNR no lossy stage reaches: the whole, lossless file
    top = encode(coded, RateTarget("psnr", worst[points[-2].stages] + 10))
    assert top.encoded.complete and top.data == full.data and top.psnr == (math.inf, math.inf)


def test_size_and_bpp_targets_give_the_largest_file_that_fits(coded):
    loaded, images, full, info, worst = coded
    points = info.cut_points
    for j in range(len(points) - 1):  # a size target, then a bpp one, alternately
        budget = (points[j].cut_bytes + points[j + 1].cut_bytes) // 2
        for target in [(RateTarget("size", budget), RateTarget("bpp", 8 * budget / PIXELS))[j % 2]]:
            r = encode(coded, target)
            assert len(r.data) <= budget and r.encoded.stages == points[j].stages, (target, len(r.data))
            d = api.decode(r.data, model=loaded, device="cpu")
            assert d.stages == points[j].stages and not d.damage and not d.truncated
    assert encode(coded, RateTarget("size", len(full.data))).data == full.data  # the whole file fits


def test_a_size_below_the_smallest_file_is_one_line_naming_it(coded):
    loaded, images, full, info, worst = coded
    first = info.cut_points[0]
    for target in (RateTarget("size", 20), RateTarget("bpp", 0.01)):
        with pytest.raises(DiffcodecError) as e:
            encode(coded, target)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{target}: the smallest file these images make ends at "
                                                          f"stage {first.stages} of 7")
        assert "nothing written" in message and " bytes = " in message and " bpp" in message
    for kind, value in (("psnr", math.inf), ("bpp", -1.0), ("size", 2.5), ("quality", 3.0)):
        with pytest.raises(DiffcodecError):
            RateTarget(kind, value)
    with pytest.raises(DiffcodecError, match="apply to progressive files|applies to progressive files"):
        api.encode(coded[1], model=coded[0], mode="lossless", target=RateTarget("size", 100), device="cpu")


def test_full_length_damage_is_damage_and_a_short_file_is_cut_short(coded):
    """Format 5: a flipped byte anywhere in the payload of a file of its full length is damage
    (the pixel stage's included, the issue's case), never "cut short"; a shorter file is."""
    loaded, images, full, info, worst = coded
    start = len(full.data) - len(unpack(full.data).payload)
    pixel_stage = info.cut_points[-2].offset  # after the last latent boundary: the pixel stage's bytes
    with pytest.raises(DamagedFileError, match="f.dfc: the file is damaged .* no intact stage before the damage; nothing written"):
        bad = bytearray(full.data)
        bad[start + 1] ^= 0x10  # the first group: no intact stage, nothing to decode, but damage, not a refusal
        api.decode(bytes(bad), model=loaded, device="cpu", where="f.dfc")
    for pos in sorted({(start + pixel_stage) // 2, pixel_stage - 2, pixel_stage + 5, (pixel_stage + len(full.data)) // 2}):
        bad = bytearray(full.data)
        bad[pos] ^= 0x10
        d = api.decode(bytes(bad), model=loaded, device="cpu")
        assert d.damage and not d.truncated and not d.verified, pos
    assert "pixel stage" in d.damage or "closing check" in d.damage
    for length in (pixel_stage, len(full.data) - 1):
        d = api.decode(full.data[:length], model=loaded, device="cpu")
        assert d.truncated and not d.damage and d.stages == info.cut_points[-2].stages


def test_cut_decodes_as_decode_bits_of_the_original(coded):
    loaded, images, full, info, worst = coded
    for p in info.cut_points[:-1]:
        c = fileinfo.cut(full.data, loaded, stages=p.stages)
        assert len(c.data) == p.cut_bytes and unpack(c.data).header.stages == p.stages
        mine = api.decode(c.data, model=loaded, device="cpu")
        theirs = api.decode(full.data, model=loaded, device="cpu", num_bits=c.bits_equivalent)
        assert mine.stages == theirs.stages == p.stages and not mine.truncated and not mine.damage
        assert all(np.array_equal(x, y) for x, y in zip(mine.images, theirs.images))
    # a cut file cuts further; its cut points are the original's below it
    c = fileinfo.cut(full.data, loaded, stages=info.cut_points[-2].stages)
    again = fileinfo.describe(c.data, loaded)
    assert [p.stages for p in again.cut_points] == [p.stages for p in info.cut_points[:-1]]
    assert fileinfo.cut(c.data, loaded, stages=info.cut_points[0].stages).data == \
        fileinfo.cut(full.data, loaded, stages=info.cut_points[0].stages).data
    budget = (info.cut_points[1].cut_bytes + info.cut_points[2].cut_bytes) // 2
    for target in (RateTarget("size", budget), RateTarget("bpp", 8 * budget / PIXELS)):
        assert fileinfo.cut(full.data, loaded, target=target).point.stages == info.cut_points[1].stages
    # a format 4 file (no length recorded) cuts into a format 5 one
    v4 = unpack(full.data)
    old = pack(Container(replace(v4.header, version=4), v4.payload))
    described = fileinfo.describe(old, loaded)
    assert described.cut_short is None and described.whole and described.declared_bytes is None
    assert fileinfo.cut(old, loaded, stages=info.cut_points[1].stages).data == \
        fileinfo.cut(full.data, loaded, stages=info.cut_points[1].stages).data


def test_cut_refuses_what_it_cannot_cut(coded):
    loaded, images, full, info, worst = coded
    points = [p.stages for p in info.cut_points]
    inside = next(n for n in range(1, 8) if n not in points)
    cases = [
        ({"stages": 7}, "past the end"),
        ({"stages": inside}, "inside a checked group"),
        ({"target": RateTarget("size", len(full.data))}, "past the end"),
        ({"target": RateTarget("size", 10)}, "the smallest cut of this file"),
    ]
    for kw, phrase in cases:
        with pytest.raises(DiffcodecError, match=phrase) as e:
            fileinfo.cut(full.data, loaded, where="f.dfc", **kw)
        assert "\n" not in str(e.value) and str(e.value).startswith("f.dfc: ")
    lossy = fileinfo.cut(full.data, loaded, stages=points[-2]).data
    with pytest.raises(DiffcodecError, match=f"past the end: the file ends at stage {points[-2]}"):
        fileinfo.cut(lossy, loaded, stages=points[-2])
    bad = bytearray(full.data)
    bad[len(full.data) - len(unpack(full.data).payload) + 2] ^= 0x04  # the first group
    with pytest.raises(DiffcodecError, match="damaged"):
        fileinfo.cut(bytes(bad), loaded, stages=points[-2])
    assert fileinfo.describe(bytes(bad), loaded).damage
    lossless = api.encode(images[:1], model=loaded, steps=2, bootstrap=False, compute_bound=False, device="cpu")
    with pytest.raises(DiffcodecError, match="only progressive files can be cut"):
        fileinfo.cut(lossless.data, loaded, stages=1)
    described = fileinfo.describe(lossless.data, loaded)
    assert described.mode == "bits-back lossless" and described.num_steps == 2 and not described.cut_points


def test_squared_error_in_blocks_is_the_float_sum():
    """`squared_error` sums a block of values at a time, exactly: the integer numpy's float64
    differences give, and so `psnr_db` is their PSNR to the last bit, across block edges."""
    rng = np.random.default_rng(5)
    for n in (1, 7, SQUARED_ERROR_BLOCK, SQUARED_ERROR_BLOCK + 1, 3 * SQUARED_ERROR_BLOCK - 5):
        a = rng.integers(0, 256, n, dtype=np.uint8)
        b = np.clip(a.astype(np.int64) + rng.integers(-40, 41, n), 0, 255).astype(np.uint8)
        diff = a.astype(np.float64) - b.astype(np.float64)
        assert squared_error(a, b) == int(np.sum(diff**2))
        mse = float(np.mean(diff**2))
        assert psnr_db(a, b) == (math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse))
    full = np.full((3, 5, 3), 255, np.uint8)
    assert squared_error(full, np.zeros_like(full)) == 255**2 * 45 and psnr_db(full, full) == math.inf
    for bad in ((full, full[:2]), (full, full.astype(np.int16))):
        with pytest.raises(ValueError, match="squared_error: expected two uint8 arrays"):
            squared_error(*bad)
