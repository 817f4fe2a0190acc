"""diffcodec.codec.api: both modes through one encode / decode, checks before any work,
progress phases, refusal of files another model wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcodec.codec import api
from diffcodec.codec.container import MODE_BITSBACK, MODE_PROGRESSIVE
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError

from conftest import as_loaded, seeded_model, synthetic_images


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield as_loaded(*seeded_model(0))
    torch.set_num_threads(before)


def test_both_modes_round_trip_through_one_api_with_progress(model):
    images = synthetic_images([(32, 32), (20, 40)], seed=3)  # 1 + 2 tiles
    calls = []
    lossless = api.encode(images, ["a", "b"], model=model, steps=3, float64=True, bootstrap=False,
                          progress=lambda *c: calls.append(c))
    assert isinstance(lossless, api.LosslessEncoding) and api.read_header(lossless.data).mode == MODE_BITSBACK
    phases = {phase: (done, total) for phase, done, total in calls}
    assert phases["encode"] == (3 * 3, 3 * 3) and phases["bound"][0] == phases["bound"][1] > 0
    back = api.decode(lossless.data, model=model, device="cpu")
    assert back.names == ["a", "b"] and all(np.array_equal(x, y) for x, y in zip(back.images, images))
    assert lossless.bound_bpd > 0 and lossless.file_bpd > 0

    params = ProgressiveParams(num_steps=3, chunk_bits=6.0, log2_candidates=10, network_float64=True)
    progressive = api.encode(images, model=model, mode="progressive", progressive_params=params, workers=1,
                             float64=True)
    assert isinstance(progressive, api.ProgressiveEncoding)
    assert api.read_header(progressive.data).mode == MODE_PROGRESSIVE and progressive.header.num_steps == 3
    full = api.decode(progressive.data, model=model, device="cpu")
    assert full.verified and all(np.array_equal(x, y) for x, y in zip(full.images, images))
    part = api.decode(progressive.data, model=model, device="cpu", upto=2)
    assert not part.verified and part.stages == 2 and [im.shape for im in part.images] == [(32, 32, 3), (20, 40, 3)]
    with pytest.raises(DiffcodecError, match="apply to progressive files"):
        api.decode(lossless.data, model=model, device="cpu", upto=2)


def test_bad_requests_are_refused_before_any_network_call(model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(api, "network", no_network)
    monkeypatch.setattr(api.bitsback, "encode_stream", no_network)
    img = synthetic_images([(32, 32)])
    with pytest.raises(DiffcodecError, match="between 1 and T = 1000"):
        api.encode(img, model=model, mode="progressive", steps=100000)
    with pytest.raises(DiffcodecError, match="between 1 and T"):
        api.encode(img, model=model, steps=0)
    with pytest.raises(DiffcodecError, match="unknown mode"):
        api.encode(img, model=model, mode="lossy")
    with pytest.raises(DiffcodecError, match="out of range"):
        api.encode([np.zeros((1, 65537, 3), np.uint8)], model=model)
    with pytest.raises(DiffcodecError, match="no images"):
        api.encode([], model=model)
    with pytest.raises(DiffcodecError, match="uint8"):
        api.encode([np.zeros((8, 8, 3), np.float32)], model=model)


def test_a_file_is_refused_by_another_model(model):
    data = api.encode(synthetic_images([(32, 32)]), model=model, steps=2, float64=True, bootstrap=False,
                      compute_bound=False).data
    other = as_loaded(*seeded_model(1))
    with pytest.raises(DiffcodecError, match="encoded with model"):
        api.decode(data, model=other, device="cpu")
    learned = as_loaded(*seeded_model(0, learn_sigma=True))
    with pytest.raises(DiffcodecError):
        api.decode(data, model=learned, device="cpu")
