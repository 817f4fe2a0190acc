"""Labels and rows read from the reports' JSON that both the figures and the README use."""

from __future__ import annotations

from typing import Any


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


# Lossy baselines on CIFAR-10 as ../shared/docs/DESIGN.md records them (500 test images, whole files; bpp / PSNR dB).
# Drawn only when no JSON in reports/ brings its own measured baselines ("lossy_baselines").
DESIGN_LOSSY_BASELINES: dict[str, list[tuple[float, float]]] = {
    "JPEG (Pillow)": [(2.83, 23.0), (3.51, 26.4), (3.95, 27.8), (4.71, 29.9), (6.11, 33.0), (7.44, 35.0)],
    "WebP (method 6)": [(1.08, 24.5), (1.66, 27.8), (2.07, 29.5), (2.62, 31.2), (4.46, 34.6), (7.27, 36.3)],
    "JPEG-XL (effort 9)": [(1.21, 24.1), (1.79, 26.8), (2.66, 30.1), (3.91, 33.4), (5.81, 37.0), (8.74, 41.4),
                           (11.33, 45.0)],
}


def lossy_baselines(*payloads: dict[str, Any] | None) -> tuple[dict[str, list[tuple[float, float]]], str]:
    """{codec: [(bpp, PSNR dB), ...]} from the first payload holding 'lossy_baselines', else those of ../shared/docs/DESIGN.md."""
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


def kodak_title(prog: dict[str, Any]) -> str:
    """What a Kodak progressive run coded, e.g. '24 Kodak images, central 256x256 crops'."""
    n = prog["summary"]["num_images"]
    crop = prog.get("crop")
    return f"{n} Kodak images" + (f", central {crop}x{crop} crops" if crop else "")
