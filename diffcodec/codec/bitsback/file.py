"""A lossless `.dfc` file's stream: the bootstrap tiles, then bits-back over the chain.

`encode_stream` codes a set of tiles into the payload and the mode-0 parameter block:
the stream's first `stream.bootstrap_count` tiles go through the progressive codec (whose
payload seeds the stack, `stream`), the rest through bits-back ANS (`chain`), and, when
asked, the variational bound of the same tiles on the same K-step chain is computed beside
it (`likelihood.evaluate_bound`), so estimated and real bits sit side by side.
`decode_stream` inverts it and says whether the stack ended where the encoder began. The
container, the pixel checksum and the model checks are `codec.api`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from diffcodec.codec.bitsback.chain import ChainCoder, GridConfig, chain_grid
from diffcodec.codec.bitsback.params import BitsBackParams
from diffcodec.codec.bitsback.stream import bootstrap_count, decode_tiles, encode_tiles
from diffcodec.codec.progressive import codec as progressive
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError
from diffcodec.images import from_model_output, to_model_input
from diffcodec.likelihood import BoundResult, evaluate_bound
from diffcodec.runtime import device_kind, in_batches, network, recorded_threads
from diffcodec.schedule import Schedule
from diffcodec.timesteps import kept_timesteps

# The bootstrap's progressive settings: the progressive mode's (stream version 5: pooled
# candidates, greedy choice; 14-bit chunks, 2^16 candidates) without its checks (the file's
# CRC covers it). Files before this diffcodec wrote stream version 3 with 10-bit chunks and
# 2^12 candidates (its per-chunk search cost 5x more at 2^16); their block says so and they
# decode as before (tests/test_golden.py).
BOOTSTRAP_PARAMS = ProgressiveParams(num_steps=50, check_bits=0)

OnStep = Callable[[int], None]


@dataclass(frozen=True)
class StreamCode:
    """What `encode_stream` made: the payload, its parameter block and measurements."""

    payload: bytes
    params: BitsBackParams
    initial_bits: int  # seeded initial bits the stream consumed (part of the payload)
    bootstrap_bits: int  # the bootstrap tiles' progressive payload (part of the payload)
    bound: BoundResult | None  # per tile, the same K-step chain
    seconds: float  # coding only (wall)
    cpu_seconds: float  # coding only, CPU time of this process (all threads)
    bound_seconds: float
    bound_cpu_seconds: float


def chain_coder(model: torch.nn.Module, schedule: Schedule, var_type: str, *, config: GridConfig = GridConfig(),
                clip_denoised: bool = True, device: torch.device | str = "cpu", float64: bool = False,
                exact: bool = False, contract: int | None = None, network_batch: int | None = None) -> ChainCoder:
    """The bits-back chain coder of a model on a (respaced) schedule (``exact``: under the
    exact arithmetic contract of version ``contract``, default the current one;
    ``network_batch``: the most tiles per network call, used only under the exact contract or
    float64, whose outputs do not depend on the batch: a float32 chunk goes in one call)."""
    net = network(model, float64=float64 and not exact, exact=exact, contract=contract if exact else None,
                  device=device)
    if network_batch is not None and (exact or float64):
        net = in_batches(net, network_batch)
    return ChainCoder(net, schedule, var_type,
                      config, clip_denoised, device, torch.float64 if float64 or exact else torch.float32, exact)


def bootstrap_size(schedule: Schedule, num_tiles: int, tile: int, config: GridConfig = GridConfig()) -> int:
    """How many of the stream's first tiles the bootstrap takes (`stream.bootstrap_count`)."""
    return bootstrap_count(schedule, chain_grid(schedule, config), num_tiles, 3 * tile * tile)


def encode_stream(
    model: torch.nn.Module, diffusion, schedule: Schedule, tiles: np.ndarray, *, spacing: str,
    config: GridConfig = GridConfig(), max_batch: int = 64, device: torch.device | str = "cpu", float64: bool = False,
    exact: bool = False, contract: int | None = None, bootstrap: bool = True, compute_bound: bool = True,
    bound_seed: int = 0, network_batch: int | None = None,
    on_step: OnStep | None = None, on_bound_step: Callable[[], None] | None = None,
    on_bootstrap_stage: OnStep | None = None,
) -> StreamCode:
    """Code uint8 tiles [M, s, s, 3] as one lossless stream (module docstring): chunks of
    ``max_batch`` tiles, each through the network ``network_batch`` at a time (`chain_coder`).

    ``on_step(n)`` follows the bits-back chunks (n tiles per code step), ``on_bound_step``
    the bound's batches, ``on_bootstrap_stage(stage)`` the bootstrap's progressive encoder.
    """
    tile = tiles.shape[1]
    coder = chain_coder(model, schedule, diffusion.var_type, config=config, device=device, float64=float64,
                        exact=exact, contract=contract, network_batch=network_batch)
    m = bootstrap_size(schedule, len(tiles), tile, config) if bootstrap else 0
    start, cpu_start = time.perf_counter(), time.process_time()
    boot = _encode_bootstrap(coder, diffusion, tiles[:m], on_bootstrap_stage) if m else None
    code = encode_tiles(coder, tiles[m:], max_batch=max_batch, on_step=on_step,
                        bootstrap=boot.payload if boot else b"")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    bound, bound_seconds, bound_cpu = None, 0.0, 0.0
    if compute_bound:
        start, cpu_start = time.perf_counter(), time.process_time()
        batches = [to_model_input(tiles[i : i + max_batch]) for i in range(0, len(tiles), max_batch)]
        bound = evaluate_bound(network(model), schedule, batches, var_type=diffusion.var_type, seed=bound_seed,
                               device=device, on_step=on_bound_step)
        bound_seconds, bound_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    params = BitsBackParams.of(
        config, clip_denoised=True, network_float64=float64, exact=exact, threads=recorded_threads(device, float64, exact),
        spacing=stored_spacing(spacing, schedule), code=code, num_tiles=len(tiles), num_symbols=len(tiles) * 3 * tile * tile * (schedule.num_steps + 1),
        bootstrap_tiles=m, bootstrap_block=boot.params.pack() if boot else b"", num_steps=schedule.num_steps,
        bootstrap_bytes=len(boot.payload) if boot else 0)
    return StreamCode(code.payload.astype("<u4").tobytes(), params, code.initial_bits,
                      8 * len(boot.payload) if boot else 0, bound, seconds, cpu_seconds, bound_seconds, bound_cpu)


def stored_spacing(spacing: str, schedule: Schedule) -> str:
    """The spacing name a file records: "uniform" is stored as diffcodec 0.1's code 0
    ("uniform-linspace") wherever the two rules keep the same steps, so such files stay
    byte for byte what 0.1 wrote and 0.1 decoders read them; elsewhere as code 2."""
    T, K = schedule.num_original_timesteps, schedule.num_steps
    if spacing == "uniform" and np.array_equal(kept_timesteps(T, K, "uniform"), kept_timesteps(T, K, "uniform-linspace")):
        return "uniform-linspace"
    return spacing


def _encode_bootstrap(coder: ChainCoder, diffusion, tiles: np.ndarray, progress: OnStep | None):
    """The progressive stream (`progressive.Encoded`) of the bootstrap tiles uint8 [m, s, s, 3]."""
    params = replace(BOOTSTRAP_PARAMS, num_tiles=len(tiles), tile_size=tiles.shape[1],
                     network_float64=coder.network_dtype == torch.float64 and not coder.exact, exact=coder.exact)
    x0 = to_model_input(tiles).to(coder.device)
    return progressive.encode(coder.model_fn, diffusion, x0, params, progress=progress)


def decode_stream(
    model: torch.nn.Module, diffusion, schedule: Schedule, params: BitsBackParams, payload: bytes, *, tile_size: int,
    device: torch.device | str = "cpu", on_step: OnStep | None = None, contract: int | None = None,
    on_bootstrap_stage: OnStep | None = None, network_batch: int | None = None,
) -> tuple[np.ndarray, bool]:
    """The stream's tiles uint8 [M, s, s, 3] and whether it decoded whole (False: the stack
    did not end as the encoder began, or the bootstrap's lossless stage failed; the tiles
    are then incomplete and must not be used). ``contract``: the file's exact arithmetic
    contract version (the container's). ``on_step(n)`` follows the chain's steps (n tiles),
    ``on_bootstrap_stage(stage)`` the bootstrap's progressive decoder; ``network_batch``: the
    most tiles per network call (`chain_coder`; the tiles do not depend on it)."""
    coder = chain_coder(model, schedule, diffusion.var_type, config=params.grid_config,
                        clip_denoised=params.clip_denoised, device=device, float64=params.network_float64,
                        exact=params.exact, contract=contract, network_batch=network_batch)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    boot_params = bootstrap_params(params, tile_size)
    tiles, ok, boot = decode_tiles(
        coder, words, chunks=params.chunks, tile_size=tile_size, init_words=params.init_words,
        kept_words=params.kept_words, init_seed=params.init_seed, on_step=on_step,
        bootstrap_bytes=bootstrap_bytes(params, boot_params))
    if boot_params is not None and ok:
        dec = progressive.decode(coder.model_fn, diffusion, boot, boot_params, device=coder.device,
                                 progress=on_bootstrap_stage)
        ok = dec.complete
        tiles = np.concatenate([from_model_output(dec.x0), tiles]) if ok else tiles
    return tiles, ok


def bootstrap_params(params: BitsBackParams, tile_size: int, where: str = "file") -> ProgressiveParams | None:
    """The bootstrap stream's progressive parameters (None without bootstrap tiles)."""
    if not params.bootstrap_tiles:
        return None
    return ProgressiveParams.unpack(params.bootstrap_block, where, num_tiles=params.bootstrap_tiles,
                                    tile_size=tile_size)


def bootstrap_bytes(params: BitsBackParams, boot: ProgressiveParams | None) -> int:
    """The bootstrap's payload in bytes: a compact block says, a version 1 block's progressive block does."""
    if boot is None:
        return 0
    return params.bootstrap_bytes if params.block_version >= 2 else boot.payload_bits // 8


def coded_dims(num_tiles: int, tile: int, num_steps: int) -> int:
    """Symbols of a stream: tiles x 3 x tile^2 x (K + 1) (the block's num_symbols)."""
    return num_tiles * 3 * tile * tile * (num_steps + 1)


def check_params(params: BitsBackParams, num_tiles: int, tile: int, num_steps: int, payload_bytes: int,
                 where: str) -> None:
    """Refuse a block that disagrees with the header (DiffcodecError, one line)."""
    if params.num_tiles != num_tiles or params.num_symbols != coded_dims(num_tiles, tile, num_steps):
        raise DiffcodecError(f"{where}: corrupt header (tile or symbol counts do not match the image sizes)")
    if payload_bytes % 4 or payload_bytes < 8:
        raise DiffcodecError(f"{where}: corrupt payload ({payload_bytes} bytes)")
    if params.bootstrap_tiles:
        boot = bootstrap_params(params, tile, where)
        if (boot.num_tiles, boot.tile_size, boot.network_float64, boot.exact) != (
                params.bootstrap_tiles, tile, params.network_float64, params.exact) or boot.payload_bits % 8 or (
                params.block_version >= 2 and not 0 < params.bootstrap_bytes <= payload_bytes):
            raise DiffcodecError(f"{where}: corrupt header (bootstrap parameters disagree with the stream)")


def divergence(params: BitsBackParams, encoded_on: str, device: torch.device | str, where: str) -> str:
    """Why a whole file failed its checksum, as far as this side can tell (one line)."""
    if params.exact:  # the probe matched: this decoder computes what the encoder computed
        return (f"{where}: pixel checksum mismatch after decoding: the payload is corrupt (this decoder's exact "
                "arithmetic reproduced the encoder's probe); nothing written")
    here = device_kind(device)
    if ":" not in encoded_on:  # format 4 records the kind alone (cpu or cuda)
        here = here.split(":")[0]
    threads_here = recorded_threads(device, params.network_float64, params.exact)
    if here == encoded_on and params.threads and threads_here != params.threads:
        return (f"{where}: decoding diverged: the file was encoded with {params.threads} torch CPU thread(s) in "
                f"float32 and this decoder ran {threads_here}; decode with {params.threads} "
                "(files encoded with --float64 decode with any thread count)")
    if here != encoded_on:
        return (f"{where}: decoding diverged: the file was encoded on {encoded_on} and decoding on {here} computed "
                f"different coding parameters (pixel checksum mismatch); decode on {encoded_on.split(':')[0]}")
    return (f"{where}: pixel checksum mismatch after decoding (corrupt payload, or "
            "non-deterministic kernels on this machine); nothing written")
