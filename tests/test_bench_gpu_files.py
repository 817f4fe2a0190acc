"""bench.gpu_files: the files a GPU run brings back are decoded here and their pixels compared
with the GPU's; a mismatch is reported and fails the command (golden files stand in for the GPU's)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package

from bench import gpu_files  # noqa: E402
from diffcodec.codec import api  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_gpu_files_decodes_each_file_and_compares_the_gpu_pixels(tmp_path):
    shutil.copy(GOLDEN / "default_exact_progressive_k10_v5_cut.dfc", tmp_path / "gpu-photo.dfc")  # a lossy file
    shutil.copy(GOLDEN / "default_exact_progressive_k10_s6.dfc", tmp_path / "gpu-prog.dfc")  # a whole stream
    (tmp_path / "steps.txt").write_text("NVIDIA H100\nphoto-encode: rc 0, 12.0 s (limit 130 s)\n")
    decoded = api.decode((tmp_path / "gpu-photo.dfc").read_bytes(), device="cpu").images[0]
    Image.fromarray(decoded).save(tmp_path / "gpu-photo.png")
    out = tmp_path / "report.md"
    assert gpu_files.main([str(tmp_path), "--out", str(out), "--device-name", "NVIDIA H100"]) == 0
    text = out.read_text()
    assert "| gpu-photo.dfc |" in text and "| lossy | yes |" in text and "photo-encode: rc 0, 12.0 s" in text
    assert "| gpu-prog.dfc |" in text and "| yes | – |" in text and "gpu-k100.dfc" not in text.split("|---|")[-1]
    other = decoded.copy()
    other[0, 0, 0] ^= 1  # the GPU decoded another pixel: reported, and the command fails
    Image.fromarray(other).save(tmp_path / "gpu-photo.png")
    assert gpu_files.main([str(tmp_path), "--out", str(out)]) == 1
    assert "| lossy | **no** |" in out.read_text()
    assert gpu_files.main([str(tmp_path / "missing")]) == 2
