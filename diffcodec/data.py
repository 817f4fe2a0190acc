"""Reading images for the evaluator and the codecs (tiling: `images`; writing: `outputs`).

One concept, every input layout, hence its length (about 480 lines): each source below has
its own reader and its own one-line refusals.

Every image comes out as a numpy ``uint8`` array ``[H, W, 3]`` in RGB order. Anything
wrong with the user's input raises `DiffcodecError` with a one-line message naming the
file; parser exceptions from Pillow, pickle, numpy, zipfile or tarfile never escape.

Sources understood by `read_images` (checked in this order):

* ``X.npz`` with ``x`` uint8 ``[N, H, W, 3]`` and optional ``y`` ``[N]`` (the project's
  shards, e.g. ``cifar10_test_00000-04999.npz``), or a directory of such shards.
* The official CIFAR-10 python distribution: the ``cifar-10-batches-py`` directory, one
  batch file (``test_batch``, ``data_batch_1``..``5``), or ``cifar-10-python.tar.gz``.
* A directory of image files, or one image file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffcodec.errors import DiffcodecError, one_line

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})
CIFAR_TEST = "test_batch"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_NAMES = frozenset((CIFAR_TEST, *CIFAR_TRAIN))
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_MAX_MEMBER_BYTES = 1 << 29  # a CIFAR batch is ~31 MB; refuse absurd archive members


@dataclass(frozen=True)
class ImageSet:
    """Images (each uint8 [H, W, 3] RGB) with one name each, labels int64 [N] or None, and
    human-readable notes about anything changed while reading (e.g. alpha dropped)."""

    images: list[np.ndarray]
    names: list[str]
    labels: np.ndarray | None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.names):
            raise ValueError("ImageSet: images and names differ in length")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError("ImageSet: images and labels differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def same_size(self) -> bool:
        """True when every image has the same [H, W, 3] shape."""
        return len({im.shape for im in self.images}) <= 1

    def as_array(self) -> np.ndarray:
        """All images stacked: uint8 [N, H, W, 3]; DiffcodecError if their sizes differ."""
        if not self.images:
            raise DiffcodecError("no images to stack")
        if not self.same_size():
            sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in self.images})
            raise DiffcodecError(
                f"images have different sizes ({', '.join(sizes[:4])}{', ...' if len(sizes) > 4 else ''}); "
                "they cannot be stacked into one array"
            )
        return np.stack(self.images)


def read_images(path: str | os.PathLike, *, limit: int | None = None, convert: bool = False) -> ImageSet:
    """Read the images at `path`: an .npz shard, a directory of shards, CIFAR-10 python
    batches (directory, single batch file or .tar.gz archive), a directory of image files
    (sorted by name, sizes may differ) or one image file.

    CIFAR-10 split: append ``:test`` or ``:train`` to a directory or archive path
    (``cifar-10-batches-py:train``); train is data_batch_1..5 in order. Without a suffix
    a directory gives ``test_batch`` when it has one (else its data batches) and an archive
    gives ``test_batch``. `limit` keeps the first `limit` images and stops reading there.
    `convert` turns non-RGB images into 8-bit RGB (alpha dropped, 16-bit rounded as
    value/257), recording what it did in ``ImageSet.notes``; without it they are refused.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DiffcodecError(f"limit must be a positive integer, got {limit!r}")
    raw = os.fspath(path)
    split = None
    if not os.path.exists(raw):
        m = re.fullmatch(r"(.+):(test|train)", raw)
        if m is None or not os.path.exists(m.group(1)):
            raise DiffcodecError(f"{raw}: no such file or directory")
        raw, split = m.group(1), m.group(2)
    out = _Collector(limit)
    if os.path.isdir(raw):
        _read_dir(raw, split, convert, out)
    else:
        _read_file(raw, split, convert, out)
    if not out.images:
        raise DiffcodecError(f"{raw}: holds no images")
    return out.finish()


class _Collector:
    """Accumulates images up to `limit`, labels while every source has them, and notes."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.images: list[np.ndarray] = []
        self.names: list[str] = []
        self.labels: list[np.ndarray] | None = []
        self._notes: dict[str, list[str]] = {}

    def full(self) -> bool:
        return self.limit is not None and len(self.images) >= self.limit

    def add(self, images: np.ndarray | list[np.ndarray], names: list[str], labels: np.ndarray | None) -> None:
        keep = len(names) if self.limit is None else min(len(names), self.limit - len(self.images))
        self.images.extend(images[i] for i in range(keep))
        self.names.extend(names[:keep])
        if labels is None:
            if self.labels:
                self.note("labels dropped because some sources have none", names[0])
            self.labels = None
        elif self.labels is not None:
            self.labels.append(np.asarray(labels[:keep], dtype=np.int64))

    def note(self, message: str, name: str) -> None:
        self._notes.setdefault(message, []).append(name)

    def finish(self) -> ImageSet:
        notes = []
        for message, names in self._notes.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            notes.append(f"{shown}: {message}")
        labels = np.concatenate(self.labels) if self.labels else None
        return ImageSet(self.images, self.names, labels, notes)


def _open(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DiffcodecError(f"{path}: no such file or directory") from None
    except IsADirectoryError:
        raise DiffcodecError(f"{path}: is a directory") from None
    except PermissionError:
        raise DiffcodecError(f"{path}: permission denied") from None
    except OSError as e:
        raise DiffcodecError(f"{path}: cannot open ({e.strerror or one_line(e)})") from None


def read_file_bytes(path: str | os.PathLike, n: int = -1) -> bytes:
    """The first ``n`` bytes of a file (all when -1); one-line DiffcodecError when it cannot be read."""
    path = os.fspath(path)
    with _open(path) as f:
        try:
            return f.read(n)
        except OSError as e:
            raise DiffcodecError(f"{path}: cannot read ({e.strerror or one_line(e)})") from None


def _no_split(path: str, split: str | None) -> None:
    if split is not None:
        raise DiffcodecError(f"{path}: the ':{split}' suffix only applies to CIFAR-10 python batches")


def _read_dir(path: str, split: str | None, convert: bool, out: _Collector) -> None:
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise DiffcodecError(f"{path}: cannot list directory ({e.strerror or one_line(e)})") from None
    files = [n for n in entries if os.path.isfile(os.path.join(path, n))]
    cifar = {n: os.path.join(path, n) for n in files if n in _CIFAR_NAMES}
    if not cifar and os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        return _read_dir(os.path.join(path, "cifar-10-batches-py"), split, convert, out)
    if cifar:
        openers = {n: (lambda p=p: read_file_bytes(p)) for n, p in cifar.items()}
        return _read_cifar(path, openers, split, out, default_train=CIFAR_TEST not in cifar)
    _no_split(path, split)
    shards = [n for n in files if n.lower().endswith(".npz")]
    pictures = [n for n in files if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    if shards and pictures:
        raise DiffcodecError(f"{path}: holds both .npz shards and image files; point at one kind")
    if not shards and not pictures:
        what = "is empty" if not entries else "holds no .npz shards, CIFAR-10 batches or image files"
        raise DiffcodecError(f"{path}: directory {what}")
    for name in shards or pictures:
        if out.full():
            break
        file = os.path.join(path, name)
        if shards:
            _read_npz(file, out)
        else:
            out.add([_read_image(file, name, convert, out)], [name], None)


def _read_file(path: str, split: str | None, convert: bool, out: _Collector) -> None:
    name = os.path.basename(path)
    head = read_file_bytes(path, 8)
    if not head:
        raise DiffcodecError(f"{path}: empty file")
    if name.lower().endswith(_ARCHIVE_SUFFIXES) or head[:2] == b"\x1f\x8b":
        return _read_cifar_archive(path, split, out)
    _no_split(path, split)
    if name.lower().endswith(".npz") or head[:4] == b"PK\x03\x04":
        return _read_npz(path, out)
    if name in _CIFAR_NAMES or head[:1] == b"\x80":  # \x80 = pickle protocol >= 2
        images, labels = _load_cifar_batch(read_file_bytes(path), path)
        return out.add(images, [f"{name}[{i}]" for i in range(len(images))], labels)
    out.add([_read_image(path, name, convert, out)], [name], None)


# ----------------------------------------------------------------------------- npz


def _read_npz(path: str, out: _Collector) -> None:
    """Shard with x uint8 [N, H, W, 3] and optional y [N]."""
    name = os.path.basename(path)
    with _open(path) as f:
        try:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                raise DiffcodecError(f"{path}: is a single .npy array, not an .npz with key 'x'")
            with loaded as z:
                if "x" not in z.files:
                    raise DiffcodecError(f"{path}: .npz has no key 'x' (keys: {', '.join(z.files) or 'none'})")
                x = z["x"]
                y = z["y"] if "y" in z.files else None
        except DiffcodecError:
            raise
        except Exception as e:
            raise DiffcodecError(f"{path}: not a readable .npz file ({one_line(e)})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or 0 in x.shape:
        raise DiffcodecError(f"{path}: 'x' is {x.dtype} {list(x.shape)}, expected uint8 [N, H, W, 3]")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise DiffcodecError(f"{path}: 'y' is {y.dtype} {list(y.shape)}, expected integers [{len(x)}]")
    out.add(x, [f"{name}[{i}]" for i in range(len(x))], y)


# --------------------------------------------------------------------------- CIFAR-10


def _only_latin1(text: Any, encoding: Any) -> bytes:
    """Python 3 protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise pickle.UnpicklingError("unexpected bytes() call")
    return b""


_PROBE = np.zeros(1, np.uint8)
_PICKLE_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _PROBE.__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): _PROBE.__reduce__()[0],
    ("numpy.core.numeric", "_frombuffer"): _PROBE.__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): _PROBE.__reduce_ex__(5)[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _only_latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can build nothing but dicts, lists, bytes, numbers and numpy arrays."""

    def __init__(self, file: IO[bytes], display: str) -> None:
        super().__init__(file, encoding="bytes")
        self.display = display

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DiffcodecError(
                f"{self.display}: pickle refers to {module}.{name}, which a CIFAR-10 batch never needs; "
                "refusing to load it"
            ) from None


def _load_cifar_batch(blob: bytes, display: str) -> tuple[np.ndarray, np.ndarray]:
    """Pickled CIFAR-10 batch -> (uint8 [N, 32, 32, 3] HWC, int64 [N])."""
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), display).load()
    except DiffcodecError:
        raise
    except Exception as e:
        raise DiffcodecError(f"{display}: corrupt or unreadable pickle ({one_line(e)})") from None
    bad = f"{display}: not a CIFAR-10 batch"
    if not isinstance(obj, dict):
        raise DiffcodecError(f"{bad} (pickle holds {type(obj).__name__}, expected a dict)")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DiffcodecError(f"{bad} ('data' is {got}, expected uint8 [N, 3072])")
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.asarray(None)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DiffcodecError(f"{bad} ('labels' is missing or not {len(data)} integers)")
    # channel-major rows: 1024 R, 1024 G, 1024 B, each 32x32 row-major
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _read_cifar(
    source: str,
    readers: dict[str, Callable[[], bytes]],
    split: str | None,
    out: _Collector,
    *,
    default_train: bool = False,
) -> None:
    """Read the requested split from {batch name: function returning its bytes}."""
    if split is None:
        split = "train" if default_train else "test"
        if split == "test" and any(b in readers for b in CIFAR_TRAIN):
            out.note(f"no split given, read {CIFAR_TEST} (append ':train' for data_batch_1..5)", source)
    wanted = [CIFAR_TEST] if split == "test" else list(CIFAR_TRAIN)
    present = [b for b in wanted if b in readers]
    if not present:
        names = CIFAR_TEST if split == "test" else "data_batch_1..5"
        raise DiffcodecError(f"{source}: has no {names} for the {split} split")
    if split == "train" and len(present) < len(CIFAR_TRAIN):
        out.note(f"train split is partial, only {', '.join(present)} present", source)
    for batch in present:
        if out.full():
            break
        images, labels = _load_cifar_batch(readers[batch](), f"{source}/{batch}")
        out.add(images, [f"{batch}[{i}]" for i in range(len(images))], labels)


def _read_cifar_archive(path: str, split: str | None, out: _Collector) -> None:
    """cifar-10-python.tar.gz: read members into memory (in archive order) without extracting."""
    wanted = [CIFAR_TEST] if split in (None, "test") else list(CIFAR_TRAIN)
    blobs: dict[str, bytes] = {}
    with _open(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted and base not in blobs:
                        if member.size > _MAX_MEMBER_BYTES:
                            raise DiffcodecError(f"{path}: member {member.name} is too large for a CIFAR-10 batch")
                        blobs[base] = tar.extractfile(member).read()  # type: ignore[union-attr]
                        if all(b in blobs for b in wanted):
                            break
        except DiffcodecError:
            raise
        except Exception as e:
            raise DiffcodecError(f"{path}: not a readable tar archive ({one_line(e)})") from None
    if not blobs:
        hint = "" if split else " (append ':train' for data_batch_1..5)"
        raise DiffcodecError(f"{path}: archive holds no CIFAR-10 python batches for the {split or 'test'} split{hint}")
    readers = {name: (lambda b=blob: b) for name, blob in blobs.items()}
    _read_cifar(path, readers, split or "test", out)


# ----------------------------------------------------------------------------- images

_MODE_DESCRIPTIONS = {
    "1": "1-bit black and white", "L": "8-bit greyscale", "LA": "greyscale with alpha",
    "La": "greyscale with premultiplied alpha", "P": "palette", "PA": "palette with alpha",
    "RGBA": "RGB with alpha", "RGBa": "RGB with premultiplied alpha", "RGBX": "RGB with padding",
    "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "CIE L*a*b*", "HSV": "HSV",
    "I": "32-bit integer greyscale", "I;16": "16-bit greyscale", "I;16B": "16-bit greyscale",
    "I;16L": "16-bit greyscale", "I;16N": "16-bit greyscale", "F": "32-bit float greyscale",
}
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_RAW16 = re.compile(r";16([BLN]?)$")


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode before load(), e.g. 'RGB;16B' for a 16-bit RGB PNG."""
    args = img.tile[0][3] if img.tile else None
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


def _decode(data: bytes, display: str, rawmode: str | None = None) -> tuple[Image.Image, str]:
    """Decode fully (img.load()); optionally force a different raw mode on every tile."""
    try:
        img = Image.open(io.BytesIO(data))
        original = _rawmode(img)
        if rawmode is not None:
            tiles = []
            for t in img.tile:
                args = rawmode if isinstance(t[3], str) else (rawmode, *t[3][1:])
                tiles.append(t._replace(args=args) if hasattr(t, "_replace") else (*t[:3], args))
            img.tile = tiles
        img.load()
    except UnidentifiedImageError:
        raise DiffcodecError(f"{display}: not an image file (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise DiffcodecError(f"{display}: {one_line(e)}") from None
    except Exception as e:
        raise DiffcodecError(f"{display}: truncated or corrupt image ({one_line(e)})") from None
    return img, original


def _low_bytes(data: bytes, display: str, rawmode: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Pillow keeps only the high byte of 16-bit RGB/RGBA/LA; decode again with the byte order
    swapped to get the low byte. None if Pillow cannot do that for this file."""
    order = _RAW16.search(rawmode).group(1)  # type: ignore[union-attr]
    if order == "N":
        order = "L" if sys.byteorder == "little" else "B"
    if order not in ("B", "L"):
        return None
    try:
        img, _ = _decode(data, display, rawmode[:-1] + ("L" if order == "B" else "B"))
        low = np.asarray(img)
    except DiffcodecError:
        return None
    return low if low.shape == shape and low.dtype == np.uint8 else None


def _read_image(path: str, name: str, convert: bool, out: _Collector) -> np.ndarray:
    """One image file -> uint8 [H, W, 3] RGB, converting (with a note) or refusing other modes."""
    data = read_file_bytes(path)
    img, rawmode = _decode(data, path)
    mode = img.mode
    wide = mode in ("RGB", "RGBA", "LA") and _RAW16.search(rawmode) is not None
    if getattr(img, "n_frames", 1) > 1:
        out.note("only the first frame was read", name)
    if mode == "RGB" and not wide:
        return np.asarray(img)
    alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info)
    if not convert:
        what = f"16-bit {mode}" if wide else f"mode {mode!r} ({_MODE_DESCRIPTIONS.get(mode, 'unusual mode')})"
        raise DiffcodecError(
            f"{path}: {what} is not 8-bit RGB; pass --convert to convert it"
            + (" (alpha is dropped)" if alpha else "")
            + (" (rounded to 8 bits)" if wide or mode.startswith("I") else "")
        )
    if alpha:
        out.note(f"alpha channel dropped ({mode} -> RGB)", name)
    if wide:
        high = np.asarray(img)
        low = _low_bytes(data, path, rawmode, high.shape)
        if low is None:
            out.note("16-bit channels truncated to their high byte (Pillow gives no low byte here)", name)
            arr = high
        else:
            out.note("16-bit channels rounded to 8 bits (value/257)", name)
            arr = ((high.astype(np.uint32) * 256 + low + 128) // 257).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3] if mode != "LA" else np.repeat(arr[..., :1], 3, axis=2))
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DiffcodecError(f"{path}: mode {mode!r} values outside 0..65535 cannot be reduced to 8 bits")
        out.note("16-bit greyscale rounded to 8 bits (value/257) and copied to R, G, B", name)
        return np.repeat((((values + 128) // 257).astype(np.uint8))[..., None], 3, axis=2)
    if mode == "F":
        raise DiffcodecError(f"{path}: mode 'F' (32-bit float greyscale) has no defined 8-bit scale; cannot convert it")
    if mode in ("L", "1"):
        out.note(f"greyscale ({mode}) copied to R, G, B: the model codes 3 channels, so a file costs about 3x "
                 "what one gray channel would; compare bits per pixel (printed) with the gray original", name)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        out.note(f"{mode} converted to RGB by Pillow (no colour management)", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(img.convert("RGB"))
    except Exception as e:
        raise DiffcodecError(f"{path}: cannot convert mode {mode!r} to RGB ({one_line(e)})") from None
