"""The codec's public API: RGB images in, `.dfc` bytes out, and back.

    encode(images, names, model=..., mode="lossless" | "progressive", target=...) -> LosslessEncoding | ProgressiveEncoding
    decode(data, model=..., ...)                                        -> LosslessDecoding | ProgressiveDecoding
    read_header(data)                                                   -> container.Header

This module owns what both modes share: the checks made before any network call (mode,
steps in 1..T, image sizes within the format's limits), cutting images into model-size
tiles and putting them back (`data.image_tiles`), the container (`container`), the checks
of a file against the model (format 4: the model identity over weights, chain and tile
size, `resolve_header` then fills those fields in; formats 1-3: fingerprint, chain, tile
size), tile counts, the pixel checks (a decoded image is handed out as the coded one only
when it passes: a lossless file's pixel checksum, a format 4 or 5 progressive stream's closing
check, an older progressive file's header checksum), whether a progressive file is whole, cut
short or damaged (format 5 records its payload's length and stage count: shorter is cut short,
a full-length file that stops before its last stage is damaged), the choice of device, the
deterministic-kernel settings and the decoder's thread count (`runtime`). Each mode's
stream is its own package: `bitsback.file`, `progressive.codec`.

Progress: ``progress(phase, done, total)`` is called as work advances, with one phase per job,
"encode" or "decode": stages in progressive mode; in lossless mode tile network calls of the
whole job (the bootstrap's stages, the chain's steps and the bound's, `_LosslessJob`).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from diffcodec.checkpoint import LoadedModel, load_checkpoint
from diffcodec.codec import LOSSLESS_STEPS
from diffcodec.codec.bitsback import file as bitsback
from diffcodec.codec.bitsback.chain import GridConfig
from diffcodec.codec.bitsback.params import BitsBackParams
from diffcodec.codec.container import (
    LOSSLESS_VERSION,
    MAX_IMAGE_SIDE,
    MAX_IMAGES,
    MODE_BITSBACK,
    MODE_NAMES,
    MODE_PROGRESSIVE,
    PIXEL_CHECK_BYTES,
    VERSION,
    Container,
    Header,
    ImageEntry,
    check_model,
    file_size,
    model_identity,
    pack,
    pixel_checksum,
    unpack,
)
from diffcodec.codec.probe import check_probe, probe_digest
from diffcodec.codec.progressive import codec as progressive
from diffcodec.codec.progressive.params import ProgressiveParams, with_regions
from diffcodec.codec.rate import RateControl, RateTarget
from diffcodec.errors import DamagedFileError, DiffcodecError
from diffcodec.exact import CONTRACT_VERSION, CONTRACT_VERSIONS
from diffcodec.images import image_tiles, images_from_tiles, levels_as_tiles, tile_count, tiles_as_levels
from diffcodec.likelihood import BoundResult, merge_rows
from diffcodec.runtime import (
    ModelFn,
    decode_device,
    deterministic_kernels,
    device_kind,
    network,
    network_batch,
    pick_device,
    use_threads,
)
from diffcodec.timesteps import chain_schedule

MODES = ("lossless", "progressive")
ARITHMETICS = ("exact", "float32", "float64")  # exact: decodes anywhere; float: on the encoder's machine only
DEFAULT_STEPS = {"lossless": LOSSLESS_STEPS, "progressive": ProgressiveParams().num_steps}
DEFAULT_BATCH = 64  # a lossless stream's tiles per chunk (its file's layout); the network's batch is
#   `runtime.network_batch(device)` (32 on a CPU) unless the caller's batch_size is smaller
Progress = Callable[[str, int, int], None]  # (phase, done, total)


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class LosslessEncoding:
    """A bits-back file and what its encoder measured."""

    data: bytes  # the whole file
    header: Header
    params: BitsBackParams
    num_images: int
    num_tiles: int
    num_dims: int  # real dimensions (sum of H x W x 3; padding excluded)
    payload_bytes: int
    initial_bits: int  # initial bits the stream consumed (included in the payload)
    bound: BoundResult | None  # per image, the same K-step chain (likelihood.evaluate_bound)
    seconds: float  # coding only (wall)
    bound_seconds: float
    device: str
    cpu_seconds: float = math.nan  # coding only, CPU time of this process (all threads)
    bound_cpu_seconds: float = math.nan
    bootstrap_tiles: int = 0  # the first tiles, sent with the progressive codec
    bootstrap_bits: int = 0  # their payload (part of the payload)

    @property
    def file_bpd(self) -> float:
        return 8.0 * len(self.data) / self.num_dims

    @property
    def payload_bpd(self) -> float:
        return 8.0 * self.payload_bytes / self.num_dims

    @property
    def net_bpd(self) -> float:
        """Payload minus the initial bits: what the tiles cost (the chain's, and the bootstrap
        tiles' progressive payload)."""
        return (8.0 * self.payload_bytes - self.initial_bits) / self.num_dims

    @property
    def bound_bpd(self) -> float:
        """Total bound bits over total real dimensions (comparable with file_bpd)."""
        if self.bound is None:
            return math.nan
        return float(self.bound.total_bits.sum() / self.num_dims)


@dataclass(frozen=True)
class ProgressiveEncoding:
    """A progressive file and its encoder's measurements (`progressive.Encoded`; with a rate
    target the file ends at the boundary the target picked: ``encoded.stages``)."""

    data: bytes
    header: Header
    encoded: progressive.Encoded
    num_dims: int
    target: RateTarget | None = None
    psnr: tuple[float, ...] | None = None  # per image, of the file's decoded image (inf: lossless), when measured

    @property
    def header_bits(self) -> int:
        return 8 * (len(self.data) - len(self.encoded.payload))


@dataclass(frozen=True)
class LosslessDecoding:
    images: list[np.ndarray]  # uint8 [H, W, 3], checksum verified
    names: list[str]
    seconds: float  # wall
    device: str
    cpu_seconds: float = math.nan


@dataclass(frozen=True)
class ProgressiveDecoding:
    """A progressive file decoded from (a prefix of) its bytes. Bits count the whole file."""

    images: list[np.ndarray]  # uint8 [H, W, 3]: the coded images when verified, else reconstructions
    names: list[str]
    stages: int  # received, of num_stages
    num_stages: int
    timestep: int  # original timestep of the last latent received (-1: x_0)
    verified: bool  # complete and the pixels checked (format 4: the stream's closing check; before: the
    #   header's pixel checksum): these are the coded images
    diverged: bool  # complete file, but the lossless stage failed (other arithmetic than the encoder's)
    truncated: bool  # the file is cut short: it holds less than its header says (format 5, and 3), or
    #   (format 4) the whole file was given and the stream ran out before its end
    file_bits: int  # bits the decoder was given (after num_bits)
    header_bits: int
    bits_used: int  # header + the fewest payload bits that deliver the same stages
    payload_bits_total: int  # the complete stream's payload (0: unknown, a cut format 4 file)
    reconstruction: str
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    damage: str = ""  # why the file is damaged (a failed integrity check, ...), "" when it is not;
    #   the images are then the reconstruction from the intact stages before the damage
    file_stages: int = 0  # the stages the file delivers when whole (K + 1, or fewer for a lossy file: format 5)
    length_recorded: bool = False  # formats 5 and 3: the file records its payload's length, so a cut file and a
    #   damaged one are told apart (format 4: a stream that stops early at the file's end may be either)


# ------------------------------------------------------------------------------ checks


def check_images(images: Sequence[np.ndarray]) -> None:
    """Refuse, before any work, what no file can hold (one-line DiffcodecError)."""
    if not images:
        raise DiffcodecError("no images to encode")
    if len(images) > MAX_IMAGES:
        raise DiffcodecError(f"{len(images)} images; a file holds at most {MAX_IMAGES}")
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise DiffcodecError(f"image {i}: expected uint8 [H, W, 3], got {img.dtype} {list(img.shape)}")
        if not (1 <= img.shape[0] <= MAX_IMAGE_SIDE and 1 <= img.shape[1] <= MAX_IMAGE_SIDE):
            raise DiffcodecError(f"image {i}: size {img.shape[0]}x{img.shape[1]} out of range "
                                 f"(1..{MAX_IMAGE_SIDE} pixels a side)")


def image_sizes_context(images: Sequence[ImageEntry]) -> bytes:
    """What a format 4 progressive stream's closing check covers besides its symbols: every
    image's (height, width), u32 little-endian, in order (so an edited size is caught)."""
    return b"".join(struct.pack("<II", im.height, im.width) for im in images)


def check_steps(steps: int, num_timesteps: int) -> int:
    if not 1 <= steps <= num_timesteps:
        raise DiffcodecError(f"--steps must be between 1 and T = {num_timesteps}, got {steps}")
    return steps


def model_id(model: LoadedModel) -> bytes:
    """The model identity a format 4 file records (`container.model_identity`)."""
    dc = model.diffusion_config
    return model_identity(model.fingerprint, dc.schedule, dc.num_timesteps, dc.var_type, model.model_config.image_size)


def check_header(model: LoadedModel, header: Header, where: str) -> list[int]:
    """Refuse a file this model cannot decode; each image's tile count."""
    dc, mc = model.diffusion_config, model.model_config
    if header.version >= 4:  # one identity covers the weights, the chain and the tile size
        check_model(header, model.fingerprint, where, identity=model_id(model),
                    describe=f"weights {model.fingerprint}, {dc.schedule} T={dc.num_timesteps} {dc.var_type}, "
                             f"{mc.image_size}-pixel tiles")
        return [tile_count(im.height, im.width, mc.image_size) for im in header.images]
    check_model(header, model.fingerprint, where)
    if (header.schedule, header.num_timesteps, header.var_type) != (dc.schedule, dc.num_timesteps, dc.var_type):
        raise DiffcodecError(
            f"{where}: encoded for a {header.schedule} T={header.num_timesteps} {header.var_type} chain; this "
            f"checkpoint is {dc.schedule} T={dc.num_timesteps} {dc.var_type}")
    if header.tile_size != mc.image_size:
        raise DiffcodecError(f"{where}: encoded with {header.tile_size}-pixel tiles; this model takes {mc.image_size}")
    return [tile_count(im.height, im.width, header.tile_size) for im in header.images]


def read_header(data: bytes, where: str = "file") -> Header:
    """The header of a `.dfc` file (its CRC checked; the payload is not decoded). For a
    format 4 file, K is read from the mode block; the model's fields stay unknown (its
    identity is ``model_id``) until `resolve_header`."""
    h = unpack(data, where).header
    if h.version < 4:
        return h
    if h.mode == MODE_PROGRESSIVE:
        return replace(h, num_steps=ProgressiveParams.unpack(h.params, where).num_steps)
    return replace(h, num_steps=_bitsback_block(h, 32, where).num_steps)


def resolve_header(model: LoadedModel, header: Header) -> Header:
    """A format 4 header with what its model identity stands for filled in from ``model``
    (once `check_header` has matched it): fingerprint, chain, tile size."""
    if header.version < 4:
        return header
    dc = model.diffusion_config
    return replace(header, fingerprint=model.fingerprint, schedule=dc.schedule, num_timesteps=dc.num_timesteps,
                   var_type=dc.var_type, tile_size=model.model_config.image_size)


def stream_params(header: Header, model: LoadedModel, where: str = "file") -> ProgressiveParams | BitsBackParams:
    """A file's mode block as its decoder uses it: tile counts, tile size and K filled in
    from the image table and the model where the format leaves them out (format 4)."""
    counts = check_header(model, header, where)
    h = resolve_header(model, header)
    if h.mode == MODE_PROGRESSIVE:
        return _progressive_block(h, sum(counts), where)
    return _bitsback_block(h, h.tile_size, where)


def _progressive_block(h: Header, num_tiles: int, where: str) -> ProgressiveParams:
    """The progressive block; a format 4 file holds a version 3 block (its stream checks its
    pixels), older formats a version 1 or 2 block (their header holds the pixel checksum)."""
    params = ProgressiveParams.unpack(h.params, where, num_tiles=num_tiles, tile_size=h.tile_size or 32)
    if (params.version >= 3) != (h.version >= 4):
        raise DiffcodecError(f"{where}: corrupt header (a format {h.version} file with a version {params.version} "
                             "progressive block)")
    return params


def _bitsback_block(h: Header, tile_size: int, where: str) -> BitsBackParams:
    """The bits-back block; a format 4 file holds a compact one (with K), older formats version 1."""
    params = BitsBackParams.unpack(h.params, where, tile_size=tile_size)
    if (params.block_version >= 2) != (h.version >= 4):
        raise DiffcodecError(f"{where}: corrupt header (a format {h.version} file with a version "
                             f"{params.block_version} bits-back block)")
    return params


def _model(model: LoadedModel | None, checkpoint: str | None, device: torch.device) -> LoadedModel:
    return model if model is not None else load_checkpoint(checkpoint, device=device)


def _bar(progress: Progress | None, phase: str, total: int) -> Callable[..., None] | None:
    """A step counter for one phase: each call advances it by its argument (default 1)."""
    if progress is None:
        return None
    done = [0]

    def step(n: int = 1) -> None:
        done[0] += n
        progress(phase, done[0], total)

    return step


# ------------------------------------------------------------------------------ encode


def encode(
    images: Sequence[np.ndarray], names: Sequence[str] | None = None, *, model: LoadedModel | None = None,
    checkpoint: str | None = None, mode: str = "lossless", steps: int | None = None, spacing: str = "quadratic",
    device: torch.device | str = "cpu", arithmetic: str = "exact", float64: bool = False,
    batch_size: int | None = None, bootstrap: bool = True,
    compute_bound: bool = True, chunk_bits: float = ProgressiveParams().chunk_bits, workers: int | None = None,
    progressive_params: ProgressiveParams | None = None, grid: GridConfig = GridConfig(),
    progress: Progress | None = None, target: RateTarget | None = None, contract: int = CONTRACT_VERSION,
) -> LosslessEncoding | ProgressiveEncoding:
    """RGB uint8 images [H, W, 3] (any sizes, cut into model-size tiles, all in one stream)
    as one `.dfc` file. ``steps``: K coded steps (default 100 lossless, 50 progressive).
    ``arithmetic``: "exact" (the default: the exact contract, `diffcodec.exact`; the file
    decodes bit-exactly on any machine) or "float32" / "float64" (the float network: the
    file decodes only where the encoder's floating point is reproduced); ``float64=True``
    is "float64". ``progressive_params`` sets every progressive setting at once (its steps,
    spacing, candidates, seed, ...; the benchmarks' knobs; its arithmetic flags are set from
    ``arithmetic``), instead of steps / spacing / chunk_bits;
    ``workers``: threads of the progressive candidate search (default: all cores);
    ``batch_size``: the most tiles per network call (default `runtime.network_batch(device)`)
    and, lossless, per chunk (default DEFAULT_BATCH); the file does not depend on it but for a
    lossless file's chunks and a float32 file (whose network sees every tile of a stage or
    chunk in one call);
    ``grid``: how bits-back discretises its latents (stored in the file); ``target``: a
    progressive file's rate target (`codec.rate`: the file ends at the checked stage boundary
    it picks, and the encoder stops there); ``contract``: the exact arithmetic contract's
    version to write (`exact.CONTRACT_VERSIONS`; the benchmarks compare them)."""
    if mode not in MODES:
        raise DiffcodecError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if target is not None and mode != "progressive":
        raise DiffcodecError(f"{target}: a rate target applies to progressive files")
    if arithmetic not in ARITHMETICS:
        raise DiffcodecError(f"unknown arithmetic {arithmetic!r}; known: {', '.join(ARITHMETICS)}")
    arithmetic = "float64" if float64 else arithmetic
    exact, float64 = arithmetic == "exact", arithmetic == "float64"
    check_images(images)
    if batch_size is not None and batch_size < 1:
        raise DiffcodecError(f"batch size must be at least 1, got {batch_size}")
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    model = _model(model, checkpoint, device)
    per_call = batch_size or network_batch(device)  # tiles per network call
    chunk = batch_size or DEFAULT_BATCH  # a lossless stream's tiles per chunk
    T = model.diffusion_config.num_timesteps
    if progressive_params is not None:
        steps = progressive_params.num_steps
    steps = check_steps(min(DEFAULT_STEPS[mode], T) if steps is None else steps, T)
    names = list(names) if names is not None else [""] * len(images)
    if len(names) != len(images):
        raise DiffcodecError(f"{len(names)} names for {len(images)} images")
    tile = model.model_config.image_size
    tiles, groups, dims = image_tiles(images, tile)
    entries = tuple(ImageEntry(int(im.shape[0]), int(im.shape[1]), n) for im, n in zip(images, names))
    dc = model.diffusion_config
    ident = model_id(model)
    with deterministic_kernels():
        model_fn = network(model.model, float64=float64, exact=exact, contract=contract if exact else None,
                           device=device)
        contract_fields = (contract, probe_digest(model_fn, dc, tile, device)) if exact else (0, b"")
        if mode == "progressive":
            params = _progressive_params(progressive_params, steps, spacing, chunk_bits, float64, exact, len(tiles),
                                         tile)
            # a stream of version 1 or 2 has no closing check over its pixels: it goes in a
            # format 3 container, whose header holds the pixel checksum (and the block its length)
            legacy = params.version < 3
            header = Header(MODE_PROGRESSIVE, device_kind(device), model.fingerprint, dc.schedule, dc.num_timesteps,
                            steps, dc.var_type, tile, entries, pixel_checksum(list(images)) if legacy else b"",
                            params.pack(), *contract_fields, version=3 if legacy else VERSION, model_id=ident,
                            stages=params.num_stages)
            if target is not None and legacy:
                raise DiffcodecError(f"{target}: a rate target needs a progressive stream of version 3")
            control = None if target is None else RateControl(
                target, images, lambda n, stages: file_size(replace(header, stages=stages), n), params.num_stages)
            enc = progressive.encode(model_fn, dc, torch.from_numpy(tiles_as_levels(tiles)).to(device),
                                     params, progress=_stage_bar(progress, "encode", params.num_stages), workers=workers,
                                     context=image_sizes_context(entries), end=control,
                                     tiles_per_call=_tiles_per_call(params, per_call))
            header = replace(header, stages=enc.stages, params=enc.params.pack())
            seen = control.at(enc.stages) if control is not None else None
            return ProgressiveEncoding(pack(Container(header, enc.payload)), header, enc, int(dims.sum()), target,
                                       tuple(seen.psnr) if seen is not None else None)
        schedule = chain_schedule(dc.schedule, dc.num_timesteps, steps, spacing)
        m = bitsback.bootstrap_size(schedule, len(tiles), tile, grid) if bootstrap else 0
        job = _LosslessJob(progress, "encode", len(tiles), m, bitsback.BOOTSTRAP_PARAMS.num_steps, steps,
                           chunk if compute_bound else 0)
        code = bitsback.encode_stream(
            model.model, dc, schedule, tiles, spacing=spacing, config=grid, max_batch=chunk, device=device,
            float64=float64, exact=exact, contract=contract, bootstrap=bootstrap, compute_bound=compute_bound,
            network_batch=min(per_call, chunk), on_step=job.chain_step, on_bound_step=job.bound_step,
            on_bootstrap_stage=job.bootstrap_stage)
    header = Header(MODE_BITSBACK, device_kind(device), model.fingerprint, dc.schedule, dc.num_timesteps, steps,
                    dc.var_type, tile, entries, pixel_checksum(list(images), PIXEL_CHECK_BYTES), code.params.pack(),
                    *contract_fields, version=LOSSLESS_VERSION, model_id=ident)
    data = pack(Container(header, code.payload))
    bound = merge_rows(code.bound, groups, dims) if code.bound is not None else None
    return LosslessEncoding(data, header, code.params, len(images), len(tiles), int(dims.sum()), len(code.payload),
                            code.initial_bits, bound, code.seconds, code.bound_seconds, str(device), code.cpu_seconds,
                            code.bound_cpu_seconds, code.params.bootstrap_tiles, code.bootstrap_bits)


def _tiles_per_call(params: ProgressiveParams, batch_size: int) -> int | None:
    """The progressive codec's network batch (`progressive.tile_slices`): ``batch_size`` tiles
    at a time under the exact contract or float64, whose outputs do not depend on the batch; a
    float32 stream's whole region in one call (its decoder must see the encoder's batch, the
    same regions: such files decode only where the encoder's arithmetic is reproduced)."""
    return batch_size if params.exact or params.network_float64 else None


class _LosslessJob:
    """One progress phase for a whole lossless job, counted in tile network calls: the
    bootstrap's latent stages (``boot_steps`` of them, m tiles each; its pixel stage calls no
    network), the bits-back chain's steps (n tiles each) and, when ``bound_batch`` > 0, the
    bound's steps (batches of at most that many tiles), so that one bar shows the job's rate
    and time left."""

    def __init__(self, progress: Progress | None, phase: str, num_tiles: int, boot_tiles: int, boot_steps: int,
                 steps: int, bound_batch: int = 0) -> None:
        boot_stages = boot_steps if boot_tiles else 0
        self.boot_tiles, self.boot_steps = boot_tiles, boot_steps
        self._bound_sizes = iter([min(bound_batch, num_tiles - i) for i in range(0, num_tiles, bound_batch)
                                  for _ in range(steps)] if bound_batch else [])
        total = boot_tiles * boot_stages + (num_tiles - boot_tiles) * steps + (num_tiles * steps if bound_batch else 0)
        self._step = _bar(progress, phase, total)

    def chain_step(self, n: int) -> None:
        if self._step is not None:
            self._step(n)

    def bootstrap_stage(self, stage: int) -> None:
        if self._step is not None and stage < self.boot_steps:
            self._step(self.boot_tiles)

    def bound_step(self) -> None:
        if self._step is not None:
            self._step(next(self._bound_sizes, 0))


def _stage_bar(progress: Progress | None, phase: str, total: int) -> Callable[[int], None] | None:
    step = _bar(progress, phase, total)
    return None if step is None else (lambda _stage: step())


def _progressive_params(given: ProgressiveParams | None, steps: int, spacing: str, chunk_bits: float,
                        float64: bool, exact: bool, num_tiles: int, tile: int) -> ProgressiveParams:
    try:
        if given is not None:
            return replace(given, num_tiles=num_tiles, tile_size=tile, payload_bits=0, network_float64=float64,
                           exact=exact)
        return with_regions(ProgressiveParams(num_steps=steps, spacing=spacing, chunk_bits=chunk_bits,
                                              network_float64=float64, exact=exact, num_tiles=num_tiles, tile_size=tile))
    except ValueError as e:
        raise DiffcodecError(str(e)) from None


# ------------------------------------------------------------------------------ decode


def decode(
    data: bytes, *, model: LoadedModel | None = None, checkpoint: str | None = None, device: str = "auto",
    where: str = "file", num_bits: int | None = None, upto: int | None = None, reconstruction: str = "xstart",
    progress: Progress | None = None, batch_size: int | None = None,
) -> LosslessDecoding | ProgressiveDecoding:
    """Decode a `.dfc` file's bytes (``num_bits`` / ``upto``: a prefix, progressive files only;
    ``batch_size``: a progressive exact or float64 stream's tiles per network call (default
    `runtime.network_batch(device)`), which bound the network's memory and leave the result
    unchanged; a lossless file's chunks are its own, each through the network at most
    `runtime.network_batch(device)` tiles at a time where its arithmetic allows).

    A lossless file's images come back only when their checksum matches (else
    DiffcodecError, saying why as far as this side can tell); a progressive file's images
    are the coded pixels when verified, else the reconstruction from the last latent
    received, never wrong pixels labelled as the coded ones.
    """
    if batch_size is not None and batch_size < 1:
        raise DiffcodecError(f"batch size must be at least 1, got {batch_size}")
    container = unpack(data, where)
    h = container.header
    if h.mode == MODE_BITSBACK and (num_bits is not None or upto is not None):
        raise DiffcodecError(f"{where}: --bits and --upto apply to progressive files; this one is bits-back")
    if h.mode not in (MODE_BITSBACK, MODE_PROGRESSIVE):
        raise DiffcodecError(f"{where}: a {MODE_NAMES.get(h.mode, h.mode)} file; this decoder handles "
                             f"{' and '.join(MODE_NAMES.values())} files")
    if h.contract and h.contract not in CONTRACT_VERSIONS:
        raise DiffcodecError(f"{where}: written under exact arithmetic contract version {h.contract} by a newer "
                             f"diffcodec; this one implements versions {', '.join(map(str, CONTRACT_VERSIONS))}")
    target = decode_device(device, h.device) if isinstance(device, str) else device
    model = _model(model, checkpoint, target)
    counts = check_header(model, h, where)
    container = Container(resolve_header(model, h), container.payload)
    if h.mode == MODE_PROGRESSIVE:
        return _decode_progressive(model, container, len(data), counts, target, where, num_bits, upto,
                                   reconstruction, progress, batch_size or network_batch(target))
    return _decode_lossless(model, container, counts, target, where, progress)


def _check_contract(model: LoadedModel, h: Header, exact: bool, device: torch.device, where: str) -> ModelFn | None:
    """For an exact-contract file: its exact network, once the probe matched (else refused)."""
    if bool(h.contract) != exact:
        raise DiffcodecError(f"{where}: corrupt header (the contract byte and the stream's block disagree)")
    if not exact:
        return None
    with deterministic_kernels():
        model_fn = network(model.model, exact=True, contract=h.contract, device=device)
        check_probe(h.probe, model_fn, model.diffusion_config, h.tile_size, device, where)
    return model_fn


def _decode_lossless(model: LoadedModel, container: Container, counts: list[int], device: torch.device, where: str,
                     progress: Progress | None) -> LosslessDecoding:
    h = container.header
    params = _bitsback_block(h, h.tile_size, where)
    dc = model.diffusion_config
    steps = params.num_steps if h.version >= 4 else h.num_steps
    if not 1 <= steps <= dc.num_timesteps:
        raise DiffcodecError(f"{where}: corrupt header (K = {steps} steps of a T = {dc.num_timesteps} chain)")
    bitsback.check_params(params, sum(counts), h.tile_size, steps, len(container.payload), where)
    _check_contract(model, h, params.exact, device, where)
    if device.type == "cpu":
        use_threads(params.threads)  # float32 CPU results depend on the thread count
    schedule = chain_schedule(dc.schedule, dc.num_timesteps, steps, params.spacing)
    with deterministic_kernels():
        start, cpu_start = time.perf_counter(), time.process_time()
        boot = bitsback.bootstrap_params(params, h.tile_size, where)  # the file's bootstrap (its steps)
        job = _LosslessJob(progress, "decode", params.num_tiles, params.bootstrap_tiles,
                           boot.num_steps if boot is not None else 0, steps)
        tiles, ok = bitsback.decode_stream(
            model.model, dc, schedule, params, container.payload, tile_size=h.tile_size, device=device,
            contract=h.contract or None, on_step=job.chain_step, on_bootstrap_stage=job.bootstrap_stage,
            network_batch=network_batch(device))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    images = images_from_tiles(tiles, [(im.height, im.width) for im in h.images]) if ok else []
    if not ok or pixel_checksum(images, len(h.pixel_sha)) != h.pixel_sha:
        raise DiffcodecError(bitsback.divergence(params, h.device, device, where))
    return LosslessDecoding(images, [im.name for im in h.images], seconds, str(device), cpu_seconds)


def _decode_progressive(model: LoadedModel, container: Container, data_bytes: int, counts: list[int], device: torch.device,
                        where: str, num_bits: int | None, upto: int | None, reconstruction: str,
                        progress: Progress | None, batch_size: int) -> ProgressiveDecoding:
    h = container.header
    legacy = h.version < 4  # the header's pixel checksum, the block's payload length
    framed = h.version >= 5  # the header records the payload's length and the stages it delivers
    params = _progressive_block(h, sum(counts), where)
    if legacy and (h.num_steps != params.num_steps or h.tile_size != params.tile_size):
        raise DiffcodecError(f"{where}: corrupt header (steps or tile size disagree with the stream's block)")
    if params.num_steps > model.diffusion_config.num_timesteps:
        raise DiffcodecError(f"{where}: corrupt header (K = {params.num_steps} steps of a "
                             f"T = {model.diffusion_config.num_timesteps} chain)")
    if framed and h.stages > params.num_stages:
        raise DiffcodecError(f"{where}: corrupt header ({h.stages} stages of a {params.num_stages}-stage stream)")
    model_fn = _check_contract(model, h, params.exact, device, where)
    if sum(counts) != params.num_tiles:
        raise DiffcodecError(f"{where}: corrupt header ({params.num_tiles} tiles for images needing {sum(counts)})")
    header_bits = 8 * (data_bytes - len(container.payload))
    file_bits = 8 * data_bytes if num_bits is None else min(int(num_bits), 8 * data_bytes)
    if file_bits < header_bits:
        raise DiffcodecError(f"{where}: {file_bits} bits do not cover the {header_bits}-bit header")
    # the complete payload's length, where the file records it (format 5; format 3 in its block)
    declared = h.stream_bytes if framed else (params.payload_bits // 8 if legacy else None)
    if legacy and len(container.payload) > declared:
        raise DiffcodecError(f"{where}: corrupt file ({len(container.payload) - declared} bytes after the end of "
                             f"its {declared}-byte stream)")
    file_stages = h.stages if framed else params.num_stages
    limit = file_stages if upto is None else min(int(upto), file_stages)
    sizes = [(im.height, im.width) for im in h.images]
    given_all = file_bits == 8 * data_bytes  # the decoder was given every byte of the file
    try:
        with deterministic_kernels():
            model_fn = model_fn or network(model.model, float64=params.network_float64)
            dec = progressive.decode(model_fn,
                                     model.diffusion_config, container.payload, params,
                                     num_bits=file_bits - header_bits, upto=limit, reconstruction=reconstruction,
                                     device=device, context=b"" if legacy else image_sizes_context(h.images),
                                     progress=_stage_bar(progress, "decode",
                                                        min(limit, params.num_stages) * params.num_regions),
                                     tiles_per_call=_tiles_per_call(params, batch_size), as_levels=True)
    except DamagedFileError as e:
        raise DamagedFileError(f"{where}: {e}; nothing written") from None
    except DiffcodecError as e:
        if framed and given_all and len(container.payload) == declared:  # its whole payload, and no stage in it
            raise DamagedFileError(f"{where}: the file is damaged (it holds its whole {declared:,}-byte payload and "
                                   "no stage decodes); no intact stage, nothing written") from None
        raise DiffcodecError(f"{where}: {e}") from None
    if declared is not None:  # the file says how long it is: shorter is cut short
        truncated = len(container.payload) < declared
    else:  # format 4: the whole file was given and the stream ran out before its end (not a damage
        # check, not --upto): cut short, or damaged near its end (this format cannot tell)
        truncated = given_all and not dec.complete and not dec.diverged and dec.stop not in ("check", "limit")
        surplus = len(container.payload) - -(-dec.bits_used // 8)
        if dec.complete and given_all and surplus > 0:
            raise DiffcodecError(f"{where}: {surplus} unexpected bytes after the end of the stream")
    whole = not truncated and given_all  # the decoder was given the complete stream
    verified, diverged, damage = False, dec.diverged, ""
    if dec.complete and not legacy and dec.pixels_checked is True:
        verified, dec = True, dataclasses.replace(dec, fallback_levels=None)  # its memory back before the images
    images = images_from_tiles(levels_as_tiles(dec.levels), sizes)
    if dec.complete:
        verified = pixel_checksum(images) == h.pixel_sha if legacy else verified
        if not verified:  # never hand out wrong pixels: fall back to x^_0 from y_0
            diverged, images = True, images_from_tiles(levels_as_tiles(dec.fallback_levels), sizes)
    pixels_missing = framed and whole and limit > params.num_steps and not dec.complete and dec.stop == "complete"
    if dec.stop == "check":
        damage = f"the integrity check after stage {dec.stop_stage} failed"
    elif (legacy or framed) and dec.stop == "end" and whole and dec.stages < limit:
        damage = (f"stage {dec.stop_stage} does not decode although the file holds its whole "
                  f"{len(container.payload):,}-byte payload")
    elif pixels_missing and params.exact:  # the probe matched: this decoder computes what the encoder computed
        damage = (f"the pixel stage does not decode although the file holds its whole "
                  f"{len(container.payload):,}-byte payload")
    elif pixels_missing:  # a float file: another arithmetic than the encoder's, or damage
        diverged = True
    elif diverged and params.exact:
        diverged = False
        damage = ("the lossless stage does not reproduce the pixel checksum" if legacy
                  else "the lossless stage fails the stream's closing check")
    if progress is not None:  # in the bar's units: a stage of each region
        progress("decode", dec.stages * params.num_regions, params.num_stages * params.num_regions)
    stages = dec.stages if verified or not dec.complete else dec.stages - 1
    total = 8 * declared if declared is not None else (0 if truncated else 8 * len(container.payload))
    return ProgressiveDecoding(
        images, [im.name for im in h.images], stages, params.num_stages,
        dec.timestep if verified or not dec.complete else 0, verified, diverged,
        truncated, file_bits, header_bits, header_bits + dec.bits_used,
        total, "exact" if verified else ("xstart" if dec.complete else reconstruction), str(device),
        dec.seconds, damage, file_stages, declared is not None)
