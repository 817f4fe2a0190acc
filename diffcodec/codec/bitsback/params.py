"""The bits-back stream's parameter block (the container's mode-0 parameter field).

Mode 0 parameter block (`BitsBackParams`, 40 + 2 x num_chunks bytes, then an optional
bootstrap section of 5 + n bytes):

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

from diffcodec.codec.bitsback.chain import INIT_SEED, GridConfig
from diffcodec.codec.bitsback.stream import TileCode
from diffcodec.errors import DiffcodecError

# Append-only: the index is written into files (module docstring); names as in `timesteps`.
SPACING_CODES = ("uniform-linspace", "quadratic", "uniform")


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

    @classmethod
    def of(cls, config: GridConfig, *, clip_denoised: bool, network_float64: bool, exact: bool, threads: int,
           spacing: str,
           code: TileCode, num_tiles: int, num_symbols: int, bootstrap_tiles: int = 0,
           bootstrap_block: bytes = b"") -> BitsBackParams:
        """The block of a coded stream: its grid settings, chain, initial words and chunks."""
        return cls(config.resolution_bits, config.window_sigmas, config.prior_sigmas, config.snap_log2,
                   clip_denoised, network_float64, exact, threads, spacing, INIT_SEED, code.init_words, code.kept_words,
                   num_tiles, num_symbols, code.chunks, bootstrap_tiles, bootstrap_block)

    @property
    def grid_config(self) -> GridConfig:
        return GridConfig(self.resolution_bits, self.window_sigmas, self.prior_sigmas, self.snap_log2)

    _FIXED = struct.Struct("<BBBbBHBQIIIQI")

    def pack(self) -> bytes:
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

    @classmethod
    def unpack(cls, block: bytes, where: str = "file") -> BitsBackParams:
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
                   init_words, kept, num_tiles, num_symbols, tuple(chunks), bootstrap_tiles, bytes(bootstrap_block))
