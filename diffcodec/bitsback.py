"""Lossless coding with bits-back ANS over the diffusion chain (Bit-Swap order).

The file size is the negative ELBO (the paper's Eq. 5) plus a small overhead. Paper indices
in the comments (x_0 the image, x_1..x_K latents); code step k (0-based) links x_k and x_{k+1}
with beta_{k+1} = ``s.betas[k]`` and calls the network at ``s.timesteps[k]``.

Encoder, per chunk of tiles, on one ANS stack (q(x_{1:K}|x_0) = prod q(x_{k+1}|x_k) is
Markov, so no future latent is ever needed):

    pop  x_1 ~ q(x_1 | x_0);           push x_0 under p(x_0 | x_1)        (k = 0)
    pop  x_{k+1} ~ q(x_{k+1} | x_k);   push x_k under p(x_k | x_{k+1})    (k = 1 .. K-1)
    push x_K under the prior N(0, I)

Decoder, chunks in reverse order, steps in reverse order:

    pop x_K under the prior
    pop x_k under p(x_k | x_{k+1});     push x_{k+1} back under q(x_{k+1} | x_k)  (bits back)

Discretisation (`chain_grid`). Each latent x_j has its own grid of width delta_j = 2^l_j,
about 2^-b of the smallest std it is coded with, and is popped once (under q) and pushed
once (under p) on that grid, so delta_j cancels up to O(delta^2 / sigma^2). Values are coded
as offsets from the rounded mean inside a window of +-W_j bins (about c sigmas) plus an
excess beyond its edge (`AnsStack.push_gaussian_windowed`; at most W_j more under q, which
is sampled from, unbounded under p and the prior, which are only pushed). Why windows: constriction gives
every symbol of a domain at least 2^-24, so a pop from a domain of N symbols returns a
uniformly random symbol with probability ~N x 2^-24. On one fixed grid over [-R, R]
(N ~ 2^16) such strays, repeated at every step, cost 4% over the bound at K = 10 and 20%
at K = 100 (measured, tiny model); with windows N is a few thousand and strays stay within
c sigmas. The window's width matters the same way: on bins of 2^-b sigmas, those beyond about
4.7 sigmas hold less than 2^-24 each and are lifted to it, so a wider window strays more often.
Code lengths against the ideal -log2 of each symbol's Gaussian bin mass (shipped model,
K = 100, first 16 test images, `python -m bench.coder_overhead`, reports/coder_overhead.json):
c = 8 costs 0.0154 bits/dim over them, c = 5 0.0021; narrower windows cut into q itself
(a scratch run on 8 images: c = 4 0.023, c = 3 1.15).
Pixels are pushed under the discretized Gaussian decoder over the 256 levels (edge bins take
the tails, as L_0 in `likelihood`).

Scrambling: right after x_k is pushed under p, the ANS state's low bits are x_k's position
in p's CDF, so an immediate pop under q would return a quantile transform of x_k instead of
a fresh sample; with a miscalibrated p the chain then drifts from q (measured: +0.35 bits/dim
on a tiny learned-variance model at K = 100). Before each group of SCRAMBLE_GROUP pops the
encoder passes 24 bits per symbol through a keyed bijection (`AnsStack.scramble`); the
decoder undoes it after pushing the group back.

Initial bits: the stack starts with seeded pseudo-random words (known to both sides). A
chunk's pops run ahead of its pushes: when x_{k+1} is popped, x_k is still off the stack too,
so a one-tile chunk takes the stack about 2 (b + 2.05) + 2 bits per dimension below its start
(`first_dip_bits`; 18 bits/dim at b = 6) before leaving it nELBO higher. Tiles of one chunk
run in parallel and do not share initial bits; later chunks run on what earlier ones left. So
the encoder starts with a one-tile chunk and lets chunks grow as the stack fills (sizes
stored in the file). Bottom words no pop reached are left out of the file (the decoder
regenerates them): a stream pays for its deepest dip.

Bootstrap: that dip would cost a one-image file 18 bits/dim, five times its content. So the
stream's first m tiles (`bootstrap_count`: enough to cover the dip) are sent with the
progressive codec (`progressive.encode`, lossless at full length; it needs no initial bits),
and its payload is put on top of the seeded words, under one non-zero word (constriction
keeps a stack's top word only when it is non-zero). The first chunks' pops take their bits
from that payload, which the file must carry anyway, instead of from seeded words the file
would carry for nothing. The decoder, having pushed every chunk back, finds the payload on
top of the seeded words again and decodes those m tiles with the progressive decoder. A
stream of at most m tiles is the progressive payload alone.

Determinism: both sides compute coding parameters identically — float64 on the CPU from the
network's output, snapped to 2^snap_log2 bins, same chunk composition — provided the network
gives identical outputs (same device kind; ``network_float64`` makes outputs agree across
machines up to rounding far below the snap grid).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from diffcodec import progressive
from diffcodec.container import (
    MODE_BITSBACK,
    BitsBackParams,
    Container,
    Header,
    ImageEntry,
    check_model,
    pack,
    pixel_checksum,
)
from diffcodec.diffusion import p_mean_variance
from diffcodec.entropy import MAX_EXCESS, AnsStack, seeded_words, snap
from diffcodec.errors import DiffcodecError
from diffcodec.likelihood import BoundResult, ModelFn, evaluate_bound, merge_rows
from diffcodec.schedule import Schedule, make_schedule, respace

INIT_SEED = 0x6466_6362_6974_7331  # "dfcbits1": seed of the initial words (stored in the file)
BOOTSTRAP_TOP_WORD = 0xB007_5EED  # the non-zero word on top of a bootstrap payload
BOOTSTRAP_BPD_GUESS = 4.5  # bits/dim a bootstrap tile is assumed to cost (sizes the bootstrap)
# The bootstrap's progressive settings: 10-bit chunks and 2^12 candidates search about 5x faster
# than the progressive mode's 14-bit / 2^16 defaults for 5% more bits (shipped model, first 4
# CIFAR-10 test images, one per file, 1 thread: 4.64 bits/dim and 4.7 CPU-s per image in
# reports/lossless.json against 4.43 bits/dim and 20-33 s in reports/progressive.json).
BOOTSTRAP_PARAMS = progressive.ProgressiveParams(num_steps=50, chunk_bits=10.0, log2_candidates=12)
NUM_LEVELS = 256
HALF_LEVELS = (NUM_LEVELS - 1) / 2.0  # 127.5: [-1, 1] <-> 0..255
STD_FLOOR = 2.0**-8  # stds (in bins or levels) never go below this after snapping


# ------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class GridConfig:
    """How latents are discretised (stored in the file)."""

    resolution_bits: int = 6  # b: delta_j <= sigma_min,j / 2^b
    window_sigmas: int = 5  # c: half window W_j = ceil(c sigma_max,j / delta_j) (module docstring)
    prior_sigmas: int = 8  # half window of the prior push of x_K, in its sigmas
    snap_log2: int = -16  # coding parameters snapped to multiples of 2^snap_log2 bins

    def __post_init__(self) -> None:
        if not 1 <= self.resolution_bits <= 10:
            raise ValueError(f"resolution_bits must be in 1..10, got {self.resolution_bits}")
        if not 1 <= self.window_sigmas <= 64 or not 1 <= self.prior_sigmas <= 64:
            raise ValueError("window_sigmas and prior_sigmas must be in 1..64")
        if not -30 <= self.snap_log2 <= 0:
            raise ValueError(f"snap_log2 must be in -30..0, got {self.snap_log2}")


@dataclass(frozen=True)
class ChainGrid:
    """Per-latent grids: index j is latent x_j (j = 1..K); index 0 (the pixels) is unused."""

    log2_delta: tuple[int, ...]  # l_j: delta_j = 2^l_j on the [-1, 1] scale
    half_width: tuple[int, ...]  # W_j in bins of delta_j
    prior_half_width: int  # window of the prior push of x_K, bins of delta_K

    def delta(self, j: int) -> float:
        return 2.0 ** self.log2_delta[j]


def _floor_log2(x: float) -> int:
    return math.frexp(x)[1] - 1  # exact: x = m 2^e with m in [0.5, 1)


def chain_grid(s: Schedule, config: GridConfig) -> ChainGrid:
    """The grids of x_1..x_K: from the q std sqrt(beta_j), the smallest p std (posterior
    std, reached by fixedsmall/learned_range) and the largest (sqrt(beta_{j+1}))."""
    K = s.num_steps
    log2_delta, half_width = [0], [0]
    for j in range(1, K + 1):
        sigma_q = math.sqrt(s.betas[j - 1])
        if j < K:
            sigma_small = math.sqrt(s.posterior_variance[j])
            sigma_big = math.sqrt(s.betas[j])
        else:  # x_K is pushed under the prior, with its own window
            sigma_small = sigma_big = sigma_q
        lj = _floor_log2(min(sigma_q, sigma_small)) - config.resolution_bits
        wj = math.ceil(config.window_sigmas * max(sigma_q, sigma_big) * 2.0**-lj)
        log2_delta.append(lj)
        half_width.append(wj)
    prior_w = math.ceil(config.prior_sigmas * 2.0 ** -log2_delta[K])
    if max(half_width + [prior_w]) > MAX_EXCESS:
        raise ValueError("latent windows too wide for the coder; lower resolution_bits")
    return ChainGrid(tuple(log2_delta), tuple(half_width), prior_w)


# ------------------------------------------------------------------ coding parameters


def _std(std: np.ndarray, snap_log2: int) -> np.ndarray:
    return np.maximum(snap(std, snap_log2), STD_FLOOR)


def q_params(
    s: Schedule, grid: ChainGrid, config: GridConfig, j: int, prev: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q(x_j | x_{j-1}) = N(sqrt(1 - beta_j) x_{j-1}, beta_j) in bins of delta_j: (mean, std) [n].

    ``prev`` is x_{j-1}: pixel values on [-1, 1] (float64) for j = 1, else x_{j-1}'s symbols.
    Only IEEE-exact float64 operations: identical on every machine.
    """
    beta = float(s.betas[j - 1])
    if j == 1:
        prev_bins = prev * 2.0 ** -grid.log2_delta[1]
    else:
        prev_bins = prev.astype(np.float64) * 2.0 ** (grid.log2_delta[j - 1] - grid.log2_delta[j])
    mean = snap(math.sqrt(1.0 - beta) * prev_bins, config.snap_log2)
    std = _std(np.full(prev_bins.shape, math.sqrt(beta) * 2.0 ** -grid.log2_delta[j]), config.snap_log2)
    return mean, std


def p_params(
    s: Schedule, grid: ChainGrid, config: GridConfig, j: int, output: torch.Tensor, x_next: torch.Tensor,
    *, var_type: str, clip_denoised: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """p(x_j | x_{j+1}) from the network output at code step j (float64 CPU tensors), flattened.

    j = 0: pixel-level units (mean (m + 1) 127.5, std sigma 127.5) for the 0..255 decoder;
    else bins of delta_j.
    """
    t = torch.full((x_next.shape[0],), j, dtype=torch.long)
    p = p_mean_variance(s, output, x_next, t, var_type=var_type, clip_denoised=clip_denoised)
    mean = p.mean.numpy().ravel()
    std = torch.exp(0.5 * p.log_variance).numpy().ravel()
    if j == 0:
        return np.clip(snap((mean + 1.0) * HALF_LEVELS, config.snap_log2), -1.0, NUM_LEVELS), _std(
            std * HALF_LEVELS, config.snap_log2)
    scale = 2.0 ** -grid.log2_delta[j]
    return snap(mean * scale, config.snap_log2), _std(std * scale, config.snap_log2)


def pixels_to_unit(levels: np.ndarray) -> np.ndarray:
    """Integer levels 0..255 -> float64 on [-1, 1] (level / 127.5 - 1)."""
    return levels.astype(np.float64) / HALF_LEVELS - 1.0


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic torch kernels, no TF32, no cuDNN autotuning; restores the settings after."""
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # effective before CUDA starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]


# ------------------------------------------------------------------------ the chain


@dataclass(frozen=True)
class ChainSpec:
    """What both sides share besides the stack: the chain, the network, the grids."""

    model_fn: ModelFn
    schedule: Schedule
    var_type: str
    config: GridConfig = GridConfig()
    clip_denoised: bool = True
    device: torch.device | str = "cpu"
    network_dtype: torch.dtype = torch.float32

    @property
    def grid(self) -> ChainGrid:
        return chain_grid(self.schedule, self.config)

    def network(self, grid: ChainGrid, sym: np.ndarray, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Network at code step j on x_{j+1}'s symbols [B,C,H,W]: (output, x_{j+1}), float64 CPU."""
        x = torch.from_numpy(sym.astype(np.float64) * grid.delta(j + 1))
        t = torch.full((sym.shape[0],), int(self.schedule.timesteps[j]), dtype=torch.long, device=self.device)
        output = self.model_fn(x.to(device=self.device, dtype=self.network_dtype), t)
        return output.detach().to(device="cpu", dtype=torch.float64), x


class _Underflow(Exception):
    """The stack ran out of initial words; the encoder retries with more."""


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


SCRAMBLE_GROUP = 256  # symbols scrambled and popped together (bounds the extra stack dip)


def _scramble_key(j: int, start: int) -> int:
    return (INIT_SEED ^ (j * 0x9E3779B97F4A7C15) ^ (start * 0xC2B2AE3D27D4EB4F)) % (1 << 64)


def _pop_q(stack: AnsStack, mean: np.ndarray, std: np.ndarray, w: int, j: int) -> np.ndarray:
    """Pop x_j under q, group by group: scramble the bits a group will read, then pop it.

    Scrambling (`AnsStack.scramble`) decouples these samples from the symbols just pushed
    under p; doing it per group keeps the extra stack dip at 24 x SCRAMBLE_GROUP bits.
    Refuses to run the stack dry (the encoder then retries with more initial words).
    """
    out = []
    for start in range(0, mean.size, SCRAMBLE_GROUP):
        sl = slice(start, start + SCRAMBLE_GROUP)
        stack.scramble(mean[sl].size, _scramble_key(j, start))
        if stack.bulk_words < 1:
            raise _Underflow
        out.append(stack.pop_gaussian_windowed(mean[sl], std[sl], w, float(w), w))
        if stack.bulk_words < 1:
            raise _Underflow
    return np.concatenate(out)


def _push_q(stack: AnsStack, sym: np.ndarray, mean: np.ndarray, std: np.ndarray, w: int, j: int) -> None:
    """The decoder's inverse of `_pop_q`: push x_j back under q, groups in reverse order."""
    for start in reversed(range(0, mean.size, SCRAMBLE_GROUP)):
        sl = slice(start, start + SCRAMBLE_GROUP)
        stack.push_gaussian_windowed(sym[sl], mean[sl], std[sl], w, float(w), w)
        stack.unscramble(mean[sl].size, _scramble_key(j, start))


def _encode_chunk(
    spec: ChainSpec, grid: ChainGrid, stack: AnsStack, levels: np.ndarray, on_step: Callable[[int], None] | None
) -> int:
    """Encode one chunk (levels uint8 [B,C,H,W]); returns the lowest stack size (words) it reached."""
    s, cfg = spec.schedule, spec.config
    shape, K = levels.shape, s.num_steps
    prev: np.ndarray = pixels_to_unit(levels).ravel()  # x_0 on [-1, 1]; then x_j's symbols
    lowest = stack.num_words
    for k in range(K):
        j = k + 1
        # pop x_{k+1} ~ q(x_{k+1} | x_k): bits come off the stack (the decoder gives them back)
        q_mean, q_std = q_params(s, grid, cfg, j, prev)
        sym = _pop_q(stack, q_mean, q_std, grid.half_width[j], j)
        lowest = min(lowest, stack.num_words)
        # push x_k under p(x_k | x_{k+1}); the pixels under the discretized decoder at k = 0
        output, x_next = spec.network(grid, sym.reshape(shape), k)
        p_mean, p_std = p_params(s, grid, cfg, k, output, x_next, var_type=spec.var_type,
                                 clip_denoised=spec.clip_denoised)
        if k == 0:
            stack.push_gaussian(levels.ravel().astype(np.int32), p_mean, p_std, 0, NUM_LEVELS - 1)
        else:
            stack.push_gaussian_windowed(prev, p_mean, p_std, grid.half_width[k], float(grid.half_width[k]))
        prev = sym
        if on_step is not None:
            on_step(shape[0])
    # push x_K under the prior N(0, I)
    sd = 2.0 ** -grid.log2_delta[K]
    stack.push_gaussian_windowed(prev, np.zeros(prev.size), np.full(prev.size, sd), grid.prior_half_width, sd)
    return lowest


def _decode_chunk(
    spec: ChainSpec, grid: ChainGrid, stack: AnsStack, shape: tuple[int, ...], on_step: Callable[[int], None] | None
) -> np.ndarray:
    """Decode one chunk: uint8 levels [B,C,H,W] (the exact inverse of `_encode_chunk`)."""
    s, cfg = spec.schedule, spec.config
    K, size = s.num_steps, int(np.prod(shape))
    sd = 2.0 ** -grid.log2_delta[K]
    sym = stack.pop_gaussian_windowed(np.zeros(size), np.full(size, sd), grid.prior_half_width, sd)  # x_K
    levels = np.zeros(size, dtype=np.int32)
    for k in reversed(range(K)):
        j = k + 1
        output, x_next = spec.network(grid, sym.reshape(shape), k)
        p_mean, p_std = p_params(s, grid, cfg, k, output, x_next, var_type=spec.var_type,
                                 clip_denoised=spec.clip_denoised)
        if k == 0:  # x_0 under the discretized decoder
            levels = stack.pop_gaussian(p_mean, p_std, 0, NUM_LEVELS - 1)
            prev: np.ndarray = pixels_to_unit(levels)
        else:  # x_k under p(x_k | x_{k+1})
            prev = stack.pop_gaussian_windowed(p_mean, p_std, grid.half_width[k], float(grid.half_width[k]))
        # push x_{k+1} back under q(x_{k+1} | x_k): the bits the encoder borrowed
        q_mean, q_std = q_params(s, grid, cfg, j, prev)
        _push_q(stack, sym, q_mean, q_std, grid.half_width[j], j)
        sym = prev
        if on_step is not None:
            on_step(shape[0])
    return levels.astype(np.uint8).reshape(shape)


def dip_estimate_bits(num_dims: int, grid: ChainGrid, config: GridConfig) -> float:
    """A generous guess of how far one tile takes the stack down, in bits: the last pop of
    x_K and its prior push (which comes last). Steers the first chunk sizes and the pool."""
    return num_dims * (-grid.log2_delta[-1] + config.resolution_bits + 12.0)


def first_dip_bits(schedule: Schedule, grid: ChainGrid, tile_dims: int) -> float:
    """How far a one-tile chunk takes the stack below its start, in bits, when nothing has
    been pushed yet: at the pop of x_{k+1}, x_k is off the stack too, so the deepest point is
    the largest H_k + H_{k+1} (H_j: entropy of q(x_j | x_{j-1}) on x_j's grid, per tile) plus
    one scramble group. An upper estimate (the bits pushed before, about the nELBO, are not
    subtracted). Shipped model, b = 6, K = 100: 62,372 bits; a one-image file without
    bootstrap consumed 55,360 (reports/lossless.json)."""
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
    spec: ChainSpec,
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
    if not 1 <= max_batch <= 0xFFFF:
        raise ValueError(f"max_batch must be in 1..65535, got {max_batch}")
    grid = spec.grid
    dip = dip_estimate_bits(int(np.prod(tiles.shape[1:])), grid, spec.config)
    init_words = int(math.ceil(2 * dip / 32)) + 64
    while True:
        try:
            return _encode_tiles_once(spec, grid, tiles, max_batch, on_step, init_seed, init_words, dip, bootstrap)
        except _Underflow:
            init_words *= 4


def _encode_tiles_once(
    spec: ChainSpec, grid: ChainGrid, tiles: np.ndarray, max_batch: int, on_step: Callable[[int], None] | None,
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
        low = _encode_chunk(spec, grid, stack, levels[start : start + n], on_step)
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
    spec: ChainSpec,
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
    grid = spec.grid
    init = seeded_words(init_words, init_seed)
    stack = AnsStack(np.concatenate([init[:kept_words], payload]).astype(np.uint32))
    out = []
    for n in reversed(chunks):
        out.append(_decode_chunk(spec, grid, stack, (n, 3, tile_size, tile_size), on_step))
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


# ------------------------------------------------------------------ files and images


def device_kind(device: torch.device | str) -> str:
    """'cpu', or 'cuda:<GPU name>' (what the header records)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def image_tiles(images: Sequence[np.ndarray], tile: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """All tiles uint8 [M, tile, tile, 3] (bottom/right edge padding), each image's tile rows,
    each image's real dimension count."""
    from diffcodec.data import to_tiles

    tiles, groups, dims, start = [], [], [], 0
    for img in images:
        t = to_tiles(img, tile)
        tiles.append(t)
        groups.append(np.arange(start, start + len(t)))
        dims.append(img.size)
        start += len(t)
    return np.concatenate(tiles), groups, np.asarray(dims, dtype=np.int64)


@dataclass(frozen=True)
class EncodeResult:
    data: bytes  # the whole file
    header: Header
    params: BitsBackParams
    num_images: int
    num_tiles: int
    num_dims: int  # real dimensions (sum of H x W x 3; padding excluded)
    payload_bytes: int
    initial_bits: int  # initial bits the stream consumed (included in the payload)
    bound: BoundResult | None  # per image, the same K-step chain (likelihood.evaluate_bound)
    seconds: float  # coding only (wall)
    bound_seconds: float
    device: str
    cpu_seconds: float = math.nan  # coding only, CPU time of this process (all threads)
    bound_cpu_seconds: float = math.nan
    bootstrap_tiles: int = 0  # the first tiles, sent with the progressive codec
    bootstrap_bits: int = 0  # their payload (part of the payload)

    @property
    def file_bpd(self) -> float:
        return 8.0 * len(self.data) / self.num_dims

    @property
    def payload_bpd(self) -> float:
        return 8.0 * self.payload_bytes / self.num_dims

    @property
    def net_bpd(self) -> float:
        """Payload minus the initial bits: what the tiles cost (the chain's, and the bootstrap
        tiles' progressive payload)."""
        return (8.0 * self.payload_bytes - self.initial_bits) / self.num_dims

    @property
    def bound_bpd(self) -> float:
        """Total bound bits over total real dimensions (comparable with file_bpd)."""
        if self.bound is None:
            return math.nan
        return float(self.bound.total_bits.sum() / self.num_dims)


def _recorded_threads(device: torch.device | str, float64: bool) -> int:
    """The torch thread count a decoder must match: float32 CPU kernels split their sums by
    thread (measured: a file encoded with 2 threads does not decode with 1). 0 = not needed."""
    if float64 or torch.device(device).type != "cpu":
        return 0
    return min(torch.get_num_threads(), 0xFFFF)


def _model_fn(model: torch.nn.Module) -> ModelFn:
    @torch.inference_mode()
    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t)

    return call


def _spec(loaded, schedule: Schedule, config: GridConfig, var_type: str, clip: bool, device, float64: bool) -> ChainSpec:
    model = loaded.model
    if float64:
        model = copy.deepcopy(model).double()
    model = model.to(device).eval()
    return ChainSpec(_model_fn(model), schedule, var_type, config, clip, device,
                     torch.float64 if float64 else torch.float32)


def encode_images(
    loaded,
    images: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    *,
    steps: int | None = None,
    spacing: str = "quadratic",
    max_batch: int = 64,
    device: torch.device | str = "cpu",
    config: GridConfig = GridConfig(),
    float64: bool = False,
    compute_bound: bool = True,
    bound_seed: int = 0,
    bootstrap: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_bound_step: Callable[[], None] | None = None,
    on_bootstrap_stage: Callable[[int], None] | None = None,
) -> EncodeResult:
    """Encode RGB uint8 images [H, W, 3] (any sizes) into one `.dfc` file's bytes.

    ``loaded`` is a `checkpoint.LoadedModel`. With ``compute_bound`` the variational bound of
    the same tiles on the same K-step chain is computed too (one more network pass per step).
    With ``bootstrap`` the first `bootstrap_count` tiles go through the progressive codec and
    seed the stack (module docstring); ``on_bootstrap_stage(stage)`` follows that encoder.
    """
    from diffcodec.evaluate import model_schedule

    if not images:
        raise DiffcodecError("no images to encode")
    names = list(names) if names is not None else [""] * len(images)
    dc, tile = loaded.diffusion_config, loaded.model_config.image_size
    schedule = model_schedule(loaded, steps, spacing)
    tiles, groups, dims = image_tiles(images, tile)
    spec = _spec(loaded, schedule, config, dc.var_type, True, device, float64)
    m = bootstrap_count(schedule, spec.grid, len(tiles), 3 * tile * tile) if bootstrap else 0
    with deterministic_kernels():
        start, cpu_start = time.perf_counter(), time.process_time()
        boot = _encode_bootstrap(spec, dc, tiles[:m], on_bootstrap_stage) if m else None
        code = encode_tiles(spec, tiles[m:], max_batch=max_batch, on_step=on_step,
                            bootstrap=boot.payload if boot else b"")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        bound, bound_seconds, bound_cpu = None, 0.0, 0.0
        if compute_bound:
            from diffcodec.data import to_model_input

            start, cpu_start = time.perf_counter(), time.process_time()
            batches = [to_model_input(tiles[i : i + max_batch]) for i in range(0, len(tiles), max_batch)]
            per_tile = evaluate_bound(_model_fn(loaded.model), schedule, batches, var_type=dc.var_type,
                                      seed=bound_seed, device=device, on_step=on_bound_step)
            bound = merge_rows(per_tile, groups, dims)
            bound_seconds, bound_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    params = BitsBackParams(
        resolution_bits=config.resolution_bits, window_sigmas=config.window_sigmas,
        prior_sigmas=config.prior_sigmas, snap_log2=config.snap_log2, clip_denoised=True,
        network_float64=float64, threads=_recorded_threads(device, float64), spacing=spacing, init_seed=INIT_SEED,
        init_words=code.init_words, kept_words=code.kept_words,
        num_tiles=len(tiles), num_symbols=len(tiles) * 3 * tile * tile * (schedule.num_steps + 1),
        chunks=code.chunks, bootstrap_tiles=m, bootstrap_block=boot.params.pack() if boot else b"",
    )
    header = Header(
        mode=MODE_BITSBACK, device=device_kind(device), fingerprint=loaded.fingerprint, schedule=dc.schedule,
        num_timesteps=dc.num_timesteps, num_steps=schedule.num_steps, var_type=dc.var_type, tile_size=tile,
        images=tuple(ImageEntry(int(im.shape[0]), int(im.shape[1]), n) for im, n in zip(images, names)),
        pixel_sha=pixel_checksum(list(images)), params=params.pack(),
    )
    payload = code.payload.astype("<u4").tobytes()
    data = pack(Container(header, payload))
    return EncodeResult(data, header, params, len(images), len(tiles), int(dims.sum()), len(payload),
                        code.initial_bits, bound, seconds, bound_seconds, str(device), cpu_seconds, bound_cpu,
                        m, 8 * len(boot.payload) if boot else 0)


def _encode_bootstrap(spec: ChainSpec, diffusion, tiles: np.ndarray, progress: Callable[[int], None] | None):
    """The progressive stream (`progressive.Encoded`) of the bootstrap tiles uint8 [m, s, s, 3]."""
    from diffcodec.data import to_model_input

    params = replace(BOOTSTRAP_PARAMS, num_tiles=len(tiles), tile_size=tiles.shape[1],
                     network_float64=spec.network_dtype == torch.float64)
    x0 = to_model_input(tiles).to(spec.device)
    return progressive.encode(spec.model_fn, diffusion, x0, params, progress=progress)


def _decode_bootstrap(spec: ChainSpec, diffusion, payload: bytes, params) -> np.ndarray | None:
    """The bootstrap tiles uint8 [m, s, s, 3] from their progressive payload; None when its
    lossless stage does not decode (the caller reports the divergence)."""
    from diffcodec.data import from_model_output

    dec = progressive.decode(spec.model_fn, diffusion, payload, params, device=spec.device)
    return from_model_output(dec.x0) if dec.complete else None


@dataclass(frozen=True)
class DecodeResult:
    images: list[np.ndarray]  # uint8 [H, W, 3]
    names: list[str]
    seconds: float  # wall
    device: str
    cpu_seconds: float = math.nan


def check_header(loaded, container: Container, where: str = "file") -> BitsBackParams:
    """Refuse a file this checkpoint cannot decode (other model, other chain, bad counts)."""
    h = container.header
    check_model(h, loaded.fingerprint, where)
    dc, mc = loaded.diffusion_config, loaded.model_config
    if (h.schedule, h.num_timesteps, h.var_type) != (dc.schedule, dc.num_timesteps, dc.var_type):
        raise DiffcodecError(
            f"{where}: encoded for a {h.schedule} T={h.num_timesteps} {h.var_type} chain; this checkpoint is "
            f"{dc.schedule} T={dc.num_timesteps} {dc.var_type}")
    if h.tile_size != mc.image_size:
        raise DiffcodecError(f"{where}: encoded with {h.tile_size}-pixel tiles; this model takes {mc.image_size}")
    params = BitsBackParams.unpack(h.params, where)
    tile = h.tile_size
    num_tiles = sum(-(-im.height // tile) * -(-im.width // tile) for im in h.images)
    if params.num_tiles != num_tiles or params.num_symbols != num_tiles * 3 * tile * tile * (h.num_steps + 1):
        raise DiffcodecError(f"{where}: corrupt header (tile or symbol counts do not match the image sizes)")
    if len(container.payload) % 4 or len(container.payload) < 8:
        raise DiffcodecError(f"{where}: corrupt payload ({len(container.payload)} bytes)")
    if params.bootstrap_tiles:
        boot = progressive.ProgressiveParams.unpack(params.bootstrap_block, where)
        if (boot.num_tiles, boot.tile_size, boot.network_float64) != (
                params.bootstrap_tiles, tile, params.network_float64) or boot.payload_bits % 8:
            raise DiffcodecError(f"{where}: corrupt header (bootstrap parameters disagree with the stream)")
    return params


def decode_container(
    loaded,
    container: Container,
    *,
    device: torch.device | str = "cpu",
    where: str = "file",
    on_step: Callable[[int], None] | None = None,
) -> DecodeResult:
    """Decode a bits-back container; verifies the pixel checksum (DiffcodecError if it fails)."""
    from diffcodec.data import from_tiles

    h = container.header
    params = check_header(loaded, container, where)
    schedule = make_schedule(h.schedule, h.num_timesteps)
    schedule = respace(schedule, h.num_steps, params.spacing) if h.num_steps != h.num_timesteps else schedule
    config = GridConfig(params.resolution_bits, params.window_sigmas, params.prior_sigmas, params.snap_log2)
    spec = _spec(loaded, schedule, config, h.var_type, params.clip_denoised, device, params.network_float64)
    payload = np.frombuffer(container.payload, dtype="<u4").astype(np.uint32)
    boot_params = None
    if params.bootstrap_tiles:
        boot_params = progressive.ProgressiveParams.unpack(params.bootstrap_block, where)
    with deterministic_kernels():
        start, cpu_start = time.perf_counter(), time.process_time()
        tiles, stack_ok, boot = decode_tiles(
            spec, payload, chunks=params.chunks, tile_size=h.tile_size, init_words=params.init_words,
            kept_words=params.kept_words, init_seed=params.init_seed, on_step=on_step,
            bootstrap_bytes=boot_params.payload_bits // 8 if boot_params else 0)
        if boot_params is not None and stack_ok:
            boot_tiles = _decode_bootstrap(spec, loaded.diffusion_config, boot, boot_params)
            stack_ok = boot_tiles is not None
            tiles = np.concatenate([boot_tiles, tiles]) if stack_ok else tiles
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    images, start_tile = [], 0
    for im in h.images if stack_ok else ():
        n = -(-im.height // h.tile_size) * -(-im.width // h.tile_size)
        images.append(from_tiles(tiles[start_tile : start_tile + n], im.height, im.width))
        start_tile += n
    if not stack_ok or pixel_checksum(images) != h.pixel_sha:
        here = device_kind(device)
        threads_here = _recorded_threads(device, params.network_float64)
        if here == h.device and params.threads and threads_here != params.threads:
            raise DiffcodecError(
                f"{where}: decoding diverged: the file was encoded with {params.threads} torch CPU thread(s) in "
                f"float32 and this decoder ran {threads_here}; decode with {params.threads} "
                "(files encoded with --float64 decode with any thread count)")
        if here != h.device:
            raise DiffcodecError(
                f"{where}: decoding diverged: the file was encoded on {h.device} and decoding on {here} computed "
                f"different coding parameters (pixel checksum mismatch); decode on {h.device.split(':')[0]}")
        raise DiffcodecError(f"{where}: pixel checksum mismatch after decoding (corrupt payload, or "
                             "non-deterministic kernels on this machine); nothing written")
    return DecodeResult(images, [im.name for im in h.images], seconds, str(device), cpu_seconds)


# --------------------------------------------------------------------------- CLI helpers


def decode_device(requested: str, encoded_on: str) -> torch.device:
    """'auto' -> the encoder's device kind when this machine has it (cuda for 'cuda:...' files,
    cpu for 'cpu' files), else what is available; anything else as given."""
    if requested != "auto":
        return torch.device(requested)
    if encoded_on.startswith("cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if encoded_on == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def _safe_stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base.lower().endswith(_IMAGE_SUFFIXES):
        base = base.rsplit(".", 1)[0]
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in base).strip("._")
    return cleaned[:120]


def output_paths(out: str | os.PathLike, names: Sequence[str], *, force: bool = False) -> list[str]:
    """Where decoded images go: OUT itself for one image when OUT ends in .png, else one PNG
    per image in the directory OUT, named from the stored names (the index when names are
    missing or collide). Refuses existing files unless ``force``; creates nothing."""
    out = os.fspath(out)
    n = len(names)
    if out.lower().endswith(".png"):
        if n != 1:
            raise DiffcodecError(f"{out}: the file holds {n} images; give a directory for -o")
        targets = [out]
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            raise DiffcodecError(f"{out}: exists and is not a directory")
        stems = [_safe_stem(name) for name in names]
        if any(not s for s in stems) or len(set(stems)) != n:
            stems = [f"{i:05d}" + (f"_{s}" if s else "") for i, s in enumerate(stems)]
        targets = [os.path.join(out, f"{s}.png") for s in stems]
    if not force:
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise DiffcodecError(f"{existing[0]}: already exists{more}; pass --force to overwrite")
    return targets
