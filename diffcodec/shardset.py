"""A shard set: one encode's images in several ordinary `.dfc` files, and the index that names them.

    OUT.dfcset                   the index (JSON, below)
    OUT-00000-of-00004.dfc       shard 0 of 4: an ordinary .dfc file (it decodes alone too)
    ...

Shard i of S holds images [i N / S, (i + 1) N / S) of the N inputs (integer division:
contiguous, in input order, sizes differing by at most one). A shard's bytes depend only on
its images and the encode's settings, never on the process that wrote it or on how many
processes shared the work: ``torchrun --nproc-per-node P -m diffcodec encode ... --shards S``
writes the same files for every P (rank r codes the shards `distributed.shard` gives it).
Each shard is its own stream: a lossless shard pays its own bootstrap (the first few tiles
through the progressive codec), so fewer, larger shards cost fewer bits.

The index (UTF-8 JSON) lists the shards in order, with names relative to its folder:

    {"format": "diffcodec-shard-set", "version": 1, "num_images": N,
     "shards": [{"file": "OUT-00000-of-00004.dfc", "num_images": n_0, "bytes": b_0, "sha256": "..."}, ...]}

`decode` of a set checks every shard's size and SHA-256 against the index before any work,
then decodes them (shared out among ranks under torchrun) into one folder of PNGs.
The .dfc container format itself is unchanged (`codec.container`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffcodec import distributed
from diffcodec.errors import DiffcodecError

SUFFIX = ".dfcset"
FORMAT = "diffcodec-shard-set"
VERSION = 1


def is_shard_set(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(SUFFIX)


def shard_paths(index_path: str | os.PathLike, num_shards: int) -> list[str]:
    """The shards' file names beside the index: OUT.dfcset -> OUT-00000-of-0000S.dfc, ..."""
    index_path = os.fspath(index_path)
    if not is_shard_set(index_path):
        raise DiffcodecError(f"{index_path}: a shard set's index must end in {SUFFIX}")
    stem = index_path[: -len(SUFFIX)]
    return [f"{stem}-{i:05d}-of-{num_shards:05d}.dfc" for i in range(num_shards)]


def shard_ranges(num_images: int, num_shards: int) -> list[range]:
    """Shard i's images: [i N / S, (i + 1) N / S)."""
    if not 1 <= num_shards <= num_images:
        raise DiffcodecError(f"--shards {num_shards}: expected 1..{num_images} (one image at least per shard)")
    return [range(num_images * i // num_shards, num_images * (i + 1) // num_shards) for i in range(num_shards)]


@dataclass(frozen=True)
class ShardSet:
    index_path: str
    files: list[str]  # the shards' paths, in order
    num_images: list[int]  # per shard
    entries: list[dict[str, Any]]  # the index's shard entries (bytes, sha256)


def read_index(path: str | os.PathLike) -> ShardSet:
    """A set's index, validated (one-line DiffcodecError); the shards are not read."""
    from diffcodec.data import read_file_bytes

    path = os.fspath(path)
    try:
        index = json.loads(read_file_bytes(path).decode("utf-8"))
        shards = index["shards"]
        ok = index.get("format") == FORMAT and isinstance(shards, list) and shards
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise DiffcodecError(f"{path}: not a diffcodec shard-set index")
    if index.get("version") != VERSION:
        raise DiffcodecError(f"{path}: shard-set index version {index.get('version')!r}; this diffcodec reads {VERSION}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        files = [os.path.join(folder, str(s["file"])) for s in shards]
        counts = [int(s["num_images"]) for s in shards]
    except (KeyError, TypeError, ValueError):
        raise DiffcodecError(f"{path}: corrupt shard-set index (a shard entry lacks file or num_images)") from None
    return ShardSet(path, files, counts, list(shards))


def read_shard(shard_set: ShardSet, i: int) -> bytes:
    """Shard i's bytes, checked against the index's size and SHA-256."""
    from diffcodec.data import read_file_bytes

    entry = shard_set.entries[i]
    data = read_file_bytes(shard_set.files[i])
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise DiffcodecError(f"{shard_set.files[i]}: does not match its entry in {shard_set.index_path} "
                             "(size or SHA-256 differ: a shard of another set, or damaged)")
    return data


def index_payload(shards: Sequence[tuple[str, ShardSummary]]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "num_images": int(sum(s.num_images for _, s in shards)),
            "shards": [{"file": os.path.basename(f), "num_images": s.num_images, "bytes": s.file_bytes,
                        "sha256": s.sha256} for f, s in shards]}


# ------------------------------------------------------------------------------ encode


@dataclass(frozen=True)
class ShardSummary:
    """What the index and the report need of a shard's encoding (rank 0 gets these; the
    bytes stay in the shard file)."""

    num_images: int
    num_dims: int  # real dimensions (H x W x 3 summed)
    file_bytes: int
    sha256: str
    bound_bits: float  # the bound of the shard's images (nan when not computed)
    seconds: float  # coding wall time

    @staticmethod
    def of(result: Any) -> ShardSummary:
        """From an `api.LosslessEncoding` or `api.ProgressiveEncoding`."""
        bound = getattr(result, "bound", None)
        encoded = getattr(result, "encoded", None)  # progressive
        seconds = encoded.seconds.get("total", float("nan")) if encoded is not None else result.seconds
        return ShardSummary(len(result.header.images), int(result.num_dims), len(result.data),
                            hashlib.sha256(result.data).hexdigest(),
                            float(bound.total_bits.sum()) if bound is not None else float("nan"), float(seconds))


def encode_set(
    images: Sequence[np.ndarray], names: Sequence[str], *, index_path: str, num_shards: int,
    encode: Callable[[Sequence[np.ndarray], Sequence[str]], Any], force: bool = False,
    world: distributed.World = distributed.SINGLE,
) -> list[tuple[str, ShardSummary]] | None:
    """Encode ``images`` as a shard set: this rank codes its shards (`distributed.shard`) with
    ``encode(images, names)`` (`api.encode` with the settings bound; returns an encoding with
    ``.data``) and writes them; once every rank has finished, rank 0 writes the index and
    gets [(shard file, summary)] of all shards (None on other ranks). Nothing is written
    unless every output is free (or ``force``)."""
    from diffcodec.outputs import check_output_file, write_bytes_atomic

    files = shard_paths(index_path, num_shards)
    ranges = shard_ranges(len(images), num_shards)
    with distributed.stage(world):
        for f in [index_path, *files]:
            check_output_file(f, force=force)
    mine = []
    with distributed.stage(world):
        for i in distributed.shard(num_shards, world):
            result = encode([images[j] for j in ranges[i]], [names[j] for j in ranges[i]])
            write_bytes_atomic(files[i], result.data, force=force)
            mine.append((i, ShardSummary.of(result)))
    parts = distributed.gather(mine, world)
    if parts is None:
        return None
    done = dict(item for part in parts for item in part)
    shards = [(files[i], done[i]) for i in range(num_shards)]
    write_bytes_atomic(index_path, (json.dumps(index_payload(shards), indent=1) + "\n").encode(), force=force)
    return shards


def set_report(index_path: str, shards: list[tuple[str, ShardSummary]]) -> dict[str, Any]:
    """The encode report of a set: totals and one row per shard."""
    rows = [{"file": f, "num_images": s.num_images, "file_bytes": s.file_bytes, "num_dims": s.num_dims,
             "bits_per_dim": 8 * s.file_bytes / s.num_dims, "bound_bpd": s.bound_bits / s.num_dims,
             "sha256": s.sha256, "seconds": s.seconds} for f, s in shards]
    dims, size = sum(s.num_dims for _, s in shards), sum(s.file_bytes for _, s in shards)
    return {"output": index_path, "num_shards": len(rows), "num_images": sum(r["num_images"] for r in rows),
            "num_dims": dims, "file_bytes": size, "bits_per_dim": 8 * size / dims,
            "bound_bpd": sum(s.bound_bits for _, s in shards) / dims, "shards": rows}


def format_set_report(r: dict[str, Any]) -> str:
    bound = r["bound_bpd"]
    lines = [f"{r['output']}: {r['num_images']} image(s) in {r['num_shards']} shard(s), {r['file_bytes']:,} bytes, "
             f"{r['bits_per_dim']:.4f} bits/dim (all shards, headers included)"
             + (f"; bound {bound:.4f}" if not math.isnan(bound) else "")]
    lines += [f"  {s['file']}: {s['num_images']} image(s), {s['file_bytes']:,} bytes, {s['bits_per_dim']:.4f} bits/dim"
              for s in r["shards"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ decode


def decode_set(
    shard_set: ShardSet, output: str, *, decode: Callable[[bytes, str], Any], force: bool = False,
    lossy_ok: bool = False, world: distributed.World = distributed.SINGLE,
) -> list[str] | None:
    """Decode every shard of a set into the folder ``output`` (one PNG per image, named as a
    single file's decode names them, over the whole set); ``decode(data, where)`` is
    `api.decode` with the settings bound. Each rank decodes its shards; a damaged shard is
    refused, and so is one whose pixels are not verified unless it is a lossy file (a rate
    target, a cut) or ``lossy_ok`` (a progressive --upto). Rank 0 gets the
    PNG paths of all images (None on other ranks)."""
    from diffcodec.codec.api import ProgressiveDecoding, read_header
    from diffcodec.outputs import output_paths, write_png

    with distributed.stage(world):
        datas = {}
        names: list[str] = []
        for i, f in enumerate(shard_set.files):  # every shard checked before any work
            data = read_shard(shard_set, i)
            header = read_header(data, f)
            if len(header.images) != shard_set.num_images[i]:
                raise DiffcodecError(f"{f}: holds {len(header.images)} images; {shard_set.index_path} says "
                                     f"{shard_set.num_images[i]}")
            names += [im.name for im in header.images]
            datas[i] = data
        if output.lower().endswith(".png") and len(names) > 1:
            raise DiffcodecError(f"{output}: the set holds {len(names)} images; give a directory for -o")
        targets = output_paths(output, names, force=force)
    starts = np.cumsum([0, *shard_set.num_images])
    with distributed.stage(world):
        if len(targets) > 1 or not output.lower().endswith(".png"):
            Path(output).mkdir(parents=True, exist_ok=True)
        for i in distributed.shard(len(shard_set.files), world):
            r = decode(datas[i], shard_set.files[i])
            if isinstance(r, ProgressiveDecoding) and r.damage:
                raise DiffcodecError(f"{shard_set.files[i]}: the file is damaged ({r.damage})")
            lossy_file = isinstance(r, ProgressiveDecoding) and r.stages == r.file_stages < r.num_stages
            if isinstance(r, ProgressiveDecoding) and not r.verified and not lossy_ok and not lossy_file:
                raise DiffcodecError(f"{shard_set.files[i]}: the lossless stage did not reproduce the encoded pixels "
                                     "(checksum mismatch); --upto writes the lossy reconstructions")
            for target, image in zip(targets[starts[i] : starts[i + 1]], r.images):
                write_png(target, image, force=force)
    return targets if world.is_main else None
