"""container.py: the .dfc byte layouts (pinned), and defensive parsing of bad files.

Format version 4 first (what lossless files are written as), then version 5 (progressive
files: the payload's length and stage count recorded), then the legacy versions 1-3 (still
read; 3 still written on request)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest

from diffcodec.codec.bitsback.params import BitsBackParams
from diffcodec.codec.container import (
    LEGACY_MAGIC,
    LOSSLESS_VERSION,
    MAGIC,
    MODE_BITSBACK,
    MODE_PROGRESSIVE,
    VERSION,
    Container,
    Header,
    ImageEntry,
    check_model,
    file_size,
    model_identity,
    pack,
    pixel_checksum,
    unpack,
)
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError
from diffcodec.outputs import write_bytes_atomic

# a version 1 (fixed layout) bits-back block, as format 3 files hold
PARAMS = BitsBackParams(
    resolution_bits=6, window_sigmas=8, prior_sigmas=8, snap_log2=-16, clip_denoised=True, network_float64=False, exact=True,
    threads=0, spacing="uniform-linspace",
    init_seed=99, init_words=1000, kept_words=700, num_tiles=3, num_symbols=3 * 3072 * 11, chunks=(1, 2),
    block_version=1,
)
COMPACT = replace(PARAMS, num_steps=10, block_version=2)  # the same stream's compact block (format 4)
FP, CHAIN = "0123456789abcdef", ("linear", 1000, "fixedlarge")
MODEL_ID = model_identity(FP, *CHAIN, 32)


def sample_container(payload: bytes = bytes(range(40))) -> Container:
    """A format 3 file (legacy layout, pinned below)."""
    header = Header(
        mode=MODE_BITSBACK, device="cpu", fingerprint="0123456789abcdef", schedule="linear", num_timesteps=1000,
        num_steps=10, var_type="fixedlarge", tile_size=32,
        images=(ImageEntry(37, 45, "a.png"), ImageEntry(32, 32, "cifar[1]")),
        pixel_sha=bytes.fromhex("a1b2c3d4e5f60718"), params=PARAMS.pack(), contract=1, probe=b"\x01\x02\x03\x04",
        version=3,
    )
    return Container(header, payload)


def v4_container(payload: bytes = bytes(range(40)), *, mode: int = MODE_BITSBACK, contract: int = 1,
                 images=(ImageEntry(37, 45, "a.png"), ImageEntry(32, 32, "cifar[1]")), device: str = "cpu",
                 params: bytes | None = None) -> Container:
    """A format 4 file as the encoder describes it (every model field known)."""
    if params is None:
        params = COMPACT.pack() if mode == MODE_BITSBACK else ProgressiveParams(exact=bool(contract)).pack()
    header = Header(
        mode=mode, device=device, fingerprint=FP, schedule=CHAIN[0], num_timesteps=CHAIN[1], num_steps=10,
        var_type=CHAIN[2], tile_size=32, images=tuple(images),
        pixel_sha=bytes.fromhex("a1b2c3d4") if mode == MODE_BITSBACK else b"", params=params, contract=contract,
        probe=b"\x01\x02\x03\x04" if contract else b"", model_id=MODEL_ID,
    )
    return Container(header, payload)


def as_read(c: Container) -> Container:
    """What unpack gives for a format 4 file: the model fields are its identity, K is in the block."""
    h = c.header
    return Container(replace(h, device="cuda" if h.device.startswith("cuda") else "cpu", fingerprint="", schedule="",
                             num_timesteps=0, num_steps=0, var_type="", tile_size=0, model_id=MODEL_ID), c.payload)


def with_crc(data: bytes, mode: int, header_end: int | None = None) -> bytes:
    """The edited file with its checksum recomputed (mode 0: the trailer; mode 1: the header's,
    which ends at ``header_end``)."""
    body = bytearray(data)
    if mode == MODE_BITSBACK:
        body[-4:] = struct.pack("<I", zlib.crc32(bytes(body[:-4])) & 0xFFFFFFFF)
    else:
        body[header_end - 4 : header_end] = struct.pack("<I", zlib.crc32(bytes(body[: header_end - 4])) & 0xFFFFFFFF)
    return bytes(body)


# ------------------------------------------------------------------------------ format 4


def test_v4_layout_matches_the_byte_table():
    c = v4_container()
    data = pack(c)
    assert data[:3] == MAGIC == b"DFC" and data[3] == LOSSLESS_VERSION == 4
    assert data[4] == MODE_BITSBACK | 1 << 2 | 1 << 5 | 1 << 6  # mode 0, contract 1, several images, names
    assert data[5:9] == MODEL_ID and data[9:13] == b"\x01\x02\x03\x04"
    # image table: N 2, 2 size runs (1 x 37x45, 1 x 32x32), then the version 2 name runs
    table = bytes([2, 2, 1, 37, 45, 1, 32, 32, 2, 0, 5]) + b"a.png" + bytes([1, 1, 1, 5]) + b"cifar"
    at = 13 + len(table)
    assert data[13:at] == table
    assert data[at : at + 4] == bytes.fromhex("a1b2c3d4")  # 4-byte pixel checksum
    block = COMPACT.pack()
    assert data[at + 4] == len(block) and data[at + 5 : at + 5 + len(block)] == block
    at += 5 + len(block)
    assert data[at] == 40 and data[at + 1 : at + 41] == c.payload  # payload length varint, payload
    assert len(data) == at + 41 + 4 and struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_v4_progressive_one_image_header_sizes():
    """The issue's target: a one-image 32x32 progressive file with default parameters has a
    header of at most 24 bytes: 22 under the exact contract, 18 float."""
    one = (ImageEntry(32, 32),)
    exact = v4_container(b"payload", mode=MODE_PROGRESSIVE, images=one)
    data = pack(exact)
    assert len(data) - len(b"payload") == 22
    assert data[4] == MODE_PROGRESSIVE | 1 << 2 and data[13:15] == bytes([32, 32])  # no count, no names
    assert data[15:18] == bytes([2, 6, 1])  # block: length 2, stream version 6, mask {exact}
    assert struct.unpack_from("<I", data, 18)[0] == zlib.crc32(data[:18]) and data[22:] == b"payload"
    float32 = v4_container(b"payload", mode=MODE_PROGRESSIVE, images=one, contract=0)
    assert len(pack(float32)) - len(b"payload") == 18
    many = tuple(ImageEntry(32, 32, f"x.npz[{i}]") for i in range(64))
    assert len(pack(v4_container(b"", mode=MODE_PROGRESSIVE, images=many))) == 22 - 2 + 15  # table: 5 + 10 names


@pytest.mark.parametrize("mode", [MODE_BITSBACK, MODE_PROGRESSIVE])
@pytest.mark.parametrize("contract", [0, 1, 7])
@pytest.mark.parametrize("images", [
    (ImageEntry(32, 32),), (ImageEntry(1, 65536, "only.png"),), (ImageEntry(32, 32), ImageEntry(9, 9)),
    (ImageEntry(37, 45, "a.png"), ImageEntry(32, 32, ""), ImageEntry(32, 32, "s[4]")),
])
@pytest.mark.parametrize("device", ["cpu", "cuda:NVIDIA H200"])
def test_v4_round_trip_of_every_field(mode, contract, images, device):
    c = v4_container(b"\x00\xff" * 7, mode=mode, contract=contract, images=images, device=device)
    data = pack(c)
    back = unpack(data)
    assert back == as_read(c)
    assert back.header.model_id == MODEL_ID and back.header.device == device.split(":")[0]
    assert pack(back) == data  # a file read back packs to the same bytes
    names = any(im.name for im in images)
    assert bool(data[4] & 0x40) == names and bool(data[4] & 0x20) == (len(images) > 1)
    assert data[4] >> 2 & 7 == contract and bool(data[4] & 0x80) == device.startswith("cuda")


def test_v4_model_identity_covers_weights_chain_and_tile_size():
    ids = {model_identity(FP, *CHAIN, 32), model_identity("0123456789abcdee", *CHAIN, 32),
           model_identity(FP, "cosine", 1000, "fixedlarge", 32), model_identity(FP, "linear", 999, "fixedlarge", 32),
           model_identity(FP, "linear", 1000, "fixedsmall", 32), model_identity(FP, *CHAIN, 64)}
    assert len(ids) == 6 and all(len(i) == 4 for i in ids)
    header = unpack(pack(v4_container())).header
    check_model(header, FP, identity=MODEL_ID)
    other = model_identity(FP, "cosine", 1000, "fixedlarge", 32)
    with pytest.raises(DiffcodecError) as e:
        check_model(header, FP, "f.dfc", identity=other, describe=f"weights {FP}, cosine T=1000 fixedlarge")
    message = str(e.value)
    assert "\n" not in message and f"encoded with model {MODEL_ID.hex()}, this checkpoint is {other.hex()}" in message
    assert "cosine T=1000" in message and len(MODEL_ID.hex()) == 8


def test_v4_every_truncation_is_a_one_line_error():
    for c in (v4_container(), v4_container(mode=MODE_PROGRESSIVE)):
        data = pack(c)
        header_end = len(data) - len(c.payload) if c.header.mode == MODE_PROGRESSIVE else len(data)
        for cut in range(header_end):
            with pytest.raises(DiffcodecError) as e:
                unpack(data[:cut], "f.dfc")
            message = str(e.value)
            assert "\n" not in message and message.startswith("f.dfc: ")
            assert "truncated" in message or "bad magic" in message
        if c.header.mode == MODE_PROGRESSIVE:  # a progressive file cut in its payload still parses
            for cut in range(header_end, len(data) + 1):
                assert unpack(data[:cut]).payload == c.payload[: cut - header_end]


def test_v4_bad_magic_version_mode_crc_and_trailing_bytes():
    data = pack(v4_container())
    with pytest.raises(DiffcodecError, match="bad magic"):
        unpack(b"PNG" + data[3:])
    with pytest.raises(DiffcodecError, match=r"version 6 \(written by a newer diffcodec\); this diffcodec reads "
                                             r"versions 1 to 5"):
        unpack(data[:3] + bytes([6]) + data[4:])
    with pytest.raises(DiffcodecError, match=r"unknown coding mode 2 \(known: 0 = bits-back lossless, 1 = progressive\)"):
        unpack(with_crc(data[:4] + bytes([data[4] | 2]) + data[5:], MODE_BITSBACK))
    flipped = bytearray(data)
    flipped[-10] ^= 0x40  # a payload byte
    with pytest.raises(DiffcodecError, match="CRC-32"):
        unpack(bytes(flipped))
    with pytest.raises(DiffcodecError, match="1 unexpected bytes after the end of the file"):
        unpack(data + b"\x00")
    prog = v4_container(b"xyz", mode=MODE_PROGRESSIVE)
    pdata = bytearray(pack(prog))
    pdata[6] ^= 1  # the model identity, under the header CRC
    with pytest.raises(DiffcodecError, match=r"corrupt header \(CRC-32 mismatch\)"):
        unpack(bytes(pdata))
    assert unpack(pack(prog) + b"more").payload == b"xyzmore"  # the stream's end is the decoder's to find


def test_v4_corrupt_fields_with_the_crc_fixed_are_one_line_errors():
    c = v4_container(images=tuple(ImageEntry(32, 32, f"s[{i}]") for i in range(3)))
    data = pack(c)
    table = bytes([3, 1, 3, 32, 32, 1, 1, 3, 0, 1]) + b"s"
    assert data[13 : 13 + len(table)] == table

    def patched(at: int, values: bytes) -> bytes:
        body = bytearray(data)
        body[at : at + len(values)] = values
        return with_crc(bytes(body), MODE_BITSBACK)

    cases = {
        "1 image in a several-image table": patched(13, b"\x01"),
        "at most 16777216": patched(13, b"\xff\xff\xff\xff\x0f"),
        "field too long": patched(13, b"\xff\xff\xff\xff\xff\x01"),
        "size runs for 3": patched(14, b"\x00"),
        "size runs cover 2 of 3": patched(15, b"\x02"),
        "size 0x32": patched(16, b"\x00"),
        "name run of kind 7": patched(19, b"\x07"),
        "name runs": patched(20, b"\x04"),  # a series of 4 names for 3 images
        "truncated": patched(len(data) - 4 - 41, b"\x7f"),  # the payload length: more than the file holds
    }
    for expected, bad in cases.items():
        with pytest.raises(DiffcodecError, match=expected) as e:
            unpack(bad, "f.dfc")
        assert "\n" not in str(e.value)
    one = pack(v4_container(images=(ImageEntry(32, 32),)))
    assert one[13:15] == bytes([32, 32])
    with pytest.raises(DiffcodecError, match=r"image 0 has size 0x32"):
        unpack(with_crc(one[:13] + b"\x00" + one[14:], MODE_BITSBACK))


def test_v4_random_corruption_never_escapes_as_another_exception():
    rng = np.random.default_rng(1)
    for c in (v4_container(), v4_container(mode=MODE_PROGRESSIVE)):
        data = pack(c)
        for _ in range(300):
            bad = bytearray(data)
            for pos in rng.integers(0, len(bad), size=rng.integers(1, 4)):
                bad[pos] = int(rng.integers(0, 256))
            try:
                unpack(bytes(bad))
            except DiffcodecError as e:
                assert "\n" not in str(e)


def test_v4_pack_refuses_what_the_format_cannot_hold():
    c = v4_container()
    for change, message in [({"pixel_sha": bytes(8)}, "4-byte pixel checksum"), ({"contract": 8}, "contract"),
                            ({"probe": b""}, "probe"), ({"version": 2}, "versions 3 to 5"),
                            ({"fingerprint": "", "model_id": b""}, "model identity")]:
        with pytest.raises(ValueError, match=message):
            pack(Container(replace(c.header, **change), c.payload))
    with pytest.raises(ValueError, match="0-byte pixel checksum"):
        pack(Container(replace(c.header, mode=MODE_PROGRESSIVE), b""))


def test_v4_round_trip_on_disk(tmp_path):
    path = tmp_path / "x.dfc"
    write_bytes_atomic(path, pack(v4_container()))
    assert unpack(path.read_bytes()) == as_read(v4_container())


# ------------------------------------------------------------------------------ format 5


def v5_progressive(payload: bytes = b"payload", stages: int = 51, **kw) -> Container:
    c = v4_container(payload, mode=MODE_PROGRESSIVE, **kw)
    return Container(replace(c.header, version=VERSION, stages=stages), payload)


def test_v5_progressive_header_records_the_payload_length_and_stage_count():
    """Format 5 = format 4 plus, in a progressive header, the payload's length and the stages it
    delivers (3 bytes more for one 32x32 image, whose payload is 128 bytes or more: 25 under the
    exact contract; 24 for a payload below 128 bytes)."""
    assert VERSION == 5
    one = (ImageEntry(32, 32),)
    c = v5_progressive(b"payload", 51, images=one)
    data = pack(c)
    assert data[3] == 5 and len(data) - len(b"payload") == 24
    assert data[15:18] == bytes([2, 6, 1])  # block as in format 4
    assert data[18:20] == bytes([7, 51])  # payload length 7, stages 51
    assert struct.unpack_from("<I", data, 20)[0] == zlib.crc32(data[:20]) and data[24:] == b"payload"
    back = unpack(data).header
    assert (back.version, back.stream_bytes, back.stages) == (5, 7, 51)
    assert pack(unpack(data)) == data
    long = v5_progressive(bytes(300), 7, images=one)  # a 2-byte length
    assert len(pack(long)) - 300 == 25 and unpack(pack(long)).header.stream_bytes == 300
    for f in (c, long, v5_progressive(bytes(5), 3), v4_container(bytes(9)), v4_container(bytes(200))):
        assert file_size(f.header, len(f.payload)) == len(pack(f))
    with pytest.raises(ValueError, match="stages its payload delivers"):
        pack(Container(replace(c.header, stages=0), c.payload))


def test_v5_a_shorter_file_parses_as_cut_short_and_a_longer_one_is_refused():
    c = v5_progressive(bytes(range(40)), 12)
    data = pack(c)
    start = len(data) - 40
    for cut in range(start, len(data) + 1):  # cut anywhere in the payload: still parses, says its full length
        back = unpack(data[:cut])
        assert back.payload == c.payload[: cut - start] and back.header.stream_bytes == 40
    with pytest.raises(DiffcodecError, match="f.dfc: 2 unexpected bytes after the end of its 40-byte payload"):
        unpack(data + b"\x00\x01", "f.dfc")
    for cut in range(start):  # inside the header: one line
        with pytest.raises(DiffcodecError, match="truncated|bad magic"):
            unpack(data[:cut])
    zero = bytearray(data)
    zero[start - 5] = 0  # the stage count (under the CRC, fixed)
    with pytest.raises(DiffcodecError, match="a payload that delivers no stage"):
        unpack(with_crc(bytes(zero), MODE_PROGRESSIVE, start))
    longer = bytearray(data)
    longer[start - 6] = 39  # the payload length: one byte less than the file holds
    with pytest.raises(DiffcodecError, match="1 unexpected bytes"):
        unpack(with_crc(bytes(longer), MODE_PROGRESSIVE, start))


def test_v5_lossless_layout_is_format_4s():
    """A lossless file's layout is the same in formats 4 and 5 (the encoder writes 4)."""
    c = v4_container()
    v5 = pack(Container(replace(c.header, version=VERSION), c.payload))
    v4 = pack(c)
    assert v5[3] == 5 and v4[3] == 4 and v5[4:-4] == v4[4:-4]
    assert unpack(v5).payload == c.payload and unpack(v5).header.stages == 0


# ------------------------------------------------------------------------- format 1 to 3


# Pinned (format version 3): changing the layout must be a conscious format-version decision.
GOLDEN_SHA256 = "09304d3e0e59102547e1f19988c4d2d81276033981b40f5cbdac1c375b17cfc1"


TABLE_AT = 53  # the image table's offset in sample_container's file (after the tile size, contract and probe)


def test_layout_matches_the_byte_table():
    data = pack(sample_container())
    assert data[:4] == LEGACY_MAGIC and data[4] == 3 and data[5] == MODE_BITSBACK
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
    wrong_version = bytes(data[:4]) + bytes([4]) + bytes(data[5:])  # 4 is not a legacy-layout version
    with pytest.raises(DiffcodecError, match=r"version 4 \(written by a newer diffcodec\); this diffcodec reads versions 1 to 5"):
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


def test_legacy_progressive_container_still_written_and_read():
    c = sample_container(b"xyz")
    header = Header(**{**c.header.__dict__, "mode": MODE_PROGRESSIVE, "params": b"block"})
    data = pack(Container(header, b"xyz"))
    assert data[:5] == LEGACY_MAGIC + b"\x03" and unpack(data) == Container(header, b"xyz")


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
