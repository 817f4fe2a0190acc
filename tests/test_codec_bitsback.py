"""codec/bitsback (chain, stream, params, file) through `codec.api` and the encode/decode commands: bit-exact round trips with tiny seeded models,
file size against the bound, refusal of bad files, and a pinned golden file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcodec.checkpoint import save_checkpoint
from diffcodec.cli import main
from diffcodec.codec import api
from diffcodec.codec.bitsback.chain import ChainCoder, GridConfig, chain_grid
from diffcodec.codec.bitsback.params import BitsBackParams
from diffcodec.codec.bitsback.stream import bootstrap_count, decode_tiles, encode_tiles, first_dip_bits
from diffcodec.codec.container import pack, unpack
from diffcodec.errors import DiffcodecError
from diffcodec.evaluate import model_schedule
from diffcodec.runtime import network
from diffcodec.schedule import make_schedule
from diffcodec.timesteps import respace

from conftest import as_loaded, seeded_model, synthetic_images  # shared with test_golden.py


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encode_images(loaded, images, names=None, *, steps=None, max_batch=64, config=GridConfig(), **kw):
    """`api.encode` of a lossless file on the CPU (the tests' shorthand): the float64 network
    unless asked otherwise, as these tests are about the stream (the exact contract's own
    round trips: test_codec_portable.py, test_golden.py)."""
    if not kw.pop("float64", True):
        kw.setdefault("arithmetic", "float32")
    kw.setdefault("arithmetic", "float64")
    return api.encode(images, names, model=loaded, steps=steps, batch_size=max_batch, grid=config, device="cpu", **kw)


def decode_container(loaded, container):
    """`api.decode` of a lossless file's container on the CPU."""
    return api.decode(pack(container), model=loaded, device="cpu")


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def sane():
    return as_loaded(*seeded_model(0))


@pytest.fixture(scope="module")
def wild():
    return as_loaded(*seeded_model(1, out_scale=1.0))


# ------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("name, T, K", [("linear", 1000, 1000), ("linear", 1000, 10), ("cosine", 1000, 50)])
def test_grid_resolution_and_windows(name, T, K):
    s = make_schedule(name, T)
    s = respace(s, K) if K < T else s
    cfg = GridConfig()
    g = chain_grid(s, cfg)
    for j in range(1, K + 1):
        sigma_q = math.sqrt(s.betas[j - 1])
        small = math.sqrt(s.posterior_variance[j]) if j < K else sigma_q
        big = math.sqrt(s.betas[j]) if j < K else sigma_q
        delta = 2.0 ** g.log2_delta[j]
        assert 2 ** cfg.resolution_bits <= min(sigma_q, small) / delta < 2 ** (cfg.resolution_bits + 1)
        assert g.half_width[j] >= cfg.window_sigmas * max(sigma_q, big) / delta
        assert g.half_width[j] * 2 + 1 < 2**16  # small domains: few strays under the 2^-24 floor
    assert g.prior_half_width >= cfg.prior_sigmas / 2.0 ** g.log2_delta[K]


# -------------------------------------------------------------------------- round trips


def test_tiles_round_trip_bit_exact_with_a_wild_model(wild):
    s = respace(make_schedule("linear", 1000), 5)
    spec = ChainCoder(network(wild.model), s, "fixedlarge")
    tiles = np.stack(synthetic_images([(32, 32)] * 3, seed=4))
    code = encode_tiles(spec, tiles, max_batch=2)
    assert sum(code.chunks) == 3 and code.chunks[0] == 1
    back, stack_ok, boot = decode_tiles(spec, code.payload, chunks=code.chunks, tile_size=32,
                                        init_words=code.init_words, kept_words=code.kept_words)
    assert stack_ok and boot == b""
    assert np.array_equal(back, tiles)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_images_of_any_size_round_trip(learn_sigma):
    loaded = as_loaded(*seeded_model(2, learn_sigma=learn_sigma))
    images = synthetic_images([(37, 45), (32, 32), (20, 70)], seed=1)
    result = encode_images(loaded, images, ["a.png", "b", ""], steps=4, max_batch=3, compute_bound=False)
    container = unpack(result.data)
    assert [(e.height, e.width) for e in container.header.images] == [(37, 45), (32, 32), (20, 70)]
    assert result.num_tiles == 4 + 1 + 3
    decoded = decode_container(loaded, container)
    assert decoded.names == ["a.png", "b", ""]
    for a, b in zip(decoded.images, images):
        assert np.array_equal(a, b)


def test_float64_network_round_trip_and_determinism(sane):
    images = synthetic_images([(32, 32), (16, 40)], seed=2)
    first = encode_images(sane, images, steps=3, float64=True, compute_bound=False)
    second = encode_images(sane, images, steps=3, float64=True, compute_bound=False)
    assert first.data == second.data
    assert first.params.network_float64
    decoded = decode_container(sane, unpack(first.data))
    assert all(np.array_equal(a, b) for a, b in zip(decoded.images, images))


def test_a_chunk_goes_through_the_network_in_slices_and_the_file_does_not_change(sane, monkeypatch):
    """A chunk's tiles go through the network at most `runtime.network_batch(device)` at a
    time (32 on a CPU) under float64 and the exact contract, whose outputs do not depend on
    the batch: the same file and the same decoded tiles whatever the slice; a float32 chunk,
    whose outputs may, goes in one call as before."""
    from diffcodec.codec.bitsback import file as bb_file

    images = synthetic_images([(96, 128)], seed=3)  # 12 tiles: chunks of 1, 1, 2, 3 and 5
    seen: list[int] = []
    real = bb_file.network

    def recording(*args, **kwargs):
        fn = real(*args, **kwargs)

        def call(x, t):
            seen.append(len(x))
            return fn(x, t)

        return call

    monkeypatch.setattr(bb_file, "network", recording)
    files = {}
    for per_call in (2, 32):
        monkeypatch.setattr(api, "network_batch", lambda device, n=per_call: n)
        for arithmetic in ("float64", "exact"):
            seen.clear()
            enc = encode_images(sane, images, steps=3, compute_bound=False, bootstrap=False, max_batch=None,
                                arithmetic=arithmetic)
            files[per_call, arithmetic] = enc.data
            assert max(enc.params.chunks) == 5 and max(seen) == min(per_call, 5), (per_call, arithmetic, seen)
        seen.clear()
        decoded = api.decode(files[per_call, "exact"], model=sane, device="cpu")
        assert max(seen) == min(per_call, 5) and np.array_equal(decoded.images[0], images[0])
    for arithmetic in ("float64", "exact"):
        assert files[2, arithmetic] == files[32, arithmetic]
    monkeypatch.setattr(api, "network_batch", lambda device: 2)
    seen.clear()
    encode_images(sane, images, steps=3, compute_bound=False, bootstrap=False, max_batch=None, float64=False)
    assert max(seen) == 5  # float32: each chunk in one call


# ---------------------------------------------------------------------- size vs bound


def test_file_size_is_the_bound_plus_a_small_overhead(sane):
    """32 tiles, K = 10, fixedlarge: the payload minus the initial bits is within 2 % of the
    bound on the same chain (measured +0.2..0.4 %; the bound is a single-sample estimate
    with ~0.15 % standard error here, and the coded chain is one sample too). The whole file
    adds the initial bits (one tile's dip, amortised over 32 tiles) and the header."""
    images = synthetic_images([(32, 32)] * 32, seed=3)
    r = encode_images(sane, images, steps=10, max_batch=16, bootstrap=False)
    assert r.bound is not None and r.bound.total_bits.shape == (32,)
    assert abs(r.net_bpd / r.bound_bpd - 1.0) < 0.02
    one_tile_dip_bpd = r.initial_bits / 3072
    assert 5.0 < one_tile_dip_bpd < 30.0  # what a single-tile file pays on top
    assert r.file_bpd == pytest.approx(r.net_bpd + r.initial_bits / r.num_dims + 8 * (len(r.data) - r.payload_bytes)
                                       / r.num_dims)
    assert r.file_bpd < r.bound_bpd * 1.02 + one_tile_dip_bpd / 32 + 0.05


# ------------------------------------------------------------------------- bootstrap


def test_first_dip_estimate_bounds_the_measured_dip(sane):
    """Without bootstrap a one-tile stream consumes about one chunk's dip of seeded words;
    `first_dip_bits` is an upper estimate of it (shipped model, K = 100: 62,372 vs 55,360 consumed)."""
    for k in (4, 10):
        r = encode_images(sane, synthetic_images([(32, 32)], seed=14), steps=k, compute_bound=False,
                          bootstrap=False)
        s = model_schedule(sane, k, "quadratic")
        estimate = first_dip_bits(s, chain_grid(s, GridConfig()), 3072)
        assert 0.7 * estimate <= r.initial_bits <= estimate + 64


def test_bootstrap_tiles_seed_the_stack(sane):
    """The first m tiles go through the progressive codec and their stream sits on top of the
    seeded words: the bits-back tiles' dip consumes fewer seeded words, the file is smaller
    than one started on seeded words, and it decodes exactly."""
    images = synthetic_images([(32, 32)] * 8, seed=12)
    s = model_schedule(sane, 10, "quadratic")
    m = bootstrap_count(s, chain_grid(s, GridConfig()), 8, 3072)
    assert 1 <= m < 8
    r = encode_images(sane, images, steps=10, compute_bound=False)
    plain = encode_images(sane, images, steps=10, compute_bound=False, bootstrap=False)
    params = BitsBackParams.unpack(unpack(r.data).header.params)
    assert r.bootstrap_tiles == params.bootstrap_tiles == m and sum(params.chunks) == 8 - m
    assert r.bootstrap_bits > 0 and r.initial_bits < plain.initial_bits / 4
    assert len(r.data) < len(plain.data)
    decoded = decode_container(sane, unpack(r.data))
    assert all(np.array_equal(a, b) for a, b in zip(decoded.images, images))


def test_a_short_stream_is_its_bootstrap_alone(sane):
    """A stream of at most m tiles is the progressive payload (and the top word): no chunks,
    no initial bits, a fraction of the seeded-start file's size."""
    images = synthetic_images([(20, 13)], seed=13)
    r = encode_images(sane, images, steps=4, compute_bound=False)
    plain = encode_images(sane, images, steps=4, compute_bound=False, bootstrap=False)
    assert r.bootstrap_tiles == 1 and r.params.chunks == () and r.initial_bits == 0
    assert r.payload_bytes == 4 * (-(-r.bootstrap_bits // 32) + 1)
    assert len(r.data) < 0.6 * len(plain.data)
    decoded = decode_container(sane, unpack(r.data))
    assert np.array_equal(decoded.images[0], images[0])


# ------------------------------------------------------------------------ bad files


def _repack_payload(data: bytes, change) -> bytes:
    """Alter the payload and fix the CRC, so that only the decoder can notice."""
    c = unpack(data)
    payload = bytearray(c.payload)
    change(payload)
    return pack(type(c)(c.header, bytes(payload)))


@pytest.mark.parametrize("bootstrap", [True, False])
def test_corrupt_payload_fails_the_checksum(sane, bootstrap):
    images = synthetic_images([(32, 32), (32, 32)], seed=5)
    data = encode_images(sane, images, steps=3, compute_bound=False, bootstrap=bootstrap).data

    def flip(p):
        p[len(p) // 2] ^= 0x10

    with pytest.raises(DiffcodecError, match="checksum mismatch"):
        decode_container(sane, unpack(_repack_payload(data, flip)))


def test_divergence_names_both_devices(sane):
    images = synthetic_images([(32, 32)], seed=6)
    c = unpack(encode_images(sane, images, steps=2, compute_bound=False).data)
    header = dataclasses.replace(c.header, device="cuda:Some GPU")  # format 4 keeps the kind: cuda
    payload = bytearray(c.payload)
    payload[4] ^= 1
    with pytest.raises(DiffcodecError, match="encoded on cuda and decoding on cpu"):
        decode_container(sane, type(c)(header, bytes(payload)))


def test_other_model_and_other_chain_refused(sane):
    data = encode_images(sane, synthetic_images([(32, 32)]), steps=2, compute_bound=False).data
    other = as_loaded(*seeded_model(7))
    with pytest.raises(DiffcodecError, match=f"encoded with model {api.model_id(sane).hex()}, this checkpoint is "
                                             f"{api.model_id(other).hex()} \\(weights {other.fingerprint}"):
        decode_container(other, unpack(data))
    learned = as_loaded(*seeded_model(0, learn_sigma=True))
    learned = dataclasses.replace(learned, fingerprint=sane.fingerprint)  # same weights id, other chain
    with pytest.raises(DiffcodecError, match="learned_range"):
        decode_container(learned, unpack(data))


# --------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, mc, dc = seeded_model(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, mc, dc, meta={"weights": "test"})
    return path


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, checkpoint) -> tuple[Path, list[np.ndarray], Path]:
    folder = tmp_path_factory.mktemp("imgs")
    images = synthetic_images([(37, 45), (32, 32)], seed=8)
    for name, img in zip(["one.png", "two.png"], images):
        Image.fromarray(img).save(folder / name)
    out = tmp_path_factory.mktemp("dfc") / "two.dfc"  # a fresh folder: the fixture may be set up again
    code = main(["encode", str(folder), "-o", str(out), "-c", str(checkpoint), "--steps", "3", "-q",
                 "--device", "cpu", "--lossless"])
    assert code == 0
    return out, images, checkpoint


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("diffcodec: error: ")
    return err


def test_cli_round_trip_to_a_directory(encoded, tmp_path, capsys):
    dfc, images, ckpt = encoded
    assert main(["decode", str(dfc), "-o", str(tmp_path / "out"), "-c", str(ckpt), "-q", "--json"]) == 0
    assert '"verified": true' in capsys.readouterr().out
    for name, img in zip(["one.png", "two.png"], images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)), img)


def test_cli_encode_summary_and_single_png(checkpoint, tmp_path, capsys):
    img = synthetic_images([(20, 13)], seed=9)[0]
    Image.fromarray(img).save(tmp_path / "small.png")
    dfc = tmp_path / "small.dfc"
    assert main(["encode", str(tmp_path / "small.png"), "-o", str(dfc), "-c", str(checkpoint), "-k", "2", "-q",
                 "--lossless"]) == 0
    text = capsys.readouterr().out
    assert "bits/dim" in text and "bound" in text and "initial bits" in text
    assert main(["decode", str(dfc), "-o", str(tmp_path / "back.png"), "-c", str(checkpoint), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back.png")), img)
    # never overwrite without --force
    before = dfc.read_bytes()
    assert main(["encode", str(tmp_path / "small.png"), "-o", str(dfc), "-c", str(checkpoint), "-k", "2", "-q",
                 "--lossless"]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert dfc.read_bytes() == before
    png_before = (tmp_path / "back.png").read_bytes()
    assert main(["decode", str(dfc), "-o", str(tmp_path / "back.png"), "-c", str(checkpoint), "-q"]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert (tmp_path / "back.png").read_bytes() == png_before


def test_cli_refuses_grey_images_unless_converted(checkpoint, tmp_path, capsys):
    Image.fromarray(np.full((8, 8), 100, np.uint8), mode="L").save(tmp_path / "grey.png")
    args = ["encode", str(tmp_path / "grey.png"), "-o", str(tmp_path / "g.dfc"), "-c", str(checkpoint), "-k", "2",
            "-q", "--lossless", "--no-bound"]
    assert main(args) == 2
    assert "--convert" in _one_line_error(capsys)
    assert main(args + ["--convert"]) == 0
    assert "note:" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: b"XXXX" + d[4:], "bad magic"),
    (lambda d: d[:3] + bytes([7]) + d[4:], "version 7"),
    (lambda d: d[:-9] + bytes([d[-9] ^ 1]) + d[-8:], "CRC-32"),
])
def test_cli_refuses_damaged_files(encoded, tmp_path, capsys, damage, message):
    dfc, _, ckpt = encoded
    bad = tmp_path / "bad.dfc"
    bad.write_bytes(damage(dfc.read_bytes()))
    assert main(["decode", str(bad), "-o", str(tmp_path / "out"), "-c", str(ckpt), "-q"]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_checksum_mismatch_writes_nothing(encoded, tmp_path, capsys):
    dfc, _, ckpt = encoded
    bad = tmp_path / "bad.dfc"

    def flip(p):
        p[8] ^= 0x01

    bad.write_bytes(_repack_payload(dfc.read_bytes(), flip))
    assert main(["decode", str(bad), "-o", str(tmp_path / "out"), "-c", str(ckpt), "-q"]) == 2
    assert "checksum mismatch" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_another_model(encoded, tmp_path, capsys):
    dfc, _, _ = encoded
    model, mc, dc = seeded_model(3)
    other = tmp_path / "other.pt"
    save_checkpoint(other, model, mc, dc)
    assert main(["decode", str(dfc), "-o", str(tmp_path / "out"), "-c", str(other), "-q"]) == 2
    assert "encoded with model" in _one_line_error(capsys)


def test_float32_cpu_files_record_the_thread_count(encoded, tmp_path, capsys):
    """float32 CPU kernels give thread-count-dependent outputs: a --float32 file's header
    records the encoder's torch threads (0 for float64 and exact files) and the CLI decoder
    uses that count."""
    exact_file, images, ckpt = encoded
    exact_params = BitsBackParams.unpack(unpack(exact_file.read_bytes()).header.params)
    assert exact_params.exact and exact_params.threads == 0  # the default: nothing machine-bound recorded
    folder = exact_file.parent / "imgs_f32"
    folder.mkdir(exist_ok=True)
    Image.fromarray(images[1]).save(folder / "two.png")
    dfc = tmp_path / "f32.dfc"
    assert main(["encode", str(folder), "-o", str(dfc), "-c", str(ckpt), "--steps", "3", "-q", "--device", "cpu",
                 "--float32", "--lossless"]) == 0
    params = BitsBackParams.unpack(unpack(dfc.read_bytes()).header.params)
    assert params.threads == 1 and not params.network_float64 and not params.exact
    torch.set_num_threads(2)
    try:
        assert main(["decode", str(dfc), "-o", str(tmp_path / "out"), "-c", str(ckpt), "-q"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    loaded = as_loaded(*seeded_model(0))
    f64 = encode_images(loaded, images[:1], steps=2, float64=True, compute_bound=False)
    assert f64.params.threads == 0


def test_quadratic_spacing_is_recorded_and_decoded():
    """The default spacing of a respaced chain is quadratic; the file says so and the decoder
    rebuilds the same chain (a uniform decoder would not reproduce the pixels)."""
    loaded = as_loaded(*seeded_model(0))
    images = synthetic_images([(32, 32)], seed=5)
    result = encode_images(loaded, images, steps=6, float64=True, compute_bound=False, bootstrap=False)
    container = unpack(result.data)
    params = BitsBackParams.unpack(container.header.params)
    assert params.spacing == "quadratic"
    decoded = decode_container(loaded, container)
    assert np.array_equal(decoded.images[0], images[0])
    uniform = encode_images(loaded, images, steps=6, spacing="uniform", float64=True, compute_bound=False,
                            bootstrap=False)
    # where the integer rule and diffcodec 0.1's linspace agree (K = 6), the file keeps 0.1's code 0
    assert BitsBackParams.unpack(unpack(uniform.data).header.params).spacing == "uniform-linspace"
    assert uniform.data != result.data
    # where they differ (K = 7: t = 166.5 rounds up, linspace rounds to even), the new code 2
    tie = encode_images(loaded, images, steps=7, spacing="uniform", float64=True, compute_bound=False,
                        bootstrap=False)
    assert BitsBackParams.unpack(unpack(tie.data).header.params).spacing == "uniform"
    assert np.array_equal(decode_container(loaded, unpack(tie.data)).images[0], images[0])


def test_cli_default_chain_is_100_quadratic_steps(checkpoint, tmp_path, capsys):
    """Without --steps, lossless encode codes min(100, T) steps, quadratically spaced, and says so."""
    img = synthetic_images([(32, 32)], seed=4)[0]
    Image.fromarray(img).save(tmp_path / "d.png")
    dfc = tmp_path / "d.dfc"
    assert main(["encode", str(tmp_path / "d.png"), "-o", str(dfc), "-c", str(checkpoint), "-q", "--json",
                 "--lossless", "--no-bound"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_steps"] == 100 and report["spacing"] == "quadratic"
    assert BitsBackParams.unpack(unpack(dfc.read_bytes()).header.params).spacing == "quadratic"
    assert main(["decode", str(dfc), "-o", str(tmp_path / "d-out.png"), "-c", str(checkpoint), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d-out.png")), img)
