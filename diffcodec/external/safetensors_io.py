"""A reader for the safetensors format (no code runs from the file, no dependency).

Layout: 8 bytes little-endian N, then N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the tensors' raw little-endian
bytes, offsets relative to the end of the JSON.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from diffcodec.errors import DiffcodecError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (CPU); a malformed file is a one-line DiffcodecError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DiffcodecError(f"{path}: cannot read ({e.strerror})") from None

    def bad(why: str) -> DiffcodecError:
        return DiffcodecError(f"{path}: not a valid safetensors file ({why})")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise bad(f"header length {n} exceeds the file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} has no valid dtype, shape and data_offsets") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(body) or end - begin != itemsize * int(
                np.prod(shape, dtype=np.int64)):
            raise bad(f"entry {name!r}: shape {shape} and offsets [{begin}, {end}] do not fit")
        raw = bytearray(body[begin:end])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(shape)
    return tensors
