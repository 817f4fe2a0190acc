"""README.md: its Python example runs, its two commands are the ones CI runs, its links resolve."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcodec.codec import api
from diffcodec.codec.rate import psnr_db

from conftest import as_loaded, seeded_model, synthetic_images

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_python_example_runs(tmp_path, monkeypatch):
    """The README's ```python block, executed as written in a folder holding an img.png. To keep
    CI fast the codec runs a tiny seeded model on a short chain (6 steps, 4-bit chunks) in place
    of the embedded model's defaults (50 steps, 14-bit chunks, minutes on a CPU): the calls, their
    arguments and what they return are the example's."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) == 5
    torch.set_num_threads(1)
    tiny = as_loaded(*seeded_model(3))
    monkeypatch.setattr(api, "encode", functools.partial(api.encode, model=tiny, steps=6, chunk_bits=4.0,
                                                         device="cpu"))
    monkeypatch.setattr(api, "decode", functools.partial(api.decode, model=tiny, device="cpu"))
    image = synthetic_images([(30, 40)], seed=4)[0]
    Image.fromarray(image).save(tmp_path / "img.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    back, small = namespace["back"], namespace["small"]
    assert back.shape == image.shape and back.dtype == np.uint8
    assert psnr_db(back, image) >= 35 and small.psnr[0] == psnr_db(back, image)
    assert small.target is not None and str(small.target) == "--psnr 35"


def test_the_two_commands_are_the_ones_ci_runs():
    commands = [line.strip() for line in README.splitlines() if line.startswith("    python3 -m venv")]
    assert len(commands) == 2, commands
    main, tests = commands
    assert "diffcodec nll" in main and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci], ".ci/run must call the README's test command verbatim"


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md", "reports/results.md"])
def test_relative_links_point_at_files_that_exist(doc):
    text = (ROOT / doc).read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, doc
    missing = [link for link in local if not (ROOT / doc).parent.joinpath(link).exists()]
    assert not missing, f"{doc}: {missing}"
