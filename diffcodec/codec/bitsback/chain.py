"""One chunk of tiles down the diffusion chain and back: bits-back ANS in Bit-Swap order.

Paper indices in the comments (x_0 the image, x_1..x_K latents); code step k (0-based)
links x_k and x_{k+1} with beta_{k+1} = ``s.betas[k]`` and calls the network at
``s.timesteps[k]``. Encoder, per chunk, on one ANS stack (q(x_{1:K}|x_0) = prod
q(x_{k+1}|x_k) is Markov, so no future latent is ever needed):

    pop  x_1 ~ q(x_1 | x_0);           push x_0 under p(x_0 | x_1)        (k = 0)
    pop  x_{k+1} ~ q(x_{k+1} | x_k);   push x_k under p(x_k | x_{k+1})    (k = 1 .. K-1)
    push x_K under the prior N(0, I)

Decoder, steps in reverse order:

    pop x_K under the prior
    pop x_k under p(x_k | x_{k+1});     push x_{k+1} back under q(x_{k+1} | x_k)  (bits back)

Discretisation (`chain_grid`). Each latent x_j has its own grid of width delta_j = 2^l_j,
about 2^-b of the smallest std it is coded with, and is popped once (under q) and pushed
once (under p) on that grid, so delta_j cancels up to O(delta^2 / sigma^2). Values are
coded as offsets from the rounded mean inside a window of +-W_j bins (about c sigmas) plus
an excess beyond its edge (`AnsStack.push_gaussian_windowed`; at most W_j more under q,
which is sampled from, unbounded under p and the prior, which are only pushed). Why
windows: constriction gives every symbol of a domain at least 2^-24, so a pop from a
domain of N symbols returns a uniformly random symbol with probability ~N x 2^-24; on one
fixed grid such strays, repeated at every step, cost several percent over the bound. A
window a few sigmas wide keeps N small; but on bins of 2^-b sigmas, those beyond about 4.7
sigmas hold less than 2^-24 each and are lifted to it, so a wider window strays more, and
one narrower than about 4.7 sigmas truncates q (`bench.coder_overhead` measures both;
reports/coder_overhead.json). Pixels are pushed under the discretized Gaussian decoder
over the 256 levels (`coding_params.pixel_params`).

Scrambling: right after x_k is pushed under p, the ANS state's low bits are x_k's position
in p's CDF, so an immediate pop under q would return a quantile transform of x_k instead of
a fresh sample; with a miscalibrated p the chain then drifts from q. Before each group of
SCRAMBLE_GROUP pops the encoder passes 24 bits per symbol through a keyed bijection
(`AnsStack.scramble`); the decoder undoes it after pushing the group back.

Coding parameters are float64 on the CPU from the network's output, snapped to 2^snap_log2
bins, so both sides agree whenever the network gives identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffcodec.codec.coding_params import NUM_LEVELS, PixelRule, levels_to_unit, pixel_params, snap, snapped_std, std_of
from diffcodec.codec.entropy import MAX_EXCESS, AnsStack
from diffcodec.diffusion import p_mean_variance, q_step_coefficients
from diffcodec.runtime import ModelFn
from diffcodec.schedule import Schedule

INIT_SEED = 0x6466_6362_6974_7331  # "dfcbits1": seed of the initial words (stored in the file)
STD_FLOOR = 2.0**-8  # stds (in bins or levels) never go below this after snapping
PIXEL_RULE = PixelRule(mean_lo=-1.0, mean_hi=float(NUM_LEVELS), std_floor=STD_FLOOR)  # the format's
SCRAMBLE_GROUP = 256  # symbols scrambled and popped together (bounds the extra stack dip)


# ------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class GridConfig:
    """How latents are discretised (stored in the file). The defaults are the encoder's."""

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


def q_params(
    s: Schedule, grid: ChainGrid, config: GridConfig, j: int, prev: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q(x_j | x_{j-1}) in bins of delta_j: snapped (mean, std) [n].

    ``prev`` is x_{j-1}: pixel values on [-1, 1] (float64) for j = 1, else x_{j-1}'s symbols.
    Only IEEE-exact float64 operations: identical on every machine.
    """
    mean_coef, std = q_step_coefficients(s, j - 1)
    if j == 1:
        prev_bins = prev * 2.0 ** -grid.log2_delta[1]
    else:
        prev_bins = prev.astype(np.float64) * 2.0 ** (grid.log2_delta[j - 1] - grid.log2_delta[j])
    mean = snap(mean_coef * prev_bins, config.snap_log2)
    std = snapped_std(np.full(prev_bins.shape, std * 2.0 ** -grid.log2_delta[j]), config.snap_log2, STD_FLOOR)
    return mean, std


def p_params(
    s: Schedule, grid: ChainGrid, config: GridConfig, j: int, output: torch.Tensor, x_next: torch.Tensor,
    *, var_type: str, clip_denoised: bool, exact_contract: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """p(x_j | x_{j+1}) from the network output at code step j (float64 CPU tensors), flattened:
    for j = 0 the pixel stage in level units (`coding_params.pixel_params`), else bins of delta_j."""
    t = torch.full((x_next.shape[0],), j, dtype=torch.long)
    p = p_mean_variance(s, output, x_next, t, var_type=var_type, clip_denoised=clip_denoised)
    if j == 0:
        return pixel_params(p.mean, p.log_variance, config.snap_log2, PIXEL_RULE, exact_contract=exact_contract)
    mean = p.mean.numpy().ravel()
    std = std_of(p.log_variance, exact_contract).numpy().ravel()
    scale = 2.0 ** -grid.log2_delta[j]
    return snap(mean * scale, config.snap_log2), snapped_std(std * scale, config.snap_log2, STD_FLOOR)


# ------------------------------------------------------------------------ the chain


class Underflow(Exception):
    """The stack ran out of initial words; the encoder retries with more."""


@dataclass(frozen=True)
class ChainCoder:
    """What both sides share besides the stack: the chain, the network, the grids.

    `encode_chunk` / `decode_chunk` are the public hooks (`bench.coder_overhead` runs
    `encode_chunk` on a measuring stack)."""

    model_fn: ModelFn
    schedule: Schedule
    var_type: str
    config: GridConfig = GridConfig()
    clip_denoised: bool = True
    device: torch.device | str = "cpu"
    network_dtype: torch.dtype = torch.float32
    exact: bool = False  # the exact contract: model_fn is the exact network, std by `exact.exp`

    @property
    def grid(self) -> ChainGrid:
        return chain_grid(self.schedule, self.config)

    def network(self, grid: ChainGrid, sym: np.ndarray, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Network at code step j on x_{j+1}'s symbols [B,C,H,W]: (output, x_{j+1}), float64 CPU."""
        x = torch.from_numpy(sym.astype(np.float64) * grid.delta(j + 1))
        t = torch.full((sym.shape[0],), int(self.schedule.timesteps[j]), dtype=torch.long, device=self.device)
        output = self.model_fn(x.to(device=self.device, dtype=self.network_dtype), t)
        return output.detach().to(device="cpu", dtype=torch.float64), x

    def _p(self, grid: ChainGrid, sym: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        output, x_next = self.network(grid, sym, k)
        return p_params(self.schedule, grid, self.config, k, output, x_next, var_type=self.var_type,
                        clip_denoised=self.clip_denoised, exact_contract=self.exact)

    def encode_chunk(self, grid: ChainGrid, stack: AnsStack, levels: np.ndarray,
                     on_step: Callable[[int], None] | None = None) -> int:
        """Encode one chunk (levels uint8 [B,C,H,W]); returns the lowest stack size (words) it reached."""
        s, cfg = self.schedule, self.config
        shape, K = levels.shape, s.num_steps
        prev: np.ndarray = levels_to_unit(levels).ravel()  # x_0 on [-1, 1]; then x_j's symbols
        lowest = stack.num_words
        for k in range(K):
            j = k + 1
            # pop x_{k+1} ~ q(x_{k+1} | x_k): bits come off the stack (the decoder gives them back)
            q_mean, q_std = q_params(s, grid, cfg, j, prev)
            sym = _pop_q(stack, q_mean, q_std, grid.half_width[j], j)
            lowest = min(lowest, stack.num_words)
            # push x_k under p(x_k | x_{k+1}); the pixels under the discretized decoder at k = 0
            p_mean, p_std = self._p(grid, sym.reshape(shape), k)
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

    def decode_chunk(self, grid: ChainGrid, stack: AnsStack, shape: tuple[int, ...],
                     on_step: Callable[[int], None] | None = None) -> np.ndarray:
        """Decode one chunk: uint8 levels [B,C,H,W] (the exact inverse of `encode_chunk`)."""
        s, cfg = self.schedule, self.config
        K, size = s.num_steps, int(np.prod(shape))
        sd = 2.0 ** -grid.log2_delta[K]
        sym = stack.pop_gaussian_windowed(np.zeros(size), np.full(size, sd), grid.prior_half_width, sd)  # x_K
        levels = np.zeros(size, dtype=np.int32)
        for k in reversed(range(K)):
            j = k + 1
            p_mean, p_std = self._p(grid, sym.reshape(shape), k)
            if k == 0:  # x_0 under the discretized decoder
                levels = stack.pop_gaussian(p_mean, p_std, 0, NUM_LEVELS - 1)
                prev: np.ndarray = levels_to_unit(levels)
            else:  # x_k under p(x_k | x_{k+1})
                prev = stack.pop_gaussian_windowed(p_mean, p_std, grid.half_width[k], float(grid.half_width[k]))
            # push x_{k+1} back under q(x_{k+1} | x_k): the bits the encoder borrowed
            q_mean, q_std = q_params(s, grid, cfg, j, prev)
            _push_q(stack, sym, q_mean, q_std, grid.half_width[j], j)
            sym = prev
            if on_step is not None:
                on_step(shape[0])
        return levels.astype(np.uint8).reshape(shape)


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
            raise Underflow
        out.append(stack.pop_gaussian_windowed(mean[sl], std[sl], w, float(w), w))
        if stack.bulk_words < 1:
            raise Underflow
    return np.concatenate(out)


def _push_q(stack: AnsStack, sym: np.ndarray, mean: np.ndarray, std: np.ndarray, w: int, j: int) -> None:
    """The decoder's inverse of `_pop_q`: push x_j back under q, groups in reverse order."""
    for start in reversed(range(0, mean.size, SCRAMBLE_GROUP)):
        sl = slice(start, start + SCRAMBLE_GROUP)
        stack.push_gaussian_windowed(sym[sl], mean[sl], std[sl], w, float(w), w)
        stack.unscramble(mean[sl].size, _scramble_key(j, start))
