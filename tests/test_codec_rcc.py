"""Reverse channel coding: shared candidates, the PFR choice is a sample of q, index costs."""

import math

import numpy as np
import pytest
from scipy import stats

from diffcodec.codec import rcc
from diffcodec.codec.entropy import RangeDecoder, RangeEncoder


def pfr_select(log_weight, key, num_candidates):
    """One chunk's PFR choice (`rcc.pfr_select_many` of one task)."""
    return rcc.pfr_select_many([(log_weight, key, num_candidates)])[0]


def ideal_index_bits(index: int, kl_bits: float, max_exponent: int) -> float:
    """Ideal code length (bits) of an index under the (non-adapted) prior law."""
    m, _ = rcc.split_index(index)
    p = rcc.exponent_prior(kl_bits, max_exponent)
    return -math.log2(p[m] / p.sum()) + math.log2(rcc.mantissa_size(m))


def test_candidates_are_random_access_standard_normals():
    key = (3, 1, 4)
    block = rcc.candidate_normals(key, 0, 4000, 5)
    assert block.dtype == np.float32 and block.shape == (4000, 5)
    # any candidate can be made alone, bit for bit (the decoder makes exactly one)
    for n in (0, 1, 17, 3999):
        np.testing.assert_array_equal(rcc.candidate_normals(key, n, 1, 5)[0], block[n])
        np.testing.assert_array_equal(rcc.pfr_decode(key, n, 5), block[n])
    np.testing.assert_array_equal(rcc.candidate_normals(key, 10, 3, 5), block[10:13])
    # another key gives other candidates; the values are N(0, 1)
    assert not np.array_equal(rcc.candidate_normals((3, 1, 5), 0, 4000, 5), block)
    flat = block.ravel().astype(np.float64)
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 4 / math.sqrt(flat.size)
    assert abs(flat.var() - 1) < 4 * math.sqrt(2 / flat.size)
    with pytest.raises(ValueError):
        rcc.candidate_normals((-1,), 0, 1, 1)


def test_log_weight_is_log_density_ratio():
    rng = np.random.default_rng(0)
    d = 6
    qm, pm = rng.normal(size=d), rng.normal(size=d)
    qv, pv = rng.normal(size=d) * 0.5, rng.normal(size=d) * 0.5
    lw = rcc.LogWeight.of_gaussians(qm, qv, pm, pv)
    u = rng.normal(size=(10, d))
    z = pm + np.exp(0.5 * pv) * u
    expected = (stats.norm.logpdf(z, qm, np.exp(0.5 * qv)) - stats.norm.logpdf(z, pm, np.exp(0.5 * pv))).sum(1)
    np.testing.assert_allclose(lw(u), expected, rtol=1e-10, atol=1e-10)
    # equal variances: no quadratic term
    assert np.all(rcc.LogWeight.of_gaussians(qm, pv, pm, pv).a == 0)
    # the KL is the mean log weight under q
    kl_nats = rcc.gaussian_kl_bits(qm, qv, pm, pv).sum() * math.log(2)
    zq = qm + np.exp(0.5 * qv) * rng.normal(size=(200_000, d))
    assert lw((zq - pm) / np.exp(0.5 * pv)).mean() == pytest.approx(kl_nats, abs=0.02)


@pytest.mark.parametrize("q_mean,q_std", [(0.9, 1.0), (0.5, 0.6)])
def test_selected_sample_is_distributed_as_q(q_mean, q_std):
    """p = N(0, 1); q = N(q_mean, q_std^2) (equal variances: linear weights; smaller: quadratic)."""
    lw = rcc.LogWeight.of_gaussians([q_mean], [2 * math.log(q_std)], [0.0], [0.0])
    kl_bits = float(rcc.gaussian_kl_bits(q_mean, 2 * math.log(q_std), 0.0, 0.0))
    assert 0.3 < kl_bits < 1.5
    num = 2**10  # about 2^(KL + 9): truncation is negligible
    z = np.array([rcc.pfr_decode((s, 0), pfr_select(lw, (s, 0), num), 1)[0] for s in range(1500)],
                 dtype=np.float64)
    n = len(z)
    assert abs(z.mean() - q_mean) < 4 * q_std / math.sqrt(n)
    assert abs(z.var() / q_std**2 - 1) < 4 * math.sqrt(2 / n)
    assert stats.kstest(z, "norm", args=(q_mean, q_std)).pvalue > 1e-3
    # and it is not a sample of p
    assert stats.kstest(z, "norm").pvalue < 1e-6


def test_selection_is_deterministic_and_argmin():
    rng = np.random.default_rng(1)
    d, num, key = 4, 300, (9, 2, 6)
    lw = rcc.LogWeight.of_gaussians(rng.normal(size=d), np.zeros(d), np.zeros(d), np.zeros(d))
    n = pfr_select(lw, key, num)
    assert n == pfr_select(lw, key, num)
    scores = rcc.arrival_log_times(key, num) - lw(rcc.candidate_normals(key, 0, num, d))
    assert n == int(np.argmin(scores))
    # a larger search can only find an equal or better (lower) score
    m = pfr_select(lw, key, 4 * num)
    scores4 = rcc.arrival_log_times(key, 4 * num) - lw(rcc.candidate_normals(key, 0, 4 * num, d))
    assert scores4[m] <= scores4[n] + 1e-9



def test_many_chunks_on_threads_choose_as_one_by_one():
    # wide chunks span many candidate blocks (2^20 elements each), narrow ones a single block
    rng = np.random.default_rng(2)
    tasks = []
    for c, d in enumerate((3072, 700, 5, 1)):
        lw = rcc.LogWeight.of_gaussians(0.2 * rng.normal(size=d), np.zeros(d), np.zeros(d),
                                        np.log(rng.uniform(1.0, 1.3, size=d)))
        tasks.append((lw, (4, 7, 1 + c), 3000))
    one_by_one = [pfr_select(*t) for t in tasks]
    assert rcc.pfr_select_many(tasks, workers=1) == one_by_one
    assert rcc.pfr_select_many(tasks, workers=3) == one_by_one
    d = 3072  # the argmin over all 3000 candidates of the widest chunk, computed directly
    scores = rcc.arrival_log_times((4, 7, 1), 3000) - tasks[0][0](rcc.candidate_normals((4, 7, 1), 0, 3000, d))
    assert one_by_one[0] == int(np.argmin(scores))
    assert rcc.pfr_select_many([], workers=2) == []
    with pytest.raises(ValueError, match="num_candidates"):
        rcc.pfr_select_many([(tasks[3][0], (1,), 0)])

@pytest.mark.parametrize("dims", [1, 2, 7, 64, 439, 440])
def test_search_scores_are_the_log_weights_of_the_candidates(dims):
    """The search's own evaluation (split cos / sin parts, one dot product per candidate) gives
    the log weights of exactly the candidates `candidate_normals` makes, to float32 rounding."""
    rng = np.random.default_rng(dims)
    lw = rcc.LogWeight.of_gaussians(rng.normal(size=dims), rng.normal(size=dims) * 0.5,
                                    rng.normal(size=dims) * 0.3, rng.normal(size=dims) * 0.3)
    count, start = 257, 1000
    h = (dims + 1) // 2
    bitgen = np.random.PCG64(np.random.SeedSequence([5, dims]))
    bitgen.advance(start * h)
    raw = bitgen.random_raw(count * h).reshape(count, h)
    got = rcc._search_log_weights(raw, rcc._search_coefficients(lw))
    assert got.dtype == np.float32 and got.shape == (count,)
    u = rcc.candidate_normals((5, dims), start, count, dims).astype(np.float64)
    a, b = lw.a.astype(np.float32).astype(np.float64), lw.b.astype(np.float32).astype(np.float64)
    terms = a * u * u + b * u
    scale = (np.abs(a * u * u) + np.abs(b * u)).sum(axis=1)  # what float32 rounding is relative to
    np.testing.assert_array_less(np.abs(got - terms.sum(axis=1)), 2e-6 * scale * max(1.0, math.log2(dims)))
    # the old form of the search (the interleaved float32 normals) agrees as closely
    u32 = rcc.candidate_normals((5, dims), start, count, dims)
    old = ((lw.a.astype(np.float32) * u32 + lw.b.astype(np.float32)) * u32).sum(axis=1)
    np.testing.assert_array_less(np.abs(got - old), 4e-6 * scale * max(1.0, math.log2(dims)))


def _seeded_tasks(seed, dims_list, num):
    rng = np.random.default_rng(seed)
    tasks = []
    for c, d in enumerate(dims_list):
        lw = rcc.LogWeight.of_gaussians(0.3 * rng.normal(size=d), np.log(rng.uniform(0.6, 1.0, size=d)),
                                        np.zeros(d), np.zeros(d))
        tasks.append((lw, (seed, 11, c), num))
    return tasks


def test_search_chooses_the_reference_argmin_for_any_workers_and_blocks(monkeypatch):
    """`pfr_select_many` picks argmin_n log T_n - log w(u_n) computed directly (candidate_normals
    and `LogWeight` in float64) on seeded tasks, for any number of workers and any block sizes."""
    tasks = []
    for seed in range(4):
        tasks += _seeded_tasks(seed, (1, 2, 5, 64, 441, 440), 1500)
    reference = [int(np.argmin(rcc.arrival_log_times(key, num) - lw(rcc.candidate_normals(key, 0, num, len(lw.a)))))
                 for lw, key, num in tasks]
    assert rcc.pfr_select_many(tasks, workers=1) == reference
    assert rcc.pfr_select_many(tasks, workers=3) == reference
    # small blocks (many jobs) and small steps within them (down to one candidate at a time)
    monkeypatch.setattr(rcc, "_BLOCK_ELEMENTS", 1 << 15)
    monkeypatch.setattr(rcc, "_SUB_BLOCK_ELEMENTS", 1 << 12)
    assert rcc.pfr_select_many(tasks, workers=1) == reference
    assert rcc.pfr_select_many(tasks, workers=2) == reference
    monkeypatch.setattr(rcc, "_BLOCK_ELEMENTS", 1 << 9)
    monkeypatch.setattr(rcc, "_SUB_BLOCK_ELEMENTS", 1)
    few = [0, 2, 6, 8]  # d = 1, 5, 1, 5: one candidate per step, a few hundred per block
    assert rcc.pfr_select_many([tasks[k] for k in few], workers=2) == [reference[k] for k in few]


def test_greedy_chooses_the_largest_log_weight_for_any_workers_and_blocks(monkeypatch):
    """`greedy_select_many` picks argmax_n log w(u_n) computed directly (float64), like the
    PFR search for any number of workers and block sizes, and `select_many` names both rules."""
    tasks = []
    for seed in range(4):
        tasks += _seeded_tasks(seed, (1, 2, 5, 64, 441, 440), 1500)
    reference = [int(np.argmax(lw(rcc.candidate_normals(key, 0, num, len(lw.a))))) for lw, key, num in tasks]
    assert rcc.greedy_select_many(tasks, workers=1) == reference
    assert rcc.select_many(tasks, rule="greedy", workers=3) == reference
    assert rcc.select_many(tasks, rule="pfr") == rcc.pfr_select_many(tasks)
    assert reference != rcc.pfr_select_many(tasks)  # the two rules choose differently
    monkeypatch.setattr(rcc, "_BLOCK_ELEMENTS", 1 << 15)
    monkeypatch.setattr(rcc, "_SUB_BLOCK_ELEMENTS", 1 << 12)
    assert rcc.greedy_select_many(tasks, workers=2) == reference
    with pytest.raises(ValueError, match="unknown selection rule"):
        rcc.select_many(tasks, rule="best")


def test_greedy_delivers_more_than_pfr_from_the_same_candidates():
    """Chunks of 12 bits of KL (a mean shift over 16 dimensions), 2^14 candidates each: the
    greedy choice's log2 q/p is about the KL (the largest of 2^14 projections is ~4 std), PFR's
    clearly less (its budget is 2^2 x 2^KL, not enough for an exact sample), and the greedy
    index, uniform on 0..N-1, has the exponents of a uniform index."""
    rng = np.random.default_rng(5)
    d, num, kl_bits = 16, 1 << 14, 12.0
    tasks = []
    for c in range(64):
        shift = rng.normal(size=d)
        shift *= math.sqrt(2 * kl_bits * math.log(2)) / np.linalg.norm(shift)
        tasks.append((rcc.LogWeight.of_gaussians(shift, np.zeros(d), np.zeros(d), np.zeros(d)), (21, 3, c), num))

    def delivered(indices):
        return np.array([lw(rcc.pfr_decode(key, n, d)[None])[0] / math.log(2) for (lw, key, _), n in zip(tasks, indices)])

    greedy, pfr = delivered(rcc.greedy_select_many(tasks)), delivered(rcc.pfr_select_many(tasks))
    assert 0.85 * kl_bits < greedy.mean() < 1.05 * kl_bits
    assert pfr.mean() < 0.85 * kl_bits and greedy.mean() > pfr.mean() + 1.5
    exponents = np.array([rcc.split_index(n)[0] for n in rcc.greedy_select_many(tasks)])
    assert np.mean(exponents >= 13) > 0.55  # P(index >= 2^12) = 3/4 for a uniform index (PFR here: 0.16)


def test_index_split_and_law():
    for index in [0, 1, 2, 3, 4, 7, 8, 1000, 2**16 - 1]:
        m, r = rcc.split_index(index)
        assert rcc.join_index(m, r) == index
        assert 0 <= r < rcc.mantissa_size(m)
    assert rcc.split_index(0) == (0, 0) and rcc.split_index(1) == (1, 0) and rcc.split_index(5) == (3, 1)
    for kl in [0.0, 0.3, 2.0, 9.0, 30.0]:
        p = rcc.exponent_prior(kl, 16)
        assert p.shape == (17,) and p.sum() == pytest.approx(1) and p.min() >= 0.1 / 17 - 1e-12
    # mass moves to larger exponents as the KL grows
    means = [(rcc.exponent_prior(kl, 16) * np.arange(17)).sum() for kl in (0.1, 2, 8)]
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize("kl_bits", [1.0, 4.0])
def test_index_cost_is_about_kl_plus_log_kl(kl_bits):
    """The mean code length of the index: KL + log2(KL + 1) + O(1) (Li & El Gamal)."""
    d = 8
    shift = math.sqrt(2 * kl_bits * math.log(2) / d)
    lw = rcc.LogWeight.of_gaussians(np.full(d, shift), np.zeros(d), np.zeros(d), np.zeros(d))
    num = 2 ** math.ceil(kl_bits + 6)
    costs = [ideal_index_bits(pfr_select(lw, (s, 3), num), kl_bits, 16) for s in range(400)]
    mean_cost = float(np.mean(costs))
    assert kl_bits - 0.5 < mean_cost < kl_bits + math.log2(kl_bits + 1) + 3.0


def test_exponent_model_codes_indices_with_a_range_coder():
    """Both sides keep the same adaptive integer tables; indices round-trip through constriction."""
    rng = np.random.default_rng(2)
    kls = rng.uniform(0, 10, size=60)
    indices = [int(rng.integers(0, 2 ** min(16, int(k) + 3))) for k in kls]
    enc, model = RangeEncoder(), rcc.ExponentModel(16)
    for kl, index in zip(kls, indices):
        m, r = rcc.split_index(index)
        enc.encode_categorical(np.array([m]), model.probs(kl)[None])
        if rcc.mantissa_size(m) > 1:
            enc.encode_uniform(np.array([r]), rcc.mantissa_size(m))
        model.update(kl, m)
    dec, model2 = RangeDecoder(enc.words()), rcc.ExponentModel(16)
    out = []
    for kl in kls:
        probs = model2.probs(kl)
        assert np.all(probs == np.rint(probs)) and probs.min() >= 1
        m = int(dec.decode_categorical(probs[None])[0])
        r = int(dec.decode_uniform(rcc.mantissa_size(m), 1)[0]) if rcc.mantissa_size(m) > 1 else 0
        out.append(rcc.join_index(m, r))
        model2.update(kl, m)
    assert out == indices
    # adaptation: a table sharpens on what it sees
    model3 = rcc.ExponentModel(16)
    before = model3.probs(5.0)
    for _ in range(50):
        model3.update(5.0, 3)
    after = model3.probs(5.0)
    assert after[3] / after.sum() > before[3] / before.sum() + 0.5


def test_decoding_many_samples_at_once_gives_the_one_by_one_samples():
    """`pfr_decode_many` (a progressive stage's chunks in one call) returns exactly what
    `pfr_decode` returns chunk by chunk, under both transforms."""
    items = [((1, 2, c), index, dims) for c, (index, dims) in enumerate([(0, 5), (17, 64), (3, 1), (1000, 33)])]
    for exact_contract in (False, True):
        many = rcc.pfr_decode_many(items, exact_contract=exact_contract)
        one_by_one = [rcc.pfr_decode(key, index, dims, exact_contract=exact_contract) for key, index, dims in items]
        assert [m.dtype for m in many] == [np.float32] * 4
        assert all(np.array_equal(m, o) for m, o in zip(many, one_by_one))
    fast, exact_ = (rcc.pfr_decode(*items[1], exact_contract=flag) for flag in (False, True))
    assert 0 < np.abs(fast - exact_).max() < 1e-5  # two transforms of the same draws


def test_index_split_join_and_exponent_counts_on_arrays():
    """The array forms (what the codec uses) against Python's int.bit_length, index by index."""
    rng = np.random.default_rng(5)
    indices = np.concatenate([np.arange(70), [2**16 - 1, 2**16, 2**17 - 1], rng.integers(0, 2**17, 500)])
    exps, mants = rcc.split_index(indices)
    bit_length = [int(i).bit_length() for i in indices]
    assert exps.tolist() == bit_length
    assert mants.tolist() == [int(i) - (1 << (m - 1)) if m >= 2 else 0 for i, m in zip(indices, bit_length)]
    assert np.array_equal(rcc.join_index(exps, mants), indices)
    assert rcc.mantissa_size(exps).tolist() == [1 << (m - 1) if m >= 2 else 1 for m in bit_length]
    assert [rcc.split_index(int(i)) for i in indices[:70]] == list(zip(exps[:70].tolist(), mants[:70].tolist()))
    one, many = rcc.ExponentModel(17, exact_contract=True), rcc.ExponentModel(17, exact_contract=True)
    for e in exps:
        one.update(3.5, int(e))
    many.update(3.5, exps)
    assert np.array_equal(one.probs(3.5), many.probs(3.5))
    with pytest.raises(ValueError, match="negative"):
        rcc.split_index(np.array([3, -1]))
    with pytest.raises(IndexError):
        many.update(3.5, np.array([18]))


def test_kl_and_log_weight_coefficients_in_blocks_equal_the_whole_array_formulas():
    """`gaussian_kl_bits` and `rcc_pool.log_weight_coefficients` work in blocks of
    `rcc.KL_BLOCK` values (bounded temporaries on a photo): the same values as the formulas on
    the whole arrays, across block edges, with scalars broadcast."""
    import torch

    from diffcodec.codec import rcc_pool
    from diffcodec.losses import normal_kl_nats

    rng = np.random.default_rng(7)
    d = 2 * rcc.KL_BLOCK + 37
    qm, pm = rng.normal(size=d), rng.normal(size=d)
    qv, pv = rng.normal(size=d) - 2.0, rng.normal(size=d) - 1.0
    whole = (normal_kl_nats(*(torch.from_numpy(v) for v in (qm, qv, pm, pv))) / rcc.LN2).numpy()
    np.testing.assert_array_max_ulp(rcc.gaussian_kl_bits(qm, qv, pm, pv), whole, maxulp=1)
    a, b = rcc_pool.log_weight_coefficients(qm, qv, pm, pv)  # float32: the search's ranking
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_max_ulp(a, (0.5 * (1.0 - np.exp(pv - qv))).astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(b, (-(pm - qm) * np.exp(0.5 * pv - qv)).astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(rcc.gaussian_kl_bits(qm, qv, 0.0, 0.0),
                                    rcc.gaussian_kl_bits(qm, qv, np.zeros(d), np.zeros(d)), maxulp=0)
