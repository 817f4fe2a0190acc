"""Fuzzing the decoder: no damaged, cut or edited `.dfc` file ever gives a silent wrong image.

Two small files made by a tiny seeded model with 16x16 tiles (one 12x14 image, one padded
tile; exact arithmetic): a lossless one (K = 3, no bootstrap) and a progressive one (K = 3,
format 5: its header records the payload's length). Each case changes the file
deterministically and runs ``diffcodec decode`` on it in-process:

- byte flips (one bit per case) spread over the whole file, header and payload;
- truncations at lengths spread over the whole file;
- field edits with the checksum recomputed (the lossless file's CRC-32 trailer, the
  progressive file's header CRC-32), so that the edit reaches the field checks behind it:
  every byte of the format 4 header from the version byte to the payload's length (lossless)
  or the header CRC (progressive): mode byte, model identity, probe, image table, pixel
  checksum, the mode block's length and fields.

Every case must end in one of: exit 0 with the original pixels; exit 0 with a progressive
prefix that the tool reports as lossy and cut short ("lossy: stage ...", "cut short (N of M
bytes)"), only for a file shorter than it was; exit 3 with the reconstruction from a damaged
progressive file's intact stages, said on one line ("the file is damaged"); or a non-zero exit
with one line on stderr and nothing written. A file of its full length is never reported as
cut short: a flipped byte anywhere in a progressive payload is damage (exit 3), or leaves the
decoded pixels exact (a bit the stream does not use).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffcodec.checkpoint import load_checkpoint
from diffcodec.cli import main
from diffcodec.codec.container import unpack
from diffcodec.codec.fields import varint
from tests.conftest import seeded_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    ckpt = seeded_checkpoint(tmp / "tiny.pt")
    yy, xx = np.mgrid[0:12, 0:14]
    img = np.stack([xx * 10, yy * 12, (xx * yy) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(tmp / "img.png")
    out = {}
    for mode, extra in (("lossless", ["--steps", 3, "--lossless", "--no-bootstrap", "--no-bound"]),
                        ("progressive", ["--progressive", "--steps", 3, "--chunk-bits", 4])):
        path = tmp / f"{mode}.dfc"
        code = main([str(a) for a in ["encode", tmp / "img.png", "-o", path, "-c", ckpt, "-q", "--device", "cpu",
                                      *extra]])
        assert code == 0
        out[mode] = path.read_bytes()
    return tmp, ckpt, img, out


def payload_start(data: bytes) -> int:
    """Where the payload begins (lossless: before it, its length as a varint; after it, the CRC-32)."""
    c = unpack(data)
    if c.header.mode == 1:
        return len(data) - len(c.payload)
    return len(data) - 4 - len(c.payload)


def fields_end(data: bytes) -> int:
    """Where the header's fields end: before the lossless payload's length, or the progressive header's CRC."""
    c = unpack(data)
    start = payload_start(data)
    return start - (len(varint(len(c.payload), 1 << 64)) if c.header.mode == 0 else 4)


def with_crc(data: bytearray, mode: int, header_end: int) -> bytes:
    """The edited file with its checksum recomputed (lossless: the trailer; progressive: the header's)."""
    if mode == 0:
        data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])) & 0xFFFFFFFF)
    else:
        data[header_end - 4 : header_end] = struct.pack("<I", zlib.crc32(bytes(data[: header_end - 4])) & 0xFFFFFFFF)
    return bytes(data)


def cases(data: bytes, mode: int) -> list[tuple[str, bytes]]:
    n, start = len(data), payload_start(data)
    out = []
    for pos in np.unique(np.linspace(0, n - 1, 50).astype(int)):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        out.append((f"flip byte {pos}", bytes(bad)))
    for length in np.unique(np.linspace(0, n - 1, 20).astype(int)):
        out.append((f"cut to {length} bytes", data[:length]))
    assert data[:4] in (b"DFC\x04", b"DFC\x05"), "a format 4 (lossless) or 5 (progressive) file"
    header_fields = range(3, fields_end(data))  # the version byte on, before the payload's length / the CRC
    for pos in header_fields:  # every field byte, a small and a large change in turn
        bad = bytearray(data)
        bad[pos] = data[pos] ^ (0x01 if pos % 2 else 0xFF)
        out.append((f"byte {pos} := {bad[pos]} (CRC fixed)", with_crc(bad, mode, start)))
    bad = bytearray(data)  # the one informational bit: "encoded on a CUDA device" (the decoder runs --device cpu)
    bad[4] ^= 0x80
    out.append(("the CUDA bit flipped (CRC fixed)", with_crc(bad, mode, start)))
    return out


@pytest.fixture
def checkpoint_read_once(monkeypatch):
    """The decoder loads its checkpoint once for all cases (the cases change the .dfc file only)."""
    from diffcodec.codec import api

    cache: dict = {}

    def load(path, device="cpu"):
        key = (str(path), str(device))
        if key not in cache:
            cache[key] = load_checkpoint(path, device=device)
        return cache[key]

    monkeypatch.setattr(api, "load_checkpoint", load)


@pytest.mark.parametrize("mode", ["lossless", "progressive"])
def test_no_case_gives_a_silent_wrong_image(files, mode, capsys, checkpoint_read_once):
    tmp, ckpt, img, made = files
    data = made[mode]
    outcomes: dict[str, int] = {}
    kinds: list[str] = []
    for i, (what, bad) in enumerate(cases(data, 0 if mode == "lossless" else 1)):
        src, dst = tmp / f"case_{mode}.dfc", tmp / f"out_{mode}_{i}.png"
        src.write_bytes(bad)
        code = main(["decode", str(src), "-o", str(dst), "-c", str(ckpt), "-q", "--device", "cpu"])
        stdout, err = capsys.readouterr()
        lines = err.strip().splitlines()
        if code == 0:
            decoded = np.asarray(Image.open(dst))
            if np.array_equal(decoded, img):
                kind = "exact"
            else:  # only a progressive prefix may differ, and the tool must say it is one
                assert mode == "progressive" and "lossy: stage" in stdout, f"{what}: a wrong image with exit 0"
                assert what.startswith("cut to"), f"{what}: a full-length file reported as lossy with exit 0"
                assert f"the file is cut short ({len(bad):,} of {len(data):,} bytes)" in stdout, (what, stdout)
                kind = "prefix"
        elif code == 3:
            assert mode == "progressive" and (dst.exists() or "nothing written" in err), what
            assert not what.startswith("cut to") or "check" in lines[0], f"{what}: a cut file called damaged"
            assert len(lines) == 1 and "the file is damaged" in lines[0] and "intact stage" in lines[0], (what, err)
            kind = "damaged"
        else:
            assert code == 2 and not dst.exists(), f"{what}: exit {code} or an image written"
            assert len(lines) == 1 and lines[0].startswith("diffcodec: error:"), (what, err)
            assert "Traceback" not in err
            kind = "refused"
        outcomes[kind] = outcomes.get(kind, 0) + 1
        kinds.append(kind)
    # the cases reach every outcome the format allows, not only the header's CRC
    assert outcomes.get("exact", 0) >= 1 and outcomes.get("refused", 0) >= 20, outcomes
    if mode == "progressive":
        assert outcomes.get("prefix", 0) >= 5 and outcomes.get("damaged", 0) >= 5, outcomes
        flips = [kind for (what, _), kind in zip(cases(data, 1), kinds) if what.startswith("flip")]
        assert "prefix" not in flips and flips.count("damaged") >= 5, flips
