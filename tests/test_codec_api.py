"""diffcodec.codec.api: both modes through one encode / decode, checks before any work,
progress phases, refusal of files another model wrote."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffcodec.checkpoint import LoadedModel
from diffcodec.codec import api
from diffcodec.codec.container import MODE_BITSBACK, MODE_PROGRESSIVE, Container, Header, ImageEntry, pack
from diffcodec.codec.probe import probe_digest
from diffcodec.codec.progressive.codec import Decoded
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError
from diffcodec.images import image_tiles, to_levels, to_model_input
from diffcodec.runtime import network

from conftest import as_loaded, seeded_model, synthetic_images


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield as_loaded(*seeded_model(0))
    torch.set_num_threads(before)


def test_a_lossless_job_is_one_progress_phase_that_ends_at_its_total():
    """`_LosslessJob`: 5 tiles, 2 through the bootstrap (50 latent stages and the pixel stage,
    which calls no network), 3 down a 4-step chain, the bound's 4 steps on batches of 2, 2 and
    1 tiles: one phase, counted in tile network calls, whose last call is the total."""
    calls = []
    stages = 50
    job = api._LosslessJob(lambda *c: calls.append(c), "encode", 5, 2, stages, 4, bound_batch=2)
    for stage in range(stages + 1):
        job.bootstrap_stage(stage)
    for _ in range(4):
        job.chain_step(3)
    for _ in range(3 * 4):
        job.bound_step()
    total = 2 * stages + 3 * 4 + 5 * 4
    assert {c[0] for c in calls} == {"encode"} and calls[-1][1:] == (total, total)
    assert calls[stages - 1][1] == 2 * stages and calls[stages + 3][1] == 2 * stages + 12
    api._LosslessJob(None, "decode", 5, 2, stages, 4).chain_step(3)  # no progress wanted: nothing to do


def test_both_modes_round_trip_through_one_api_with_progress(model):
    images = synthetic_images([(32, 32), (20, 40)], seed=3)  # 1 + 2 tiles
    calls = []
    lossless = api.encode(images, ["a", "b"], model=model, steps=3, float64=True, bootstrap=False,
                          progress=lambda *c: calls.append(c))
    assert isinstance(lossless, api.LosslessEncoding) and api.read_header(lossless.data).mode == MODE_BITSBACK
    # one bar for the whole job, in tile network calls: 3 tiles x 3 steps of the chain, then the bound's
    assert {phase for phase, _, _ in calls} == {"encode"} and calls[-1][1:] == (18, 18)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    calls.clear()
    back = api.decode(lossless.data, model=model, device="cpu", progress=lambda *c: calls.append(c))
    assert back.names == ["a", "b"] and all(np.array_equal(x, y) for x, y in zip(back.images, images))
    assert {phase for phase, _, _ in calls} == {"decode"} and calls[-1][1:] == (9, 9)
    assert lossless.bound_bpd > 0 and lossless.file_bpd > 0

    params = ProgressiveParams(num_steps=3, chunk_bits=6.0, log2_candidates=10, network_float64=True)
    progressive = api.encode(images, model=model, mode="progressive", progressive_params=params, workers=1,
                             float64=True)
    assert isinstance(progressive, api.ProgressiveEncoding)
    assert api.read_header(progressive.data).mode == MODE_PROGRESSIVE and progressive.header.num_steps == 3
    calls.clear()
    full = api.decode(progressive.data, model=model, device="cpu", progress=lambda *c: calls.append(c))
    assert full.verified and all(np.array_equal(x, y) for x, y in zip(full.images, images))
    # the decode bar moves at every stage (a photo's decode takes minutes), not only at the end
    assert [c[:2] for c in calls[:3]] == [("decode", 1), ("decode", 2), ("decode", 3)] and calls[-1][1:] == (4, 4)
    part = api.decode(progressive.data, model=model, device="cpu", upto=2)
    assert not part.verified and part.stages == 2 and [im.shape for im in part.images] == [(32, 32, 3), (20, 40, 3)]
    with pytest.raises(DiffcodecError, match="apply to progressive files"):
        api.decode(lossless.data, model=model, device="cpu", upto=2)
    # a stream in regions (2 and 1 tiles): the decoder takes a region through every stage before
    # the next, and the bar counts a stage of each region, never going back, ending at its total
    regions = api.encode(images, model=model, mode="progressive", workers=1, float64=True,
                         progressive_params=replace(params, region_tiles=2))
    assert regions.encoded.params.num_regions == 2
    calls.clear()
    whole = api.decode(regions.data, model=model, device="cpu", progress=lambda *c: calls.append(c))
    assert whole.verified and all(np.array_equal(x, y) for x, y in zip(whole.images, images))
    assert [c[1] for c in calls] == list(range(1, 9)) + [8] and calls[-1][1:] == (8, 8)


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


# ----------------------------------------------------------------------- format 4 headers


def test_v4_lossless_header_and_the_model_identity(model):
    """A format 4 lossless file: the header holds the model identity, not the fingerprint and
    chain strings; K comes back from the block; a one-image file without a name stores none;
    the same weights with another chain or tile size are refused by the identity."""
    images = synthetic_images([(32, 32)], seed=6)
    r = api.encode(images, model=model, steps=2, float64=True, bootstrap=False, compute_bound=False)
    assert r.data[:4] == b"DFC\x04" and r.data[4] == MODE_BITSBACK  # float, one image, no names, CPU
    h = api.read_header(r.data)
    assert (h.version, h.num_steps, h.model_id, h.fingerprint, h.device) == (4, 2, api.model_id(model), "", "cpu")
    assert h.images == (ImageEntry(32, 32),) and len(h.pixel_sha) == 4
    header_bytes = len(r.data) - r.payload_bytes
    assert header_bytes <= 13 + 2 + 4 + 1 + len(h.params) + 2 + 4
    back = api.decode(r.data, model=model, device="cpu")
    assert back.names == [""] and np.array_equal(back.images[0], images[0])
    for dc in (replace(model.diffusion_config, schedule="cosine"), replace(model.diffusion_config, num_timesteps=999)):
        other = LoadedModel(model.model, model.model_config, dc, model.fingerprint, {}, "<other chain>")
        with pytest.raises(DiffcodecError) as e:
            api.decode(r.data, model=other, device="cpu")
        message = str(e.value)
        assert "\n" not in message and f"encoded with model {api.model_id(model).hex()}, this checkpoint is " \
            f"{api.model_id(other).hex()} (weights {model.fingerprint}, {dc.schedule} T={dc.num_timesteps}" in message


def _progressive_file(model, images, params: ProgressiveParams, payload: bytes, probe: bytes = b"") -> bytes:
    dc = model.diffusion_config
    entries = tuple(ImageEntry(im.shape[0], im.shape[1]) for im in images)
    header = Header(MODE_PROGRESSIVE, "cpu", model.fingerprint, dc.schedule, dc.num_timesteps, params.num_steps,
                    dc.var_type, 32, entries, b"", params.pack(), 1 if probe else 0, probe)
    return pack(Container(header, payload))


def test_v4_progressive_decode_trusts_the_streams_closing_check(model, monkeypatch):
    """Format 4 progressive files carry no pixel checksum and no stream length: a complete
    decode is verified by the stream's closing check (`Decoded.pixels_checked`), bytes after
    the stream's end are refused, and a stream that runs out is a file cut short. The stream
    decoder is stubbed here (its own tests are tests/test_codec_progressive.py)."""
    images = synthetic_images([(32, 32), (20, 40)], seed=8)
    tiles, _, _ = image_tiles(images, 32)
    x0 = to_model_input(tiles)
    calls = {}

    def stub(**fields):
        def decode(model_fn, diffusion, payload, params, **kw):
            calls["params"] = params
            assert kw["as_levels"]  # a complete stream's pixels as uint8 levels, no float copy
            complete = fields.get("complete", True)  # the image as uint8 levels: the pixels, or a reconstruction
            base = dict(x0=None, stages=4, complete=True, timestep=-1, bits_available=8 * len(payload),
                        bits_used=8 * len(payload) - 3, diverged=False, stop="complete", stop_stage=-1,
                        fallback=None, seconds={}, pixels_checked=True,
                        levels=np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)) if complete else to_levels(x0),
                        fallback_levels=to_levels(torch.zeros_like(x0)) if complete else None)
            return Decoded(**{**base, **fields})
        monkeypatch.setattr(api.progressive, "decode", decode)

    params = ProgressiveParams(num_steps=3, network_float64=True)
    data = _progressive_file(model, images, params, b"\x55" * 10)
    assert len(data) - 10 == 4 + 1 + 4 + 8 + 4 + 4  # no probe (float), 2 images in 2 size runs, block 03 06 03
    stub()
    r = api.decode(data, model=model, device="cpu")
    assert r.verified and not r.truncated and not r.damage and all(np.array_equal(a, b) for a, b in zip(r.images, images))
    assert calls["params"].num_tiles == 3 and calls["params"].tile_size == 32 and r.payload_bits_total == 80
    stub(pixels_checked=False)  # the closing check read and different: a float file on another machine
    r = api.decode(data, model=model, device="cpu")
    assert not r.verified and r.diverged and r.stages == 3 and r.reconstruction == "xstart"
    assert all((im == 0).all() or (im == 128).all() for im in r.images[:1])  # the fallback, not the stub's pixels
    stub(bits_used=72)
    with pytest.raises(DiffcodecError, match="^file: 1 unexpected bytes after the end of the stream$"):
        api.decode(data, model=model, device="cpu")
    stub(complete=False, stages=2, timestep=100, stop="end", pixels_checked=None, bits_used=77)
    r = api.decode(data, model=model, device="cpu")
    assert r.truncated and not r.verified and not r.damage and r.payload_bits_total == 0
    r = api.decode(data, model=model, device="cpu", num_bits=8 * (len(data) - 2))  # a prefix asked for
    assert not r.truncated
    stub(complete=False, stages=2, timestep=100, stop="check", stop_stage=2, pixels_checked=None, bits_used=77)
    assert api.decode(data, model=model, device="cpu").damage == "the integrity check after stage 2 failed"
    # the exact contract: a failed closing check after a matching probe is damage, not divergence
    probe = probe_digest(network(model.model, exact=True, contract=1), model.diffusion_config, 32)
    exact = _progressive_file(model, images, ProgressiveParams(num_steps=3, exact=True), b"\x55" * 10, probe)
    stub(pixels_checked=False)
    r = api.decode(exact, model=model, device="cpu")
    assert not r.verified and not r.diverged and r.damage == "the lossless stage fails the stream's closing check"


def test_v4_refuses_a_block_of_the_wrong_version(model):
    images = synthetic_images([(32, 32)], seed=8)
    old_stream = _progressive_file(model, images, ProgressiveParams(num_steps=3, version=2), b"\x00" * 8)
    with pytest.raises(DiffcodecError, match=r"corrupt header \(a format 4 file with a version 2 progressive block\)"):
        api.decode(old_stream, model=model, device="cpu")


def test_progressive_network_calls_stay_within_the_batch_and_do_not_change_the_file(monkeypatch):
    """Issue 28, bounded memory: a stage's tiles go through the network ``batch_size`` at a
    time (`progressive.codec.tile_slices`), at encode and at decode, so the network's memory is bounded
    by the batch, not by the image; under the exact contract the bytes do not depend on it."""
    small = as_loaded(*seeded_model(1, image_size=8))
    images = synthetic_images([(64, 40)], seed=7)  # 8 x 5 = 40 tiles of 8 x 8
    seen: list[int] = []
    real = api.network

    def recording(*args, **kwargs):
        fn = real(*args, **kwargs)

        def call(x_t, t):
            seen.append(int(x_t.shape[0]))
            return fn(x_t, t)

        return call

    monkeypatch.setattr(api, "network", recording)
    params = ProgressiveParams(num_steps=3, chunk_bits=6.0, log2_candidates=10)
    sliced = api.encode(images, model=small, mode="progressive", progressive_params=params, workers=1, batch_size=7)
    assert len(seen) > 3 and max(seen) == 7 and sum(seen) == 1 + 3 * 40  # the probe, then 3 stages of 40 tiles
    seen.clear()
    whole = api.encode(images, model=small, mode="progressive", progressive_params=params, workers=1, batch_size=64)
    assert max(seen) == 40 and whole.data == sliced.data
    seen.clear()
    back = api.decode(sliced.data, model=small, device="cpu", batch_size=7)
    assert back.verified and np.array_equal(back.images[0], images[0]) and max(seen) == 7
    with pytest.raises(DiffcodecError, match="batch size must be at least 1"):
        api.decode(sliced.data, model=small, device="cpu", batch_size=0)

