"""Reading torch-saved files without running code from them (``weights_only`` loading).

One rule for every file diffcodec loads with torch (checkpoints, training states, external
state dicts): plain containers and tensors only; anything else, a pickle that would build
another object or run code included, is one line naming the file and what was refused, with
torch's multi-line advice and terminal colour codes left out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from diffcodec.errors import DiffcodecError

# What torch's weights-only unpickler says of a pickle that builds objects (besides naming a
# GLOBAL): "refused". Anything else it cannot read (random bytes: "Unsupported operand 240")
# is "not a readable" file.
OBJECTS_REFUSED = ("Can only create new object", "Can only build", "call reduce for unrecognized function")


def load_plain(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a DiffcodecError (one line) when
    the file cannot be read that way. ``what`` names the file's kind in the message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise DiffcodecError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code, and many types for damaged files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if named or any(words in text for words in OBJECTS_REFUSED):
            raise DiffcodecError(f"{path}: refused: the {what} holds Python objects beyond plain weights, which "
                                 "loading would have to run" + (f" (it names {named.group(1)})" if named else "")
                                 ) from None
        # torch's advice first, then (for a pickle it cannot read) the unpickler's own words
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        first = detail.group(1).strip() if detail else lines[0] if lines else type(e).__name__
        raise DiffcodecError(f"{path}: not a readable {what} ({first[:120]})") from None
