"""bench.stream_versions end to end on the tiny model: stream versions 3, 4 and 5 code and verify
one image, the JSON and the markdown table hold each and its comparison with the first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import stream_versions  # noqa: E402


def test_stream_versions_bench_codes_both_versions(tmp_path, tiny_checkpoint):
    folder = tmp_path / "kodak"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / "a.png")
    out = tmp_path / "sv.json"
    assert stream_versions.main(["--cifar", "0", "--kodak", "a", "--kodak-dir", str(folder), "--crop", "32",
                                 "--steps", "3", "--versions", "3,4,5", "-c", str(tiny_checkpoint), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["shape"] == [32, 32, 3] and [r["version"] for r in row["versions"]] == [3, 4, 5]
    for r in row["versions"]:
        assert r["file_bytes"] > 0 and r["encode_seconds"] > 0 and r["decode_seconds"] > 0
    first = row["versions"][0]["file_bytes"]
    assert [c["versions"] for c in row["comparisons"]] == [[3, 4], [3, 5]]
    assert [c["bytes"] for c in row["comparisons"]] == [[first, r["file_bytes"]] for r in row["versions"][1:]]
    assert payload["params"]["pad_bits"] == {"3": 2.0, "4": 2.0, "5": 8.0}
    md = out.with_suffix(".md").read_text()
    assert "| a central 32x32 | 1 | 4 |" in md and "| a central 32x32 | 1 | 5 |" in md
    assert "a central 32x32, version 5 against 3" in md
