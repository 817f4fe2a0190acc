"""How to choose the candidate a chunk of reverse channel coding sends: selection rules
compared at an equal number of candidates, by what a chain of stages pays for them.

    python -m bench.rcc_methods [--kl-bits 6,8,10,12,14,17,20] [--log2-candidates 12,16,20]
        [--trials 600] [--chunk-images 2] [--real-chunks 120] [--seed 0]
        [--out reports/rcc_methods.json]

The metric. A stage's sent latent x_t delivers log2 q(x_t | x_{t+1}, x_0) / p(x_t | x_{t+1})
bits ("sample bits"; the stage's KL on average for an exact sample of q). Under a model whose
p is the true reverse process the cost of everything after x_t is a constant minus exactly
that number, whatever law x_t was drawn from, so a stream costs the bound plus
sum over chunks (index bits I - delivered bits D), and when the shortfall of one stage is
coded again by later ones the overhead over the bound is about (I / D - 1) x the latent
stages' bound. The progressive stream of reports/progressive.json follows this to 5%:
payload - bound = 0.953 bits/dim against 0.903 from its latent stages' index bits minus
delivered bits, their checks and the pixel stage's coding (part D does the same per run). So each rule is scored by
I (ideal bits of its index), D = E[log2 w(sample)] (w = q / p), I / D, and D / KL (the
issue's "delivery"), with the law of the sample beside them (share of the mean shift
E[v] / mu, std of v, and the KL of a Gaussian fit of that law from q along the shift), since
a rule whose samples are far from q relies on the model to behave off its training law.

Rules, all over the same N i.i.d. candidates from p (the index is what is coded):

  pfr       truncated Poisson functional representation = ordered random coding (Li & El
            Gamal 2018; Theis & Yosri 2022): argmin_n log T_n - log w_n (the codec today);
            index coded by its exponent law (plug-in entropy) and uniform mantissa
  tempered  argmin_n log T_n - beta log w_n, beta = 2 (PFR towards a sharper target)
  mrc       minimal random coding (Havasi, Peharz, Hernandez-Lobato 2019): n drawn with
            probability w_n / sum w; the index is uniform, log2 N bits
  greedy    argmax_n log w_n: the candidate that delivers most; the index of the largest of
            N i.i.d. values is uniform, log2 N bits (`rcc.greedy_select_many`). Picking
            codebook noise by its inner product with the residual is how DDCM (Ohayon et al.
            2025) codes images with a diffusion model; here it is one rule among these, scored
            by the chain's I - D
  sp-pfr    space partitioning (He, Flamich, Hernandez-Lobato, NeurIPS 2024): the signs of 2P
            dimensions split p into J = 4^P equal-mass bins both sides can form (in the codec:
            the top two bits of a Box-Muller pair's angle); bin j has its own candidates from
            p restricted to it and its own Poisson process of rate pi(j), pi = q's bin masses
            over the M most likely bins (the search heuristic); the winner of
            log T - log (q / p') (p' = sum_j pi(j) p|_bin j) is sent as (j, m): log2 J bits
            plus m's exponent law. Exact when all bins are searched; here truncated to N
            evaluations in all
  sp-greedy the same bins, argmax log w over the N candidates of the M best bins, sent as
            one index of N' = J N / M (log2 N' bits)
  The split dimensions are either the chunk's first 2P ("random": what a decoder can form
  without side information, the chunk's dimensions being a keyed permutation) or the 2P
  with the largest |mean shift| ("oracle": an upper bound on any decoder-side heuristic).

Part A: the 1-D equivalent of a chunk with equal variances (`bench.rcc_redundancy`: only
v = e . u, the projection on the unit shift e, matters; log w = mu v - mu^2 / 2, KL =
mu^2 / 2 nats), every KL x N cell, every rule but space partitioning (which needs the
dimensions). Part B: real chunks, recorded from the progressive encoder on the first
``--chunk-images`` CIFAR-10 test images (float32 arithmetic, the default 50 steps, 14-bit
chunks; their log weights a u^2 + b u + c with the fixedlarge quadratic term), of those with
at most 256 dimensions (the late stages: about 83% of the chunks' KL), every rule at 2^16
evaluations. Then each rule's search time per chunk in `rcc.select_many` (pfr and greedy: the
codec's kernels), 1 thread; and part D: the real streams of `bench.rcc_chain` runs
(reports/rcc_chain_*.json, or --chain), with the decision drawn from all of it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.special import ndtr

from bench.common import REPORTS_DIR, module_command, provenance, run_main, write_json, write_text
from bench.rcc_redundancy import _floats, _ints, check_grid, index_entropy_bits

LN2 = math.log(2.0)
RULES_1D = ("pfr", "tempered", "mrc", "greedy")
TEMPER = 2.0  # beta of the tempered rule
REAL_LOG2_N = 16  # evaluations per real chunk (the codec's budget)
MAX_REAL_DIMS = 256
SP_CONFIGS = ((2, 1), (4, 16), (6, 64))  # (pairs P, searched bins M) of the space-partitioning rules


# ----------------------------------------------------------------------------- part A (1-D)


def select_1d(rule: str, mu: float, v: np.ndarray, log_t: np.ndarray, gumbel: np.ndarray) -> np.ndarray:
    """The chosen index of each row of v [B, N] (projections of the candidates on the shift)."""
    if rule == "pfr":
        return np.argmin(log_t - mu * v, axis=1)
    if rule == "tempered":
        return np.argmin(log_t - TEMPER * mu * v, axis=1)
    if rule == "mrc":
        return np.argmax(mu * v + gumbel, axis=1)  # Gumbel-max: n with probability w_n / sum w
    if rule == "greedy":
        return np.argmax(v, axis=1)
    raise ValueError(f"unknown rule {rule!r}")


def uniform_index(rule: str) -> bool:
    """Whether the rule's index is uniform on 0..N-1 (coded in log2 N bits)."""
    return rule in ("mrc", "greedy", "sp-greedy")


def score_cell(kl_bits: float, log2_n: float, rule: str, indices: np.ndarray, v: np.ndarray) -> dict[str, Any]:
    """The metrics of one (KL, N, rule) cell from the chosen indices and their projections v."""
    mu = math.sqrt(2.0 * kl_bits * LN2)
    index_bits = log2_n if uniform_index(rule) else index_entropy_bits(indices)
    delivered = float(np.mean(mu * v - 0.5 * mu * mu)) / LN2
    mean, var = float(v.mean()), float(v.var())
    law_kl = 0.5 * (var + (mean - mu) ** 2 - 1.0 - math.log(max(var, 1e-300))) / LN2
    return {
        "kl_bits": kl_bits, "log2_candidates": log2_n, "rule": rule, "trials": int(len(v)),
        "index_bits": index_bits, "delivered_bits": delivered,
        "delivery": delivered / kl_bits,
        "index_per_delivered": index_bits / delivered if delivered > 0 else math.inf,
        "net_bits": index_bits - delivered,
        "shift_share": mean / mu, "sample_std": math.sqrt(var), "law_kl_bits": law_kl,
    }


def part_a(kls: list[float], log2_ns: list[int], trials: int, rng: np.random.Generator,
           progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every rule on the same candidates (common random numbers) for each N; all KLs."""
    rows = []
    for log2_n in log2_ns:
        n = 1 << log2_n
        batch = max(1, min(trials, (1 << 22) // n))
        picks: dict[tuple[float, str], tuple[list, list]] = {}
        done = 0
        while done < trials:
            b = min(batch, trials - done)
            v = rng.standard_normal((b, n))
            log_t = np.log(np.cumsum(rng.standard_exponential((b, n)), axis=1))
            gumbel = -np.log(rng.standard_exponential((b, n)))
            for kl in kls:
                mu = math.sqrt(2.0 * kl * LN2)
                for rule in RULES_1D:
                    idx = select_1d(rule, mu, v, log_t, gumbel)
                    got = picks.setdefault((kl, rule), ([], []))
                    got[0].append(idx)
                    got[1].append(v[np.arange(b), idx])
            done += b
        for (kl, rule), (idx, vals) in picks.items():
            rows.append(score_cell(kl, float(log2_n), rule, np.concatenate(idx), np.concatenate(vals)))
        progress(f"part A: 2^{log2_n} candidates done")
    return rows


# ------------------------------------------------------------------------ part B (real chunks)


def record_chunks(num_images: int, progress: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The chunks the progressive encoder searches on the first CIFAR-10 test images (float32
    arithmetic, default parameters, PFR): per chunk its stage, dimensions, log-weight
    coefficients a, b (concatenated) and c (nats), KL (bits) and the codec's own budget."""
    from unittest import mock

    import torch

    from bench.common import resolve_data
    from diffcodec.checkpoint import load_checkpoint
    from diffcodec.codec import api, rcc
    from diffcodec.data import read_images

    loaded = load_checkpoint(None, device="cpu")
    images = read_images(resolve_data(None), limit=num_images).images
    recorded: list[tuple[int, np.ndarray, np.ndarray, float, int]] = []
    select = rcc.pfr_select_many

    def recording(tasks, *, workers: int = 1):
        for lw, key, num in tasks:
            recorded.append((int(key[1]), lw.a.copy(), lw.b.copy(), float(lw.c), int(num)))
        return select(tasks, workers=workers)

    torch.set_num_threads(1)
    with mock.patch.object(rcc, "pfr_select_many", recording):
        for i, image in enumerate(images):
            api.encode([image], model=loaded, mode="progressive", workers=1, arithmetic="float32")
            progress(f"recorded the chunks of image {i} ({len(recorded)} so far)")
    a = [r[1] for r in recorded]
    b = [r[2] for r in recorded]
    return {
        "stage": np.array([r[0] for r in recorded]), "dims": np.array([len(x) for x in a]),
        "a": np.concatenate(a), "b": np.concatenate(b), "c": np.array([r[3] for r in recorded]),
        "kl_bits": np.array([chunk_kl_bits(x, y) for x, y in zip(a, b)]),
        "codec_log2_n": np.log2([r[4] for r in recorded]),
    }


def chunk_kl_bits(a: np.ndarray, b: np.ndarray) -> float:
    """KL(q || p) in bits of the chunk whose log weight is a u^2 + b u + c (p = N(0, I) in u):
    q = N(m, s^2), 1 / s^2 = 1 - 2a, m = b s^2."""
    s2 = 1.0 / (1.0 - 2.0 * np.asarray(a, dtype=np.float64))
    m = np.asarray(b, dtype=np.float64) * s2
    return float(np.sum(0.5 * (s2 + m * m - 1.0 - np.log(s2)))) / LN2


def _log_w(u: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (u * u) @ a + u @ b


def _sign_bins(a: np.ndarray, b: np.ndarray, split: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_bins`` most likely sign patterns of the split dimensions under q: (signs
    [M, k] in +-1, their q masses [M]), most likely first."""
    s2 = 1.0 / (1.0 - 2.0 * a[split])
    p_plus = ndtr(b[split] * s2 / np.sqrt(s2))  # q(u_i > 0) = Phi(m_i / s_i)
    k = len(split)
    patterns = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1) * 2 - 1
    log_mass = np.where(patterns > 0, np.log(p_plus), np.log1p(-p_plus)).sum(1)
    best = np.argsort(-log_mass, kind="stable")[:num_bins]
    return patterns[best], np.exp(log_mass[best])


def real_chunk_rules(a: np.ndarray, b: np.ndarray, c: float, log2_n: int, rng: np.random.Generator
                     ) -> dict[str, tuple[float, float, int]]:
    """Every rule on one real chunk at 2^log2_n evaluations: rule -> (log2 of the uniform
    index range or nan, delivered log2 w of the sample, coded index or local index m)."""
    n, d = 1 << log2_n, len(a)
    out: dict[str, tuple[float, float, int]] = {}
    step = max(1, (1 << 20) // d)
    lw = np.concatenate([_log_w(rng.standard_normal((min(step, n - s), d)), a, b) for s in range(0, n, step)])
    log_t = np.log(np.cumsum(rng.standard_exponential(n)))
    gumbel = -np.log(rng.standard_exponential(n))
    for rule, score in (("pfr", log_t - lw), ("tempered", log_t - TEMPER * lw), ("mrc", -(lw + gumbel)),
                        ("greedy", -lw)):
        j = int(np.argmin(score))
        out[rule] = (float(log2_n) if uniform_index(rule) else math.nan, (lw[j] + c) / LN2, j)
    order = np.argsort(-np.abs(b * (1.0 / (1.0 - 2.0 * a))), kind="stable")
    for pairs, searched in SP_CONFIGS:
        k = min(2 * pairs, d - d % 2)
        for mode, split in (("random", np.arange(k)), ("oracle", np.sort(order[:k]))):
            signs, mass = _sign_bins(a, b, split, searched)
            num_bins = 1 << k
            pi = mass / mass.sum()
            # sp-greedy: N / M candidates in each searched bin
            per = n // len(signs)
            best, best_m = -math.inf, 0
            # sp-pfr: bin j gets pi_j N candidates, arrival times Gamma_m / pi_j; its score
            # log T - log(q / p') = log Gamma_m - log w + log J (pi cancels)
            best_pfr, pfr_m, pfr_w = math.inf, 0, 0.0
            for j, sign in enumerate(signs):
                for count, kind in ((per, "greedy"), (max(1, int(round(pi[j] * n))), "pfr")):
                    u = rng.standard_normal((count, d))
                    u[:, split] = np.abs(u[:, split]) * sign
                    w = _log_w(u, a, b)
                    if kind == "greedy":
                        i = int(np.argmax(w))
                        if w[i] > best:
                            best, best_m = float(w[i]), i
                    else:
                        s = np.log(np.cumsum(rng.standard_exponential(count))) - w
                        i = int(np.argmin(s))
                        if s[i] < best_pfr:
                            best_pfr, pfr_m, pfr_w = float(s[i]), i, float(w[i])
            tag = f"P{pairs}M{searched}-{mode}"
            out[f"sp-greedy {tag}"] = (math.log2(num_bins * per), (best + c) / LN2, best_m)
            out[f"sp-pfr {tag}"] = (float(k), (pfr_w + c) / LN2, pfr_m)  # log2 J + the local index m's law
    return out


def relative_index_bits(indices: np.ndarray, kl_bits: np.ndarray) -> float:
    """Ideal bits of indices pooled over chunks of different KL: the exponent m =
    bit_length(n) coded relative to its chunk's round(KL) (as the codec's law is conditioned on
    the KL), plug-in entropy with the Miller-Madow correction, plus the m - 1 mantissa bits."""
    exps = np.array([int(n).bit_length() for n in indices])
    rel = exps - np.rint(np.maximum(kl_bits, 0.0)).astype(np.int64)
    _, counts = np.unique(rel, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) + (len(counts) - 1) / (2 * len(indices) * LN2)
    return entropy + float(np.maximum(exps - 1, 0).mean())


def part_b(chunks: dict[str, np.ndarray], count: int, rng: np.random.Generator,
           progress: Callable[[str], None]) -> dict[str, Any]:
    """Every rule on ``count`` real chunks (those of at most MAX_REAL_DIMS dimensions, drawn at
    random), pooled: I / D over the chunks; uniform indices cost log2 N, the others
    `relative_index_bits`."""
    offsets = np.concatenate([[0], np.cumsum(chunks["dims"])])
    eligible = np.flatnonzero(chunks["dims"] <= MAX_REAL_DIMS)
    share = float(chunks["kl_bits"][eligible].sum() / chunks["kl_bits"].sum())
    chosen = np.sort(rng.choice(eligible, size=min(count, len(eligible)), replace=False))
    per_rule: dict[str, list[tuple[float, float, int]]] = {}
    kls = []
    for i, c in enumerate(chosen):
        sl = slice(offsets[c], offsets[c + 1])
        a, b = chunks["a"][sl].astype(np.float64), chunks["b"][sl].astype(np.float64)
        for rule, got in real_chunk_rules(a, b, float(chunks["c"][c]), REAL_LOG2_N, rng).items():
            per_rule.setdefault(rule, []).append(got)
        kls.append(float(chunks["kl_bits"][c]))
        if (i + 1) % 20 == 0:
            progress(f"part B: {i + 1} of {len(chosen)} real chunks")
    kl = np.array(kls)
    rows = []
    for rule, got in per_rule.items():
        fixed = np.array([g[0] for g in got])
        delivered = np.array([g[1] for g in got])
        index = np.array([g[2] for g in got], dtype=np.int64)
        if rule.startswith("sp-pfr"):  # log2 J, then the local index m (about 2^(KL - log2 J))
            bits = float(fixed.mean()) + relative_index_bits(index, kl - fixed)
        elif np.all(np.isfinite(fixed)):
            bits = float(fixed.mean())
        else:
            bits = relative_index_bits(index, kl)
        d = float(delivered.mean())
        rows.append({"rule": rule, "chunks": len(got), "kl_bits": float(kl.mean()), "index_bits": bits,
                     "delivered_bits": d, "delivery": d / float(kl.mean()),
                     "index_per_delivered": bits / d if d > 0 else math.inf, "net_bits": bits - d})
    return {"chunks_recorded": int(len(chunks["dims"])), "chunks_used": int(len(chosen)),
            "kl_share_of_eligible": share, "log2_candidates": REAL_LOG2_N,
            "stages": sorted({int(s) for s in chunks["stage"][chosen]}),
            "median_dims": float(np.median(chunks["dims"][chosen])), "rows": rows}


def chunk_summary(chunks: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per stage range: chunks, median dimensions, mean and spread of their KL, the share of
    the KL held by the top quarter of each chunk's dimensions, the quadratic (variance) part."""
    offsets = np.concatenate([[0], np.cumsum(chunks["dims"])])
    out = []
    for lo, hi in ((1, 20), (20, 35), (35, 42), (42, 46), (46, 50)):
        sel = np.flatnonzero((chunks["stage"] >= lo) & (chunks["stage"] < hi))
        if not len(sel):
            continue
        top, var_part = [], []
        for c in sel:
            a = chunks["a"][offsets[c]:offsets[c + 1]].astype(np.float64)
            b = chunks["b"][offsets[c]:offsets[c + 1]].astype(np.float64)
            s2 = 1.0 / (1.0 - 2.0 * a)
            mean_part, variance = 0.5 * (b * s2) ** 2, 0.5 * (s2 - 1.0 - np.log(s2))
            per_dim = np.sort(mean_part + variance)[::-1]
            top.append(per_dim[: max(1, len(per_dim) // 4)].sum() / per_dim.sum())
            var_part.append(variance.sum() / per_dim.sum())
        kl = chunks["kl_bits"][sel]
        out.append({"stages": [lo, hi - 1], "chunks": int(len(sel)), "median_dims": float(np.median(chunks["dims"][sel])),
                    "kl_mean": float(kl.mean()), "kl_std": float(kl.std()),
                    "kl_share": float(kl.sum() / chunks["kl_bits"].sum()),
                    "top_quarter_share": float(np.mean(top)), "variance_share": float(np.mean(var_part))})
    return out


# ------------------------------------------------------------------------------- part C (time)


def search_seconds(repeats: int = 9) -> dict[str, float]:
    """Seconds of `rcc.select_many` per chunk of 41 dimensions (the last stage's) and 2^16
    candidates, 1 thread, for the codec's rules: the fastest of ``repeats`` runs, the rules
    interleaved (the machine is shared: the minimum is the work, the rest is waiting)."""
    from diffcodec.codec import rcc

    rng = np.random.default_rng(0)
    d = 41
    lw = rcc.LogWeight.of_gaussians(0.6 * rng.normal(size=d), np.full(d, -0.3), np.zeros(d), np.zeros(d))
    times: dict[str, list[float]] = {rule: [] for rule in rcc.SELECTION_RULES}
    for r in range(repeats):
        for rule in rcc.SELECTION_RULES:
            start = time.perf_counter()
            rcc.select_many([(lw, (7, r, 1), 1 << REAL_LOG2_N)], rule=rule, workers=1)
            times[rule].append(time.perf_counter() - start)
    return {rule: float(min(t)) for rule, t in times.items()}


# -------------------------------------------------------------------------------------- report


def best_per_rule(rows: list[dict[str, Any]], log2_n: float) -> dict[str, dict[str, Any]]:
    """Per rule, the KL whose I / D is smallest at this N."""
    out = {}
    for r in rows:
        if r["log2_candidates"] == log2_n and (r["rule"] not in out
                                               or r["index_per_delivered"] < out[r["rule"]]["index_per_delivered"]):
            out[r["rule"]] = r
    return out


def markdown(payload: dict[str, Any]) -> str:
    a, b, sec = payload["part_a"], payload.get("part_b"), payload["search_seconds"]
    cmd = payload["provenance"]["command"]
    lines = ["# Choosing the candidate a reverse-channel-coding chunk sends", "",
             f"`{cmd}` (the docstring of `bench/rcc_methods.py` defines every rule and metric), "
             f"{payload['provenance']['device']}.", "",
             "I = index bits, D = E[log2 q/p] of the sent sample (what it delivers), delivery = D / KL. "
             "A chain pays about (I / D - 1) x its latent stages' bound over the bound; shift share "
             "E[v]/mu and std of v: the law of the sample along the mean shift (q: 1 and 1), "
             "law KL: KL of its Gaussian fit from q, bits.", "",
             "## A. One chunk, 1-D equivalent (equal variances)", ""]
    for log2_n in sorted({r["log2_candidates"] for r in a}):
        best = best_per_rule(a, log2_n)
        lines += [f"2^{log2_n:g} candidates: best I / D per rule: " + ", ".join(
            f"{rule} {r['index_per_delivered']:.3f} (KL {r['kl_bits']:g}, delivery {r['delivery']:.2f})"
            for rule, r in sorted(best.items(), key=lambda kv: kv[1]["index_per_delivered"])) + ".", ""]
    lines += ["| N | KL bits | rule | I | D | delivery | I / D | I - D | shift share | std v | law KL |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(a, key=lambda r: (r["log2_candidates"], r["kl_bits"], RULES_1D.index(r["rule"]))):
        lines.append(f"| 2^{r['log2_candidates']:g} | {r['kl_bits']:g} | {r['rule']} | {r['index_bits']:.2f} | "
                     f"{r['delivered_bits']:.2f} | {r['delivery']:.3f} | {r['index_per_delivered']:.3f} | "
                     f"{r['net_bits']:.2f} | {r['shift_share']:.3f} | {r['sample_std']:.3f} | {r['law_kl_bits']:.2f} |")
    how = payload.get("search_seconds_how", "median of 5, the rules one after the other")
    lines += ["", f"## Search time per chunk (41 dimensions, 2^16 candidates, `rcc.select_many`, 1 thread, {how})", "",
              ", ".join(f"{rule} {1000 * s:.1f} ms" for rule, s in sec.items()) + "."]
    if b is None:
        return "\n".join(lines + chain_lines(payload.get("chains", [])) + decision_lines(payload)) + "\n"
    lines += ["", f"## B. Real chunks ({b['chunks_used']} of the {b['chunks_recorded']} the encoder searched on "
              f"{payload['chunk_images']} CIFAR-10 test images; stages {b['stages'][0]}..{b['stages'][-1]}, "
              f"at most {MAX_REAL_DIMS} dimensions, median {b['median_dims']:g}; "
              f"{100 * b['kl_share_of_eligible']:.0f}% of the chunks' KL), 2^{b['log2_candidates']} evaluations each", "",
              "| rule | I | D | delivery | I / D | I - D |", "|---|---|---|---|---|---|"]
    for r in sorted(b["rows"], key=lambda r: r["index_per_delivered"]):
        lines.append(f"| {r['rule']} | {r['index_bits']:.2f} | {r['delivered_bits']:.2f} | {r['delivery']:.3f} | "
                     f"{r['index_per_delivered']:.3f} | {r['net_bits']:.2f} |")
    lines += ["", "The chunks by stage (top quarter: share of a chunk's KL in its top 25% dimensions; variance: "
              "share of the KL from the fixedlarge variance mismatch, the quadratic term):", "",
              "| stages | chunks | median dims | KL mean | KL std | share of all KL | top quarter | variance |",
              "|---|---|---|---|---|---|---|---|"]
    for r in payload["chunk_summary"]:
        lines.append(f"| {r['stages'][0]}..{r['stages'][1]} | {r['chunks']} | {r['median_dims']:g} | "
                     f"{r['kl_mean']:.2f} | {r['kl_std']:.2f} | {r['kl_share']:.3f} | {r['top_quarter_share']:.2f} | "
                     f"{r['variance_share']:.3f} |")
    lines += chain_lines(payload.get("chains", [])) + decision_lines(payload)
    return "\n".join(lines) + "\n"


CHAIN_PSNRS = (25.0, 30.0, 35.0, 40.0, 45.0)


def chain_summary(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    """What a `bench.rcc_chain` run measured on real streams, in the terms of this report."""
    from bench.progressive_compare import rate_at_psnr

    full, sel = run["summary"]["full_rate"], run["selection"]
    num_dims, images = float(run["num_dims"]), run["summary"]["num_images"]
    per_image = run["per_image"]
    real = np.mean([r["real_bits"][-1] for r in per_image]) / num_dims
    bound = np.mean([sum(r["bound_bits"]) for r in per_image]) / num_dims
    # the chain's account: payload - bound against sum (I - D) + group checks + pixel-stage coding
    latent_excess = (sel["index_bits_real"] - sel["delivered_bits"]) / images / num_dims
    checks = sel["check_bits_excluded"] / images / num_dims
    pixel_coding = full["pixel_stage_real_bpd"] - full["pixel_stage_analytic_bpd"]
    same_stages, own_curve, rates = [], [], []
    for psnr in CHAIN_PSNRS:
        r, b = rate_at_psnr(run, psnr), rate_at_psnr(run, psnr, "bound_bpd")
        rates.append(r)
        same_stages.append(r / b if r is not None and b else None)
        own = next((c for c in run.get("bound_curve", []) if c["psnr"] == psnr), None)
        own_curve.append(own["ratio"] if own else None)
    label = f"{sel['rule']}, pad {run['params']['pad_bits']:g}"
    if sel.get("small_stage_bits"):
        label += f" (stages < {sel['small_stage_bits']:g} bits: pad {sel['small_stage_pad']:g})"
    return {
        "path": str(path), "label": label, "command": run["provenance"]["command"],
        "device": run["provenance"]["device"], "rule": sel["rule"], "pad_bits": run["params"]["pad_bits"], "images": images,
        "arithmetic": run.get("arithmetic", "exact"), "full_rate_with_header_bpd": full["real_with_header_bpd"],
        "payload_bpd": float(real), "bound_bpd": float(bound), "overhead_vs_bound": full["overhead_vs_bound"],
        "delivery": sel["delivery"], "index_per_delivered": sel["index_per_delivered"],
        "uniform_index_per_delivered": sel["uniform_index_per_delivered"],
        "candidates_per_chunk": sel["candidates"] / sel["chunks"], "chunks_per_image": sel["chunks"] / images,
        "candidates_per_image": sel["candidates"] / images,
        "encode_seconds": run["summary"]["seconds"]["encode"]["mean_per_image"],
        "predicted_excess_bpd": float(latent_excess + checks + pixel_coding), "real_excess_bpd": float(real - bound),
        "latent_bound_bpd": full["rcc_bound_bpd"], "checks_bpd": float(checks), "pixel_coding_bpd": float(pixel_coding),
        "psnrs": list(CHAIN_PSNRS), "rate_at_psnr": rates, "over_bound_same_stages": same_stages,
        "over_bound_own_curve": own_curve,
    }


def chain_lines(chains: list[dict[str, Any]]) -> list[str]:
    if not chains:
        return []
    c0 = chains[0]
    psnr_cells = " | ".join(f"{p:g} dB" for p in c0["psnrs"])
    lines = ["", f"## D. The real stream with each rule (`bench.rcc_chain`, {c0['images']} CIFAR-10 test images, "
             f"{c0['arithmetic']} arithmetic, K = 50, 14-bit chunks, at most 2^16 candidates)", "",
             "| rule | full rate bpd, header incl. | over bound | delivery | I / D | candidates per image "
             "| predicted excess | real excess | encode s/image |", "|---|---|---|---|---|---|---|---|---|"]
    for c in chains:
        lines.append(f"| {c['label']} | {c['full_rate_with_header_bpd']:.4f} | "
                     f"{100 * c['overhead_vs_bound']:+.1f}% | {c['delivery']:.3f} | {c['index_per_delivered']:.3f} | "
                     f"{c['candidates_per_image'] / 1e6:.1f} M | {c['predicted_excess_bpd']:.3f} | "
                     f"{c['real_excess_bpd']:.3f} | {c['encode_seconds']:.1f} |")
    lines += [""] + [f"- {c['label']}: `{c['command']}` ({c['device']})" for c in chains]
    lines += ["", "Predicted excess: (index bits - delivered bits) of the latent stages + their group checks + "
              "the pixel stage's coding overhead, bits/dim; real excess: payload - bound. Encode seconds on a "
              "shared, busy 2-core machine (1 thread): compare candidates per image for the work.", "",
              "Rate (bits/dim, header included) at equal PSNR, and over the bound read two ways (same stages: "
              "`bench.progressive_compare`; own curve: the bound's rate where its own exact samples reach the PSNR):",
              "", f"| rule | {psnr_cells} |", "|---|" + "---|" * len(c0["psnrs"])]

    def cells(values: list[Any], fmt: str) -> str:
        return " | ".join("-" if v is None else format(v, fmt) for v in values)

    for c in chains:
        lines.append(f"| {c['label']}: rate | {cells(c['rate_at_psnr'], '.4f')} |")
        lines.append(f"| ... / bound, same stages | {cells(c['over_bound_same_stages'], '.2f')} |")
        lines.append(f"| ... / bound, own curve | {cells(c['over_bound_own_curve'], '.2f')} |")
    return lines


def _pct(new: float | None, old: float | None) -> str:
    return "-" if new is None or old is None else f"{100 * (new / old - 1):+.1f}%"


def decision_lines(payload: dict[str, Any]) -> list[str]:
    """The decision, from the numbers above: which rule, what it gains, which targets it meets."""
    a, b, chains = payload["part_a"], payload.get("part_b"), payload.get("chains", [])
    budgets = sorted({r["log2_candidates"] for r in a})
    best = {n: best_per_rule(a, n) for n in budgets}
    n16 = 16.0 if 16.0 in best else budgets[len(budgets) // 2]
    g, p = best[n16].get("greedy"), best[n16].get("pfr")
    if g is None or p is None:
        return []
    lines = ["", "## Decision", "",
             f"- One chunk (A), 2^{n16:g} candidates: the greedy rule pays {g['index_per_delivered']:.3f} index bits "
             f"per delivered bit (at KL {g['kl_bits']:g}, delivery {g['delivery']:.2f}) against PFR's "
             f"{p['index_per_delivered']:.3f} (KL {p['kl_bits']:g}, delivery {p['delivery']:.2f}): "
             f"{100 * (1 - (g['index_per_delivered'] - 1) / (p['index_per_delivered'] - 1)):.0f}% less overhead per "
             "delivered bit from the same candidates and the same search. Tempered PFR is close to greedy; minimal "
             f"random coding is the worst ({best[n16]['mrc']['index_per_delivered']:.3f}: a uniform index for a sample "
             "near q). What more candidates buy: greedy " + ", ".join(
                 f"2^{n:g} {best[n]['greedy']['index_per_delivered']:.3f}" for n in budgets) + "; PFR " + ", ".join(
                 f"2^{n:g} {best[n]['pfr']['index_per_delivered']:.3f}" for n in budgets) + "."]
    if b is not None:
        rows = {r["rule"]: r for r in b["rows"]}
        sp_random = min((r for r in b["rows"] if r["rule"].startswith("sp-") and r["rule"].endswith("random")),
                        key=lambda r: r["index_per_delivered"])
        sp_oracle = min((r for r in b["rows"] if r["rule"].startswith("sp-") and r["rule"].endswith("oracle")),
                        key=lambda r: r["index_per_delivered"])
        lines.append(
            f"- Real chunks (B): greedy {rows['greedy']['index_per_delivered']:.3f}, PFR "
            f"{rows['pfr']['index_per_delivered']:.3f}. Space partitioning does not pay here: with splits a decoder can "
            f"form the best is {sp_random['rule']} {sp_random['index_per_delivered']:.3f}, and even splitting the "
            f"dimensions of largest shift (which a decoder cannot know) gives {sp_oracle['rule']} "
            f"{sp_oracle['index_per_delivered']:.3f}. A chunk's KL is spread over its dimensions (median "
            f"{b['median_dims']:g} of them; the top quarter holds about 70%, per-dimension KL well under a bit), so "
            "the sign of a dimension says little about where q's mass is, and even a perfect search of 16x more "
            "candidates moves greedy only from the 2^16 to the 2^20 row of A.")
    pfr = next((c for c in chains if c["rule"] == "pfr"), None)
    greedy = [c for c in chains if c["rule"] == "greedy"]
    if pfr is None or not greedy:
        return lines
    win = min(greedy, key=lambda c: c["full_rate_with_header_bpd"])
    lines.append(
        f"- Real streams (D), {win['images']} images: the chain follows the account above (predicted excess over the "
        "bound against real: " + "; ".join(f"{c['label']} {c['predicted_excess_bpd']:.3f} vs {c['real_excess_bpd']:.3f}"
                                           for c in chains) + " bits/dim), so a rule's chunk-level I / D is what the "
        f"stream pays. Best full rate: {win['label']}, {win['full_rate_with_header_bpd']:.4f} bits/dim with the "
        f"header ({100 * win['overhead_vs_bound']:+.1f}% payload over the bound) against PFR's "
        f"{pfr['full_rate_with_header_bpd']:.4f} ({100 * pfr['overhead_vs_bound']:+.1f}%): "
        f"{_pct(win['full_rate_with_header_bpd'], pfr['full_rate_with_header_bpd'])}; delivery {win['delivery']:.3f} "
        f"(PFR {pfr['delivery']:.3f}); {win['candidates_per_image'] / pfr['candidates_per_image']:.2f}x PFR's "
        "candidates. At equal PSNR against PFR: " + "; ".join(
            f"{c['label']} " + ", ".join(f"{q:g} dB {_pct(r, r0)}" for q, r, r0 in
                                         zip(c["psnrs"], c["rate_at_psnr"], pfr["rate_at_psnr"]))
            for c in greedy) + ".")
    g16 = best[n16]["greedy"]["index_per_delivered"]
    g_top = best[budgets[-1]]["greedy"]["index_per_delivered"]
    fixed = win["checks_bpd"] + win["pixel_coding_bpd"]
    floor = (win["latent_bound_bpd"] * (g16 - 1) + fixed) / win["bound_bpd"]
    floor_top = (win["latent_bound_bpd"] * (g_top - 1) + fixed) / win["bound_bpd"]
    own = [r for r in win["over_bound_own_curve"] if r is not None]
    work = win["candidates_per_image"] / pfr["candidates_per_image"]
    sec = payload.get("search_seconds", {})
    per_candidate = ""
    if sec.get("pfr") and sec.get("greedy"):
        ratio = sec["greedy"] / sec["pfr"]
        per_candidate = (f", each {ratio:.2f}x PFR's time (no arrival times to draw): about {work * ratio:.2f}x the "
                         "search, the larger part of the encoder's time")
    lines += [
        "", "Targets of the issue, for the best run:", "",
        f"- full rate <= +15% over the bound: {'met' if win['overhead_vs_bound'] <= 0.15 else 'not met'} "
        f"({100 * win['overhead_vs_bound']:+.1f}%). Why not lower: with the one-chunk optimum I / D = {g16:.3f} on "
        f"every chunk, the latent stages' bound ({win['latent_bound_bpd']:.3f} bits/dim) would cost "
        f"{win['latent_bound_bpd'] * (g16 - 1):.3f} over it, plus the group checks ({win['checks_bpd']:.3f}) and the "
        f"pixel stage's coding ({win['pixel_coding_bpd']:.3f}): +{100 * floor:.1f}% at best with 2^{n16:g} "
        f"candidates, +{100 * floor_top:.1f}% with 2^{budgets[-1]:g} ({2 ** (budgets[-1] - n16):g}x the search).",
        "- rate at equal PSNR <= 1.3x the bound at 25-45 dB: "
        + ("met" if own and max(own) <= 1.3 else "not met") + " (own curve: " + ", ".join(
            f"{q:g} dB {'-' if r is None else f'{r:.2f}x'}" for q, r in zip(win["psnrs"], win["over_bound_own_curve"]))
        + "; same stages: " + ", ".join(f"{'-' if r is None else f'{r:.2f}x'}" for r in win["over_bound_same_stages"])
        + ").",
        f"- delivery >= 0.85 at <= 1.5x the encode time: {win['delivery']:.3f} at "
        f"{work:.2f}x the candidates searched{per_candidate}: "
        + ("met." if win["delivery"] >= 0.85 and work <= 1.5 else "not met."),
        "", f"The greedy sample is not a sample of q: along the mean shift its spread is {g['sample_std']:.2f} instead of "
        f"1 (A: the KL of its law from q, Gaussian fit, {g['law_kl_bits']:.1f} bits per {g['kl_bits']:g}-bit chunk). "
        "The real streams show the network takes such latents as it takes exact ones as far as the rate goes (D: the "
        "account holds, the pixel stage costs what the trajectory predicts); reconstructions other than x^_0 "
        "(DDIM, sampling for realism) were not measured. Its index is uniform: the stream's adaptive exponent law "
        f"spends {win['index_per_delivered']:.3f} bits per delivered bit where log2 N alone would be "
        f"{win['uniform_index_per_delivered']:.3f} (levels included in the first), what a stream version that codes "
        "the index in log2 N bits (N from the nominal chunk KL, known to the decoder) would save.",
        "", "Exact arithmetic: the rule only changes which index the encoder sends; it ranks candidates by the "
        "encoder's float32 search scores (any arithmetic may rank) and both sides then use the exact sample of the "
        "sent index (`rcc.pfr_decode`), so an exact-contract stream of greedy choices decodes bit for bit "
        "(tests/test_bench_rcc_methods.py codes and decodes one).",
        "", "Not simulated: greedy Poisson rejection sampling and A* coding (Flamich 2023; Flamich, Markou, "
        "Hernandez-Lobato 2022) are exact with a search linear in the KL only for one-dimensional (unimodal-ratio) "
        "problems; a chunk's ratio lives in tens to thousands of dimensions along a shift the decoder does not know, "
        "and an exact sample still pays the log term (A: PFR with enough candidates, I - D about 3 bits per chunk). "
        "Sources: Li & El Gamal 2018 (PFR), Theis & Yosri 2022 (ordered random coding), Havasi, Peharz & "
        "Hernandez-Lobato 2019 (MRC), He, Flamich & Hernandez-Lobato 2024 (space partitioning), Ohayon et al. 2025 "
        "(DDCM: codebook noise picked by its inner product with the residual, the greedy rule's form).",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rcc_methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--kl-bits", type=_floats, default=_floats("6,8,10,12,14,17,20"))
    p.add_argument("--log2-candidates", type=_ints, default=_ints("12,16,20"))
    p.add_argument("--trials", type=int, default=600, help="selections per 1-D cell (default 600)")
    p.add_argument("--chunk-images", type=int, default=2, help="images whose real chunks are recorded (0: skip B)")
    p.add_argument("--real-chunks", type=int, default=120, help="real chunks simulated (default 120)")
    p.add_argument("--chunks", type=Path, help="an .npz of recorded chunks (from --save-chunks) instead of recording")
    p.add_argument("--save-chunks", type=Path, help="write the recorded chunks to this .npz")
    p.add_argument("--chain", type=Path, nargs="*", default=None,
                   help="bench.rcc_chain JSONs to report beside the simulation (default: reports/rcc_chain_*.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "rcc_methods.json")
    p.add_argument("--refresh-chains", action="store_true",
                   help="only re-read the chain runs into an existing --out JSON and rewrite its markdown")
    args = p.parse_args(argv)
    check_grid(p, args, 24)
    chain_paths = sorted(REPORTS_DIR.glob("rcc_chain_*.json")) if args.chain is None else args.chain
    if args.refresh_chains:
        payload = json.loads(args.out.read_text())
        payload["chains"] = [chain_summary(path, json.loads(Path(path).read_text())) for path in chain_paths]
        payload["provenance"]["chains_refreshed_by"] = module_command("bench.rcc_methods", argv)
        write_json(args.out, payload)
        write_text(args.out.with_suffix(".md"), markdown(payload))
        return 0

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rng = np.random.default_rng(args.seed)
    payload: dict[str, Any] = {"kind": "rcc_methods", "chunk_images": args.chunk_images}
    payload["part_a"] = part_a(args.kl_bits, args.log2_candidates, args.trials, rng, progress)
    if args.chunks is not None:
        with np.load(args.chunks) as z:
            chunks = {k: z[k] for k in z.files}
    elif args.chunk_images > 0:
        chunks = record_chunks(args.chunk_images, progress)
    else:
        chunks = None
    if args.save_chunks is not None and chunks is not None:
        np.savez_compressed(args.save_chunks, **chunks)
    if chunks is not None:
        payload["part_b"] = part_b(chunks, args.real_chunks, rng, progress)
        payload["chunk_summary"] = chunk_summary(chunks)
    payload["search_seconds"] = search_seconds()
    payload["search_seconds_how"] = "fastest of 9, the rules interleaved"
    payload["chains"] = [chain_summary(path, json.loads(Path(path).read_text())) for path in chain_paths]
    payload["provenance"] = provenance(args, seed=args.seed, command=module_command("bench.rcc_methods", argv))
    write_json(args.out, payload)
    write_text(args.out.with_suffix(".md"), markdown(payload))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
