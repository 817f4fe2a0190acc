"""Entropy coding: the one module that imports ``constriction``.

A small, validated wrapper around constriction 0.5's stream coders:

- `AnsStack` — an ANS coder used as a stack (last in, first out). ``push_*`` encodes,
  ``pop_*`` decodes. Decoding is the exact inverse of encoding on the same state, which is
  what bits-back coding needs: popping under q and later pushing the same symbols back
  under the same q restores the stack word for word.
- `RangeEncoder` / `RangeDecoder` — a queue (first in, first out) for prefix streams.

Model families (one vectorised call per array of symbols, never a Python loop per symbol):

- ``gaussian``: constriction's QuantizedGaussian on the integers lo..hi with per-symbol
  mean and std in *bin units*; the Gaussian mass outside [lo - 1/2, hi + 1/2] goes to the
  two edge bins (so on 0..255 in pixel-level units this is the paper's L_0 decoder).
  Every symbol in the domain gets at least 2^-24, so hi - lo + 1 must stay below 2^24.
- ``categorical``: per-symbol probability tables [n, k] (rows need not sum to one;
  constriction renormalises) — always ``perfect=False``.
- ``uniform``: symbols in 0..size-1, one size per symbol or one for all (size 1 codes nothing).
- ``gaussian_windowed``: a Gaussian over ALL integers, coded as the offset from the
  rounded mean in a window [-W, W] (QuantizedGaussian, edge bins take the tails) plus, for
  the two edge symbols only, an "excess" beyond the window (QuantizedGaussian on
  0..MAX_EXCESS). Use it for latents: constriction gives every symbol of a domain at least
  2^-24, so DECODING (sampling, bits-back) from a domain of N symbols returns a uniformly
  random symbol with probability about N x 2^-24. A window a few sigmas wide keeps N small
  and such strays within a few sigmas of the mean; pushing and popping a variable with the
  same W makes that floor cancel between the two.

This module is longer than most (about 440 lines) because it is one concept: every call into
constriction and the validation that must precede it. Validation happens HERE, before
constriction sees anything, because constriction accepts
NaN means and infinite stds silently and a std <= 0 (or NaN) raises a pyo3 PanicException,
a ``BaseException`` that ``except Exception`` does not catch. Every bad parameter raises
``ValueError``. Constriction does not detect reading past the end of a stream: callers
store symbol counts themselves.

Compressed data is an array of uint32 words; callers fix its byte order when they store it
(bits-back: little-endian, progressive: big-endian).
"""

from __future__ import annotations

import constriction
import numpy as np

PRECISION_BITS = 24  # constriction's default model precision for these coders
MAX_DOMAIN_SIZE = (1 << PRECISION_BITS) - 1
MAX_INT32 = (1 << 31) - 1
MAX_EXCESS = (1 << 22) - 1  # largest distance beyond a window's edge (gaussian_windowed)
MAX_HALF_WIDTH = (1 << 22) - 1

_QG = constriction.stream.model.QuantizedGaussian
_Categorical = constriction.stream.model.Categorical
_Uniform = constriction.stream.model.Uniform

__all__ = [
    "MAX_DOMAIN_SIZE",
    "MAX_EXCESS",
    "PRECISION_BITS",
    "AnsStack",
    "RangeDecoder",
    "RangeEncoder",
    "check_categorical",
    "check_gaussian",
    "check_uniform",
    "seeded_words",
]


# --------------------------------------------------------------------------- validation


def _as_1d_float64(values: np.ndarray | float, n: int | None, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 and n is not None:
        arr = np.full(n, float(arr), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {list(arr.shape)}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{what}: expected {n} values, got {len(arr)}")
    return np.ascontiguousarray(arr)


def _check_symbols(symbols: np.ndarray, lo: int, hi: int, what: str) -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.ndim != 1:
        raise ValueError(f"{what}: symbols must be a 1-D array, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: symbols must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ValueError(f"{what}: symbols must lie in {lo}..{hi}, got {int(arr.min())}..{int(arr.max())}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _check_domain(lo: int, hi: int) -> None:
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))):
        raise ValueError(f"gaussian: domain bounds must be integers, got {lo!r}, {hi!r}")
    if not -MAX_INT32 <= lo <= hi <= MAX_INT32:
        raise ValueError(f"gaussian: need lo <= hi within int32, got {lo}..{hi}")
    if hi - lo + 1 > MAX_DOMAIN_SIZE:
        raise ValueError(f"gaussian: domain {lo}..{hi} has {hi - lo + 1} symbols; at most {MAX_DOMAIN_SIZE}")


def check_gaussian(
    mean: np.ndarray, std: np.ndarray, lo: int, hi: int, n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 [n] (mean, std) for a QuantizedGaussian on lo..hi (bin units).

    Means must be finite; stds finite and > 0. Scalars are broadcast to n.
    """
    _check_domain(lo, hi)
    if n is None:
        n = np.asarray(mean).size if np.ndim(mean) else np.asarray(std).size
    m = _as_1d_float64(mean, n, "gaussian mean")
    s = _as_1d_float64(std, n, "gaussian std")
    if not np.isfinite(m).all():
        raise ValueError("gaussian: mean holds NaN or infinity")
    if not np.isfinite(s).all():
        raise ValueError("gaussian: std holds NaN or infinity")
    if n and not (s > 0).all():
        raise ValueError(f"gaussian: std must be > 0, got min {float(s.min())!r}")
    return m, s


def check_categorical(probs: np.ndarray, n: int | None = None) -> np.ndarray:
    """Validated float64 [n, k] probability tables: finite, >= 0, each row sum > 0, k >= 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"categorical: probabilities must be [n, k] with k >= 1, got {list(p.shape)}")
    if n is not None and p.shape[0] != n:
        raise ValueError(f"categorical: expected {n} rows of probabilities, got {p.shape[0]}")
    if p.shape[1] > MAX_DOMAIN_SIZE:
        raise ValueError(f"categorical: {p.shape[1]} categories; at most {MAX_DOMAIN_SIZE}")
    if not np.isfinite(p).all():
        raise ValueError("categorical: probabilities hold NaN or infinity")
    if (p < 0).any():
        raise ValueError("categorical: probabilities must be >= 0")
    if p.shape[0] and not (p.sum(axis=1) > 0).all():
        raise ValueError("categorical: every row of probabilities needs a positive sum")
    return np.ascontiguousarray(p)


def check_uniform(size: int | np.ndarray, n: int) -> np.ndarray:
    """Validated int32 [n] alphabet sizes (each 1 .. 2^24 - 1)."""
    s = np.asarray(size)
    if s.size and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"uniform: sizes must be integers, got {s.dtype}")
    s = np.full(n, int(s), dtype=np.int64) if s.ndim == 0 else s.astype(np.int64)
    if s.ndim != 1 or len(s) != n:
        raise ValueError(f"uniform: expected {n} sizes, got shape {list(s.shape)}")
    if n and (s.min() < 1 or s.max() > MAX_DOMAIN_SIZE):
        raise ValueError(f"uniform: sizes must be in 1..{MAX_DOMAIN_SIZE}")
    return np.ascontiguousarray(s, dtype=np.int32)


def _window_params(
    mean: np.ndarray, std: np.ndarray, half_width: int, excess_std: np.ndarray | float, max_excess: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated (center int64, mean - center, std, excess std) for the windowed Gaussian."""
    for value, name, top in ((half_width, "half_width", MAX_HALF_WIDTH), (max_excess, "max_excess", MAX_EXCESS)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= top:
            raise ValueError(f"gaussian_windowed: {name} must be an integer in 1..{top}, got {value!r}")
    half_width, max_excess = int(half_width), int(max_excess)
    m, s = check_gaussian(mean, std, -half_width, half_width, n)
    if n and float(np.abs(m).max()) >= 2.0**52:
        raise ValueError("gaussian_windowed: |mean| must be below 2^52")
    _, xs = check_gaussian(np.zeros(n), excess_std, 0, max_excess, n)
    center = np.rint(m)
    return center.astype(np.int64), m - center, s, xs


_HALF_SIZE = 1 << 12  # scrambling moves 24-bit values as two exact 12-bit uniform symbols
_MASK24 = np.uint64((1 << 24) - 1)
_MIX_A = (0x9E3779, 0x85EBCB)  # odd multipliers mod 2^24
_MIX_A_INV = tuple(pow(a, -1, 1 << 24) for a in _MIX_A)


def _mix_keys(count: int, key: int) -> np.ndarray:
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < 1 << 64:
        raise ValueError(f"scramble: key must be an integer in 0..2^64-1, got {key!r}")
    return seeded_words(count, int(key)).astype(np.uint64) & _MASK24


def _mix(z: np.ndarray, count: int, key: int) -> np.ndarray:
    """A keyed bijection of 24-bit values (per position): affine, xorshift, multiply, xorshift."""
    z = (z * np.uint64(_MIX_A[0]) + _mix_keys(count, key)) & _MASK24
    z ^= z >> np.uint64(12)  # a shift >= 12 on 24 bits is its own inverse
    z = (z * np.uint64(_MIX_A[1])) & _MASK24
    z ^= z >> np.uint64(13)
    return z


def _unmix(z: np.ndarray, count: int, key: int) -> np.ndarray:
    z = z ^ (z >> np.uint64(13))
    z = (z * np.uint64(_MIX_A_INV[1])) & _MASK24
    z ^= z >> np.uint64(12)
    return ((z + (np.uint64(1 << 24) - _mix_keys(count, key))) * np.uint64(_MIX_A_INV[0])) & _MASK24


def _check_count(count: int, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"{what}: count must be a non-negative integer, got {count!r}")
    return int(count)


# --------------------------------------------------------------------------- helpers


def seeded_words(num_words: int, seed: int) -> np.ndarray:
    """uint32 [num_words] pseudo-random words: SplitMix64 of seed, in uint64 numpy arithmetic.

    Written out here (not numpy's Generator, whose streams may change between numpy
    versions) so the words are identical on every platform and version. The last word is
    forced odd (non-zero) so that constriction keeps every word when the array becomes the
    initial content of an AnsStack.
    """
    num_words = _check_count(num_words, "seeded_words")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seeded_words: seed must be an integer in 0..2^64-1, got {seed!r}")
    count = (num_words + 1) // 2
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    words = np.empty(2 * count, dtype=np.uint32)
    words[0::2] = (z & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    words[1::2] = (z >> np.uint64(32)).astype(np.uint32)
    words = words[:num_words].copy()
    if num_words:
        words[-1] |= np.uint32(1)
    return words


# --------------------------------------------------------------------------- ANS stack


class AnsStack:
    """An ANS coder used as a stack: ``push_*`` encodes, ``pop_*`` decodes (LIFO).

    ``push_x(symbols, ...)`` then ``pop_x(...)`` with the same parameters returns the same
    symbols in the same order. Popping with parameters under which nothing was pushed
    (bits-back) draws symbols from the model using the stack's bits; pushing them back
    restores the stack exactly.
    """

    def __init__(self, words: np.ndarray | None = None) -> None:
        if words is None:
            self._coder = constriction.stream.stack.AnsCoder()
        else:
            arr = np.asarray(words)
            if arr.ndim != 1 or (arr.size and arr.dtype != np.uint32):
                raise ValueError(f"AnsStack: initial words must be a 1-D uint32 array, got {arr.dtype} {list(arr.shape)}")
            self._coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(arr, dtype=np.uint32))

    # sizes -----------------------------------------------------------------------------
    @property
    def num_valid_bits(self) -> int:
        return int(self._coder.num_valid_bits())

    @property
    def num_words(self) -> int:
        return int(self._coder.num_words())

    @property
    def bulk_words(self) -> int:
        """Words below the coder's 64-bit head state; the bottom ``bulk_words`` words of
        ``words()`` are untouched by every later pop that does not go deeper."""
        return int(self._coder.pos()[0])

    def words(self) -> np.ndarray:
        """A copy of the compressed data, uint32 [num_words] (bottom of the stack first)."""
        return np.asarray(self._coder.get_compressed(), dtype=np.uint32).copy()

    # gaussian --------------------------------------------------------------------------
    def push_gaussian(self, symbols: np.ndarray, mean: np.ndarray, std: np.ndarray, lo: int, hi: int) -> None:
        """Push int symbols [n] in lo..hi under QuantizedGaussian(mean, std) (bin units)."""
        m, s = check_gaussian(mean, std, lo, hi, np.asarray(symbols).size)
        sym = _check_symbols(symbols, lo, hi, "push_gaussian")
        if sym.size:
            self._coder.encode_reverse(sym, _QG(int(lo), int(hi)), m, s)

    def pop_gaussian(self, mean: np.ndarray, std: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Pop int32 symbols [n] in lo..hi under QuantizedGaussian(mean, std)."""
        m, s = check_gaussian(mean, std, lo, hi)
        if not m.size:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_QG(int(lo), int(hi)), m, s), dtype=np.int32)

    # windowed gaussian -----------------------------------------------------------------
    def push_gaussian_windowed(
        self, symbols: np.ndarray, mean: np.ndarray, std: np.ndarray, half_width: int,
        excess_std: np.ndarray | float, max_excess: int = MAX_EXCESS,
    ) -> None:
        """Push int symbols [n] under N(mean, std) (bin units), windowed.

        The offset d = symbol - round(mean) is pushed as clip(d, -W, W) under a
        QuantizedGaussian on -W..W; where |d| >= W the excess |d| - W is pushed first under a
        QuantizedGaussian on 0..max_excess with mean 0 and ``excess_std``. Where symbols are
        POPPED without having been pushed (sampling, bits-back), keep ``max_excess`` small
        (e.g. W): a pop from 0..max_excess strays uniformly with probability
        ~max_excess x 2^-24.
        """
        sym = np.asarray(symbols)
        n = sym.size
        center, rel, s, xs = _window_params(mean, std, half_width, excess_std, max_excess, n)
        if sym.ndim != 1 or (n and not np.issubdtype(sym.dtype, np.integer)):
            raise ValueError(f"push_gaussian_windowed: symbols must be a 1-D integer array, got {sym.dtype} {list(sym.shape)}")
        d = sym.astype(np.int64) - center
        edge = np.abs(d) >= half_width
        excess = np.abs(d[edge]) - half_width
        if excess.size and int(excess.max()) > max_excess:
            raise ValueError(f"push_gaussian_windowed: a symbol lies {int(excess.max())} bins beyond its window "
                             f"(at most {max_excess})")
        if excess.size:
            self._coder.encode_reverse(excess.astype(np.int32), _QG(0, max_excess), np.zeros(excess.size), xs[edge])
        if n:
            r = np.clip(d, -half_width, half_width).astype(np.int32)
            self._coder.encode_reverse(r, _QG(-half_width, half_width), rel, s)

    def pop_gaussian_windowed(
        self, mean: np.ndarray, std: np.ndarray, half_width: int, excess_std: np.ndarray | float,
        max_excess: int = MAX_EXCESS,
    ) -> np.ndarray:
        """Pop int64 symbols [n] pushed with `push_gaussian_windowed` (same parameters)."""
        n = np.asarray(mean).size
        center, rel, s, xs = _window_params(mean, std, half_width, excess_std, max_excess, n)
        if not n:
            return np.zeros(0, dtype=np.int64)
        d = np.asarray(self._coder.decode(_QG(-half_width, half_width), rel, s), dtype=np.int64)
        edge = np.abs(d) == half_width
        if edge.any():
            excess = np.asarray(self._coder.decode(_QG(0, max_excess), np.zeros(int(edge.sum())), xs[edge]),
                                dtype=np.int64)
            d[edge] += np.sign(d[edge]) * excess
        return center + d

    # scrambling --------------------------------------------------------------------------
    def scramble(self, count: int, key: int) -> None:
        """Re-randomise the top of the stack: pop ``count`` 24-bit values, map each through a
        keyed bijection, push them back (net size unchanged; `unscramble` undoes it).

        Why: right after pushing a symbol x under P, the ANS state's low bits are x's position
        in P's CDF, so an immediate pop under Q returns the Q-quantile of x's P-quantile. When
        P is miscalibrated those quantiles are far from uniform and bits-back "samples" are
        biased. Scrambling the bits between the push and the pop removes that coupling.
        """
        count = _check_count(count, "scramble")
        if not count:
            return
        hi = np.asarray(self._coder.decode(_Uniform(_HALF_SIZE), count), dtype=np.uint64)
        lo = np.asarray(self._coder.decode(_Uniform(_HALF_SIZE), count), dtype=np.uint64)
        z = _mix((hi << np.uint64(12)) | lo, count, key)
        self._coder.encode_reverse((z & np.uint64(0xFFF)).astype(np.int32), _Uniform(_HALF_SIZE))
        self._coder.encode_reverse((z >> np.uint64(12)).astype(np.int32), _Uniform(_HALF_SIZE))

    def unscramble(self, count: int, key: int) -> None:
        """The inverse of ``scramble(count, key)`` (same count and key)."""
        count = _check_count(count, "unscramble")
        if not count:
            return
        hi = np.asarray(self._coder.decode(_Uniform(_HALF_SIZE), count), dtype=np.uint64)
        lo = np.asarray(self._coder.decode(_Uniform(_HALF_SIZE), count), dtype=np.uint64)
        z = _unmix((hi << np.uint64(12)) | lo, count, key)
        self._coder.encode_reverse((z & np.uint64(0xFFF)).astype(np.int32), _Uniform(_HALF_SIZE))
        self._coder.encode_reverse((z >> np.uint64(12)).astype(np.int32), _Uniform(_HALF_SIZE))

# --------------------------------------------------------------------------- range coder


class RangeEncoder:
    """A queue (FIFO) encoder: symbols decode in the order they were encoded."""

    def __init__(self) -> None:
        self._coder = constriction.stream.queue.RangeEncoder()

    @property
    def num_words(self) -> int:
        return int(self._coder.num_words())

    def words(self) -> np.ndarray:
        """A copy of the compressed data so far, uint32 [num_words]."""
        return np.asarray(self._coder.get_compressed(), dtype=np.uint32).copy()

    def pos(self) -> tuple[int, tuple[int, int]]:
        """A checkpoint here: a `RangeDecoder` on these words (or on any stream that agrees
        with them up to where it is read) `seek`s to it and decodes what follows."""
        position, state = self._coder.pos()
        return int(position), (int(state[0]), int(state[1]))

    def encode_gaussian(self, symbols: np.ndarray, mean: np.ndarray, std: np.ndarray, lo: int, hi: int) -> None:
        m, s = check_gaussian(mean, std, lo, hi, np.asarray(symbols).size)
        sym = _check_symbols(symbols, lo, hi, "encode_gaussian")
        if sym.size:
            self._coder.encode(sym, _QG(int(lo), int(hi)), m, s)

    def encode_categorical(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        p = check_categorical(probs, np.asarray(symbols).size)
        sym = _check_symbols(symbols, 0, p.shape[1] - 1, "encode_categorical")
        if sym.size:
            self._coder.encode(sym, _Categorical(perfect=False), p)

    def encode_uniform(self, symbols: np.ndarray, size: int | np.ndarray) -> None:
        n = np.asarray(symbols).size
        sizes = check_uniform(size, n)
        sym = _check_symbols(symbols, 0, MAX_DOMAIN_SIZE, "encode_uniform")
        if n and (sym >= sizes).any():
            raise ValueError("encode_uniform: a symbol is >= its alphabet size")
        coded = sizes > 1
        if coded.any():
            self._coder.encode(sym[coded], _Uniform(), sizes[coded])


class RangeDecoder:
    """Decodes what a `RangeEncoder` wrote, in the same order, with the same parameters.

    Reading past the end is NOT detected (it returns arbitrary symbols): the caller must know
    how many symbols there are.
    """

    def __init__(self, words: np.ndarray) -> None:
        arr = np.asarray(words)
        if arr.ndim != 1 or (arr.size and arr.dtype != np.uint32):
            raise ValueError(f"RangeDecoder: words must be a 1-D uint32 array, got {arr.dtype} {list(arr.shape)}")
        self._coder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(arr, dtype=np.uint32))

    def seek(self, checkpoint: tuple[int, tuple[int, int]]) -> None:
        """Continue from a `RangeEncoder.pos` checkpoint (its position must lie in the words)."""
        position, state = checkpoint
        self._coder.seek(position, state)

    def decode_gaussian(self, mean: np.ndarray, std: np.ndarray, lo: int, hi: int) -> np.ndarray:
        m, s = check_gaussian(mean, std, lo, hi)
        if not m.size:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_QG(int(lo), int(hi)), m, s), dtype=np.int32)

    def decode_categorical(self, probs: np.ndarray) -> np.ndarray:
        p = check_categorical(probs)
        if not p.shape[0]:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_Categorical(perfect=False), p), dtype=np.int32)

    def decode_uniform(self, size: int | np.ndarray, count: int) -> np.ndarray:
        count = _check_count(count, "decode_uniform")
        sizes = check_uniform(size, count)
        out = np.zeros(count, dtype=np.int32)
        coded = sizes > 1
        if coded.any():
            out[coded] = self._coder.decode(_Uniform(), sizes[coded])
        return out

