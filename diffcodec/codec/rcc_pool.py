"""Pooled candidates: the reverse channel coding search of progressive stream versions 4 to 6.

Stream versions 1-3 draw every chunk's candidates from its own keyed PCG64 stream through a
libm Box-Muller transform (`rcc`): the search makes and scores 2^16 fresh normals per
dimension of each stage, a few nanoseconds each, which costs more than the network. Version 4
keeps the Poisson functional representation of `rcc` (each chunk's sent index n* is the argmin
of log T_n - log w(u_n) over its candidates; both sides then use the exact sample of n*) and
changes where the candidates come from:

* Candidate count. A stage's N = 2^min(max(ceil(kappa + pad), 1), log2_candidates), kappa
  its nominal KL per chunk (`Syntax.chunking`), is known to the decoder (unlike a chunk's own
  KL): it sets the pools and the row offsets below. The encoder searches chunk c over its own
  count 2^min(max(ceil(KL_c + pad), 1), log2_candidates) (`chunk_counts`, as versions 1-3
  sized each chunk), k < count; a pool's rows run to its chunks' largest count. The decoder
  needs no count: only the index and r_c.
* Pools. The stage's chunks, in order, form pools of G = max(1, N >> POOL_SHIFT) chunks
  (`chunks_per_pool`). A pool is N rows of 2h standard normals, h = ceil(d / 2), d the stage's
  largest chunk (m chunks over D dimensions: ceil(D / m)): columns 2i and 2i + 1 of row n are
  the pair `box_muller` makes of draw n h + i of the pool's counter-based stream (`draws`:
  SplitMix64's output function of key + (i + 1) gamma, key = `stream_key`(seed, stage, 1,
  pool)). Random access: the decoder makes the one row it needs.
* A chunk's candidates. Candidate k of chunk c is row k XOR r_c of its pool, its first d_c
  columns for the chunk's d_c dimensions (in the order of the stage's keyed permutation,
  `progressive.codec`), r_c in [0, N) drawn per chunk (`plan_stage`). For a fixed r_c the
  rows k XOR r_c, k = 0, 1, ..., are i.i.d. N(0, I), so each chunk's search is exactly the
  PFR of `rcc`; the encoder's arrival times T_k (encoder only, any arithmetic) are shared by
  the stage's chunks, and the XOR gives each chunk its own pairing of rows and arrival ranks,
  so chunks of one pool rarely pick the same row (about G / N of them per stage).
* Normals (`box_muller`): Box-Muller on the draw's two 24-bit uniforms, as versions 1-3, but
  with its logarithm, sine and cosine as fixed binary32 polynomials (integer operations and
  binary32 + - x / sqrt one at a time, no fused multiply-add): the same bits on every machine
  from the C kernel (csrc/rcc_pool.c), its numpy reference and its torch twin, CPU or GPU.
  Within 5e-7 of the libm transform; the tail is cut at sqrt(48 ln 2) = 5.77 as there.

Version 5 keeps all of the above but the choice: each chunk sends the k < N of largest
log w(u_k) (`select`'s rule "greedy"; no arrival times), N the stage's count for every chunk
(capped so that a pool holds at most 2^24 normals: `stage_candidates`), its index coded
uniformly in log2 N bits (`progressive.syntax`). PFR's sample is a sample of q
only with about 2^(KL + a few bits) candidates; from 2^16 it delivers 0.73 of a 14-bit chunk's
KL and later stages pay again, where the greedy choice delivers about all of it for the same
candidates (reports/rcc_methods.md; Ohayon et al. 2025's DDCM picks codebook noise the same
way). The decoder is the same: it makes the one row the index names.

Version 6 keeps version 5 but the normals (`NORMALS` "table"): each draw gives four, one
per 16-bit quarter (bits 16j .. 16j + 15 make column 4i + j of a row of h = ceil(d / 4)
draws), through a fixed table of the 2^16 mid-quantiles of N(0, 1) (`normal_table`: shipped
as normal_quantiles.f32, pinned by its SHA-256): integer operations and one table read per
normal, the same bits everywhere by construction; the rows kernel makes them 2-2.9x faster
than Box-Muller pairs (one-off timing of both kernels), a lone CIFAR-10 image's search runs
1.6-1.7x faster, and files are the same size within noise (reports/stream_versions_v6.md).
Its candidates are a 2^16-level quantization of N(0, I) (variance 0.99998, cut at 4.32):
what the greedy choice needs; a lone 32x32 image's search makes millions of them per stage.

The cost: scoring is a float32 matrix product of the pool rows' [u^2, u] with the pool's
chunks' coefficients (2 N D multiply-adds per stage whatever the chunking: torch's GEMM),
and making the pools about max(2^POOL_SHIFT, N / m) x D normals per stage (N x D in versions
1-3). `select` runs it on the CPU (C kernels make the rows and pick the minima over all
threads, torch multiplies) or on any torch device (`select_torch`: a GPU). The choice is
the argmin of float32 scores, so two machines (or thread counts) may pick different, equally
valid, indices where scores tie to rounding; the decoder's sample is exact either way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcodec import native
from diffcodec.codec import rcc
from diffcodec.errors import DiffcodecError

POOL_SHIFT = 8  # G = N >> POOL_SHIFT chunks per pool (a format constant of stream version 4)
ROW_ALIGN = 64  # the chunks' row offsets r_c are multiples of min(ROW_ALIGN, N) (a format constant too)
MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # its output function's multipliers
KEY_TAG = 0x6466_6370_6F6F_6C34  # "dfcpool4": the first word of every version 4 key
POOL_STREAM, OFFSET_STREAM, ARRIVAL_STREAM = 1, 2, 3  # key words after (seed, stage)


# ------------------------------------------------------------------------------ normals
# Box-Muller in binary32 (format constants: the literals' binary32 roundings). For a draw z:
#   x = (z >> 40) + 1 in [1, 2^24], x = 2^e m with m in [sqrt(1/2), sqrt(2)] (from x's bits;
#   m > sqrt(2): m / 2, e + 1, exact), s = (m - 1) / (m + 1),
#   ln m = 2 s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9) (Horner from s^8/9), t = (24 - e) ln2 - ln m
#   (= -ln(x 2^-24) >= 0), r = sqrt(2 t);
#   k = z & (2^24 - 1): octant o = k >> 21, f = k & (2^21 - 1), g = f (o even) or 2^21 - f
#   (o odd), phi = g C in [0, pi/4], C = pi / 2^23; sin phi, cos phi by their Taylor
#   polynomials to phi^9 and phi^8 (Horner); the octant's symmetry swaps and negates them
#   (bit operations); the pair is (r cos, r sin).
_F = np.float32
BM_ONE, BM_HALF, BM_TWO = _F(1.0), _F(0.5), _F(2.0)
BM_LN2 = _F(math.log(2.0))
BM_LOG = (_F(1 / 9), _F(1 / 7), _F(1 / 5), _F(1 / 3))
BM_SIN = (_F(1 / 362880), _F(1 / 5040), _F(1 / 120), _F(1 / 6))
BM_COS = (_F(1 / 40320), _F(1 / 720), _F(1 / 24))
BM_ANGLE = _F(math.pi / 2**23)  # pi/4 per 2^21
BM_SQRT2_BITS = 0x3FB504F3  # the binary32 just below sqrt(2)
SIGN_BIT = np.int32(-(1 << 31))  # a binary32's sign bit as an int32 (0 or 1 times it: no overflow)


def box_muller_np(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normal pair (cos part, sin part) float32 of uint64 draws: the reference of the
    kernels (operation for operation)."""
    z = np.asarray(z, dtype=np.uint64)
    x = ((z >> np.uint64(40)).astype(np.int32) + np.int32(1)).astype(np.float32)
    bits = x.view(np.int32)
    e = (bits >> 23) - 127
    mb = (bits & 0x007FFFFF) | 0x3F800000
    big = (mb > BM_SQRT2_BITS).astype(np.int32)
    m = (mb - (big << 23)).astype(np.int32).view(np.float32)
    e = e + big
    s = (m - BM_ONE) / (m + BM_ONE)
    s2 = s * s
    p = s2 * BM_LOG[0] + BM_LOG[1]
    p = p * s2 + BM_LOG[2]
    p = p * s2 + BM_LOG[3]
    p = p * s2 + BM_ONE
    lnm = BM_TWO * s * p
    t = (24 - e).astype(np.float32) * BM_LN2 - lnm
    r = np.sqrt(BM_TWO * t)
    k = (z & np.uint64(0xFFFFFF)).astype(np.int32)
    o = k >> 21
    f = k & 0x1FFFFF
    g = f + (o & 1) * (0x200000 - f - f)
    ph = g.astype(np.float32) * BM_ANGLE
    q = ph * ph
    sn = q * BM_SIN[0] - BM_SIN[1]
    sn = sn * q + BM_SIN[2]
    sn = sn * q - BM_SIN[3]
    sn = sn * q * ph + ph
    cs = q * BM_COS[0] - BM_COS[1]
    cs = cs * q + BM_COS[2]
    cs = cs * q - BM_HALF
    cs = cs * q + BM_ONE
    swap = -(((o + 1) >> 1) & 1)  # all ones where sine and cosine trade places
    sb, cb = sn.view(np.int32), cs.view(np.int32)
    c1 = ((sb & swap) | (cb & ~swap)) ^ ((((o + 2) >> 2) & 1) * SIGN_BIT)
    s1 = ((cb & swap) | (sb & ~swap)) ^ ((o >> 2) * SIGN_BIT)
    return r * c1.astype(np.int32).view(np.float32), r * s1.astype(np.int32).view(np.float32)


def _sqrt32(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded binary32 square root: numpy's (the hardware's) on the CPU, where
    torch's vectorised float32 sqrt is 1 ulp off for about 0.7% of values; CUDA's is IEEE."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return torch.sqrt(x)


def box_muller_torch(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`box_muller_np` on int64 draws in torch (any device): the same bits."""
    dev = z.device
    x = (((z >> 40) & 0xFFFFFF) + 1).to(torch.float32)
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127
    mb = (bits & 0x007FFFFF) | 0x3F800000
    big = (mb > BM_SQRT2_BITS).to(torch.int32)
    m = (mb - (big << 23)).view(torch.float32)
    e = e + big
    one, half, two = (torch.tensor(v, device=dev) for v in (BM_ONE, BM_HALF, BM_TWO))
    s = (m - one) / (m + one)
    s2 = s * s
    p = s2 * BM_LOG[0].item() + BM_LOG[1].item()
    p = p * s2 + BM_LOG[2].item()
    p = p * s2 + BM_LOG[3].item()
    p = p * s2 + one
    lnm = two * s * p
    t = (24 - e).to(torch.float32) * BM_LN2.item() - lnm
    r = _sqrt32(two * t)
    k = (z & 0xFFFFFF).to(torch.int32)
    o = k >> 21
    f = k & 0x1FFFFF
    g = f + (o & 1) * (0x200000 - f - f)
    ph = g.to(torch.float32) * BM_ANGLE.item()
    q = ph * ph
    sn = q * BM_SIN[0].item() - BM_SIN[1].item()
    sn = sn * q + BM_SIN[2].item()
    sn = sn * q - BM_SIN[3].item()
    sn = sn * q * ph + ph
    cs = q * BM_COS[0].item() - BM_COS[1].item()
    cs = cs * q + BM_COS[2].item()
    cs = cs * q - half
    cs = cs * q + one
    swap = -(((o + 1) >> 1) & 1)
    sb, cb = sn.view(torch.int32), cs.view(torch.int32)
    c1 = ((sb & swap) | (cb & ~swap)) ^ ((((o + 2) >> 2) & 1) * SIGN_BIT)
    s1 = ((cb & swap) | (sb & ~swap)) ^ ((o >> 2) * SIGN_BIT)
    return r * c1.view(torch.float32), r * s1.view(torch.float32)


# ------------------------------------------------------------------- version 6: a table

NORMALS = ("box_muller", "table")  # a plan's normals: versions 4 and 5, version 6
TABLE_BITS = 16  # version 6: a normal per 16 bits of a draw (a format constant)
TABLE_MASK = (1 << TABLE_BITS) - 1
TABLE_PATH = Path(__file__).with_name("normal_quantiles.f32")
# t[k] = float32(Phi^-1((k + 1/2) / 2^16)) for k < 2^15 (scipy.special.ndtri in binary64, then
# rounded), t[2^16 - 1 - k] = -t[k]: 65,536 little-endian binary32 (a format constant: its hash)
TABLE_SHA256 = "1cfbba1e07e34386a57626f82aeb43e6ed54ba70a3ea6b7d964dc66a841074a8"


@functools.cache
def normal_table() -> np.ndarray:
    """float32 [2^16]: version 6's normals, each index's mid-quantile of N(0, 1) (read-only).
    A file that is missing or not the pinned one is refused: no stream is coded from it."""
    try:
        data = TABLE_PATH.read_bytes()
    except OSError as e:
        raise DiffcodecError(f"the normal table {TABLE_PATH} is missing ({e.strerror}); reinstall diffcodec") from None
    if hashlib.sha256(data).hexdigest() != TABLE_SHA256:
        raise DiffcodecError(f"the normal table {TABLE_PATH} is damaged (its SHA-256 differs); reinstall diffcodec")
    table = np.frombuffer(data, dtype="<f4").astype(np.float32)
    table.flags.writeable = False
    return table


@functools.cache
def _table_address() -> int:
    """The address of `normal_table`'s data (the C kernels read it; the array is cached)."""
    return native.address(normal_table())


@functools.cache
def _table_tensor(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(normal_table().copy()).to(device)


def table_normals_np(z: np.ndarray) -> np.ndarray:
    """float32 [..., 4]: the four normals of uint64 draws (version 6; the reference)."""
    z = np.asarray(z, dtype=np.uint64)
    shifts = np.arange(4, dtype=np.uint64) * np.uint64(TABLE_BITS)
    return normal_table()[((z[..., None] >> shifts) & np.uint64(TABLE_MASK)).astype(np.int64)]


def table_normals_torch(z: torch.Tensor) -> torch.Tensor:
    """`table_normals_np` on int64 draws in torch (any device): the same bits."""
    idx = torch.stack([(z >> (TABLE_BITS * j)) & TABLE_MASK for j in range(4)], dim=-1)
    return _table_tensor(z.device)[idx]


# ------------------------------------------------------------------ counter-based draws


def mix64(z: int) -> int:
    """SplitMix64's output function on a Python int (mod 2^64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def stream_key(*words: int) -> int:
    """The 64-bit key of a stream named by non-negative integers (seed, stage, stream, ...)."""
    z = KEY_TAG
    for w in words:
        if int(w) < 0:
            raise ValueError(f"rcc_pool: key words must be non-negative, got {words!r}")
        z = mix64(z + (int(w) + 1) * GAMMA)
    return z


def draws_np(key: int | np.ndarray, counters: np.ndarray) -> np.ndarray:
    """uint64 draws i of the stream ``key``: mix64(key + (i + 1) gamma), numpy."""
    with np.errstate(over="ignore"):
        z = np.asarray(key, dtype=np.uint64) + (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        return z ^ (z >> np.uint64(31))


def _signed(x: int) -> int:
    """A 64-bit word as the int64 of the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def draws_torch(key: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`draws_np` in int64 torch arithmetic (wrapping products, logical shifts by masking)."""
    z = key + (counters + 1) * _signed(GAMMA)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed(MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed(MIX2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


# ---------------------------------------------------------------------------- a stage's plan


POOL_NORMALS = 1 << 24  # version 5: a pool holds at most this many normals (N x 2h; a format constant)


def stage_candidates(kappa_bits: float, pad_bits: float, log2_candidates: int, row_width: int = 0) -> int:
    """N: the candidates of every chunk of a version 4 to 6 stage of nominal chunk KL kappa
    (bits): 2^min(max(ceil(kappa + pad), 1), log2_candidates); versions 5 and 6 (``row_width`` = 2h,
    `pool_row_width`) also caps N x 2h at POOL_NORMALS, so that a stage of few large chunks
    (the first, of a few bits of KL over thousands of dimensions) neither makes 2^16 rows of
    thousands of normals nor pays 16 index bits for them."""
    log2_n = min(max(math.ceil(kappa_bits + pad_bits), 1), log2_candidates)
    if row_width:
        log2_n = min(log2_n, max(1, (POOL_NORMALS // row_width).bit_length() - 1))
    return 1 << log2_n


def pool_row_width(num_dims: int, num_chunks: int) -> int:
    """2h: the normals in a pool row of a stage of ``num_chunks`` near-equal chunks of D dims
    (the largest chunk, ceil(D / m), rounded up to even)."""
    return 2 * ((-(-num_dims // num_chunks) + 1) // 2)


def chunks_per_pool(num_candidates: int) -> int:
    """G: chunks sharing one pool of rows."""
    return max(1, num_candidates >> POOL_SHIFT)


@dataclass(frozen=True)
class StagePlan:
    """What both sides derive for a version 4 stage: its chunks (a permutation of the D
    dimensions cut in m near-equal runs, `np.array_split`'s sizes), N, G and the chunks'
    row offsets."""

    seed: int
    stage: int
    perm: np.ndarray  # int64 [D]: chunk c holds dims perm[bounds[c]:bounds[c+1]], in that order
    bounds: np.ndarray  # int64 [m + 1]
    num_candidates: int  # N
    chunks_per_pool: int  # G
    offsets: np.ndarray  # int64 [m]: r_c in [0, N), a multiple of min(ROW_ALIGN, N)
    normals: str = "box_muller"  # in NORMALS: how a draw becomes normals (version 6: "table")

    @property
    def num_chunks(self) -> int:
        return len(self.bounds) - 1

    @property
    def per_draw(self) -> int:
        """Normals per draw: a Box-Muller pair, or four table normals (version 6)."""
        return 2 if self.normals == "box_muller" else 64 // TABLE_BITS

    @property
    def draws_per_row(self) -> int:
        """h: draws per pool row (the largest chunk's d normals, rounded up to whole draws)."""
        return -(-int(np.max(np.diff(self.bounds))) // self.per_draw)

    @property
    def row_width(self) -> int:
        """Normals per pool row: h x `per_draw`."""
        return self.draws_per_row * self.per_draw

    @property
    def num_pools(self) -> int:
        return -(-self.num_chunks // self.chunks_per_pool)

    def pool_keys(self) -> np.ndarray:
        """uint64 [P]: each pool's stream key."""
        return np.array([stream_key(self.seed, self.stage, POOL_STREAM, p) for p in range(self.num_pools)],
                        dtype=np.uint64)

    @functools.cached_property
    def _keys(self) -> np.ndarray:
        """`pool_keys`, made once per plan (read-only): the search and the samples read them."""
        keys = self.pool_keys()
        keys.flags.writeable = False
        return keys

    @functools.cached_property
    def _sample_args(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[int, ...]]:
        """What the C sample kernels read of the plan, made once: one int64 array of its pool
        keys' bits, offsets and bounds, and its perm (int64, contiguous; both kept alive here),
        and (their addresses, G, m)."""
        m, D = len(self.bounds) - 1, len(self.perm)
        if len(self.offsets) != m or self.bounds[0] != 0 or self.bounds[-1] != D:
            raise ValueError("rcc_pool: a plan whose chunks do not cover its dimensions")
        keys = self._keys.view(np.int64)
        words = np.concatenate([keys, self.offsets, self.bounds]).astype(np.int64, copy=False)
        perm = _i64(self.perm)
        keys_at = native.address(words)
        offsets_at = keys_at + 8 * len(keys)
        return (words, perm), (keys_at, offsets_at, offsets_at + 8 * m, native.address(perm), self.chunks_per_pool, m)

    def __getstate__(self) -> dict:
        """A pickle or copy leaves out what is cached (`_sample_args` holds addresses)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_keys", "_sample_args")}


def plan_stage(seed: int, stage: int, perm: np.ndarray, num_chunks: int, kappa_bits: float, pad_bits: float,
               log2_candidates: int, *, cap_pool_normals: bool = False, normals: str = "box_muller") -> StagePlan:
    """The version 4 plan of a stage whose dimensions ``perm`` are cut into ``num_chunks`` chunks
    (version 5: ``cap_pool_normals``, N as `stage_candidates` caps it; version 6 also
    ``normals`` "table", under version 5's cap)."""
    num_dims = len(perm)
    if not 1 <= num_chunks <= num_dims:
        raise ValueError(f"rcc_pool: {num_chunks} chunks of {num_dims} dimensions")
    if normals not in NORMALS:
        raise ValueError(f"rcc_pool: unknown normals {normals!r}; known: {', '.join(NORMALS)}")
    q, r = divmod(num_dims, num_chunks)
    sizes = np.full(num_chunks, q, dtype=np.int64)
    sizes[:r] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = stage_candidates(kappa_bits, pad_bits, log2_candidates,
                         pool_row_width(num_dims, num_chunks) if cap_pool_normals else 0)
    align = min(ROW_ALIGN, n)
    offsets = draws_np(stream_key(seed, stage, OFFSET_STREAM), np.arange(num_chunks)) & np.uint64(n - align)
    return StagePlan(int(seed), int(stage), np.ascontiguousarray(perm, dtype=np.int64), bounds, n,
                     chunks_per_pool(n), offsets.astype(np.int64), normals)


def chunk_matrix(plan: StagePlan, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 [m, width]: row c holds ``values`` (float [D]) of chunk c's dims in its order, zero
    padded (``out``: written there, its padding left as it is: zeros)."""
    m, width = plan.num_chunks, plan.row_width
    out = np.zeros((m, width), dtype=np.float32) if out is None else out
    sizes = np.diff(plan.bounds)
    v = np.asarray(values, dtype=np.float32)[plan.perm]  # rounded (a float32 input: as it is), then permuted
    for size in np.unique(sizes):  # array_split: at most two sizes, each a contiguous run of chunks
        rows = np.flatnonzero(sizes == size)
        start = plan.bounds[rows[0]]
        out[rows[0] : rows[-1] + 1, :size] = v[start : start + len(rows) * size].reshape(len(rows), size)
    return out


def arrival_log_times(plan: StagePlan, count: int) -> np.ndarray:
    """float32 [count]: log T_k of the stage's shared rate-1 Poisson arrivals (encoder only: libm)."""
    key = stream_key(plan.seed, plan.stage, ARRIVAL_STREAM)
    u = ((draws_np(key, np.arange(count)) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return np.log(np.cumsum(-np.log(u))).astype(np.float32)


def log_weight_coefficients(q_mean: np.ndarray, q_log_var: np.ndarray, p_mean: np.ndarray,
                            p_log_var: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) float32 [D]: log q(z)/p(z) at z = mean_p + std_p u is sum a u^2 + b u + const
    (`rcc.LogWeight`; the search needs no constant, and ranks in float32: each value is its
    binary64 formula rounded once). Computed in blocks of `rcc.KL_BLOCK` values, so that the
    temporaries stay a block long. ``out``: two contiguous float32 arrays of that shape to fill."""
    shape, flat = rcc.flat_float64(q_mean, q_log_var, p_mean, p_log_var)
    a, b = (np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)) if out is None else out
    for i in range(0, a.size, rcc.KL_BLOCK):
        qm, qv, pm, pv, ab, bb = (v[i : i + rcc.KL_BLOCK] for v in (*flat, a.reshape(-1), b.reshape(-1)))
        ab[:] = 0.5 * (1.0 - np.exp(pv - qv))
        bb[:] = -(pm - qm) * np.exp(0.5 * pv - qv)
    return a, b


# ------------------------------------------------------------------------- the C kernels
# diffcodec/csrc/rcc_pool.c (`native`): the draws, both kinds of normals, the search's rows and
# minima and the decoder's samples, each the bits of the numpy references above; without its
# library (no compiler at install time, DIFFCODEC_NO_NATIVE) the torch twins run.

NATIVE_FLOAT_CONSTANTS = (BM_ONE, BM_HALF, BM_TWO, BM_LN2, BM_ANGLE, *BM_LOG, *BM_SIN, *BM_COS)
"""`dc_rcc_constants`' binary32 constants, in its order (the C file writes them as literals)."""
NATIVE_INT_CONSTANTS = (_signed(GAMMA), _signed(MIX1), _signed(MIX2), TABLE_BITS, TABLE_MASK, ROW_ALIGN,
                        BM_SQRT2_BITS, int(SIGN_BIT))
"""`dc_rcc_constants`' integer constants, in its order."""


class _Native:
    """The kernels of one rcc_pool library (`native.library`'s, or a test's level), typed."""

    def __init__(self, lib) -> None:
        p, i = native.ptr, native.i64

        fn = functools.partial(native.bind, lib)
        self.constants = fn("dc_rcc_constants", p, p)
        self.draws = fn("dc_rcc_draws", ctypes.c_uint64, p, i, p)  # key, counters, n, out
        self.box_muller = fn("dc_rcc_box_muller", p, i, p, p, i)  # z, n, lo, hi, threads
        # pool keys, G, indices, offsets, bounds, m, perm, (table,) out, threads
        self.samples = fn("dc_rcc_samples", p, i, p, p, p, i, p, p, i)
        self.table_samples = fn("dc_rcc_table_samples", p, i, p, p, p, i, p, p, p, i)
        self.rows = fn("dc_rcc_rows", p, i, i, i, i, p, i)  # keys, P, row0, h, R, out, threads
        self.table_rows = fn("dc_rcc_table_rows", p, i, i, i, i, p, p, i)  # keys, P, row0, h, R, table, out
        # scores, Q, g, R, row0, first, stride, offsets, counts, log_times, best_v, best_k, threads
        self.pick = fn("dc_rcc_pick", p, i, i, i, i, i, i, p, p, p, p, p, i)


@functools.cache
def _bound() -> _Native | None:
    lib = native.library("rcc_pool")
    return None if lib is None else _Native(lib)


def _native() -> _Native:
    """The kernels `samples` and `select` run (tests put another level's here)."""
    return _bound()


def _use_native() -> bool:
    """Whether `samples` and `select` run the C kernels (else their torch twins)."""
    return _bound() is not None


def _u64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint64)


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def native_constants() -> tuple[np.ndarray, np.ndarray]:
    """The C kernels' constants (float32 [16], int64 [8]: `NATIVE_FLOAT_CONSTANTS`,
    `NATIVE_INT_CONSTANTS`' order), what the tests compare with this module's."""
    f, n = np.empty(16, dtype=np.float32), np.empty(8, dtype=np.int64)
    _native().constants(native.address(f), native.address(n))
    return f, n


def native_draws(key: int, counters: np.ndarray) -> np.ndarray:
    """`draws_np` by the C kernel (uint64)."""
    counters = _u64(counters)
    out = np.empty(counters.shape, dtype=np.uint64)
    _native().draws(int(key), native.address(counters), counters.size, native.address(out))
    return out


def native_box_muller(z: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`box_muller_np` by the C kernel (what the tests compare)."""
    z = _u64(z)
    lo, hi = np.empty(z.shape, dtype=np.float32), np.empty(z.shape, dtype=np.float32)
    _native().box_muller(native.address(z), z.size, native.address(lo), native.address(hi), threads)
    return lo, hi


def native_rows(keys: np.ndarray, row0: int, h: int, rows: int, normals: str = "box_muller",
                threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """float32 [P, 2 x row_width, rows]: out[p, c, n] = u^2, out[p, row_width + c, n] = u, u
    column c of row row0 + n of pool keys[p] (the search's [u^2; u] columns), by the C kernels."""
    keys = _u64(keys)
    per_draw = 4 if normals == "table" else 2
    shape = (len(keys), 2 * per_draw * h, rows)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"rcc_pool: rows of shape {shape} into {out.dtype} {out.shape}")
    kernels = _native()
    if normals == "table":
        kernels.table_rows(native.address(keys), len(keys), row0, h, rows, _table_address(), native.address(out),
                           threads)
    else:
        kernels.rows(native.address(keys), len(keys), row0, h, rows, native.address(out), threads)
    return out


def native_pick(scores: np.ndarray, row0: int, first: int, stride: int, offsets: np.ndarray, counts: np.ndarray,
                log_times: np.ndarray, best_v: np.ndarray, best_k: np.ndarray, threads: int = 1) -> None:
    """For chunk first + p stride + j (scores float32 [Q, g, R]: pool p's chunk j, rows row0 ..):
    the (score, k) minimum of log_times[k] - scores[p, j, n] over k = (row0 + n) XOR r_c below
    the chunk's count, merged into best_v, best_k in place (ties: the smaller k); the C kernel."""
    Q, g, R = scores.shape
    for a, dtype in ((scores, np.float32), (log_times, np.float32), (best_v, np.float32), (best_k, np.int64),
                     (offsets, np.int64), (counts, np.int64)):
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError("rcc_pool: the pick's arrays are contiguous float32 / int64")
    if first + (Q - 1) * stride + g > min(len(best_v), len(best_k), len(offsets), len(counts)):
        raise ValueError("rcc_pool: the pick's chunks run past its arrays")
    if R >= ROW_ALIGN and (R % ROW_ALIGN or row0 % ROW_ALIGN):
        raise ValueError(f"rcc_pool: the pick's rows are runs of {ROW_ALIGN} (or fewer than {ROW_ALIGN} from 0)")
    if counts[first : first + (Q - 1) * stride + g].max() > len(log_times):
        raise ValueError("rcc_pool: a count beyond the arrival times")
    _native().pick(native.address(scores), Q, g, R, row0, first, stride, native.address(offsets),
                   native.address(counts), native.address(log_times), native.address(best_v),
                   native.address(best_k), threads)


# ------------------------------------------------------------------------------- decoding


def samples(plan: StagePlan, indices: np.ndarray) -> np.ndarray:
    """The standardised sample u (float32 [D]) that a stage's chunk indices select: chunk c's
    dims get the first d_c columns of row indices[c] XOR r_c of its pool (exact: the same bits
    on every machine; what the decoder makes, and the encoder after its search)."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    if len(indices) != plan.num_chunks or (indices < 0).any():
        raise ValueError(f"rcc_pool: {len(indices)} indices for {plan.num_chunks} chunks")
    if not _use_native():
        return samples_torch(plan, indices).numpy()
    native.sync_threads()
    keys, offsets, bounds, perm, G, m = plan._sample_args[1]
    out = np.empty(len(plan.perm), dtype=np.float32)
    args = (keys, G, native.address(indices), offsets, bounds, m, perm)
    kernels, threads = _native(), native.threads(len(out))
    if plan.normals == "table":
        kernels.table_samples(*args, _table_address(), native.address(out), threads)
    else:
        kernels.samples(*args, native.address(out), threads)
    return out


def normals_torch(z: torch.Tensor, normals: str) -> torch.Tensor:
    """float32 [..., per_draw]: the normals of int64 draws z [...] (`NORMALS`), torch."""
    if normals == "table":
        return table_normals_torch(z)
    return torch.stack(box_muller_torch(z), dim=-1)


def pool_rows_torch(keys: torch.Tensor, rows: torch.Tensor, h: int, normals: str = "box_muller") -> torch.Tensor:
    """float32 [..., R, h x per_draw]: rows ``rows`` [R] of the pools ``keys`` [...] (int64
    words), torch."""
    counters = rows[:, None] * h + torch.arange(h, device=rows.device)[None]  # [R, h]
    u = normals_torch(draws_torch(keys[..., None, None], counters), normals)
    return u.reshape(*keys.shape, len(rows), -1)


def _keys_tensor(plan: StagePlan, device: torch.device | str) -> torch.Tensor:
    return torch.tensor([_signed(int(k)) for k in plan._keys], dtype=torch.int64, device=device)


def samples_torch(plan: StagePlan, indices: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """`samples` in torch (the twin of the C kernel: the same bits): float32 [D] on ``device``."""
    h, m = plan.draws_per_row, plan.num_chunks
    keys = _keys_tensor(plan, device)[torch.arange(m, device=device) // plan.chunks_per_pool]
    rows = torch.as_tensor(np.asarray(indices, dtype=np.int64) ^ plan.offsets, device=device)
    counters = rows[:, None] * h + torch.arange(h, device=device)[None]  # [m, h]
    values = normals_torch(draws_torch(keys[:, None], counters), plan.normals).reshape(m, plan.row_width)
    sizes = torch.as_tensor(np.diff(plan.bounds), device=device)
    keep = torch.arange(plan.row_width, device=device)[None] < sizes[:, None]
    out = torch.empty(len(plan.perm), dtype=torch.float32, device=device)
    out[torch.as_tensor(plan.perm, device=device)] = values[keep]
    return out


# ------------------------------------------------------------------------------- the search

SEARCH_BLOCK_ELEMENTS = 1 << 20  # float32 elements of the rows' [u^2; u] block and of its scores (4 MiB)


def _blocking(row_width: int, g: int, num_candidates: int, num_pools: int) -> tuple[int, int]:
    """(rows R, pools Q) per block: [Q, 2 x row_width, R] rows and [Q, G, R] scores of about
    SEARCH_BLOCK_ELEMENTS each (R a power of two, 64 .. N)."""
    width = max(2 * row_width, g)
    rows = 1 << max(6, (SEARCH_BLOCK_ELEMENTS // width).bit_length() - 1)  # >= ROW_ALIGN
    rows = min(rows, num_candidates, 1 << 14)  # N < ROW_ALIGN: one run of N rows (r_c = 0)
    pools = max(1, min(num_pools, SEARCH_BLOCK_ELEMENTS // (width * rows)))
    return rows, pools


def _coefficients(plan: StagePlan, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    """float32 [P, G, 2 x row_width]: each pool's chunks' [a | b] in row order (padding chunks zero)."""
    m, g, w = plan.num_chunks, plan.chunks_per_pool, plan.row_width
    coef = torch.zeros(plan.num_pools * g, 2 * w, dtype=torch.float32)
    chunk_matrix(plan, a, out=coef.numpy()[:m, :w])  # in place: no D-value copies
    chunk_matrix(plan, b, out=coef.numpy()[:m, w:])
    return coef.reshape(plan.num_pools, g, 2 * w)


def chunk_counts(kl_bits: np.ndarray, pad_bits: float, log2_candidates: int) -> np.ndarray:
    """The encoder's candidates per chunk (int64 [m]): 2^min(max(ceil(KL_c + pad), 1), L), each
    chunk's own KL as versions 1-3 chose them (the decoder needs no count: only r_c)."""
    log2 = np.minimum(np.maximum(np.ceil(np.asarray(kl_bits, dtype=np.float64) + pad_bits), 1), log2_candidates)
    return (np.int64(1) << log2.astype(np.int64)).astype(np.int64)


def _counts_and_rows(plan: StagePlan, counts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk's count (N when not given) and each pool's rows: max(N, its chunks' counts)."""
    m, G, P = plan.num_chunks, plan.chunks_per_pool, plan.num_pools
    counts = np.full(m, plan.num_candidates, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
    if len(counts) != m or (counts < 1).any() or (counts & (counts - 1)).any():
        raise ValueError("rcc_pool: a count per chunk, each a power of two")
    padded = np.full(P * G, 1, dtype=np.int64)
    padded[:m] = counts
    return counts, np.maximum(padded.reshape(P, G).max(axis=1), plan.num_candidates)


SELECTION_RULES = ("pfr", "greedy")  # `select`'s rules: version 4 writes "pfr", version 5 "greedy"


def _log_times(plan: StagePlan, count: int, rule: str) -> np.ndarray:
    """What `select` adds to -log w(u_k): log T_k (PFR) or nothing (greedy: the largest log w)."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"rcc_pool: unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")
    return arrival_log_times(plan, count) if rule == "pfr" else np.zeros(count, dtype=np.float32)


def select(plan: StagePlan, a: np.ndarray, b: np.ndarray, counts: np.ndarray | None = None, *,
           rule: str = "pfr", device: torch.device | str = "cpu") -> np.ndarray:
    """The encoder's indices (int64 [m]): for each chunk c the k < counts[c] (default N)
    minimising log T_k - log w(u_k) (``rule`` "pfr", the Poisson functional representation:
    a sample of q when N is large enough) or -log w(u_k) ("greedy": the candidate that
    delivers most, an index uniform on [0, N); reports/rcc_methods.md) (float32 scores;
    ties keep the smaller k). ``a``, ``b``:
    `log_weight_coefficients` [D]. A pool's rows run to the largest count of its chunks (at
    least N): rows k XOR r_c, k < count, lie there as r_c < N. On the CPU: blocks of rows of a
    few pools at a time, made by the C kernels, scored by one batched float32 matrix product
    (torch), minima picked by the C kernels; every thread works on each step. On another
    device (a GPU), or without the C kernels' library: `select_torch`."""
    if torch.device(device).type != "cpu" or not _use_native():
        return select_torch(plan, a, b, counts, rule=rule, device=device)
    native.sync_threads()
    h, G, m, P = plan.draws_per_row, plan.chunks_per_pool, plan.num_chunks, plan.num_pools
    counts, pool_rows = _counts_and_rows(plan, counts)
    counts, offsets = _i64(counts), _i64(plan.offsets)
    coef = _coefficients(plan, a, b)
    log_times = np.ascontiguousarray(_log_times(plan, int(pool_rows.max()), rule), dtype=np.float32)
    keys = plan._keys
    best_v = np.full(m, np.inf, dtype=np.float32)
    best_k = np.zeros(m, dtype=np.int64)
    p0 = 0
    while p0 < P:  # runs of pools of one size (g chunks, n rows): one batched product per block of rows
        g, n = (G if p0 < P - 1 else m - p0 * G), int(pool_rows[p0])
        rows, pools = _blocking(plan.row_width, g, n, P - p0)
        q = 1
        while q < pools and p0 + q < P - 1 and pool_rows[p0 + q] == n:
            q += 1
        buf = np.empty((q, 2 * plan.row_width, rows), dtype=np.float32)
        scores = torch.empty((q, g, rows), dtype=torch.float32)
        for row0 in range(0, n, rows):
            native_rows(keys[p0 : p0 + q], row0, h, rows, plan.normals, native.threads(q * plan.row_width * rows),
                        buf)
            torch.bmm(coef[p0 : p0 + q, :g], torch.from_numpy(buf), out=scores)
            native_pick(scores.numpy(), row0, p0 * G, G, offsets, counts, log_times, best_v, best_k,
                        native.threads(q * g * rows))
        p0 += q
    return best_k


def select_torch(plan: StagePlan, a: np.ndarray, b: np.ndarray, counts: np.ndarray | None = None, *,
                 rule: str = "pfr", device: torch.device | str = "cpu") -> np.ndarray:
    """`select` in torch on ``device`` (a GPU: rows made there, one batched matrix product per
    block of rows for all pools, minima by torch). The same arithmetic as `select` up to
    float32 summation order, so the same choice save for near ties."""
    device = torch.device(device)
    h, G, m, P = plan.draws_per_row, plan.chunks_per_pool, plan.num_chunks, plan.num_pools
    counts, pool_rows = _counts_and_rows(plan, counts)
    n_max = int(pool_rows.max())
    coef = _coefficients(plan, a, b).to(device)
    r = torch.zeros(P * G, dtype=torch.int64)
    r[:m] = torch.from_numpy(plan.offsets)
    r = r.reshape(P, G, 1).to(device)
    nc = torch.ones(P * G, dtype=torch.int64)
    nc[:m] = torch.from_numpy(counts)
    nc = nc.reshape(P, G, 1).to(device)
    log_times = torch.from_numpy(_log_times(plan, n_max, rule)).to(device)
    keys = _keys_tensor(plan, device)
    rows, _ = _blocking(plan.row_width, G, n_max, P)
    rows = min(n_max, max(rows, 1 << 12))
    best_v = torch.full((P, G), math.inf, device=device)
    best_k = torch.zeros((P, G), dtype=torch.int64, device=device)
    for row0 in range(0, n_max, rows):
        idx = torch.arange(row0, min(n_max, row0 + rows), device=device)
        u = pool_rows_torch(keys, idx, h, plan.normals)  # [P, R, row_width]
        scores = torch.bmm(coef, torch.cat([u * u, u], dim=2).transpose(1, 2))  # [P, G, R]
        k = idx[None, None, :] ^ r  # [P, G, R]
        valid = k < nc
        v = torch.where(valid, log_times[torch.where(valid, k, 0)] - scores, math.inf)
        vmin = v.min(dim=2, keepdim=True).values
        kmin = torch.where((v == vmin) & valid, k, torch.full_like(k, 1 << 62)).min(dim=2).values  # ties: smaller k
        vmin = vmin[..., 0]
        better = (vmin < best_v) | ((vmin == best_v) & (kmin < best_k))
        best_v = torch.where(better, vmin, best_v)
        best_k = torch.where(better, kmin, best_k)
    return best_k.reshape(-1)[:m].cpu().numpy().astype(np.int64)
