"""The bits-back stream's parameter block (the container's mode-0 parameter field).

Compact block (block version 2, what this diffcodec writes; container format 4):

    0   1   0x82: compact block version 2 (the high bit tells it from a version 1 block,
            whose first byte, the resolution bits, is 1..10)
    ..  n   the fields of `COMPACT_FIELDS` that differ from `COMPACT_DEFAULTS` (`fields`:
            a varint mask, then the values as varints; booleans are the mask bit alone):
            flags, spacing, grid, threads, initial words (and how many of them are not kept
            out of the payload), K (the coded steps: the container no longer holds them),
            bootstrap tiles m
    ..  v   number of chunks, then each chunk's tile count (varints)
    ..  v   (m > 0) the bootstrap's progressive payload in bytes (its version 3 block no
            longer says), then its progressive block: length v + bytes (`progressive.params`)

    Not stored: the tile count (the chunks' sum plus m), the symbol count (tiles x 3 x
    tile^2 x (K + 1); the tile size is the container's). The default exact file of one
    tile (all bootstrap): 15 bytes, 6 of them the bootstrap's progressive block, against 68
    in version 1.

Block version 1 (`BitsBackParams`, 40 + 2 x num_chunks bytes, then an optional
bootstrap section of 5 + n bytes; container formats 1 to 3, read only):

    0   1   resolution bits b (u8): latent x_j lives on a grid of width delta_j = 2^l_j with
            l_j = floor(log2 sigma_min,j) - b (sigma_min,j: the smallest std x_j is coded with)
    1   1   window in sigmas c (u8): x_j is coded as an offset in [-W_j, W_j] from the rounded
            mean, W_j = ceil(c sigma_max,j / delta_j), plus an excess beyond the window's edges
    2   1   window of the prior N(0, I) of x_K, in sigmas (u8)
    3   1   log2 of the parameter snap grid, in bins (i8, e.g. -16)
    4   1   flags: bit 0 = clip_denoised, bit 1 = network run in float64, bit 2 = the exact
            arithmetic contract (its version is the container's)
    5   2   torch CPU threads of a float32 CPU encoder (u16; 0 = not recorded / not needed):
            float32 CPU kernels give thread-count-dependent results, so the decoder uses it
    7   1   spacing of a respaced chain (u8, `SPACING_CODES`): 0 = uniform as diffcodec 0.1 wrote it
            (numpy's rounded linspace, `timesteps` "uniform-linspace"; read only), 1 = quadratic,
            2 = uniform (the integer rule of `timesteps`)
    8   8   seed of the initial words (u64)
    16  4   number of initial words (u32)
    20  4   initial words kept out of the payload (u32): the decoder prepends that many
    24  4   number of tiles in the stream (u32)
    28  8   total coded symbols (u64): tiles x 3 x tile^2 x (K + 1)
    36  4   number of chunks (u32), then one u16 per chunk: tiles coded together, in order
    ..  4   bootstrap tiles m (u32): the stream's first m tiles were sent with the progressive
            codec and that stream sits on top of the initial words (`bitsback.stream` explains why);
            the chunk table covers the other num_tiles - m tiles. Absent (files of diffcodec
            0.1) = 0
    ..  1+n the bootstrap stream's progressive parameter block: u8 length + bytes (when m > 0)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from diffcodec.codec import LOSSLESS_STEPS
from diffcodec.codec.bitsback.chain import INIT_SEED, GridConfig
from diffcodec.codec.bitsback.stream import TileCode
from diffcodec.codec.fields import Reader, pack_fields, read_fields, varint
from diffcodec.errors import DiffcodecError

# Append-only: the index is written into files (module docstring); names as in `timesteps`.
SPACING_CODES = ("uniform-linspace", "quadratic", "uniform")
COMPACT_VERSION = 2  # the block version this diffcodec writes
COMPACT_MARK = 0x80 | COMPACT_VERSION  # its first byte


@dataclass(frozen=True)
class BitsBackParams:
    """The bits-back codec's parameters (mode 0 block; see the byte table above)."""

    resolution_bits: int
    window_sigmas: int
    prior_sigmas: int
    snap_log2: int
    clip_denoised: bool
    network_float64: bool
    exact: bool  # the exact contract (`diffcodec.exact`)
    threads: int  # `runtime.recorded_threads`
    spacing: str  # of the respaced chain (`timesteps`); irrelevant at K = T
    init_seed: int
    init_words: int
    kept_words: int
    num_tiles: int
    num_symbols: int
    chunks: tuple[int, ...]
    bootstrap_tiles: int = 0  # the first tiles, sent with the progressive codec
    bootstrap_block: bytes = b""  # their stream's progressive parameter block (when bootstrap_tiles > 0)
    num_steps: int = 0  # K (block version 2; version 1 blocks leave it to the container: 0)
    bootstrap_bytes: int = 0  # the bootstrap's progressive payload (version 2; version 1: its block says)
    block_version: int = COMPACT_VERSION  # 1: the fixed layout (container formats 1-3); 2: compact

    @classmethod
    def of(cls, config: GridConfig, *, clip_denoised: bool, network_float64: bool, exact: bool, threads: int,
           spacing: str,
           code: TileCode, num_tiles: int, num_symbols: int, bootstrap_tiles: int = 0,
           bootstrap_block: bytes = b"", num_steps: int = 0, bootstrap_bytes: int = 0) -> BitsBackParams:
        """The block of a coded stream: its grid settings, chain, initial words and chunks."""
        return cls(config.resolution_bits, config.window_sigmas, config.prior_sigmas, config.snap_log2,
                   clip_denoised, network_float64, exact, threads, spacing, INIT_SEED, code.init_words, code.kept_words,
                   num_tiles, num_symbols, code.chunks, bootstrap_tiles, bootstrap_block, num_steps, bootstrap_bytes)

    @property
    def grid_config(self) -> GridConfig:
        return GridConfig(self.resolution_bits, self.window_sigmas, self.prior_sigmas, self.snap_log2)

    _FIXED = struct.Struct("<BBBbBHBQIIIQI")

    def pack(self) -> bytes:
        """The block in its ``block_version``'s layout (module docstring)."""
        if self.block_version == COMPACT_VERSION:
            return self._pack_compact()
        if any(not 1 <= c <= 0xFFFF for c in self.chunks):
            raise ValueError("BitsBackParams: chunk sizes must be 1..65535")
        if bool(self.bootstrap_tiles) != bool(self.bootstrap_block) or len(self.bootstrap_block) > 255:
            raise ValueError("BitsBackParams: bootstrap tiles need their parameter block (at most 255 bytes)")
        flags = int(self.clip_denoised) | (int(self.network_float64) << 1) | (int(self.exact) << 2)
        block = self._FIXED.pack(
            self.resolution_bits, self.window_sigmas, self.prior_sigmas, self.snap_log2, flags, self.threads,
            SPACING_CODES.index(self.spacing), self.init_seed,
            self.init_words, self.kept_words, self.num_tiles, self.num_symbols, len(self.chunks),
        ) + struct.pack(f"<{len(self.chunks)}H", *self.chunks)
        if self.bootstrap_tiles:  # files without bootstrap keep the 0.1 layout byte for byte
            block += struct.pack("<IB", self.bootstrap_tiles, len(self.bootstrap_block)) + self.bootstrap_block
        return block

    def _pack_compact(self) -> bytes:
        if any(c < 1 for c in self.chunks) or sum(self.chunks) + self.bootstrap_tiles != self.num_tiles:
            raise ValueError("BitsBackParams: the chunks and the bootstrap tiles must cover the tiles")
        if bool(self.bootstrap_tiles) != bool(self.bootstrap_block) or not self.num_steps:
            raise ValueError("BitsBackParams: a compact block needs K, and bootstrap tiles their parameter block")
        if not 0 <= self.kept_words <= self.init_words:
            raise ValueError("BitsBackParams: more initial words kept than there are")

        def value(name: str):
            return self.init_words - self.kept_words if name == "unkept_words" else getattr(self, name)

        out = bytearray([COMPACT_MARK]) + pack_fields(value, COMPACT_DEFAULTS, COMPACT_FIELDS)
        out += varint(len(self.chunks)) + b"".join(varint(c) for c in self.chunks)
        if self.bootstrap_tiles:
            out += varint(self.bootstrap_bytes) + varint(len(self.bootstrap_block)) + self.bootstrap_block
        return bytes(out)

    @classmethod
    def unpack(cls, block: bytes, where: str = "file", *, tile_size: int = 32) -> BitsBackParams:
        """A block of either version (told apart by the first byte; ``tile_size``: the
        container's, for a compact block's symbol count). One-line DiffcodecError when malformed."""
        if block[:1] == bytes([COMPACT_MARK]):
            return cls._unpack_compact(block, where, tile_size)
        if len(block) < cls._FIXED.size:
            raise DiffcodecError(f"{where}: corrupt bits-back parameter block ({len(block)} bytes)")
        (bits, window, prior, snap_log2, flags, threads, spacing, seed, init_words, kept, num_tiles, num_symbols,
         num_chunks) = cls._FIXED.unpack_from(block)
        end = cls._FIXED.size + 2 * num_chunks
        if len(block) < end:
            raise DiffcodecError(f"{where}: corrupt bits-back parameter block (chunk table)")
        chunks = struct.unpack_from(f"<{num_chunks}H", block, cls._FIXED.size)
        bootstrap_tiles, bootstrap_block = 0, b""
        if len(block) > end:
            if len(block) < end + 5:
                raise DiffcodecError(f"{where}: corrupt bits-back parameter block (bootstrap section)")
            bootstrap_tiles, n = struct.unpack_from("<IB", block, end)
            bootstrap_block = block[end + 5 :]
            if len(bootstrap_block) != n or not bootstrap_tiles or not n:
                raise DiffcodecError(f"{where}: corrupt bits-back parameter block (bootstrap section)")
        try:
            GridConfig(bits, window, prior, snap_log2)  # its own limits
            grid_ok = True
        except ValueError:
            grid_ok = False
        if not grid_ok or flags > 7 or spacing >= len(SPACING_CODES):
            raise DiffcodecError(f"{where}: corrupt bits-back parameters (resolution {bits}, window {window}, "
                                 f"prior {prior}, snap {snap_log2}, flags {flags}, spacing {spacing})")
        if kept > init_words or sum(chunks) + bootstrap_tiles != num_tiles or 0 in chunks:
            raise DiffcodecError(f"{where}: corrupt bits-back parameters (chunk table or word counts)")
        return cls(bits, window, prior, snap_log2, bool(flags & 1), bool(flags & 2), bool(flags & 4), threads, SPACING_CODES[spacing], seed,
                   init_words, kept, num_tiles, num_symbols, tuple(chunks), bootstrap_tiles, bytes(bootstrap_block),
                   block_version=1)

    @classmethod
    def _unpack_compact(cls, block: bytes, where: str, tile_size: int) -> BitsBackParams:
        r = Reader(block, where, "bits-back parameter block")
        r.pos = 1
        v = read_fields(r, COMPACT_DEFAULTS, COMPACT_FIELDS)
        v["kept_words"] = v["init_words"] - v.pop("unkept_words")
        num_chunks = r.varint("chunk count")
        if num_chunks > len(block) - r.pos:  # each chunk takes a byte at least
            raise r.fail(f"{num_chunks} chunks announced")
        chunks = tuple(r.varint("chunk table") for _ in range(num_chunks))
        boot_bytes, boot_block = 0, b""
        if v["bootstrap_tiles"]:
            boot_bytes = r.varint("bootstrap section")
            boot_block = r.take(r.varint("bootstrap section"), "bootstrap section")
            if not boot_block:
                raise r.fail("bootstrap section without its parameter block")
        if not r.at_end():
            raise r.fail(f"{len(block) - r.pos} bytes after its fields")
        try:
            GridConfig(v["resolution_bits"], v["window_sigmas"], v["prior_sigmas"], v["snap_log2"])
        except ValueError as e:
            raise r.fail(str(e)) from None
        if v["kept_words"] < 0 or 0 in chunks or not v["num_steps"]:
            raise r.fail("chunk table, word counts or steps")
        num_tiles = sum(chunks) + v["bootstrap_tiles"]
        symbols = num_tiles * 3 * tile_size * tile_size * (v["num_steps"] + 1)
        return cls(num_tiles=num_tiles, num_symbols=symbols, chunks=chunks, bootstrap_block=bytes(boot_block),
                   bootstrap_bytes=boot_bytes, block_version=COMPACT_VERSION, **v)


_GRID = GridConfig()
# The compact block's optional fields in mask-bit order (append only) and their defaults
# (what the default encoder writes: exact contract, K = 100 quadratic, default grid).
# unkept_words: init_words - kept_words (0 when the bootstrap covers the stack's dip).
COMPACT_FIELDS = (
    ("exact", "b"),
    ("num_steps", "u"),
    ("init_words", "u"),
    ("unkept_words", "u"),
    ("bootstrap_tiles", "u"),
    ("network_float64", "b"),
    ("spacing", ("c", SPACING_CODES)),
    ("clip_denoised", "b"),
    ("threads", "u"),
    ("resolution_bits", "u"),
    ("window_sigmas", "u"),
    ("prior_sigmas", "u"),
    ("snap_log2", "s"),
    ("init_seed", "w"),
)
COMPACT_DEFAULTS = {
    "exact": True, "network_float64": False, "clip_denoised": True, "num_steps": LOSSLESS_STEPS,
    "spacing": "quadratic", "init_words": 0, "unkept_words": 0, "bootstrap_tiles": 0, "threads": 0,
    "resolution_bits": _GRID.resolution_bits, "window_sigmas": _GRID.window_sigmas,
    "prior_sigmas": _GRID.prior_sigmas, "snap_log2": _GRID.snap_log2, "init_seed": INIT_SEED,
}
