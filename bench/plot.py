"""Every figure under reports/ and reports/README.md, drawn from the JSON the bench scripts wrote.

    python -m bench.plot [--reports reports]

This is the only writer of figures. Inputs (each optional; a missing one is skipped with a
printed note saying which command makes it):

    nll.json              bench/nll.py        Figure 5, RMSE of x^_0 and bound terms against t,
                                              bits/dim by chain length
    speed.json            bench/speed.py      (a table in README.md)
    train_default.json    diffcodec/train.py  the training loss curve
    lossless.json         bench/lossless.py   lossless sizes vs PNG / WebP / JPEG-XL
    progressive.json      bench/progressive.py real-bitstream rate vs the analytic rate, and
                                              rate–distortion vs JPEG / WebP / JPEG-XL

Every figure's title names the model fingerprint and the device of the run that made it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import REPORTS_DIR, read_json, run_main, write_text  # noqa: E402
from bench.nll import PAPER_TABLE4, figure5_run, markdown_tables  # noqa: E402

COMMANDS = {
    "nll.json": "python -m bench.nll --steps 1000,100 --num-images 256 --threads 1",
    "speed.json": "python -m bench.speed --threads 1",
    "nll_ci_reference.json": "python -m bench.nll --ci-reference",
    "nll_test_all.json": "python -m bench.nll_all --t-samples 8",
    "train_default.json": "diffcodec train (see reports/training.md)",
    "lossless.json": "python -m bench.lossless",
    "progressive.json": "python -m bench.progressive",
    "rcc_redundancy.json": "python -m bench.rcc_redundancy",
}


def short_device(device: str | None) -> str:
    """'cpu: AMD EPYC (2 cores, 2 torch threads)' -> 'cpu: AMD EPYC (2 cores, ...)' shortened for a title."""
    if not device:
        return "unknown device"
    return device if len(device) <= 60 else device[:57] + "..."


def origin(payload: dict[str, Any]) -> str:
    """'model <fingerprint> · <device>' from a payload's provenance (or its top-level fields)."""
    prov = payload.get("provenance") or {}
    model = prov.get("model") or {}
    fp = model.get("fingerprint") or payload.get("fingerprint") or (payload.get("meta") or {}).get("fingerprint")
    device = prov.get("device") or payload.get("device")
    return f"model {fp or 'unrecorded'} · {short_device(device)}"


def fingerprint_of(payload: dict[str, Any]) -> str:
    """'model <fingerprint>' from a payload's provenance."""
    return origin(payload).split(" · ")[0]


def save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------ nll.json


def plot_figure5(nll: dict[str, Any], out: Path) -> Path:
    """The paper's Figure 5: distortion and rate against reverse time, distortion against rate."""
    run = figure5_run(nll)
    f5 = run["figure5"]
    r, rate, rmse = np.array(f5["reverse_time"]), np.array(f5["rate_bpd"]), np.array(f5["rmse_255"])
    T = nll["num_timesteps"]
    paper_r = np.array(sorted(PAPER_TABLE4)) * T / 1000
    paper_rate = np.array([PAPER_TABLE4[k][0] for k in sorted(PAPER_TABLE4)])
    paper_rmse = np.array([PAPER_TABLE4[k][1] for k in sorted(PAPER_TABLE4)])
    ours = f"ours (K={run['steps']}, {run['num_images']} images)"
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.4))
    ax[0].plot(r, rmse, label=ours)
    ax[0].plot(paper_r, paper_rmse, "o--", label="paper, Table 4")
    ax[0].set(xlabel="reverse process steps (T - t + 1)", ylabel="distortion: RMSE of x̂_0 on [0, 255]",
              title="distortion vs reverse time")
    ax[1].plot(r, rate, label=ours)
    ax[1].plot(paper_r, paper_rate, "o--", label="paper, Table 4")
    ax[1].set(xlabel="reverse process steps (T - t + 1)", ylabel="rate: cumulative bits/dim received",
              title="rate vs reverse time")
    ax[2].plot(rate, rmse, label=ours)
    ax[2].plot(paper_rate, paper_rmse, "o--", label="paper, Table 4")
    ax[2].set(xlabel="rate (bits/dim)", ylabel="distortion: RMSE on [0, 255]", title="distortion vs rate")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"Figure 5 (CIFAR-10 test) — {origin(nll)}; lossless end point {f5['lossless_bpd']:.3f} bits/dim",
                 fontsize=10)
    return save(fig, out)


def plot_rmse_vs_t(nll: dict[str, Any], out: Path) -> Path:
    """RMSE of x^_0 predicted from x_t, against the paper's t, for each chain."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in sorted(nll["runs"], key=lambda r: -r["steps"]):
        ps = run["per_step"]
        ax.plot(np.array(ps["timesteps"]) + 1, ps["xstart_rmse_255"], label=f"K={run['steps']}")
    ax.set(xscale="log", xlabel="t (paper, 1..T; x̂_0 predicted from x_t)", ylabel="RMSE of x̂_0 on [0, 255]")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(f"RMSE of x̂_0 against t\n{origin(nll)}", fontsize=9)
    return save(fig, out)


def plot_terms_vs_t(nll: dict[str, Any], out: Path) -> Path:
    """Mean bound term of each step, in bits/dim, against the paper's t (log-log)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in sorted(nll["runs"], key=lambda r: -r["steps"]):
        ps = run["per_step"]
        t = np.array(ps["timesteps"])
        m = np.array(ps["terms_bpd_mean"])
        ax.plot(t[1:], np.maximum(m[1:], 1e-12), label=f"K={run['steps']}: L_t (KL), one per chain step")
        ax.plot([max(t[0], 0.6)], [m[0]], "o", color=ax.lines[-1].get_color(), label=f"K={run['steps']}: L_0 (decoder)")
    ax.set(xscale="log", yscale="log", xlabel="original timestep of the term (paper L_t; L_0 drawn at t = 0.6)",
           ylabel="term, bits/dim (mean over images)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Bound terms against t\n{origin(nll)}", fontsize=9)
    return save(fig, out)


def plot_bpd_by_steps(nll: dict[str, Any], out: Path) -> Path:
    """Bits/dim of each chain length as stacked term ranges, with the total's s.e."""
    runs = sorted(nll["runs"], key=lambda r: -r["steps"])
    names = []
    for run in runs:
        names += [k for k in run["terms"] if k not in names]
    fig, ax = plt.subplots(figsize=(1.8 * len(runs) + 3, 4.5))
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for name in names:
        h = np.array([run["terms"].get(name, {"mean": 0.0})["mean"] for run in runs])
        ax.bar(x, h, bottom=bottom, label=name, width=0.6)
        bottom += h
    se = [run["bits_per_dim_stderr"] or 0.0 for run in runs]
    ax.errorbar(x, [run["bits_per_dim"] for run in runs], yerr=se, fmt="none", color="k", capsize=4)
    for xi, run in zip(x, runs):
        ax.text(xi, run["bits_per_dim"], f" {run['bits_per_dim']:.3f}", ha="center", va="bottom")
    ax.set_xticks(x, [f"K={run['steps']}" for run in runs])
    ax.set(ylabel="bits/dim (stacked terms; bar: ±1 s.e. of the total)", xlabel="chain length")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Bits/dim by chain length ({runs[0]['num_images']} images)\n{origin(nll)}", fontsize=9)
    return save(fig, out)


# ------------------------------------------------------------------------------ other engineers' JSON


def loss_rows(train: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(step, loss, images_seen or None) from {'columns': [...], 'rows': [[...]]} or {'history': [{...}]}."""
    if "columns" in train and "rows" in train:
        cols = list(train["columns"])
        rows = np.array(train["rows"], dtype=np.float64).reshape(-1, len(cols))
        seen = rows[:, cols.index("images_seen")] if "images_seen" in cols else None
        return rows[:, cols.index("step")], rows[:, cols.index("loss")], seen
    hist = train.get("history") or train.get("rows") or []
    step = np.array([h["step"] for h in hist], dtype=np.float64)
    loss = np.array([h["loss"] for h in hist], dtype=np.float64)
    seen = np.array([h["images_seen"] for h in hist], dtype=np.float64) if hist and "images_seen" in hist[0] else None
    return step, loss, seen


def plot_loss_curve(train: dict[str, Any], out: Path) -> Path:
    step, loss, seen = loss_rows(train)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(step, loss)
    ax.set(xlabel="training step", ylabel="training loss (running mean)", yscale="log")
    ax.grid(alpha=0.3, which="both")
    if seen is not None and len(seen) and step[-1] > 0:
        per_step = seen[-1] / step[-1]
        sec = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda n: n / per_step))
        sec.set_xlabel("training images seen")
    meta = train.get("meta") or {}
    ax.set_title(f"Training loss ({meta.get('preset', '')} {meta.get('loss', '')})\n{origin(train)}", fontsize=9)
    return save(fig, out)


# Lossy baselines on CIFAR-10 as DESIGN.md records them (500 test images, whole files; bpp / PSNR dB).
# Drawn only when no JSON in reports/ brings its own measured baselines ("lossy_baselines").
DESIGN_LOSSY_BASELINES: dict[str, list[tuple[float, float]]] = {
    "JPEG (Pillow)": [(2.83, 23.0), (3.51, 26.4), (3.95, 27.8), (4.71, 29.9), (6.11, 33.0), (7.44, 35.0)],
    "WebP (method 6)": [(1.08, 24.5), (1.66, 27.8), (2.07, 29.5), (2.62, 31.2), (4.46, 34.6), (7.27, 36.3)],
    "JPEG-XL (effort 9)": [(1.21, 24.1), (1.79, 26.8), (2.66, 30.1), (3.91, 33.4), (5.81, 37.0), (8.74, 41.4),
                           (11.33, 45.0)],
}


def psnr_of_rmse(rmse_255: np.ndarray) -> np.ndarray:
    """PSNR in dB of an RMSE on the [0, 255] scale."""
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(255.0 / np.asarray(rmse_255, dtype=np.float64))


def lossy_baselines(*payloads: dict[str, Any] | None) -> tuple[dict[str, list[tuple[float, float]]], str]:
    """{codec: [(bpp, PSNR dB), ...]} from the first payload holding 'lossy_baselines', else DESIGN.md's."""
    for payload in payloads:
        if payload and payload.get("lossy_baselines"):
            base = payload["lossy_baselines"]
            return ({k: [tuple(p) for p in v] for k, v in base.items()},
                    f"measured on the same images ({payload.get('kind', '?')} run)")
    return DESIGN_LOSSY_BASELINES, "DESIGN.md (500 CIFAR-10 test images)"


BASELINE_NAMES = {"png": "PNG (Pillow, optimize)", "webp_lossless": "WebP lossless (method 6)",
                  "jpegxl_lossless": "JPEG-XL lossless (effort 9)", "jpeg2000_lossless": "JPEG-2000 lossless"}


def lossless_bars(ll: dict[str, Any]) -> tuple[list[tuple[str, float, str]], list[tuple[str, float, str]]]:
    """(CIFAR-10 bars, Kodak bars): (label, bits/dim, kind) with kind 'ours', 'bound' or 'baseline'."""
    cifar: list[tuple[str, float, str]] = []
    st = ll.get("stream") or {}
    if st:
        k, n = st.get("num_steps"), st.get("num_images")
        cifar += [(f"bits-back stream, whole file (K={k}, {n} images, one file)", st["file_bpd"], "ours"),
                  (f"bits-back stream, net of initial bits (K={k})", st["net_bpd"], "ours")]
        if st.get("bound_bpd") is not None:
            cifar.append((f"bound on the same images (K={k})", st["bound_bpd"], "bound"))
    pi = ll.get("per_image") or {}
    for key, how in (("default", "progressive bootstrap"), ("no_bootstrap", "--no-bootstrap: seeded start")):
        rec = pi.get(key)
        if rec:
            cifar.append((f"bits-back, one file per image, {how} (K={rec.get('num_steps')}, "
                          f"{rec.get('num_images')} images)", rec["file_bpd_mean"], "ours"))
    tm = ll.get("timing_32x32") or {}
    if tm:
        seeded = ", --no-bootstrap" if tm.get("bootstrap_tiles") == 0 else ""
        cifar.append((f"bits-back stream, whole file (K={tm.get('num_steps')}, {tm.get('num_images')} images{seeded})",
                      tm["file_bpd"], "ours"))
        if tm.get("bound_bpd") is not None:
            cifar.append((f"bound on the same images (K={tm.get('num_steps')})", tm["bound_bpd"], "bound"))
    for key, rec in (ll.get("baselines_cifar") or {}).items():
        if isinstance(rec, dict) and "bits_per_dim" in rec:
            cifar.append((BASELINE_NAMES.get(key, key), rec["bits_per_dim"], "baseline"))
    kodak: list[tuple[str, float, str]] = []
    kd = ll.get("kodak") or {}
    if "file_bpd" in kd:
        kodak.append((f"bits-back, {kd.get('image')} (K={kd.get('num_steps')}, one file)", kd["file_bpd"], "ours"))
        for key, rec in (kd.get("baselines_same_image") or {}).items():
            kodak.append((BASELINE_NAMES.get(key, key) + f", {kd.get('image')}", rec["bits_per_dim"], "baseline"))
    for key, rec in (ll.get("baselines_kodak") or {}).items():
        if isinstance(rec, dict) and "bits_per_dim" in rec:
            kodak.append((BASELINE_NAMES.get(key, key) + f" ({ll['baselines_kodak'].get('num_images', '?')} images)",
                          rec["bits_per_dim"], "baseline"))
    return cifar, kodak


def plot_lossless(ll: dict[str, Any], out: Path) -> Path:
    """Lossless bits/dim (whole files) of the bits-back codec, the bound, and PNG/WebP/JPEG-XL."""
    cifar, kodak = lossless_bars(ll)
    panels = [(f"CIFAR-10 test ({(ll.get('stream') or {}).get('num_images', '?')} images)", cifar)]
    if kodak:
        panels.append(("Kodak", kodak))
    colors = {"ours": "tab:blue", "bound": "tab:green", "baseline": "tab:gray"}
    height = max(len(bars) for _, bars in panels) * 0.45 + 1.6
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), height), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels):
        y = np.arange(len(bars))[::-1]
        ax.barh(y, [b[1] for b in bars], color=[colors[b[2]] for b in bars])
        for yi, b in zip(y, bars):
            ax.text(b[1], yi, f" {b[1]:.3f}", va="center", fontsize=8)
        ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
        ax.set(xlabel="bits/dim (8 x whole-file bytes / (3 x H x W))", title=title)
        ax.set_xlim(0, max(b[1] for b in bars) * 1.18)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Lossless sizes — {origin(ll)}", fontsize=9)
    return save(fig, out)


def plot_progressive_rate(prog: dict[str, Any], out: Path) -> Path:
    """Real cumulative bits of each coded stage against the analytic rate on the same schedule."""
    stages = prog["summary"]["stages"]
    k = np.array([s["stage"] for s in stages])
    real = np.array([s["real_bpd"] for s in stages])
    real_h = np.array([s["real_with_header_bpd"] for s in stages])
    analytic = np.array([s["analytic_bpd"] for s in stages])
    labels = [str(s["timestep"]) if s["timestep"] >= 0 else "x_0" for s in stages]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].plot(k, real, "o-", label="real file prefix (payload)")
    ax[0].plot(k, real_h, ".:", label="real, with header")
    ax[0].plot(k, analytic, "s--", label="analytic (KL terms, -log p(x_0|x_1))")
    ax[0].set(yscale="log", xlabel="coded stage (tick: original timestep t received)",
              ylabel="cumulative bits/dim")
    ratio = np.where(analytic > 0, real / np.where(analytic > 0, analytic, 1), np.nan)
    ax[1].plot(k, ratio, "o-")
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set(yscale="log", xlabel="coded stage (tick: original timestep t received)",
              ylabel="real / analytic (cumulative), log scale")
    for a in ax:
        a.set_xticks(k, labels, fontsize=7, rotation=90 if len(k) > 12 else 0)
        a.grid(alpha=0.3, which="both")
    ax[0].legend()
    f = prog["summary"]["full_rate"]
    p = prog["params"]
    fig.suptitle(f"Progressive codec, {prog['summary']['num_images']} images, K={p['num_steps']} {p['spacing']}: "
                 f"real {f['real_bpd']:.3f} vs analytic {f['analytic_bpd']:.3f} bits/dim — {origin(prog)}",
                 fontsize=9)
    return save(fig, out)


def plot_rcc_redundancy(rcc: dict[str, Any], out: Path) -> Path:
    rows = rcc["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in sorted({r["log2_candidates"] for r in rows}):
        rs = sorted((r for r in rows if r["log2_candidates"] == b), key=lambda r: r["kl_bits"])
        kl = [r["kl_bits"] for r in rs]
        ax1.plot(kl, [r["redundancy_bits"] for r in rs], marker="o", label=f"2^{b} candidates")
        ax2.plot(kl, [r["index_bits"] / r["delivered_bits"] for r in rs], marker="o", label=f"2^{b} candidates")
    kl_all = np.array(sorted({r["kl_bits"] for r in rows}))
    ax1.plot(kl_all, 0.1 * kl_all, "k--", lw=1, label="10% of the chunk's KL")
    ax1.set(xlabel="chunk KL (bits)", ylabel="index bits - KL (bits per chunk)",
            title="Cost of the index over the chunk's KL")
    ax2.axhline(1.0, color="k", lw=1, ls="--", label="exact, no redundancy")
    ax2.axhline(1.1, color="k", lw=1, ls=":", label="+10%")
    ax2.set(xlabel="chunk KL (bits)", ylabel="index bits / delivered bits",
            title="Index bits per bit the sample delivers")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PFR chunks, 1-D equivalent ({rows[0]['trials']} selections per point; {short_device((rcc.get('provenance') or {}).get('device'))})", fontsize=9)
    return save(fig, out)


def plot_rate_distortion(prog: dict[str, Any] | None, nll: dict[str, Any] | None, out: Path, *,
                         data: str = "CIFAR-10 test images", paper: bool = True) -> Path:
    """PSNR against bits per pixel: the real progressive stream, the analytic curve, baselines
    (and the paper's Table 4 when ``paper``: it is CIFAR-10)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sources = []
    if prog is not None:
        # stages below 0.01 bpp (x_T and the first, nearly free latents) would stretch the log axis
        st = [s for s in prog["summary"]["stages"] if s["psnr_xstart"] is not None and 3 * s["analytic_bpd"] > 1e-2]
        # whole files, header included, as the baselines' sizes
        bpp = 3 * np.array([s.get("real_with_header_bpd", s["real_bpd"]) for s in st])
        ax.plot(bpp, [s["psnr_xstart"] for s in st], "o-", label="diffcodec progressive, real file prefix (x̂_0)")
        if all(s.get("psnr_ddim") is not None for s in st):
            ax.plot(bpp, [s["psnr_ddim"] for s in st], "o:", label="diffcodec progressive, real file prefix (DDIM)")
        ax.plot(3 * np.array([s["analytic_bpd"] for s in st]), [s["psnr_xstart"] for s in st], "s--",
                label="same stages at the analytic rate")
        sources.append(f"progressive: {origin(prog)}")
    if nll is not None:
        run = figure5_run(nll)
        f5 = run["figure5"]
        keep = np.array(f5["rate_bpd"]) > 1e-3
        ax.plot(3 * np.array(f5["rate_bpd"])[keep], psnr_of_rmse(np.array(f5["rmse_255"])[keep]), "-",
                label=f"analytic bound, x̂_0 (nll.json, K={run['steps']})")
        sources.append(f"nll: {origin(nll)}")
    if paper:
        rate = np.array([v[0] for v in PAPER_TABLE4.values()])
        keep = rate > 1e-3
        ax.plot(3 * rate[keep], psnr_of_rmse(np.array([v[1] for v in PAPER_TABLE4.values()]))[keep], "k^--",
                label="paper Table 4 (35.7M model), analytic")
    base, where = lossy_baselines(prog)
    for name, pts in base.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x-", alpha=0.8, label=f"{name} — {where}")
    ax.set(xscale="log", xlabel="bits per pixel (3 x bits/dim), log scale", ylabel="PSNR (dB) on uint8 pixels")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("\n".join([f"Rate–distortion on {data}", *sources]), fontsize=8)
    return save(fig, out)


# ------------------------------------------------------------------------------ README


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else "–"


def readme_nll(nll: dict[str, Any]) -> list[str]:
    prov = nll["provenance"]
    model = prov.get("model") or {}
    lines = [
        "## Bits/dim on the CIFAR-10 test set, Figure 5 and Table 4",
        "",
        f"Produced by `{prov['command']}` on {prov['device']} "
        f"(git {(prov['git'].get('commit') or '?')[:10]}{' + local changes' if prov['git'].get('dirty') else ''}), "
        f"model `{model.get('path')}` fingerprint `{model.get('fingerprint')}` "
        f"({model.get('parameters', '?')} parameters, {(model.get('meta') or {}).get('weights', '?')} weights).",
        "",
    ]
    lines += markdown_tables(nll, header=False).splitlines()
    lines += [
        "",
        "![Figure 5](figure5.png)",
        "",
        "`figure5.png`: distortion (RMSE of x̂_0 on [0, 255]) and rate (cumulative bits/dim received, "
        "L_T + the KL terms of the steps already sent) against reverse time, and distortion against rate, "
        "ours beside the paper's Table 4.",
        "",
        "![RMSE against t](rmse_vs_t.png) ![terms against t](terms_vs_t.png)",
        "",
        "`rmse_vs_t.png`: RMSE of x̂_0 predicted from x_t against t. `terms_vs_t.png`: mean bound term per "
        "step (bits/dim, log scale); a respaced chain's steps each cover several original steps, so its terms "
        "are larger per step.",
    ]
    if len(nll["runs"]) > 1:
        lines += ["", "![bits/dim by chain length](bpd_by_steps.png)", "",
                  "`bpd_by_steps.png`: the bound on each chain length as stacked term ranges."]
    return lines


def readme_nll_all(r: dict[str, Any]) -> list[str]:
    """The whole test set by Monte Carlo over timesteps (`bench.nll_all`)."""
    prov = r.get("provenance") or {}
    made_by = f"`{prov['nll_command']}`, reported by `{prov.get('command')}`" if prov.get("nll_command") \
        else f"`{prov.get('command', '?')}`"
    terms = r.get("terms_bpd") or {}
    pct = r.get("per_image_bpd_percentiles") or {}
    return [
        f"## Bits/dim on all {r['num_images']:,} CIFAR-10 test images (Monte Carlo over timesteps)",
        "",
        f"Produced by {made_by} on {prov.get('device', '?')} in {r.get('seconds', math.nan) / 60:.0f} minutes, "
        f"{fingerprint_of(r)}. Each image's {r['num_steps'] - 1} KL terms are estimated from {r.get('t_samples')} "
        "timesteps drawn from an importance proposal (stratified; unbiased), L_0 and L_T as in the full sum; "
        "the ± (s.e. over images) includes the extra variance.",
        "",
        "| bits/dim | " + " | ".join(terms) + " |",
        "|---|" + "---|" * len(terms),
        f"| **{_fmt(r['bits_per_dim'])} ± {_fmt(r['bits_per_dim_stderr'])}** | "
        + " | ".join(f"{_fmt(v['mean'], 5)} ± {_fmt(v['stderr'], 5)}" for v in terms.values()) + " |",
        "",
        "Per-image bits/dim, percentiles 1 / 10 / 50 / 90 / 99: "
        + " / ".join(_fmt(pct.get(q), 3) for q in ("1", "10", "50", "90", "99")) + ".",
    ]


def readme_ci(ref: dict[str, Any]) -> list[str]:
    prov = ref.get("provenance") or {}
    return [
        "## The CI NLL benchmark's reference",
        "",
        f"`nll_ci_reference.json`: {ref['bits_per_dim']:.5f} ± {ref['bits_per_dim_stderr']:.5f} bits/dim (s.e. over "
        f"images) on the first {ref['num_images']} CIFAR-10 test images, {ref['steps']} of T={ref['num_timesteps']} "
        f"steps, seed {ref['seed']}, batch {ref['batch_size']}, model `{ref['fingerprint']}`; "
        f"{ref['seconds']:.0f} s on {prov.get('device', '?')} by `{prov.get('command', '?')}`. "
        f"`tests/test_bench_nll.py` re-evaluates exactly this setting and accepts {ref.get('tolerance_rule', '?')}.",
    ]


def readme_speed(speed: dict[str, Any]) -> list[str]:
    prov = speed["provenance"]
    T = speed["num_timesteps"]
    lines = [
        "## Speed",
        "",
        f"Produced by `{prov['command']}` on {prov['device']}, model `{(prov.get('model') or {}).get('fingerprint')}`; "
        f"images: {speed['images']}.",
        "",
        f"| batch | network: image-forwards/s, median (best) | network limit at T={T}: images/s | "
        f"bound at K steps: images/s | bound, scaled to T={T}: images/s | bound / limit |",
        "|---|---|---|---|---|---|",
    ]
    for row in speed["rows"]:
        f, b = row["forward"], row["bound"]
        lines.append(
            f"| {row['batch_size']} | {f['image_forwards_per_second']:.1f} "
            f"({f.get('image_forwards_per_second_best', float('nan')):.1f}) | "
            f"{f['full_T_images_per_second_limit']:.4f} | "
            f"{b['images_per_second_at_steps']:.3f} (K={b['steps']}, {b['num_images']} images) | "
            f"{b['full_T_images_per_second']:.4f} | {row['bound_fraction_of_network_limit']:.2f} |"
        )
    lines += [
        "",
        "The network limit is T forward passes per image at the median call time; the bound adds noise "
        "draws, the posterior algebra and float64 KL / discretized-decoder terms per step. A ratio near or "
        "above 1 says that bookkeeping is within the timing noise of a shared CPU (the best call time is "
        "given beside the median).",
    ]
    return lines


def readme_progressive(prog: dict[str, Any]) -> list[str]:
    prov = prog["provenance"]
    f = prog["summary"]["full_rate"]
    lines = [
        "## Progressive codec: real bitstream against the analytic rate",
        "",
        f"Produced by `{prov['command']}` on {prov['device']}, {fingerprint_of(prog)}.",
        "",
        f"Full stream: real {f['real_bpd']:.4f} bits/dim ({f['real_with_header_bpd']:.4f} with the header) against "
        f"the analytic {f['analytic_bpd']:.4f} ({100 * f['overhead_vs_analytic']:+.1f}%).",
        "",
        "![progressive rate](progressive_rate.png)",
        "",
        "`progressive_rate.png`: cumulative bits/dim of the shortest file prefix that delivers each stage, "
        "against the sum of the bound's terms on the same coded schedule; right: their ratio. "
        "The per-stage table is in `progressive.md`.",
    ]
    return lines


def readme_rcc(rcc: dict[str, Any]) -> list[str]:
    prov = rcc.get("provenance") or {}
    rows = rcc["rows"]
    cell = {(r["kl_bits"], r["log2_candidates"]): r for r in rows}
    ours = cell.get((14.0, 16))
    lines = [
        "## Reverse channel coding: what one chunk costs and how exact its sample is",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')} (a simulation; no model).",
        "",
        "![rcc redundancy](rcc_redundancy.png)",
        "",
        "`rcc_redundancy.png`: left, the PFR index's bits over the chunk's KL; right, index bits per bit of "
        "information the selected sample delivers (the rest is paid again by later stages). Exact chunks "
        "(large budgets, small KL) pay 2-3.5 bits each over their KL; with a fixed budget, larger chunks pay "
        "fewer index bits but deliver a sample between p and q. Table: `rcc_redundancy.md`.",
    ]
    if ours is not None:
        lines += ["", f"The codec's default (14-bit chunks, 2^16 candidates): the index costs "
                  f"{ours['redundancy_bits']:+.2f} bits over the KL but the sample delivers "
                  f"{ours['delivered_bits']:.1f} of 14 bits ({ours['index_bits'] / ours['delivered_bits']:.2f} index bits "
                  "per delivered bit)."]
    return lines


def network_limit_sentence(st: dict[str, Any], what: str) -> list[str]:
    """How close a coded stream came to its network-bound limit (`bench.lossless.network_limit`)."""
    if "network_limit_seconds" not in st:
        return []
    return [f"Network-bound limit of the {what} (K = {st.get('num_steps')}: K network calls per chunk at its size, "
            f"plus the bootstrap's, at this machine's median call time): {st['network_limit_seconds']:.0f} s each "
            f"way; the codec took {st['encode_wall_seconds']:.0f} s to encode "
            f"({st['encode_fraction_of_network_limit']:.0%} of the limit's speed) and {st['decode_wall_seconds']:.0f} s "
            f"to decode ({st['decode_fraction_of_network_limit']:.0%}).", ""]


def readme_lossless(ll: dict[str, Any]) -> list[str]:
    prov = ll.get("provenance") or {}
    cifar, kodak = lossless_bars(ll)
    lines = [
        "## Lossless: the bits-back codec against PNG / WebP / JPEG-XL",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')}, {fingerprint_of(ll)}. "
        f"Counting rule: {ll.get('counting_rule', '?')}.",
        "",
        "| CIFAR-10 test | bits/dim |",
        "|---|---|",
        *[f"| {label} | {bpd:.3f} |" for label, bpd, _ in cifar],
    ]
    if kodak:
        lines += ["", "| Kodak | bits/dim |", "|---|---|", *[f"| {label} | {bpd:.3f} |" for label, bpd, _ in kodak]]
    limits = [*network_limit_sentence(ll.get("stream") or {}, "stream"),
              *network_limit_sentence(ll.get("timing_32x32") or {}, "timing run")]
    if limits:
        lines += ["", *limits[:-1]]
    lines += ["", "![lossless](lossless.png)", "",
              "`lossless.png`: the same numbers as bars (blue: diffcodec files, green: the bound, grey: classical "
              "codecs)."]
    return lines


def readme_lossless_baselines(ll: dict[str, Any], name: str) -> list[str]:
    """Classical lossless codecs on many test images (`bench.lossless --baselines-only`)."""
    prov, base = ll.get("provenance") or {}, ll.get("baselines_cifar") or {}
    rows = [(BASELINE_NAMES.get(k, k), v) for k, v in base.items() if isinstance(v, dict) and "bits_per_dim" in v]
    if not rows:
        return []
    return [
        f"## Lossless: classical codecs on {base.get('num_images', '?'):,} CIFAR-10 test images ({name})",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')}. Counting rule: "
        f"{ll.get('counting_rule', '?')}. Compare with the shipped model's bound on all 10,000 test images "
        "(`nll_test_all.json`) and the bits-back files' overhead over it (the stream sections).",
        "",
        "| codec (one file per image) | bits/dim | exact | CPU-s |",
        "|---|---|---|---|",
        *[f"| {label} | {v['bits_per_dim']:.3f} | {v.get('exact')} | {v.get('cpu_seconds', math.nan):.0f} |"
          for label, v in rows],
    ]


def readme_coder_overhead(r: dict[str, Any]) -> list[str]:
    """The bits-back coder against ideal code lengths, by window width (`bench.coder_overhead`)."""
    prov = r.get("provenance") or {}
    return [
        "## Lossless: what the bits-back coder pays over ideal code lengths (coder_overhead.json)",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')}, {fingerprint_of(r)}: "
        f"{r.get('num_images')} test images in one chunk, K = {r.get('num_steps')}; every push and pop in stack "
        "bits against -log2 of the symbol's Gaussian bin mass.",
        "",
        "| latent window | net bits/dim | ideal | coder overhead |",
        "|---|---|---|---|",
        *[f"| {row['window_sigmas']} sigmas | {row['net_bpd']:.4f} | {row['ideal_bpd']:.4f} | "
          f"{row['coder_overhead_bpd']:+.4f} ({row['coder_overhead_pct']:+.2f}%) |" for row in r.get("rows", [])],
    ]


def readme_lossless_stream(ll: dict[str, Any], name: str) -> list[str]:
    """A long single-stream run (e.g. `lossless_1000.json`): the stream's sizes against the bound."""
    prov, st = ll.get("provenance") or {}, ll.get("stream") or {}
    if "file_bpd" not in st:
        return []
    n, k = st.get("num_images"), st.get("num_steps")
    start = ("with the progressive bootstrap" if st.get("bootstrap_tiles")
             else "started on seeded words (before the bootstrap existed, or `--no-bootstrap`)")
    rows = [("whole file (header included)", f"{st['file_bpd']:.4f}", f"{st.get('overhead_file_pct', math.nan):+.2f}%"),
            ("payload minus the one-off initial bits", f"{st['net_bpd']:.4f}", f"{st.get('overhead_net_pct', math.nan):+.2f}%"),
            (f"bound on the same {k}-step chain", f"{st.get('bound_bpd', math.nan):.4f}", "")]
    return [
        f"## Lossless: {n} CIFAR-10 test images in one stream ({name})",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')}, {fingerprint_of(ll)}. "
        f"The stream {start}: header {st.get('header_bytes', 0):,} bytes, initial bits "
        f"{st.get('initial_bits', 0):,}; decoded exactly: {st.get('exact')}; "
        f"{st.get('encode_cpu_seconds_per_image', math.nan):.2f} / {st.get('decode_cpu_seconds_per_image', math.nan):.2f} "
        "CPU-s per image to encode / decode.",
        "",
        "| | bits/dim | over the bound |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        *(["", *network_limit_sentence(st, "stream")[:-1]] if "network_limit_seconds" in st else []),
    ]


def readme_lossless_kodak(ll: dict[str, Any], name: str) -> list[str]:
    """A Kodak-only lossless run (`bench.lossless --kodak-only`): size, seconds, memory, baselines."""
    prov, kd = ll.get("provenance") or {}, ll.get("kodak") or {}
    if "file_bpd" not in kd:
        return []
    base = kd.get("baselines_same_image") or {}
    return [
        f"## Lossless: one Kodak image at K = {kd.get('num_steps')} ({name})",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')}, {fingerprint_of(ll)}.",
        "",
        "| | bits/dim | encode | decode |",
        "|---|---|---|---|",
        f"| bits-back, {kd.get('image')} ({kd.get('num_tiles')} tiles, exact: {kd.get('exact')}) | "
        f"{kd['file_bpd']:.3f} | {kd.get('encode_cpu_seconds', math.nan):.0f} CPU-s, peak "
        f"{kd.get('encode_peak_rss_mib', math.nan):.0f} MiB | {kd.get('decode_cpu_seconds', math.nan):.0f} CPU-s, "
        f"peak {kd.get('decode_peak_rss_mib', math.nan):.0f} MiB |",
        *[f"| {BASELINE_NAMES.get(k, k)}, same image | {r['bits_per_dim']:.3f} | {r.get('cpu_seconds', math.nan):.2f} "
          "CPU-s (both ways) | |" for k, r in base.items()],
    ]


def readme_rd(prog: dict[str, Any] | None, nll: dict[str, Any] | None) -> list[str]:
    _, where = lossy_baselines(prog)
    return [
        "## Rate–distortion against JPEG / WebP / JPEG-XL",
        "",
        "![rate-distortion](rate_distortion.png)",
        "",
        "`rate_distortion.png`: PSNR (dB) against bits per pixel. The progressive codec's real file prefixes, "
        "header included (mean PSNR of the per-image x̂_0 and DDIM reconstructions) when `progressive.json` exists; the analytic curve "
        "of the bound (rate of Figure 5, PSNR of the dataset RMSE of x̂_0) when `nll.json` exists; the paper's "
        f"Table 4; baselines from {where}.",
    ]


def kodak_title(prog: dict[str, Any]) -> str:
    n = prog["summary"]["num_images"]
    crop = prog.get("crop")
    return f"{n} Kodak images" + (f", central {crop}x{crop} crops" if crop else "")


def readme_rd_kodak(prog: dict[str, Any], what: str) -> list[str]:
    prov = prog.get("provenance") or {}
    f = prog["summary"]["full_rate"]
    p = prog["params"]
    return [
        f"## Rate–distortion on Kodak ({what})",
        "",
        f"Produced by `{prov.get('command', '?')}` on {prov.get('device', '?')}, {fingerprint_of(prog)}: "
        f"K = {p['num_steps']} {p['spacing']} coded steps, {p['chunk_bits']}-bit chunks, "
        f"2^{p['log2_candidates']} candidates; the 32x32 CIFAR-10 model codes each crop as tiles.",
        "",
        "![rate-distortion Kodak](rate_distortion_kodak.png)",
        "",
        f"Full stream (lossless): real {f['real_bpd']:.3f} bits/dim against the chain's bound {f['bound_bpd']:.3f} "
        f"({100 * f['overhead_vs_bound']:+.1f}%). JPEG / WebP / JPEG-XL were run on the same crops; every rate "
        "counts whole files (the codec's prefixes with its header), mean bpp against mean PSNR. Per-stage "
        "table: `progressive_kodak.md`.",
    ]


def recorded_command(reports: Path, name: str) -> str:
    """The command recorded in reports/NAME's provenance, else the documented default."""
    payload = read_json(reports / name)
    prov = (payload or {}).get("provenance") or {}
    return prov.get("command") or COMMANDS.get(name, f"(no command recorded for {name})")


def build_readme(reports: Path, made: dict[str, list[str]], notes: list[str]) -> str:
    """The README: how to regenerate everything (the commands recorded in the JSON files, in
    order), then one section per input that exists, then what was not drawn and why."""
    names = ["nll.json", "nll_test_all.json", "nll_ci_reference.json", "speed.json", "lossless.json",
             "lossless_stream.json", "lossless_1000.json", "lossless_baselines.json", "coder_overhead.json",
             "lossless_kodak.json",
             "progressive.json",
             "progressive_kodak.json", "rcc_redundancy.json"]
    commands = [f"{recorded_command(reports, n)}  # -> reports/{n}" for n in names
                if (reports / n).is_file() or n in ("nll.json", "speed.json", "nll_ci_reference.json")]
    lines = [
        "# Reports",
        "",
        "<!-- generated by `python -m bench.plot`; edit bench/plot.py, not this file -->",
        "Every figure and table here is regenerated from the JSON files beside it by the commands below, "
        "run from the repository root with the project's environment (`.venv/bin/python`). Each JSON "
        "records its own provenance: command line, git revision, package versions, device, seed, and the "
        "model fingerprint. `train_default.json` and `training.md` come from training the default model "
        "(see `training.md`).",
        "",
        "```",
        *commands,
        "python -m bench.plot  # -> reports/*.png and this README",
        "```",
        "",
    ]
    for section in made.values():
        lines += section + [""]
    if notes:
        lines += ["## Not drawn", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def readme_simple(title: str, payload: dict[str, Any], images: list[str], caption: str) -> list[str]:
    prov = payload.get("provenance") or {}
    lines = [f"## {title}", ""]
    if prov.get("command"):
        lines += [f"Produced by `{prov['command']}` on {prov.get('device', '?')}, {fingerprint_of(payload)}.", ""]
    lines += [f"![{title}]({name})" for name in images] + ["", caption]
    return lines


Drawer = Callable[[dict[str, Any], Path], Path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    p.add_argument("--reports", default=str(REPORTS_DIR), help="folder of the JSON inputs and figure outputs")
    args = p.parse_args(argv)
    reports = Path(args.reports)
    notes: list[str] = []
    made: dict[str, list[str]] = {}

    def need(name: str) -> dict[str, Any] | None:
        payload = read_json(reports / name)
        if payload is None:
            notes.append(f"{name} absent: run `{COMMANDS[name]}` to make it")
            print(f"plot: note: skipped the figures from {name} (absent)", file=sys.stderr)
        return payload

    def draw(drawer: Drawer, payload: dict[str, Any], name: str) -> None:
        path = drawer(payload, reports / name)
        print(f"plot: wrote {path}", file=sys.stderr)

    nll = need("nll.json")
    if nll is not None:
        draw(plot_figure5, nll, "figure5.png")
        draw(plot_rmse_vs_t, nll, "rmse_vs_t.png")
        draw(plot_terms_vs_t, nll, "terms_vs_t.png")
        if len(nll["runs"]) > 1:
            draw(plot_bpd_by_steps, nll, "bpd_by_steps.png")
        made["nll"] = readme_nll(nll)
    nll_all = read_json(reports / "nll_test_all.json")
    if nll_all is not None:
        made["nll_all"] = readme_nll_all(nll_all)
    ref = read_json(reports / "nll_ci_reference.json")
    if ref is not None:
        made["ci"] = readme_ci(ref)
    speed = need("speed.json")
    if speed is not None:
        made["speed"] = readme_speed(speed)
    ll = need("lossless.json")
    if ll is not None:
        draw(plot_lossless, ll, "lossless.png")
        made["lossless"] = readme_lossless(ll)
    for name in ("lossless_stream.json", "lossless_1000.json"):
        ll_long = read_json(reports / name)
        if ll_long is not None:
            made[name] = readme_lossless_stream(ll_long, name)
    overhead = read_json(reports / "coder_overhead.json")
    if overhead is not None:
        made["coder_overhead"] = readme_coder_overhead(overhead)
    ll_base = read_json(reports / "lossless_baselines.json")
    if ll_base is not None:
        made["lossless_baselines"] = readme_lossless_baselines(ll_base, "lossless_baselines.json")
    ll_kodak = read_json(reports / "lossless_kodak.json")
    if ll_kodak is not None:
        made["lossless_kodak"] = readme_lossless_kodak(ll_kodak, "lossless_kodak.json")
    prog = need("progressive.json")
    if prog is not None:
        draw(plot_progressive_rate, prog, "progressive_rate.png")
        made["progressive"] = readme_progressive(prog)
    rcc = need("rcc_redundancy.json")
    if rcc is not None:
        draw(plot_rcc_redundancy, rcc, "rcc_redundancy.png")
        made["rcc"] = readme_rcc(rcc)
    if prog is not None or nll is not None:
        draw(lambda _, path: plot_rate_distortion(prog, nll, path), {}, "rate_distortion.png")
        made["rd"] = readme_rd(prog, nll)
    kodak = read_json(reports / "progressive_kodak.json")
    if kodak is not None:
        what = kodak_title(kodak)
        draw(lambda _, path: plot_rate_distortion(kodak, None, path, data=what, paper=False), {},
             "rate_distortion_kodak.png")
        made["rd_kodak"] = readme_rd_kodak(kodak, what)
    train = need("train_default.json")
    if train is not None:
        draw(plot_loss_curve, train, "loss_curve.png")
        made["train"] = readme_simple("Training the default model", train, ["loss_curve.png"],
                                      "`loss_curve.png`: training loss against step (see training.md for the run)."
                                      + (f" Note from the run: {train['note']}" if train.get("note") else ""))
    write_text(reports / "README.md", build_readme(reports, made, notes))
    print(f"plot: wrote {reports / 'README.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
