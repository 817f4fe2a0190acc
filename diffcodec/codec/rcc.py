"""Reverse channel coding: send a sample of q using p and randomness both sides share.

The paper's Algorithm 3 sends x_t ~ q(x_t | x_{t+1}, x_0) "using p_theta(x_t | x_{t+1})".
Here that is done with the Poisson functional representation (PFR; Li & El Gamal 2018),
truncated to N candidates as in ordered random coding (Theis & Yosri 2022):

1. Encoder and decoder draw the same candidates u_0, u_1, ... ~ N(0, I) (standardised
   draws from p: z_n = mean_p + std_p * u_n) from a generator keyed by integers they both
   know (`candidate_normals`: random access, so the decoder makes only the one it needs).
2. The encoder draws arrival times T_0 < T_1 < ... (cumulative sums of Exp(1)) and picks
   n* = argmin_n log T_n - log w(u_n), w = q(z)/p(z) (`pfr_select_many`). Without truncation z_n*
   is an exact sample of q; the index costs about KL(q||p) + log2(KL + 1) + O(1) bits.
3. Only n* is entropy-coded: as its exponent m = bit_length(n*) under an adaptive law that
   depends on the chunk's nominal KL (`ExponentModel`), then the m - 1 bits below the
   leading one, uniformly (`split_index`).

Step 2 may use another rule (`select_many`): the decoder takes candidate n* whichever rule
chose it. The greedy rule (`greedy_select_many`, argmax_n w(u_n)) is not a sample of q but
delivers more log q/p per index bit from the same candidates, which is what a chain of stages
pays for (reports/rcc_methods.md).

For diagonal Gaussians the log weight is a quadratic in u, per dimension
    log w = a u^2 + b u + c,   a = (1 - var_p/var_q) / 2,   b = -(mean_p - mean_q) std_p / var_q,
    c = -(mean_p - mean_q)^2 / (2 var_q) + log(var_p / var_q) / 2,
linear when the variances are equal. The cost of the search is exponential in the KL, so
callers split a step's dimensions into chunks of a few bits each (see ``progressive``).

Everything here is numpy; nothing touches global random state. Candidates come from numpy's
PCG64 raw stream (whose bits numpy guarantees across versions) keyed by a SeedSequence,
through a Box-Muller transform (`candidate_normals`). Two transforms share the raw bits:
the fast one in float32 numpy (libm's log/cos/sin: what the encoder's search scores, in its own
arrangement `_search_log_weights`, and what files without the exact contract decode with), and the exact one (`exact` basic operations
in float64, rounded once to float32: the same bits on every machine), which an exact-contract
file's decoder, and its encoder after the search, use for the chosen candidate. The search
needs only to rank candidates; both sides then use the exact sample of the sent index.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtr

from diffcodec import exact
from diffcodec.losses import LN2, normal_kl_nats

MAX_LOG2_CANDIDATES = 24
_BLOCK_ELEMENTS = 1 << 20  # candidate x dimension elements per block (job) in the encoder's search
_SUB_BLOCK_ELEMENTS = 1 << 16  # ... and per cache-sized step within a block (its candidates are scored together)
_ARRIVAL_STREAM = 0xA771  # extra key word of the encoder-only arrival-time stream
TWO_PI = 6.283185307179586  # a literal


# ----------------------------------------------------------------------- shared randomness


def _bitgen(key: tuple[int, ...]) -> np.random.PCG64:
    if not key or any(int(k) < 0 for k in key):
        raise ValueError(f"rcc: key must be non-negative integers, got {key!r}")
    return np.random.PCG64(np.random.SeedSequence([int(k) for k in key]))


def _raw_to_normals(raw: np.ndarray, dims: int) -> np.ndarray:
    """uint64 [count, ceil(dims/2)] draws -> float32 [count, dims] standard normals.

    Box-Muller on two 24-bit uniforms per draw: u1 = (bits 40..63 + 1) / 2^24 in (0, 1],
    u2 = bits 0..23 / 2^24; the pair is r cos(2 pi u2), r sin(2 pi u2), r = sqrt(-2 ln u1).
    Every step is exact in float32 except the transcendental functions.
    """
    u1 = ((raw >> np.uint64(40)).astype(np.float32) + np.float32(1.0)) * np.float32(2.0**-24)
    theta = (raw & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0 * math.pi * 2.0**-24)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    out = np.empty((raw.shape[0], 2 * raw.shape[1]), dtype=np.float32)
    out[:, 0::2] = r * np.cos(theta)
    out[:, 1::2] = r * np.sin(theta)
    return out[:, :dims]


def _raw_to_normals_exact(raw: np.ndarray, dims: int) -> np.ndarray:
    """`_raw_to_normals` under the exact contract: the same uniforms, the transcendental
    functions from `exact` in float64, each normal rounded once to float32."""
    u1 = ((raw >> np.uint64(40)).astype(np.float64) + 1.0) * 2.0**-24
    u2 = (raw & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    r = exact.sqrt(-2.0 * exact.log(torch.from_numpy(u1)))
    sin, cos = exact.sin_cos(torch.from_numpy(u2) * TWO_PI)
    out = np.empty((raw.shape[0], 2 * raw.shape[1]), dtype=np.float32)
    out[:, 0::2] = (r * cos).numpy()
    out[:, 1::2] = (r * sin).numpy()
    return out[:, :dims]


def _draws_per_candidate(dims: int) -> int:
    return (dims + 1) // 2


def candidate_normals(key: tuple[int, ...], start: int, count: int, dims: int, *, exact_contract: bool = False
                      ) -> np.ndarray:
    """Candidates start .. start+count-1 of the stream ``key``: float32 [count, dims] ~ N(0, I)
    (``exact_contract``: by the exact transform, else the fast one).

    Candidate n uses raw draws n*h .. (n+1)*h - 1 (h = ceil(dims/2)) of the keyed PCG64
    stream, so any candidate can be made without the ones before it (the decoder makes one).
    """
    if start < 0 or count < 0 or dims < 1:
        raise ValueError(f"rcc: bad candidate range start={start} count={count} dims={dims}")
    h = _draws_per_candidate(dims)
    bitgen = _bitgen(key)
    if start:
        bitgen.advance(start * h)
    raw = bitgen.random_raw(count * h).reshape(count, h)
    return _raw_to_normals_exact(raw, dims) if exact_contract else _raw_to_normals(raw, dims)


def _candidate_raw(key: tuple[int, ...], index: int, dims: int) -> np.ndarray:
    """The raw draws of candidate ``index`` of the stream ``key``: uint64 [ceil(dims / 2)]."""
    h = _draws_per_candidate(dims)
    bitgen = _bitgen(key)
    if index:
        bitgen.advance(index * h)
    return bitgen.random_raw(h)


def arrival_log_times(key: tuple[int, ...], count: int) -> np.ndarray:
    """log T_n of a rate-1 Poisson process (cumulative sums of Exp(1)), float64 [count].

    Only the encoder needs these; they are keyed too so that encoding is reproducible.
    """
    gen = np.random.Generator(_bitgen((*key, _ARRIVAL_STREAM)))
    return np.log(np.cumsum(gen.standard_exponential(count)))


# ------------------------------------------------------------------------ importance weights


@dataclass(frozen=True)
class LogWeight:
    """log q(z)/p(z) at z = mean_p + std_p * u as sum_i a_i u_i^2 + b_i u_i + c_i (nats)."""

    a: np.ndarray  # float64 [d]
    b: np.ndarray  # float64 [d]
    c: float

    @staticmethod
    def of_gaussians(
        q_mean: np.ndarray, q_log_var: np.ndarray, p_mean: np.ndarray, p_log_var: np.ndarray
    ) -> LogWeight:
        """Diagonal Gaussians q = N(q_mean, e^q_log_var), p = N(p_mean, e^p_log_var), all [d]."""
        q_mean, q_log_var, p_mean, p_log_var = (np.asarray(v, dtype=np.float64).ravel()
                                                for v in (q_mean, q_log_var, p_mean, p_log_var))
        ratio = np.exp(p_log_var - q_log_var)  # var_p / var_q
        delta = p_mean - q_mean
        a = 0.5 * (1.0 - ratio)
        b = -delta * np.exp(0.5 * p_log_var - q_log_var)
        c = float(np.sum(-0.5 * delta**2 * np.exp(-q_log_var) + 0.5 * (p_log_var - q_log_var)))
        return LogWeight(a, b, c)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """u [n, d] -> log weights [n] (nats, float64)."""
        u = np.asarray(u, dtype=np.float64)
        return (u * u) @ self.a + u @ self.b + self.c


KL_BLOCK = 1 << 16
"""Values per block of `gaussian_kl_bits` and `rcc_pool.log_weight_coefficients` (a multiple
of torch's elementwise grain, 32768)."""


def gaussian_kl_bits(
    q_mean: np.ndarray, q_log_var: np.ndarray, p_mean: np.ndarray, p_log_var: np.ndarray
) -> np.ndarray:
    """Elementwise KL(q || p) of diagonal Gaussians in bits (float64, same shape): the
    bound's `losses.normal_kl_nats` on numpy arrays, computed in blocks of `KL_BLOCK` values
    (its temporaries stay a block long: a photo's stage holds millions of dimensions)."""
    shape, arrays = flat_float64(q_mean, q_log_var, p_mean, p_log_var)
    flat = [torch.from_numpy(a) for a in arrays]
    out = np.empty(int(np.prod(shape)), dtype=np.float64)
    for i in range(0, out.size, KL_BLOCK):
        out[i : i + KL_BLOCK] = (normal_kl_nats(*(v[i : i + KL_BLOCK] for v in flat)) / LN2).numpy()
    return out.reshape(shape)


def flat_float64(*values) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """``values`` broadcast together: their shape, and each as a flat contiguous float64
    array (the array itself where it already has that shape and type; a copy where it is
    broadcast), for elementwise work in blocks of `KL_BLOCK`."""
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    return shape, [np.ascontiguousarray(a if a.shape == shape else np.broadcast_to(a, shape).copy()).reshape(-1)
                   for a in arrays]


def _search_coefficients(log_weight: LogWeight) -> np.ndarray:
    """The encoder's search form of ``log_weight``: float32 [4, h] (h = ceil(d / 2)), the
    rows a_cos, b_cos, a_sin, b_sin (cos parts: dims 0, 2, ...; sin parts: dims 1, 3, ...;
    an odd d's unused last sin part has zero coefficients). See `_search_log_weights`."""
    a, b = log_weight.a, log_weight.b
    dims = len(a)
    h = _draws_per_candidate(dims)
    coef = np.zeros((4, h), dtype=np.float32)
    coef[0], coef[1] = a[0::2], b[0::2]
    coef[2, : dims // 2], coef[3, : dims // 2] = a[1::2], b[1::2]
    return coef


def _search_log_weights(raw: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """sum_i a_i u_i^2 + b_i u_i for the candidates u = `_raw_to_normals` (raw) of uint64 raw
    draws [count, h], float32 [count], with ``coef`` = `_search_coefficients`: what the
    encoder's search ranks, computed faster than from the interleaved normals.

    The same float32 r = sqrt(-2 ln u1) and theta = 2 pi u2 as `_raw_to_normals`, and
    c = r cos(theta), s = r sin(theta) kept apart (cos parts are the even dims, sin parts the
    odd ones) in one [4, count, h] buffer as c^2, c, s^2, s, so that one dot product per
    candidate with ``coef`` gives its sum (an odd d's unused last s has zero coefficients).
    The values agree with ``((a * u + b) * u).sum(1)`` to float32 rounding (summation order
    and SIMD lanes differ), so the search could rank candidates whose scores are equal to
    within that rounding differently; the chosen index's sample is recomputed by
    `candidate_normals` afterwards. A candidate's value depends only on its own draws and the
    number of candidates in the call (np.einsum sums in numpy's own loops, no BLAS threads),
    so the choice does not depend on the number of workers.
    """
    count, h = raw.shape
    buf = np.empty((4, count, h), dtype=np.float32)  # each part contiguous: fast elementwise loops
    cc, c, ss, s = buf
    r, theta, bits = cc, ss, s.view(np.int32)  # scratch until the squares and s are written
    # 24-bit integers, exact in int32 and float32 (uint64 -> int32 -> float32 is the fast way)
    np.right_shift(raw, 40, out=bits, casting="unsafe")  # bits 40..63 of the draw
    np.copyto(r, bits, casting="unsafe")
    r += np.float32(1.0)
    r *= np.float32(2.0**-24)
    np.log(r, out=r)
    r *= np.float32(-2.0)
    np.sqrt(r, out=r)
    np.bitwise_and(raw, 0xFFFFFF, out=bits, casting="unsafe")  # bits 0..23
    np.copyto(theta, bits, casting="unsafe")
    theta *= np.float32(2.0 * math.pi * 2.0**-24)
    np.cos(theta, out=c)
    np.sin(theta, out=s)
    c *= r
    s *= r
    np.multiply(c, c, out=cc)
    np.multiply(s, s, out=ss)
    return np.einsum("kij,kj->i", buf, coef)


# ---------------------------------------------------------------------------- PFR selection


PfrTask = tuple[LogWeight, tuple[int, ...], int]  # (log weight, key, number of candidates)
SELECTION_RULES = ("pfr", "greedy")  # `select_many`'s rules


def pfr_select_many(tasks: Sequence[PfrTask], *, workers: int = 1) -> list[int]:
    """The encoder's choice n* = argmin_n log T_n - log w(u_n) over n < num_candidates, for
    several chunks; their candidate blocks (about 2^20 candidate-dimension elements each,
    bounded memory) run on ``workers`` threads.

    Each block makes its own candidates' raw draws (the keyed stream advanced to the block's
    start) and scores them by `_search_log_weights` in cache-sized steps of about 2^16
    elements; the steps' and the blocks' minima are merged in candidate order, so the result
    is the same for any number of workers. numpy releases the GIL in the generator and the
    array arithmetic.
    """
    return select_many(tasks, rule="pfr", workers=workers)


def greedy_select_many(tasks: Sequence[PfrTask], *, workers: int = 1) -> list[int]:
    """The encoder's choice n* = argmax_n log w(u_n) over n < num_candidates (the candidate
    that delivers the most, log q/p, of those the budget allows), for several chunks, as
    `pfr_select_many` runs them (no arrival times).

    Not a sample of q: the chosen u sits near the largest projection on the mean shift
    (reports/rcc_methods.md). What a chain of stages pays is the index bits minus the log2 q/p
    the sent latents deliver, and for a given list of candidates and a uniform index code the
    largest log w minimises that; the index of the largest of N i.i.d. weights is uniform on
    0..N-1, so it costs log2 N bits. The decoder is `pfr_decode`: it takes candidate n*,
    whichever rule chose it.
    """
    return select_many(tasks, rule="greedy", workers=workers)


def select_many(tasks: Sequence[PfrTask], *, rule: str = "pfr", workers: int = 1) -> list[int]:
    """The chosen index of each task under ``rule`` (`SELECTION_RULES`): "pfr" =
    `pfr_select_many`, "greedy" = `greedy_select_many`. Both minimise a score over the
    candidates, log T_n - log w(u_n) or -log w(u_n), with ties kept by the first candidate."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"rcc: unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")
    jobs: list[tuple[int, int, int]] = []  # (task, first candidate, count)
    log_times, params = [], []
    for i, (log_weight, key, num_candidates) in enumerate(tasks):
        if not 1 <= num_candidates <= 1 << MAX_LOG2_CANDIDATES:
            raise ValueError(f"rcc: num_candidates must be 1..2^{MAX_LOG2_CANDIDATES}, got {num_candidates}")
        dims = len(log_weight.a)
        block = max(1, _BLOCK_ELEMENTS // dims)
        jobs += [(i, start, min(block, num_candidates - start)) for start in range(0, num_candidates, block)]
        log_times.append(arrival_log_times(key, num_candidates) if rule == "pfr" else None)
        params.append((_search_coefficients(log_weight), dims))

    def run(job: tuple[int, int, int]) -> tuple[float, int]:
        i, start, count = job
        coef, dims = params[i]
        h = _draws_per_candidate(dims)
        bitgen = _bitgen(tasks[i][1])
        if start:
            bitgen.advance(start * h)
        step = max(1, _SUB_BLOCK_ELEMENTS // dims)
        best_score, best_index = math.inf, start
        for first in range(start, start + count, step):  # in candidate order: ties keep the first
            n = min(step, start + count - first)
            log_w = _search_log_weights(bitgen.random_raw(n * h).reshape(n, h), coef)  # c is a constant
            # log T_n - log w(u_n) in float64 (pfr), or -log w(u_n)
            score = -log_w if log_times[i] is None else log_times[i][first : first + n] - log_w
            j = int(np.argmin(score))
            if score[j] < best_score:
                best_score, best_index = float(score[j]), first + j
        return best_score, best_index

    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(job) for job in jobs]
    best = [(math.inf, 0)] * len(tasks)
    for (i, _, _), (score, index) in zip(jobs, results):  # candidate order: ties keep the first
        if score < best[i][0]:
            best[i] = (score, index)
    return [index for _, index in best]


def pfr_decode(key: tuple[int, ...], index: int, dims: int, *, exact_contract: bool = False) -> np.ndarray:
    """The decoder's sample: candidate ``index`` of the stream ``key``, float32 [dims]."""
    return candidate_normals(key, index, 1, dims, exact_contract=exact_contract)[0]


def pfr_decode_many(items: Sequence[tuple[tuple[int, ...], int, int]], *, exact_contract: bool = False
                    ) -> list[np.ndarray]:
    """`pfr_decode` of many (key, index, dims): the same samples. Under the exact contract the
    transform runs once over all their draws (it is elementwise and exact, so batching changes
    no bit); the fast float32 transform runs per sample as files without the contract were
    written (numpy's SIMD libm may round an element differently in a vector body and a tail)."""
    if not exact_contract:
        return [pfr_decode(key, index, dims) for key, index, dims in items]
    if not items:
        return []
    raws = [_candidate_raw(key, index, dims) for key, index, dims in items]
    normals = _raw_to_normals_exact(np.concatenate(raws)[None], 2 * sum(len(r) for r in raws))[0]
    out, start = [], 0
    for raw, (_, _, dims) in zip(raws, items):
        out.append(normals[start : start + dims])
        start += 2 * len(raw)
    return out


# ----------------------------------------------------------------------------- index coding


def split_index(index: int | np.ndarray) -> tuple:
    """index >= 0 -> (exponent m = bit_length(index), the m - 1 bits below the leading one).
    Element-wise on an array of indices (int64 arrays back; integer operations only: a stage
    of a photo has thousands of chunks), Python ints for one index."""
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError("rcc: an index is negative")
    exponents = np.zeros(idx.shape, dtype=np.int64)
    rest = idx.copy()
    while rest.any():  # the bit length, one bit per pass (at most MAX_LOG2_CANDIDATES + 1 passes)
        exponents += rest > 0
        rest >>= 1
    mantissas = np.where(exponents >= 2, idx - mantissa_size(exponents), 0)
    return (int(exponents), int(mantissas)) if idx.ndim == 0 else (exponents, mantissas)


def join_index(exponent: int | np.ndarray, mantissa: int | np.ndarray) -> int | np.ndarray:
    """The inverse of `split_index` (element-wise on arrays)."""
    e, m = np.asarray(exponent, dtype=np.int64), np.asarray(mantissa, dtype=np.int64)
    out = np.where(e == 0, 0, np.left_shift(1, np.maximum(e - 1, 0)) + m)
    return int(out) if out.ndim == 0 else out


def mantissa_size(exponent: int | np.ndarray) -> int | np.ndarray:
    """How many values the mantissa of an exponent takes (1: nothing to code); element-wise on arrays."""
    e = np.asarray(exponent, dtype=np.int64)
    out = np.where(e >= 2, np.left_shift(1, np.maximum(e - 1, 0)), 1)
    return int(out) if out.ndim == 0 else out


def exponent_prior(kl_bits: float, max_exponent: int, *, exact_contract: bool = False) -> np.ndarray:
    """A prior law of the PFR index's exponent for a chunk of KL ``kl_bits``: float64 [M+1].

    Models log2(n* + 1) as Gaussian with mean KL - 1/2 and variance 1 + 2 KL (the spread of
    the log importance weight under q is about 2 KL nats), binned at m - 1/2, with 10% of
    uniform mass so that no exponent is ever nearly impossible. `ExponentModel` adapts it.
    """
    kl = max(float(kl_bits), 0.0)
    mean, std = kl - 0.5, math.sqrt(1.0 + 2.0 * kl)
    edges = (np.arange(max_exponent, dtype=np.float64) + 0.5 - mean) / std
    inner = exact.normal_cdf(torch.from_numpy(edges)).numpy() if exact_contract else ndtr(edges)
    cdf = np.concatenate([[0.0], inner, [1.0]])
    probs = np.diff(cdf)
    return 0.9 * probs / probs.sum() + 0.1 / (max_exponent + 1)


def kl_bucket(kl_bits: float, *, exact_contract: bool = False) -> int:
    """The context of a chunk's exponent law: round(4 log2(1 + KL)), 0 .. 20 (KL up to ~30 bits)."""
    x = 1.0 + max(float(kl_bits), 0.0)
    return min(int(round(4.0 * (_exact_log2(x) if exact_contract else math.log2(x)))), 20)


@functools.lru_cache(maxsize=4096)
def _exact_log2(x: float) -> float:
    """log2 x by `exact.log` (cached: the chunk KLs of a stream take few distinct values)."""
    return float(exact.log(torch.tensor([x], dtype=torch.float64))[0]) / exact.LN2


@functools.lru_cache(maxsize=1024)
def _initial_counts(bucket: int, max_exponent: int, prior_weight: int, exact_contract: bool) -> np.ndarray:
    """`ExponentModel`'s starting counts for a `kl_bucket` (read-only; cached: every parse of a
    stream starts from the same tables). The bucket's representative KL is used, so that the
    table depends on the bucket only."""
    if exact_contract:
        kl = float(exact.exp(torch.tensor([bucket / 4.0 * exact.LN2], dtype=torch.float64))[0]) - 1.0
    else:
        kl = 2.0 ** (bucket / 4.0) - 1.0
    prior = exponent_prior(kl, max_exponent, exact_contract=exact_contract) * prior_weight
    counts = np.maximum(np.rint(prior), 1.0).astype(np.int64)
    counts.setflags(write=False)
    return counts


class ExponentModel:
    """Adaptive integer counts of the index exponent, one table per `kl_bucket`.

    Both sides start from `exponent_prior` (scaled to ``prior_weight`` pseudo-counts) and add
    ``increment`` to the count of every exponent they code, so they always hold the same
    integer table. ``probs`` returns it as float64 (exact integers) for the entropy coder.
    """

    def __init__(self, max_exponent: int, *, prior_weight: int = 64, increment: int = 16,
                 exact_contract: bool = False) -> None:
        if not 1 <= max_exponent <= MAX_LOG2_CANDIDATES:
            raise ValueError(f"rcc: max_exponent must be 1..{MAX_LOG2_CANDIDATES}, got {max_exponent}")
        self.max_exponent = max_exponent
        self.prior_weight = prior_weight
        self.increment = increment
        self.exact_contract = exact_contract  # the bucket and prior by `exact` (exact-contract files)
        self._tables: dict[int, np.ndarray] = {}

    def _table(self, kl_bits: float) -> np.ndarray:
        bucket = kl_bucket(kl_bits, exact_contract=self.exact_contract)
        if bucket not in self._tables:
            self._tables[bucket] = _initial_counts(bucket, self.max_exponent, self.prior_weight,
                                                   self.exact_contract).copy()
        return self._tables[bucket]

    def probs(self, kl_bits: float) -> np.ndarray:
        """Unnormalised float64 [max_exponent + 1] counts (integers) for a chunk of this KL."""
        return self._table(kl_bits).astype(np.float64)

    def update(self, kl_bits: float, exponents: int | np.ndarray) -> None:
        """Add ``increment`` to the count of each exponent coded (one or an array, in one step)."""
        table = self._table(kl_bits)
        exponents = np.asarray(exponents, dtype=np.int64)
        if exponents.size and (exponents.min() < 0 or exponents.max() >= len(table)):
            raise IndexError(f"rcc: an exponent outside 0..{len(table) - 1}")
        np.add.at(table, exponents, self.increment)
