"""Tests for diffcodec.outputs: atomic writes that never overwrite silently, PNG output,
where decoded images go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcodec.errors import DiffcodecError
from diffcodec.outputs import check_output_file, output_paths, write_png


def rand_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_write_png_round_trip_and_no_overwrite(tmp_path: Path) -> None:
    img = rand_images(1, 37, 50)[0]
    out = tmp_path / "out.png"
    write_png(out, img)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), img)
    before = out.read_bytes()
    with pytest.raises(DiffcodecError, match="out.png: already exists; pass --force"):
        write_png(out, rand_images(1, 4, 4)[0])
    assert out.read_bytes() == before
    other = rand_images(1, 4, 4, seed=5)[0]
    write_png(out, other, force=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), other)
    with pytest.raises(DiffcodecError, match="does not exist"):
        write_png(tmp_path / "nodir" / "x.png", img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_write_png_failure_leaves_nothing_half_written(tmp_path: Path, monkeypatch) -> None:
    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(DiffcodecError, match="new.png: cannot write \\(No space left on device\\)"):
        write_png(tmp_path / "new.png", rand_images(1)[0])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old.png").write_bytes(b"original")
    with pytest.raises(DiffcodecError, match="cannot write"):
        write_png(tmp_path / "old.png", rand_images(1)[0], force=True)
    assert (tmp_path / "old.png").read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["old.png"]


def test_output_paths():
    assert output_paths("x.png", ["a"]) == ["x.png"]
    assert output_paths("d", ["a.png", "b.jpg"]) == ["d/a.png", "d/b.png"]
    assert output_paths("d", ["s.npz[0]", "s.npz[1]"]) == ["d/s.npz_0.png", "d/s.npz_1.png"]
    assert output_paths("d", ["", "x", "x"]) == ["d/00000.png", "d/00001_x.png", "d/00002_x.png"]
    with pytest.raises(DiffcodecError, match="holds 2 images"):
        output_paths("x.png", ["a", "b"])


def test_bad_output_paths_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(DiffcodecError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "x.dfc")
    with pytest.raises(DiffcodecError, match="is a directory"):
        check_output_file(tmp_path, force=True)
    (tmp_path / "x.dfc").write_bytes(b"old")
    with pytest.raises(DiffcodecError, match="already exists"):
        check_output_file(tmp_path / "x.dfc")
    check_output_file(tmp_path / "x.dfc", force=True)
    with pytest.raises(DiffcodecError, match="does not exist"):
        output_paths(str(tmp_path / "missing" / "x.png"), ["a"])
