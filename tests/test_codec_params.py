"""The compact parameter blocks of format 4 files: `fields` (varints, presence masks), the
progressive block version 3 (`progressive.params`) and the bits-back block version 2
(`bitsback.params`). Versions 1 and 2 of the progressive block and version 1 of the
bits-back block keep their fixed layouts (tests/test_codec_container.py, test_codec_progressive.py)."""

from __future__ import annotations

import dataclasses

import pytest

from diffcodec.codec.bitsback.chain import INIT_SEED
from diffcodec.codec.bitsback.params import COMPACT_FIELDS as BB_FIELDS
from diffcodec.codec.bitsback.params import COMPACT_MARK, BitsBackParams
from diffcodec.codec.fields import Reader, read_fields, unzigzag, varint, zigzag
from diffcodec.codec.progressive.params import COMPACT_FIELDS, ProgressiveParams
from diffcodec.errors import DiffcodecError


def test_varints_and_zigzag():
    for n, raw in [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"), (2**32 - 1, b"\xff\xff\xff\xff\x0f")]:
        assert varint(n) == raw
        r = Reader(raw + b"!", "f")
        assert r.varint("x") == n and r.pos == len(raw)
    assert varint(2**63, 1 << 64) == b"\x80" * 9 + b"\x01"
    with pytest.raises(ValueError):
        varint(2**32)
    with pytest.raises(DiffcodecError, match=r"f: corrupt header \(x field too long\)"):
        Reader(b"\x80\x80\x80\x80\x10", "f").varint("x")  # 2^32: above the default limit
    with pytest.raises(DiffcodecError, match=r"f: truncated file \(ends inside the x\)"):
        Reader(b"\x80", "f").varint("x")
    with pytest.raises(DiffcodecError, match=r"f: corrupt some block \(ends inside the x\)"):
        Reader(b"\x80", "f", "some block").varint("x")
    assert [unzigzag(zigzag(n)) for n in range(-40, 40)] == list(range(-40, 40))
    assert zigzag(-16) == 31 and zigzag(0) == 0 and zigzag(1) == 2


# ------------------------------------------------------------------- progressive, version 3


def test_progressive_v3_default_block_is_two_bytes():
    """Versions 5 (what this diffcodec writes), 4 and 3 share the compact layout; each version's
    default pad (8 from version 5, 2 before) costs nothing, the other one two bytes."""
    assert ProgressiveParams().pack() == b"\x06\x00"
    assert ProgressiveParams(exact=True).pack() == b"\x06\x01"  # the mask bit alone
    assert ProgressiveParams(exact=True, num_steps=10).pack() == b"\x06\x05\x0a"
    assert ProgressiveParams.unpack(b"\x06\x01") == ProgressiveParams(exact=True)
    assert ProgressiveParams.unpack(b"\x05\x01") == ProgressiveParams(exact=True, version=5)
    assert ProgressiveParams().pad_bits == 8.0 and ProgressiveParams(version=4).pad_bits == 2.0
    assert ProgressiveParams(exact=True, num_steps=10, version=3).pack() == b"\x03\x05\x0a"
    assert ProgressiveParams.unpack(b"\x03\x01") == ProgressiveParams(exact=True, version=3)
    assert ProgressiveParams.unpack(b"\x04\x01") == ProgressiveParams(exact=True, version=4)
    assert ProgressiveParams.unpack(b"\x04\x01").pad_bits == 2.0  # a version 4 file's pad, as written
    assert ProgressiveParams(exact=True, pad_bits=2.0).pack() == b"\x06\x81\x01\x08"  # mask bits 0 and 7, 2 x 4
    assert ProgressiveParams(exact=True, version=4, pad_bits=8.0).pack() == b"\x04\x81\x01\x20"


def test_progressive_v3_every_field_round_trips_alone_and_together():
    """Each field of the table set to a non-default value round trips (tiles and tile size
    come from the caller; payload_bits is not stored)."""
    others = {"exact": True, "network_float64": True, "num_steps": 1000, "chunk_bits": 63.75, "log2_candidates": 3,
              "seed": 2**32 - 1, "spacing": "uniform", "pad_bits": 0.25, "snap_log2": -30, "clip_denoised": False,
              "check_bits": 0, "check_min_bits": 65535, "check_growth": 1.5, "min_stage_bits": 40.0,
              "region_tiles": 5}
    assert set(others) == {name for name, _ in COMPACT_FIELDS}  # the table covers every stored field
    for name, value in others.items():
        p = ProgressiveParams(**{name: value}, num_tiles=7, tile_size=16)
        block = p.pack()
        assert ProgressiveParams.unpack(block, num_tiles=7, tile_size=16) == p, name
        assert block[0] == 6 and len(block) <= 2 + 5 + 1
        for version in (3, 4) if name != "region_tiles" else ():  # the same layout (the pad's default aside)
            old = dataclasses.replace(p, version=version, pad_bits=p.pad_bits if name == "pad_bits" else 2.0)
            assert ProgressiveParams.unpack(old.pack(), num_tiles=7, tile_size=16) == old
            assert old.pack()[1:] == block[1:]
    every = ProgressiveParams(**{**others, "region_tiles": 2}, num_tiles=2)  # one region (min_stage_bits is set)
    assert ProgressiveParams.unpack(every.pack(), num_tiles=2) == every
    assert ProgressiveParams.unpack(ProgressiveParams(payload_bits=800).pack()).payload_bits == 0


def test_progressive_v3_corrupt_blocks_are_one_line_errors():
    good = ProgressiveParams(num_steps=10, seed=5).pack()
    cases = {
        "fields unknown to this diffcodec": b"\x03\x80\x80\x02",  # mask bit 15: beyond the table
        "ends inside the num_steps": good[:2],
        "bytes after its fields": good + b"\x00",
        r"num_steps must be 1..65535": b"\x03\x04\x00",  # K = 0
        "spacing code 9": b"\x03\x40\x09",
        "chunk_bits must be": b"\x03\x08\x00",  # chunk bits 0
        "block version 7": b"\x07\x00",
    }
    for expected, block in cases.items():
        with pytest.raises(DiffcodecError, match=expected) as e:
            ProgressiveParams.unpack(block, "f.dfc")
        assert "\n" not in str(e.value) and str(e.value).startswith("f.dfc: ")


def test_progressive_versions_1_and_2_keep_their_fixed_layouts():
    p1 = ProgressiveParams(check_bits=0, check_growth=0.5, version=1, num_tiles=3, payload_bits=999)
    p2 = ProgressiveParams(version=2, num_tiles=3, payload_bits=999)
    assert len(p1.pack()) == 23 and len(p2.pack()) == 27
    assert ProgressiveParams.unpack(p1.pack()) == p1 and ProgressiveParams.unpack(p2.pack()) == p2


# --------------------------------------------------------------------- bits-back, version 2

BB = BitsBackParams(
    resolution_bits=6, window_sigmas=5, prior_sigmas=8, snap_log2=-16, clip_denoised=True, network_float64=False,
    exact=True, threads=0, spacing="quadratic", init_seed=INIT_SEED, init_words=4864, kept_words=4864, num_tiles=6,
    num_symbols=6 * 3072 * 101, chunks=(1,), bootstrap_tiles=5, bootstrap_block=ProgressiveParams(exact=True, version=3).pack(),
    num_steps=100, bootstrap_bytes=4440,
)


def test_bitsback_compact_default_block():
    """The default encoder's block (exact, K = 100 quadratic, default grid, 5 bootstrap tiles):
    mask, initial words, bootstrap tiles, one chunk, the bootstrap's length and block."""
    block = BB.pack()
    assert block[0] == COMPACT_MARK == 0x82
    assert block == bytes([0x82, 0x14]) + varint(4864) + b"\x05" + b"\x01\x01" + varint(4440) + b"\x02\x03\x01"
    assert len(block) == 12 and BitsBackParams.unpack(block) == BB
    legacy = dataclasses.replace(BB, block_version=1, num_steps=0, bootstrap_bytes=0,
                                 bootstrap_block=ProgressiveParams(exact=True, version=2, num_tiles=5).pack())
    assert len(legacy.pack()) == 40 + 2 + 5 + 27


def test_bitsback_compact_every_field_round_trips():
    others = {"exact": False, "num_steps": 7, "init_words": 9, "unkept_words": 2, "bootstrap_tiles": 0,
              "network_float64": True, "spacing": "uniform-linspace", "clip_denoised": False, "threads": 12,
              "resolution_bits": 10, "window_sigmas": 64, "prior_sigmas": 1, "snap_log2": -30, "init_seed": 2**64 - 1}
    assert set(others) == {name for name, _ in BB_FIELDS}
    plain = dataclasses.replace(BB, num_tiles=1, bootstrap_tiles=0, bootstrap_block=b"", bootstrap_bytes=0,
                                num_symbols=3072 * 101)
    for name, value in others.items():
        if name == "unkept_words":
            p = dataclasses.replace(plain, kept_words=plain.init_words - value)
        elif name == "init_words":
            p = dataclasses.replace(plain, init_words=value, kept_words=value)
        elif name == "bootstrap_tiles":
            continue  # 0 is the default; the default block above has 5
        else:
            p = dataclasses.replace(plain, **{name: value})
        p = dataclasses.replace(p, num_symbols=p.num_tiles * 3 * 16 * 16 * (p.num_steps + 1))
        assert BitsBackParams.unpack(p.pack(), tile_size=16) == p, name
    chunks = dataclasses.replace(plain, chunks=(1, 2, 300, 70000), num_tiles=70303,
                                 num_symbols=70303 * 3072 * 101)
    assert BitsBackParams.unpack(chunks.pack()) == chunks  # chunks above 65535 fit a compact block


def test_bitsback_compact_corrupt_blocks_are_one_line_errors():
    good = BB.pack()
    cases = {
        "fields unknown to this diffcodec": bytes([0x82, 0x80, 0x80, 0x01]),
        "ends inside the chunk count": bytes([0x82, 0x00]),
        "3 chunks announced": bytes([0x82, 0x00, 0x03, 0x01]),
        "bytes after its fields": good + b"\x00",
        "resolution_bits must be in 1..10": bytes([0x82, 0x80, 0x04, 0x00, 0x01, 0x01]),
        "chunk table, word counts or steps": bytes([0x82, 0x00, 0x01, 0x00]),  # a chunk of 0 tiles
        "word counts": bytes([0x82, 0x0c, 0x01, 0x02, 0x01, 0x01]),  # 2 unkept of 1 initial word
        "bootstrap section without": bytes([0x82, 0x10, 0x02, 0x00, 0x05, 0x00]),
        "ends inside the bootstrap section": good[:-1],
    }
    for expected, block in cases.items():
        with pytest.raises(DiffcodecError, match=expected) as e:
            BitsBackParams.unpack(block, "f.dfc")
        assert "\n" not in str(e.value) and str(e.value).startswith("f.dfc: ")
    with pytest.raises(ValueError, match="cover the tiles"):
        dataclasses.replace(BB, num_tiles=7).pack()
    with pytest.raises(ValueError, match="needs K"):
        dataclasses.replace(BB, num_steps=0).pack()
    assert read_fields(Reader(b"\x00", "f"), {"a": 1}, (("a", "u"),)) == {"a": 1}


def test_the_encoder_codes_more_than_128_tiles_in_regions_of_128():
    """`with_regions` (what `api.encode` applies to its progressive parameters): regions of
    REGION_TILES where there are more tiles, nothing otherwise (one region is the same stream);
    older stream versions and streams that skip stages are left in one region."""
    from diffcodec.codec import api
    from diffcodec.codec.progressive.params import REGION_TILES, with_regions

    assert REGION_TILES == 128
    assert with_regions(ProgressiveParams(num_tiles=128)).region_tiles == 0
    big = with_regions(ProgressiveParams(num_tiles=384))
    assert (big.region_tiles, big.num_regions) == (128, 3)
    assert [(r.start, r.stop) for r in big.regions()] == [(0, 128), (128, 256), (256, 384)]
    assert ProgressiveParams.unpack(big.pack(), num_tiles=384) == big
    assert with_regions(ProgressiveParams(num_tiles=384, version=5, pad_bits=8.0)).region_tiles == 0
    assert with_regions(ProgressiveParams(num_tiles=384, min_stage_bits=4.0)).region_tiles == 0
    made = api._progressive_params(None, 50, "quadratic", 14.0, False, True, 129, 32)
    assert (made.region_tiles, made.num_regions, [r.stop for r in made.regions()]) == (128, 2, [128, 129])
    with pytest.raises(ValueError, match="skips no stage"):
        ProgressiveParams(num_tiles=384, region_tiles=128, min_stage_bits=4.0)
    with pytest.raises(ValueError, match="from version 6 on"):
        ProgressiveParams(region_tiles=2, version=5)
