"""Rate control for progressive files: which checked stage boundary a file ends at.

A progressive file may end at any checked stage boundary (`progressive.codec.Boundary`); a
target picks one while the encoder runs, so that the encoder stops computing there:

    psnr DB      the first boundary at which every image of the file reaches DB: the PSNR
                 (8-bit, peak 255, over H x W x 3 values) of the reconstruction the decoder
                 makes from that file against the input image, per image, so that the worst
                 image of a file of several reaches it. The whole stream is lossless and
                 reaches any PSNR: a target no lossy boundary reaches gives the whole file.
    bpp X        the last boundary whose whole file, header included, takes at most X bits per
                 pixel of all the file's images together (at most X x (sum of H x W) / 8 bytes)
    size BYTES   the last boundary whose whole file takes at most BYTES bytes

A size or bpp target smaller than the first boundary's file cannot be met: a one-line
`DiffcodecError` names the smallest file these images make (nothing is written).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffcodec.codec.progressive.codec import END_BEFORE, END_HERE, GO_ON, Boundary
from diffcodec.errors import DiffcodecError
from diffcodec.images import images_from_tiles

KINDS = ("psnr", "bpp", "size")
UNITS = {"psnr": "dB", "bpp": "bits per pixel", "size": "bytes"}


@dataclass(frozen=True)
class RateTarget:
    """One target: ``kind`` in KINDS, ``value`` in its unit (dB, bits per pixel, bytes)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DiffcodecError(f"unknown rate target {self.kind!r}; known: {', '.join(KINDS)}")
        if not (math.isfinite(self.value) and self.value > 0):
            raise DiffcodecError(f"--{self.kind} must be a positive finite number, got {self.value:g}")
        if self.kind == "size" and not float(self.value).is_integer():
            raise DiffcodecError(f"--size is a whole number of bytes, got {self.value:g}")

    def __str__(self) -> str:
        return f"--{self.kind} {self.value:g}"


SQUARED_ERROR_BLOCK = 1 << 18  # values a block: what `squared_error` holds beyond its inputs (2 MiB)


def squared_error(a: np.ndarray, b: np.ndarray) -> int:
    """The sum of squared differences of two uint8 arrays of one shape, exact (an integer), made
    a block of values at a time: no image-sized temporary (a photo's float64 differences and
    squares were 24 bytes a value at every boundary rate control looked at)."""
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"squared_error: expected two uint8 arrays of one shape, got {a.dtype} {list(a.shape)} "
                         f"and {b.dtype} {list(b.shape)}")
    a, b = a.reshape(-1), b.reshape(-1)
    total = 0
    for at in range(0, a.size, SQUARED_ERROR_BLOCK):
        d = a[at : at + SQUARED_ERROR_BLOCK].astype(np.int64)
        d -= b[at : at + SQUARED_ERROR_BLOCK]
        total += int(np.dot(d, d))  # at most 255^2 x 2^18 < 2^63 a block
    return total


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of one shape (peak 255; inf when equal)."""
    mse = squared_error(a, b) / a.size  # what numpy's mean of the squares gives: its sum is exact
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@dataclass(frozen=True)
class Seen:
    """What rate control measured at one boundary."""

    stages: int
    timestep: int
    file_bytes: int | None  # the whole file ending there (None: not needed to decide)
    psnr: list[float]  # per image, of the decoder's reconstruction (inf at the lossless end)


class RateControl:
    """The ``end`` callback of `progressive.codec.encode` for one target.

    ``images``: the inputs (uint8 [H, W, 3]); ``file_bytes(payload_bytes, stages)``: the
    whole file's bytes for such a payload (`container.file_size`); ``num_stages``: K + 1.
    ``seen`` keeps every boundary it was shown, in order."""

    def __init__(self, target: RateTarget, images: Sequence[np.ndarray],
                 file_bytes: Callable[[int, int], int], num_stages: int) -> None:
        self.target, self.images, self.file_bytes, self.num_stages = target, list(images), file_bytes, num_stages
        self.pixels = sum(int(im.shape[0]) * int(im.shape[1]) for im in self.images)
        self.seen: list[Seen] = []
        if target.kind == "psnr":
            self.budget = None
        elif target.kind == "size":
            self.budget = int(target.value)
        else:
            self.budget = int(math.floor(target.value * self.pixels / 8.0))

    def psnr(self, b: Boundary) -> list[float]:
        if b.tiles is None:
            return [math.inf] * len(self.images)
        decoded = images_from_tiles(b.tiles, [(int(im.shape[0]), int(im.shape[1])) for im in self.images])
        return [psnr_db(x, y) for x, y in zip(decoded, self.images)]

    def bpp(self, file_bytes: int) -> float:
        return 8.0 * file_bytes / self.pixels

    def __call__(self, b: Boundary) -> str:
        psnr = self.psnr(b)
        if self.budget is None:
            self.seen.append(Seen(b.stages, b.timestep, None, psnr))
            return END_HERE if min(psnr) >= self.target.value else GO_ON
        # the sealed output so far bounds the file from above: parse for the exact size only near the budget
        if self.file_bytes(-(-b.max_payload_bits // 8), b.stages) <= self.budget:
            size = None
        else:
            size = self.file_bytes(-(-b.payload_bits() // 8), b.stages)
        self.seen.append(Seen(b.stages, b.timestep, size, psnr))
        if size is None or size <= self.budget:
            return GO_ON
        if len(self.seen) == 1:
            raise DiffcodecError(self.unreachable(self.seen[0]))
        return END_BEFORE

    def unreachable(self, first: Seen) -> str:
        t = "x_0" if first.timestep < 0 else f"t={first.timestep}"
        return (f"{self.target}: the smallest file these images make ends at stage {first.stages} of "
                f"{self.num_stages} ({t}, {min(first.psnr):.2f} dB) and takes {first.file_bytes:,} bytes = "
                f"{self.bpp(first.file_bytes):.4f} bpp, more than {self.budget:,} bytes; nothing written")

    def at(self, stages: int) -> Seen | None:
        """What was measured at the boundary that delivers ``stages`` stages."""
        return next((s for s in self.seen if s.stages == stages), None)
