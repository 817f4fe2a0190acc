"""Many tiles on one ANS stack: chunk sizes, initial words and the bootstrap's place on it.

Initial bits: the stack starts with seeded pseudo-random words (known to both sides). A
chunk's pops run ahead of its pushes: when x_{k+1} is popped, x_k is still off the stack
too, so a one-tile chunk takes the stack about 2 (b + 2.05) + 2 bits per dimension below its
start (`first_dip_bits`) before leaving it nELBO higher. Tiles of one chunk run in parallel
and do not share initial bits; later chunks run on what earlier ones left. So the encoder
starts with a one-tile chunk and lets chunks grow as the stack fills (sizes stored in the
file). Bottom words no pop reached are left out of the file (the decoder regenerates them):
a stream pays for its deepest dip.

Bootstrap: that dip would cost a one-image file about 18 bits/dim. So the stream's first m
tiles (`bootstrap_count`: enough to cover the dip) are sent with the progressive codec
(which needs no initial bits, `bitsback.file`), and its payload is put on top of the seeded
words under one non-zero word (`bootstrap_words`; constriction keeps a stack's top word
only when it is non-zero). The first chunks' pops take their bits from that payload, which
the file must carry anyway. The decoder, having pushed every chunk back, finds the payload
on top of the seeded words again (`decode_tiles`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffcodec.codec.bitsback.chain import INIT_SEED, SCRAMBLE_GROUP, ChainCoder, ChainGrid, GridConfig, Underflow
from diffcodec.codec.entropy import AnsStack, seeded_words
from diffcodec.schedule import Schedule

BOOTSTRAP_TOP_WORD = 0xB007_5EED  # the non-zero word on top of a bootstrap payload
BOOTSTRAP_BPD_GUESS = 4.5  # bits/dim a bootstrap tile is assumed to cost (sizes the bootstrap)
MAX_CHUNK_TILES = 0xFFFF  # the chunk table's u16


@dataclass(frozen=True)
class TileCode:
    """The coded stream of a set of tiles."""

    payload: np.ndarray  # uint32 words: the final stack minus its untouched bottom words
    init_words: int  # seeded initial words
    kept_words: int  # of them, left out of the payload
    chunks: tuple[int, ...]

    @property
    def initial_bits(self) -> int:
        """Bits of seeded initial words the stream consumed (its deepest dip below the bootstrap)."""
        return 32 * (self.init_words - self.kept_words)


def dip_estimate_bits(num_dims: int, grid: ChainGrid, config: GridConfig) -> float:
    """A generous guess of how far one tile takes the stack down, in bits: the last pop of
    x_K and its prior push (which comes last). Steers the first chunk sizes and the pool."""
    return num_dims * (-grid.log2_delta[-1] + config.resolution_bits + 12.0)


def first_dip_bits(schedule: Schedule, grid: ChainGrid, tile_dims: int) -> float:
    """How far a one-tile chunk takes the stack below its start, in bits, when nothing has
    been pushed yet: at the pop of x_{k+1}, x_k is off the stack too, so the deepest point is
    the largest H_k + H_{k+1} (H_j: entropy of q(x_j | x_{j-1}) on x_j's grid, per tile) plus
    one scramble group. An upper estimate (the bits pushed before, about the nELBO, are not
    subtracted); `tests/test_codec_bitsback.py` checks it bounds the measured dip."""
    K = schedule.num_steps
    gauss = 0.5 * math.log2(2.0 * math.pi * math.e)
    h = [0.0] + [tile_dims * (math.log2(math.sqrt(schedule.betas[j - 1])) - grid.log2_delta[j] + gauss)
                 for j in range(1, K + 1)]
    deepest = max(h[k] + h[k + 1] for k in range(K))
    return deepest + 24.0 * SCRAMBLE_GROUP


def bootstrap_count(schedule: Schedule, grid: ChainGrid, num_tiles: int, tile_dims: int) -> int:
    """How many of a stream's first tiles to send with the progressive codec: enough that
    their payload (about BOOTSTRAP_BPD_GUESS bits/dim) covers the first chunk's dip, so that
    no seeded word is consumed; all of them when the stream is that short."""
    need = first_dip_bits(schedule, grid, tile_dims) / (BOOTSTRAP_BPD_GUESS * tile_dims)
    return int(min(num_tiles, math.ceil(need)))


def bootstrap_words(payload: bytes) -> np.ndarray:
    """A bootstrap payload as the words it occupies on the stack: little-endian words (zero
    padded) and the non-zero top word."""
    padded = payload + b"\0" * (-len(payload) % 4)
    return np.append(np.frombuffer(padded, dtype="<u4").astype(np.uint32), np.uint32(BOOTSTRAP_TOP_WORD))


def encode_tiles(
    coder: ChainCoder,
    tiles: np.ndarray,
    *,
    max_batch: int = 64,
    on_step: Callable[[int], None] | None = None,
    init_seed: int = INIT_SEED,
    bootstrap: bytes = b"",
) -> TileCode:
    """Encode uint8 tiles [M, H, W, 3] into one stack (see the module docstring), on top of
    the seeded words and the ``bootstrap`` payload when one is given (then M may be 0).

    ``on_step(n)`` is called after each code step of a chunk of n tiles.
    """
    if tiles.ndim != 4 or tiles.shape[3] != 3 or tiles.dtype != np.uint8 or (len(tiles) == 0 and not bootstrap):
        raise ValueError(f"encode_tiles: expected uint8 [M, H, W, 3] with M >= 1, got {tiles.dtype} {list(tiles.shape)}")
    if not 1 <= max_batch <= MAX_CHUNK_TILES:
        raise ValueError(f"max_batch must be in 1..{MAX_CHUNK_TILES}, got {max_batch}")
    grid = coder.grid
    dip = dip_estimate_bits(int(np.prod(tiles.shape[1:])), grid, coder.config)
    init_words = int(math.ceil(2 * dip / 32)) + 64
    while True:
        try:
            return _encode_tiles_once(coder, grid, tiles, max_batch, on_step, init_seed, init_words, dip, bootstrap)
        except Underflow:
            init_words *= 4


def _encode_tiles_once(
    coder: ChainCoder, grid: ChainGrid, tiles: np.ndarray, max_batch: int, on_step: Callable[[int], None] | None,
    init_seed: int, init_words: int, dip_guess_bits: float, bootstrap: bytes,
) -> TileCode:
    init = seeded_words(init_words, init_seed)
    stack = AnsStack(np.concatenate([init, bootstrap_words(bootstrap)]) if bootstrap else init)
    levels = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))  # [M, C, H, W]
    chunks: list[int] = []
    lowest = stack.num_words  # lowest stack size (words) so far
    dips: list[float] = []  # measured dip of each chunk, bits per tile
    start = 0
    while start < len(levels):
        # as many tiles as the stack can carry above its lowest point so far (at least one)
        per_tile = max(dips) if dips else dip_guess_bits
        room_bits = 32.0 * (stack.num_words - lowest)
        n = int(max(1, min(max_batch, len(levels) - start, room_bits // (1.05 * per_tile))))
        before = stack.num_words
        low = coder.encode_chunk(grid, stack, levels[start : start + n], on_step)
        dips.append(max(32.0 * (before - low) / n, 1.0))
        lowest = min(lowest, low)
        chunks.append(n)
        start += n
    words = stack.words()
    kept = _untouched_prefix(words, init)  # seeded words only: the decoder cannot regenerate the bootstrap
    return TileCode(payload=words[kept:].copy(), init_words=init_words, kept_words=kept, chunks=tuple(chunks))


def _untouched_prefix(words: np.ndarray, init: np.ndarray) -> int:
    """How many bottom words of the final stack equal the initial words (left out of the file).
    The head state (last two words) always stays in the payload."""
    n = min(len(words), len(init))
    diff = np.flatnonzero(words[:n] != init[:n])
    prefix = int(diff[0]) if diff.size else n
    return max(0, min(prefix, len(words) - 2))


def decode_tiles(
    coder: ChainCoder,
    payload: np.ndarray,
    *,
    chunks: Sequence[int],
    tile_size: int,
    init_words: int,
    kept_words: int,
    init_seed: int = INIT_SEED,
    bootstrap_bytes: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, bool, bytes]:
    """Decode uint8 tiles [M, tile, tile, 3] (M = sum(chunks)); whether the stack ended as
    the encoder's initial words (False: the decoder diverged from the encoder, or the payload
    is corrupt); and the bootstrap payload (``bootstrap_bytes`` long) found on top of them."""
    grid = coder.grid
    init = seeded_words(init_words, init_seed)
    stack = AnsStack(np.concatenate([init[:kept_words], payload]).astype(np.uint32))
    out = []
    try:
        for n in reversed(chunks):
            out.append(coder.decode_chunk(grid, stack, (n, 3, tile_size, tile_size), on_step))
    except ValueError:  # a symbol no encoder could have pushed back: corrupt payload (or divergence)
        return np.zeros((0, tile_size, tile_size, 3), dtype=np.uint8), False, b""
    tiles = np.concatenate(out[::-1]) if out else np.zeros((0, 3, tile_size, tile_size), dtype=np.uint8)
    tiles = np.ascontiguousarray(tiles.transpose(0, 2, 3, 1))
    words = stack.words()
    if not bootstrap_bytes:
        return tiles, bool(np.array_equal(words, init)), b""
    top = -(-bootstrap_bytes // 4) + 1
    ok = len(words) == len(init) + top and np.array_equal(words[: len(init)], init) \
        and int(words[-1]) == BOOTSTRAP_TOP_WORD
    boot = words[len(init) : -1].astype("<u4").tobytes()[:bootstrap_bytes] if ok else b""
    return tiles, bool(ok), boot
