"""Many processes, one job: `torch.distributed` as launched by ``torchrun``.

    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] -m diffcodec COMMAND ...

torchrun starts N processes per machine and gives each ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in its environment; `init` joins them into one
process group (gloo on CPUs; gloo for host objects and NCCL for GPU tensors on GPUs).
Without those variables a job is the single process it always was (`SINGLE`, no group).

What this module owns, and nothing else: the `World` (rank, size); the sharding rule
(`shard`: contiguous, balanced blocks, so rank order is data order and a gather is a
concatenation); `gather` to rank 0 and `broadcast` from it; the device of each rank
(`local_device`: cuda:LOCAL_RANK); and how failures end a job instead of hanging it:

- a command calls `ready` when its setup (arguments, data, model) is done; a
  `DiffcodecError` met before it on any rank is exchanged there and raised on every rank
  as a `SharedError`, which only rank 0 prints (`error_line`): a bad input is one line,
  not N. `stage` does the same for a piece of work with no collective inside;
- a rank that dies (a crash, a kill) makes torchrun stop the others at once;
- every collective waits at most ``DIFFCODEC_DIST_TIMEOUT_S`` seconds (default 1800: a
  stage's end waits for the slowest rank's shard), then raises instead of hanging.

Progress bars and results are rank 0's (the commands check ``World.is_main``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from diffcodec.errors import DiffcodecError, one_line

ENV_TIMEOUT = "DIFFCODEC_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in 0..size-1, and its index on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()
_current = SINGLE


class SharedError(DiffcodecError):
    """A `DiffcodecError` raised on every rank at once (`stage`): printed by rank 0 only."""


def current() -> World:
    """The World `init` joined (`SINGLE` before, or when not launched by torchrun)."""
    return _current


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return _env_int("WORLD_SIZE", 1) > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise DiffcodecError(f"environment variable {name}={text!r} is not an integer") from None


def timeout_seconds() -> float:
    text = os.environ.get(ENV_TIMEOUT)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DiffcodecError(f"{ENV_TIMEOUT}={text!r}: expected a positive number of seconds")
    return value


def local_device(device: torch.device) -> torch.device:
    """A rank's device: a CUDA device without an index becomes cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and device.index is None and launched():
        index = _env_int("LOCAL_RANK", 0)
        if index >= torch.cuda.device_count():
            raise DiffcodecError(f"LOCAL_RANK {index}, but this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s): start at most that many processes per machine (--nproc-per-node)")
        return torch.device("cuda", index)
    return device


def init(device: torch.device | str = "cpu") -> World:
    """Join the torchrun job (once per process; later calls return the same World)."""
    global _current
    if not launched():
        return SINGLE
    if dist.is_initialized():
        return _current
    device = torch.device(device)
    rank, size, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as e:  # a missing or unreachable rendezvous
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DiffcodecError(f"cannot join the torch.distributed job (rank {rank} of {size}): {first[:160]}") from None
    _current = World(rank, size, local)
    atexit.register(finish)
    return _current


def finish(wait: bool = False) -> None:
    """Leave the process group (registered at exit by `init`). ``wait`` (a command that ended
    normally, `cli.main`): every rank first waits for the others, since a rank that left while
    a peer still talked to it aborted that peer at exit ("terminate called without an active
    exception", measured in about one run in seven on 2 ranks, none in 10 with the wait)."""
    global _current
    if dist.is_available() and dist.is_initialized():
        if wait:
            with contextlib.suppress(Exception):  # a peer already gone: leave anyway
                dist.barrier()
        dist.destroy_process_group()
    _current = SINGLE


# ------------------------------------------------------------------------------ work


def shard(num_items: int, world: World) -> range:
    """This rank's items of 0..num_items-1: a contiguous block, sizes differing by at most one,
    ranks in order (rank r's block comes before rank r+1's)."""
    return range(num_items * world.rank // world.size, num_items * (world.rank + 1) // world.size)


def _collective(world: World, what: str, fn: Callable[[], None]) -> None:
    """Run a collective; a peer that died, hung past the timeout or broke the connection is a
    one-line DiffcodecError on this rank (which then exits), not a traceback or a hang."""
    try:
        fn()
    except RuntimeError as e:  # torch.distributed.DistBackendError and gloo's errors
        raise DiffcodecError(
            f"rank {world.rank} of {world.size}: {what} failed: another rank stopped or did not answer within "
            f"{timeout_seconds():g} s ({ENV_TIMEOUT}) [{one_line(e)[:160]}]") from None


def gather(obj: Any, world: World) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    _collective(world, "gathering the results", lambda: dist.gather_object(obj, out, dst=0))
    return out


def all_mean(x: torch.Tensor, world: World) -> torch.Tensor:
    """The mean over ranks of a tensor (every rank gets it)."""
    if not world.distributed:
        return x
    out = x.detach().clone()
    _collective(world, "averaging over the ranks", lambda: dist.all_reduce(out))
    return out / world.size


def all_concat(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows [n, ...] concatenated in rank order [W n, ...] (equal n on every rank)."""
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    _collective(world, "gathering rows from the ranks", lambda: dist.all_gather(parts, x.contiguous()))
    return torch.cat(parts)


def rank0_says(flag: bool, world: World) -> bool:
    """Rank 0's ``flag`` on every rank (a decision all ranks must take together, e.g. stop)."""
    if not world.distributed:
        return flag
    box = torch.tensor([1 if flag else 0], dtype=torch.int64)
    _collective(world, "receiving rank 0's decision", lambda: dist.broadcast(box, src=0))
    return bool(box.item())


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    _collective(world, "receiving rank 0's data", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def _exchange(world: World, error: str | None) -> None:
    """Every rank's error (or None), exchanged; a `SharedError` on every rank if any failed.
    The message is the lowest failing rank's, prefixed with its rank unless every rank
    failed the same way."""
    errors: list[str | None] = [None] * world.size
    _collective(world, "checking the other ranks", lambda: dist.all_gather_object(errors, error))
    failed = [(r, msg) for r, msg in enumerate(errors) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise SharedError(msg if len(failed) == world.size and len(set(errors)) == 1
                          else f"rank {rank} of {world.size}: {msg}")


@contextlib.contextmanager
def stage(world: World) -> Iterator[None]:
    """Run a piece of work on every rank; if it raised a `DiffcodecError` on any rank, raise
    a `SharedError` on all of them once every rank has finished it (single process: the
    error passes through unchanged). The body must hold no collective."""
    error = None
    try:
        yield
    except DiffcodecError as e:
        if not world.distributed:
            raise
        error = str(e)
    if world.distributed:
        _exchange(world, error)


_setup_done = False


def ready(world: World) -> None:
    """A command's setup (checking arguments, reading the data and the model) has ended
    on this rank: the first exchange after `init`. A rank whose setup raised a
    `DiffcodecError` joins this exchange from `error_line` instead, so every rank fails
    together, with one message."""
    global _setup_done
    _setup_done = True
    if world.distributed:
        _exchange(world, None)


def error_line(e: DiffcodecError) -> str | None:
    """What this rank prints for ``e`` (the CLI's one line): rank 0 prints every error,
    another rank only one it alone met after the setup, prefixed with its rank. An error
    before `ready` is first exchanged with the other ranks (see `ready`)."""
    if launched() and not dist.is_initialized():  # before `init`: every rank meets the same error
        return f"diffcodec: error: {e}" if _env_int("RANK", 0) == 0 else None
    world = current()
    if world.distributed and not _setup_done and not isinstance(e, SharedError):
        try:
            _exchange(world, str(e))
        except SharedError as shared:
            e = shared
        except DiffcodecError:  # the others are gone: say what this rank met
            pass
    if world.is_main:
        return f"diffcodec: error: {e}"
    if isinstance(e, SharedError):
        return None
    return f"diffcodec: error: rank {world.rank} of {world.size}: {e}"
