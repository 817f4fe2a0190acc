"""Images as a fixed-size model sees them: model-size tiles, and tensors on [-1, 1].

An image uint8 [H, W, 3] of any size is cut into row-major tiles of the model's size, the
bottom/right edges padded by replication (`to_tiles`); a set of images is one array of
tiles with each image's rows (`image_tiles`) and goes back with `images_from_tiles`. The
bound counts an image's bits over all its tiles but divides by its real dimensions only, so
padding costs bits and adds no dimensions, as it does for a codec that sends the tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def check_hwc(img: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{what}: expected uint8 [H, W, 3], got {desc}")
    return img


def pad_to_multiple(img: np.ndarray, tile: int = 32) -> np.ndarray:
    """uint8 [H, W, 3] -> [H', W', 3] with H', W' the next multiples of `tile`, replicating
    the last row/column (bottom/right only). Returned unchanged if no padding is needed."""
    check_hwc(img, "pad_to_multiple")
    if tile < 1:
        raise ValueError(f"pad_to_multiple: tile must be >= 1, got {tile}")
    pad_h, pad_w = -img.shape[0] % tile, -img.shape[1] % tile
    if pad_h == 0 and pad_w == 0:
        return img
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def to_tiles(img: np.ndarray, tile: int = 32) -> np.ndarray:
    """uint8 [H, W, 3] -> padded tiles uint8 [ceil(H/tile) * ceil(W/tile), tile, tile, 3], row-major."""
    padded = pad_to_multiple(img, tile)
    rows, cols = padded.shape[0] // tile, padded.shape[1] // tile
    tiles = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(tiles.reshape(rows * cols, tile, tile, 3))


def from_tiles(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of `to_tiles`: uint8 [n_tiles, t, t, 3] (row-major) -> uint8 [height, width, 3]."""
    if tiles.ndim != 4 or tiles.shape[1] != tiles.shape[2] or tiles.shape[3] != 3 or height < 1 or width < 1:
        raise ValueError(f"from_tiles: expected [n, t, t, 3] tiles and a positive size, got {list(tiles.shape)}")
    tile = tiles.shape[1]
    rows, cols = -(-height // tile), -(-width // tile)
    if tiles.shape[0] != rows * cols:
        raise ValueError(f"from_tiles: {height}x{width} needs {rows * cols} tiles of {tile}, got {tiles.shape[0]}")
    full = tiles.reshape(rows, cols, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * tile, cols * tile, 3)
    return np.ascontiguousarray(full[:height, :width])


def tile_count(height: int, width: int, tile: int) -> int:
    """Tiles of side ``tile`` that cover a height x width image (`to_tiles`)."""
    return -(-height // tile) * -(-width // tile)


def image_tiles(images: Sequence[np.ndarray], tile: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """All images' tiles uint8 [M, tile, tile, 3] in order (`to_tiles`), each image's rows of
    that array, and each image's real dimension count (H x W x 3, padding excluded)."""
    tiles, groups, dims, start = [], [], [], 0
    for img in images:
        t = to_tiles(img, tile)
        tiles.append(t)
        groups.append(np.arange(start, start + len(t)))
        dims.append(img.size)
        start += len(t)
    return np.concatenate(tiles), groups, np.asarray(dims, dtype=np.int64)


def images_from_tiles(tiles: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of `image_tiles`: uint8 tiles [M, t, t, 3] -> one uint8 [H, W, 3] per (H, W)."""
    tile = tiles.shape[1]
    counts = [tile_count(h, w, tile) for h, w in sizes]
    if sum(counts) != len(tiles):
        raise ValueError(f"images_from_tiles: {len(sizes)} images need {sum(counts)} tiles, got {len(tiles)}")
    images, start = [], 0
    for (h, w), n in zip(sizes, counts):
        images.append(from_tiles(tiles[start : start + n], h, w))
        start += n
    return images


def to_model_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    x = images_uint8
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        desc = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"to_model_input: expected uint8 [N, H, W, 3], got {desc}")
    return level_values(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)).contiguous()


def level_values(levels: torch.Tensor) -> torch.Tensor:
    """uint8 pixel levels (any shape) -> the model's float32 values, level / 127.5 - 1 in binary32."""
    if levels.dtype != torch.uint8:
        raise ValueError(f"level_values: expected uint8 levels, got {levels.dtype}")
    return levels.to(torch.float32) / 127.5 - 1.0


def tiles_as_levels(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles [N, H, W, 3] -> their levels [N, 3, H, W] (the model's layout; `levels_as_tiles`
    undone): what `to_model_input` makes values of, at 1 byte a dimension instead of 4."""
    if tiles.ndim != 4 or tiles.shape[3] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles_as_levels: expected uint8 [N, H, W, 3], got {tiles.dtype} {list(tiles.shape)}")
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


def to_levels(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> its uint8 pixel levels [N, 3, H, W] (the model's layout):
    round((x + 1) * 127.5) clipped to 0..255, worked on one binary32 copy."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_levels: expected [N, 3, H, W], got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("to_levels: tensor holds NaN or infinity")
    y = x.detach().to(torch.float32, copy=True)  # one float32 copy, worked in place
    return y.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def levels_as_tiles(levels: np.ndarray) -> np.ndarray:
    """uint8 pixel levels [N, 3, H, W] (`to_levels`, a decoder's pixels) -> uint8 tiles [N, H, W, 3]."""
    if levels.ndim != 4 or levels.shape[1] != 3 or levels.dtype != np.uint8:
        raise ValueError(f"levels_as_tiles: expected uint8 [N, 3, H, W], got {levels.dtype} {list(levels.shape)}")
    return np.ascontiguousarray(levels.transpose(0, 2, 3, 1))


def from_model_output(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]: round((x + 1) * 127.5) clipped to 0..255
    (`to_levels` in the images' layout)."""
    return levels_as_tiles(to_levels(x))
