"""The matplotlib figures under reports/, one function per figure, each drawn from a report's JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.nll import PAPER_TABLE4, figure5_run
from bench.report_data import lossless_bars, lossy_baselines, origin, short_device


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

def psnr_of_rmse(rmse_255: np.ndarray) -> np.ndarray:
    """PSNR in dB of an RMSE on the [0, 255] scale."""
    with np.errstate(divide="ignore"):
        return 20.0 * np.log10(255.0 / np.asarray(rmse_255, dtype=np.float64))


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
