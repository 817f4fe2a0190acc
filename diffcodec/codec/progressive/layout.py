"""Where a progressive stream can be cut: its checked stage boundaries, from the symbols alone.

A stage arrives with its group (`syntax`: the stages up to the check that closes the group),
so a file can end only at a group's end (every stage, in a stream without checks) or after
its pixel stage. `stream_layout` reads a payload's stage symbols once (two padded decoders,
`syntax.TwinReader`: no network call, so any machine reads them), then codes them again to
learn which stages close a group and where the coder's output stood after each (the hints
`syntax.shortest_prefixes` starts from), and finds each boundary's shortest prefix. The pixel
stage needs the network's parameters: a whole stream's last boundary is its end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffcodec.codec.entropy import RangeEncoder
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.codec.progressive.syntax import (
    Syntax,
    TwinReader,
    pad_words,
    read_stages,
    shortest_prefixes,
    write_stage,
)


def group_hints(size_hints: np.ndarray, closes: np.ndarray, params: ProgressiveParams) -> np.ndarray:
    """Where to look first for each stage's shortest prefix (`shortest_prefixes`): the coder's
    output after the stage, or with checks after its group's end (a stage arrives with its
    group). ``size_hints`` [n], ``closes`` [n or n - 1]: the last stage ends a group."""
    hints = np.asarray(size_hints, dtype=np.int64).copy()
    if params.check_bits:
        for k in range(len(hints) - 2, -1, -1):
            hints[k] = hints[k] if closes[k] else hints[k + 1]
    return hints


@dataclass(frozen=True)
class StreamLayout:
    """The checked stage boundaries a payload holds, and how reading its stages ended."""

    boundaries: list[tuple[int, int]]  # (stages a prefix delivers, its payload bits), in order; latent stages only
    stages: int  # latent stages (0 .. K) the payload delivers, verified by their checks
    stop: str  # `syntax.StageRun.stop`: "complete" (all K), "limit", "end" (the payload ran out), "check"
    stop_stage: int  # where ("end" / "check")


def stream_layout(payload: bytes, params: ProgressiveParams, num_dims: int, limit: int | None = None) -> StreamLayout:
    """The boundaries of stages 0 .. limit - 1 (at most K, the latent stages) that ``payload`` holds."""
    limit = params.num_steps if limit is None else min(limit, params.num_steps)
    run = read_stages(TwinReader(payload, 8 * len(payload), pad_words(params, num_dims)), Syntax(params, num_dims),
                      limit)
    enc, syntax = RangeEncoder(), Syntax(params, num_dims)
    closes, hints = [], []
    for symbols in run.stages:
        closes.append(write_stage(enc, syntax, symbols))
        hints.append(32 * enc.num_words)
    n = len(run.stages)
    if not n:
        return StreamLayout([], 0, run.stop, run.at_stage)
    prefix = shortest_prefixes(payload, params, num_dims, None, group_hints(np.array(hints), np.array(closes), params),
                               num_stages=n)
    ends = [k for k in range(n) if closes[k] or not params.check_bits]
    return StreamLayout([(k + 1, int(prefix[k])) for k in ends], n, run.stop, run.at_stage)
