"""What a `.dfc` file holds, read without decoding it, and cutting a progressive file shorter.

    describe(data, model, where) -> FileInfo   header fields; a progressive file's cut points
    cut(data, model, stages= | size= | bpp=)   -> Cut: a valid shorter file

A progressive file can end at each checked stage boundary (`progressive.layout`): its cut
points. They are found from the stream's symbols alone, so no network call is made; the
model is needed only for what a format 4 or 5 file leaves to it (the tile size, the chain's
timesteps). A cut keeps the header, records the new length and stage count (format 5) and
keeps the shortest payload prefix that delivers those stages: it decodes to exactly the image
`decode --bits` of the original gives at that prefix (`Cut.bits_equivalent`).

Damage seen from the symbols (a group check that fails; a file of its full length whose
stages stop early) is reported; the pixel stage needs the network and is verified by `decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from diffcodec.checkpoint import LoadedModel
from diffcodec.codec import api
from diffcodec.codec.container import MODE_NAMES, MODE_PROGRESSIVE, VERSION, Container, Header, file_size, pack, unpack
from diffcodec.codec.progressive.codec import coded_schedule
from diffcodec.codec.progressive.layout import stream_layout
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.codec.rate import RateTarget
from diffcodec.errors import DiffcodecError


@dataclass(frozen=True)
class CutPoint:
    """A checked stage boundary of a progressive file: where it can be cut."""

    stages: int  # stages a file cut here delivers (decode's "stage N of K + 1"; K + 1: the whole, lossless stream)
    timestep: int  # original timestep of its last latent (-1: the pixels)
    payload_bytes: int  # the shortest payload prefix that delivers them, in whole bytes
    offset: int  # this file's bytes up to there (its header + that prefix): `head -c OFFSET` keeps those stages
    cut_bytes: int  # the file `diffcodec cut --stage N` writes (a format 5 header + the prefix)
    bits_per_pixel: float  # of that file, over all the images' pixels


@dataclass(frozen=True)
class FileInfo:
    """A file's header and, for a progressive file its model can read, its cut points."""

    file_bytes: int
    version: int  # container format
    mode: str  # MODE_NAMES
    contract: int  # exact arithmetic contract version (0: a same-machine float file)
    probe: str  # hex (exact files)
    model_id: str  # hex (format 4, 5) or the fingerprint (formats 1-3)
    model_matches: bool  # the model given is the file's (else only the header is described)
    model_note: str
    images: list[tuple[str, int, int]]  # (name, height, width)
    pixels: int
    num_steps: int  # K (0 when the model does not match a format 4, 5 file)
    spacing: str
    network_float64: bool
    header_bytes: int  # before the payload
    payload_bytes: int  # held
    # progressive files
    stream_version: int = 0
    num_stages: int = 0  # K + 1
    regions: int = 0  # regions of the stream (`ProgressiveParams.regions`: 1 = every tile in one)
    region_tiles: int = 0  # tiles per region (0: one region)
    file_stages: int = 0  # the stages the file delivers when whole (format 5 records it; else K + 1)
    declared_bytes: int | None = None  # the whole file's length as its header says (format 5, 3), else None
    cut_short: bool | None = None  # None: format 4 cannot tell
    whole: bool = False  # it holds all file_stages (format 4: as far as its symbols tell; the pixels: by decode)
    stages_held: int = 0  # latent stages its payload delivers, checked (symbols only)
    cut_points: list[CutPoint] = field(default_factory=list)
    damage: str = ""  # damage the symbols show ("" when none)
    note: str = ""  # what the symbols cannot tell
    # lossless files
    chunks: int = 0
    bootstrap_tiles: int = 0


def _header_only(data: bytes, h: Header, note: str, matches: bool, steps: int = 0,
                 spacing: str = "", float64: bool = False, payload: int = 0) -> FileInfo:
    return FileInfo(
        len(data), h.version, MODE_NAMES[h.mode], h.contract, h.probe.hex(),
        h.model_id.hex() if h.version >= 4 else h.fingerprint, matches, note,
        [(im.name, im.height, im.width) for im in h.images], sum(im.height * im.width for im in h.images),
        steps, spacing, float64, len(data) - payload, payload)


def describe(data: bytes, model: LoadedModel, where: str = "file") -> FileInfo:
    """A file's header and, for a progressive file, every cut point (no network call).
    A file of another model is described from its header alone (``model_matches`` False)."""
    container = unpack(data, where)
    h = container.header
    try:
        api.check_header(model, h, where)
    except DiffcodecError as e:  # another model's file: what its header says
        return _header_only(data, h, f"{e} (its steps and cut points need that checkpoint)", False,
                            payload=len(container.payload))
    params = api.stream_params(h, model, where)
    note = f"model {model.path} ({model.fingerprint})"
    if h.mode != MODE_PROGRESSIVE:
        base = _header_only(data, h, note, True, params.num_steps or h.num_steps, params.spacing,
                            params.network_float64, payload=len(container.payload))
        return replace(base, chunks=len(params.chunks), bootstrap_tiles=params.bootstrap_tiles)
    return _describe_progressive(data, container, api.resolve_header(model, h), params, model, note)


def _describe_progressive(data: bytes, container: Container, h: Header, params: ProgressiveParams,
                          model: LoadedModel, note: str) -> FileInfo:
    K, payload = params.num_steps, container.payload
    header_bytes = len(data) - len(payload)
    framed, legacy = h.version >= 5, h.version < 4
    file_stages = h.stages if framed else params.num_stages
    declared = (header_bytes + h.stream_bytes if framed
                else header_bytes + params.payload_bits // 8 if legacy else None)
    cut_short = None if declared is None else len(data) < declared
    dims = params.num_tiles * 3 * params.tile_size**2
    layout = stream_layout(payload, params, dims, file_stages)
    timesteps = coded_schedule(model.diffusion_config, K, params.spacing).timesteps
    pixels = sum(im.height * im.width for im in h.images)
    as_cut = replace(h, version=VERSION)  # a cut file's header: format 5

    def point(stages: int, nbytes: int) -> CutPoint:
        size = file_size(replace(as_cut, stages=stages), nbytes) if h.version >= 4 else header_bytes + nbytes
        return CutPoint(stages, int(timesteps[K - stages]) if stages <= K else -1, nbytes, header_bytes + nbytes, size,
                        8.0 * size / pixels)

    points = [point(n, -(-bits // 8)) for n, bits in layout.boundaries]
    damage, what = "", ""
    whole = cut_short is False or (declared is None and layout.stop != "end")
    if layout.stop == "check":
        damage = f"the integrity check after stage {layout.stop_stage} fails"
    elif layout.stop == "end" and layout.stages < min(file_stages, K):
        if declared is None:
            what = (f"its stream stops at stage {layout.stages}: cut short, or damaged near its end (a format 4 file "
                    "does not record its length)")
        elif not cut_short:
            damage = f"stage {layout.stop_stage} does not decode although the file holds its whole payload"
    if whole and not damage and file_stages == params.num_stages and layout.stop == "complete":
        points.append(replace(point(params.num_stages, len(payload)), cut_bytes=len(data),
                              bits_per_pixel=8.0 * len(data) / pixels))  # the lossless end: the whole file
        what = what or "the pixel stage (lossless end) is verified by decode"
    base = _header_only(data, h, note, True, K, params.spacing, params.network_float64, payload=len(payload))
    return replace(base, stream_version=params.version, num_stages=params.num_stages, file_stages=file_stages,
                   regions=params.num_regions, region_tiles=params.region_tiles if params.num_regions > 1 else 0,
                   declared_bytes=declared, cut_short=cut_short, whole=whole, stages_held=layout.stages,
                   cut_points=points,
                   damage=damage, note=what)


@dataclass(frozen=True)
class Cut:
    data: bytes  # the new file
    point: CutPoint
    bits_equivalent: int  # `decode --bits` of the original at this many bits decodes to the same image
    original_bytes: int


def cut(data: bytes, model: LoadedModel, *, stages: int | None = None, target: RateTarget | None = None,
        where: str = "file") -> Cut:
    """A progressive file cut at a checked stage boundary: ``stages`` (a cut point's stage
    count), or the last cut point whose file fits ``target`` (a size or bpp `RateTarget`).
    Refused (one-line DiffcodecError): another mode, a format before 4, a damaged file, a
    point that is not one, and a cut that would not make the file shorter."""
    if (stages is None) == (target is None) or target is not None and target.kind == "psnr":
        raise DiffcodecError("cut takes one of --stage N, --size BYTES or --bpp X")
    h = unpack(data, where).header
    if h.mode != MODE_PROGRESSIVE:
        raise DiffcodecError(f"{where}: a {MODE_NAMES.get(h.mode, h.mode)} file: only progressive files can be cut")
    if h.version < 4:
        raise DiffcodecError(f"{where}: a format {h.version} file: cut makes format 5 files of formats 4 and 5 "
                             "(decode --bits reads a prefix of this one)")
    info = describe(data, model, where)
    if not info.model_matches:
        raise DiffcodecError(f"{where}: {info.model_note}")
    if info.damage:
        raise DiffcodecError(f"{where}: the file is damaged ({info.damage}); nothing written (decode writes the "
                             "image of its intact stages)")
    if not info.cut_points:
        raise DiffcodecError(f"{where}: holds no complete checked stage: nothing to cut")
    own_end = info.file_stages if info.whole else None  # a whole file: cutting at its end cuts nothing
    if stages is not None:
        chosen = _at_stage(info, stages, own_end, where)
    else:
        chosen = _within(info, target, own_end, where)
    payload = unpack(data, where).payload[: chosen.payload_bytes]
    new = pack(Container(replace(h, version=VERSION, stages=chosen.stages), payload))
    assert len(new) == chosen.cut_bytes
    return Cut(new, chosen, 8 * chosen.offset, len(data))


def _at_stage(info: FileInfo, stages: int, own_end: int | None, where: str) -> CutPoint:
    last = info.cut_points[-1]
    if own_end is not None and stages >= own_end or stages > last.stages:
        end = own_end if own_end is not None else last.stages
        raise DiffcodecError(f"{where}: --stage {stages} is past the end: the file ends at stage {end} of "
                             f"{info.num_stages}; nothing written")
    for p in info.cut_points:
        if p.stages == stages:
            return p
    below = [p.stages for p in info.cut_points if p.stages < stages]
    above = [p.stages for p in info.cut_points if p.stages > stages and (own_end is None or p.stages < own_end)]
    near = " or ".join(f"--stage {n}" for n in (below[-1:] + above[:1]))
    raise DiffcodecError(f"{where}: stage {stages} is inside a checked group (its stages arrive together): "
                         f"cut at {near or 'another stage'} (diffcodec info lists the cut points); nothing written")


def _within(info: FileInfo, target: RateTarget, own_end: int | None, where: str) -> CutPoint:
    budget = int(target.value) if target.kind == "size" else int(math.floor(target.value * info.pixels / 8.0))
    if own_end is not None and info.file_bytes <= budget:
        raise DiffcodecError(f"{where}: {target} is past the end: the file is {info.file_bytes:,} bytes = "
                             f"{8.0 * info.file_bytes / info.pixels:.4f} bpp already; nothing written")
    fits = [p for p in info.cut_points if p.cut_bytes <= budget and (own_end is None or p.stages < own_end)]
    if not fits:
        first = info.cut_points[0]
        raise DiffcodecError(f"{where}: {target}: the smallest cut of this file ends at stage {first.stages} of "
                             f"{info.num_stages} and takes {first.cut_bytes:,} bytes = {first.bits_per_pixel:.4f} "
                             f"bpp, more than {budget:,} bytes; nothing written")
    return fits[-1]
