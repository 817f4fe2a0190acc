"""The sections of reports/README.md, one function per report JSON, each returning Markdown lines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.nll import markdown_tables
from bench.report_data import BASELINE_NAMES, fingerprint_of, lossless_bars, lossy_baselines


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
        f"the analytic {f['analytic_bpd']:.4f} ({100 * f['overhead_vs_analytic']:+.1f}%)"
        + (f" and the bound of the same chain {f['bound_bpd']:.4f} ({100 * f['overhead_vs_bound']:+.1f}%)."
           if f.get("bound_bpd") is not None else " (this file predates the bound column).")
        + (f" The sent latents deliver {f['rcc_sample_over_kl']:.3f} of their stages' KL (log2 q/p of each sent "
           "latent over the stage's KL, stages 1..K-1; 1 for exact samples of q): the shortfall is paid again by "
           "later stages, which is most of the gap to the bound." if f.get("rcc_sample_over_kl") is not None else ""),
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
        "header included (mean PSNR of the per-image x̂_0 and DDIM reconstructions) when a progressive report exists; the analytic curve "
        "of the bound (rate of Figure 5, PSNR of the dataset RMSE of x̂_0) when `nll.json` exists; the paper's "
        f"Table 4; baselines from {where}.",
    ]


def readme_rd_kodak(prog: dict[str, Any], what: str, name: str = "progressive_kodak.json") -> list[str]:
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
        f"({100 * f['overhead_vs_bound']:+.1f}%). "
        f"{' / '.join(prog.get('lossy_baselines') or {}) or 'No classical codec'} were run on the same crops; every rate "
        "counts whole files (the codec's prefixes with its header), mean bpp against mean PSNR. Per-stage "
        f"table: `{Path(name).with_suffix('.md').name}`.",
    ]


def readme_simple(title: str, payload: dict[str, Any], images: list[str], caption: str) -> list[str]:
    """A section of a title, the payload's command line, its figures and a caption."""
    prov = payload.get("provenance") or {}
    lines = [f"## {title}", ""]
    if prov.get("command"):
        lines += [f"Produced by `{prov['command']}` on {prov.get('device', '?')}, {fingerprint_of(payload)}.", ""]
    lines += [f"![{title}]({name})" for name in images] + ["", caption]
    return lines
