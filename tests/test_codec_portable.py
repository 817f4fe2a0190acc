"""Exact-contract files across machines: encode here, decode in a subprocess whose vector units
and thread count differ (standing in for another CPU), refuse early what would diverge.

The subprocess caps ATen's kernels (ATEN_CPU_CAPABILITY, which also makes `native` load the
SSE2 build of diffcodec's C kernels), oneDNN's (ONEDNN_MAX_CPU_ISA: for contract 2's int8
products, kernels without VNNI) and MKL's (MKL_ENABLE_INSTRUCTIONS) instruction sets and
runs another torch thread count than the encoder: what a laptop without AVX-512 would do. A float32 file of the same images does not
survive this (issue 15's report: "pixel checksum mismatch after decoding"); an exact one must
decode to the same bits, every progressive prefix included.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec.checkpoint import save_checkpoint
from diffcodec.codec import api
from diffcodec.codec.container import unpack
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError
from diffcodec.exact import CONTRACT_VERSION, CONTRACT_VERSIONS

from conftest import as_loaded, seeded_model, synthetic_images

REPO = Path(__file__).resolve().parents[1]
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
             "OMP_NUM_THREADS": "1"}
PARAMS = ProgressiveParams(num_steps=4, chunk_bits=6.0, log2_candidates=10, region_tiles=2)  # in regions of 2 tiles

# The subprocess: decode every file at the given bit counts, print what came out as JSON.
DECODER = """
import hashlib, json, sys, torch
from diffcodec.checkpoint import load_checkpoint
from diffcodec.codec import api
torch.set_num_threads(1)
model = load_checkpoint(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
for path, bits in json.loads(sys.argv[2]):
    data = open(path, "rb").read()
    r = api.decode(data, model=model, device="cpu", num_bits=bits)
    key = f"{path}@{bits}"
    out[key] = [hashlib.sha256(b"".join(im.tobytes() for im in r.images)).hexdigest(),
                getattr(r, "stages", None), getattr(r, "verified", True)]
print(json.dumps(out))
"""


def images_hash(images: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(im.tobytes() for im in images)).hexdigest()


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    model, mc, dc = seeded_model(3, learn_sigma=True)
    path = tmp_path_factory.mktemp("portable") / "seeded.pt"
    save_checkpoint(path, model, mc, dc, meta={"weights": "seeded"}, dtype=torch.float32)
    return as_loaded(model, mc, dc), path


@pytest.mark.parametrize("contract", CONTRACT_VERSIONS)
def test_exact_files_decode_bit_exactly_with_other_vector_units_and_threads(model_and_checkpoint, tmp_path, contract):
    """Lossless and progressive exact files of each contract version written here with 2
    torch threads decode in a subprocess with capped instruction sets and 1 thread to the
    same pixels, and every progressive prefix gives the same image and stage count there
    (the progressive stream in regions of 2 tiles: every region's plan and pools too)."""
    model, checkpoint = model_and_checkpoint
    images = synthetic_images([(32, 32), (20, 40)], seed=5)
    torch.set_num_threads(2)
    lossless = api.encode(images, model=model, steps=4, bootstrap=False, contract=contract)
    progressive = api.encode(images, model=model, mode="progressive", progressive_params=PARAMS, workers=1,
                             contract=contract)
    assert lossless.header.contract == progressive.header.contract == contract
    assert progressive.encoded.params.num_regions > 1  # a stream in regions
    (tmp_path / "l.dfc").write_bytes(lossless.data)
    (tmp_path / "p.dfc").write_bytes(progressive.data)
    total = 8 * len(progressive.data)
    header_bits = progressive.header_bits
    prefixes = sorted({int(b) for b in progressive.encoded.prefix_bits} | {total // 2, total - 8})
    jobs = [[str(tmp_path / "l.dfc"), None]] + [[str(tmp_path / "p.dfc"), header_bits + b] for b in prefixes
                                                if header_bits + b <= total] + [[str(tmp_path / "p.dfc"), None]]
    here = {}
    for path, bits in jobs:
        r = api.decode(Path(path).read_bytes(), model=model, device="cpu", num_bits=bits)
        here[f"{path}@{bits}"] = [images_hash(r.images), getattr(r, "stages", None), getattr(r, "verified", True)]
    env = {**os.environ, **OTHER_CPU, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DECODER, str(checkpoint), json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there.pop("capability") == "DEFAULT" and there.pop("threads") == 1
    assert there == here
    assert here[f"{tmp_path / 'l.dfc'}@None"][0] == images_hash(images)  # lossless, both sides
    assert here[f"{tmp_path / 'p.dfc'}@None"] == [images_hash(images), PARAMS.num_stages, True]
    assert len({v[1] for k, v in here.items() if "p.dfc" in k}) >= 3  # prefixes at several stages


def test_a_decoder_whose_arithmetic_differs_is_refused_before_decoding(model_and_checkpoint):
    """A decoder whose exact network does not reproduce the encoder's (simulated: one weight
    changed in memory, so the fingerprint still matches) is refused by the header's probe,
    before any stage or step is decoded; the message says why."""
    model, _ = model_and_checkpoint
    images = synthetic_images([(32, 32)], seed=6)
    for mode, kwargs in (("lossless", {"steps": 3, "bootstrap": False}),
                         ("progressive", {"progressive_params": PARAMS, "workers": 1})):
        data = api.encode(images, model=model, mode=mode, **kwargs).data
        perturbed = as_loaded(*seeded_model(3, learn_sigma=True))
        with torch.no_grad():
            perturbed.model.conv_in.weight[0, 0, 0, 0] += 1e-3
        calls = []
        with pytest.raises(DiffcodecError, match="refused before decoding.*probe"):
            api.decode(data, model=perturbed, device="cpu", progress=lambda *c: calls.append(c))
        assert calls == []


def test_a_file_of_a_newer_contract_is_refused_with_its_reason(model_and_checkpoint):
    """A contract version this diffcodec does not implement: one line naming it, no work."""
    model, _ = model_and_checkpoint
    data = bytearray(api.encode(synthetic_images([(32, 32)]), model=model, steps=2, bootstrap=False).data)
    version = CONTRACT_VERSION  # what this diffcodec writes: format 4 keeps it in bits 2-4 of byte 4
    assert unpack(bytes(data)).header.contract == version and data[4] >> 2 & 7 == version
    newer = max(CONTRACT_VERSIONS) + 1
    data[4] = data[4] & ~0x1C | newer << 2
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])) & 0xFFFFFFFF)
    with pytest.raises(DiffcodecError, match=f"contract version {newer} by a newer diffcodec"):
        api.decode(bytes(data), model=model, device="cpu")


def test_float_files_remain_available_and_say_so(model_and_checkpoint):
    """--float32 / --float64 still write (same-machine) files: contract byte 0, no probe; they
    decode here; the exact file of the same images is another stream."""
    model, _ = model_and_checkpoint
    images = synthetic_images([(32, 32)], seed=7)
    f64 = api.encode(images, model=model, steps=3, bootstrap=False, arithmetic="float64")
    ex = api.encode(images, model=model, steps=3, bootstrap=False)
    assert (f64.header.contract, f64.header.probe, f64.params.exact, f64.params.threads) == (0, b"", False, 0)
    assert ex.params.exact and ex.params.threads == 0 and ex.data != f64.data
    assert np.array_equal(api.decode(f64.data, model=model, device="cpu").images[0], images[0])
    with pytest.raises(DiffcodecError, match="unknown arithmetic"):
        api.encode(images, model=model, arithmetic="float16")
