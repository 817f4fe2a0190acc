"""The ``.dfc`` file format: a versioned header, a mode-specific parameter block, a payload.

All integers little-endian. Strings are ASCII (names: UTF-8) with a length prefix.

    offset  size  field
    0       4     magic b"DFC\\x1a"
    4       1     format version (3; versions 1 and 2 are still read, see below)
    5       1     mode: 0 = bits-back lossless (`bitsback`), 1 = progressive (`progressive`)
    6       2     flags, reserved (0)
    8       8     model fingerprint: the checkpoint's 16 hex digits as 8 raw bytes
    16      1+n   device kind of the encoder, u8 length + ASCII (e.g. "cpu", "cuda:NVIDIA H100")
    ..      1+n   noise schedule name, u8 length + ASCII (e.g. "linear")
    ..      4     T, the model's number of timesteps (u32)
    ..      4     K, the number of coded steps (u32; respace(schedule, K) when K < T)
    ..      1+n   reverse-variance type, u8 length + ASCII ("fixedlarge", ...)
    ..      2     tile size in pixels (u16; the model's image size, e.g. 32)
    ..      1     arithmetic contract (version 3): 0 = none, the file decodes only where the
                  encoder's floating point is reproduced (--float32 / --float64); n >= 1 = the
                  exact contract version n (`diffcodec.exact`): decodes on any machine
    ..      4     (contract >= 1 only) probe digest: a hash of the exact network's output and
                  coding parameters on a fixed input (`codec.probe`), so that a decoder that
                  would diverge refuses before decoding anything
    ..      n     image table (version 2; every integer in it a LEB128 varint, "v"): run-length,
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
    ..      4+n   mode parameter block: u32 length + bytes (mode 0: `bitsback.params`)
    ..      8+n   payload: u64 length + bytes (mode 0: the ANS stack's words, uint32 LE)
    end-4   4     CRC-32 of every byte before it

Version 1 (diffcodec 0.1) differs in its image table: N (u32), then per image height u32,
width u32, name u16 length + UTF-8 (10 bytes and the name, per image). Versions 1 and 2
(diffcodec before the exact contract) have no contract byte: they are float files.

Mode 1 (progressive) is a prefix code, so its tail differs: after the parameter block come
a CRC-32 of the header (every byte before it) and then the payload up to the end of the
file, with no length and no trailer, so that a file cut short still parses and the decoder
uses what is there (`progressive` documents its block and payload).

Each mode owns its parameter block and payload layout: mode 0 `bitsback.params`, mode 1
`progressive.params`.

`unpack` refuses, with a one-line `DiffcodecError`: a short or truncated file, bad magic,
another format version, an unknown mode, a CRC mismatch (corrupt file), malformed fields.
`check_model` refuses a file written with other weights.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from diffcodec.errors import DiffcodecError

MAGIC = b"DFC\x1a"
VERSION = 3  # what this diffcodec writes
READ_VERSIONS = (1, 2, 3)  # what it reads
WRITTEN_BY = {1: "diffcodec 0.1", 2: "diffcodec 0.2", 3: "diffcodec 0.3"}
PROBE_BYTES = 4
MODE_BITSBACK = 0
MODE_PROGRESSIVE = 1
MODE_NAMES = {MODE_BITSBACK: "bits-back lossless", MODE_PROGRESSIVE: "progressive"}
CHECKSUM_BYTES = 8
MAX_NAME_BYTES = 255
MAX_IMAGE_SIDE = 1 << 16
MAX_IMAGES = 1 << 24  # images in one file
_FIXED_PREFIX = struct.Struct("<4sBBH8s")  # magic, version, mode, flags, fingerprint
NAME_ONE, NAME_SERIES, NAME_EMPTY = 0, 1, 2  # kinds of name runs in a version 2 image table
_SERIES = re.compile(r"(.*)\[(0|[1-9][0-9]{0,9})\]", re.DOTALL)  # "stem[i]", i as str(int) writes it


@dataclass(frozen=True)
class ImageEntry:
    """One coded image: its real size (before tiling/padding) and a display name."""

    height: int
    width: int
    name: str = ""


@dataclass(frozen=True)
class Header:
    mode: int
    device: str  # device kind of the encoder
    fingerprint: str  # 16 hex digits
    schedule: str
    num_timesteps: int  # T
    num_steps: int  # K
    var_type: str
    tile_size: int
    images: tuple[ImageEntry, ...]
    pixel_sha: bytes  # CHECKSUM_BYTES
    params: bytes  # the mode-specific block
    contract: int = 0  # the exact arithmetic contract's version (0: none, same-machine float file)
    probe: bytes = b""  # PROBE_BYTES when contract >= 1
    version: int = VERSION  # the format version it was read from (pack always writes VERSION)


@dataclass(frozen=True)
class Container:
    header: Header
    payload: bytes


# ----------------------------------------------------------------------------- helpers


def pixel_checksum(images: list[np.ndarray]) -> bytes:
    """First 8 bytes of SHA-256 over each image's (height u32, width u32, RGB bytes), in order."""
    h = hashlib.sha256()
    for img in images:
        a = np.ascontiguousarray(img, dtype=np.uint8)
        h.update(struct.pack("<II", a.shape[0], a.shape[1]))
        h.update(a.tobytes())
    return h.digest()[:CHECKSUM_BYTES]


def check_model(header: Header, fingerprint: str, where: str = "file") -> None:
    """Refuse a file written with another model."""
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
    """LEB128: 7 bits per byte, low first, high bit set on all but the last byte."""
    if not 0 <= n < 2**32:
        raise ValueError(f"container: {n} does not fit a table field")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _stored_name(name: str) -> bytes:
    """The name as stored: UTF-8, at most MAX_NAME_BYTES, never cut inside a character."""
    raw = name.encode("utf-8")[:MAX_NAME_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def _pack_image_table(images: tuple[ImageEntry, ...]) -> bytes:
    """The version 2 image table: runs of equal sizes, then runs of names (see the byte table)."""
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ValueError(f"container: {len(images)} images; 1 to {MAX_IMAGES} fit in a file")
    size_runs: list[list[int]] = []
    for im in images:
        if not (1 <= im.height <= MAX_IMAGE_SIDE and 1 <= im.width <= MAX_IMAGE_SIDE):
            raise ValueError(f"container: image size {im.height}x{im.width} out of range")
        if size_runs and size_runs[-1][1:] == [im.height, im.width]:
            size_runs[-1][0] += 1
        else:
            size_runs.append([1, im.height, im.width])
    out = bytearray(_varint(len(images)) + _varint(len(size_runs)))
    for run in size_runs:
        out += b"".join(map(_varint, run))
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
    out += _varint(len(name_runs))
    for kind, count, first, text in name_runs:
        out += bytes([kind])
        if kind == NAME_EMPTY:
            out += _varint(count)
        elif kind == NAME_SERIES:
            out += _varint(count) + _varint(first) + _varint(len(text)) + text
        else:
            out += _varint(len(text)) + text
    return bytes(out)


# ------------------------------------------------------------------------------- pack


def pack(container: Container) -> bytes:
    """The file's bytes (see the byte table in the module docstring)."""
    h = container.header
    if h.mode not in MODE_NAMES:
        raise ValueError(f"container: unknown mode {h.mode}")
    if not h.images:
        raise ValueError("container: no images")
    if len(h.pixel_sha) != CHECKSUM_BYTES:
        raise ValueError("container: pixel checksum must be 8 bytes")
    out = bytearray(_FIXED_PREFIX.pack(MAGIC, VERSION, h.mode, 0, _fingerprint_bytes(h.fingerprint)))
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


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DiffcodecError(f"{self.where}: truncated file (ends inside the {what})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))

    def varint(self, what: str) -> int:
        """A LEB128 integer below 2^32 (`_varint`)."""
        value = 0
        for shift in range(0, 35, 7):
            (byte,) = self.take(1, what)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value >= 2**32:
                    break
                return value
        raise DiffcodecError(f"{self.where}: corrupt header ({what} field too long)")

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


def _read_image_table(r: _Reader) -> list[ImageEntry]:
    """The version 2 image table (run-length sizes and names)."""
    num_images = _image_count(r, r.varint("image count"), 0)
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
    return [ImageEntry(h, w, name) for (h, w), name in zip(sizes, names)]


def unpack(data: bytes, where: str = "file") -> Container:
    """Parse a file's bytes defensively; every problem is a one-line DiffcodecError."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise DiffcodecError(f"{where}: not a diffcodec file (bad magic)")
    if len(data) < _FIXED_PREFIX.size:
        raise DiffcodecError(f"{where}: truncated file ({len(data)} bytes)")
    _, version, mode, _flags, fp = _FIXED_PREFIX.unpack_from(data)
    if version not in READ_VERSIONS:
        raise DiffcodecError(f"{where}: file format version {version} (written by a newer diffcodec); this "
                             f"diffcodec reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}")
    if mode not in MODE_NAMES:
        raise DiffcodecError(f"{where}: unknown coding mode {mode} (known: "
                             + ", ".join(f"{k} = {v}" for k, v in MODE_NAMES.items()) + ")")
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
    (payload_len,) = r.unpack("<Q", "payload length")
    if payload_len > len(data):
        raise DiffcodecError(f"{where}: truncated file (payload of {payload_len} bytes announced, "
                             f"file has {len(data)} bytes)")
    payload = r.take(payload_len, "payload")
    (crc,) = r.unpack("<I", "checksum trailer")
    if r.pos != len(data):
        raise DiffcodecError(f"{where}: {len(data) - r.pos} unexpected bytes after the end of the file")
    if zlib.crc32(data[:-4]) & 0xFFFFFFFF != crc:
        raise DiffcodecError(f"{where}: corrupt file (CRC-32 mismatch)")
    if tile_size < 1 or num_steps < 1 or num_steps > num_timesteps:
        raise DiffcodecError(f"{where}: corrupt header (tile {tile_size}, K {num_steps}, T {num_timesteps})")
    header = Header(mode, device, fp.hex(), schedule, num_timesteps, num_steps, var_type, tile_size,
                    tuple(images), pixel_sha, params, contract, probe, version)
    return Container(header, payload)
