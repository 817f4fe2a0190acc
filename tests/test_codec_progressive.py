"""The progressive codec (Algorithms 3/4): lossless at full length, every prefix decodes,
the real bits track the analytic KL, a perturbed decoder degrades gracefully."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffcodec.codec.progressive import codec as pg
from diffcodec.codec.progressive import syntax
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.config import DiffusionConfig, preset
from diffcodec.diffusion import p_xstart
from diffcodec.errors import DiffcodecError
from diffcodec.images import from_model_output, to_levels, to_model_input
from diffcodec.runtime import network
from diffcodec.timesteps import SPACINGS, kept_timesteps
from diffcodec.unet import UNet

TILE = 16
PARAMS = ProgressiveParams(num_steps=6, log2_candidates=12, chunk_bits=6.0, pad_bits=5.0, seed=11,
                              num_tiles=2, tile_size=TILE)


@pytest.fixture(autouse=True)
def one_thread():
    """This shared 2-core machine is busy: one torch thread is ~25x faster here than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded_tiny(seed: int = 0, *, learn_sigma: bool = False) -> tuple[UNet, DiffusionConfig]:
    """The `tiny` preset with EVERY parameter drawn from a seeded generator (reproducible across
    processes); zero-initialised layers get small noise so the output depends on the input."""
    mc, dc = preset("tiny")
    if learn_sigma:
        mc = dataclasses.replace(mc, learn_sigma=True)
        dc = dataclasses.replace(dc, var_type="learned_range")
    g = torch.Generator().manual_seed(seed)
    model = UNet(mc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            else:
                base = 1.0 if name.endswith("weight") else 0.0  # GroupNorm scales / biases
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), dc


def test_image(num_tiles: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with mild noise: uint8 [num_tiles, 16, 16, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE] / TILE
    tiles = []
    for _ in range(num_tiles):
        a = rng.uniform(0.2, 0.8, size=3)
        img = np.stack([a[c] * 255 * (0.5 + 0.5 * np.sin(3 * xx + 2 * c + 5 * a[c] * yy)) for c in range(3)], -1)
        tiles.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255))
    return np.stack(tiles).astype(np.uint8)


test_image.__test__ = False  # a helper, not a test


def denoiser(model: UNet):
    """The network as a model_fn, its eps scaled by 0.1: a random net that predicts x_0 about
    as well as a poor trained one (x^_0 near x_t / sqrt(abar_t)), so the bits stay moderate."""
    fn = network(model)
    return lambda x, t: 0.1 * fn(x, t)


@pytest.fixture(scope="module")
def coded():
    torch.set_num_threads(1)
    model, dc = seeded_tiny(0)
    fn = denoiser(model)
    tiles = test_image()
    x0 = to_model_input(tiles)
    enc = pg.encode(fn, dc, x0, PARAMS)
    return fn, dc, tiles, x0, enc


@pytest.fixture(scope="module")
def coded_pfr(coded):
    """`coded`'s image as stream version 4 writes it (PFR: each sent latent a sample of about q)."""
    fn, dc, tiles, x0, _ = coded
    return fn, dc, tiles, x0, pg.encode(fn, dc, x0, dataclasses.replace(PARAMS, version=4))


def test_pixels_given_as_levels_code_the_same_stream(coded):
    """x0 as uint8 levels (what the api passes: 1 byte a dimension) gives the stream of its values,
    in float32 and under the exact contract, whatever the network's slices."""
    from diffcodec.images import tiles_as_levels

    fn, dc, tiles, x0, enc = coded
    levels = torch.from_numpy(tiles_as_levels(tiles))
    assert pg.encode(fn, dc, levels, PARAMS).payload == enc.payload
    model, _ = seeded_tiny(0)
    exact_fn = network(model, exact=True)
    fn_exact = lambda x, t: 0.1 * exact_fn(x, t)  # noqa: E731
    params = dataclasses.replace(PARAMS, num_steps=3, exact=True)
    ref = pg.encode(fn_exact, dc, x0, params)
    assert pg.encode(fn_exact, dc, levels, params, tiles_per_call=1).payload == ref.payload


def test_coded_chain_keeps_the_spaced_timesteps():
    for spacing in SPACINGS:
        for T, K in [(1000, 30), (1000, 2), (50, 50), (10, 7)]:
            ts = kept_timesteps(T, K, spacing)
            assert len(ts) == K and ts[0] == 0 and ts[-1] == T - 1 and np.all(np.diff(ts) > 0)
    quad, uni = kept_timesteps(1000, 30, "quadratic"), kept_timesteps(1000, 30, "uniform")
    assert (quad < 100).sum() >= 9 > (uni < 100).sum()
    assert np.array_equal(kept_timesteps(1000, 1000, "quadratic"), np.arange(1000))
    s = pg.coded_schedule(DiffusionConfig(), 30)
    base = pg.coded_schedule(DiffusionConfig(), 1000)
    np.testing.assert_allclose(s.alphas_cumprod, base.alphas_cumprod[quad], rtol=1e-12)
    with pytest.raises(DiffcodecError):
        kept_timesteps(1000, 0)


def test_params_block_round_trip():
    """Version 3 (compact: tiles from the container, no payload length; tests/test_codec_params.py)
    and version 2 (fixed layout, everything in it) round trip."""
    p = dataclasses.replace(PARAMS, spacing="uniform", clip_denoised=False)
    assert ProgressiveParams.unpack(p.pack(), num_tiles=2, tile_size=TILE) == p
    v2 = dataclasses.replace(p, payload_bits=12345, version=2)
    assert ProgressiveParams.unpack(v2.pack()) == v2
    for block in (p.pack(), v2.pack()):
        with pytest.raises(DiffcodecError):
            ProgressiveParams.unpack(block[:-1])
    bad = bytearray(v2.pack())
    bad[1] = 9  # unknown spacing
    with pytest.raises(DiffcodecError):
        ProgressiveParams.unpack(bytes(bad))
    with pytest.raises(ValueError):
        ProgressiveParams(chunk_bits=0.3)


def test_levels():
    for kl in [2.0**-10, 0.01, 1.0, 13.7, 5000.0]:
        level = syntax.level_of_kl(kl)
        assert level >= 1 and abs(np.log2(syntax.kl_of_level(level) / kl)) <= 0.25 + 1e-9
    assert syntax.level_of_kl(0.0) == 0 and syntax.level_of_kl(1e-6) == 0 and syntax.kl_of_level(0) == 0
    probs = syntax.level_probs([30, 33])
    assert probs.argmax() == 36 and probs.min() >= 1 and np.all(probs == np.rint(probs))


def test_full_stream_is_lossless(coded):
    fn, dc, tiles, x0, enc = coded
    K = PARAMS.num_steps
    assert enc.params.payload_bits == 8 * len(enc.payload)
    assert enc.prefix_bits[-1] <= enc.params.payload_bits < enc.prefix_bits[-1] + 8
    assert np.all(np.diff(enc.prefix_bits) >= 0) and len(enc.prefix_bits) == K + 1
    dec = pg.decode(fn, dc, enc.payload, enc.params)
    assert dec.complete and dec.stages == K + 1 and dec.timestep == -1
    assert torch.equal(dec.x0, x0)  # bit-exact pixels
    np.testing.assert_array_equal(from_model_output(dec.x0), tiles)
    assert dec.bits_used == enc.prefix_bits[-1]
    assert np.array_equal(from_model_output(dec.x0), tiles)
    # as the api decodes: the image as uint8 levels, x^_0 held as levels region by region, no float image
    levels = pg.decode(fn, dc, enc.payload, enc.params, as_levels=True)
    assert levels.x0 is None and levels.fallback is None and dec.levels is None and dec.fallback_levels is None
    assert levels.levels.dtype == np.uint8 and np.array_equal(levels.levels, tiles.transpose(0, 3, 1, 2))
    assert np.array_equal(levels.fallback_levels, to_levels(dec.fallback))
    assert (levels.complete, levels.stages, levels.bits_used, levels.pixels_checked) == \
        (dec.complete, dec.stages, dec.bits_used, dec.pixels_checked)
    for reconstruction in pg.RECONSTRUCTIONS:  # a prefix: the reconstruction's levels
        kw = dict(num_bits=enc.prefix_bits[-2], reconstruction=reconstruction)
        cut, floats = pg.decode(fn, dc, enc.payload, enc.params, as_levels=True, **kw), pg.decode(
            fn, dc, enc.payload, enc.params, **kw)
        assert not cut.complete and cut.x0 is None and cut.fallback_levels is None
        assert cut.stages == floats.stages and np.array_equal(cut.levels, to_levels(floats.x0))


def test_every_prefix_decodes_and_distortion_falls(coded):
    fn, dc, tiles, x0, enc = coded
    K = PARAMS.num_steps
    mse = []
    assert enc.num_checks >= 2  # the stages come in several checked groups
    for stage in range(K):
        bits = int(enc.prefix_bits[stage])
        # a stage arrives with its group (the stages up to the group's check): every stage
        # of the group has the same shortest prefix
        group_end = int(np.searchsorted(enc.prefix_bits[:K], bits, side="right"))
        dec = pg.decode(fn, dc, enc.payload, enc.params, num_bits=bits)
        assert dec.stages == group_end >= stage + 1 and not dec.complete and dec.bits_used == bits
        assert dec.x0.shape == x0.shape and float(dec.x0.abs().max()) <= 1.0
        assert dec.stop == ("limit" if group_end < K else "complete") or dec.stop == "end"
        # the shortest prefix: one bit fewer loses the group (no stage at all: an error)
        group_start = int(np.searchsorted(enc.prefix_bits[:K], bits, side="left"))
        if group_start > 0:
            assert pg.decode(fn, dc, enc.payload, enc.params, num_bits=bits - 1).stages == group_start
        else:
            with pytest.raises(DiffcodecError, match="no complete stage"):
                pg.decode(fn, dc, enc.payload, enc.params, num_bits=bits - 1)
        one = pg.decode(fn, dc, enc.payload, enc.params, num_bits=bits, upto=stage + 1)
        assert one.stages == stage + 1
        mse.append(float(((one.x0 - x0) ** 2).mean()))
        ddim = pg.decode(fn, dc, enc.payload, enc.params, num_bits=bits, reconstruction="ddim")
        assert ddim.stages == group_end and float(ddim.x0.abs().max()) <= 1.0
    # the decoder's x^_0 at each stage is the encoder's (same latents)
    np.testing.assert_allclose(np.array(mse) * 127.5**2, enc.xstart_mse, rtol=1e-4)
    assert np.mean(mse[K // 2 :]) < np.mean(mse[: K // 2])
    assert mse[-1] < mse[0] / 4
    # --upto stops early whatever the bits
    assert pg.decode(fn, dc, enc.payload, enc.params, upto=2).stages == 2
    with pytest.raises(DiffcodecError, match="no complete stage"):
        pg.decode(fn, dc, enc.payload, enc.params, upto=0)


def test_first_enough_finds_the_smallest_passing_prefix_from_either_end():
    rng = np.random.default_rng(3)
    for _ in range(300):
        lo = int(rng.integers(0, 50))
        hi = lo + int(rng.integers(0, 5000))
        answer = int(rng.integers(lo, hi + 1))
        for down in (False, True):
            calls = []

            def enough(bits: int) -> bool:
                assert lo <= bits <= hi
                calls.append(bits)
                return bits >= answer

            assert syntax.first_enough(lo, hi, enough, down=down) == answer
            # galloping from the near end: a handful of calls, never more than ~2 log2 of the range
            assert len(calls) <= 2 * max(1, (hi - lo + 1).bit_length()) + 1
    near_end = []
    assert syntax.first_enough(0, 10**6, lambda b: near_end.append(b) or b >= 10**6 - 5, down=True) == 10**6 - 5
    assert len(near_end) <= 7  # 32 bits down, then bisect within them


def test_padded_words_equal_the_bit_by_bit_padding():
    """`syntax.padded_words` (word by word) = the prefix's bits, then ``fill`` bits, packed."""
    rng = np.random.default_rng(3)
    payload = rng.integers(0, 256, 37, dtype=np.uint8).tobytes()
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    for num_bits in (0, 1, 7, 8, 31, 32, 33, 64, 200, 295, 296):
        for fill in (0, 1):
            padded = np.full(32 * (-(-num_bits // 32) + 3 + 2), fill, dtype=np.uint8)
            padded[:num_bits] = bits[:num_bits]
            expected = np.packbits(padded).view(">u4").astype(np.uint32)
            got = syntax.padded_words(payload, num_bits, 3, fill)
            assert got.dtype == np.uint32 and np.array_equal(got, expected), (num_bits, fill)


def _bisected_prefixes(enc, num_dims: int, models) -> list[int]:
    """Each stage's shortest prefix by a plain bisection, every prefix parsed from the start."""
    def plain(k: int) -> int:
        lo, hi = 0, 8 * len(enc.payload)
        while lo < hi:
            mid = (lo + hi) // 2
            if syntax.count_stages(enc.payload, mid, enc.params, num_dims, models, limit=k + 1) >= k + 1:
                hi = mid
            else:
                lo = mid + 1
        return lo

    return [plain(k) for k in range(enc.params.num_stages)]


def test_shortest_prefixes_match_a_plain_bisection_per_stage(coded):
    """The encoder's galloping, remembered search gives what a fresh bisection over the whole
    payload gives for each stage (the pixel stage included)."""
    fn, dc, tiles, x0, enc = coded
    D = x0.numel()
    models = pg._pixel_params(*_pixel_step(fn, dc, enc, x0), enc.params)
    expected = _bisected_prefixes(enc, D, models)
    np.testing.assert_array_equal(syntax.shortest_prefixes(enc.payload, enc.params, D, models), expected)
    np.testing.assert_array_equal(enc.prefix_bits, expected)
    # without the pixel models the last entry stays 0 and the rest are unchanged
    no_pixels = syntax.shortest_prefixes(enc.payload, enc.params, D, None)
    np.testing.assert_array_equal(no_pixels[:-1], expected[:-1])
    assert no_pixels[-1] == 0


@pytest.mark.parametrize("changes", [dict(version=4), dict(check_bits=0, version=1),
                                     dict(check_bits=0, num_steps=8), dict(min_stage_bits=2.0, num_steps=8)],
                         ids=["version 4", "no checks, version 1", "no checks, version 5", "version 5, skips"])
def test_checkpointed_prefix_search_equals_parsing_every_prefix_from_the_start(changes):
    """`shortest_prefixes` parses each prefix from the last group start before the stage it
    seeks (`group_checkpoints`): for streams with and without checks, with skipped stages and
    the pixel stage, its answers equal a bisection that parses every prefix from the start."""
    model, dc = seeded_tiny(0)
    fn = denoiser(model)
    x0 = to_model_input(test_image(1, seed=5))
    enc = pg.encode(fn, dc, x0, dataclasses.replace(PARAMS, num_tiles=1, **changes))
    D = x0.numel()
    models = pg._pixel_params(*_pixel_step(fn, dc, enc, x0), enc.params)
    expected = _bisected_prefixes(enc, D, models)
    np.testing.assert_array_equal(enc.prefix_bits, expected)
    np.testing.assert_array_equal(syntax.shortest_prefixes(enc.payload, enc.params, D, models), expected)
    points = syntax.group_checkpoints(enc.payload, enc.params, D)
    assert points[0].stage == 0 and points[-1].stage == enc.params.num_steps
    assert len(points) == (enc.params.num_steps + 1 if not enc.params.check_bits else enc.num_checks + 1)


def _pixel_step(fn, dc, enc, x0):
    """(mean, log variance) of p(x_0 | y_0) as the decoder computes it from the full stream."""
    dec = pg.decode(fn, dc, enc.payload, enc.params, keep_all=True)
    assert dec.complete
    s = pg.coded_schedule(dc, enc.params.num_steps)
    y0 = dec.latents[-1]
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    out = fn(y0, torch.from_numpy(s.timesteps)[t]).to(y0.dtype)
    p = pg.p_mean_variance(s, out, y0, t, var_type=dc.var_type, clip_denoised=enc.params.clip_denoised)
    return p.mean, p.log_variance


def test_truncated_payload_decodes_to_last_complete_stage(coded):
    fn, dc, tiles, x0, enc = coded
    for stage in (1, PARAMS.num_steps - 1):
        cut = int(enc.prefix_bits[stage]) // 8 + 1  # whole bytes, as a file cut short on disk
        expect = int(np.searchsorted(enc.prefix_bits, 8 * cut, side="right"))
        dec = pg.decode(fn, dc, enc.payload[:cut], enc.params)
        assert dec.stages == expect >= stage + 1 and not dec.complete


def test_real_bits_track_the_analytic_kl(coded_pfr):
    fn, dc, tiles, x0, enc = coded_pfr
    real = np.diff(np.append(0, enc.prefix_bits)).astype(float)
    kl = enc.kl_bits
    # the pixel stage is coded exactly: real ~ -log2 p(x_0 | y_0) (+ a few bits of coder tail;
    # fewer where the analytic term exceeds 24 bits for a pixel: the coder's floor is 2^-24)
    assert 0.9 * kl[-1] < real[-1] < 1.01 * kl[-1] + 40
    # RCC stages: about KL + a few bits per chunk (log2(KL_chunk + 1) + O(1))
    chunks = np.maximum(enc.num_chunks, 1)
    rcc_real, rcc_kl = real[:-1].sum(), kl[:-1].sum()
    checks = enc.num_checks * PARAMS.check_bits
    assert rcc_kl > 200  # the test exercises many chunks
    assert 0.6 * rcc_kl < rcc_real < rcc_kl + chunks.sum() * (np.log2(PARAMS.chunk_bits + 1) + 4) + checks
    # stages arrive in checked groups: compare the cumulative bits at each group's end
    ends = np.flatnonzero(np.diff(np.append(enc.prefix_bits[:-1], np.inf)) > 0)
    big = np.cumsum(kl[:-1])[ends] > 50
    ratio = enc.prefix_bits[:-1][ends][big] / np.cumsum(kl[:-1])[ends][big]
    assert big.any() and np.all((ratio > 0.5) & (ratio < 2.0))


def test_sample_bits_measure_what_the_sent_latents_deliver(coded_pfr):
    """log2 q/p of each sent latent (PFR, stream version 4): about the stage's KL with a
    generous candidate budget (an exact sample of q delivers its KL on average), and clearly
    less when the budget is cut to far below the chunks' KL (the sample then sits between p
    and q)."""
    fn, dc, tiles, x0, enc = coded_pfr
    K = PARAMS.num_steps
    assert enc.sample_bits.shape == (K,)
    kl = enc.kl_bits[1:K]  # stage 0 (x_T, candidate 0 of the prior) has KL ~0
    delivered = enc.sample_bits[1:K]
    assert kl.sum() > 200 and 0.8 * kl.sum() < delivered.sum() < 1.2 * kl.sum()
    starved = dataclasses.replace(PARAMS, chunk_bits=24.0, log2_candidates=4)
    low = pg.encode(fn, dc, x0, starved)
    assert low.sample_bits[1:K].sum() < 0.6 * low.kl_bits[1:K].sum()
    # the encoder's own account of x_T: candidate 0 of N(0, I) against q(x_T | x_0), ~0 bits
    assert abs(enc.sample_bits[0]) < 1.0


def test_version_5_pays_log2_n_bits_per_chunk_and_delivers_more_than_pfr(coded, coded_pfr):
    """Stream version 5 (greedy): the latent stages cost each chunk's log2 N (N from the stage's
    level, `Syntax.index_range`) plus the level symbols and checks, whatever was chosen; its
    sent latents deliver more log q/p than version 4's PFR samples of the same image."""
    from diffcodec.codec.progressive.syntax import Syntax, kl_of_level

    enc, pfr = coded[4], coded_pfr[4]
    K = PARAMS.num_steps
    syntax = Syntax(enc.params, coded[3].numel())
    index_bits = 0.0
    for level, chunks in zip(enc.levels[1:K], enc.num_chunks[1:K]):
        n, kappa = syntax.chunking(int(level))
        assert n == chunks and kl_of_level(int(level)) > 0
        index_bits += n * math.log2(syntax.index_range(int(level)))
    latent_bits = float(enc.prefix_bits[K - 1])  # the stages before the pixels, checks included
    checks = enc.num_checks * PARAMS.check_bits
    assert index_bits + checks < latent_bits < index_bits + checks + 8 * K + 64
    assert enc.sample_bits[1:].sum() > 1.05 * pfr.sample_bits[1:].sum()


def test_perturbed_decoder_degrades_gracefully(coded):
    fn, dc, tiles, x0, enc = coded
    model2, _ = seeded_tiny(0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in model2.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-6)
    fn2 = denoiser(model2)
    K = PARAMS.num_steps
    exact = pg.decode(fn, dc, enc.payload, enc.params, upto=K)
    lossy = pg.decode(fn2, dc, enc.payload, enc.params, upto=K)
    assert lossy.stages == K  # the symbol stream never depends on the network
    mse = float(((lossy.x0 - exact.x0) ** 2).mean())
    assert 10 * np.log10(4.0 / max(mse, 1e-30)) > 40  # PSNR (range 2) of perturbed vs exact prefix image
    full = pg.decode(fn2, dc, enc.payload, enc.params)
    # the lossless stage cannot survive different arithmetic: the decoder says so (pixel stage
    # not decodable), or the pixels decode wrong and the checksum says so
    if full.complete:
        assert not np.array_equal(from_model_output(full.x0), tiles)
        assert full.fallback is not None and full.fallback.shape == x0.shape
    else:  # version 3 on: the closing check was not reached (`api` says so), earlier: diverged
        assert full.stages == K and (full.diverged if enc.params.version < 3 else full.pixels_checked is None)
    assert not pg.decode(fn, dc, enc.payload, enc.params).diverged
    assert not pg.decode(fn2, dc, enc.payload, enc.params, num_bits=enc.params.payload_bits - 1).diverged


def test_learned_variance_model_round_trips():
    model, dc = seeded_tiny(1, learn_sigma=True)
    fn = denoiser(model)
    tiles = test_image(1, seed=3)
    x0 = to_model_input(tiles)
    params = dataclasses.replace(PARAMS, num_tiles=1, num_steps=4, spacing="uniform")
    enc = pg.encode(fn, dc, x0, params)
    dec = pg.decode(fn, dc, enc.payload, enc.params)
    assert dec.complete and torch.equal(dec.x0, x0)
    with pytest.raises(ValueError):
        pg.encode(fn, dc, x0, PARAMS)  # 2 tiles announced, 1 given


def test_float64_stream_survives_another_thread_count():
    """float32 network outputs change with the thread count; a float64 stream still decodes exactly."""
    model, dc = seeded_tiny(2)
    fn64 = denoiser(model.double())
    tiles = test_image(2, seed=4)
    x0 = to_model_input(tiles)
    params = dataclasses.replace(PARAMS, num_steps=4, network_float64=True)
    enc = pg.encode(fn64, dc, x0, params)
    assert ProgressiveParams.unpack(enc.params.pack()).network_float64
    torch.set_num_threads(2)
    dec = pg.decode(fn64, dc, enc.payload, enc.params)
    assert dec.complete and dec.x0.dtype == torch.float64
    np.testing.assert_array_equal(from_model_output(dec.x0), tiles)



@pytest.mark.parametrize("skips", [False, True], ids=["version 6", "version 3, skips"])
def test_network_slices_change_neither_the_stream_nor_the_decoding(skips):
    """The codec forms its network batch in slices of tiles (`pg.tile_slices`, issue 28): under
    the exact contract the payload, the decoded pixels, every partial reconstruction (x^_0 and
    DDIM) and every boundary's reconstruction are the same whatever the slice, and a call never
    sees more tiles than the slice."""
    model, dc = seeded_tiny(2)
    exact_fn = network(model, exact=True)
    fn64 = lambda x, t: 0.1 * exact_fn(x, t)  # noqa: E731 (`denoiser` under the exact contract)
    x0 = to_model_input(test_image(5, seed=6))
    params = dataclasses.replace(PARAMS, num_tiles=5, num_steps=6, exact=True)
    if skips:  # stage 1 carries about 60 bits here
        params = dataclasses.replace(params, version=3, min_stage_bits=100.0)
    calls: dict = {}

    def counting(n):
        def call(x, t):
            calls.setdefault(n, []).append(x.shape[0])
            return fn64(x, t)
        return call

    seen: list = []
    shown: list = []  # each boundary's tiles, copied during the call (`Boundary.tiles`: valid only then)

    def end(b):
        assert b.tiles is None or not b.tiles.flags.writeable
        seen.append(b)
        shown.append(None if b.tiles is None else b.tiles.copy())
        return pg.GO_ON

    encs = {n: pg.encode(counting(n), dc, x0, params, tiles_per_call=n, end=end if n == 2 else None)
            for n in (None, 2, 1)}
    assert set(calls[None]) == {5} and max(calls[2]) == 2 and set(calls[1]) == {1}
    ref = encs[None]
    assert not skips or (ref.levels[1:-1] == 0).any()
    for e in encs.values():
        assert e.payload == ref.payload
        np.testing.assert_array_equal(e.prefix_bits, ref.prefix_bits)
        np.testing.assert_allclose(e.kl_bits, ref.kl_bits, rtol=1e-12)
        np.testing.assert_allclose(e.xstart_mse, ref.xstart_mse, rtol=1e-9)
    assert seen[-1].stages == params.num_stages and shown[-1] is None and len(seen) >= 3
    assert all(b.tiles is None for b in seen)  # let go once `end` has answered
    for b, tiles in zip(seen[:-1], shown):  # what `end` is shown is what a decoder makes of such a file
        dec = pg.decode(fn64, dc, b.payload(), ref.params, tiles_per_call=3)
        assert dec.stages == b.stages and np.array_equal(from_model_output(dec.x0), tiles)
    mid = int(ref.prefix_bits[3])
    for reconstruction in ("xstart", "ddim"):
        a, b = (pg.decode(fn64, dc, ref.payload, ref.params, num_bits=mid, reconstruction=reconstruction,
                          keep_all=True, tiles_per_call=n) for n in (None, 2))
        assert a.stages == b.stages == 4 and not a.complete and torch.equal(a.x0, b.x0)
        assert len(a.xstart) == len(a.latents) == a.stages == len(b.xstart)
        assert all(torch.equal(u, v) for u, v in zip(a.xstart, b.xstart))
        assert all(torch.equal(u, v) for u, v in zip(a.latents, b.latents))
    full = pg.decode(fn64, dc, ref.payload, ref.params, tiles_per_call=1)
    assert full.complete and torch.equal(full.x0, x0.double())


def test_regions_code_each_region_in_turn_and_every_prefix_decodes():
    """A stream of several regions (issue 28: a stage's Gaussians, search and plan held for one
    region at a time): 5 tiles in regions of 2, 2 and 1. Whatever the network's slices it is the
    same stream; it decodes bit-exactly; its shortest prefixes, the pixel stage's found from the
    last region's models alone (`syntax.PixelTail`), equal a bisection that parses every prefix
    from the start with every region's models; each boundary the encoder is shown is what a
    decoder makes of such a file; a stream of one region is the one without the field."""
    model, dc = seeded_tiny(2)
    exact_fn = network(model, exact=True)
    fn64 = lambda x, t: 0.1 * exact_fn(x, t)  # noqa: E731 (`denoiser` under the exact contract)
    x0 = to_model_input(test_image(5, seed=6))
    D = x0.numel()
    params = dataclasses.replace(PARAMS, num_tiles=5, num_steps=6, exact=True, region_tiles=2)
    assert params.num_regions == 3 and [(r.start, r.stop) for r in params.regions()] == [(0, 2), (2, 4), (4, 5)]
    assert ProgressiveParams.unpack(params.pack(), num_tiles=5, tile_size=TILE) == params
    seen: list = []
    shown: list = []  # each boundary's tiles, copied during the call (`Boundary.tiles`: valid only then)

    def end(b):
        assert b.tiles is None or not b.tiles.flags.writeable
        seen.append(b)
        shown.append(None if b.tiles is None else b.tiles.copy())
        return pg.GO_ON

    enc = pg.encode(fn64, dc, x0, params, tiles_per_call=1, end=end)
    assert pg.encode(fn64, dc, x0, params, tiles_per_call=None).payload == enc.payload
    one = pg.encode(fn64, dc, x0, dataclasses.replace(params, region_tiles=0))
    assert one.payload != enc.payload  # the regions' own levels, permutations and pools
    assert pg.encode(fn64, dc, x0, dataclasses.replace(params, region_tiles=5)).payload == one.payload
    assert abs(len(enc.payload) - len(one.payload)) < 0.2 * len(one.payload)  # other samples: other bits
    run = syntax.read_stages(syntax.TwinReader(enc.payload, 8 * len(enc.payload), syntax.pad_words(params, D)),
                             syntax.Syntax(params, D), params.num_steps)
    assert run.stop == "complete" and all(len(st.parts()) == 3 for st in run.stages)
    assert [len(st.indices) for st in run.stages[1:]] == list(enc.num_chunks[1:])
    dec = pg.decode(fn64, dc, enc.payload, enc.params, tiles_per_call=2)
    assert dec.complete and torch.equal(dec.x0, x0.double()) and dec.pixels_checked
    models = pg._pixel_params(*_pixel_step(fn64, dc, enc, x0), enc.params)
    expected = _bisected_prefixes(enc, D, models)
    np.testing.assert_array_equal(enc.prefix_bits, expected)
    assert dec.bits_used == expected[-1]
    assert seen[-1].stages == params.num_stages and seen[-1].payload_bits() == expected[-1]
    for b, tiles in zip(seen[:-1], shown):
        cut = pg.decode(fn64, dc, b.payload(), enc.params, tiles_per_call=3)
        assert cut.stages == b.stages and np.array_equal(from_model_output(cut.x0), tiles)
    # a file cut inside the pixel stage: every latent stage, then x^_0 of y_0, not the pixels
    short = pg.decode(fn64, dc, enc.payload[: (expected[-2] + expected[-1]) // 16], enc.params)
    assert short.stages == params.num_steps and not short.complete
    np.testing.assert_array_equal(from_model_output(short.x0), shown[-2])
    # a float32 stream: each region's tiles in one network call on both sides, as the encoder made them
    fn32 = denoiser(model)
    params32 = dataclasses.replace(params, exact=False)
    enc32 = pg.encode(fn32, dc, x0, params32)
    dec32 = pg.decode(fn32, dc, enc32.payload, enc32.params)
    assert dec32.complete and torch.equal(dec32.x0, x0) and dec32.bits_used == enc32.prefix_bits[-1]


def test_a_stream_in_regions_is_decoded_a_region_at_a_time_through_every_stage():
    """The decoder of a stream in regions takes each region through every stage before the
    next (it holds x^_0 and the pixels for the image, not the latent): its progress comes once
    per stage and region, region by region, the pixel stage's included; what it keeps (``keep_all``) is each stage's whole
    latent, whose x^_0 is the network's on it, the last one's the fallback; a prefix's DDIM
    reconstruction is the DDIM chain from its last latent; all alike whatever the slices."""
    model, dc = seeded_tiny(2)
    exact_fn = network(model, exact=True)
    fn64 = lambda x, t: 0.1 * exact_fn(x, t)  # noqa: E731 (`denoiser` under the exact contract)
    x0 = to_model_input(test_image(5, seed=7))
    params = dataclasses.replace(PARAMS, num_tiles=5, num_steps=6, exact=True, region_tiles=2)
    enc = pg.encode(fn64, dc, x0, params, tiles_per_call=2)
    S, s = params.num_steps, pg.coded_schedule(dc, params.num_steps, params.spacing)
    calls: list[int] = []
    dec = pg.decode(fn64, dc, enc.payload, enc.params, keep_all=True, progress=calls.append, tiles_per_call=2)
    assert dec.complete and torch.equal(dec.x0, x0.double())
    assert calls == (list(range(S)) + [S]) * params.num_regions  # each region: its stages, then its pixels
    assert len(dec.latents) == len(dec.xstart) == S and dec.fallback is dec.xstart[-1]
    for j, (latent, xstart) in enumerate(zip(dec.latents, dec.xstart)):
        t = torch.full((5,), S - 1 - j, dtype=torch.long)
        out = fn64(latent, torch.from_numpy(s.timesteps)[t]).double()
        assert torch.equal(xstart, p_xstart(s, out, latent, t, var_type=dc.var_type,
                                            clip_denoised=params.clip_denoised))
    other = pg.decode(fn64, dc, enc.payload, enc.params, keep_all=True, tiles_per_call=1)
    assert all(torch.equal(a, b) for a, b in zip(dec.latents + dec.xstart, other.latents + other.xstart))
    mid = int(enc.prefix_bits[3])
    ddim = pg.decode(fn64, dc, enc.payload, enc.params, num_bits=mid, reconstruction="ddim", keep_all=True,
                     tiles_per_call=2)
    assert ddim.stages == 4 and not ddim.complete
    k = S - ddim.stages
    chain = pg.ddim_reconstruct(fn64, s, ddim.latents[-1], k, var_type=dc.var_type,
                                clip_denoised=params.clip_denoised)
    assert torch.equal(ddim.x0, chain) and not torch.equal(ddim.x0, ddim.xstart[-1])


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_setup(tmp_path):
    from PIL import Image

    from diffcodec.checkpoint import save_checkpoint

    model, dc = seeded_tiny(3)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model, preset("tiny")[0], dc, meta={"weights": "random"}, dtype=torch.float32)
    img = np.repeat(np.repeat(test_image(1, seed=5)[0], 2, axis=0), 2, axis=1)[:30, :27]  # 30x27: one padded tile
    Image.fromarray(img).save(tmp_path / "img.png")
    return tmp_path, ckpt, img


def r_cut_stages(rep: dict, stage: int) -> int:
    """Stages a file cut at the byte after stage ``stage``'s shortest prefix delivers (its whole group)."""
    header_bits = rep["header_bytes"] * 8
    bits = 8 * ((rep["stages"][stage]["file_bits"] + 7) // 8)
    return sum(1 for st in rep["stages"][:-1] if st["file_bits"] <= bits) if bits >= header_bits else 0


def run_cli(argv, capsys):
    from diffcodec.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_progressive_round_trip_and_prefixes(cli_setup, capsys):
    import json

    from PIL import Image

    tmp, ckpt, img = cli_setup
    dfc = tmp / "img.dfc"
    code, out, err = run_cli(["encode", tmp / "img.png", "-o", dfc, "-c", ckpt, "--progressive", "--steps", 3,
                              "--chunk-bits", 6, "--json", "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["mode"] == "progressive" and rep["file_bytes"] == dfc.stat().st_size and len(rep["stages"]) == 4
    assert rep["bits_per_pixel"] == pytest.approx(8 * rep["file_bytes"] / (30 * 27))  # 30x27 image pixels
    assert rep["num_checks"] >= 1 and rep["check_bits"] == 16 * rep["num_checks"]
    # the whole file: lossless, verified
    code, out, err = run_cli(["decode", dfc, "-o", tmp / "full.png", "-c", ckpt, "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["verified"] and r["stages"] == 4
    np.testing.assert_array_equal(np.asarray(Image.open(tmp / "full.png")), img)
    # --bits at a stage boundary, --upto, and a file cut short on disk: lossy, stage reported
    bits = rep["stages"][1]["file_bits"]
    code, out, err = run_cli(["decode", dfc, "-o", tmp / "b.png", "-c", ckpt, "--bits", bits, "--json",
                              "--device", "cpu", "--reconstruction", "ddim"], capsys)
    r = json.loads(out)
    assert code == 0 and not r["verified"] and r["stages"] == 2 and r["bits_used"] == bits
    assert np.asarray(Image.open(tmp / "b.png")).shape == img.shape
    code, out, err = run_cli(["decode", dfc, "-o", tmp / "u.png", "-c", ckpt, "--upto", 1, "--json",
                              "--device", "cpu"], capsys)
    assert code == 0 and json.loads(out)["stages"] == 1
    cut = tmp / "cut.dfc"
    cut.write_bytes(dfc.read_bytes()[: (rep["stages"][2]["file_bits"] + 7) // 8])
    code, out, err = run_cli(["decode", cut, "-o", tmp / "c.png", "-c", ckpt, "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"stage {r_cut_stages(rep, 2)} of 4" in out and "cut short" in out
    # too few bits for the header: one line, nothing written
    code, out, err = run_cli(["decode", dfc, "-o", tmp / "h.png", "-c", ckpt, "--bits", 16, "--device", "cpu"],
                             capsys)
    assert code == 2 and err.startswith("diffcodec: error:") and not (tmp / "h.png").exists()


def test_damaged_payload_decodes_only_its_intact_stages(coded):
    """A flipped bit anywhere in the payload: the decoder uses only the stages before the
    first failed check (their image is the clean prefix's, bit for bit) and says why it
    stopped; it never returns a wrong latent or wrong pixels as the coded ones."""
    fn, dc, tiles, x0, enc = coded
    K = PARAMS.num_steps
    clean = {s: pg.decode(fn, dc, enc.payload, enc.params, upto=s).x0 for s in range(1, K + 1)}
    stops = set()
    for pos in range(0, len(enc.payload), max(1, len(enc.payload) // 19)):
        bad = bytearray(enc.payload)
        bad[pos] ^= 1 << (pos % 8)
        try:
            dec = pg.decode(fn, dc, bytes(bad), enc.params)
        except DiffcodecError as e:  # damage before the first check
            assert "damaged" in str(e) or "no complete stage" in str(e)
            stops.add("none")
            continue
        stops.add(dec.stop)
        if dec.stop == "complete":  # every check passed: the flip hit the pixel stage
            if dec.complete:
                # the caller's checksum refuses it (version 3 on: the closing check, which the flip may hit)
                assert dec.stages == K + 1 and (not torch.equal(dec.x0, x0) or dec.pixels_checked is False)
            else:  # the pixel stage does not decode (version 3 on: its closing check not reached)
                assert dec.diverged or (enc.params.version >= 3 and dec.pixels_checked is None)
                assert dec.stages == K and torch.equal(dec.x0, clean[K])
            continue
        assert dec.stop in ("check", "end") and 1 <= dec.stages <= K
        assert torch.equal(dec.x0, clean[dec.stages]), f"byte {pos}: a damaged stage was used"
    assert "check" in stops  # the checks, not only the coder's own invalid-data errors, catch damage


def test_stream_without_checks_still_decodes_stage_by_stage():
    """Block version 1 (no integrity checks, as diffcodec 0.3 wrote and bits-back's bootstrap
    still writes): every stage is its own prefix."""
    model, dc = seeded_tiny(0)
    fn = denoiser(model)
    x0 = to_model_input(test_image(1, seed=7))
    params = dataclasses.replace(PARAMS, num_tiles=1, num_steps=4, check_bits=0, version=1)
    assert params.pack()[0] == 1 and len(params.pack()) == 23
    enc = pg.encode(fn, dc, x0, params)
    assert enc.num_checks == 0 and np.all(np.diff(enc.prefix_bits) > 0)
    for stage in range(4):
        assert pg.decode(fn, dc, enc.payload, enc.params, num_bits=int(enc.prefix_bits[stage])).stages == stage + 1
    assert torch.equal(pg.decode(fn, dc, enc.payload, enc.params).x0, x0)
    with_checks = pg.encode(fn, dc, x0, dataclasses.replace(params, check_bits=16, version=2))
    assert with_checks.num_checks >= 1 and with_checks.params.pack()[0] == 2
    assert len(with_checks.payload) >= len(enc.payload)


def test_version_3_sends_x_T_free_and_skips_stages_below_min_stage_bits():
    """Stream version 3: stage 0 (x_T) costs no bits; a stage whose KL is below
    min_stage_bits is skipped (its latent never made) and the next one is sent over the merged
    steps; every prefix still decodes, the full stream is lossless and its closing check
    verifies it."""
    model, dc = seeded_tiny(0)
    fn = denoiser(model)
    x0 = to_model_input(test_image(1, seed=3))
    base = dataclasses.replace(PARAMS, num_tiles=1, num_steps=8, check_bits=0)
    plain = pg.encode(fn, dc, x0, base)
    assert plain.prefix_bits[0] == 0 and plain.levels[0] == 0 and (plain.levels[1:] > 0).all()
    first = pg.decode(fn, dc, plain.payload, plain.params, num_bits=0)
    assert first.stages == 1 and first.timestep == 999  # x_T from the seed alone
    threshold = float(np.ceil(4 * np.median(plain.kl_bits[1:-2])) / 4)
    merged = pg.encode(fn, dc, x0, dataclasses.replace(base, min_stage_bits=threshold, check_bits=16))
    skipped = np.flatnonzero(merged.levels == 0)
    assert skipped[0] == 0 and len(skipped) >= 2 and merged.levels[-1] > 0  # y_0 is never skipped
    coded = merged.levels[1:] > 0
    assert np.all(merged.kl_bits[1:-2][coded[:-1]] >= threshold)  # each coded stage (but y_0) carries enough
    full = pg.decode(fn, dc, merged.payload, merged.params, keep_all=True)
    assert full.complete and full.pixels_checked is True and torch.equal(full.x0, x0)
    for stage in skipped[1:]:  # a skipped stage leaves the reconstruction as it was
        assert torch.equal(full.xstart[stage], full.xstart[stage - 1])
    mse = [float(((x - x0) ** 2).mean()) * 127.5**2 for x in full.xstart]
    np.testing.assert_allclose(mse, merged.xstart_mse, rtol=1e-4)
    for stage in range(merged.params.num_steps):
        dec = pg.decode(fn, dc, merged.payload, merged.params, num_bits=int(merged.prefix_bits[stage]))
        assert dec.stages >= stage + 1 and not dec.complete
    # the closing check: another value there is reported, never taken for the coded pixels
    bad = bytearray(merged.payload)
    bad[len(bad) // 2] ^= 0x10  # a byte the stream uses (the last one may hold only flush bits)
    dec = pg.decode(fn, dc, bytes(bad), merged.params)
    assert dec.pixels_checked is not True
