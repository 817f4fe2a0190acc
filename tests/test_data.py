"""Tests for diffcodec.data: every source kind, every refusal, mode conversion."""

from __future__ import annotations

import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcodec import data
from diffcodec.data import ImageSet, read_images
from diffcodec.errors import DiffcodecError

SHARED_TEST = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/test"


# ---------------------------------------------------------------------------- helpers


def rand_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def cifar_rows(hwc: np.ndarray) -> np.ndarray:
    """The official layout, built element by element: row = 1024 R, 1024 G, 1024 B (32x32 row-major)."""
    n = len(hwc)
    rows = np.zeros((n, 3072), np.uint8)
    for c in range(3):
        for r in range(32):
            for col in range(32):
                rows[:, c * 1024 + r * 32 + col] = hwc[:, r, col, c]
    return rows


def write_batch(path: Path, hwc: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": cifar_rows(hwc),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(hwc))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, list[int]]]]:
    """cifar-10-batches-py with test_batch (3 images) and data_batch_1..5 (2 images each)."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches: dict[str, tuple[np.ndarray, list[int]]] = {}
    for k, name in enumerate(["test_batch", *[f"data_batch_{i}" for i in range(1, 6)]]):
        n = 3 if name == "test_batch" else 2
        hwc = rand_images(n, seed=k)
        labels = [(k + i) % 10 for i in range(n)]
        write_batch(root / name, hwc, labels, protocol=2 if k % 2 == 0 else 4 + k % 2)
        batches[name] = (hwc, labels)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    (root / "readme.html").write_text("<html></html>")
    return root, batches


def train_of(batches: dict) -> tuple[np.ndarray, list[int]]:
    names = [f"data_batch_{i}" for i in range(1, 6)]
    return np.concatenate([batches[n][0] for n in names]), sum((batches[n][1] for n in names), [])


def png16(path: Path, arr: np.ndarray) -> None:
    """Write a 16-bit RGB (colour type 2) or RGBA (6) PNG by hand; Pillow cannot write these."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(DiffcodecError, match=match) as info:
        read_images(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------- CIFAR-10


def test_cifar_layout_helper_is_channel_major() -> None:
    hwc = rand_images(1)
    rows = cifar_rows(hwc)
    assert rows[0, 1024 + 5 * 32 + 7] == hwc[0, 5, 7, 1]
    assert rows[0, 2048 + 31 * 32 + 31] == hwc[0, 31, 31, 2]


def test_cifar_directory_default_is_test_and_suffixes(cifar_dir) -> None:
    root, batches = cifar_dir
    for arg in (root, str(root), f"{root}:test"):
        s = read_images(arg)
        np.testing.assert_array_equal(s.as_array(), batches["test_batch"][0])
        assert s.labels.dtype == np.int64 and s.labels.tolist() == batches["test_batch"][1]
        assert s.names == ["test_batch[0]", "test_batch[1]", "test_batch[2]"]
    assert any(":train" in n for n in read_images(root).notes)
    s = read_images(f"{root}:train")
    x, y = train_of(batches)
    np.testing.assert_array_equal(s.as_array(), x)
    assert s.labels.tolist() == y
    assert s.names[2] == "data_batch_2[0]" and len(s) == 10


def test_cifar_parent_directory_is_followed(cifar_dir) -> None:
    root, batches = cifar_dir
    np.testing.assert_array_equal(read_images(root.parent).as_array(), batches["test_batch"][0])


def test_cifar_train_limit_stops_before_later_batches(cifar_dir) -> None:
    root, batches = cifar_dir
    (root / "data_batch_3").write_bytes(b"\x80\x02garbage")  # never read with limit=3
    s = read_images(f"{root}:train", limit=3)
    np.testing.assert_array_equal(s.as_array(), train_of(batches)[0][:3])
    assert s.labels.tolist() == train_of(batches)[1][:3]
    refused("data_batch_3: corrupt or unreadable pickle", f"{root}:train", limit=5)


def test_cifar_single_batch_file(cifar_dir) -> None:
    root, batches = cifar_dir
    s = read_images(root / "data_batch_2")
    np.testing.assert_array_equal(s.as_array(), batches["data_batch_2"][0])
    assert s.labels.tolist() == batches["data_batch_2"][1]
    assert s.names == ["data_batch_2[0]", "data_batch_2[1]"]
    refused("suffix only applies", f"{root / 'data_batch_2'}:train")


def test_cifar_partial_train_and_missing_split(tmp_path: Path) -> None:
    hwc = rand_images(2)
    write_batch(tmp_path / "data_batch_1", hwc, [1, 2])
    s = read_images(tmp_path)  # no test_batch: the data batches are read
    np.testing.assert_array_equal(s.as_array(), hwc)
    assert any("partial" in n for n in s.notes)
    refused("has no test_batch", f"{tmp_path}:test")


def test_cifar_tar_gz(cifar_dir, tmp_path: Path) -> None:
    root, batches = cifar_dir
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta",
                     "data_batch_2", "data_batch_5", "data_batch_1"]:  # the official member order
            tar.add(root / name, arcname=f"cifar-10-batches-py/{name}")
    for arg in (archive, f"{archive}:test"):
        s = read_images(arg)
        np.testing.assert_array_equal(s.as_array(), batches["test_batch"][0])
        assert s.labels.tolist() == batches["test_batch"][1]
    s = read_images(f"{archive}:train", limit=7)
    x, y = train_of(batches)
    np.testing.assert_array_equal(s.as_array(), x[:7])
    assert s.labels.tolist() == y[:7]


def test_tar_refusals(tmp_path: Path) -> None:
    other = tmp_path / "other.tar.gz"
    (tmp_path / "notes.txt").write_text("hello")
    with tarfile.open(other, "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="stuff/notes.txt")
    refused("archive holds no CIFAR-10 python batches", other)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(other.read_bytes()[:30])
    refused("broken.tar.gz: not a readable tar archive", broken)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=protocol)
    (tmp_path / "test_batch").write_bytes(payload)
    msg = refused("refusing to load it", tmp_path / "test_batch")
    assert "system" in msg
    refused("refusing to load it", tmp_path)
    assert not marker.exists()


def test_pickle_with_builtins_eval_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Sneaky:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(Sneaky(), protocol=2))
    refused("builtins.eval", tmp_path / "data_batch_1")
    assert not marker.exists()


def test_corrupt_and_wrong_pickles(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_batch(good, rand_images(2), [0, 1])
    (tmp_path / "test_batch").write_bytes(good.read_bytes()[:100])
    refused("test_batch: corrupt or unreadable pickle", tmp_path / "test_batch")
    (tmp_path / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    refused("not a CIFAR-10 batch \\(pickle holds list", tmp_path / "test_batch")
    bad = {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    refused("'data' is float32", tmp_path / "test_batch")
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    refused("'labels' is missing or not 2 integers", tmp_path / "test_batch")


# ------------------------------------------------------------------------------- npz


def test_npz_file(tmp_path: Path) -> None:
    x = rand_images(4)
    path = tmp_path / "cifar10_test_00000-00003.npz"
    np.savez_compressed(path, x=x, y=np.array([3, 8, 8, 0], np.uint8))
    s = read_images(path)
    np.testing.assert_array_equal(s.as_array(), x)
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [3, 8, 8, 0]
    assert s.names[1] == "cifar10_test_00000-00003.npz[1]"
    np.savez_compressed(tmp_path / "nolabels.npz", x=x)
    assert read_images(tmp_path / "nolabels.npz", limit=2).labels is None
    assert len(read_images(tmp_path / "nolabels.npz", limit=2)) == 2


def test_npz_directory_order_and_limit(tmp_path: Path) -> None:
    x = rand_images(9)
    # written out of order: reading must follow sorted file names
    np.savez_compressed(tmp_path / "s_06-08.npz", x=x[6:], y=np.arange(6, 9))
    np.savez_compressed(tmp_path / "s_00-02.npz", x=x[:3], y=np.arange(0, 3))
    np.savez_compressed(tmp_path / "s_03-05.npz", x=x[3:6], y=np.arange(3, 6))
    s = read_images(tmp_path)
    np.testing.assert_array_equal(s.as_array(), x)
    assert s.labels.tolist() == list(range(9))
    assert s.names[3] == "s_03-05.npz[0]"
    (tmp_path / "s_06-08.npz").write_bytes(b"PK\x03\x04 not really")  # not reached with limit=5
    s = read_images(tmp_path, limit=5)
    np.testing.assert_array_equal(s.as_array(), x[:5])
    assert s.labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "arrays, phrase",
    [
        ({"images": np.zeros((1, 32, 32, 3), np.uint8)}, ".npz has no key 'x' \\(keys: images\\)"),
        ({"x": np.zeros((1, 32, 32, 3), np.float32)}, "'x' is float32"),
        ({"x": np.zeros((32, 32, 3), np.uint8)}, "'x' is uint8 \\[32, 32, 3\\], expected uint8 \\[N, H, W, 3\\]"),
        ({"x": np.zeros((1, 3, 32, 32), np.uint8)}, "'x' is uint8 \\[1, 3, 32, 32\\]"),
        ({"x": np.zeros((2, 32, 32, 3), np.uint8), "y": np.zeros(3, np.int64)}, "'y' is int64 \\[3\\]"),
    ],
)
def test_npz_refusals(tmp_path: Path, arrays, phrase: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    refused("bad.npz: " + phrase, tmp_path / "bad.npz")


def test_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip file at all")
    refused("bad.npz: not a readable .npz file", tmp_path / "bad.npz")
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=rand_images(20))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:-200])
    refused("cut.npz: not a readable .npz file", tmp_path / "cut.npz")


# ---------------------------------------------------------------------------- images


def test_png_folder_mixed_sizes(tmp_path: Path) -> None:
    imgs = {
        "b.png": rand_images(1, 20, 30)[0],
        "a.PNG": rand_images(1, 32, 32, 1)[0],
        "c.bmp": rand_images(1, 7, 5, 2)[0],
    }
    for name, img in imgs.items():
        Image.fromarray(img).save(tmp_path / name, format="BMP" if name.endswith("bmp") else "PNG")
    (tmp_path / "README.txt").write_text("not an image, ignored")
    (tmp_path / "sub").mkdir()
    s = read_images(tmp_path)
    assert s.names == ["a.PNG", "b.png", "c.bmp"] and s.labels is None
    for name, got in zip(s.names, s.images):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, imgs[name])
    assert not s.same_size()
    with pytest.raises(DiffcodecError, match="different sizes"):
        s.as_array()
    assert read_images(tmp_path, limit=2).names == ["a.PNG", "b.png"]


def test_single_image_any_size(tmp_path: Path) -> None:
    img = rand_images(1, 37, 50)[0]
    Image.fromarray(img).save(tmp_path / "kodim01.png")
    s = read_images(tmp_path / "kodim01.png")
    assert s.names == ["kodim01.png"] and s.same_size() and s.notes == []
    np.testing.assert_array_equal(s.as_array(), img[None])
    Image.fromarray(img).save(tmp_path / "photo.jpg", quality=95)
    assert read_images(tmp_path / "photo.jpg").images[0].shape == (37, 50, 3)


def test_refusals(tmp_path: Path) -> None:
    refused("missing.png: no such file or directory", tmp_path / "missing.png")
    refused("no such file or directory", f"{tmp_path / 'missing'}:test")
    (tmp_path / "empty").mkdir()
    refused("empty: directory is empty", tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    refused("holds no .npz shards, CIFAR-10 batches or image files", tmp_path / "junk")
    (tmp_path / "text.txt").write_text("just text")
    refused("text.txt: not an image file", tmp_path / "text.txt")
    (tmp_path / "junk" / "fake.png").write_text("just text")
    refused("fake.png: not an image file", tmp_path / "junk")
    (tmp_path / "zero.png").write_bytes(b"")
    refused("zero.png: empty file", tmp_path / "zero.png")
    img = rand_images(1, 64, 64)[0]
    Image.fromarray(img).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:-500])
    refused("cut.png: truncated or corrupt image", tmp_path / "cut.png")
    for bad in (0, -3, True):
        refused("limit must be a positive integer", tmp_path / "whole.png", limit=bad)
    refused("suffix only applies", f"{tmp_path / 'junk'}:train")
    np.savez(tmp_path / "junk" / "a.npz", x=rand_images(1))
    refused("both .npz shards and image files", tmp_path / "junk")


def test_permission_denied(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "secret.png"
    Image.fromarray(rand_images(1)[0]).save(path)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data, "open", deny, raising=False)
    refused("secret.png: permission denied", path)
    monkeypatch.undo()
    path.chmod(0)
    try:
        try:
            open(path, "rb").close()
        except PermissionError:
            refused("secret.png: permission denied", path)
        # (running as root: the file stays readable and the monkeypatched check above covers it)
    finally:
        path.chmod(0o644)


def test_rgba_refused_then_converted(tmp_path: Path) -> None:
    rgba = rand_images(1, 8, 9)[0]
    rgba = np.concatenate([rgba, np.full((8, 9, 1), 77, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "kodim01.png")
    msg = refused("mode 'RGBA' \\(RGB with alpha\\) is not 8-bit RGB", tmp_path / "kodim01.png")
    assert "--convert" in msg and "alpha is dropped" in msg
    s = read_images(tmp_path / "kodim01.png", convert=True)
    np.testing.assert_array_equal(s.images[0], rgba[..., :3])
    assert any("alpha channel dropped" in n and "kodim01.png" in n for n in s.notes)


def test_grey_and_palette_converted(tmp_path: Path) -> None:
    grey = rand_images(1, 6, 7)[0][..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    refused("mode 'L' \\(8-bit greyscale\\)", tmp_path / "grey.png")
    s = read_images(tmp_path / "grey.png", convert=True)
    np.testing.assert_array_equal(s.images[0], np.repeat(grey[..., None], 3, axis=2))
    assert any("greyscale" in n for n in s.notes)

    palette = np.array([[10, 20, 30], [200, 100, 0], [0, 255, 128]], np.uint8)
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    p = Image.fromarray(index, "L").convert("P")
    p.putpalette(palette.flatten().tolist() + [0] * (768 - 9))
    p.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    refused("mode 'P' \\(palette\\)", tmp_path / "pal.png")
    np.testing.assert_array_equal(read_images(tmp_path / "pal.png", convert=True).images[0], palette[index])


def test_16bit_rgb_png_is_rounded_not_truncated(tmp_path: Path) -> None:
    v = np.array([[[0, 1000, 65535], [128, 129, 40000]], [[257 * 3, 385, 386], [65407, 65408, 32896]]], np.uint16)
    png16(tmp_path / "deep.png", v)
    assert Image.open(tmp_path / "deep.png").mode == "RGB"  # Pillow hides the 16 bits
    refused("deep.png: 16-bit RGB is not 8-bit RGB; pass --convert", tmp_path / "deep.png")
    s = read_images(tmp_path / "deep.png", convert=True)
    expected = np.round(v / 257).astype(np.uint8)
    assert not np.array_equal(expected, v >> 8)  # the chosen values tell rounding from truncation
    np.testing.assert_array_equal(s.images[0], expected)
    assert any("rounded to 8 bits (value/257)" in n for n in s.notes)

    rgba = np.concatenate([v, np.full((2, 2, 1), 1234, np.uint16)], axis=2)
    png16(tmp_path / "deep_alpha.png", rgba)
    s = read_images(tmp_path / "deep_alpha.png", convert=True)
    np.testing.assert_array_equal(s.images[0], expected)
    assert any("alpha channel dropped" in n for n in s.notes)


def test_16bit_greyscale_and_float(tmp_path: Path) -> None:
    g = np.array([[0, 1000, 65535], [128, 129, 40000]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    refused("mode 'I;16' \\(16-bit greyscale\\)", tmp_path / "g16.png")
    s = read_images(tmp_path / "g16.png", convert=True)
    np.testing.assert_array_equal(s.images[0], np.repeat(np.round(g / 257).astype(np.uint8)[..., None], 3, axis=2))
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
    refused("mode 'F'", tmp_path / "f.tif", convert=True)


# ------------------------------------------------------------------------- ImageSet


def test_imageset_basics() -> None:
    s = ImageSet([rand_images(1)[0]] * 2, ["a", "b"], np.array([1, 2]))
    assert len(s) == 2 and s.same_size() and s.as_array().shape == (2, 32, 32, 3) and s.notes == []
    with pytest.raises(ValueError):
        ImageSet([rand_images(1)[0]], ["a", "b"], None)


# ---------------------------------------------------------------------- real shards


def test_real_cifar10_test_shards() -> None:
    if not SHARED_TEST.is_dir():
        pytest.skip(f"../shared/data/cifar10 not present: {SHARED_TEST} is missing")
    s = read_images(SHARED_TEST)
    assert s.as_array().shape == (10000, 32, 32, 3)
    assert s.labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert s.names[0] == "cifar10_test_00000-04999.npz[0]" and s.names[-1] == "cifar10_test_05000-09999.npz[4999]"
    s = read_images(SHARED_TEST, limit=7)
    assert s.as_array().shape == (7, 32, 32, 3) and s.labels.tolist()[:5] == [3, 8, 8, 0, 6]
