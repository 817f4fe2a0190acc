"""The ``.dfc`` file format: a versioned header, a mode-specific parameter block, a payload.

Format version 5 (what this diffcodec writes for progressive files) and 4 (for lossless
files, whose layout version 5 leaves unchanged): a header that costs what it must. "v" is an
unsigned LEB128 varint (7 bits a byte, low first); multi-byte integers little-endian.

    offset  size  field
    0       3     magic b"DFC"
    3       1     format version 5 or 4 (files of versions 1-3 have 0x1a here and their
                  version after it: the byte tells the two layouts apart, and version 26 is
                  never used)
    4       1     bits 0-1 mode: 0 = bits-back lossless (`bitsback`), 1 = progressive
                  (`progressive`); bits 2-4 the arithmetic contract: 0 = none, a float file that
                  decodes only where the encoder's floating point is reproduced, n = the exact
                  contract version n (`diffcodec.exact`), decodes on any machine; bit 5 several
                  images (else exactly one); bit 6 names stored; bit 7 encoded on a CUDA device
                  (a decoder's --device auto picks the same kind: a float file needs it)
    5       4     model identity: the first 4 bytes of SHA-256 over the weights' 8-byte
                  fingerprint, the chain (schedule name, T, variance type) and the tile size
                  (`model_identity`): a checkpoint with other weights, another chain or
                  another image size is refused before any work
    9       4     (contract >= 1 only) probe digest (`codec.probe`): a decoder whose exact
                  arithmetic would diverge refuses before decoding anything
    ..      n     image table:
                    one image:      height v, width v (2 bytes for 32x32)
                    several images: N v (2 <= N <= 2^24), then the version 2 size runs (R v,
                                    per run: count v, height v, width v)
                    then, with bit 6: one image: its name (length v + UTF-8); several: the
                    version 2 name runs (below). Without bit 6 every name is empty.
    ..      4     (mode 0 only) pixel checksum: the first 4 bytes of SHA-256 over the images
                  (`pixel_checksum`)
    ..      v+n   mode parameter block: length v + bytes (mode 0: `bitsback.params` compact
                  block, which holds K; mode 1: `progressive.params` block version 3 or 4)
    mode 0: v+n   payload: length v (below 2^64) + bytes (the ANS stack's words, uint32 LE),
            4     then a CRC-32 of every byte before it
    mode 1: v     (version 5 only) the payload's length in bytes (below 2^64)
            v     (version 5 only) the stages the payload delivers: K + 1 for the whole stream
                  (lossless), fewer for a lossy file that ends at a checked stage boundary
                  (`encode` with a rate target, or `diffcodec cut`)
            4     CRC-32 of the header (every byte before it), then the payload up to the end
                  of the file: a prefix code, so a file cut anywhere still parses and decodes
                  to the stages it holds; the stream ends with its own 32-bit check over every
                  symbol, pixels included, so no pixel checksum is needed

Why version 5 records the payload's length and stage count: a prefix code decodes from any
prefix, so without them a file cut short and a file damaged near its end look alike (both
stop decoding before their last stage). With them a file shorter than its header says is cut
short (it decodes to the stages it holds, and says "N of M bytes"), and a file of its full
length that does not deliver its stages is damaged, wherever the damage is. A file longer
than its header says is refused. `head -c` still makes a valid (cut short) prefix. 3 bytes
for a one-image file (2 for the length, 1 for the stage count).

Measured, one 32x32 image, default settings: progressive under the exact contract 25 bytes
before the payload (4 magic and version + 1 + 4 model + 4 probe + 2 table + 3 block + 2
payload length + 1 stage count + 4 CRC; 22 in format 4), float32 21; lossless (exact, K =
100, its one tile through the bootstrap) 41 bytes besides the payload (a 15-byte block, a
2-byte payload length, the 4-byte trailer). 64 images named "x.npz[0]".."x.npz[63]":
progressive 35 in format 4 (the names 10 of them), 39 in format 5 for a 127,000-byte payload
(a 3-byte length), lossless 54.
Format 3 took about 105 bytes for one image.

Why this is all the header holds, and no less:
- The model identity replaces the 8-byte fingerprint and the schedule, T, variance-type
  strings and the tile size (about 40 bytes): a decoder only needs to know that its model
  is the encoder's, and hashing the chain and the tile size in means a checkpoint with the
  same weights but another chain or image size is refused too. 32 bits make a wrong model
  slipping through a 1 in 4 billion accident, and then still caught: an exact file by its
  probe, any file by its pixel check. The refusal shows both identities (8 hex digits).
- The device string is gone: it was informational except for --device auto, which bit 7
  keeps; the divergence message of a float lossless file names the device kind.
- The tile size is the model's image size (in the identity); K is in the mode block
  (progressive: one byte only when it is not 50; lossless: when it is not 100).
- Names: stored only when the encoder has one (bit 6; `codec.api.encode` stores what it is
  given). `diffcodec encode` gives none for a one-image file, whose decoder's output is
  named by -o (OUT.png, or OUT/ with the PNG named after the .dfc file: `cli_codec`), and
  keeps them for several images, which decode to one PNG each, named from them.
- Progressive files carry no pixel checksum: stream version 3 closes with a 32-bit check
  over every symbol, pixels included. Format 4 recorded no payload length either (the stream
  ends itself; a file with bytes after its stream's end is refused), so it could not tell a
  cut file from one damaged near its end: format 5 records the length and stage count. A lossless file keeps a 4-byte pixel checksum: besides
  it the ANS stack must end on its initial words, so a diverged decode that passes both is
  far rarer than 2^-32; 4 bytes match the progressive stream's closing check.
- The mode block's length byte keeps the container independent of the modes' layouts.

Versions 1 to 3 (read only; `pack` still writes version 3 when asked, for the tests and for
progressive streams of version 1 or 2, whose decoder needs the header's pixel checksum):

    offset  size  field
    0       4     magic b"DFC\\x1a"
    4       1     format version (1, 2 or 3)
    5       1     mode: 0 = bits-back lossless, 1 = progressive
    6       2     flags, reserved (0)
    8       8     model fingerprint: the checkpoint's 16 hex digits as 8 raw bytes
    16      1+n   device kind of the encoder, u8 length + ASCII (e.g. "cpu", "cuda:NVIDIA H100")
    ..      1+n   noise schedule name, u8 length + ASCII (e.g. "linear")
    ..      4     T, the model's number of timesteps (u32)
    ..      4     K, the number of coded steps (u32; respace(schedule, K) when K < T)
    ..      1+n   reverse-variance type, u8 length + ASCII ("fixedlarge", ...)
    ..      2     tile size in pixels (u16; the model's image size, e.g. 32)
    ..      1     (version 3) arithmetic contract: 0 = none, n >= 1 = the exact contract version n
    ..      4     (version 3, contract >= 1 only) probe digest
    ..      n     image table (version 2; every integer in it a varint "v"): run-length,
                  so that 10,000 32x32 images named "shard.npz[0]".."shard.npz[9999]" take 22
                  bytes and one named "x.png" 13 (version 1: 10 bytes and the name per image)
                    v     number of images N (1 <= N <= 2^24)
                    v     number of size runs R, then per run: count, height, width (consecutive
                          images of one size; the counts sum to N)
                    v     number of name runs, then per run a kind byte (u8) and:
                          0 = one name: length v + UTF-8;  1 = a series "stem[i]", i = first,
                          first + 1, ...: count v, first v, length v + UTF-8 stem;
                          2 = count v empty names  (the runs' names sum to N)
    ..      8     pixel checksum: the first 8 bytes of SHA-256 over the images (`pixel_checksum`)
    ..      4+n   mode parameter block: u32 length + bytes (mode 0: block version 1 of
                  `bitsback.params`; mode 1: `progressive.params` block version 1 or 2)
    mode 0: 8+n   payload: u64 length + bytes, then 4: CRC-32 of every byte before it
    mode 1: 4     CRC-32 of the header, then the payload up to the end of the file (its
                  length is the block's payload_bits)

Version 1 (diffcodec 0.1) differs in its image table: N (u32), then per image height u32,
width u32, name u16 length + UTF-8 (10 bytes and the name, per image). Versions 1 and 2
(diffcodec before the exact contract) have no contract byte: they are float files.

A version 4 or 5 `Header` as read holds what the file holds: its model identity (``model_id``),
the device kind ("cpu" or "cuda"), and zeros / empty strings for the fingerprint, chain,
tile size and K, which `codec.api` fills in from the model and the mode block.

`unpack` refuses, with a one-line `DiffcodecError`: a short or truncated file, bad magic,
another format version, an unknown mode, a CRC mismatch (corrupt file), malformed fields,
absurd counts. `check_model` refuses a file written with another model.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from diffcodec.codec.fields import Reader, varint
from diffcodec.errors import DiffcodecError

MAGIC = b"DFC"  # then the format version (version 4 on)
LEGACY_MAGIC = b"DFC\x1a"  # versions 1-3: then the format version
VERSION = 5  # the newest this diffcodec writes (progressive files; lossless files: LOSSLESS_VERSION)
LOSSLESS_VERSION = 4  # a lossless file's layout is the same in formats 4 and 5: written as 4
READ_VERSIONS = (1, 2, 3, 4, 5)  # what it reads
WRITTEN_BY = {1: "diffcodec 0.1", 2: "diffcodec 0.2", 3: "diffcodec 0.3", 4: "diffcodec 0.4", 5: "diffcodec 0.5"}
PROBE_BYTES = 4
MODEL_ID_BYTES = 4
MODE_BITSBACK = 0
MODE_PROGRESSIVE = 1
MODE_NAMES = {MODE_BITSBACK: "bits-back lossless", MODE_PROGRESSIVE: "progressive"}
CHECKSUM_BYTES = 8  # pixel checksum of versions 1-3
PIXEL_CHECK_BYTES = 4  # version 4, mode 0 (mode 1: none, the stream checks its pixels)
MAX_CONTRACT = 7  # version 4: three bits
MAX_NAME_BYTES = 255
MAX_IMAGE_SIDE = 1 << 16
MAX_IMAGES = 1 << 24  # images in one file
MAX_PAYLOAD = 1 << 63
_FIXED_PREFIX = struct.Struct("<4sBBH8s")  # versions 1-3: magic, version, mode, flags, fingerprint
NAME_ONE, NAME_SERIES, NAME_EMPTY = 0, 1, 2  # kinds of name runs in a version 2 image table
_SERIES = re.compile(r"(.*)\[(0|[1-9][0-9]{0,9})\]", re.DOTALL)  # "stem[i]", i as str(int) writes it
# version 4, byte 4
_MODE_MASK, _CONTRACT_SHIFT, _SEVERAL, _NAMES, _CUDA = 0x03, 2, 0x20, 0x40, 0x80


@dataclass(frozen=True)
class ImageEntry:
    """One coded image: its real size (before tiling/padding) and a display name."""

    height: int
    width: int
    name: str = ""


@dataclass(frozen=True)
class Header:
    mode: int
    device: str  # device kind of the encoder (version 4 keeps "cpu" or "cuda")
    fingerprint: str  # 16 hex digits ("" in a version 4 file as read: see model_id)
    schedule: str
    num_timesteps: int  # T
    num_steps: int  # K (version 4: in the mode block, 0 as read)
    var_type: str
    tile_size: int  # (version 4: the model's image size, 0 as read)
    images: tuple[ImageEntry, ...]
    pixel_sha: bytes  # versions 1-3: CHECKSUM_BYTES; 4: PIXEL_CHECK_BYTES in mode 0, none in mode 1
    params: bytes  # the mode-specific block
    contract: int = 0  # the exact arithmetic contract's version (0: none, same-machine float file)
    probe: bytes = b""  # PROBE_BYTES when contract >= 1
    version: int = LOSSLESS_VERSION  # the format version it was read from / to write (3, 4 or 5)
    model_id: bytes = b""  # version 4, 5: MODEL_ID_BYTES (`model_identity`; pack computes it from the fields above)
    stream_bytes: int = -1  # version 5 progressive, as read: the payload's length the header records (-1: none;
    #   `pack` writes the length of the payload it is given)
    stages: int = 0  # version 5 progressive: the stages the payload delivers (K + 1: the whole stream)


@dataclass(frozen=True)
class Container:
    header: Header
    payload: bytes


# ----------------------------------------------------------------------------- helpers


def pixel_checksum(images: list[np.ndarray], size: int = CHECKSUM_BYTES) -> bytes:
    """First ``size`` bytes of SHA-256 over each image's (height u32, width u32, RGB bytes), in order."""
    h = hashlib.sha256()
    for img in images:
        a = np.ascontiguousarray(img, dtype=np.uint8)
        h.update(struct.pack("<II", a.shape[0], a.shape[1]))
        h.update(a.tobytes())
    return h.digest()[:size]


def model_identity(fingerprint: str, schedule: str, num_timesteps: int, var_type: str, tile_size: int) -> bytes:
    """A version 4 file's model identity: the first 4 bytes of SHA-256 over a tag, the
    weights' fingerprint (8 bytes), the chain (schedule, T, variance type) and the tile size."""
    h = hashlib.sha256(b"diffcodec model\0" + _fingerprint_bytes(fingerprint))
    for text in (schedule, var_type):
        raw = text.encode("utf-8")
        h.update(varint(len(raw)) + raw)
    h.update(varint(num_timesteps) + varint(tile_size))
    return h.digest()[:MODEL_ID_BYTES]


def stored_model_id(header: Header) -> bytes:
    """The identity a version 4 file holds for this header (computed when the fields are known)."""
    if header.fingerprint:
        return model_identity(header.fingerprint, header.schedule, header.num_timesteps, header.var_type,
                              header.tile_size)
    return header.model_id


def check_model(header: Header, fingerprint: str, where: str = "file", *, identity: bytes = b"",
                describe: str = "") -> None:
    """Refuse a file written with another model (version 4: ``identity`` is this model's
    `model_identity`, ``describe`` says what went into it)."""
    if header.version >= 4:
        if header.model_id != identity:
            raise DiffcodecError(
                f"{where}: encoded with model {header.model_id.hex()}, this checkpoint is {identity.hex()} "
                f"({describe or 'weights ' + fingerprint}; the identity covers the weights, the chain and the "
                "tile size); decode with the same checkpoint (--checkpoint)")
        return
    if header.fingerprint != fingerprint:
        raise DiffcodecError(
            f"{where}: encoded with model {header.fingerprint}, this checkpoint is {fingerprint}; "
            "decode with the same checkpoint (--checkpoint)"
        )


def _short(text: str, what: str) -> bytes:
    data = text.encode("ascii", errors="replace")
    if len(data) > 255:
        raise ValueError(f"container: {what} longer than 255 bytes")
    return struct.pack("<B", len(data)) + data


def _fingerprint_bytes(fp: str) -> bytes:
    try:
        raw = bytes.fromhex(fp)
    except ValueError:
        raw = b""
    if len(raw) != 8:
        raise ValueError(f"container: fingerprint must be 16 hex digits, got {fp!r}")
    return raw


def _varint(n: int) -> bytes:
    """LEB128 below 2^32 (`fields.varint`)."""
    try:
        return varint(n)
    except ValueError:
        raise ValueError(f"container: {n} does not fit a table field") from None


def _stored_name(name: str) -> bytes:
    """The name as stored: UTF-8, at most MAX_NAME_BYTES, never cut inside a character."""
    raw = name.encode("utf-8")[:MAX_NAME_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def _check_images(images: tuple[ImageEntry, ...]) -> None:
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ValueError(f"container: {len(images)} images; 1 to {MAX_IMAGES} fit in a file")
    for im in images:
        if not (1 <= im.height <= MAX_IMAGE_SIDE and 1 <= im.width <= MAX_IMAGE_SIDE):
            raise ValueError(f"container: image size {im.height}x{im.width} out of range")


def _pack_size_runs(images: tuple[ImageEntry, ...]) -> bytes:
    size_runs: list[list[int]] = []
    for im in images:
        if size_runs and size_runs[-1][1:] == [im.height, im.width]:
            size_runs[-1][0] += 1
        else:
            size_runs.append([1, im.height, im.width])
    return _varint(len(size_runs)) + b"".join(_varint(v) for run in size_runs for v in run)


def _pack_name_runs(images: tuple[ImageEntry, ...]) -> bytes:
    name_runs: list[list] = []  # [kind, count, first index, stem bytes]
    for name in (_stored_name(im.name) for im in images):
        series = _SERIES.fullmatch(name.decode("utf-8")) if name else None
        if not name:
            run = [NAME_EMPTY, 1, 0, b""]
        elif series and int(series.group(2)) < 2**32:
            run = [NAME_SERIES, 1, int(series.group(2)), series.group(1).encode("utf-8")]
        else:
            run = [NAME_ONE, 1, 0, name]
        last = name_runs[-1] if name_runs else None
        if last and run[0] == last[0] == NAME_EMPTY or last and run[0] == last[0] == NAME_SERIES and run[3] == last[3] and run[2] == last[2] + last[1]:
            last[1] += 1
        else:
            name_runs.append(run)
    out = bytearray(_varint(len(name_runs)))
    for kind, count, first, text in name_runs:
        out += bytes([kind])
        if kind == NAME_EMPTY:
            out += _varint(count)
        elif kind == NAME_SERIES:
            out += _varint(count) + _varint(first) + _varint(len(text)) + text
        else:
            out += _varint(len(text)) + text
    return bytes(out)


def _pack_image_table(images: tuple[ImageEntry, ...]) -> bytes:
    """The version 2 image table: runs of equal sizes, then runs of names (see the byte table)."""
    _check_images(images)
    return _varint(len(images)) + _pack_size_runs(images) + _pack_name_runs(images)


def _pack_image_table_v4(images: tuple[ImageEntry, ...], names: bool) -> bytes:
    """The version 4 image table (the byte table; `pack` sets the several / names bits)."""
    _check_images(images)
    if len(images) == 1:
        im = images[0]
        name = _stored_name(im.name)
        return _varint(im.height) + _varint(im.width) + (_varint(len(name)) + name if names else b"")
    return _varint(len(images)) + _pack_size_runs(images) + (_pack_name_runs(images) if names else b"")


# ------------------------------------------------------------------------------- pack


def pack(container: Container) -> bytes:
    """The file's bytes (see the byte tables in the module docstring): format version 4 or
    5, or 3 when the header asks for it. A version 5 progressive file records the length of
    ``container.payload`` and ``header.stages``."""
    h = container.header
    if h.mode not in MODE_NAMES:
        raise ValueError(f"container: unknown mode {h.mode}")
    if not h.images:
        raise ValueError("container: no images")
    if h.version == 3:
        return _pack_v3(container)
    if h.version not in (4, VERSION):
        raise ValueError(f"container: writes format versions 3 to {VERSION}, not {h.version}")
    if not 0 <= h.contract <= MAX_CONTRACT or len(h.probe) != (PROBE_BYTES if h.contract else 0):
        raise ValueError("container: a contract version (0..7) needs its probe digest (and none without one)")
    check_bytes = PIXEL_CHECK_BYTES if h.mode == MODE_BITSBACK else 0
    if len(h.pixel_sha) != check_bytes:
        raise ValueError(f"container: a version {h.version} {MODE_NAMES[h.mode]} file has a {check_bytes}-byte "
                         "pixel checksum")
    framed = h.mode == MODE_PROGRESSIVE and h.version >= 5  # the payload's length and stage count
    if framed and h.stages < 1:
        raise ValueError("container: a version 5 progressive file records the stages its payload delivers (>= 1)")
    model_id = stored_model_id(h)
    if len(model_id) != MODEL_ID_BYTES:
        raise ValueError("container: no model identity (fingerprint and chain, or model_id)")
    names = any(_stored_name(im.name) for im in h.images)
    flags = (h.mode | h.contract << _CONTRACT_SHIFT | (_SEVERAL if len(h.images) > 1 else 0)
             | (_NAMES if names else 0) | (_CUDA if h.device.startswith("cuda") else 0))
    out = bytearray(MAGIC + bytes([h.version, flags]) + model_id + h.probe)
    out += _pack_image_table_v4(h.images, names) + h.pixel_sha + _varint(len(h.params)) + h.params
    if framed:
        out += varint(len(container.payload), MAX_PAYLOAD) + _varint(h.stages)
    if h.mode == MODE_PROGRESSIVE:  # header CRC, then the payload to the end of the file
        out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
        return bytes(out) + container.payload
    out += varint(len(container.payload), MAX_PAYLOAD) + container.payload
    out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
    return bytes(out)


def file_size(header: Header, payload_bytes: int) -> int:
    """The bytes of a file of ``header`` with a payload of ``payload_bytes`` (format 4 on: a
    lossless file and a format 5 progressive file record the payload's length, a varint)."""
    if header.version < 4:
        raise ValueError("container: file_size knows formats 4 and 5")
    records_length = header.mode == MODE_BITSBACK or header.version >= 5
    empty = len(pack(Container(header, b"")))
    return empty + payload_bytes + (len(varint(payload_bytes, MAX_PAYLOAD)) - 1 if records_length else 0)


def _pack_v3(container: Container) -> bytes:
    """Format version 3 (diffcodec 0.3)."""
    h = container.header
    if len(h.pixel_sha) != CHECKSUM_BYTES:
        raise ValueError("container: pixel checksum must be 8 bytes")
    out = bytearray(_FIXED_PREFIX.pack(LEGACY_MAGIC, 3, h.mode, 0, _fingerprint_bytes(h.fingerprint)))
    out += _short(h.device, "device")
    out += _short(h.schedule, "schedule")
    out += struct.pack("<II", h.num_timesteps, h.num_steps)
    out += _short(h.var_type, "var_type")
    if not 0 <= h.contract <= 255 or len(h.probe) != (PROBE_BYTES if h.contract else 0):
        raise ValueError("container: a contract version needs its probe digest (and none without one)")
    out += struct.pack("<HB", h.tile_size, h.contract) + h.probe + _pack_image_table(h.images)
    out += h.pixel_sha
    out += struct.pack("<I", len(h.params)) + h.params
    if h.mode == MODE_PROGRESSIVE:  # header CRC, then the payload to the end of the file
        out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
        return bytes(out) + container.payload
    out += struct.pack("<Q", len(container.payload)) + container.payload
    out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
    return bytes(out)


# ----------------------------------------------------------------------------- unpack


class _Reader(Reader):
    def unpack(self, fmt: str, what: str) -> tuple:
        st = struct.Struct(fmt)
        return st.unpack(self.take(st.size, what))

    def ascii(self, what: str) -> str:
        (n,) = self.unpack("<B", what)
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DiffcodecError(f"{self.where}: corrupt header ({what} is not ASCII)") from None


def _image_count(r: _Reader, num_images: int, bytes_per_image: int) -> int:
    # Refuse absurd counts before looping: a version 1 entry takes at least 10 bytes.
    if num_images < 1:
        raise DiffcodecError(f"{r.where}: corrupt header (no images)")
    if num_images > MAX_IMAGES:
        raise DiffcodecError(f"{r.where}: corrupt header ({num_images} images; at most {MAX_IMAGES} in a file)")
    if num_images * bytes_per_image > len(r.data):
        raise DiffcodecError(f"{r.where}: truncated file (header announces {num_images} images)")
    return num_images


def _check_size(r: _Reader, i: int, height: int, width: int) -> None:
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise DiffcodecError(f"{r.where}: corrupt header (image {i} has size {height}x{width})")


def _read_image_table_v1(r: _Reader) -> list[ImageEntry]:
    images = []
    for i in range(_image_count(r, r.unpack("<I", "image count")[0], 10)):
        height, width, name_len = r.unpack("<IIH", "image table")
        raw = r.take(name_len, "image table")
        _check_size(r, i, height, width)
        images.append(ImageEntry(height, width, raw.decode("utf-8", errors="replace")))
    return images


def _read_size_runs(r: _Reader, num_images: int) -> list[tuple[int, int]]:
    num_runs = r.varint("image table")
    if not 1 <= num_runs <= num_images:
        raise DiffcodecError(f"{r.where}: corrupt header ({num_runs} size runs for {num_images} images)")
    sizes: list[tuple[int, int]] = []
    for _ in range(num_runs):
        count, height, width = (r.varint("image table") for _ in range(3))
        _check_size(r, len(sizes), height, width)
        if count < 1 or len(sizes) + count > num_images:
            raise DiffcodecError(f"{r.where}: corrupt header (image table size runs)")
        sizes.extend([(height, width)] * count)
    if len(sizes) != num_images:
        raise DiffcodecError(f"{r.where}: corrupt header (size runs cover {len(sizes)} of {num_images} images)")
    return sizes


def _read_name_runs(r: _Reader, num_images: int) -> list[str]:
    names: list[str] = []
    for _ in range(r.varint("image table")):
        (kind,) = r.take(1, "image table")
        if kind == NAME_ONE:
            batch = [r.take(r.varint("image table"), "image table").decode("utf-8", errors="replace")]
        elif kind in (NAME_SERIES, NAME_EMPTY):
            count = r.varint("image table")
            if not 1 <= count <= num_images - len(names):
                raise DiffcodecError(f"{r.where}: corrupt header (image table name runs)")
            if kind == NAME_EMPTY:
                batch = [""] * count
            else:
                first = r.varint("image table")
                stem = r.take(r.varint("image table"), "image table").decode("utf-8", errors="replace")
                batch = [f"{stem}[{first + i}]" for i in range(count)]
        else:
            raise DiffcodecError(f"{r.where}: corrupt header (name run of kind {kind})")
        if len(names) + len(batch) > num_images:
            raise DiffcodecError(f"{r.where}: corrupt header (image table name runs)")
        names.extend(batch)
    if len(names) != num_images:
        raise DiffcodecError(f"{r.where}: corrupt header (name runs cover {len(names)} of {num_images} images)")
    return names


def _read_image_table(r: _Reader) -> list[ImageEntry]:
    """The version 2 image table (run-length sizes and names)."""
    num_images = _image_count(r, r.varint("image count"), 0)
    sizes = _read_size_runs(r, num_images)
    names = _read_name_runs(r, num_images)
    return [ImageEntry(h, w, name) for (h, w), name in zip(sizes, names)]


def _read_image_table_v4(r: _Reader, several: bool, named: bool) -> list[ImageEntry]:
    if not several:
        height, width = r.varint("image table"), r.varint("image table")
        _check_size(r, 0, height, width)
        name = r.take(r.varint("image table"), "image table").decode("utf-8", errors="replace") if named else ""
        return [ImageEntry(height, width, name)]
    num_images = _image_count(r, r.varint("image count"), 0)
    if num_images < 2:
        raise DiffcodecError(f"{r.where}: corrupt header ({num_images} image in a several-image table)")
    sizes = _read_size_runs(r, num_images)
    names = _read_name_runs(r, num_images) if named else [""] * num_images
    return [ImageEntry(h, w, name) for (h, w), name in zip(sizes, names)]


def _bad_version(where: str, version: int) -> DiffcodecError:
    return DiffcodecError(f"{where}: file format version {version} (written by a newer diffcodec); this "
                          f"diffcodec reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}")


def _bad_mode(where: str, mode: int) -> DiffcodecError:
    return DiffcodecError(f"{where}: unknown coding mode {mode} (known: "
                          + ", ".join(f"{k} = {v}" for k, v in MODE_NAMES.items()) + ")")


def unpack(data: bytes, where: str = "file") -> Container:
    """Parse a file's bytes defensively; every problem is a one-line DiffcodecError."""
    if len(data) < 4 or data[:3] != MAGIC:
        raise DiffcodecError(f"{where}: not a diffcodec file (bad magic)")
    if data[3] == LEGACY_MAGIC[3]:
        return _unpack_legacy(data, where)
    version = data[3]
    if version not in (4, VERSION):
        raise _bad_version(where, version)
    r = _Reader(data, where)
    r.pos = 4
    flags = r.byte("mode byte")
    mode, contract = flags & _MODE_MASK, flags >> _CONTRACT_SHIFT & MAX_CONTRACT
    if mode not in MODE_NAMES:
        raise _bad_mode(where, mode)
    model_id = r.take(MODEL_ID_BYTES, "model identity")
    probe = r.take(PROBE_BYTES, "probe digest") if contract else b""
    images = _read_image_table_v4(r, bool(flags & _SEVERAL), bool(flags & _NAMES))
    pixel_sha = r.take(PIXEL_CHECK_BYTES, "pixel checksum") if mode == MODE_BITSBACK else b""
    params = r.take(r.varint("parameter block"), "parameter block")
    device = "cuda" if flags & _CUDA else "cpu"
    stream_bytes, stages = -1, 0
    if mode == MODE_PROGRESSIVE:
        if version >= 5:
            stream_bytes, stages = r.varint("payload length", MAX_PAYLOAD), r.varint("stage count")
        (crc,) = r.unpack("<I", "header checksum")
        if zlib.crc32(data[: r.pos - 4]) & 0xFFFFFFFF != crc:
            raise DiffcodecError(f"{where}: corrupt header (CRC-32 mismatch)")
        if version >= 5 and stages < 1:
            raise DiffcodecError(f"{where}: corrupt header (a payload that delivers no stage)")
        payload = data[r.pos :]  # possibly cut short
        if len(payload) > stream_bytes >= 0:
            raise DiffcodecError(f"{where}: {len(payload) - stream_bytes} unexpected bytes after the end of its "
                                 f"{stream_bytes}-byte payload")
    else:
        payload = _payload_and_trailer(r, r.varint("payload length", MAX_PAYLOAD))
    header = Header(mode, device, "", "", 0, 0, "", 0, tuple(images), pixel_sha, params, contract, probe, version,
                    model_id, stream_bytes, stages)
    return Container(header, payload)


def _payload_and_trailer(r: _Reader, payload_len: int) -> bytes:
    """A lossless file's tail after its length field: the payload, then the CRC-32 of every
    byte before the trailer, which must end the file."""
    data, where = r.data, r.where
    if payload_len > len(data):
        raise DiffcodecError(f"{where}: truncated file (payload of {payload_len} bytes announced, "
                             f"file has {len(data)} bytes)")
    payload = r.take(payload_len, "payload")
    (crc,) = r.unpack("<I", "checksum trailer")
    if r.pos != len(data):
        raise DiffcodecError(f"{where}: {len(data) - r.pos} unexpected bytes after the end of the file")
    if zlib.crc32(data[:-4]) & 0xFFFFFFFF != crc:
        raise DiffcodecError(f"{where}: corrupt file (CRC-32 mismatch)")
    return payload


def _unpack_legacy(data: bytes, where: str) -> Container:
    """Format versions 1 to 3."""
    if len(data) < _FIXED_PREFIX.size:
        raise DiffcodecError(f"{where}: truncated file ({len(data)} bytes)")
    _, version, mode, _flags, fp = _FIXED_PREFIX.unpack_from(data)
    if version not in (1, 2, 3):
        raise _bad_version(where, version)
    if mode not in MODE_NAMES:
        raise _bad_mode(where, mode)
    r = _Reader(data, where)
    r.pos = _FIXED_PREFIX.size
    device = r.ascii("device")
    schedule = r.ascii("schedule name")
    num_timesteps, num_steps = r.unpack("<II", "step counts")
    var_type = r.ascii("variance type")
    (tile_size,) = r.unpack("<H", "tile size")
    contract, probe = 0, b""
    if version >= 3:
        (contract,) = r.unpack("<B", "arithmetic contract")
        probe = r.take(PROBE_BYTES, "probe digest") if contract else b""
    images = _read_image_table_v1(r) if version == 1 else _read_image_table(r)
    pixel_sha = r.take(CHECKSUM_BYTES, "pixel checksum")
    (params_len,) = r.unpack("<I", "parameter block")
    params = r.take(params_len, "parameter block")
    if mode == MODE_PROGRESSIVE:
        (crc,) = r.unpack("<I", "header checksum")
        if zlib.crc32(data[: r.pos - 4]) & 0xFFFFFFFF != crc:
            raise DiffcodecError(f"{where}: corrupt header (CRC-32 mismatch)")
        if tile_size < 1 or num_steps < 1 or num_steps > num_timesteps:
            raise DiffcodecError(f"{where}: corrupt header (tile {tile_size}, K {num_steps}, T {num_timesteps})")
        header = Header(mode, device, fp.hex(), schedule, num_timesteps, num_steps, var_type, tile_size,
                        tuple(images), pixel_sha, params, contract, probe, version)
        return Container(header, data[r.pos :])  # the payload, possibly cut short
    payload = _payload_and_trailer(r, r.unpack("<Q", "payload length")[0])
    if tile_size < 1 or num_steps < 1 or num_steps > num_timesteps:
        raise DiffcodecError(f"{where}: corrupt header (tile {tile_size}, K {num_steps}, T {num_timesteps})")
    header = Header(mode, device, fp.hex(), schedule, num_timesteps, num_steps, var_type, tile_size,
                    tuple(images), pixel_sha, params, contract, probe, version)
    return Container(header, payload)
