"""The progressive codec: the paper's Algorithms 3 ("Sending x_0") and 4 ("Receiving") as a
prefix bitstream, with reverse channel coding (`rcc`) for every latent.

Chain. A coded schedule keeps K of the model's T steps (`coded_timesteps`; the default
``quadratic`` spacing puts more of them near t = 0, where the bits are) with the algebra of
``schedule.respace``; the network is always called with the original timestep. Latents
y_k = x at code step k of that chain (abar_k = abar[timesteps[k]]), k = K-1 .. 0. The
stream holds K + 1 stages, in order:

    stage 0          y_{K-1} ~ q(y_{K-1} | x_0) sent using p(y_{K-1}) = N(0, I)       Alg. 3 line 1
    stage j (1..K-1) y_{K-1-j} ~ q(. | y_{K-j}, x_0) sent using p_theta(. | y_{K-j})   Alg. 3 lines 2-4
    stage K          x_0 under the discretized Gaussian p_theta(x_0 | y_0)             Alg. 3 line 5

Stage syntax (one range-coder stream, FIFO, stage k strictly before stage k + 1):

    level L       the stage's KL(q || p) in bits on a half-bit log grid, L = round(2 log2 KL) + 21
                  (0 = below 2^-10.25 bits: nothing else is sent, the decoder takes candidate 0);
                  a categorical law peaked at the previous levels' trend (`level_probs`)
    exponents     the dimensions are shuffled by a keyed permutation and split into
                  n = ceil(KL(L) / chunk_bits) near-equal chunks of nominal KL kappa = KL(L) / n;
                  each chunk's PFR index (`rcc`) is sent as its exponent under an adaptive law
                  with context kappa (`rcc.ExponentModel`, updated after each stage) ...
    mantissas     ... then the bits below the leading one, uniformly
    pixels        (stage K) one symbol per dimension, QuantizedGaussian on 0..255 in pixel
                  units, mean and std snapped to a 2^snap_log2 grid

The symbols of stages 0..K-1 depend on the stream alone, never on the network, so a
decoder whose arithmetic differs slightly still parses every stage and gets a slightly
different but valid image; only stage K needs bit-identical network outputs, and the
caller's pixel checksum catches a mismatch there. On a CPU, float32 outputs change with the
thread count and the batch (measured: ~5e-7), so a float32 stream decodes losslessly only
with the encoder's settings; ``network_float64`` lifts that (a slower network).

Prefix property. The payload is the coder's 32-bit words as BIG-endian bytes, so that the
first bits of the file are the most significant bits of the code value. Given any bit
prefix, the decoder runs two decoders, one on the prefix padded with zeros and one padded
with ones (the smallest and largest code values the rest could hold); a stage counts as
received only if both decode it to the same symbols, which then are the encoder's (the
code values that decode to a given symbol sequence form an interval). The encoder cuts
the payload to the shortest prefix that decodes every stage, and records the shortest
prefix for each stage (the real cumulative rate). (A padded decoder that meets data no
encoder could write counts as a mismatch: conservative, never wrong.)

Cost. Each chunk pays about log2(kappa + 1) + O(1) bits over its KL (the PFR index's
spread); each stage a level symbol (a few bits). Candidates per chunk are capped at
2^log2_candidates, so a chunk whose KL exceeds that sends a sample between p and q: fewer
bits now, more in later stages. Payload bytes carry no redundancy: a corrupted payload
still decodes to some image, and only the checksum at full length notices.
"""

from __future__ import annotations

import copy
import hashlib
import math
import struct
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch

from diffcodec import rcc
from diffcodec.config import DiffusionConfig
from diffcodec.diffusion import p_mean_variance, predict_eps_from_xstart, q_mean_variance, q_posterior_mean_variance
from diffcodec.entropy import RangeDecoder, RangeEncoder, snap
from diffcodec.errors import DiffcodecError
from diffcodec.evaluate import usable_cores
from diffcodec.likelihood import LN2, discretized_gaussian_log_likelihood_nats
from diffcodec.schedule import Schedule, keep_timesteps, make_schedule, quadratic_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Append-only: the index is written into files.
SPACINGS = ("quadratic", "uniform")
RECONSTRUCTIONS = ("xstart", "ddim")

NUM_LEVELS = 96
LEVEL_OFFSET = 21  # level 1 <-> 2^-10 bits, level 95 <-> 2^37 bits
PIXEL_LO, PIXEL_HI = 0, 255
_PERMUTATION_STREAM = 0  # chunk c of a stage uses key word 1 + c
_DECODE_ERRORS = (AssertionError, ValueError, OverflowError)  # constriction on invalid data


# ------------------------------------------------------------------------------ schedule


def coded_timesteps(num_timesteps: int, num_steps: int, spacing: str = "quadratic") -> np.ndarray:
    """K increasing original timesteps in 0..T-1, always 0 and T-1 (int64 [K]).

    ``quadratic``: t_k = round(k^2 (T-1) / (K-1)^2), then pushed apart to be distinct
    (dense near t = 0); ``uniform``: as ``schedule.respaced_timesteps``. Integer arithmetic
    only, so both sides agree exactly.
    """
    if spacing not in SPACINGS:
        raise DiffcodecError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if not 1 <= num_steps <= num_timesteps:
        raise DiffcodecError(f"number of coded steps must be 1..T = {num_timesteps}, got {num_steps}")
    if spacing == "quadratic":
        return quadratic_timesteps(num_timesteps, num_steps)
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    k = np.arange(num_steps, dtype=np.int64)
    last, span = num_steps - 1, num_timesteps - 1
    return (k * span + last // 2) // last  # distinct: consecutive values differ by >= 1 as span >= last


def coded_schedule(diffusion: DiffusionConfig, num_steps: int, spacing: str = "quadratic") -> Schedule:
    """The model's schedule kept at ``coded_timesteps`` (alpha-bars equal to the original's)."""
    base = make_schedule(diffusion.schedule, diffusion.num_timesteps)
    return keep_timesteps(base, coded_timesteps(diffusion.num_timesteps, num_steps, spacing))


# -------------------------------------------------------------------------------- params


@dataclass(frozen=True)
class ProgressiveParams:
    """Everything the decoder needs besides the model (the mode-1 parameter block)."""

    num_steps: int = 50  # K coded latents
    spacing: str = "quadratic"
    log2_candidates: int = 16  # at most 2^this candidates per chunk; the index law's range
    chunk_bits: float = 14.0  # nominal KL per chunk (quarter-bit resolution)
    pad_bits: float = 2.0  # encoder: 2^ceil(KL_chunk + pad) candidates (recorded, not needed to decode)
    seed: int = 0  # the shared randomness
    snap_log2: int = -16  # pixel-stage parameters on a 2^snap_log2 grid (pixel-level units)
    clip_denoised: bool = True
    network_float64: bool = False  # run the network and the latents in float64 (see `encode`)
    num_tiles: int = 1
    tile_size: int = 32
    payload_bits: int = 0  # the complete stream's length in bits (set by the encoder)

    _FIXED = struct.Struct("<BBHBBBbBIHII")  # 23 bytes, see `pack`
    BLOCK_VERSION = 1

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
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

    def pack(self) -> bytes:
        """The mode-1 parameter block (little-endian):

            0  u8  block version (1)          8   u8  flags: bit 0 clip_denoised, bit 1 network_float64
            1  u8  spacing (index in SPACINGS) 9  u32 number of tiles
            2  u16 K coded steps              13  u16 tile size
            4  u8  log2 candidates            15  u32 shared seed
            5  u8  chunk bits x 4             19  u32 payload bits of the complete stream
            6  u8  pad bits x 4 (encoder's choice, recorded)
            7  i8  log2 of the pixel-parameter snap grid (pixel-level units)
        """
        return self._FIXED.pack(
            self.BLOCK_VERSION, SPACINGS.index(self.spacing), self.num_steps, self.log2_candidates,
            int(self.chunk_bits * 4), int(self.pad_bits * 4), self.snap_log2,
            int(self.clip_denoised) | (int(self.network_float64) << 1),
            self.num_tiles, self.tile_size, self.seed, self.payload_bits,
        )

    @classmethod
    def unpack(cls, block: bytes, where: str = "file") -> ProgressiveParams:
        if len(block) != cls._FIXED.size:
            raise DiffcodecError(f"{where}: corrupt progressive parameter block ({len(block)} bytes)")
        (version, spacing, num_steps, log2_n, chunk_q, pad_q, snap_log2, flags, num_tiles, tile_size, seed,
         payload_bits) = cls._FIXED.unpack(block)
        if version != cls.BLOCK_VERSION:
            raise DiffcodecError(f"{where}: progressive block version {version}; this diffcodec reads "
                                 f"{cls.BLOCK_VERSION}")
        if spacing >= len(SPACINGS):
            raise DiffcodecError(f"{where}: corrupt progressive parameters (spacing {spacing})")
        try:
            return cls(num_steps, SPACINGS[spacing], log2_n, chunk_q / 4, pad_q / 4, seed, snap_log2,
                       bool(flags & 1), bool(flags & 2), num_tiles, tile_size, payload_bits)
        except ValueError as e:
            raise DiffcodecError(f"{where}: corrupt progressive parameters ({e})") from None

    @property
    def num_stages(self) -> int:
        return self.num_steps + 1


# ------------------------------------------------------------------------ stream syntax


def level_of_kl(kl_bits: float) -> int:
    """The level sent for a stage's KL: 0 below 2^-10.25 bits, else round(2 log2 KL) + 21."""
    if not math.isfinite(kl_bits):
        raise ValueError(f"progressive: the KL of a stage is {kl_bits}")
    if kl_bits < 2.0 ** ((0.5 - LEVEL_OFFSET) / 2):
        return 0
    return int(min(max(round(2.0 * math.log2(kl_bits)) + LEVEL_OFFSET, 1), NUM_LEVELS - 1))


def kl_of_level(level: int) -> float:
    """The nominal KL (bits) of a level: 0 for level 0, else 2^((L - 21) / 2)."""
    return 0.0 if level == 0 else 2.0 ** ((level - LEVEL_OFFSET) / 2.0)


def level_probs(history: list[int]) -> np.ndarray:
    """Integer counts [NUM_LEVELS] of the next level, given the levels so far.

    Two-sided geometric (halving every 1.5 levels) around the last level plus its last
    increase (the KL grows as t falls); broad around 2 bits for the first stage.
    """
    levels = np.arange(NUM_LEVELS, dtype=np.float64)
    if not history:
        center, scale = float(LEVEL_OFFSET + 2), 8.0
    else:
        trend = history[-1] - history[-2] if len(history) >= 2 else 0
        center, scale = float(history[-1] + min(max(trend, 0), 8)), 1.5
    p = np.exp2(-np.abs(levels - center) / scale)
    return np.maximum(np.rint(p * 2.0**16), 1.0)


@dataclass(frozen=True)
class StageSymbols:
    """What one RCC stage sends: its level and one PFR index per chunk."""

    level: int
    indices: np.ndarray  # int64 [num_chunks]; [0] for level 0


class Syntax:
    """The symbol-level state both sides keep in step: level history, exponent counts."""

    def __init__(self, params: ProgressiveParams, num_dims: int) -> None:
        self.params = params
        self.num_dims = num_dims
        self.levels: list[int] = []
        self.exponents = rcc.ExponentModel(params.log2_candidates)

    def chunking(self, level: int) -> tuple[int, float]:
        """(number of chunks, nominal KL per chunk in bits) of a level."""
        if level == 0:
            return 1, 0.0
        kl = kl_of_level(level)
        n = int(min(max(math.ceil(kl / self.params.chunk_bits), 1), self.num_dims))
        return n, kl / n

    def commit(self, symbols: StageSymbols) -> None:
        self.levels.append(symbols.level)
        if symbols.level:
            _, kappa = self.chunking(symbols.level)
            for i in symbols.indices:
                self.exponents.update(kappa, rcc.split_index(int(i))[0])


def write_stage(enc: RangeEncoder, syntax: Syntax, symbols: StageSymbols) -> None:
    """Encode one RCC stage's symbols and advance ``syntax``."""
    enc.encode_categorical(np.array([symbols.level]), level_probs(syntax.levels)[None])
    if symbols.level:
        n, kappa = syntax.chunking(symbols.level)
        if len(symbols.indices) != n:
            raise ValueError(f"progressive: level {symbols.level} needs {n} indices, got {len(symbols.indices)}")
        parts = [rcc.split_index(int(i)) for i in symbols.indices]
        exps = np.array([m for m, _ in parts], dtype=np.int64)
        if exps.max() > syntax.params.log2_candidates:
            raise ValueError("progressive: an index exceeds the candidate range")
        probs = syntax.exponents.probs(kappa)
        enc.encode_categorical(exps, np.broadcast_to(probs, (n, len(probs))))
        sizes = np.array([rcc.mantissa_size(m) for m in exps], dtype=np.int64)
        coded = sizes > 1
        if coded.any():
            enc.encode_uniform(np.array([r for (_, r) in parts], dtype=np.int64)[coded], sizes[coded])
    syntax.commit(symbols)


def read_stage(dec: RangeDecoder, syntax: Syntax) -> StageSymbols:
    """Decode one RCC stage's symbols (does NOT advance ``syntax``; see `TwinReader`).

    Raises one of ``_DECODE_ERRORS`` on data that no encoder could have written.
    """
    level = int(dec.decode_categorical(level_probs(syntax.levels)[None])[0])
    if level == 0:
        return StageSymbols(0, np.zeros(1, dtype=np.int64))
    n, kappa = syntax.chunking(level)
    probs = syntax.exponents.probs(kappa)
    exps = dec.decode_categorical(np.broadcast_to(probs, (n, len(probs)))).astype(np.int64)
    sizes = np.array([rcc.mantissa_size(int(m)) for m in exps], dtype=np.int64)
    mant = np.zeros(n, dtype=np.int64)
    coded = sizes > 1
    if coded.any():
        mant[coded] = dec.decode_uniform(sizes[coded], int(coded.sum()))
    return StageSymbols(level, np.array([rcc.join_index(int(m), int(r)) for m, r in zip(exps, mant)], dtype=np.int64))


def _pixel_params(p_mean: torch.Tensor, p_log_var: torch.Tensor, snap_log2: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 [D] mean and std of the pixel stage in pixel-level units (0..255), snapped."""
    mean = snap((p_mean.double().cpu().numpy().ravel() + 1.0) * 127.5, snap_log2)
    std = snap(np.exp(0.5 * p_log_var.double().cpu().numpy().ravel()) * 127.5, snap_log2)
    return np.clip(mean, -1e4, 1e4), np.maximum(std, 2.0**snap_log2)


class TwinReader:
    """Reads a bit prefix of the payload twice: padded with zeros and padded with ones.

    A stage counts as received only when both decoders return the same symbols (and neither
    meets invalid data); those are then the encoder's symbols whatever the missing bits are.
    """

    def __init__(self, payload: bytes, num_bits: int, pad_words: int) -> None:
        num_bits = max(0, min(int(num_bits), 8 * len(payload)))
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:num_bits]
        total_words = -(-num_bits // 32) + pad_words + 2
        self.num_bits = num_bits
        self._decoders = []
        for fill in (0, 1):
            padded = np.full(32 * total_words, fill, dtype=np.uint8)
            padded[:num_bits] = bits
            words = np.packbits(padded).view(">u4").astype(np.uint32)
            self._decoders.append(RangeDecoder(words))
        self.failed = False

    def stage(self, syntax: Syntax) -> StageSymbols | None:
        """The next RCC stage's symbols (and advance ``syntax``), or None once the prefix ends."""
        if self.failed:
            return None
        try:
            a, b = (read_stage(d, syntax) for d in self._decoders)
        except _DECODE_ERRORS:
            a = b = None
        if a is None or a.level != b.level or not np.array_equal(a.indices, b.indices):
            self.failed = True
            return None
        syntax.commit(a)
        return a

    def pixels(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray | None:
        """The pixel stage's symbols (int32 [D]) or None."""
        if self.failed:
            return None
        try:
            a, b = (d.decode_gaussian(mean, std, PIXEL_LO, PIXEL_HI) for d in self._decoders)
        except _DECODE_ERRORS:
            a = b = None
        if a is None or not np.array_equal(a, b):
            self.failed = True
            return None
        return a


def _pad_words(params: ProgressiveParams, num_dims: int) -> int:
    """Padding that one stage can never read past: 24 bits per symbol, 2 symbols per chunk."""
    return (24 * (2 * num_dims + 1) + 31) // 32 + 4


def count_stages(payload: bytes, num_bits: int, params: ProgressiveParams, num_dims: int,
                 pixel_models: tuple[np.ndarray, np.ndarray] | None = None, *, limit: int | None = None) -> int:
    """How many stages a bit prefix delivers, parsing symbols only (no network).

    The pixel stage is checked only when its models (mean, std) are given.
    """
    reader = TwinReader(payload, num_bits, _pad_words(params, num_dims))
    syntax = Syntax(params, num_dims)
    limit = params.num_stages if limit is None else limit
    for stage in range(min(limit, params.num_steps)):
        if reader.stage(syntax) is None:
            return stage
    if limit > params.num_steps and pixel_models is not None:
        if reader.pixels(*pixel_models) is not None:
            return params.num_stages
    return min(limit, params.num_steps)


def shortest_prefixes(payload: bytes, params: ProgressiveParams, num_dims: int,
                      pixel_models: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """int64 [K+1]: the fewest payload bits that deliver stages 0..k, for each k (binary search)."""
    total = 8 * len(payload)
    num = params.num_stages if pixel_models is not None else params.num_steps
    out = np.zeros(params.num_stages, dtype=np.int64)
    lo = 0
    for k in range(num):
        hi = total
        while lo < hi:  # smallest P in [lo, hi] with count >= k + 1 (monotone in P)
            mid = (lo + hi) // 2
            if count_stages(payload, mid, params, num_dims, pixel_models, limit=k + 1) >= k + 1:
                hi = mid
            else:
                lo = mid + 1
        out[k] = lo
    return out


# ---------------------------------------------------------------------------- the codec


class StageClock:
    """Seconds spent per activity ('network', 'candidates', 'entropy', ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start


@dataclass(frozen=True)
class Encoded:
    """The encoder's output and what it measured. Bits count the payload only."""

    params: ProgressiveParams  # with payload_bits set
    payload: bytes
    prefix_bits: np.ndarray  # int64 [K+1]: shortest payload prefix that delivers stages 0..k
    kl_bits: np.ndarray  # float64 [K+1]: the analytic cost of each stage on this trajectory
    #   (prior KL, the KL terms L_{t}, and -log2 p(x_0 | y_0) with the exact normal CDF)
    timesteps: np.ndarray  # int64 [K+1]: original timestep of each stage's latent (-1: x_0)
    levels: np.ndarray  # int64 [K]
    num_chunks: np.ndarray  # int64 [K]
    xstart_mse: np.ndarray  # float64 [K]: MSE on [0,255] of x^_0 predicted from each stage's latent
    seconds: dict[str, float] = field(default_factory=dict)


def _latent(p_mean: torch.Tensor, p_log_var: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """y = mean_p + std_p * u, computed in float64, returned in p_mean's dtype [like p_mean]."""
    mean = p_mean.double().cpu().numpy().ravel()
    std = np.exp(0.5 * p_log_var.double().cpu().numpy().ravel())
    y = (mean + std * u.astype(np.float64)).astype(np.float64 if p_mean.dtype == torch.float64 else np.float32)
    return torch.from_numpy(y.reshape(p_mean.shape)).to(p_mean.device)


def _chunks(params: ProgressiveParams, stage: int, num_dims: int, num_chunks: int) -> list[np.ndarray]:
    """The stage's keyed permutation of the dimensions, split into near-equal chunks."""
    raw = np.random.PCG64(np.random.SeedSequence([params.seed, stage, _PERMUTATION_STREAM])).random_raw(num_dims)
    perm = np.argsort(raw, kind="stable")
    return np.array_split(perm, num_chunks)


def _sample_stage(params: ProgressiveParams, stage: int, symbols: StageSymbols, syntax_chunks: int,
                  num_dims: int) -> np.ndarray:
    """The standardised sample u (float32 [D]) that a stage's symbols select."""
    u = np.empty(num_dims, dtype=np.float32)
    for c, idx in enumerate(_chunks(params, stage, num_dims, syntax_chunks)):
        u[idx] = rcc.pfr_decode((params.seed, stage, 1 + c), int(symbols.indices[c]), len(idx))
    return u


def _prior(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(like), torch.zeros_like(like)


def encode(model_fn: ModelFn, diffusion: DiffusionConfig, x0: torch.Tensor, params: ProgressiveParams,
           *, progress: Callable[[int], None] | None = None, workers: int | None = None) -> Encoded:
    """Algorithm 3 for a batch of tiles x0 [B, C, s, s] (exact pixel values in [-1, 1]).

    The candidate search runs on ``workers`` threads (default: the usable CPU cores); the
    stream does not depend on it.

    Returns the payload (complete stream) and per-stage measurements. With
    ``params.network_float64`` the latents are float64 and ``model_fn`` must take and return
    float64 (a ``.double()`` network): outputs then agree across thread counts, batchings and
    devices far below the pixel stage's snap grid, so the lossless stage survives them.
    """
    if x0.ndim != 4 or x0.shape[0] != params.num_tiles or x0.shape[2] != params.tile_size:
        raise ValueError(f"progressive: x0 {list(x0.shape)} does not match {params.num_tiles} tiles of "
                         f"{params.tile_size}")
    clock = StageClock()
    workers = usable_cores() if workers is None else max(1, int(workers))
    dtype = torch.float64 if params.network_float64 else torch.float32
    x0 = x0.to(dtype)
    s = coded_schedule(diffusion, params.num_steps, params.spacing)
    K, D, var_type = s.num_steps, x0.numel(), diffusion.var_type
    ts = torch.from_numpy(s.timesteps).to(x0.device)
    enc, syntax = RangeEncoder(), Syntax(params, D)
    kl_bits = np.zeros(K + 1)
    levels, chunks_per_stage, mse = np.zeros(K, dtype=np.int64), np.zeros(K, dtype=np.int64), np.zeros(K)
    y = None
    start = time.perf_counter()
    for stage in range(K):
        k = K - 1 - stage  # the code step of the latent this stage sends
        t = torch.full((x0.shape[0],), k, dtype=torch.long, device=x0.device)
        if stage == 0:
            q_mean, _, q_log_var = q_mean_variance(s, x0, t)
            p_mean, p_log_var = _prior(x0)
        else:
            t_prev = t + 1
            with clock("network"):
                out = model_fn(y, ts[t_prev]).to(dtype)
            p = p_mean_variance(s, out, y, t_prev, var_type=var_type, clip_denoised=params.clip_denoised)
            p_mean, p_log_var = p.mean, p.log_variance
            mse[stage - 1] = float((((p.pred_xstart - x0) * 127.5) ** 2).mean())
            q_mean, _, q_log_var = q_posterior_mean_variance(s, x0, y, t_prev)
        qm, qv, pm, pv = (v.double().cpu().numpy().ravel() for v in (q_mean, q_log_var, p_mean, p_log_var))
        kl_dims = rcc.gaussian_kl_bits(qm, qv, pm, pv)
        kl_bits[stage] = kl_dims.sum()
        level = level_of_kl(float(kl_bits[stage]))
        n, _ = syntax.chunking(level)
        indices = np.zeros(n, dtype=np.int64)
        if level:
            with clock("candidates"):
                tasks = []
                for c, idx in enumerate(_chunks(params, stage, D, n)):
                    lw = rcc.LogWeight.of_gaussians(qm[idx], qv[idx], pm[idx], pv[idx])
                    kl_c = float(kl_dims[idx].sum())
                    log2_n = min(max(math.ceil(kl_c + params.pad_bits), 1), params.log2_candidates)
                    tasks.append((lw, (params.seed, stage, 1 + c), 1 << log2_n))
                indices[:] = rcc.pfr_select_many(tasks, workers=workers)
        symbols = StageSymbols(level, indices)
        with clock("entropy"):
            write_stage(enc, syntax, symbols)
        with clock("candidates"):
            u = _sample_stage(params, stage, symbols, n, D)
        y = _latent(p_mean, p_log_var, u)
        levels[stage], chunks_per_stage[stage] = level, (n if level else 0)
        if progress is not None:
            progress(stage)
    # stage K: x_0 given y_0 under the discretized Gaussian (Alg. 3 line 5)
    t0 = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    with clock("network"):
        out = model_fn(y, ts[t0]).to(dtype)
    p = p_mean_variance(s, out, y, t0, var_type=var_type, clip_denoised=params.clip_denoised)
    mse[K - 1] = float((((p.pred_xstart - x0) * 127.5) ** 2).mean())
    log_p = discretized_gaussian_log_likelihood_nats(x0, mean=p.mean, log_scale=0.5 * p.log_variance)
    kl_bits[K] = -float(log_p.sum()) / LN2
    pixel_models = _pixel_params(p.mean, p.log_variance, params.snap_log2)
    symbols = np.rint((x0.double().cpu().numpy().ravel() + 1.0) * 127.5).astype(np.int64)
    with clock("entropy"):
        enc.encode_gaussian(symbols, *pixel_models, PIXEL_LO, PIXEL_HI)
        full = enc.words().astype(">u4").tobytes()
        prefix = shortest_prefixes(full, params, D, pixel_models)
    if progress is not None:
        progress(K)
    payload = full[: -(-int(prefix[-1]) // 8)]
    clock.seconds["total"] = time.perf_counter() - start
    timesteps = np.append(s.timesteps[::-1], -1)
    return Encoded(replace(params, payload_bits=8 * len(payload)), payload, prefix, kl_bits, timesteps,
                   levels, chunks_per_stage, mse, dict(clock.seconds))


@dataclass(frozen=True)
class Decoded:
    """What a (possibly partial) stream gave. Bits count the payload only."""

    x0: torch.Tensor  # [B, C, s, s] in [-1, 1]: the decoded pixels when complete, else the reconstruction
    stages: int  # stages received, 0 .. K+1
    complete: bool  # all K+1 stages: x0 holds the coded pixels (the caller checks their checksum)
    timestep: int  # original timestep of the last latent received (-1: x_0 itself)
    bits_available: int  # payload bits the decoder was given
    bits_used: int  # the fewest of them that deliver the same stages
    diverged: bool = False  # the whole stream was there but its pixel stage did not decode
    fallback: torch.Tensor | None = None  # when complete: x^_0 predicted from y_0 (if the checksum fails)
    xstart: list[torch.Tensor] = field(default_factory=list)  # per received latent: x^_0 (keep_all)
    latents: list[torch.Tensor] = field(default_factory=list)  # per received latent (keep_all)
    seconds: dict[str, float] = field(default_factory=dict)


def decode(model_fn: ModelFn, diffusion: DiffusionConfig, payload: bytes, params: ProgressiveParams, *,
           num_bits: int | None = None, upto: int | None = None, reconstruction: str = "xstart",
           device: torch.device | str = "cpu", keep_all: bool = False) -> Decoded:
    """Algorithm 4 on the first ``num_bits`` bits of the payload (all when None), at most
    ``upto`` stages. Stops at the first stage the prefix does not deliver; the image is then
    reconstructed from the last latent (``xstart``: x^_0 predicted from it, clipped;
    ``ddim``: deterministic DDIM, eta = 0, down the rest of the coded chain).
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise DiffcodecError(f"unknown reconstruction {reconstruction!r}; known: {', '.join(RECONSTRUCTIONS)}")
    clock = StageClock()
    s = coded_schedule(diffusion, params.num_steps, params.spacing)
    K = s.num_steps
    shape = (params.num_tiles, 3, params.tile_size, params.tile_size)
    D = int(np.prod(shape))
    bits = 8 * len(payload) if num_bits is None else max(0, min(int(num_bits), 8 * len(payload)))
    limit = params.num_stages if upto is None else max(0, min(int(upto), params.num_stages))
    reader = TwinReader(payload, bits, _pad_words(params, D))
    syntax = Syntax(params, D)
    ts = torch.from_numpy(s.timesteps).to(device)
    y, p, xstarts, latents, stages = None, None, [], [], 0
    dtype = torch.float64 if params.network_float64 else torch.float32
    proto = torch.zeros(shape, device=device, dtype=dtype)
    for stage in range(min(limit, K)):
        k = K - 1 - stage
        with clock("entropy"):
            symbols = reader.stage(syntax)
        if symbols is None:
            break
        if stage == 0:
            p_mean, p_log_var = _prior(proto)
        else:
            p_mean, p_log_var = p.mean, p.log_variance
        n, _ = syntax.chunking(symbols.level)
        with clock("candidates"):
            u = _sample_stage(params, stage, symbols, n, D)
        y = _latent(p_mean, p_log_var, u)
        stages = stage + 1
        t = torch.full((shape[0],), k, dtype=torch.long, device=device)
        with clock("network"):
            out = model_fn(y, ts[t]).to(dtype)
        p = p_mean_variance(s, out, y, t, var_type=diffusion.var_type, clip_denoised=params.clip_denoised)
        if keep_all:
            xstarts.append(p.pred_xstart)
            latents.append(y)
    if stages == 0:
        raise DiffcodecError(f"the first {bits} bits of the stream hold no complete stage; "
                             f"a longer prefix is needed")
    if stages == K and limit > K:
        pixel_models = _pixel_params(p.mean, p.log_variance, params.snap_log2)
        with clock("entropy"):
            pixels = reader.pixels(*pixel_models)
        if pixels is not None:
            with clock("entropy"):
                used = _shortest_prefix(payload, bits, params, D, K + 1, pixel_models)
            x0 = torch.from_numpy((pixels.astype(np.float32) / 127.5 - 1.0).reshape(shape)).to(device, dtype)
            return Decoded(x0, K + 1, True, -1, bits, used, False, p.pred_xstart, xstarts, latents,
                           dict(clock.seconds))
    # A complete stream whose last stage does not decode: the network's arithmetic differs
    # from the encoder's (another device, thread count or library version).
    diverged = stages == K and limit > K and bits >= params.payload_bits
    k = K - stages
    with clock("reconstruction"):
        if reconstruction == "xstart":
            x0 = p.pred_xstart
        else:
            x0 = ddim_reconstruct(model_fn, s, y, k, var_type=diffusion.var_type,
                                  clip_denoised=params.clip_denoised, first_xstart=p.pred_xstart)
    with clock("entropy"):
        used = _shortest_prefix(payload, bits, params, D, stages, None)
    return Decoded(x0, stages, False, int(s.timesteps[k]), bits, used, diverged, None, xstarts, latents,
                   dict(clock.seconds))


def _shortest_prefix(payload: bytes, bits: int, params: ProgressiveParams, num_dims: int, stages: int,
                     pixel_models: tuple[np.ndarray, np.ndarray] | None) -> int:
    """The fewest payload bits (<= bits) that deliver ``stages`` stages (symbols only)."""
    lo, hi = 0, bits
    while lo < hi:
        mid = (lo + hi) // 2
        if count_stages(payload, mid, params, num_dims, pixel_models, limit=stages) >= stages:
            hi = mid
        else:
            lo = mid + 1
    return lo


def ddim_reconstruct(model_fn: ModelFn, s: Schedule, y: torch.Tensor, k: int, *, var_type: str,
                     clip_denoised: bool = True, first_xstart: torch.Tensor | None = None) -> torch.Tensor:
    """Probability-flow DDIM (eta = 0) from the latent y at code step k down to x^_0 [B,C,H,W].

    Each step: x^_0 from the network (clipped), eps recomputed from it, then
    y_{k-1} = sqrt(abar_{k-1}) x^_0 + sqrt(1 - abar_{k-1}) eps. ``first_xstart`` saves the
    network call at step k when the caller already has it.
    """
    ts = torch.from_numpy(s.timesteps).to(y.device)
    xstart = first_xstart
    for j in range(k, -1, -1):
        t = torch.full((y.shape[0],), j, dtype=torch.long, device=y.device)
        if xstart is None:
            out = model_fn(y, ts[t]).to(y.dtype)
            xstart = p_mean_variance(s, out, y, t, var_type=var_type, clip_denoised=clip_denoised).pred_xstart
        if j == 0:
            break
        eps = predict_eps_from_xstart(s, y, t, xstart)
        abar_prev = float(s.alphas_cumprod[j - 1])
        y = math.sqrt(abar_prev) * xstart + math.sqrt(1.0 - abar_prev) * eps
        xstart = None
    return xstart


def tiles_checksum(tiles_uint8: np.ndarray) -> bytes:
    """First 8 bytes of SHA-256 over uint8 tiles [B, s, s, 3] (shape included)."""
    a = np.ascontiguousarray(tiles_uint8, dtype=np.uint8)
    h = hashlib.sha256(struct.pack("<4I", *a.shape) if a.ndim == 4 else b"")
    h.update(a.tobytes())
    return h.digest()[:8]


# ------------------------------------------------------------------------------ files


def device_kind(device: torch.device | str) -> str:
    """What the header records about the encoder's device: 'cpu' or 'cuda:<name>'."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _network(loaded, params: ProgressiveParams) -> ModelFn:
    """The loaded model as a model_fn, in float64 when the stream asks for it (a copy)."""
    from diffcodec.evaluate import model_fn_of

    if params.network_float64:
        return model_fn_of(copy.deepcopy(loaded.model).double())
    return model_fn_of(loaded.model)


def encode_images(loaded, images: list[np.ndarray], names: list[str] | None = None, *,
                  params: ProgressiveParams | None = None, device: torch.device | str = "cpu",
                  progress: Callable[[int], None] | None = None, workers: int | None = None,
                  ) -> tuple[bytes, Encoded]:
    """A progressive .dfc file (bytes) for uint8 [H, W, 3] images coded together.

    Each image is cut into model-size tiles (edge padding); all tiles form one stream, so a
    prefix gives every image at the same stage. ``loaded`` is a `checkpoint.LoadedModel`.
    """
    from diffcodec.container import MODE_PROGRESSIVE, Container, Header, ImageEntry, pack, pixel_checksum
    from diffcodec.data import to_model_input, to_tiles

    if not images:
        raise DiffcodecError("no images to encode")
    tile = loaded.model_config.image_size
    tiles = np.concatenate([img[None] if img.shape[:2] == (tile, tile) else to_tiles(img, tile) for img in images])
    params = replace(params or ProgressiveParams(), num_tiles=len(tiles), tile_size=tile, payload_bits=0)
    x0 = to_model_input(tiles).to(device)
    encoded = encode(_network(loaded, params), loaded.diffusion_config, x0, params, progress=progress,
                     workers=workers)
    dc = loaded.diffusion_config
    names = list(names) if names is not None else [""] * len(images)
    header = Header(
        MODE_PROGRESSIVE, device_kind(device), loaded.fingerprint, dc.schedule, dc.num_timesteps, params.num_steps,
        dc.var_type, tile, tuple(ImageEntry(img.shape[0], img.shape[1], n) for img, n in zip(images, names)),
        pixel_checksum(images), encoded.params.pack(),
    )
    return pack(Container(header, encoded.payload)), encoded


@dataclass(frozen=True)
class FileDecode:
    """A progressive file decoded from (a prefix of) its bytes. Bits count the whole file."""

    images: list[np.ndarray]  # uint8 [H, W, 3]: the coded images when verified, else reconstructions
    names: list[str]
    stages: int  # received, of num_stages
    num_stages: int
    timestep: int  # original timestep of the last latent received (-1: x_0)
    verified: bool  # complete and the pixel checksum matches: these are the coded images
    diverged: bool  # complete file, but the lossless stage failed (other arithmetic than the encoder's)
    truncated: bool  # the file holds less than the complete stream
    file_bits: int  # bits the decoder was given (after --bits)
    header_bits: int
    bits_used: int  # header + the fewest payload bits that deliver the same stages
    payload_bits_total: int  # the complete stream's payload
    reconstruction: str
    seconds: dict[str, float]


def decode_bytes(loaded, data: bytes, *, num_bits: int | None = None, upto: int | None = None,
                 reconstruction: str = "xstart", device: torch.device | str = "cpu",
                 where: str = "file") -> FileDecode:
    """Algorithm 4 on a progressive file's bytes, or on its first ``num_bits`` bits.

    Refuses (DiffcodecError) a file for another model or mode, a prefix shorter than the
    header. When every stage arrives the pixels are checked against the header's checksum;
    on a mismatch (or a lossless stage that does not decode) ``diverged`` is set and the
    images are the reconstruction from the last latent, never the wrong pixels.
    """
    from diffcodec.container import MODE_PROGRESSIVE, check_model, pixel_checksum, unpack
    from diffcodec.data import from_model_output, from_tiles

    container = unpack(data, where)
    h = container.header
    if h.mode != MODE_PROGRESSIVE:
        raise DiffcodecError(f"{where}: not a progressive file (mode {h.mode})")
    check_model(h, loaded.fingerprint, where)
    dc = loaded.diffusion_config
    params = ProgressiveParams.unpack(h.params, where)
    if (h.schedule, h.num_timesteps, h.var_type) != (dc.schedule, dc.num_timesteps, dc.var_type) \
            or h.num_steps != params.num_steps or h.tile_size != params.tile_size \
            or params.tile_size != loaded.model_config.image_size:
        raise DiffcodecError(f"{where}: corrupt header (schedule, steps or tile size disagree with the model)")
    tile = params.tile_size
    counts = [-(-im.height // tile) * -(-im.width // tile) for im in h.images]
    if sum(counts) != params.num_tiles:
        raise DiffcodecError(f"{where}: corrupt header ({params.num_tiles} tiles for images needing {sum(counts)})")
    header_bits = 8 * (len(data) - len(container.payload))
    file_bits = 8 * len(data) if num_bits is None else min(int(num_bits), 8 * len(data))
    if file_bits < header_bits:
        raise DiffcodecError(f"{where}: {file_bits} bits do not cover the {header_bits}-bit header")
    payload_bits = file_bits - header_bits
    dec = decode(_network(loaded, params), dc, container.payload, params, num_bits=payload_bits, upto=upto,
                 reconstruction=reconstruction, device=device)
    tiles = from_model_output(dec.x0)
    images, start = [], 0
    for im, n in zip(h.images, counts):
        images.append(from_tiles(tiles[start : start + n], im.height, im.width))
        start += n
    verified, diverged = False, dec.diverged
    if dec.complete:
        verified = pixel_checksum(images) == h.pixel_sha
        if not verified:  # never hand out wrong pixels: fall back to x^_0 from y_0
            diverged, tiles, images, start = True, from_model_output(dec.fallback), [], 0
            for im, n in zip(h.images, counts):
                images.append(from_tiles(tiles[start : start + n], im.height, im.width))
                start += n
    return FileDecode(
        images, [im.name for im in h.images], dec.stages if verified or not dec.complete else dec.stages - 1,
        params.num_stages, dec.timestep if verified or not dec.complete else 0, verified, diverged,
        8 * len(container.payload) < params.payload_bits, file_bits, header_bits, header_bits + dec.bits_used,
        params.payload_bits, "exact" if verified else ("xstart" if dec.complete else reconstruction), dec.seconds,
    )
