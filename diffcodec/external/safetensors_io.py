"""safetensors files read with the ``safetensors`` library (no code runs from the file), its
errors as one-line `DiffcodecError`s.

Layout: 8 bytes little-endian N, then N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the tensors' raw bytes. The
library checks it (integer shapes and offsets; no element count that overflows; offsets that
tile the data exactly: no overlap, no gap, nothing after). What it lets through is refused
here: a repeated tensor name (its JSON parser keeps the last one) and a header of more than
`json_io.MAX_JSON_BYTES`. `read_header` gives the names, dtypes and shapes without reading
any tensor, so a caller compares them with what it expects first.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from diffcodec.errors import DiffcodecError
from diffcodec.external.json_io import MAX_JSON_BYTES, parse_json


def _invalid(path: Path, why: str) -> DiffcodecError:
    return DiffcodecError(f"{path}: not a valid safetensors file ({why})")


def _library_error(path: Path, e: Exception) -> DiffcodecError:
    text = str(e).strip().splitlines()
    why = text[0] if text else type(e).__name__
    return _invalid(path, why.removeprefix("Error while deserializing header: ")[:120])


def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype as the file names it, e.g. "F32"; shape)} of a .safetensors file, checked
    by the library and for repeated names; no tensor is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(8)
            if len(start) < 8:
                raise _invalid(path, "shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", start)
            if n > MAX_JSON_BYTES:
                raise _invalid(path, f"a header of {n:,} bytes; diffcodec reads up to {MAX_JSON_BYTES:,}")
            header = f.read(n)
    except OSError as e:
        raise DiffcodecError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                       for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, and OSError / KeyError from some versions
        raise _library_error(path, e) from None
    try:
        parse_json(header, path)  # the library keeps the last of repeated names: refuse them
    except DiffcodecError as e:
        raise _invalid(path, str(e).removeprefix(f"{path}: ")) from None
    return entries


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (CPU), after `read_header`'s checks."""
    path = Path(path)
    read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - a dtype this torch lacks, a file changed since
        raise _library_error(path, e) from None
