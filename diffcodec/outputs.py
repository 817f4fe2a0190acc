"""Writing results: files written atomically and never overwritten silently, decoded PNGs.

`check_output_file` and `output_paths` refuse a bad output path before any work is done
(an existing file without ``force``, a missing directory, a directory where a file is
wanted); `write_bytes_atomic` writes through a temporary file in the same directory.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffcodec.data import IMAGE_SUFFIXES
from diffcodec.errors import DiffcodecError, one_line
from diffcodec.images import check_hwc


def check_output_file(path: str | os.PathLike, *, force: bool = False) -> None:
    """Refuse, before any work, an output file that cannot or must not be written."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise DiffcodecError(f"{target}: is a directory")
    if not force and os.path.lexists(target):
        raise DiffcodecError(f"{target}: already exists; pass --force to overwrite it")
    if not os.path.isdir(directory):
        raise DiffcodecError(f"{target}: directory {directory} does not exist")


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, so a failure
    never leaves a partial file. Refuses (DiffcodecError) to overwrite unless ``force``."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    check_output_file(target, force=force)
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic "create if absent"
            except FileExistsError:
                raise DiffcodecError(f"{target}: already exists; pass --force to overwrite it") from None
            except OSError:  # no hard links on this file system
                os.replace(tmp, target)
    except OSError as e:
        raise DiffcodecError(f"{target}: cannot write ({e.strerror or one_line(e)})") from None
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_png(path: str | os.PathLike, img: np.ndarray, *, force: bool = False) -> None:
    """Write uint8 [H, W, 3] as PNG with ``write_bytes_atomic`` (no overwrite unless ``force``)."""
    check_hwc(img, "write_png")
    buffer = io.BytesIO()
    try:
        Image.fromarray(np.ascontiguousarray(img)).save(buffer, format="PNG")
    except OSError as e:
        raise DiffcodecError(f"{os.fspath(path)}: cannot write ({e.strerror or one_line(e)})") from None
    write_bytes_atomic(path, buffer.getvalue(), force=force)


def _safe_stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base.lower().endswith(tuple(IMAGE_SUFFIXES)):
        base = base.rsplit(".", 1)[0]
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in base).strip("._")
    return cleaned[:120]


def output_paths(out: str | os.PathLike, names: Sequence[str], *, force: bool = False) -> list[str]:
    """Where decoded images go: OUT itself for one image when OUT ends in .png, else one PNG
    per image in the directory OUT, named from the stored names (the index when names are
    missing or collide). Refuses existing files unless ``force``; creates nothing."""
    out = os.fspath(out)
    n = len(names)
    if out.lower().endswith(".png"):
        if n != 1:
            raise DiffcodecError(f"{out}: the file holds {n} images; give a directory for -o")
        check_output_file(out, force=force)
        targets = [out]
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            raise DiffcodecError(f"{out}: exists and is not a directory")
        stems = [_safe_stem(name) for name in names]
        if any(not s for s in stems) or len(set(stems)) != n:
            stems = [f"{i:05d}" + (f"_{s}" if s else "") for i, s in enumerate(stems)]
        targets = [os.path.join(out, f"{s}.png") for s in stems]
    if not force:
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise DiffcodecError(f"{existing[0]}: already exists{more}; pass --force to overwrite")
    return targets
