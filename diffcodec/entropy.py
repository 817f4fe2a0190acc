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
- ``uniform``: symbols in 0..size-1, one size per symbol or one for all.

Validation happens HERE, before constriction sees anything, because constriction accepts
NaN means and infinite stds silently and a std <= 0 (or NaN) raises a pyo3 PanicException,
a ``BaseException`` that ``except Exception`` does not catch. Every bad parameter raises
``ValueError``. Constriction does not detect reading past the end of a stream: callers
store symbol counts themselves.

Compressed data is an array of uint32 words; `words_to_bytes` / `bytes_to_words` fix the
byte order to little-endian.
"""

from __future__ import annotations

import constriction
import numpy as np

PRECISION_BITS = 24  # constriction's default model precision for these coders
MAX_DOMAIN_SIZE = (1 << PRECISION_BITS) - 1
MAX_INT32 = (1 << 31) - 1

_QG = constriction.stream.model.QuantizedGaussian
_Categorical = constriction.stream.model.Categorical
_Uniform = constriction.stream.model.Uniform

__all__ = [
    "AnsStack",
    "RangeEncoder",
    "RangeDecoder",
    "check_gaussian",
    "check_categorical",
    "check_uniform",
    "seeded_words",
    "snap",
    "words_to_bytes",
    "bytes_to_words",
    "PRECISION_BITS",
    "MAX_DOMAIN_SIZE",
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


def _check_count(count: int, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"{what}: count must be a non-negative integer, got {count!r}")
    return int(count)


# --------------------------------------------------------------------------- helpers


def snap(values: np.ndarray, log2_step: int) -> np.ndarray:
    """float64 values rounded (half to even) to the nearest multiple of 2^log2_step.

    Exact in float64 while |values| * 2^-log2_step < 2^52; used so that encoder and decoder
    pass identical parameters to the coder even if the values came from float32 arithmetic.
    """
    scale = float(2.0 ** (-log2_step))
    return np.rint(np.asarray(values, dtype=np.float64) * scale) / scale


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


def words_to_bytes(words: np.ndarray) -> bytes:
    """uint32 words -> little-endian bytes."""
    return np.ascontiguousarray(words, dtype="<u4").tobytes()


def bytes_to_words(data: bytes) -> np.ndarray:
    """Little-endian bytes (length a multiple of 4) -> native uint32 words."""
    if len(data) % 4:
        raise ValueError(f"compressed data must be a whole number of 32-bit words, got {len(data)} bytes")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


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
    def num_bits(self) -> int:
        """Size of the compressed data in bits, rounded up to whole words."""
        return int(self._coder.num_bits())

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

    def is_empty(self) -> bool:
        return bool(self._coder.is_empty())

    def words(self) -> np.ndarray:
        """A copy of the compressed data, uint32 [num_words] (bottom of the stack first)."""
        return np.asarray(self._coder.get_compressed(), dtype=np.uint32).copy()

    def clone(self) -> AnsStack:
        other = AnsStack.__new__(AnsStack)
        other._coder = self._coder.clone()
        return other

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

    # categorical -----------------------------------------------------------------------
    def push_categorical(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """Push symbols [n] in 0..k-1, symbol i under the table probs[i] ([n, k])."""
        p = check_categorical(probs, np.asarray(symbols).size)
        sym = _check_symbols(symbols, 0, p.shape[1] - 1, "push_categorical")
        if sym.size:
            self._coder.encode_reverse(sym, _Categorical(perfect=False), p)

    def pop_categorical(self, probs: np.ndarray) -> np.ndarray:
        p = check_categorical(probs)
        if not p.shape[0]:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_Categorical(perfect=False), p), dtype=np.int32)

    # uniform ---------------------------------------------------------------------------
    def push_uniform(self, symbols: np.ndarray, size: int | np.ndarray) -> None:
        """Push symbols [n], symbol i uniform on 0..size_i - 1."""
        n = np.asarray(symbols).size
        sizes = check_uniform(size, n)
        sym = _check_symbols(symbols, 0, MAX_DOMAIN_SIZE, "push_uniform")
        if n and (sym >= sizes).any():
            raise ValueError("push_uniform: a symbol is >= its alphabet size")
        if n:
            self._coder.encode_reverse(sym, _Uniform(), sizes)

    def pop_uniform(self, size: int | np.ndarray, count: int) -> np.ndarray:
        count = _check_count(count, "pop_uniform")
        sizes = check_uniform(size, count)
        if not count:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_Uniform(), sizes), dtype=np.int32)


# --------------------------------------------------------------------------- range coder


class RangeEncoder:
    """A queue (FIFO) encoder: symbols decode in the order they were encoded."""

    def __init__(self) -> None:
        self._coder = constriction.stream.queue.RangeEncoder()

    @property
    def num_bits(self) -> int:
        return int(self._coder.num_bits())

    @property
    def num_words(self) -> int:
        return int(self._coder.num_words())

    def words(self) -> np.ndarray:
        """A copy of the compressed data so far, uint32 [num_words]."""
        return np.asarray(self._coder.get_compressed(), dtype=np.uint32).copy()

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
        if n:
            self._coder.encode(sym, _Uniform(), sizes)


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

    def maybe_exhausted(self) -> bool:
        return bool(self._coder.maybe_exhausted())

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
        if not count:
            return np.zeros(0, dtype=np.int32)
        return np.asarray(self._coder.decode(_Uniform(), sizes), dtype=np.int32)

