"""The progressive codec on real images: real bits per stage against the analytic rate, and
the distortion of every prefix.

    python -m bench.progressive [DATA] [--checkpoint F] [--num-images 8] [--steps 50]
        [--chunk-bits 14] [--pad-bits P] [--log2-candidates 16] [--crop N] [--no-baselines]
        [--threads 1] [--out reports/progressive.json]

    python -m bench.progressive ../shared/data/kodak -n 24 --crop 64 --steps 25 \
        --out reports/progressive_kodak.json          # Kodak, central 64x64 crops

Each image is coded alone (one .dfc file per image, as a user would) with
`diffcodec.codec.api.encode` and decoded back with `api.decode` (the full file
must verify). Per coded stage k (k = 0: x_T from the prior ... K-1: y_0 at t = 0; K: the
lossless pixel stage) it records

    real_bits      the shortest payload prefix that delivers stages 0..k (what a file cut
                   there costs, header excluded; ``header_bits`` is given separately)
    analytic_bits  the sum of the terms on the same coded schedule along the encoder's own
                   trajectory: KL(q(x_T|x_0) || N(0,I)), the KL terms KL(q || p_theta), and at
                   stage K the exact -log2 p_theta(x_0 | y_0) of the discretized Gaussian
    bound_bits     the same terms with fresh noise per step (`likelihood.bound_bits`, as the
                   nll job): the bound's rate on this chain, independent of the codec's samples
    psnr_xstart    PSNR (dB, uint8) of x^_0 predicted from the stage's latent (Figure 5)
    psnr_ddim      PSNR of deterministic DDIM (eta = 0) from that latent down the coded chain

and the seconds of encoder and decoder with the share spent drawing/searching candidates,
in the network, and entropy coding (constriction plus the prefix checks). Beside them, the
same images through JPEG, WebP and JPEG-XL at a sweep of qualities (``lossy_baselines``:
mean bits per pixel of the whole files against mean PSNR; ``--no-baselines`` skips).
Larger images are tiled by the codec; ``--crop N`` codes their central N x N pixels
(e.g. Kodak, whose full 768x512 frames take hours per image on a CPU). With
``--perturb SIGMA`` (default 1e-6) one image is also decoded by a model whose weights carry
N(0, SIGMA^2) noise: for a same-machine float file (``--arithmetic float32``), the PSNR of
its lossy prefix and whether the lossless stage is caught; an exact-contract file (the
default) is refused by its probe, and the study records the message.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPORTS_DIR, module_command, provenance, resolve_data, run_main, write_json, write_text
from diffcodec.checkpoint import LoadedModel, load_checkpoint
from diffcodec.codec import api
from diffcodec.codec.container import unpack
from diffcodec.codec.progressive import codec as pg
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.data import read_images
from diffcodec.errors import DiffcodecError
from diffcodec.images import from_model_output, from_tiles, image_tiles, to_model_input
from diffcodec.likelihood import bound_bits
from diffcodec.runtime import network, pick_device
from diffcodec.timesteps import SPACINGS


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size pixels of an [H, W, C] image (DiffcodecError if it is smaller)."""
    h, w = image.shape[:2]
    if size > min(h, w):
        raise DiffcodecError(f"--crop {size} is larger than a {w}x{h} image")
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
JPEGXL_DISTANCES = (12.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.4, 0.2)


def lossy_codecs() -> dict[str, list[tuple[str, Any]]]:
    """name -> [(setting, encode uint8 [H,W,3] -> bytes)]; decoding is Pillow / imagecodecs."""
    from bench.lossless import _pillow

    def pillow(fmt: str, **kw: Any):
        return _pillow(fmt, **kw)[0]  # the lossless bench's Pillow encoder

    codecs = {
        "JPEG (Pillow, 4:2:0)": [(f"q{q}", pillow("JPEG", quality=q)) for q in QUALITIES],
        "WebP (method 6)": [(f"q{q}", pillow("WEBP", quality=q, method=6)) for q in QUALITIES],
    }
    from PIL import features

    if features.check("avif"):  # Pillow's libavif (default speed 6, 4:4:4: better than 4:2:0 on these sizes)
        codecs["AVIF (Pillow, 4:4:4)"] = [(f"q{q}", pillow("AVIF", quality=q, subsampling="4:4:4"))
                                          for q in QUALITIES]
    try:
        import imagecodecs
    except ImportError:
        return codecs
    if imagecodecs.JPEGXL.available:
        codecs["JPEG-XL (effort 7)"] = [
            (f"d{d:g}", lambda im, d=d: imagecodecs.jpegxl_encode(im, distance=d, effort=7)) for d in JPEGXL_DISTANCES]
    return codecs


def decode_any(data: bytes) -> np.ndarray:
    """uint8 [H,W,3] of a JPEG / WebP / AVIF (Pillow) or JPEG-XL (imagecodecs) file."""
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        import imagecodecs

        return np.asarray(imagecodecs.jpegxl_decode(data))[..., :3]
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def lossy_baselines(images: list[np.ndarray]) -> dict[str, list[list[float]]]:
    """{codec: [[mean bpp, mean PSNR dB, setting], ...]} over ``images`` (whole files,
    headers included; PSNR on uint8 RGB, averaged per image as the codec's stage PSNRs)."""
    out: dict[str, list[list[Any]]] = {}
    for name, settings in lossy_codecs().items():
        points = []
        for setting, enc in settings:
            bpp, psnr = [], []
            for im in images:
                data = enc(im)
                bpp.append(8.0 * len(data) / (im.shape[0] * im.shape[1]))
                psnr.append(psnr_uint8(decode_any(data), im))
            points.append([float(np.mean(bpp)), float(np.mean(psnr)), setting])
        out[name] = sorted(points)
    return out


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def stage_psnrs(loaded: LoadedModel, data: bytes, image: np.ndarray, *, ddim: bool) -> tuple[list[float], list[float]]:
    """PSNR of the xstart and DDIM reconstructions from every received latent (K each)."""
    container = unpack(data)
    params = api.stream_params(container.header, loaded)  # tile count and size filled in (format 4)
    fn = network(loaded.model, exact=params.exact, float64=params.network_float64)
    dc = loaded.diffusion_config
    dec = pg.decode(fn, dc, container.payload, params, upto=params.num_steps, keep_all=True)
    s = pg.coded_schedule(dc, params.num_steps, params.spacing)
    x_psnr, d_psnr = [], []
    h, w = image.shape[:2]

    def picture(x: torch.Tensor) -> np.ndarray:  # model-space tiles -> the uint8 image
        return from_tiles(from_model_output(x), h, w)

    for stage, (xstart, y) in enumerate(zip(dec.xstart, dec.latents)):
        x_psnr.append(psnr_uint8(picture(xstart), image))
        if ddim:
            k = params.num_steps - 1 - stage
            rec = pg.ddim_reconstruct(fn, s, y, k, var_type=dc.var_type, clip_denoised=params.clip_denoised,
                                      first_xstart=xstart)
            d_psnr.append(psnr_uint8(picture(rec), image))
    return x_psnr, d_psnr


def perturbed(loaded: LoadedModel, sigma: float, seed: int) -> LoadedModel:
    """The same checkpoint with N(0, sigma^2) added to every weight (fingerprint kept, so the
    decoder accepts the file: this simulates different arithmetic, not another model)."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * sigma)
    return LoadedModel(model, loaded.model_config, loaded.diffusion_config, loaded.fingerprint, loaded.meta,
                       loaded.path)


def perturbation_study(loaded: LoadedModel, data: bytes, image: np.ndarray, sigma: float, seed: int) -> dict:
    bad = perturbed(loaded, sigma, seed)
    params = api.stream_params(unpack(data).header, loaded)
    try:  # an exact-contract file is refused by its probe before any stage is decoded
        api.decode(data, model=bad, device="cpu", upto=1)
    except DiffcodecError as e:
        return {"sigma": sigma, "refused": str(e)}
    rows = []
    for upto in sorted({1, params.num_steps // 2, params.num_steps - 2, params.num_steps}):
        upto = max(1, upto)
        a = api.decode(data, model=loaded, device="cpu", upto=upto).images[0]
        b = api.decode(data, model=bad, device="cpu", upto=upto).images[0]
        rows.append({"stages": upto, "psnr_exact_decoder": psnr_uint8(a, image),
                     "psnr_perturbed_decoder": psnr_uint8(b, image), "psnr_perturbed_vs_exact": psnr_uint8(a, b)})
    full = api.decode(data, model=bad, device="cpu")
    return {
        "sigma": sigma,
        "prefix": rows,
        "full_stream": {"verified": full.verified, "diverged": full.diverged, "stages": full.stages,
                        "psnr_of_returned_image": psnr_uint8(full.images[0], image),
                        "returned": full.reconstruction},
    }


def run_image(loaded: LoadedModel, image: np.ndarray, params: ProgressiveParams, *, ddim: bool,
              seed: int, workers: int | None = None, arithmetic: str = "exact") -> dict:
    start = time.perf_counter()
    encoding = api.encode([image], model=loaded, mode="progressive", progressive_params=params, workers=workers,
                          arithmetic=arithmetic)
    data, enc = encoding.data, encoding.encoded
    enc_seconds = time.perf_counter() - start
    start = time.perf_counter()
    full = api.decode(data, model=loaded, device="cpu")
    dec_seconds = time.perf_counter() - start
    if not full.verified or not np.array_equal(full.images[0], image):
        raise DiffcodecError("the full stream did not decode to the image (lossless check failed)")
    x_psnr, d_psnr = stage_psnrs(loaded, data, image, ddim=ddim)
    s = pg.coded_schedule(loaded.diffusion_config, params.num_steps, params.spacing)
    tile = loaded.model_config.image_size
    tiles = image_tiles([image], tile)[0]
    bound = bound_bits(network(loaded.model), s, to_model_input(tiles),
                       var_type=loaded.diffusion_config.var_type, generator=torch.Generator().manual_seed(seed))
    # stage order, summed over the image's tiles
    per_stage_bound = [float(bound.prior_bits.sum())] + bound.terms_bits.sum(axis=0)[::-1].tolist()
    return {
        "file_bytes": len(data),
        "header_bits": full.header_bits,
        "real_bits": enc.prefix_bits.tolist(),
        "analytic_bits": enc.kl_bits.tolist(),
        "bound_bits": per_stage_bound,
        "sample_bits": enc.sample_bits.tolist(),
        "num_chunks": enc.num_chunks.tolist(),
        "levels": enc.levels.tolist(),
        "psnr_xstart": x_psnr,
        "psnr_ddim": d_psnr,
        "encode_seconds": enc_seconds,
        "encode_breakdown": enc.seconds,
        "decode_seconds": dec_seconds,
        "decode_breakdown": full.seconds,
        "timesteps": enc.timesteps.tolist(),
    }


def summarize(rows: list[dict], num_dims: int) -> dict[str, Any]:
    real = np.array([r["real_bits"] for r in rows], dtype=np.float64)  # cumulative [N, K+1]
    analytic = np.cumsum(np.array([r["analytic_bits"] for r in rows]), axis=1)
    bound = np.cumsum(np.array([r["bound_bits"] for r in rows]), axis=1)
    header = np.array([r["header_bits"] for r in rows], dtype=np.float64)
    xs = np.array([r["psnr_xstart"] for r in rows])
    dd = np.array([r["psnr_ddim"] for r in rows]) if rows[0]["psnr_ddim"] else None
    n = len(rows)

    def ms(a: np.ndarray) -> tuple[list[float], list[float]]:
        return a.mean(0).tolist(), (a.std(0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else [math.nan] * a.shape[1]

    K = real.shape[1] - 1
    rcc_real, rcc_analytic = real[:, K - 1], analytic[:, K - 1]
    # what the sent latents deliver (log2 q/p) against the stages' KL, summed over images
    terms = np.array([r["analytic_bits"][:K] for r in rows])
    sample = np.array([r["sample_bits"] for r in rows]) if all("sample_bits" in r for r in rows) else None

    def delivered(k: slice | int) -> float | None:
        if sample is None or terms[:, k].sum() <= 0:
            return None
        return float(sample[:, k].sum() / terms[:, k].sum())

    out = {
        "num_images": n,
        "timesteps": rows[0]["timesteps"],
        "stages": [{
            "stage": k,
            "timestep": rows[0]["timesteps"][k],
            "real_bpd": float((real[:, k] / num_dims).mean()),
            "real_with_header_bpd": float(((real[:, k] + header) / num_dims).mean()),
            "analytic_bpd": float((analytic[:, k] / num_dims).mean()),
            "bound_bpd": float((bound[:, k] / num_dims).mean()),
            "psnr_xstart": float(xs[:, k].mean()) if k < K else math.inf,
            "psnr_ddim": float(dd[:, k].mean()) if dd is not None and k < K else (math.inf if k == K else None),
            "chunks": float(np.mean([r["num_chunks"][k] for r in rows])) if k < K else None,
            "sample_over_kl": delivered(k) if 0 < k < K else None,
        } for k in range(K + 1)],
        "full_rate": {
            "real_bpd": ms(real[:, -1:] / num_dims)[0][0],
            "real_with_header_bpd": float(((real[:, -1] + header) / num_dims).mean()),
            "analytic_bpd": float((analytic[:, -1] / num_dims).mean()),
            "overhead_vs_analytic": float(real[:, -1].sum() / analytic[:, -1].sum() - 1),
            "bound_bpd": float((bound[:, -1] / num_dims).mean()),
            "overhead_vs_bound": float(real[:, -1].sum() / bound[:, -1].sum() - 1),
            "rcc_bound_bpd": float((bound[:, K - 1] / num_dims).mean()),
            "rcc_real_bpd": float((rcc_real / num_dims).mean()),
            "rcc_analytic_bpd": float((rcc_analytic / num_dims).mean()),
            "rcc_overhead_vs_kl_terms": float(rcc_real.sum() / rcc_analytic.sum() - 1),
            "pixel_stage_real_bpd": float(((real[:, K] - real[:, K - 1]) / num_dims).mean()),
            "pixel_stage_analytic_bpd": float((np.array([r["analytic_bits"][K] for r in rows]) / num_dims).mean()),
            "header_bits": float(header.mean()),
            "rcc_sample_over_kl": delivered(slice(1, K)),
        },
        "seconds": {},
    }
    for side in ("encode", "decode"):
        total = np.array([r[f"{side}_seconds"] for r in rows])
        shares = {}
        for what in ("candidates", "network", "entropy"):
            part = np.array([r[f"{side}_breakdown"].get(what, 0.0) for r in rows])
            shares[what] = float(part.sum() / total.sum())
        out["seconds"][side] = {"mean_per_image": float(total.mean()), "share": shares}
    return out


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    f = s["full_rate"]
    lines = [
        f"# Progressive codec ({s['num_images']} images, K = {payload['params']['num_steps']} "
        f"{payload['params']['spacing']}, chunk {payload['params']['chunk_bits']} bits, "
        f"2^{payload['params']['log2_candidates']} candidates"
        + ("" if payload.get("arithmetic", "exact") == "exact" else f", {payload['arithmetic']} arithmetic") + ")",
        "",
        f"Full rate: real {f['real_bpd']:.4f} bits/dim (with header {f['real_with_header_bpd']:.4f}) vs analytic "
        f"{f['analytic_bpd']:.4f} ({100 * f['overhead_vs_analytic']:+.1f}%); KL stages real {f['rcc_real_bpd']:.4f} vs "
        f"{f['rcc_analytic_bpd']:.4f} ({100 * f['rcc_overhead_vs_kl_terms']:+.1f}%); pixel stage "
        f"{f['pixel_stage_real_bpd']:.4f} vs {f['pixel_stage_analytic_bpd']:.4f}. The bound on the same chain "
        f"(fresh noise): {f['bound_bpd']:.4f} bits/dim (real {100 * f['overhead_vs_bound']:+.1f}%), KL stages "
        f"{f['rcc_bound_bpd']:.4f}.",
    ]
    if f.get("rcc_sample_over_kl") is not None:
        lines += ["", f"The sent latents deliver {f['rcc_sample_over_kl']:.3f} of the KL stages' bits "
                  "(log2 q/p of each sent latent over its stage's KL, summed over stages 1..K-1 and images; "
                  "1 for exact samples of q): the shortfall is why later stages cost more than the bound's."]
    lines += [
        "",
        "| stage | t | real bpd | analytic bpd | bound bpd | sample / KL | PSNR x^_0 | PSNR DDIM | chunks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["stages"]:
        def fmt(v: Any, d: int = 2) -> str:
            return "-" if v is None else ("inf" if isinstance(v, float) and math.isinf(v) else f"{v:.{d}f}")
        lines.append(f"| {r['stage']} | {r['timestep']} | {r['real_bpd']:.4f} | {r['analytic_bpd']:.4f} | "
                     f"{r['bound_bpd']:.4f} | {fmt(r.get('sample_over_kl'), 3)} | "
                     f"{fmt(r['psnr_xstart'])} | {fmt(r['psnr_ddim'])} | {fmt(r['chunks'], 0)} |")
    sec = s["seconds"]
    lines += ["", "Seconds per image: " + "; ".join(
        f"{side} {v['mean_per_image']:.1f} s (" + ", ".join(f"{k} {100 * x:.0f}%" for k, x in v["share"].items()) + ")"
        for side, v in sec.items())]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    d = ProgressiveParams()
    p = argparse.ArgumentParser(prog="python -m bench.progressive", description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="CIFAR-10 test shards (default: ../shared/data/cifar10/test)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the embedded default model)")
    p.add_argument("--num-images", "-n", type=int, default=8, help="first N images (default 8)")
    p.add_argument("--steps", "-k", type=int, default=d.num_steps, help=f"coded steps K (default {d.num_steps})")
    p.add_argument("--spacing", choices=SPACINGS, default=d.spacing)
    p.add_argument("--chunk-bits", type=float, default=d.chunk_bits)
    p.add_argument("--pad-bits", type=float,
                   help="2^ceil(KL + pad) candidates per chunk (default: the stream version's, `default_pad_bits`)")
    p.add_argument("--stream-version", type=int, default=d.version,
                   help=f"progressive stream version to write (default {d.version}; 3: per-chunk candidates, `rcc`)")
    p.add_argument("--log2-candidates", type=int, default=d.log2_candidates)
    p.add_argument("--min-stage-bits", type=float, default=d.min_stage_bits,
                   help=f"skip a stage whose KL is below this (default {d.min_stage_bits})")
    p.add_argument("--seed", type=int, default=0, help="the streams' shared seed (default 0)")
    p.add_argument("--crop", type=int, help="code the central N x N pixels of each image (N: a multiple of 32)")
    p.add_argument("--no-baselines", action="store_true", help="skip JPEG / WebP / JPEG-XL on the same images")
    p.add_argument("--no-ddim", action="store_true", help="skip the DDIM reconstructions (K^2/2 network calls)")
    p.add_argument("--perturb", type=float, default=1e-6, help="weight noise of the perturbed decoder (0: skip)")
    p.add_argument("--arithmetic", choices=("exact", "float32", "float64"), default="exact",
                   help="the codec's arithmetic (default exact: files that decode on any machine)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads and candidate-search threads (default: torch's and all cores)")
    p.add_argument("--out", help="output JSON (default reports/progressive.json; markdown beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = module_command("bench.progressive", argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))  # a script's choice, recorded in the device string
    device = pick_device("cpu")
    loaded = load_checkpoint(args.checkpoint, device=device)
    data_path = resolve_data(args.data)
    images = read_images(data_path, limit=args.num_images).images
    if args.crop is not None:
        if args.crop < 32 or args.crop % 32:
            raise DiffcodecError(f"--crop must be a positive multiple of 32, got {args.crop}")
        images = [center_crop(im, args.crop) for im in images]
    try:
        params = ProgressiveParams(num_steps=args.steps, spacing=args.spacing, chunk_bits=args.chunk_bits,
                                      pad_bits=args.pad_bits, log2_candidates=args.log2_candidates, seed=args.seed,
                                      min_stage_bits=args.min_stage_bits, version=args.stream_version)
    except ValueError as e:
        raise DiffcodecError(str(e)) from None
    prov = provenance(args, loaded, args.seed, device=device, command=command)
    rows = []
    for i, image in enumerate(images):
        rows.append(run_image(loaded, image, params, ddim=not args.no_ddim, seed=args.seed + i, workers=args.threads,
                              arithmetic=args.arithmetic))
        r = rows[-1]
        print(f"image {i}: {r['real_bits'][-1] / image.size:.3f} bpd real vs {sum(r['analytic_bits']) / image.size:.3f} "
              f"analytic; encode {r['encode_seconds']:.1f} s, decode {r['decode_seconds']:.1f} s", file=sys.stderr)
    num_dims = int(images[0].size)
    if any(img.size != num_dims for img in images):
        raise DiffcodecError("the benchmark expects images of one size")
    payload = {
        "kind": "progressive",
        "data": str(args.data or "../shared/data/cifar10/test"),
        "crop": args.crop,
        "image_shape": list(images[0].shape),
        "num_dims": num_dims,
        "arithmetic": args.arithmetic,
        "params": {k: getattr(params, k) for k in ("num_steps", "spacing", "chunk_bits", "pad_bits",
                                                   "log2_candidates", "seed", "snap_log2", "clip_denoised",
                                                   "min_stage_bits", "check_bits", "check_min_bits", "version")},
        "weights": loaded.meta.get("weights", "unknown"),
        "provenance": prov,
        "summary": summarize(rows, num_dims),
        "per_image": rows,
    }
    if not args.no_baselines:
        payload["lossy_baselines"] = lossy_baselines(images)
    if args.perturb > 0:
        data = api.encode([images[0]], model=loaded, mode="progressive", progressive_params=params).data
        payload["perturbation"] = perturbation_study(loaded, data, images[0], args.perturb, args.seed)
    out = Path(args.out or REPORTS_DIR / "progressive.json")
    write_json(out, payload)
    md = write_text(out.with_suffix(".md"), markdown(payload))
    print(markdown(payload), end="")
    print(f"wrote {out} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
