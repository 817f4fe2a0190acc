"""JSON from others' files (diffusers configs, safetensors headers), read so that no file can
crash or exhaust the reader.

At most ``MAX_JSON_BYTES`` (a diffusers config is 1-2 kB, a UNet's safetensors header ~50 kB);
strict UTF-8; standard JSON only (``NaN`` / ``Infinity`` refused); no repeated key (which a
reader would otherwise resolve silently, the last one winning). Every failure of the parser,
nesting too deep for Python's recursion and an integer beyond Python's 4300-digit limit
included, is a one-line `DiffcodecError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffcodec.errors import DiffcodecError

MAX_JSON_BYTES = 4 << 20


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {show_json(key)} appears twice")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, where: str | Path) -> Any:
    """The JSON value of ``data``; anything else is a one-line DiffcodecError naming ``where``."""
    if len(data) > MAX_JSON_BYTES:
        raise DiffcodecError(f"{where}: more than {MAX_JSON_BYTES:,} bytes of JSON (a config or a header is a few kB)")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_object_without_repeats,
                          parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise DiffcodecError(f"{where}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise DiffcodecError(f"{where}: not valid JSON (nested too deeply to read)") from None
    except ValueError as e:  # JSONDecodeError, a repeated key, NaN, an integer of over 4300 digits
        raise DiffcodecError(f"{where}: not valid JSON ({str(e).splitlines()[0][:100]})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path`` (read up to ``MAX_JSON_BYTES`` + 1 bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise DiffcodecError(f"{path}: cannot read ({e.strerror or e})") from None
    value = parse_json(data, path)
    if not isinstance(value, dict):
        raise DiffcodecError(f"{path}: not a JSON object")
    return value


def show_json(value: Any, width: int = 60) -> str:
    """A JSON value for a one-line message, cut to ``width`` characters."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError, TypeError):
        text = f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= width else text[:width - 3] + "..."
