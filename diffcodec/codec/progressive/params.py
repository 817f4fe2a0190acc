"""The progressive stream's parameter block: everything its decoder needs besides the model.

The block sits in the container's mode-1 parameter field (`container`) and in a lossless
file's bootstrap section (`bitsback.params`). Its byte layouts are in `ProgressiveParams.pack`:
versions 3 to 6 (6: what this diffcodec writes) are compact (defaults cost nothing; tile
count and size come from the container); versions 1 and 2 are fixed layouts, read as before.
A version 6 block with the region_tiles field (an image of more than `REGION_TILES` tiles)
is a stream in regions (`syntax`); a diffcodec from before it refuses the block (a field it
does not know) instead of misreading the stream.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from diffcodec.codec import rcc
from diffcodec.codec.fields import Reader, pack_fields, read_fields
from diffcodec.errors import DiffcodecError

# Append-only: the index is written into files; the names are `timesteps.SPACINGS`.
SPACING_CODES = ("quadratic", "uniform")

@dataclass(frozen=True)
class ProgressiveParams:
    """Everything the decoder needs besides the model (the mode-1 parameter block)."""

    num_steps: int = 50  # K coded latents
    spacing: str = "quadratic"
    log2_candidates: int = 16  # at most 2^this candidates per chunk; the index law's range
    chunk_bits: float = 14.0  # nominal KL per chunk (quarter-bit resolution)
    pad_bits: float | None = None  # 2^ceil(KL + pad) candidates per chunk (versions 4 to 6: of the nominal
    #   chunk KL, needed to decode; versions 1-3: of each chunk's own KL, the encoder's choice, recorded
    #   only). None: the version's default (`default_pad_bits`: 8 from version 5, 2 before)
    seed: int = 0  # the shared randomness
    snap_log2: int = -16  # pixel-stage parameters on a 2^snap_log2 grid (pixel-level units)
    clip_denoised: bool = True
    network_float64: bool = False  # run the network and the latents in float64 (see `encode`)
    exact: bool = False  # the exact contract (`diffcodec.exact`): exact network, latents, candidates, tables
    num_tiles: int = 1
    tile_size: int = 32
    payload_bits: int = 0  # the complete stream's length in bits (set by the encoder)
    # integrity checks (`syntax`: a check_bits-bit digest of every stage so far closes each
    # group of stages; a group closes once its nominal KL reaches max(check_min_bits,
    # check_growth x the KL before it) and after the last RCC stage); 0 = none (block version 1).
    # Defaults chosen by bench.progressive_checks (reports/progressive_checks.md)
    check_bits: int = 16
    check_min_bits: int = 128
    check_growth: float = 0.0
    # the stream syntax (`syntax`, `codec`): 6 = what this diffcodec writes: version 5 with table
    # normals (`rcc_pool.NORMALS`: four normals per draw from a table of N(0, 1)'s 2^16
    # mid-quantiles instead of Box-Muller pairs; a cheaper search); 5 = version 4's pools with
    # greedy selection (each chunk sends the candidate of largest log q/p among the stage's N, its
    # index uniform on [0, N): log2 N bits; reports/rcc_methods.md); 4 = version 3's syntax
    # with pooled candidates (`rcc_pool`: a stage's chunks share rows of counter-based normals;
    # pad_bits then sets every chunk's candidate count, so the decoder needs it); 3 = x_T from
    # the shared seed, no stage-0 symbols, a closing check over every symbol, pixels included,
    # each chunk's own PCG64 candidates (`rcc`); 1 and 2 = older files (read only: stage 0 coded;
    # 2 adds the group checks)
    version: int = 6
    # version 3: the encoder skips a stage (1 .. K-2) whose KL is below this many bits, so that
    # its latent is sent merged with the next step's (`syntax`; not needed to decode)
    min_stage_bits: float = 0.0
    # version 6 on: the tiles coded as regions of this many consecutive tiles (`regions`): each
    # stage sends each region's level and chunks in turn, from the region's own permutation and
    # pools, so that an encoder or decoder holds a stage's Gaussians, coefficients and plan for
    # one region at a time, not for the image (issue 28). A block without the field (every file
    # before it) has one region, as has 0; `with_regions` sets REGION_TILES where there are more tiles.
    region_tiles: int = 0

    _FIXED = struct.Struct("<BBHBBBbBIHII")  # 23 bytes, see `pack`
    _CHECKS = struct.Struct("<BBH")  # block version 2: check bits, growth x 4, min group bits
    BLOCK_VERSION = 6  # what this diffcodec writes
    READ_VERSIONS = (1, 2, 3, 4, 5, 6)
    MAX_CHECK_BITS = 16

    def __post_init__(self) -> None:
        if self.pad_bits is None:
            object.__setattr__(self, "pad_bits", default_pad_bits(self.version))
        if self.spacing not in SPACING_CODES:
            raise ValueError(f"progressive: unknown spacing {self.spacing!r}")
        if not 1 <= self.num_steps <= 0xFFFF:
            raise ValueError(f"progressive: num_steps must be 1..65535, got {self.num_steps}")
        if not 1 <= self.log2_candidates <= rcc.MAX_LOG2_CANDIDATES:
            raise ValueError(f"progressive: log2_candidates must be 1..{rcc.MAX_LOG2_CANDIDATES}")
        for name in ("chunk_bits", "pad_bits"):
            v = getattr(self, name)
            if not (0 <= v <= 63.75 and float(v * 4).is_integer()):
                raise ValueError(f"progressive: {name} must be a multiple of 1/4 in 0..63.75, got {v}")
        if self.chunk_bits < 0.25:
            raise ValueError("progressive: chunk_bits must be >= 0.25")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError("progressive: seed must be in 0..2^32-1")
        if not 0 <= self.payload_bits < 1 << 32:
            raise ValueError("progressive: payload_bits must be below 2^32")
        if not -30 <= self.snap_log2 <= 0:
            raise ValueError("progressive: snap_log2 must be in -30..0")
        if self.num_tiles < 1 or not 1 <= self.tile_size <= 0xFFFF:
            raise ValueError("progressive: need at least one tile of a valid size")
        if not 0 <= self.check_bits <= self.MAX_CHECK_BITS:
            raise ValueError(f"progressive: check_bits must be 0..{self.MAX_CHECK_BITS}, got {self.check_bits}")
        if not 1 <= self.check_min_bits <= 0xFFFF:
            raise ValueError("progressive: check_min_bits must be 1..65535")
        if not (0 <= self.check_growth <= 63.75 and float(self.check_growth * 4).is_integer()):
            raise ValueError("progressive: check_growth must be a multiple of 1/4 in 0..63.75")
        if not (0 <= self.min_stage_bits <= 1023.75 and float(self.min_stage_bits * 4).is_integer()):
            raise ValueError("progressive: min_stage_bits must be a multiple of 1/4 in 0..1023.75")
        if self.version not in self.READ_VERSIONS:
            raise ValueError(f"progressive: unknown stream version {self.version}")
        if not 0 <= self.region_tiles < 1 << 32 or self.region_tiles and self.version < 6:
            raise ValueError("progressive: region_tiles must be in 0..2^32-1 (0: one region), set from version 6 on")
        if self.num_regions > 1 and self.min_stage_bits:
            raise ValueError("progressive: a stream of several regions skips no stage (min_stage_bits 0)")
        if self.version == 1 and self.check_bits or self.version == 2 and not self.check_bits:
            raise ValueError(f"progressive: a version {self.version} stream "
                             + ("has no checks" if self.version == 1 else "has checks"))

    def pack(self) -> bytes:
        """The mode-1 parameter block.

        Versions 3 to 6 (compact, `fields`): u8 block version (3 to 6), then a varint mask of the
        fields of `COMPACT_FIELDS` that differ from the version's defaults (`block_defaults`: the
        dataclass defaults, pad_bits 2 before version 5) (bit i: the table's
        field i), then those fields' values as varints in table order (booleans: the mask
        bit alone; chunk, pad bits and check growth x 4; snap_log2 zigzag; spacing its index
        in SPACING_CODES). Not stored: num_tiles and tile_size (the container's image table
        and model give them: `unpack`'s arguments) and payload_bits (the stream ends itself;
        0 after reading). The default block with the exact contract is 2 bytes (05 01).

        Versions 1 and 2 (little-endian, fixed; written only when ``version`` says so):

            0  u8  block version (1: no integrity checks; 2: with them)
                                              8   u8  flags: bit 0 clip_denoised, bit 1 network_float64,
                                                  bit 2 exact contract (its version is the container's)
            1  u8  spacing (SPACING_CODES)  9  u32 number of tiles
            2  u16 K coded steps              13  u16 tile size
            4  u8  log2 candidates            15  u32 shared seed
            5  u8  chunk bits x 4             19  u32 payload bits of the complete stream
            6  u8  pad bits x 4 (encoder's choice, recorded)
            7  i8  log2 of the pixel-parameter snap grid (pixel-level units)
          (version 2 only)
            23 u8  check bits (1..16)         24  u8  check growth x 4
            25 u16 smallest group of stages, in nominal KL bits
        """
        if self.version >= 3:
            return bytes([self.version]) + pack_fields(lambda name: getattr(self, name),
                                                       block_defaults(self.version), COMPACT_FIELDS)
        fixed = self._FIXED.pack(
            self.version, SPACING_CODES.index(self.spacing), self.num_steps, self.log2_candidates,
            int(self.chunk_bits * 4), int(self.pad_bits * 4), self.snap_log2,
            int(self.clip_denoised) | (int(self.network_float64) << 1) | (int(self.exact) << 2),
            self.num_tiles, self.tile_size, self.seed, self.payload_bits,
        )
        if self.version == 1:  # no checks
            return fixed
        return fixed + self._CHECKS.pack(self.check_bits, int(self.check_growth * 4), self.check_min_bits)

    @classmethod
    def unpack(cls, block: bytes, where: str = "file", *, num_tiles: int = 1, tile_size: int = 32
               ) -> ProgressiveParams:
        """The block's parameters (one-line DiffcodecError when malformed). ``num_tiles`` and
        ``tile_size``: what the container implies, used for a version 3 to 5 block (versions 1
        and 2 store their own)."""
        version = block[0] if block else 0
        if version not in cls.READ_VERSIONS:
            raise DiffcodecError(f"{where}: progressive block version {version}; this diffcodec reads "
                                 f"{cls.READ_VERSIONS[0]} to {cls.READ_VERSIONS[-1]}")
        if version >= 3:
            r = Reader(block, where, "progressive parameter block")
            r.pos = 1
            values = read_fields(r, block_defaults(version), COMPACT_FIELDS)
            if not r.at_end():
                raise r.fail(f"{len(block) - r.pos} bytes after its fields")
            try:
                return cls(**values, num_tiles=num_tiles, tile_size=tile_size, version=version)
            except ValueError as e:
                raise DiffcodecError(f"{where}: corrupt progressive parameters ({e})") from None
        size = cls._FIXED.size + (cls._CHECKS.size if version >= 2 else 0)
        if len(block) != size:
            raise DiffcodecError(f"{where}: corrupt progressive parameter block ({len(block)} bytes)")
        (version, spacing, num_steps, log2_n, chunk_q, pad_q, snap_log2, flags, num_tiles, tile_size, seed,
         payload_bits) = cls._FIXED.unpack_from(block)
        check_bits, growth_q, check_min_bits = cls._CHECKS.unpack_from(block, cls._FIXED.size) if version >= 2 else (
            0, 2, 128)
        if version == 2 and check_bits == 0:
            raise DiffcodecError(f"{where}: corrupt progressive parameters (a version 2 block without checks)")
        if spacing >= len(SPACING_CODES) or flags > 7:
            raise DiffcodecError(f"{where}: corrupt progressive parameters (spacing {spacing}, flags {flags})")
        try:
            return cls(num_steps, SPACING_CODES[spacing], log2_n, chunk_q / 4, pad_q / 4, seed, snap_log2,
                       bool(flags & 1), bool(flags & 2), bool(flags & 4), num_tiles, tile_size, payload_bits,
                       check_bits, check_min_bits, growth_q / 4, version)
        except ValueError as e:
            raise DiffcodecError(f"{where}: corrupt progressive parameters ({e})") from None

    @property
    def num_stages(self) -> int:
        return self.num_steps + 1

    @property
    def num_regions(self) -> int:
        """Regions of the stream (version 6 on): ceil(tiles / region_tiles); 1 where region_tiles is 0."""
        if self.version < 6 or not self.region_tiles:
            return 1
        return -(-self.num_tiles // self.region_tiles)

    def regions(self) -> list[slice]:
        """Each region's tiles, in order: consecutive runs of region_tiles tiles, the last one shorter."""
        step = self.region_tiles if self.num_regions > 1 else self.num_tiles
        return [slice(i, min(i + step, self.num_tiles)) for i in range(0, self.num_tiles, step)]



_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ProgressiveParams)}
REGION_TILES = 128  # the encoder's regions (`with_regions`): 128 tiles of 32x32 are 393,216 dimensions


def with_regions(params: ProgressiveParams, region_tiles: int = REGION_TILES) -> ProgressiveParams:
    """``params`` in regions of ``region_tiles`` tiles where it has more tiles than that (version
    6 on; otherwise as they are: a stream of one region is the same either way)."""
    if params.version < 6 or params.num_tiles <= region_tiles or params.min_stage_bits:
        return params
    return dataclasses.replace(params, region_tiles=region_tiles)


def default_pad_bits(version: int) -> float:
    """The pad a stream version's encoder uses by default (and its compact block leaves out):
    2 before version 5 (PFR: 2^ceil(KL + 2) candidates deliver what more would), 8 from
    version 5 (greedy: every chunk of 8 bits or more searches the full 2^log2_candidates)."""
    return 8.0 if version >= 5 else 2.0


def block_defaults(version: int) -> dict:
    """The values a compact block of ``version`` leaves out (a format constant per version)."""
    return {**_DEFAULTS, "pad_bits": default_pad_bits(version)}

# The version 3 to 6 blocks' fields in mask-bit order (append only: the order is in files). The
# ones a default file sets (exact, float64) and the usual knobs first, so that their mask
# fits one byte.
COMPACT_FIELDS = (
    ("exact", "b"),
    ("network_float64", "b"),
    ("num_steps", "u"),
    ("chunk_bits", "q"),
    ("log2_candidates", "u"),
    ("seed", "u"),
    ("spacing", ("c", SPACING_CODES)),
    ("pad_bits", "q"),
    ("snap_log2", "s"),
    ("clip_denoised", "b"),
    ("check_bits", "u"),
    ("check_min_bits", "u"),
    ("check_growth", "q"),
    ("min_stage_bits", "q"),
    ("region_tiles", "u"),
)
