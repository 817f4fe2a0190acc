"""container.py: the .dfc byte layout (pinned), and defensive parsing of bad files."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest

from diffcodec.codec.bitsback.params import BitsBackParams
from diffcodec.codec.container import (
    MAGIC,
    MODE_BITSBACK,
    MODE_PROGRESSIVE,
    VERSION,
    Container,
    Header,
    ImageEntry,
    check_model,
    pack,
    pixel_checksum,
    unpack,
)
from diffcodec.errors import DiffcodecError
from diffcodec.outputs import write_bytes_atomic

PARAMS = BitsBackParams(
    resolution_bits=6, window_sigmas=8, prior_sigmas=8, snap_log2=-16, clip_denoised=True, network_float64=False, exact=True,
    threads=0, spacing="uniform-linspace",
    init_seed=99, init_words=1000, kept_words=700, num_tiles=3, num_symbols=3 * 3072 * 11, chunks=(1, 2),
)


def sample_container(payload: bytes = bytes(range(40))) -> Container:
    header = Header(
        mode=MODE_BITSBACK, device="cpu", fingerprint="0123456789abcdef", schedule="linear", num_timesteps=1000,
        num_steps=10, var_type="fixedlarge", tile_size=32,
        images=(ImageEntry(37, 45, "a.png"), ImageEntry(32, 32, "cifar[1]")),
        pixel_sha=bytes.fromhex("a1b2c3d4e5f60718"), params=PARAMS.pack(), contract=1, probe=b"\x01\x02\x03\x04",
    )
    return Container(header, payload)


# Pinned (format version 2): changing the layout must be a conscious format-version decision.
GOLDEN_SHA256 = "09304d3e0e59102547e1f19988c4d2d81276033981b40f5cbdac1c375b17cfc1"


TABLE_AT = 53  # the image table's offset in sample_container's file (after the tile size, contract and probe)


def test_layout_matches_the_byte_table():
    data = pack(sample_container())
    assert data[:4] == MAGIC and data[4] == VERSION == 3 and data[5] == MODE_BITSBACK
    assert data[8:16] == bytes.fromhex("0123456789abcdef")
    assert data[16] == 3 and data[17:20] == b"cpu"
    assert data[20] == 6 and data[21:27] == b"linear"
    assert struct.unpack_from("<II", data, 27) == (1000, 10)
    assert data[35] == 10 and data[36:46] == b"fixedlarge" and struct.unpack_from("<H", data, 46) == (32,)
    assert data[48] == 1 and data[49:53] == b"\x01\x02\x03\x04"  # contract version 1 and its probe digest
    # image table (varints): 2 images in 2 size runs, then 2 name runs: one name, one series "cifar[1]"
    table = bytes([2, 2, 1, 37, 45, 1, 32, 32, 2, 0, 5]) + b"a.png" + bytes([1, 1, 1, 5]) + b"cifar"
    assert data[TABLE_AT : TABLE_AT + len(table)] == table
    assert data[TABLE_AT + len(table) : TABLE_AT + len(table) + 8] == bytes.fromhex("a1b2c3d4e5f60718")
    block = PARAMS.pack()
    assert len(block) == 40 + 2 * 2
    assert data[-4 - 40 - 8 - len(block) - 4 : -4 - 40 - 8 - len(block)] == struct.pack("<I", len(block))
    assert struct.unpack_from("<Q", data, len(data) - 4 - 40 - 8)[0] == 40
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_golden_bytes():
    assert hashlib.sha256(pack(sample_container())).hexdigest() == GOLDEN_SHA256


def test_round_trip_and_params():
    c = sample_container()
    back = unpack(pack(c))
    assert back == c
    assert BitsBackParams.unpack(back.header.params) == PARAMS


def test_every_truncation_is_a_one_line_error():
    data = pack(sample_container())
    for cut in range(len(data)):
        with pytest.raises(DiffcodecError) as e:
            unpack(data[:cut], "f.dfc")
        message = str(e.value)
        assert "\n" not in message and message.startswith("f.dfc: ")
        assert ("truncated" in message) or ("bad magic" in message) or cut < 4


def test_bad_magic_version_mode_crc_and_trailing_bytes():
    data = bytearray(pack(sample_container()))
    with pytest.raises(DiffcodecError, match="bad magic"):
        unpack(b"PNG!" + bytes(data[4:]))
    wrong_version = bytes(data[:4]) + bytes([4]) + bytes(data[5:])
    with pytest.raises(DiffcodecError, match=r"version 4 \(written by a newer diffcodec\); this diffcodec reads versions 1 to 3"):
        unpack(wrong_version)
    with pytest.raises(DiffcodecError, match="unknown coding mode 9"):
        unpack(bytes(data[:5]) + bytes([9]) + bytes(data[6:]))
    flipped = bytearray(data)
    flipped[-10] ^= 0x40  # a payload byte
    with pytest.raises(DiffcodecError, match="CRC-32"):
        unpack(bytes(flipped))
    with pytest.raises(DiffcodecError, match="unexpected bytes"):
        unpack(bytes(data) + b"\x00")


def test_random_corruption_never_escapes_as_another_exception():
    data = pack(sample_container())
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = bytearray(data)
        for pos in rng.integers(0, len(bad), size=rng.integers(1, 4)):
            bad[pos] = int(rng.integers(0, 256))
        if bytes(bad) == data:
            continue
        with pytest.raises(DiffcodecError):
            unpack(bytes(bad))


def test_corrupt_params_block():
    with pytest.raises(DiffcodecError, match="parameter block"):
        BitsBackParams.unpack(PARAMS.pack()[:-1])
    bad = BitsBackParams(**{**PARAMS.__dict__, "kept_words": 2000})  # more kept than initial words
    with pytest.raises(DiffcodecError, match="word counts"):
        BitsBackParams.unpack(bad.pack())


def test_bootstrap_section_round_trips_and_is_optional():
    """Files without bootstrap keep the 0.1 block byte for byte; with it, a u32 tile count and
    the progressive block follow the chunk table, and the chunks cover the other tiles."""
    assert len(PARAMS.pack()) == 40 + 2 * 2 and BitsBackParams.unpack(PARAMS.pack()).bootstrap_tiles == 0
    boot = BitsBackParams(**{**PARAMS.__dict__, "num_tiles": 5, "bootstrap_tiles": 2, "bootstrap_block": b"p" * 23})
    block = boot.pack()
    assert len(block) == 40 + 2 * 2 + 4 + 1 + 23
    assert struct.unpack_from("<IB", block, 44) == (2, 23)
    assert BitsBackParams.unpack(block) == boot
    with pytest.raises(DiffcodecError, match="word counts"):  # chunks (1, 2) + 2 bootstrap tiles != 3 tiles
        BitsBackParams.unpack(BitsBackParams(**{**boot.__dict__, "num_tiles": 3}).pack())
    for cut in (1, 5, 24):
        with pytest.raises(DiffcodecError, match="bootstrap section"):
            BitsBackParams.unpack(block[:-cut])
    with pytest.raises(DiffcodecError, match="bootstrap section"):
        BitsBackParams.unpack(block[:44] + struct.pack("<IB", 0, 23) + block[49:])  # zero tiles announced
    with pytest.raises(ValueError, match="parameter block"):
        BitsBackParams(**{**PARAMS.__dict__, "bootstrap_tiles": 1}).pack()  # tiles without their block


def test_progressive_mode_is_accepted_with_its_own_block():
    c = sample_container()
    header = Header(**{**c.header.__dict__, "mode": MODE_PROGRESSIVE, "params": b"anything"})
    assert unpack(pack(Container(header, b"xyz"))).header.params == b"anything"


def test_check_model_names_both_fingerprints():
    header = sample_container().header
    check_model(header, "0123456789abcdef")
    with pytest.raises(DiffcodecError, match="encoded with model 0123456789abcdef, this checkpoint is ffffffffffffffff"):
        check_model(header, "ffffffffffffffff")


def test_pixel_checksum_depends_on_pixels_and_sizes():
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0] = 1
    assert pixel_checksum([a]) != pixel_checksum([b])
    assert pixel_checksum([a]) != pixel_checksum([a.reshape(6, 4, 3)])
    assert len(pixel_checksum([a])) == 8


def test_written_file_reads_back_and_is_never_overwritten_silently(tmp_path):
    path = tmp_path / "x.dfc"
    data = pack(sample_container())
    write_bytes_atomic(path, data)
    assert path.stat().st_size == len(data)
    with pytest.raises(DiffcodecError, match="already exists"):
        write_bytes_atomic(path, pack(sample_container(b"other")))
    assert unpack(path.read_bytes()) == sample_container()
    write_bytes_atomic(path, pack(sample_container(b"other!!!")), force=True)
    assert unpack(path.read_bytes()).payload == b"other!!!"


def as_version_1(data: bytes, images: tuple[ImageEntry, ...]) -> bytes:
    """The same file in the 0.1 layout: version byte 1, no contract byte or probe digest, and a
    per-image table, CRC redone."""
    table_v2_len = len(pack_table(images))
    v1 = struct.pack("<I", len(images)) + b"".join(
        struct.pack("<IIH", im.height, im.width, len(im.name.encode())) + im.name.encode() for im in images)
    body = data[:4] + b"\x01" + data[5 : TABLE_AT - 5] + v1 + data[TABLE_AT + table_v2_len : -4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def pack_table(images):
    from diffcodec.codec.container import _pack_image_table

    return _pack_image_table(images)


def test_version_1_files_are_still_read():
    c = sample_container()
    old = as_version_1(pack(c), c.header.images)
    assert old[4] == 1 and len(old) == len(pack(c)) - 5 - len(pack_table(c.header.images)) + 4 + 10 * 2 + 5 + 8
    assert unpack(old).header == Header(**{**c.header.__dict__, "contract": 0, "probe": b"", "version": 1})


def with_images(images: tuple[ImageEntry, ...]) -> Container:
    c = sample_container()
    return Container(Header(**{**c.header.__dict__, "images": images}), c.payload)


def test_image_table_is_run_length_coded_and_round_trips():
    shard = "cifar10_test_00000-04999.npz"
    names = [f"{shard}[{i}]" for i in range(5000)] + [f"next.npz[{i}]" for i in range(5000)]
    many = tuple(ImageEntry(32, 32, n) for n in names)
    # N, R, (count, h, w), runs, 2 x (kind, count, first, length, stem): nothing per image
    assert len(pack_table(many)) == 2 + 1 + 4 + 1 + (1 + 2 + 1 + 1 + len(shard)) + (1 + 2 + 1 + 1 + len("next.npz"))
    assert unpack(pack(with_images(many))).header.images == many
    assert len(pack_table(tuple(ImageEntry(32, 32) for _ in range(10_000)))) == 2 + 1 + 4 + 1 + 3
    assert len(pack_table((ImageEntry(32, 32, "x.png"),))) == 13  # v1: 4 + 10 + 5
    mixed = (ImageEntry(32, 32, "a[0]"), ImageEntry(32, 32, "a[1]"), ImageEntry(32, 32, "a[3]"),
             ImageEntry(9, 9, ""), ImageEntry(9, 9, ""), ImageEntry(32, 32, "a[01]"), ImageEntry(32, 32, "b[2]x"),
             ImageEntry(32, 32, "ü[7]"), ImageEntry(32, 32, "[0]"), ImageEntry(32, 32, "a[4294967296]"),
             ImageEntry(65536, 1, "é" * 127))
    assert unpack(pack(with_images(mixed))).header.images == mixed  # exact names, whatever they look like
    long = (ImageEntry(32, 32, "é" * 200),)  # names keep at most 255 bytes, whole characters
    assert unpack(pack(with_images(long))).header.images[0].name == "é" * 127


def test_corrupt_image_tables_are_one_line_errors():
    c = with_images(tuple(ImageEntry(32, 32, f"s[{i}]") for i in range(3)))
    data = pack(c)
    table = bytes([3, 1, 3, 32, 32, 1, 1, 3, 0, 1]) + b"s"
    assert data[TABLE_AT : TABLE_AT + len(table)] == table

    def patched(at: int, values: bytes) -> bytes:
        body = bytearray(data[:-4])
        body[TABLE_AT + at : TABLE_AT + at + len(values)] = values
        return bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

    cases = {
        "no images": patched(0, b"\x00"),
        "at most 16777216": patched(0, b"\xff\xff\xff\xff\x0f"),
        "field too long": patched(0, b"\xff\xff\xff\xff\xff\x01"),
        "size runs for 3": patched(1, b"\x00"),
        "size runs cover 2 of 3": patched(2, b"\x02"),
        "size 0x32": patched(3, b"\x00"),
        "name run of kind 7": patched(6, b"\x07"),
        "name runs": patched(7, b"\x04"),  # a series of 4 names for 3 images
    }
    for expected, bad in cases.items():
        with pytest.raises(DiffcodecError, match=expected) as e:
            unpack(bad, "f.dfc")
        assert "\n" not in str(e.value)
