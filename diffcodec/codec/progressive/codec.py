"""The paper's Algorithms 3 ("Sending x_0") and 4 ("Receiving") on a batch of tiles, with
reverse channel coding (`rcc`) for every latent.

Chain. A coded schedule keeps K of the model's T steps (`timesteps.respace`; the default
``quadratic`` spacing puts more of them near t = 0, where the bits are); the network is
always called with the original timestep. Latents y_k = x at code step k of that chain
(abar_k = abar[timesteps[k]]), k = K-1 .. 0. The stream holds K + 1 stages, in order:

    stage 0          y_{K-1} ~ q(y_{K-1} | x_0) sent using p(y_{K-1}) = N(0, I)       Alg. 3 line 1
                     (stream version 3: not sent; both sides take candidate 0, a sample
                     of N(0, I) from the shared seed: the KL is ~1e-9 bits/dim)
    stage j (1..K-1) y_{K-1-j} ~ q(. | y_{K-j}, x_0) sent using p_theta(. | y_{K-j})   Alg. 3 lines 2-4
    stage K          x_0 under the discretized Gaussian p_theta(x_0 | y_0)             Alg. 3 line 5

Candidates: stream versions 1-3 draw each chunk's own (`rcc`); versions 4 to 6 draw a stage's
chunks from shared pools of counter-based normals (`rcc_pool`: a search that costs less than
the network; `stage_plan`). Versions 1-4 choose by the Poisson functional representation (a
sample of q, given enough candidates); versions 5 and 6 send each chunk's candidate of
largest log q/p among the stage's N (greedy: its sample delivers about the chunk's KL from
2^16 candidates where PFR's delivers 0.73 of it, and the stream is about 6% smaller:
reports/rcc_methods.md), its index coded uniformly. Version 6, what this diffcodec writes,
makes the normals from a table instead of Box-Muller (`rcc_pool.NORMALS`: a cheaper search).

Each stage's symbols are written by `syntax`. A version 3 encoder may skip a stage whose KL
is below ``min_stage_bits`` (`CodedChain`: the next latent is then sent over the merged
steps); measured on CIFAR-10 it does not pay (a coarser chain's KL grows more than the
per-stage cost falls: reports/progressive_min_stage_bits.md), so the default is 0, no skips. Only stage K needs bit-identical network
outputs (its coding parameters come from the network); on a CPU float32 outputs change
with the thread count and the batch, so a float32 stream decodes losslessly only with the
encoder's settings, and ``network_float64`` lifts that (a slower network); the caller's
pixel checksum catches a mismatch.

Cost. Under PFR (versions 1-4) each chunk pays about log2(kappa + 1) + O(1) bits over its
KL (the index's spread); under greedy choice (version 5) exactly log2 N, N = 2^16 for chunks
of 8 bits of nominal KL or more, for a sample that delivers about its KL; each stage a level
symbol (a few bits); each group of stages a check of
check_bits bits (`syntax`: about 21 16-bit checks on a 32x32 image, +2.3% of the file;
reports/progressive_checks.md). Candidates per chunk are capped at 2^log2_candidates, so a
chunk whose KL exceeds that sends a sample between p and q: fewer bits now, more in later
stages.

Integrity. The checks let any prefix verify its stages: the decoder uses only stages whose
group check it has read and matched, and reports a failed check as damage; the pixel stage
is verified by the container's pixel checksum.

Ending early. A file may end at any checked stage boundary (the stage that closes a group,
and the pixel stage): it then delivers the stages up to there. `encode`'s ``end`` callback
(`codec.rate`) sees each boundary as it is reached (`Boundary`: the reconstruction a decoder
makes from a file that ends there, and that file's payload) and says whether to go on, to end
the file there, or to end it at the boundary before; the encoder then stops computing.

Memory. The network sees the tiles in slices (`tile_slices`: where the batch is formed). A
stream in regions (`ProgressiveParams.regions`: runs of region_tiles tiles, 128 from
`params.with_regions` where an image has more) codes each stage a region at a time: the
network on the region's part of the last latent, its Gaussians and the search's coefficients,
its level, plan and search, its part of the new latent, which replaces the last one in place
(a region's network outputs depend on its own tiles only); its symbols wait for the stage's
end. The pixel stage goes the same way, and the complete stream's shortest prefix is found
from the last region's models (`syntax.PixelTail`). The decoder, which reads every stage's
symbols before any network call, takes a region through every stage before the next. What
spans the whole image is then, to encode, the latent (float64), the image as uint8 levels (made
into values a slice at a time) and, under a rate target, its reconstruction (uint8, shown to
``end`` without a copy); to decode, x^_0 of the last latent (as uint8 levels for the api) and
the pixels; both, the payload and each stage's symbols (held once). The heap's live bytes grow
by about 14 bytes per dimension either way at the test's high rate (tests/test_codec_memory.py,
reports/results.md), against 100 and 53 in one region, whose permutation spans every tile. A
stream of one region (an image of up to 128 tiles, and every file before regions) is the stream
of before.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from diffcodec import exact
from diffcodec.codec import rcc, rcc_pool
from diffcodec.codec.coding_params import PixelRule, pixel_params
from diffcodec.codec.entropy import RangeEncoder
from diffcodec.codec.progressive.layout import group_hints
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.codec.progressive.syntax import (
    PIXEL_HI,
    PIXEL_LO,
    PixelTail,
    StageSymbols,
    Syntax,
    StageRun,
    TwinReader,
    level_of_kl,
    pad_words,
    read_stages,
    shortest_prefix,
    shortest_prefixes,
    tail_prefix,
    write_closing,
    write_stage,
)
from diffcodec.config import DiffusionConfig
from diffcodec.diffusion import (
    p_mean_variance,
    p_xstart,
    predict_eps_from_xstart,
    q_mean_variance,
    q_posterior_mean_variance,
)
from diffcodec.errors import DamagedFileError, DiffcodecError
from diffcodec.images import from_model_output, level_values, to_levels
from diffcodec.losses import LN2, discretized_gaussian_log_likelihood_nats
from diffcodec.runtime import ModelFn, usable_cores
from diffcodec.schedule import Schedule
from diffcodec.timesteps import chain_schedule, keep_timesteps

RECONSTRUCTIONS = ("xstart", "ddim")
PIXEL_RULE = PixelRule(mean_lo=-1e4, mean_hi=1e4, std_floor=None)  # the format's (`coding_params`)
_PERMUTATION_STREAM = 0  # chunk c of a stage uses key word 1 + c
_REGION_STREAM = 0x7265_6769  # "regi": region r > 0's pools are keyed by stream_key(seed, this, r)


def coded_schedule(diffusion: DiffusionConfig, num_steps: int, spacing: str = "quadratic") -> Schedule:
    """The model's schedule kept at K steps with ``spacing`` (alpha-bars equal to the original's)."""
    return chain_schedule(diffusion.schedule, diffusion.num_timesteps, num_steps, spacing)


def _pixel_params(p_mean: torch.Tensor, p_log_var: torch.Tensor, params: ProgressiveParams
                  ) -> tuple[np.ndarray, np.ndarray]:
    """float64 [D] mean and std of the pixel stage in level units (0..255), snapped."""
    return pixel_params(p_mean, p_log_var, params.snap_log2, PIXEL_RULE, exact_contract=params.exact)



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
    """The encoder's output and what it measured. Bits count the payload only. S = ``stages``,
    the stages the payload delivers: K + 1 for the whole stream, fewer when it ended early."""

    params: ProgressiveParams  # with payload_bits set
    payload: bytes
    prefix_bits: np.ndarray  # int64 [S]: shortest payload prefix that delivers stages 0..k
    kl_bits: np.ndarray  # float64 [S]: the analytic cost of each stage on this trajectory
    #   (prior KL, the KL terms L_{t}, and -log2 p(x_0 | y_0) with the exact normal CDF)
    timesteps: np.ndarray  # int64 [S]: original timestep of each stage's latent (-1: x_0)
    levels: np.ndarray  # int64 [min(S, K)] (several regions: the largest region's level)
    num_chunks: np.ndarray  # int64 [min(S, K)] (several regions: all of theirs)
    xstart_mse: np.ndarray  # float64 [min(S, K)]: MSE on [0,255] of x^_0 predicted from each stage's latent
    seconds: dict[str, float] = field(default_factory=dict)
    num_checks: int = 0  # integrity checks written (check_bits each)
    sample_bits: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [min(S, K)]: log2 q(y)/p(y)
    #   of each RCC stage's sent latent (0 for a skipped stage); kl_bits[k] on average for exact samples of q
    stages: int = 0  # S (0 as a default only: `encode` sets it)

    @property
    def complete(self) -> bool:
        """Whether the payload is the whole stream (lossless)."""
        return self.stages == self.params.num_stages


GO_ON, END_HERE, END_BEFORE = "go on", "end here", "end before"  # what an `encode` ``end`` callback says


class Boundary:
    """A checked stage boundary the encoder has reached: a file may end here.

    ``stages``: the stages such a file delivers (K + 1: the whole stream); ``timestep``: the
    original timestep of its last latent (-1: the pixels); ``tiles``: the reconstruction a
    decoder makes from it (x^_0 predicted from that latent, as pixels: uint8 [B, s, s, C],
    `images.from_model_output`; None at the lossless end), a read-only view of the encoder's
    buffer, valid during the ``end`` call only (None after it); ``max_payload_bits``: the coder's
    sealed output so far, which such a file never exceeds; `payload_bits()`: its exact payload
    (the shortest prefix of that output that delivers the stages; parsed on first use)."""

    def __init__(self, stages: int, timestep: int, tiles: np.ndarray | None, words: np.ndarray,
                 exact_bits: Callable[[bytes], int]) -> None:
        self.stages, self.timestep, self.tiles = stages, timestep, tiles
        self.data = words.astype(">u4").tobytes()
        self.max_payload_bits = 8 * len(self.data)
        self._exact_bits, self._bits = exact_bits, None

    def payload_bits(self) -> int:
        if self._bits is None:
            self._bits = int(self._exact_bits(self.data))
        return self._bits

    def payload(self) -> bytes:
        """The payload of a file that ends here."""
        return self.data[: -(-self.payload_bits() // 8)]


def _latent(p_mean: np.ndarray, p_log_var: np.ndarray, u: np.ndarray, exact_contract: bool,
            dtype: torch.dtype) -> np.ndarray:
    """y = mean_p + std_p * u (float64 [n], u float32 [n]), computed in float64, returned in
    ``dtype`` (``exact_contract``: std by `exact.exp`, else numpy's exp)."""
    half_log_var = 0.5 * p_log_var
    y = exact.exp(torch.from_numpy(half_log_var)).numpy() if exact_contract else np.exp(half_log_var)  # std_p
    half_log_var = None
    y *= u.astype(np.float64, copy=False)  # in place: one array of n values at a time
    y += p_mean  # mean + std u (IEEE addition commutes: the same bits)
    return y if dtype == torch.float64 else y.astype(np.float32)


def _permutation(params: ProgressiveParams, stage: int, num_dims: int, region: int = 0) -> np.ndarray:
    """The stage's keyed permutation of a region's dimensions (int64 [D]; region 0's key is a
    stream of one region's, the stage's)."""
    words = [params.seed, stage, _PERMUTATION_STREAM] + ([region] if region else [])
    raw = np.random.PCG64(np.random.SeedSequence(words)).random_raw(num_dims)
    return np.argsort(raw, kind="stable")


def region_seed(params: ProgressiveParams, region: int) -> int:
    """The seed of a region's pools (`rcc_pool.plan_stage`): the stream's for region 0 (a stream
    of one region's), a key of (seed, region) for the others."""
    return params.seed if region == 0 else rcc_pool.stream_key(params.seed, _REGION_STREAM, region)


def _chunks(params: ProgressiveParams, stage: int, num_dims: int, num_chunks: int) -> list[np.ndarray]:
    """The stage's keyed permutation of the dimensions, split into near-equal chunks."""
    return np.array_split(_permutation(params, stage, num_dims), num_chunks)


def stage_plan(params: ProgressiveParams, stage: int, num_dims: int, chunking: tuple[int, float], region: int = 0
               ) -> rcc_pool.StagePlan:
    """A version 4 to 6 stage's candidate plan (`rcc_pool`) for a region of ``num_dims``
    dimensions from its `Syntax.chunking` (m, kappa)."""
    num_chunks, kappa = chunking
    return rcc_pool.plan_stage(region_seed(params, region), stage, _permutation(params, stage, num_dims, region),
                               num_chunks, kappa,
                               params.pad_bits, params.log2_candidates, cap_pool_normals=params.version >= 5,
                               normals="table" if params.version >= 6 else "box_muller")


def _sample_stage(params: ProgressiveParams, stage: int, symbols: StageSymbols, syntax_chunks: int,
                  num_dims: int, plan: rcc_pool.StagePlan | None = None) -> np.ndarray:
    """The standardised sample u (float32 [D]) that a stage's symbols select (version 4: by
    its candidate ``plan``)."""
    if plan is not None:
        return rcc_pool.samples(plan, symbols.indices)
    u = np.empty(num_dims, dtype=np.float32)
    chunks = _chunks(params, stage, num_dims, syntax_chunks)
    samples = rcc.pfr_decode_many([((params.seed, stage, 1 + c), int(symbols.indices[c]), len(idx))
                                   for c, idx in enumerate(chunks)], exact_contract=params.exact)
    for idx, sample in zip(chunks, samples):
        u[idx] = sample
    return u


def _pixel_bits(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, tiles_per_slice: int = 64) -> float:
    """-log2 p(x_0 | y_0) under the discretized Gaussian (a measurement, not coded): summed
    over slices of tiles, so that its float64 temporaries stay a slice's, not the image's."""
    nats = 0.0
    for i in range(0, x0.shape[0], tiles_per_slice):
        part = slice(i, i + tiles_per_slice)
        nats -= float(discretized_gaussian_log_likelihood_nats(x0[part], mean=mean[part],
                                                               log_scale=0.5 * log_var[part]).sum())
    return nats / LN2


def _sample_bits(qm: np.ndarray, qv: np.ndarray, pm: np.ndarray, pv: np.ndarray, u: np.ndarray,
                 dims_per_slice: int = 1 << 16) -> float:
    """log2 q(y)/p(y) of the sent latent y = mean_p + std_p u (a measurement, not coded),
    summed over slices of the dimensions, so that its temporaries stay a slice's."""
    nats = 0.0
    for i in range(0, len(u), dims_per_slice):
        part = slice(i, i + dims_per_slice)
        nats += float(rcc.LogWeight.of_gaussians(qm[part], qv[part], pm[part], pv[part])(u[None, part])[0])
    return nats / LN2


class CodedChain:
    """The latents a stream makes and the reverse step each stage takes.

    Without skips (every stream before version 3, and version 3 when every stage is coded)
    stage j steps from code step k + 1 to k = K - 1 - j on the coded schedule. A version 3
    stream may skip stages (`syntax`): the next stage then steps from the last latent made,
    k', straight to k, on the chain through the steps kept so far and all steps below k
    (`timesteps.keep_timesteps`: the same alpha-bars, so the same arithmetic on both sides).
    The network is always called at a latent's own original timestep.
    """

    def __init__(self, diffusion: DiffusionConfig, params: ProgressiveParams) -> None:
        self.full = coded_schedule(diffusion, params.num_steps, params.spacing)
        self._original = diffusion.schedule, diffusion.num_timesteps
        self.kept: list[int] = []  # code steps whose latents were made, x_T's first
        self._cache: dict[tuple[int, ...], Schedule] = {}

    def step(self, k: int) -> tuple[Schedule, int]:
        """(schedule, step index) of the reverse step from the last latent made to code step k."""
        last = self.kept[-1]
        if last == k + 1:
            return self.full, k + 1
        steps = tuple(range(k + 1)) + tuple(sorted(self.kept))
        if steps not in self._cache:
            original = chain_schedule(*self._original)
            self._cache[steps] = keep_timesteps(original, self.full.timesteps[list(steps)])
        return self._cache[steps], steps.index(last)

    def keep(self, k: int) -> None:
        self.kept.append(k)


def _full_step(like: torch.Tensor, index: int) -> torch.Tensor:
    return torch.full((like.shape[0],), index, dtype=torch.long, device=like.device)


def tile_slices(num_tiles: int, tiles_per_call: int | None) -> list[slice]:
    """Where the progressive codec forms its network batch: a region's ``num_tiles`` tiles in
    consecutive slices of ``tiles_per_call`` (None: all of them in one call, which a float32
    stream needs, its outputs changing with the batch: encoder and decoder cut the same
    regions). Each stage runs the network, its Gaussians and the search's coefficients slice
    by slice."""
    step = num_tiles if tiles_per_call is None else max(1, int(tiles_per_call))
    return [slice(i, min(i + step, num_tiles)) for i in range(0, num_tiles, step)]


def region_slices(region: slice, tiles_per_call: int | None) -> list[slice]:
    """`tile_slices` of a region's tiles, as slices of the image's tiles."""
    return [slice(region.start + a.start, region.start + a.stop)
            for a in tile_slices(region.stop - region.start, tiles_per_call)]


def _flat64(t: torch.Tensor) -> np.ndarray:
    return t.double().cpu().numpy().ravel()


def _per_tile_squared_error(xstart: torch.Tensor, x0: torch.Tensor) -> np.ndarray:
    """float64 [n]: each tile's sum of squared errors on [0, 255] (`Encoded.xstart_mse`)."""
    return (((xstart - x0) * 127.5) ** 2).flatten(1).sum(1).double().cpu().numpy()


def encode(model_fn: ModelFn, diffusion: DiffusionConfig, x0: torch.Tensor, params: ProgressiveParams,
           *, progress: Callable[[int], None] | None = None, workers: int | None = None,
           context: bytes = b"", end: Callable[[Boundary], str] | None = None,
           tiles_per_call: int | None = None) -> Encoded:
    """Algorithm 3 for a batch of tiles x0 [B, C, s, s]: exact pixel values in [-1, 1], or their
    uint8 levels (0..255), which the encoder makes into values (`images.level_values`) a slice of
    tiles at a time: a photo's image is then held at 1 byte a dimension, not 4 or 8.

    The candidate search runs on ``workers`` threads (default: the usable CPU cores); the
    stream does not depend on it. ``tiles_per_call``: the network's batch (`tile_slices`; None:
    every tile in one call); the stream does not depend on it where the network's outputs do
    not (the exact contract, float64). ``context``: bytes the closing check also covers (the
    decoder must pass the same). A version 3 stream skips a stage whose KL is below
    ``params.min_stage_bits`` (never the last latent, y_0; the next stage runs the network on
    the last latent made again). ``end``: called at each checked stage boundary (`Boundary`, in
    order, the lossless end last) with GO_ON, END_HERE or END_BEFORE (never at the first
    boundary) as its answer; the payload then ends there (or at the boundary before) and nothing
    after it is computed.

    Each stage works a region at a time (``params.regions()``), in two passes over the region's
    tiles (`tile_slices`): the first runs the network on the last latent (scoring its x^_0) and
    makes the region's Gaussians, the second, after its search, makes its part of the stage's
    latent; between them the region holds p's mean and log-variance and the search's
    coefficients; the stage's symbols are written once every region is coded.

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
    dtype = torch.float64 if params.network_float64 or params.exact else torch.float32

    def x0_values(sl: slice) -> torch.Tensor:
        """x0's tiles ``sl`` as values in ``dtype`` (levels made into values on the CPU, as
        `images.to_model_input` makes them, whatever device x0 is on)."""
        if x0.dtype == torch.uint8:
            return level_values(x0[sl].cpu()).to(device=x0.device, dtype=dtype)
        return x0[sl].to(dtype)

    chain = CodedChain(diffusion, params)
    s = chain.full
    B, K, D, var_type = x0.shape[0], s.num_steps, x0.numel(), diffusion.var_type
    per_tile = D // B
    ts = torch.from_numpy(s.timesteps).to(x0.device)
    enc, syntax = RangeEncoder(), Syntax(params, D, context)
    kl_bits = np.zeros(K + 1)
    size_hints = np.zeros(K + 1, dtype=np.int64)  # the encoder's output size after each stage (bits)
    closes = np.zeros(K, dtype=bool)  # the stage closed a checked group
    sample_bits = np.zeros(K)
    levels, chunks_per_stage, mse = np.zeros(K, dtype=np.int64), np.zeros(K, dtype=np.int64), np.zeros(K)
    # what a stage keeps for the whole image: the last latent; the rest is one region's (`regions`)
    y: torch.Tensor | None = None  # the last latent made [B, C, s, s]
    regions = params.regions()
    recon = np.empty((B, *x0.shape[2:], x0.shape[1]), dtype=np.uint8) if end is not None else None  # pixels of x^_0
    pending: int | None = None  # the stage whose latent y holds, its x^_0 not yet scored
    previous: Boundary | None = None  # the last boundary `end` let the encoder pass
    start = time.perf_counter()

    def ended(b: Boundary, later: Boundary | None = None) -> Encoded:
        """The Encoded of a file that ends at boundary b (before the pixel stage): the shortest
        prefix of b's output, or of a ``later`` boundary's when that one is shorter."""
        S = b.stages
        with clock("entropy"):
            payload = b.payload()
            if later is not None:
                bits = shortest_prefix(later.data, later.max_payload_bits, params, D, S, None)
                payload = min(payload, later.data[: -(-bits // 8)], key=len)
            hints = group_hints(size_hints[:S], closes[:S], params)
            prefix = shortest_prefixes(payload, params, D, None, hints, num_stages=S)[:S]
        clock.seconds["total"] = time.perf_counter() - start
        timesteps = s.timesteps[::-1][:S].astype(np.int64)
        return Encoded(replace(params, payload_bits=8 * len(payload)), payload, prefix, kl_bits[:S], timesteps,
                       levels[:S], chunks_per_stage[:S], mse[:S], dict(clock.seconds), int(closes[:S].sum()),
                       sample_bits[:S], S)

    def decide(here: Boundary) -> Encoded | None:
        """Ask ``end`` at a boundary: the Encoded of a file that ends here or before, or None."""
        nonlocal previous
        decision = end(here)
        here.tiles = None  # the encoder's buffer, which the next stages overwrite
        if decision == END_BEFORE:
            if previous is None:
                raise ValueError("progressive: `end` asked to end before the first boundary")
            return ended(previous, here)
        if decision == END_HERE and here.stages <= K:
            return ended(here)
        previous = here
        return None

    def reached(stage: int, words: np.ndarray | None = None) -> Encoded | None:
        """After stage ``stage`` (its group's check written, its latent made and x^_0 scored);
        ``words``: the coder's output after it, where the coder has gone on since."""
        if progress is not None:
            progress(stage)
        if end is None or not (closes[stage] or not params.check_bits):
            return None
        words = enc.words() if words is None else words
        tiles = recon.view()
        tiles.flags.writeable = False
        return decide(Boundary(stage + 1, int(s.timesteps[K - 1 - stage]), tiles, words,
                               lambda data: shortest_prefix(data, 8 * len(data), params, D, stage + 1, None)))

    def network(sl: slice, x0_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last latent's slice and the network's output on it, its x^_0 scored for ``pending``."""
        y_b, last = y[sl], chain.kept[-1]
        with clock("network"):
            out = model_fn(y_b, ts[_full_step(y_b, last)]).to(dtype)
        if pending is not None:
            xstart = p_xstart(s, out, y_b, _full_step(y_b, last), var_type=var_type, clip_denoised=params.clip_denoised)
            sse[sl] = _per_tile_squared_error(xstart, x0_b)
            if recon is not None:
                recon[sl] = from_model_output(xstart)
        return y_b, out

    sse = np.zeros(B)  # per tile, of the pending latent's x^_0
    kl_tiles = np.zeros(B)  # per tile, of the stage's KL: added in tile order, the same sum for any slicing

    def score_pending(words: np.ndarray | None = None) -> Encoded | None:
        """Once the network has run on every tile of the pending latent: its x^_0's boundary
        (``words``: `reached`'s)."""
        nonlocal pending
        if pending is None:
            return None
        mse[pending] = sse.sum() / D
        done, pending = reached(pending, words), None
        return done

    for stage in range(K):
        k = K - 1 - stage  # the code step of the latent this stage sends
        sched, i = chain.step(k) if stage else (None, 0)
        parts: list[StageSymbols] = []
        for r, region in enumerate(regions):
            # one region at a time: its Gaussians, its search, its latent (over the last one)
            first, Dr = region.start * per_tile, (region.stop - region.start) * per_tile
            rslices = region_slices(region, tiles_per_call)
            p_mean, p_log_var = np.empty(Dr), np.empty(Dr)  # float64: the region's p
            coef = (np.empty(Dr, np.float32), np.empty(Dr, np.float32)) if params.version >= 4 else None  # a, b
            q_all = (np.empty(Dr), np.empty(Dr)) if params.version <= 3 else None  # versions 1-3: chunks' own weights
            kl_dims = np.empty(Dr) if params.version <= 4 else None  # versions 1-4: candidates from chunks' own KL
            for sl in rslices:  # first pass: the region's Gaussians
                dims = slice(sl.start * per_tile - first, sl.stop * per_tile - first)
                x0_b = x0_values(sl)
                if stage == 0:
                    q_mean, _, q_log_var = q_mean_variance(s, x0_b, _full_step(x0_b, k))
                    p_mean[dims], p_log_var[dims] = 0.0, 0.0
                else:
                    y_b, out = network(sl, x0_b)
                    p = p_mean_variance(sched, out, y_b, _full_step(y_b, i), var_type=var_type,
                                        clip_denoised=params.clip_denoised)
                    p_mean[dims], p_log_var[dims] = _flat64(p.mean), _flat64(p.log_variance)
                    q_mean, _, q_log_var = q_posterior_mean_variance(sched, x0_b, y_b, _full_step(y_b, i))
                    p = out = y_b = None
                qm, qv, pm, pv = _flat64(q_mean), _flat64(q_log_var), p_mean[dims], p_log_var[dims]
                kl_b = rcc.gaussian_kl_bits(qm, qv, pm, pv)
                kl_tiles[sl] = kl_b.reshape(-1, per_tile).sum(axis=1)
                if coef is not None:
                    rcc_pool.log_weight_coefficients(qm, qv, pm, pv, out=(coef[0][dims], coef[1][dims]))
                if q_all is not None:
                    q_all[0][dims], q_all[1][dims] = qm, qv
                if kl_dims is not None:
                    kl_dims[dims] = kl_b
                q_mean = q_log_var = qm = qv = pm = pv = kl_b = x0_b = None
            region_kl = float(kl_tiles[region].sum())
            if len(regions) == 1:
                kl_bits[stage] = region_kl
                if (done := score_pending()) is not None:
                    return done
                if syntax.skippable() and kl_bits[stage] < params.min_stage_bits:
                    break  # skipped (a stream of one region)
            level = 0 if syntax.implicit() else level_of_kl(region_kl)
            if params.version >= 3 and stage:
                level = max(level, 1)
            n, kappa = syntax.chunking(level, Dr)
            indices = np.zeros(n, dtype=np.int64)
            plan = None
            if params.version >= 4:  # pooled candidates (`rcc_pool`)
                with clock("candidates"):
                    plan = stage_plan(params, stage, Dr, (n, kappa), region=r)
                    if level:
                        counts, rule = None, "greedy"  # version 5: the stage's N for every chunk (its index range)
                        if params.version == 4:
                            # each chunk's candidates from its own KL, as versions 1-3 (the decoder needs no count)
                            chunk_kl = np.add.reduceat(kl_dims[plan.perm], plan.bounds[:-1])
                            counts = rcc_pool.chunk_counts(chunk_kl, params.pad_bits, params.log2_candidates)
                            rule = "pfr"
                        indices[:] = rcc_pool.select(plan, *coef, counts, rule=rule, device=x0.device)
            elif level:
                with clock("candidates"):
                    tasks = []
                    for c, idx in enumerate(_chunks(params, stage, Dr, n)):
                        lw = rcc.LogWeight.of_gaussians(q_all[0][idx], q_all[1][idx], p_mean[idx], p_log_var[idx])
                        kl_c = float(kl_dims[idx].sum())
                        log2_n = min(max(math.ceil(kl_c + params.pad_bits), 1), params.log2_candidates)
                        tasks.append((lw, (params.seed, stage, 1 + c), 1 << log2_n))
                    indices[:] = rcc.pfr_select_many(tasks, workers=workers)
            coef = q_all = kl_dims = None
            part = StageSymbols(level, indices)
            parts.append(part)
            with clock("candidates"):
                u = _sample_stage(params, stage, part, n, Dr, plan)
            plan = None
            if y is None:
                y = torch.empty(x0.shape, dtype=dtype, device=x0.device)
            for sl in rslices:  # second pass: the region's latent, over the last one
                dims = slice(sl.start * per_tile - first, sl.stop * per_tile - first)
                x0_b = x0_values(sl)
                if stage == 0:
                    q_mean, _, q_log_var = q_mean_variance(s, x0_b, _full_step(x0_b, k))
                else:
                    q_mean, _, q_log_var = q_posterior_mean_variance(sched, x0_b, y[sl], _full_step(x0_b, i))
                # what the sent sample delivers, log2 q(y)/p(y): the stage's KL on average if it were
                # an exact sample of q; less when the candidate budget leaves it between p and q
                sample_bits[stage] += _sample_bits(_flat64(q_mean), _flat64(q_log_var), p_mean[dims],
                                                   p_log_var[dims], u[dims])
                y_b = _latent(p_mean[dims], p_log_var[dims], u[dims], params.exact, dtype)
                y[sl] = torch.from_numpy(y_b.reshape(y[sl].shape)).to(x0.device)
                q_mean = q_log_var = y_b = x0_b = None
            u = p_mean = p_log_var = None
        else:  # every region coded: the stage's symbols, once the x^_0 of the latent before is scored
            kl_bits[stage] = kl_tiles.sum()
            if (done := score_pending()) is not None:
                return done
            symbols = StageSymbols.of_regions(parts)
            with clock("entropy"):
                closes[stage] = write_stage(enc, syntax, symbols)
                size_hints[stage] = 32 * enc.num_words
            chain.keep(k)
            levels[stage] = symbols.level
            chunks_per_stage[stage] = sum(len(q.indices) for q in parts if q.level)
            pending = stage
            continue
        with clock("entropy"):  # a skipped stage (the break above)
            closes[stage] = write_stage(enc, syntax, StageSymbols(0, np.zeros(0, dtype=np.int64)))
            size_hints[stage] = 32 * enc.num_words
        mse[stage] = mse[stage - 1]
        if (done := reached(stage)) is not None:
            return done
    # stage K: x_0 given y_0 under the discretized Gaussian (Alg. 3 line 5), a region at a time
    tail: PixelTail | None = None  # several regions: the last one's start and models (`syntax.PixelTail`)
    pixel_models = None  # one region: its models (level units), for the prefix search
    latent_words = enc.words() if end is not None else None  # the boundary before the pixels (`score_pending`)
    for r, region in enumerate(regions):
        first, Dr = region.start * per_tile, (region.stop - region.start) * per_tile
        region_models, symbols = (np.empty(Dr), np.empty(Dr)), np.empty(Dr, dtype=np.int32)
        for sl in region_slices(region, tiles_per_call):
            dims = slice(sl.start * per_tile - first, sl.stop * per_tile - first)
            x0_b = x0_values(sl)
            y_b, out = network(sl, x0_b)
            p = p_mean_variance(s, out, y_b, _full_step(y_b, 0), var_type=var_type, clip_denoised=params.clip_denoised)
            kl_bits[K] += _pixel_bits(x0_b, p.mean, p.log_variance)
            region_models[0][dims], region_models[1][dims] = _pixel_params(p.mean, p.log_variance, params)
            symbols[dims] = np.rint((_flat64(x0_b) + 1.0) * 127.5)
            p = out = y_b = x0_b = None
        if r == len(regions) - 1 and (done := score_pending(latent_words)) is not None:
            return done  # x^_0 of y_0 scored on every tile: the last boundary before the pixels
        with clock("entropy"):
            if len(regions) > 1 and r == len(regions) - 1:
                tail = PixelTail(enc.pos(), *region_models)
            enc.encode_gaussian(symbols, *region_models, PIXEL_LO, PIXEL_HI)
            syntax.add_pixels(symbols)
        pixel_models = region_models if len(regions) == 1 else None
        region_models = symbols = None
    y = None
    with clock("entropy"):
        write_closing(enc, syntax)
        words = enc.words()

    def lossless_prefix(data: bytes, lo: int = 0) -> int:
        if tail is not None:
            return tail_prefix(data, 8 * len(data), params, tail, lo)
        return shortest_prefix(data, 8 * len(data), params, D, K + 1, pixel_models)

    if end is not None:  # the lossless end is the last boundary
        done = decide(Boundary(K + 1, -1, None, words, lossless_prefix))
        if done is not None:
            return done
    with clock("entropy"):
        full = words.astype(">u4").tobytes()
        size_hints[K] = 8 * len(full)
        hints = group_hints(size_hints, closes, params)
        prefix = shortest_prefixes(full, params, D, pixel_models, hints)
        if tail is not None:
            prefix[K] = lossless_prefix(full, int(prefix[K - 1]))
    if progress is not None:
        progress(K)
    payload = full[: -(-int(prefix[-1]) // 8)]
    clock.seconds["total"] = time.perf_counter() - start
    timesteps = np.append(s.timesteps[::-1], -1)
    return Encoded(replace(params, payload_bits=8 * len(payload)), payload, prefix, kl_bits, timesteps,
                   levels, chunks_per_stage, mse, dict(clock.seconds), int(closes.sum()), sample_bits, K + 1)


@dataclass(frozen=True)
class Decoded:
    """What a (possibly partial) stream gave. Bits count the payload only."""

    x0: torch.Tensor | None  # [B, C, s, s] in [-1, 1]: the decoded pixels when complete, else the
    #   reconstruction; None when decoded ``as_levels`` (then `levels` holds the image)
    stages: int  # stages received, 0 .. K+1
    complete: bool  # all K+1 stages: x0 holds the coded pixels (the caller checks their checksum)
    timestep: int  # original timestep of the last latent received (-1: x_0 itself)
    bits_available: int  # payload bits the decoder was given
    bits_used: int  # the fewest of them that deliver the same stages
    diverged: bool = False  # the whole stream was there but its pixel stage did not decode
    stop: str = "complete"  # why the RCC stages stopped (`syntax.StageRun.stop`: complete, limit, end, check)
    stop_stage: int = -1  # where ("end" / "check")
    fallback: torch.Tensor | None = None  # when complete: x^_0 predicted from y_0 (if the checksum fails);
    #   None when decoded ``as_levels`` (then `fallback_levels`), ``keep_all`` excepted
    xstart: list[torch.Tensor] = field(default_factory=list)  # per received latent: x^_0 (keep_all)
    latents: list[torch.Tensor] = field(default_factory=list)  # per received latent (keep_all)
    seconds: dict[str, float] = field(default_factory=dict)
    pixels_checked: bool | None = None  # version 3: the closing check matched (True) / was read and differs
    #   (False: damage or, for a float file, divergence); None: no closing check, or not reached
    levels: np.ndarray | None = None  # ``as_levels``: the image's uint8 levels [B, C, s, s] (`images.to_levels`),
    #   the pixels when complete, else the reconstruction's
    fallback_levels: np.ndarray | None = None  # ``as_levels``, when complete: the fallback's levels


def decode(model_fn: ModelFn, diffusion: DiffusionConfig, payload: bytes, params: ProgressiveParams, *,
           num_bits: int | None = None, upto: int | None = None, reconstruction: str = "xstart",
           device: torch.device | str = "cpu", keep_all: bool = False, context: bytes = b"",
           progress: Callable[[int], None] | None = None, tiles_per_call: int | None = None,
           as_levels: bool = False) -> Decoded:
    """Algorithm 4 on the first ``num_bits`` bits of the payload (all when None), at most
    ``upto`` stages. Stops at the first stage the prefix does not deliver; the image is then
    reconstructed from the last latent (``xstart``: x^_0 predicted from it, clipped;
    ``ddim``: deterministic DDIM, eta = 0, down the rest of the coded chain). ``progress``:
    called with a stage's index each time a region's part of it is decoded (a stream of R
    regions: R calls per stage, the pixel stage's once the network has run for its models).
    ``tiles_per_call``: the network's batch (`tile_slices`; None: every tile in one call, as a
    float32 stream's encoder made them). ``as_levels``: the image comes back as its uint8 levels
    (`Decoded.levels`, 1 byte a dimension: the pixels, or the reconstruction as `images.to_levels`
    rounds it) and no float image is made; an x^_0 reconstruction or fallback is held as levels
    region by region (not 8 bytes a dimension; ``keep_all`` excepted).
    The decoder works a region at a time through every stage (the stream holds every stage's
    symbols before the pixels, so all of them are read first): what it holds for the whole
    image is x^_0 of the last latent and the pixels, not the latent (DDIM's reconstruction and
    ``keep_all`` excepted).
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise DiffcodecError(f"unknown reconstruction {reconstruction!r}; known: {', '.join(RECONSTRUCTIONS)}")
    clock = StageClock()
    chain = CodedChain(diffusion, params)
    s = chain.full
    K, var_type = s.num_steps, diffusion.var_type
    shape = (params.num_tiles, 3, params.tile_size, params.tile_size)
    D = int(np.prod(shape))
    per_tile, regions = D // params.num_tiles, params.regions()
    bits = 8 * len(payload) if num_bits is None else max(0, min(int(num_bits), 8 * len(payload)))
    limit = params.num_stages if upto is None else max(0, min(int(upto), params.num_stages))
    reader = TwinReader(payload, bits, pad_words(params, D))
    syntax = Syntax(params, D, context)
    ts = torch.from_numpy(s.timesteps).to(device)
    dtype = torch.float64 if params.network_float64 or params.exact else torch.float32

    def network(y_b: torch.Tensor, last: int) -> torch.Tensor:
        """The network's output on a slice of the latent made at code step ``last``."""
        with clock("network"):
            return model_fn(y_b, ts[_full_step(y_b, last)]).to(dtype)

    def x_start(out: torch.Tensor, y_b: torch.Tensor, last: int) -> torch.Tensor:
        return p_xstart(s, out, y_b, _full_step(y_b, last), var_type=var_type, clip_denoised=params.clip_denoised)

    with clock("entropy"):
        run: StageRun = read_stages(reader, syntax, limit)  # symbols only: verified before any network call
    stages = len(run.stages)
    if stages == 0:
        if run.stop == "check":
            raise DamagedFileError(f"the file is damaged (the integrity check after stage {run.at_stage} failed) "
                                   "and holds no intact stage before the damage")
        raise DiffcodecError(f"the first {bits} bits of the stream hold no complete stage; "
                             f"a longer prefix is needed")
    # The chain's steps, once for every region: per latent made, (stage, schedule, step index,
    # the code step of the latent before it); per stage, the latent current after it (a skipped
    # stage makes none).
    steps: list[tuple[int, Schedule | None, int, int]] = []
    current: list[int] = []
    for stage, symbols in enumerate(run.stages):
        if not (stage and symbols.level == 0 and params.version >= 3):
            k = K - 1 - stage
            sched, i = chain.step(k) if stage else (None, 0)
            steps.append((stage, sched, i, chain.kept[-1] if stage else -1))
            chain.keep(k)
        current.append(len(steps) - 1)
    last = chain.kept[-1]  # the last latent's code step
    parts = [symbols.parts() for symbols in run.stages]
    # what spans the image: x^_0 of the last latent, the pixels (keep_all: every latent and its x^_0;
    # DDIM: the last latent, which its reconstruction starts from)
    made = [torch.empty(shape, dtype=dtype, device=device) for _ in steps] if keep_all else []
    made_xstarts = [torch.empty(shape, dtype=dtype, device=device) for _ in steps[:-1]] if keep_all else []
    y = torch.empty(shape, dtype=dtype, device=device) if reconstruction == "ddim" else None
    pixel_stage = stages == K and limit > K
    # x^_0 of the last latent: as uint8 levels where nothing needs it as floats (1 byte a dimension, not 8)
    xstart_levels = as_levels and not keep_all and reconstruction == "xstart"
    last_xstart = None if xstart_levels else torch.empty(shape, dtype=dtype, device=device)
    last_levels = np.empty(shape, dtype=np.uint8) if xstart_levels else None
    pixels: np.ndarray | None = np.empty(D, dtype=np.uint8) if pixel_stage else None  # the decoded levels
    pixel_models = tail = shadow = None
    if pixel_stage and len(regions) > 1:  # the coder's state at the last region's pixels (`PixelTail`)
        shadow, shadow_syntax = RangeEncoder(), Syntax(params, D)
        for part in run.stages:
            write_stage(shadow, shadow_syntax, part)
    # A region at a time, every stage: its latents, slice by slice over the last one after the
    # network's call on it (a region's network outputs depend on its own tiles only), then the
    # last latent's x^_0 and, for the pixel stage, its models and pixels (read in the stream's
    # order: every stage's symbols, then the regions' pixels in turn).
    for r, region in enumerate(regions):
        first, Dr = region.start * per_tile, (region.stop - region.start) * per_tile
        # each network slice (`tile_slices` of the region): its tiles in the image and in the region, its dimensions
        rslices = [(slice(region.start + at.start, region.start + at.stop), at,
                    slice(at.start * per_tile, at.stop * per_tile))
                   for at in tile_slices(region.stop - region.start, tiles_per_call)]
        y_r = torch.empty((region.stop - region.start, *shape[1:]), dtype=dtype, device=device)  # the region's latent
        for j, (stage, sched, i, before) in enumerate(steps):
            part = parts[stage][r]
            chunking = syntax.chunking(part.level, Dr)
            with clock("candidates"):
                plan = stage_plan(params, stage, Dr, chunking, region=r) if params.version >= 4 else None
                u = _sample_stage(params, stage, part, chunking[0], Dr, plan)
            plan = None
            for sl, at, dims in rslices:
                if stage == 0:  # p = N(0, I)
                    p_mean = p_log_var = np.zeros(dims.stop - dims.start)
                else:
                    y_b = y_r[at]
                    out = network(y_b, before)
                    if keep_all:
                        made_xstarts[j - 1][sl] = x_start(out, y_b, before)
                    step = p_mean_variance(sched, out, y_b, _full_step(y_b, i), var_type=var_type,
                                           clip_denoised=params.clip_denoised)
                    p_mean, p_log_var = _flat64(step.mean), _flat64(step.log_variance)
                    step = out = y_b = None
                y_r[at] = torch.from_numpy(_latent(p_mean, p_log_var, u[dims], params.exact, dtype
                                                   ).reshape(y_r[at].shape)).to(device)
                p_mean = p_log_var = None
            u = None
            if keep_all:
                made[j][region] = y_r
            if progress is not None:
                for later in range(stage, stages if j == len(steps) - 1 else steps[j + 1][0]):
                    progress(later)  # this stage and the skipped ones after it
        if y is not None:
            y[region] = y_r
        region_models = (np.empty(Dr), np.empty(Dr)) if pixels is not None else None
        for sl, at, dims in rslices:
            y_b = y_r[at]
            out = network(y_b, last)
            if last_levels is not None:
                last_levels[sl] = to_levels(x_start(out, y_b, last))
            else:
                last_xstart[sl] = x_start(out, y_b, last)
            if region_models is not None:
                p = p_mean_variance(s, out, y_b, _full_step(y_b, last), var_type=var_type,
                                    clip_denoised=params.clip_denoised)
                region_models[0][dims], region_models[1][dims] = _pixel_params(p.mean, p.log_variance, params)
            p = out = y_b = None
        y_r = None
        if region_models is None:
            continue
        if progress is not None:
            progress(stages)  # the pixel stage's part for the region, its network's pass done
        with clock("entropy"):
            part = reader.pixels(*region_models)
            if part is None:
                pixels = None
                continue
            pixels[first:first + Dr] = part
            syntax.add_pixels(part)
            if shadow is not None and r < len(regions) - 1:
                shadow.encode_gaussian(part, *region_models, PIXEL_LO, PIXEL_HI)
            elif shadow is not None:
                tail = PixelTail(shadow.pos(), *region_models)
            pixel_models = region_models if len(regions) == 1 else None
        region_models = part = None
    shadow = None
    made_xstarts.append(last_xstart)
    xstarts = [made_xstarts[j] for j in current] if keep_all else []
    latents = [made[j] for j in current] if keep_all else []
    pixels_checked = None
    if pixels is not None:
        if syntax.closes():
            with clock("entropy"):
                pixels_checked = reader.closing(syntax)
                pixels = None if pixels_checked is None else pixels
        if pixels is not None:
            with clock("entropy"):
                if tail is not None:
                    used = tail_prefix(payload, bits, params, tail)
                else:
                    used = shortest_prefix(payload, bits, params, D, K + 1, pixel_models)
            pixel_models = tail = None
            if as_levels:
                return Decoded(None, K + 1, True, -1, bits, used, False, run.stop, run.at_stage,
                               last_xstart if keep_all else None, xstarts, latents, dict(clock.seconds),
                               pixels_checked, pixels.reshape(shape),
                               last_levels if last_levels is not None else to_levels(last_xstart))
            # each level's value (`images.level_values`), looked up: no float32 copy of the image on the way to dtype
            values = level_values(torch.arange(256, dtype=torch.uint8)).to(dtype).numpy()
            x0 = torch.from_numpy(values[pixels].reshape(shape)).to(device)
            pixels = None
            return Decoded(x0, K + 1, True, -1, bits, used, False, run.stop, run.at_stage, last_xstart,
                           xstarts, latents, dict(clock.seconds), pixels_checked)
    pixel_models = None
    # A complete stream whose last stage does not decode: the network's arithmetic differs
    # from the encoder's (another device, thread count or library version), or the file is
    # damaged (the caller tells which). Version 3 streams say so by their closing check.
    diverged = stages == K and limit > K and params.version < 3 and bits >= params.payload_bits
    k = chain.kept[-1]
    with clock("reconstruction"):
        if reconstruction == "xstart":
            x0 = last_xstart  # (None when held as levels)
        else:
            x0 = torch.empty_like(last_xstart)
            for sl in tile_slices(params.num_tiles, tiles_per_call):  # each slice's DDIM chain is its own
                x0[sl] = ddim_reconstruct(model_fn, s, y[sl], k, var_type=var_type,
                                          clip_denoised=params.clip_denoised, first_xstart=last_xstart[sl])
    with clock("entropy"):
        used = shortest_prefix(payload, bits, params, D, stages, None)
    if as_levels:
        levels = last_levels if last_levels is not None else to_levels(x0)
        return Decoded(None, stages, False, int(s.timesteps[k]), bits, used, diverged, run.stop, run.at_stage, None,
                       xstarts, latents, dict(clock.seconds), levels=levels)
    return Decoded(x0, stages, False, int(s.timesteps[k]), bits, used, diverged, run.stop, run.at_stage, None,
                   xstarts, latents, dict(clock.seconds))


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
            xstart = p_xstart(s, out, y, t, var_type=var_type, clip_denoised=clip_denoised)
        if j == 0:
            break
        eps = predict_eps_from_xstart(s, y, t, xstart)
        abar_prev = float(s.alphas_cumprod[j - 1])
        y = math.sqrt(abar_prev) * xstart + math.sqrt(1.0 - abar_prev) * eps
        xstart = None
    return xstart

