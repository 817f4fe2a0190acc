"""Tests for diffcodec.images: tiling with edge padding, a set of images as tiles and back,
model tensors on [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcodec.images import (
    from_model_output,
    from_tiles,
    image_tiles,
    images_from_tiles,
    pad_to_multiple,
    tile_count,
    to_model_input,
    to_tiles,
)


def rand_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_tiling_round_trip_odd_size() -> None:
    img = rand_images(1, 37, 50)[0]
    padded = pad_to_multiple(img)
    assert padded.shape == (64, 64, 3)
    np.testing.assert_array_equal(padded[:37, :50], img)
    np.testing.assert_array_equal(padded[37:, :50], np.broadcast_to(img[36], (27, 50, 3)))  # last row repeated
    np.testing.assert_array_equal(padded[:, 50:], np.broadcast_to(padded[:, 49:50], (64, 14, 3)))  # last column
    tiles = to_tiles(img)
    assert tiles.shape == (4, 32, 32, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[1, :, :18], img[:32, 32:50])  # row-major: tile 1 is top-right
    np.testing.assert_array_equal(tiles[2, :5], img[32:37, :32])
    np.testing.assert_array_equal(from_tiles(tiles, 37, 50), img)


def test_tiling_exact_and_small() -> None:
    img = rand_images(1, 64, 96)[0]
    assert pad_to_multiple(img) is img
    tiles = to_tiles(img)
    assert tiles.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(from_tiles(tiles, 64, 96), img)
    tiny = rand_images(1, 3, 5)[0]
    np.testing.assert_array_equal(from_tiles(to_tiles(tiny, 4), 3, 5), tiny)
    with pytest.raises(ValueError):
        from_tiles(tiles, 100, 96)


def test_model_input_output_inverse() -> None:
    values = np.arange(256, dtype=np.uint8)
    imgs = np.stack([np.broadcast_to(values.reshape(16, 16, 1), (16, 16, 3))] * 2).copy()
    imgs[1] = imgs[1, ::-1]
    x = to_model_input(imgs)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 16) and x.is_contiguous()
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.allclose(x[0, 1, 0, 3], torch.tensor(3 / 127.5 - 1))
    np.testing.assert_array_equal(from_model_output(x), imgs)
    out = from_model_output(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.2]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert out.shape == (1, 1, 5, 3) and out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError):
        to_model_input(imgs.astype(np.float32))


def test_a_set_of_images_goes_to_tiles_and_back():
    imgs = [rand_images(1, 37, 50, seed=1)[0], rand_images(1, 32, 32, seed=2)[0], rand_images(1, 5, 70, seed=3)[0]]
    tiles, groups, dims = image_tiles(imgs, 32)
    assert [len(g) for g in groups] == [tile_count(37, 50, 32), 1, tile_count(5, 70, 32)] == [4, 1, 3]
    assert tiles.shape == (8, 32, 32, 3) and list(dims) == [im.size for im in imgs]
    back = images_from_tiles(tiles, [im.shape[:2] for im in imgs])
    assert all(np.array_equal(a, b) for a, b in zip(back, imgs))
    with pytest.raises(ValueError, match="need 8 tiles"):
        images_from_tiles(tiles[:7], [im.shape[:2] for im in imgs])


def test_levels_as_tiles_equal_the_model_outputs_of_the_same_levels():
    """Every level 0..255 as a decoder's uint8 [N, 3, H, W]: the tiles `from_model_output`
    gives for its model input (the api hands out a complete stream's pixels so, without a float copy)."""
    from diffcodec.images import levels_as_tiles

    levels = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8).repeat(3, axis=1)
    levels[:, 1] = 255 - levels[:, 1]
    tiles = levels_as_tiles(levels)
    assert tiles.shape == (4, 8, 8, 3) and tiles.flags.c_contiguous
    assert np.array_equal(tiles, from_model_output(to_model_input(np.ascontiguousarray(levels.transpose(0, 2, 3, 1)))))
    for bad in (levels.astype(np.int16), levels[:, :2], levels[0]):
        with pytest.raises(ValueError, match="levels_as_tiles: expected uint8"):
            levels_as_tiles(bad)


def test_tiles_as_levels_give_the_model_input_a_slice_at_a_time():
    """`tiles_as_levels` undoes `levels_as_tiles`; their `level_values` are `to_model_input`'s
    values bit for bit, whole or a few tiles at a time (the progressive encoder's)."""
    from diffcodec.images import level_values, levels_as_tiles, tiles_as_levels

    tiles = rand_images(5, 8, 8, seed=3)
    tiles[0, 0, :4, :] = [[0, 127, 255], [128, 1, 254], [64, 191, 2], [126, 129, 253]]
    levels = tiles_as_levels(tiles)
    assert levels.shape == (5, 3, 8, 8) and levels.flags.c_contiguous and np.array_equal(levels_as_tiles(levels), tiles)
    values = to_model_input(tiles)
    t = torch.from_numpy(levels)
    assert level_values(t).dtype == torch.float32 and torch.equal(level_values(t), values)
    assert torch.equal(torch.cat([level_values(t[i : i + 2]) for i in range(0, 5, 2)]), values)
    with pytest.raises(ValueError, match="level_values: expected uint8"):
        level_values(t.to(torch.int16))
    for bad in (tiles.astype(np.int16), tiles[..., :2], tiles[0]):
        with pytest.raises(ValueError, match="tiles_as_levels: expected uint8"):
            tiles_as_levels(bad)
