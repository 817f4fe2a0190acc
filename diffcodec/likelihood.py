"""The variational bound of the paper's Eq. 5, term by term, in bits.

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                      (the prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))
    L_0     = -log p_theta(x_0 | x_1), a discretized Gaussian over 256 levels per pixel

Code step t (0-based) evaluates paper L_t: column 0 of ``terms_bits`` is the decoder term
L_0, column k the KL term L_k. Each term is a single-sample estimate with fresh noise per
step, as in the reference code. The noise of a whole evaluation (`evaluate_bound`) is drawn
per image: row r draws from its own stream, seeded from (seed, image index, tile index)
(`ImageNoise`), so an image's numbers do not depend on the batch or the process
(``torch.distributed`` rank) it landed in. Units are in the names: ``_nats``, ``_bits`` (per image,
summed over its dimensions) and ``_bpd`` (bits per dimension).

The equations themselves (Gaussian KL, discretized decoder) live once, in ``losses``; the
term L_t of a batch is one function, ``vb_term_bits``, which training shares (unclipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffcodec.diffusion import p_mean_variance, q_mean_variance, q_posterior_mean_variance, q_sample
from diffcodec.losses import LN2, discretized_gaussian_log_likelihood_nats, flat_sum, normal_kl_nats
from diffcodec.runtime import ModelFn
from diffcodec.schedule import Schedule

# ------------------------------------------------------------------ noise, per image

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's step and finalizer (Steele, Lea & Flood 2014) on a 64-bit word."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def image_seed(seed: int, image: int, tile: int = 0) -> int:
    """The seed (0..2^63-1) of one tile's noise stream: a fixed mixing of (seed, image, tile)."""
    z = _splitmix64(seed & _MASK64)
    z = _splitmix64(z ^ (image & _MASK64))
    return _splitmix64(z ^ (tile & _MASK64)) >> 1


class ImageNoise:
    """One noise stream per row of a batch, seeded by `image_seed` from the row's key
    (image index, tile index): a row draws the same numbers whatever batch, batch size or
    process it is evaluated in, as long as it asks for them in the same order."""

    def __init__(self, seed: int, keys: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(image_seed(seed, int(i), int(j)))
                           for i, j in keys]

    def normal(self, row_shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """N(0, I) draws [B, *row_shape], row r from stream r."""
        return torch.stack([torch.randn(tuple(row_shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def uniform(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """U[0, 1) draws [B, n], row r from stream r."""
        return torch.stack([torch.rand(n, generator=g, device=self.device, dtype=dtype) for g in self.generators])


Noise = torch.Generator | ImageNoise
"""Where a bound's draws come from: one generator for the batch (draws depend on the batch),
or `ImageNoise` (per row; what `evaluate_bound` uses)."""


def _normal_like(noise: Noise, x: torch.Tensor) -> torch.Tensor:
    if isinstance(noise, ImageNoise):
        if len(noise.generators) != x.shape[0]:
            raise ValueError(f"{len(noise.generators)} noise streams for a batch of {x.shape[0]}")
        return noise.normal(x.shape[1:], x.dtype).to(x.device)
    return torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)


def _uniform(noise: Noise, num_rows: int, n: int) -> torch.Tensor:
    if isinstance(noise, ImageNoise):
        if len(noise.generators) != num_rows:
            raise ValueError(f"{len(noise.generators)} noise streams for a batch of {num_rows}")
        return noise.uniform(n)
    return torch.rand((num_rows, n), generator=noise, device=noise.device, dtype=torch.float64)


def tile_keys(groups: Sequence[np.ndarray], num_rows: int) -> np.ndarray:
    """The noise key (image index, tile index) of each tile row [num_rows, 2], from
    ``groups`` (image i's row indices, `images.image_tiles`)."""
    keys = np.zeros((num_rows, 2), dtype=np.int64)
    for i, rows in enumerate(groups):
        keys[np.asarray(rows, dtype=np.int64)] = np.stack([np.full(len(rows), i), np.arange(len(rows))], axis=1)
    return keys


# ------------------------------------------------------------------------- the terms


def prior_bits(s: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per image [B]."""
    t = torch.full((x0.shape[0],), s.num_steps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = q_mean_variance(s, x0, t)
    kl = normal_kl_nats(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
    return flat_sum(kl) / LN2


def vb_term_bits(
    s: Schedule,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    var_type: str,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper L_t at code step t, per image in bits [B] (float64), and the x^_0 used [B,C,H,W].

    Rows with t == 0 get the decoder term -log p(x_0 | x_1); others the Gaussian KL. The one
    L_t of the bound (x^_0 clipped) and of training (unclipped, backpropagated through).
    Both branches are computed for every row, so there is no host sync (no data-dependent
    branching): the decoder term of a KL row sees harmless inputs (mean x_0, log scale 0),
    so that the branch a row does not use stays finite and passes back exactly zero gradient.
    """
    p = p_mean_variance(s, output, x_t, t, var_type=var_type, clip_denoised=clip_denoised)
    q_mean, _, q_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    kl_bits = flat_sum(normal_kl_nats(q_mean, q_log_var, p.mean, p.log_variance).double()) / LN2
    is_decoder = (t == 0).reshape(-1, *([1] * (x0.ndim - 1)))
    mean = torch.where(is_decoder, p.mean, x0)
    log_scale = torch.where(is_decoder, 0.5 * p.log_variance, torch.zeros_like(p.log_variance))
    decoder_bits = -flat_sum(discretized_gaussian_log_likelihood_nats(x0, mean=mean, log_scale=log_scale)) / LN2
    return torch.where(t == 0, decoder_bits, kl_bits), p.pred_xstart


@dataclass(frozen=True)
class BoundResult:
    """The bound of N images on a K-step chain. float64 numpy arrays."""

    prior_bits: np.ndarray  # [N]      L_T
    terms_bits: np.ndarray  # [N, K]   column k = paper L_k (column 0 = decoder L_0)
    xstart_mse: np.ndarray  # [N, K]   mean squared error of x^_0 at step k, on [0, 255]
    timesteps: np.ndarray  # [K]      original timestep of each column
    num_dims: np.ndarray  # [N]      dimensions each image's bits are spread over (C*H*W)

    @property
    def total_bits(self) -> np.ndarray:  # [N]
        return self.prior_bits + self.terms_bits.sum(axis=1)

    @property
    def total_bpd(self) -> np.ndarray:  # [N]
        return self.total_bits / self.num_dims

    @staticmethod
    def concatenate(parts: list[BoundResult]) -> BoundResult:
        return BoundResult(
            prior_bits=np.concatenate([p.prior_bits for p in parts]),
            terms_bits=np.concatenate([p.terms_bits for p in parts]),
            xstart_mse=np.concatenate([p.xstart_mse for p in parts]),
            timesteps=parts[0].timesteps,
            num_dims=np.concatenate([p.num_dims for p in parts]),
        )


def _sampled_term(
    model_fn: ModelFn,
    s: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    original_t: torch.Tensor,
    var_type: str,
    generator: Noise,
    clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper L_t of each row at its code step t [B], on a fresh draw x_t ~ q(x_t | x_0)."""
    noise = _normal_like(generator, x0)
    x_t = q_sample(s, x0, t, noise)
    output = model_fn(x_t, original_t[t]).float()
    return vb_term_bits(s, output, x0, x_t, t, var_type=var_type, clip_denoised=clip_denoised)


def _batch_result(s: Schedule, x0: torch.Tensor, terms: torch.Tensor, mse: torch.Tensor) -> BoundResult:
    """A batch's BoundResult: its terms and x^_0 errors [B, K], with the exact prior term."""
    return BoundResult(
        prior_bits=prior_bits(s, x0).double().cpu().numpy(),
        terms_bits=terms.cpu().numpy(),
        xstart_mse=mse.cpu().numpy(),
        timesteps=s.timesteps.copy(),
        num_dims=np.full(x0.shape[0], int(np.prod(x0.shape[1:])), dtype=np.int64),
    )


def _mse_255(pred_xstart: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (((pred_xstart - x0) * 127.5) ** 2).reshape(x0.shape[0], -1).double().mean(1)


def bound_bits(
    model_fn: ModelFn,
    s: Schedule,
    x0: torch.Tensor,
    *,
    var_type: str,
    generator: Noise,
    clip_denoised: bool = True,
    on_step: Callable[[], None] | None = None,
) -> BoundResult:
    """The bound of a batch x0 [B,C,H,W] in [-1, 1]: one network call per code step.

    Noise for step k is drawn from ``generator`` in the order k = K-1 .. 0: a torch
    Generator (on x0's device) gives the same numbers for the same (seed, batch); an
    `ImageNoise` the same numbers per row, whatever the batch.
    """
    num_images, num_steps = x0.shape[0], s.num_steps
    # kept on x0's device until the end: no host sync per step on a GPU
    terms = torch.zeros(num_images, num_steps, dtype=torch.float64, device=x0.device)
    mse = torch.zeros(num_images, num_steps, dtype=torch.float64, device=x0.device)
    original_t = torch.from_numpy(s.timesteps).to(x0.device)
    for k in reversed(range(num_steps)):
        t = torch.full((num_images,), k, dtype=torch.long, device=x0.device)
        term, pred_xstart = _sampled_term(model_fn, s, x0, t, original_t, var_type, generator, clip_denoised)
        terms[:, k] = term
        mse[:, k] = _mse_255(pred_xstart, x0)
        if on_step is not None:
            on_step()
    return _batch_result(s, x0, terms, mse)


@dataclass(frozen=True)
class BoundSummary:
    """Means over images, with standard errors, in bits per dimension."""

    num_images: int
    num_steps: int
    total_bpd: float
    total_bpd_stderr: float
    prior_bpd: float  # L_T
    decoder_bpd: float  # L_0
    kl_bpd: float  # L_1 + ... + L_{T-1}
    xstart_rmse_255_at_t1: float


def summarize(result: BoundResult) -> BoundSummary:
    n = len(result.prior_bits)
    d = result.num_dims
    total = result.total_bpd
    return BoundSummary(
        num_images=n,
        num_steps=result.terms_bits.shape[1],
        total_bpd=float(total.mean()),
        total_bpd_stderr=float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        prior_bpd=float((result.prior_bits / d).mean()),
        decoder_bpd=float((result.terms_bits[:, 0] / d).mean()),
        kl_bpd=float((result.terms_bits[:, 1:].sum(axis=1) / d).mean()),
        xstart_rmse_255_at_t1=float(np.sqrt(result.xstart_mse[:, 0].mean())),
    )


def merge_rows(result: BoundResult, groups: list[np.ndarray], num_dims: np.ndarray) -> BoundResult:
    """Sum the bits of row groups (the tiles of one image) into one row per group.

    ``num_dims`` [G] gives each merged row's dimension count (an image's real pixels x 3,
    so padding a tiled image costs bits but adds no dimensions). The MSE is averaged.
    """
    return BoundResult(
        prior_bits=np.array([result.prior_bits[g].sum() for g in groups]),
        terms_bits=np.stack([result.terms_bits[g].sum(axis=0) for g in groups]),
        xstart_mse=np.stack([result.xstart_mse[g].mean(axis=0) for g in groups]),
        timesteps=result.timesteps,
        num_dims=np.asarray(num_dims, dtype=np.int64),
    )


def evaluate_bound(
    model_fn: ModelFn,
    s: Schedule,
    batches: Iterable[torch.Tensor],
    *,
    var_type: str,
    seed: int,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    on_step: Callable[[], None] | None = None,
    proposal: np.ndarray | None = None,
    num_samples: int = 0,
    keys: np.ndarray | None = None,
) -> BoundResult:
    """The bound over batches of images ([B,C,H,W] in [-1,1]), rows in order.

    Row r's noise comes from its own stream, seeded from (``seed``, ``keys[r]``) (`ImageNoise`;
    ``keys`` [rows, 2] = (image index, tile index), `tile_keys`; default (r, 0)): it does
    not depend on how the rows are cut into batches or shared among processes. (Before
    issue 18 batch i drew from one generator seeded seed + i.) With a ``proposal``, each
    image's KL terms are estimated from ``num_samples`` drawn steps (`sampled_bound_bits`)
    instead of summed over the whole chain.
    """
    parts, row = [], 0
    for x0 in batches:
        rows = x0.shape[0]
        batch_keys = [(r, 0) for r in range(row, row + rows)] if keys is None else keys[row : row + rows]
        if len(batch_keys) != rows:
            raise ValueError(f"{len(keys)} noise keys for batches of more rows")
        generator = ImageNoise(seed, batch_keys, device)
        row += rows
        kwargs = dict(var_type=var_type, generator=generator, clip_denoised=clip_denoised, on_step=on_step)
        if proposal is None:
            parts.append(bound_bits(model_fn, s, x0.to(device), **kwargs))
        else:
            parts.append(sampled_bound_bits(model_fn, s, x0.to(device), proposal=proposal,
                                            num_samples=num_samples, **kwargs))
    return BoundResult.concatenate(parts)


# ------------------------------------------------------------ Monte Carlo over timesteps
#
# The full bound costs K network calls per image: 1,000 on the paper's chain, about 33 s per
# 32x32 image on one CPU core. Its KL terms are a sum over t, and a sum can be estimated
# without bias from a few terms drawn at random: with t_1..t_n drawn from a proposal r over
# the code steps 1..K-1, sum_t L_t = E[(1/n) sum_i L_{t_i} / r(t_i)]. Every term is itself a
# single-sample estimate (one x_t per step, as above), so the full chain's number and this
# one estimate the same bound; this one has more variance per image, and the standard error
# over images (the ± that `summarize` prints) covers both sources.
#
# The proposal follows where the bits are: a pilot measures the mean L_t on a few images at a
# grid of steps dense near t = 0, log-linearly interpolated between them, mixed with a
# uniform share so that no step's weight 1 / (n r(t)) can blow up. The draws are stratified
# (one per 1/n of the proposal's CDF), which keeps the estimate unbiased and lowers variance.


def pilot_steps(num_steps: int, grid_size: int) -> np.ndarray:
    """Up to ``grid_size`` distinct code steps in [1, K-1], dense near 1 (quadratic), both ends kept."""
    if num_steps < 2:
        return np.zeros(0, dtype=np.int64)
    u = np.linspace(1.0, math.sqrt(num_steps - 1), max(2, grid_size))
    return np.unique(np.clip(np.round(u**2), 1, num_steps - 1).astype(np.int64))


def importance_proposal(
    grid_steps: np.ndarray, grid_bits: np.ndarray, num_steps: int, *, uniform_share: float = 0.1
) -> np.ndarray:
    """A distribution over code steps 0..K-1 (step 0, the decoder term, gets 0): the pilot's
    mean L_t (``grid_bits`` at ``grid_steps``) interpolated in log space, mixed with uniform."""
    if num_steps < 2:
        raise ValueError("a chain of one step has no KL terms to sample")
    if not 0.0 < uniform_share <= 1.0:
        raise ValueError(f"uniform_share must be in (0, 1], got {uniform_share}")
    steps = np.arange(1, num_steps)
    uniform = np.full(num_steps - 1, 1.0 / (num_steps - 1))
    bits = np.asarray(grid_bits, dtype=np.float64)
    if len(grid_steps) == 0 or not np.all(np.isfinite(bits)) or bits.sum() <= 0:
        shaped = uniform
    else:
        log_bits = np.log(np.maximum(bits, 1e-12 * bits.max()))
        shaped = np.exp(np.interp(steps, grid_steps, log_bits))
        shaped /= shaped.sum()
    proposal = np.zeros(num_steps)
    proposal[1:] = (1.0 - uniform_share) * shaped + uniform_share * uniform
    return proposal / proposal.sum()


def stratified_steps(proposal: np.ndarray, num_images: int, num_samples: int, generator: Noise) -> np.ndarray:
    """``num_samples`` code steps per image [N, n]: draw i from the i-th 1/n of the proposal's CDF.

    Step t lands in draw i with probability n x |CDF interval of t  ∩  [i/n, (i+1)/n)|, so
    summed over i it is drawn n r(t) times on average: (1/n) sum_i L_{t_i} / r(t_i) is unbiased.
    """
    cdf = np.cumsum(proposal)
    u = _uniform(generator, num_images, num_samples)
    u = (torch.arange(num_samples, dtype=torch.float64, device=u.device) + u) / num_samples
    steps = np.searchsorted(cdf, u.cpu().numpy() * cdf[-1], side="right")
    return np.clip(steps, 1, len(proposal) - 1).astype(np.int64)


def pilot_terms_bits(
    model_fn: ModelFn,
    s: Schedule,
    x0: torch.Tensor,
    grid_steps: np.ndarray,
    *,
    var_type: str,
    generator: torch.Generator,
    clip_denoised: bool = True,
    on_step: Callable[[], None] | None = None,
) -> np.ndarray:
    """Mean over the images x0 of paper L_t at each of ``grid_steps``, in bits [G]."""
    original_t = torch.from_numpy(s.timesteps).to(x0.device)
    out = np.zeros(len(grid_steps))
    for i, k in enumerate(grid_steps):
        t = torch.full((x0.shape[0],), int(k), dtype=torch.long, device=x0.device)
        term, _ = _sampled_term(model_fn, s, x0, t, original_t, var_type, generator, clip_denoised)
        out[i] = float(term.mean())
        if on_step is not None:
            on_step()
    return out


def sampled_bound_bits(
    model_fn: ModelFn,
    s: Schedule,
    x0: torch.Tensor,
    *,
    proposal: np.ndarray,
    num_samples: int,
    var_type: str,
    generator: Noise,
    clip_denoised: bool = True,
    on_step: Callable[[], None] | None = None,
) -> BoundResult:
    """An unbiased estimate of ``bound_bits`` from 1 + ``num_samples`` network calls per batch.

    L_T is exact and L_0 a single sample, as in the full bound; the KL terms are drawn
    (`stratified_steps`) and each drawn term is weighted 1 / (n r(t)) into its own column, so
    every column (and any sum of columns) is an unbiased estimate of the full chain's. The
    x^_0 error is known only for column 0; the other columns hold NaN.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if proposal.shape != (s.num_steps,) or proposal[0] != 0.0:
        raise ValueError("the proposal must cover the chain's K steps and give step 0 no mass")
    num_images = x0.shape[0]
    steps = stratified_steps(proposal, num_images, num_samples, generator)
    weights = 1.0 / (num_samples * proposal[steps])  # [N, n]
    terms = torch.zeros(num_images, s.num_steps, dtype=torch.float64, device=x0.device)
    mse = torch.full((num_images, s.num_steps), math.nan, dtype=torch.float64, device=x0.device)
    original_t = torch.from_numpy(s.timesteps).to(x0.device)
    t = torch.zeros(num_images, dtype=torch.long, device=x0.device)
    term, pred_xstart = _sampled_term(model_fn, s, x0, t, original_t, var_type, generator, clip_denoised)
    terms[:, 0] = term
    mse[:, 0] = _mse_255(pred_xstart, x0)
    if on_step is not None:
        on_step()
    for i in range(num_samples):
        t = torch.from_numpy(steps[:, i]).to(x0.device)
        term, _ = _sampled_term(model_fn, s, x0, t, original_t, var_type, generator, clip_denoised)
        w = torch.from_numpy(weights[:, i]).to(x0.device)
        terms.scatter_add_(1, t[:, None], (term * w)[:, None])
        if on_step is not None:
            on_step()
    return _batch_result(s, x0, terms, mse)
