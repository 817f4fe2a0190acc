"""The progressive stream's syntax: what each stage sends and how a bit prefix is read.

Stage syntax (one range-coder stream, FIFO, stage k strictly before stage k + 1):

    (stream version 3: stage 0, x_T, sends nothing: the decoder takes candidate 0, a sample
    of p = N(0, I), as the encoder did; the KL it would cost is about 1e-9 bits/dim)
    skip          (version 3, stages 1 .. K-2) one binary symbol under adaptive counts (context:
                  whether the stage before was skipped): a skipped stage sends nothing more and
                  its latent is never made; the next stage's latent is sent from the last one
                  made, over the merged steps (`codec`: the encoder skips a stage whose KL is
                  below min_stage_bits, so that no stage pays the per-stage cost for a few bits)
    level L       the stage's KL(q || p) in bits on a half-bit log grid, L = round(2 log2 KL) + 21
                  (0 = below 2^-10.25 bits: nothing else is sent, the decoder takes candidate 0;
                  never sent in version 3, where a coded stage has level >= 1); a categorical
                  law peaked at the previous levels' trend (`level_probs`; version 3: the
                  trend of the coded stages, skips and stage 0 left out)
    exponents     the dimensions are shuffled by a keyed permutation and split into
                  n = ceil(KL(L) / chunk_bits) near-equal chunks of nominal KL kappa = KL(L) / n;
                  each chunk's PFR index (`rcc`) is sent as its exponent under an adaptive law
                  with context kappa (`rcc.ExponentModel`, updated after each stage) ...
    mantissas     ... then the bits below the leading one, uniformly
    (version 5: instead of exponents and mantissas, each chunk's greedy index uniformly on
                  [0, N), N = the stage's candidates (`rcc_pool.stage_candidates`): the
                  index of the largest of N i.i.d. values is uniform, so log2 N bits is its
                  entropy and no law needs to adapt)
    regions       (version 6 with the block's region_tiles, a stream of several regions: the
                  tiles in runs of region_tiles) a coded stage sends level, then indices, for
                  each region in turn: each region's level law follows that region's levels, its
                  chunks cut its own dimensions (its own keyed permutation and pools), and the
                  check's digest takes the regions' symbols in order; a stream of one region
                  is the version 6 stream of before
    check         (block version 2, after the stage that closes a group) check_bits bits,
                  uniformly: the low bits of a running SHA-256 of every stage's symbols so far
                  (`Syntax.check_value`). A group closes once its nominal KL (the levels' KL,
                  known to both sides) reaches max(check_min_bits, check_growth x the nominal
                  KL before the group), and always after stage K - 1
    pixels        (stage K) one symbol per dimension, QuantizedGaussian on 0..255 in pixel
                  units, mean and std snapped to a 2^snap_log2 grid (`coding_params`); the
                  container's pixel checksum verifies it (versions 1, 2)
    closing check (version 3 with checks) 32 bits, as two uniform 16-bit symbols: the low bits
                  of the running digest extended by the pixel symbols (`Syntax.closing_value`):
                  it verifies the whole stream, pixels included, so the header needs no pixel
                  checksum

The symbols of stages 0..K-1 depend on the stream alone, never on the network, so a
decoder parses every stage even where its arithmetic differs slightly from the encoder's.

Prefix property. The payload is the coder's 32-bit words as BIG-endian bytes, so that the
first bits of the file are the most significant bits of the code value. Given any bit
prefix, `TwinReader` runs two decoders, one on the prefix padded with zeros and one padded
with ones (the smallest and largest code values the rest could hold); a stage counts as
received only if both decode it to the same symbols, which then are the encoder's (the
code values that decode to a given symbol sequence form an interval). A padded decoder
that meets data no encoder could write counts as a mismatch: conservative, never wrong.

Integrity. A stage is delivered only with its group's check (`read_stages`): a check that
both padded decoders read alike but that differs from the digest of the symbols read is
damage (a corrupted byte changes every symbol after it, and the check with them; a false
pass has probability 2^-check_bits per check); a check the prefix does not hold is the end
of the prefix. So a damaged file is told apart from a short one, and decodes to the stages
before its first failed check.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from diffcodec import exact
from diffcodec.codec import rcc, rcc_pool
from diffcodec.codec.entropy import RangeDecoder, RangeEncoder
from diffcodec.codec.progressive.params import ProgressiveParams

NUM_LEVELS = 96
LEVEL_OFFSET = 21  # level 1 <-> 2^-10 bits, level 95 <-> 2^37 bits
PIXEL_LO, PIXEL_HI = 0, 255
DECODE_ERRORS = (AssertionError, ValueError, OverflowError)  # constriction on invalid data


def level_of_kl(kl_bits: float) -> int:
    """The level sent for a stage's KL: 0 below 2^-10.25 bits, else round(2 log2 KL) + 21."""
    if not math.isfinite(kl_bits):
        raise ValueError(f"progressive: the KL of a stage is {kl_bits}")
    if kl_bits < 2.0 ** ((0.5 - LEVEL_OFFSET) / 2):
        return 0
    return int(min(max(round(2.0 * math.log2(kl_bits)) + LEVEL_OFFSET, 1), NUM_LEVELS - 1))


def kl_of_level(level: int) -> float:
    """The nominal KL (bits) of a level: 0 for level 0, else 2^((L - 21) / 2), built exactly
    (2^k or sqrt(2) 2^k: the correctly rounded value, the same everywhere)."""
    if level == 0:
        return 0.0
    half, odd = divmod(level - LEVEL_OFFSET, 2)
    return math.ldexp(exact.SQRT2 if odd else 1.0, half)


def level_probs(history: list[int], *, exact_contract: bool = False) -> np.ndarray:
    """Integer counts [NUM_LEVELS] of the next level, given the levels so far.

    Two-sided geometric (halving every 1.5 levels) around the last level plus its last
    increase (the KL grows as t falls); broad around 2 bits for the first stage.
    """
    if not history:
        center, scale = float(LEVEL_OFFSET + 2), 8.0
    else:
        trend = history[-1] - history[-2] if len(history) >= 2 else 0
        center, scale = float(history[-1] + min(max(trend, 0), 8)), 1.5
    return _level_law(center, scale, exact_contract).copy()


@functools.lru_cache(maxsize=1024)
def _level_law(center: float, scale: float, exact_contract: bool) -> np.ndarray:
    """`level_probs` for one (center, scale): 2^(-|L - center| / scale) in counts of 2^-16
    (`exact.exp` under the exact contract; cached: prefix searches read stages many times)."""
    log2_p = -np.abs(np.arange(NUM_LEVELS, dtype=np.float64) - center) / scale
    p = exact.exp(torch.from_numpy(log2_p * exact.LN2)).numpy() if exact_contract else np.exp2(log2_p)
    return np.maximum(np.rint(p * 2.0**16), 1.0)


@dataclass(frozen=True)
class StageSymbols:
    """What one RCC stage sends: its level and one PFR index per chunk; in a stream of several
    regions, each region's (``regions``; ``level`` is then their largest, ``indices`` theirs
    joined, made when asked for: the regions' arrays are held once)."""

    level: int
    own_indices: np.ndarray | None  # int64 [num_chunks]; [0] for level 0 (None: several regions')
    regions: tuple[StageSymbols, ...] = ()

    @classmethod
    def of_regions(cls, parts: list[StageSymbols]) -> StageSymbols:
        """A stage of several regions; a single region's symbols as they are."""
        if len(parts) == 1:
            return parts[0]
        return cls(max(p.level for p in parts), None, tuple(parts))

    @property
    def indices(self) -> np.ndarray:
        """int64 [num_chunks]: the stage's indices (several regions: a new array of theirs joined)."""
        if self.own_indices is not None:
            return self.own_indices
        return np.concatenate([p.indices for p in self.regions])

    def parts(self) -> tuple[StageSymbols, ...]:
        """Each region's symbols (one region: these)."""
        return self.regions or (self,)


class Syntax:
    """The symbol-level state both sides keep in step: level history, exponent counts."""

    def __init__(self, params: ProgressiveParams, num_dims: int, context: bytes = b"") -> None:
        self.params = params
        self.context = context  # what else the closing check covers (the container's image sizes)
        self.num_dims = num_dims
        per_tile = num_dims // params.num_tiles
        self.region_dims = [per_tile * (r.stop - r.start) for r in params.regions()]  # one region: num_dims
        if sum(self.region_dims) != num_dims:
            raise ValueError(f"progressive: {num_dims} dimensions are not {params.num_tiles} equal tiles")
        self.levels: list[int] = []  # per stage (several regions: the largest region's)
        self.region_levels: list[list[int]] = [[] for _ in self.region_dims]
        self.exponents = rcc.ExponentModel(params.log2_candidates, exact_contract=params.exact)
        self._digest = b"diffcodec progressive stages"  # running SHA-256 of the symbols (`check_value`)
        self._group_bits = 0.0  # nominal KL of the stages since the last check
        self._checked_bits = 0.0  # nominal KL of the stages before it
        self.skip_counts = [[1, 1], [1, 1]]  # version 3: [not skipped, skipped] after a coded / a skipped stage
        self._pixels = None  # the closing check's running hash, once the pixel stage starts

    @property
    def stage(self) -> int:
        """The next stage to code or read."""
        return len(self.levels)

    def implicit(self) -> bool:
        """Whether the next stage sends nothing (version 3: stage 0, x_T from the shared seed)."""
        return self.params.version >= 3 and self.stage == 0

    def skippable(self) -> bool:
        """Whether the next stage sends a skip symbol (version 3, stages 1 .. K-2)."""
        return self.params.version >= 3 and 1 <= self.stage < self.params.num_steps - 1

    def skip_probs(self) -> np.ndarray:
        """Integer counts [2] (not skipped, skipped) of the next stage's skip symbol."""
        return np.array(self.skip_counts[self._skipped_before()], dtype=np.float64)

    def _skipped_before(self) -> int:
        return int(self.stage >= 2 and self.levels[-1] == 0)

    def level_history(self, region: int = 0) -> list[int]:
        """The levels the level law of ``region`` conditions on (version 3: coded stages only)."""
        levels = self.region_levels[region]
        if self.params.version >= 3:
            return [lv for lv in levels[1:] if lv]
        return levels

    def chunking(self, level: int, num_dims: int | None = None) -> tuple[int, float]:
        """(number of chunks, nominal KL per chunk in bits) of a level over ``num_dims``
        dimensions (a region's; default: every dimension)."""
        if level == 0:
            return 1, 0.0
        kl = kl_of_level(level)
        n = int(min(max(math.ceil(kl / self.params.chunk_bits), 1), num_dims or self.num_dims))
        return n, kl / n

    def uniform_indices(self) -> bool:
        """Whether chunk indices are sent uniformly on [0, N) (version 5) rather than as
        exponent and mantissa."""
        return self.params.version >= 5

    def index_range(self, level: int, num_dims: int | None = None) -> int:
        """N: a version 5 chunk's index range at a stage of ``level`` over ``num_dims``
        dimensions (a region's; default: every dimension) (its pools' rows)."""
        num_dims = num_dims or self.num_dims
        n, kappa = self.chunking(level, num_dims)
        return rcc_pool.stage_candidates(kappa, self.params.pad_bits, self.params.log2_candidates,
                                         rcc_pool.pool_row_width(num_dims, n))

    def regions_of(self, symbols: StageSymbols) -> tuple[StageSymbols, ...]:
        """A stage's symbols per region, checked against the stream's regions."""
        parts = symbols.parts()
        if len(parts) != len(self.region_dims):
            raise ValueError(f"progressive: {len(parts)} regions' symbols for a stream of {len(self.region_dims)}")
        return parts

    def commit(self, symbols: StageSymbols) -> None:
        stage = len(self.levels)
        if self.skippable():
            self.skip_counts[self._skipped_before()][int(symbols.level == 0)] += 1
        self.levels.append(symbols.level)
        for levels, part in zip(self.region_levels, self.regions_of(symbols)):
            levels.append(part.level)
        if symbols.level and not self.uniform_indices():
            _, kappa = self.chunking(symbols.level)
            self.exponents.update(kappa, rcc.split_index(symbols.indices)[0])
        if self.params.check_bits:
            for part in self.regions_of(symbols):  # one region: the stage's symbols, as before regions
                indices = np.ascontiguousarray(part.indices, dtype="<i8").tobytes()
                self._digest = hashlib.sha256(self._digest + struct.pack("<IB", stage, part.level) + indices).digest()
                self._group_bits += kl_of_level(part.level)

    def check_due(self) -> bool:
        """Whether the stage just committed closes a group (then its check follows it)."""
        if not self.params.check_bits:
            return False
        if len(self.levels) == self.params.num_steps:
            return True
        return self._group_bits >= max(self.params.check_min_bits, self.params.check_growth * self._checked_bits)

    def check_value(self) -> int:
        """The check of every stage so far: the low check_bits bits of their running digest."""
        return int.from_bytes(self._digest[:4], "little") & ((1 << self.params.check_bits) - 1)

    def closing_value(self) -> int:
        """The closing check (version 3): 32 bits of the digest extended by ``context`` (the
        caller's: the container passes the image sizes, so a header edit that keeps its CRC
        cannot crop the verified pixels) and the pixel symbols given to `add_pixels`."""
        return int.from_bytes(self._pixel_hash().digest()[:4], "little")

    def add_pixels(self, pixels: np.ndarray) -> None:
        """The next pixel symbols, in order (a region at a time), into the closing check."""
        self._pixel_hash().update(np.ascontiguousarray(pixels, dtype="<i2").tobytes())

    def _pixel_hash(self):
        if self._pixels is None:
            self._pixels = hashlib.sha256(self._digest + b"pixels" + struct.pack("<I", len(self.context)) + self.context)
        return self._pixels

    def closes(self) -> bool:
        """Whether the stream ends with a closing check (version 3 with checks)."""
        return self.params.version >= 3 and self.params.check_bits > 0

    def close_group(self) -> None:
        self._checked_bits += self._group_bits
        self._group_bits = 0.0


UNIFORM_PART_BITS = 16  # a version 5 index of more than 16 bits goes as its low 16 bits, then the rest


def encode_index_uniform(enc: RangeEncoder, indices: np.ndarray, num_candidates: int) -> None:
    """Version 5 chunk indices, each uniform on [0, N) (N a power of two): one uniform symbol,
    or the low 16 bits and then the high ones where N > 2^16 (the range coder's alphabets stay
    below 2^24; the same log2 N bits)."""
    indices = np.asarray(indices, dtype=np.int64)
    if (indices < 0).any() or (indices >= num_candidates).any():
        raise ValueError(f"progressive: an index outside the stage's {num_candidates} candidates")
    low = min(num_candidates, 1 << UNIFORM_PART_BITS)
    enc.encode_uniform(indices & (low - 1), low)
    if num_candidates > low:
        enc.encode_uniform(indices >> UNIFORM_PART_BITS, num_candidates >> UNIFORM_PART_BITS)


def decode_index_uniform(dec: RangeDecoder, num_candidates: int, count: int) -> np.ndarray:
    """What `encode_index_uniform` wrote: int64 [count]."""
    low = min(num_candidates, 1 << UNIFORM_PART_BITS)
    out = dec.decode_uniform(low, count).astype(np.int64)
    if num_candidates > low:
        out |= dec.decode_uniform(num_candidates >> UNIFORM_PART_BITS, count).astype(np.int64) << UNIFORM_PART_BITS
    return out


def write_stage(enc: RangeEncoder, syntax: Syntax, symbols: StageSymbols) -> bool:
    """Encode one RCC stage's symbols, and its group's check when it closes one; advance
    ``syntax``. Returns whether a check was written."""
    parts = syntax.regions_of(symbols)
    if syntax.implicit():
        if any(p.level != 0 or list(p.indices) != [0] for p in parts):
            raise ValueError("progressive: stage 0 of a version 3 stream is candidate 0, sent as nothing")
    elif syntax.skippable() and symbols.level == 0:
        enc.encode_categorical(np.array([1]), syntax.skip_probs()[None])
    else:
        if syntax.params.version >= 3 and any(p.level == 0 for p in parts):
            raise ValueError("progressive: a coded stage of a version 3 stream has level >= 1")
        if syntax.skippable():
            enc.encode_categorical(np.array([0]), syntax.skip_probs()[None])
        for region, part in enumerate(parts):
            _write_region(enc, syntax, region, part)
    syntax.commit(symbols)
    if not syntax.check_due():
        return False
    enc.encode_uniform(np.array([syntax.check_value()]), 1 << syntax.params.check_bits)
    syntax.close_group()
    return True


def _write_region(enc: RangeEncoder, syntax: Syntax, region: int, symbols: StageSymbols) -> None:
    """A coded stage's level and indices for one region (the stage's, in a stream of one)."""
    num_dims = syntax.region_dims[region]
    enc.encode_categorical(np.array([symbols.level]),
                           level_probs(syntax.level_history(region), exact_contract=syntax.params.exact)[None])
    if symbols.level:
        n, kappa = syntax.chunking(symbols.level, num_dims)
        if len(symbols.indices) != n:
            raise ValueError(f"progressive: level {symbols.level} needs {n} indices, got {len(symbols.indices)}")
    if symbols.level and syntax.uniform_indices():
        encode_index_uniform(enc, symbols.indices, syntax.index_range(symbols.level, num_dims))
    elif symbols.level:
        exps, mants = rcc.split_index(symbols.indices)
        if exps.max() > syntax.params.log2_candidates:
            raise ValueError("progressive: an index exceeds the candidate range")
        probs = syntax.exponents.probs(kappa)
        enc.encode_categorical(exps, np.broadcast_to(probs, (n, len(probs))))
        sizes = rcc.mantissa_size(exps)
        coded = sizes > 1
        if coded.any():
            enc.encode_uniform(mants[coded], sizes[coded])


def _read_stage_head(dec: RangeDecoder, syntax: Syntax) -> StageSymbols | None:
    """What `write_stage` wrote, read (`TwinReader` reads both of its decoders, without advancing
    ``syntax``; one of ``DECODE_ERRORS`` on data no encoder writes): a stage that sends no
    region's symbols (stage 0 of version 3, a skipped stage), or None: each region's symbols
    follow (`_read_region`)."""
    regions = range(len(syntax.region_dims))
    if syntax.implicit():
        return StageSymbols.of_regions([StageSymbols(0, np.zeros(1, dtype=np.int64)) for _ in regions])
    if syntax.skippable() and int(dec.decode_categorical(syntax.skip_probs()[None])[0]):
        if len(regions) > 1:
            raise ValueError("progressive: a skipped stage in a stream of several regions")
        return StageSymbols(0, np.zeros(0, dtype=np.int64))
    return None


def _read_region(dec: RangeDecoder, syntax: Syntax, region: int) -> StageSymbols:
    """What `_write_region` wrote."""
    num_dims = syntax.region_dims[region]
    level = int(dec.decode_categorical(level_probs(syntax.level_history(region),
                                                   exact_contract=syntax.params.exact)[None])[0])
    if level == 0:
        if syntax.params.version >= 3:
            raise ValueError("progressive: level 0 in a coded stage of a version 3 stream")
        return StageSymbols(0, np.zeros(1, dtype=np.int64))
    n, kappa = syntax.chunking(level, num_dims)
    if syntax.uniform_indices():
        return StageSymbols(level, decode_index_uniform(dec, syntax.index_range(level, num_dims), n))
    probs = syntax.exponents.probs(kappa)
    exps = dec.decode_categorical(np.broadcast_to(probs, (n, len(probs)))).astype(np.int64)
    sizes = rcc.mantissa_size(exps)
    mant = np.zeros(n, dtype=np.int64)
    coded = sizes > 1
    if coded.any():
        mant[coded] = dec.decode_uniform(sizes[coded], int(coded.sum()))
    return StageSymbols(level, rcc.join_index(exps, mant))


def padded_words(payload: bytes, num_bits: int, pad_words: int, fill: int) -> np.ndarray:
    """uint32 words (big-endian bit order) of the first ``num_bits`` bits of ``payload``, every
    later bit set to ``fill`` (0 or 1), ``pad_words`` + 2 words past the prefix's last word.
    Word by word: an encoder's prefix search parses hundreds of prefixes of a photo's stream."""
    prefix_words = -(-num_bits // 32)
    words = np.full(prefix_words + pad_words + 2, 0xFFFFFFFF if fill else 0, dtype=np.uint32)
    if prefix_words:
        nbytes = -(-num_bits // 8)
        whole = nbytes // 4  # the prefix's whole words, read in place; the last, partial one padded
        words[:whole] = np.frombuffer(payload, dtype=">u4", count=whole)
        if whole < prefix_words:
            last = np.zeros(4, dtype=np.uint8)
            last[: nbytes - 4 * whole] = np.frombuffer(payload, dtype=np.uint8, count=nbytes - 4 * whole,
                                                       offset=4 * whole)
            words[whole] = last.view(">u4")[0]
        tail_bits = 32 * prefix_words - num_bits  # bits of the last word past the prefix
        if tail_bits:
            low = np.uint32((1 << tail_bits) - 1)
            words[prefix_words - 1] = (words[prefix_words - 1] & ~low) | (low if fill else np.uint32(0))
    return words


def _same(a: StageSymbols, b: StageSymbols) -> bool:
    """Whether two readings of a stage are the same symbols, region by region."""
    pa, pb = a.parts(), b.parts()
    return len(pa) == len(pb) and all(x.level == y.level and np.array_equal(x.indices, y.indices)
                                      for x, y in zip(pa, pb))


class TwinReader:
    """Reads a bit prefix of the payload twice: padded with zeros and padded with ones.

    A stage counts as received only when both decoders return the same symbols (and neither
    meets invalid data); those are then the encoder's symbols whatever the missing bits are.
    """

    def __init__(self, payload: bytes, num_bits: int, pad_words: int) -> None:
        num_bits = max(0, min(int(num_bits), 8 * len(payload)))
        self.num_bits = num_bits
        self._decoders = [RangeDecoder(padded_words(payload, num_bits, pad_words, fill)) for fill in (0, 1)]
        self.failed = False

    def seek(self, position: tuple[int, tuple[int, int]]) -> None:
        """Both decoders to a `RangeEncoder.pos` checkpoint of the stream (`Checkpoint`)."""
        for d in self._decoders:
            d.seek(position)

    def stage(self, syntax: Syntax) -> StageSymbols | None:
        """The next RCC stage's symbols (and advance ``syntax``), or None once the prefix ends."""
        if self.failed:
            return None
        try:
            a = self._read_stage(syntax)
        except DECODE_ERRORS:
            a = None
        if a is None:
            self.failed = True
            return None
        syntax.commit(a)
        return a

    def _read_stage(self, syntax: Syntax) -> StageSymbols | None:
        """The next stage on both decoders, a region at a time (one copy of the stage's symbols
        is held, not two): the symbols, or None where the two readings differ."""
        heads = [_read_stage_head(d, syntax) for d in self._decoders]
        if heads[0] is not None or heads[1] is not None:  # a stage without regions' symbols: both, alike
            both = heads[0] is not None and heads[1] is not None
            return heads[0] if both and _same(*heads) else None
        parts = []
        for r in range(len(syntax.region_dims)):
            a, b = (_read_region(d, syntax, r) for d in self._decoders)
            if not _same(a, b):
                return None
            parts.append(a)
        return StageSymbols.of_regions(parts)

    def closing(self, syntax: Syntax | None) -> bool | None:
        """Read the closing check (version 3): True when it matches the stream and the pixels
        given to `Syntax.add_pixels` (without a ``syntax``: whenever both decoders read it
        alike), False when both decoders read another value, None once the prefix ends."""
        if self.failed:
            return None
        try:
            a, b = (tuple(int(v) for v in d.decode_uniform(1 << 16, 2)) for d in self._decoders)
        except DECODE_ERRORS:
            a = b = None
        if a is None or a != b:
            self.failed = True
            return None
        return syntax is None or a[0] | a[1] << 16 == syntax.closing_value()

    def check(self, syntax: Syntax) -> bool | None:
        """Read a group's check: True when it matches the symbols read, False when both
        decoders read another value (damage), None once the prefix ends."""
        if self.failed:
            return None
        try:
            a, b = (int(d.decode_uniform(1 << syntax.params.check_bits, 1)[0]) for d in self._decoders)
        except DECODE_ERRORS:
            a = b = None
        if a is None or a != b:
            self.failed = True
            return None
        syntax.close_group()
        return a == syntax.check_value()

    def pixels(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray | None:
        """The pixel stage's symbols (int32 [D]) or None."""
        if self.failed:
            return None
        try:
            a, b = (d.decode_gaussian(mean, std, PIXEL_LO, PIXEL_HI) for d in self._decoders)
        except DECODE_ERRORS:
            a = b = None
        if a is None or not np.array_equal(a, b):
            self.failed = True
            return None
        return a


@dataclass(frozen=True)
class StageRun:
    """The RCC stages a prefix delivers, verified, and why reading stopped."""

    stages: list[StageSymbols] = field(default_factory=list)
    stop: str = "complete"  # "complete" (all K), "limit" (as many as asked), "end" (the prefix ran
    #   out, or data no encoder writes), "check" (a group's check failed: the file is damaged)
    at_stage: int = -1  # "end" / "check": the stage being read (its group's last stage for "check")


def read_stages(reader: TwinReader, syntax: Syntax, limit: int) -> StageRun:
    """Stages 0 .. limit - 1 (at most K) as far as the prefix delivers them with their checks,
    from the stage ``syntax`` is at (0 for a fresh one; a later one after a `Checkpoint`: the
    run then holds the stages from there).

    Reads up to the check that closes the group of stage limit - 1. Without checks (block
    version 1) each stage counts once both decoders agree on it.
    """
    limit = min(limit, syntax.params.num_steps)
    first = syntax.stage
    verified: list[StageSymbols] = []
    pending: list[StageSymbols] = []
    for stage in range(first, syntax.params.num_steps):
        if first + len(verified) >= limit:
            break
        symbols = reader.stage(syntax)
        if symbols is None:
            return StageRun(verified, "end", stage)
        pending.append(symbols)
        if syntax.params.check_bits and not syntax.check_due():
            continue
        if syntax.params.check_bits:
            ok = reader.check(syntax)
            if ok is None:
                return StageRun(verified, "end", stage)
            if not ok:
                return StageRun(verified, "check", stage)
        verified += pending
        pending = []
    verified = verified[: max(0, limit - first)]
    return StageRun(verified, "complete" if first + len(verified) == syntax.params.num_steps else "limit")


@dataclass(frozen=True)
class Checkpoint:
    """Where a checked group starts in a stream: its first stage, the coder's position there
    (`RangeEncoder.pos`) and the syntax's state before it (a reader's, once it has read the
    stages before)."""

    stage: int
    position: tuple[int, tuple[int, int]]
    syntax: Syntax


def group_checkpoints(payload: bytes, params: ProgressiveParams, num_dims: int) -> list[Checkpoint]:
    """Where each group of the stages ``payload`` delivers starts, and where the last one ends
    (every stage's start, without checks): its stages read once and coded again
    (`write_stage`, which writes the same words). A reader that seeks to one carries on as one
    that read every stage before it: the range coder's state and the syntax's are the same and
    the words it reads next are the prefix's own. So a prefix known to deliver those stages is
    parsed from there (`count_stages(start=)`)."""
    run = read_stages(TwinReader(payload, 8 * len(payload), pad_words(params, num_dims)), Syntax(params, num_dims),
                      params.num_steps)
    enc, syntax = RangeEncoder(), Syntax(params, num_dims)
    points = [Checkpoint(0, enc.pos(), copy.deepcopy(syntax))]
    for symbols in run.stages:
        if write_stage(enc, syntax, symbols) or not params.check_bits:
            points.append(Checkpoint(syntax.stage, enc.pos(), copy.deepcopy(syntax)))
    return points


def pad_words(params: ProgressiveParams, num_dims: int) -> int:
    """Padding that one stage can never read past: 24 bits per symbol, 2 symbols per chunk, over
    the largest region's dimensions (a stream of one region: all of them). A stage of several
    regions reads them in turn; a reading that runs past its prefix reads the fills, which its
    two decoders tell apart within a region (its chunk indices are uniform on N >= 2), or
    within the next where the pixels agree on both fills: the pad holds two regions' pixels."""
    if params.num_regions > 1:
        num_dims = num_dims // params.num_tiles * params.region_tiles
    return (24 * (2 * num_dims + 1) + 31) // 32 + 4


def count_stages(payload: bytes, num_bits: int, params: ProgressiveParams, num_dims: int,
                 pixel_models: tuple[np.ndarray, np.ndarray] | None = None, *, limit: int | None = None,
                 start: Checkpoint | None = None) -> int:
    """How many stages a bit prefix delivers, parsing symbols only (no network).

    The pixel stage is checked only when its models (mean, std) are given. ``start``: a
    `Checkpoint` of this payload whose stages the prefix is known to deliver (parsing starts
    there; the answer is the same).
    """
    reader = TwinReader(payload, num_bits, pad_words(params, num_dims))
    if start is None:
        syntax = Syntax(params, num_dims)
    else:
        reader.seek(start.position)
        syntax = copy.deepcopy(start.syntax)
    limit = params.num_stages if limit is None else limit
    run = read_stages(reader, syntax, limit)
    first = 0 if start is None else start.stage
    if run.stop != "complete":
        return first + len(run.stages)
    if limit > params.num_steps and pixel_models is not None:
        pixels = reader.pixels(*pixel_models)
        if pixels is not None and (not syntax.closes() or reader.closing(None) is not None):
            return params.num_stages
    return params.num_steps


def write_closing(enc: RangeEncoder, syntax: Syntax) -> None:
    """The closing check after the pixel stage (version 3 with checks; nothing otherwise), over
    the pixels given to `Syntax.add_pixels`."""
    if syntax.closes():
        value = syntax.closing_value()
        enc.encode_uniform(np.array([value & 0xFFFF, value >> 16]), 1 << 16)


@dataclass(frozen=True)
class PixelTail:
    """The last region's part of the pixel stage of a stream of several regions: where it starts
    in the coder's output (`RangeEncoder.pos`) and its models (mean, std). A prefix delivers
    the whole stream when it holds the output up to there and both padded decoders, sought
    there, read the tail's pixels and the closing check alike (`tail_prefix`): what
    `count_stages` says with every region's models (tests/test_codec_progressive.py), from one
    region's models, so that nothing of the pixel stage is kept for the whole image."""

    position: tuple[int, tuple[int, int]]
    mean: np.ndarray
    std: np.ndarray


def tail_delivers(payload: bytes, num_bits: int, params: ProgressiveParams, tail: PixelTail) -> bool:
    """Whether the first ``num_bits`` bits deliver a complete stream whose pixel stage ends with ``tail``."""
    if num_bits < 32 * tail.position[0]:  # the output before the tail is not all there
        return False
    reader = TwinReader(payload, num_bits, pad_words(params, len(tail.mean)))
    reader.seek(tail.position)
    pixels = reader.pixels(tail.mean, tail.std)
    closes = params.version >= 3 and params.check_bits > 0
    return pixels is not None and (not closes or reader.closing(None) is not None)


def tail_prefix(payload: bytes, num_bits: int, params: ProgressiveParams, tail: PixelTail, lo: int = 0) -> int:
    """The fewest payload bits (in [lo, num_bits]; num_bits deliver the stream) that deliver the
    complete stream (`tail_delivers`), searched down from num_bits."""
    return first_enough(lo, num_bits, lambda bits: tail_delivers(payload, bits, params, tail), down=True)


def first_enough(lo: int, hi: int, enough: Callable[[int], bool], *, down: bool = False) -> int:
    """The smallest P in [lo, hi] with ``enough(P)``, for a predicate that never turns false as
    P grows and holds at hi. It gallops, in steps of 32, 64, ... bits, up from lo (``down``:
    down from hi) until the answer is bracketed, then bisects: few calls when the answer is
    near the end it starts from, and calls at short prefixes are the cheap ones to parse."""
    step = 32
    while lo < hi:
        mid = max(hi - step, (lo + hi) // 2) if down else min(lo + step - 1, (lo + hi) // 2)
        ok = enough(mid)
        if ok:
            hi = mid
        else:
            lo = mid + 1
        step = 2 * step if ok == down else hi - lo + 1  # still galloping, or bracketed: bisect
    return lo


def shortest_prefix(payload: bytes, num_bits: int, params: ProgressiveParams, num_dims: int, stages: int,
                    pixel_models: tuple[np.ndarray, np.ndarray] | None) -> int:
    """The fewest payload bits (<= num_bits, which deliver ``stages``) that deliver ``stages``
    stages (symbols only; the pixel stage needs ``pixel_models``). Searched down from num_bits:
    the decoder asks this of the prefix it was given, whose end is usually near the answer."""
    return first_enough(0, num_bits, lambda bits: count_stages(payload, bits, params, num_dims, pixel_models,
                                                               limit=stages) >= stages, down=True)


def shortest_prefixes(payload: bytes, params: ProgressiveParams, num_dims: int,
                      pixel_models: tuple[np.ndarray, np.ndarray] | None,
                      hints: np.ndarray | None = None, *, num_stages: int | None = None) -> np.ndarray:
    """int64 [K+1]: the fewest payload bits that deliver stages 0..k, for each k (``num_stages``:
    only the first that many, for a payload that delivers no more; the rest stay 0).

    The stages a prefix delivers, n(P), never fall as P grows, so each answer lies between
    the previous stage's answer and the whole payload. Every P parsed is remembered: the
    stages of a checked group (which arrive together) cost no parse after the first.
    ``hints`` (bits per stage, e.g. the encoder's output size once the stage's group is
    written) only say where to look first (`first_enough` from there); the answers do not
    depend on them.
    """
    total = 8 * len(payload)
    num = params.num_stages if pixel_models is not None else params.num_steps
    num = num if num_stages is None else min(num, num_stages)
    delivered: dict[int, int] = {}  # P -> n(P), the stages the first P bits deliver
    points = group_checkpoints(payload, params, num_dims)
    firsts = [p.stage for p in points]
    sought = 0  # the stage being sought: every P asked about delivers the stages before it

    def stages_in(bits: int) -> int:
        if bits not in delivered:  # parsed from the last group start at or before the stage sought
            start = points[bisect.bisect_right(firsts, sought) - 1]
            delivered[bits] = count_stages(payload, bits, params, num_dims, pixel_models, start=start)
        return delivered[bits]

    out = np.zeros(params.num_stages, dtype=np.int64)
    lo = 0
    for k in range(num):
        need, sought = k + 1, k
        # the answer lies in [lo, hi]: lo = the previous answer, raised past prefixes known to
        # deliver too little; hi = the shortest prefix known to deliver enough (or all of it)
        lo = max([lo] + [p + 1 for p, n in delivered.items() if n < need])
        hi = min([total] + [p for p, n in delivered.items() if n >= need])
        hint = int(hints[k]) if hints is not None else -1
        if lo < hint < hi:  # look at the hint first, then gallop away from it
            if stages_in(hint) >= need:
                lo = first_enough(lo, hint, lambda bits: stages_in(bits) >= need, down=True)
            else:
                lo = first_enough(hint + 1, hi, lambda bits: stages_in(bits) >= need)
        else:
            lo = first_enough(lo, hi, lambda bits: stages_in(bits) >= need)
        out[k] = lo
    return out
