"""Where and how the network runs: devices, threads, the one model wrapper, deterministic kernels.

Every job (the bound, training, both codecs, the benchmarks) calls the network through
`network`, which returns a ``ModelFn``: ``fn(x_t [B,C,H,W], original timesteps int64 [B])
-> output [B, C or 2C, H, W]``, without autograd. Devices are named as torch names them
(``cpu``, ``cuda``, ``cuda:N``) or ``auto``; a name this machine cannot use is a one-line
`DiffcodecError`, never a torch traceback.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import threadpoolctl
import torch

from diffcodec.errors import DiffcodecError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""network(x_t [B,C,H,W], original timesteps int64 [B]) -> output [B, C or 2C, H, W]"""

MAX_THREADS = 1024  # the most torch CPU threads a coded file may ask a decoder to use


# ------------------------------------------------------------------------------ machine


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_string(device: torch.device | str = "cpu") -> str:
    """'cpu: AMD EPYC (2 cores, 2 torch threads)' or 'cuda:0: NVIDIA H100 80GB HBM3'."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}: {torch.cuda.get_device_name(index)}"
    threads = torch.get_num_threads()
    return f"cpu: {cpu_name()} ({usable_cores()} cores, {threads} torch thread{'s' if threads != 1 else ''})"


def device_kind(device: torch.device | str) -> str:
    """What a coded file records about its encoder's device: 'cpu' or 'cuda:<GPU name>'."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


# ------------------------------------------------------------------------------ devices


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else validated (one-line errors)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DiffcodecError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise DiffcodecError(f"device type {device.type!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffcodecError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DiffcodecError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def decode_device(requested: str, encoded_on: str) -> torch.device:
    """A decoder's device: 'auto' -> the encoder's device kind when this machine has it
    (cuda for 'cuda:...' files, cpu for 'cpu' files), else what is available."""
    if requested != "auto":
        return pick_device(requested)
    if encoded_on.startswith("cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if encoded_on == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- threads


def recorded_threads(device: torch.device | str, float64: bool, exact: bool = False) -> int:
    """The torch thread count a bits-back decoder must match (0 = not needed): float32 CPU
    kernels split their sums by thread, so a float32 CPU file decodes only with the
    encoder's count (exact-contract, float64 and GPU files do not record one)."""
    if exact or float64 or torch.device(device).type != "cpu":
        return 0
    return min(torch.get_num_threads(), MAX_THREADS)


def use_threads(count: int) -> None:
    """Run torch's CPU kernels on ``count`` threads (0: leave as is). A count above
    MAX_THREADS is refused: no encoder records one, and thread creation would fail."""
    if count > MAX_THREADS:
        raise DiffcodecError(f"the file asks for {count} torch CPU threads (at most {MAX_THREADS}); corrupt header")
    if count and count != torch.get_num_threads():
        torch.set_num_threads(count)


# ------------------------------------------------------------------------------ network


def network(model: torch.nn.Module, *, float64: bool = False, bf16: bool = False, exact: bool = False,
            contract: int | None = None, device: torch.device | str | None = None) -> ModelFn:
    """The model as a ``ModelFn`` in inference mode: on ``device`` when given; ``float64``
    runs a float64 copy (the original is untouched); ``bf16`` runs under bfloat16 autocast
    on CUDA, the output cast back to float32; ``exact`` runs the copy under the exact
    arithmetic contract of version ``contract`` (default: the one this diffcodec writes,
    `exact.CONTRACT_VERSION`; inputs taken as float64, outputs float64)."""
    if sum((float64, bf16, exact)) > 1:
        raise ValueError("network: float64, bf16 and exact exclude each other")
    if exact:
        net = _cached_exact_network(model, contract, device)

        @torch.inference_mode()
        def call_exact(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x_t.to(torch.float64), t)

        return call_exact
    if float64:
        model = copy.deepcopy(model).double()
    if device is not None:
        model = model.to(device)
    model = model.eval()

    @torch.inference_mode()
    def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not bf16:
            return model(x_t, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x_t, t).float()

    return call


def in_batches(model_fn: ModelFn, max_batch: int) -> ModelFn:
    """``model_fn`` taking at most ``max_batch`` inputs per call: a larger batch goes through in
    consecutive slices whose outputs are concatenated (the lossless chain's chunks; the
    progressive codec slices its stages itself, `progressive.codec.tile_slices`). Only for
    arithmetic whose outputs do not depend on the batch (the exact contract, float64): a
    float32 network's outputs may change with the slicing."""
    if max_batch < 1:
        raise ValueError(f"in_batches: max_batch must be >= 1, got {max_batch}")

    def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.shape[0] <= max_batch:
            return model_fn(x_t, t)
        return torch.cat([model_fn(x_t[i : i + max_batch], t[i : i + max_batch])
                          for i in range(0, x_t.shape[0], max_batch)])

    return call


CPU_NETWORK_BATCH = 32
"""Tiles per network call on a CPU by default. Measured on this project's 2-core Intel Xeon (the
exact network, 32x32 tiles, 2 threads, one process): 132 / 134 image-forwards per second at 32
/ 40 tiles, 119 at 16, 103 at 48, 93 at 64, 73 at 128 (larger batches fall out of the caches);
kodim01's progressive decode took 168 s at 32 tiles a call, 164 at 40, 174 at 16 and 191 at
64, with 120 MiB less memory at 32 (reports/results.md; `python -m bench.exact_speed --threads 2
--batch-sizes 16,32,40,64`: reports/exact_speed_batch.md)."""
GPU_NETWORK_BATCH = 64
"""Tiles per network call on a GPU by default: the batch before the CPU's was measured (a GPU's
is not yet)."""


def network_batch(device: torch.device | str) -> int:
    """The codecs' default tiles per network call on ``device`` (a user's batch size overrides it)."""
    return CPU_NETWORK_BATCH if torch.device(device).type == "cpu" else GPU_NETWORK_BATCH


_EXACT_CACHE: dict[tuple[int, int, str], tuple[weakref.ref, tuple, torch.nn.Module]] = {}


def _weights_state(model: torch.nn.Module) -> tuple | None:
    """Where each parameter and buffer lives and its in-place version counter: it changes when
    a weight is replaced or modified in place (an optimizer step), so a cached exact network
    is never used for weights it was not made from. None when a weight keeps no counter (made
    under torch.inference_mode): such a model's exact network is made afresh every time."""
    try:
        return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Building an exact network frees a float64 and an int64 copy of every weight between the
    integer weights it keeps, and glibc keeps such freed pages resident: after the default
    model's build about 120 MiB of them, which raised the process's peak by as much (measured:
    resident 407 MiB after the build, 286 after a trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _cached_exact_network(model: torch.nn.Module, contract: int | None,
                          device: torch.device | str | None) -> torch.nn.Module:
    """`exact_network_of` ``model`` on ``device``, made once for as long as ``model`` and its
    weights stay the same: a lossless job calls for it twice (the header's probe and the
    bits-back chain) and a program coding many files once per file, and each build costs
    about 0.25 s (integer weights, oneDNN's packing at its first call). One network is kept:
    the last one made, let go with its model."""
    from diffcodec.exact import CONTRACT_VERSION

    key = (id(model), CONTRACT_VERSION if contract is None else contract, str(device))
    state = _weights_state(model)
    hit = _EXACT_CACHE.get(key)
    if state is not None and hit is not None and hit[0]() is model and hit[1] == state:
        return hit[2]
    net = exact_network_of(model, contract)
    net = net.to(device) if device is not None else net
    release_freed_memory()
    _EXACT_CACHE.clear()
    if state is None:
        return net
    _EXACT_CACHE[key] = (weakref.ref(model, lambda _: _EXACT_CACHE.pop(key, None)), state, net)
    return net


def exact_network_of(model: torch.nn.Module, contract: int | None = None) -> torch.nn.Module:
    """``model``'s copy under exact-arithmetic contract ``contract`` (default: the version
    this diffcodec writes): version 1 `exact_net.exact_network`, version 2
    `exact_net2.exact_network2`."""
    from diffcodec.exact import CONTRACT_VERSION, CONTRACT_VERSIONS

    version = CONTRACT_VERSION if contract is None else contract
    if version not in CONTRACT_VERSIONS:
        raise DiffcodecError(f"exact arithmetic contract version {version} is not one this diffcodec implements "
                             f"({', '.join(map(str, CONTRACT_VERSIONS))})")
    if version == 1:
        from diffcodec.exact_net import exact_network

        return exact_network(model)
    from diffcodec.exact_net2 import exact_network2

    return exact_network2(model)


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic torch kernels, no TF32, no cuDNN autotuning, and numpy's BLAS on one thread
    (`threadpoolctl`); restores the settings after.

    The codecs' numpy products are small (a stage's log q/p, a few thousand terms): a threaded
    BLAS splits such a sum differently per thread count, and its threads spin after each call,
    which slowed the network call after it by 30-40% (the progressive encoder of a 128x128 crop:
    the same 50 calls 11.4 s inside the encoder against 8.2 s in the decoder, 8.9 s with BLAS on
    one thread; a one-off measurement)."""
    with _numpy_blas().limit(limits=1), _deterministic_torch():
        yield


@functools.cache
def _numpy_blas() -> threadpoolctl.ThreadpoolController:
    """The BLAS libraries loaded, torch's own left out (where torch links a BLAS, e.g. OpenBLAS
    on ARM, its float networks keep their threads)."""
    controller = threadpoolctl.ThreadpoolController()
    paths = [i["filepath"] for i in controller.info()
             if i["user_api"] == "blas" and "torch" not in Path(i["filepath"]).parts]
    return controller.select(filepath=paths)


@contextlib.contextmanager
def _deterministic_torch() -> Iterator[None]:
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
    )
    prepare_cuda_determinism()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]


def prepare_cuda_determinism() -> None:
    """Deterministic cuBLAS needs its workspace setting before CUDA starts: call early."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
