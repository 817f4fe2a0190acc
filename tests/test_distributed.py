"""Issue 18: torchrun / torch.distributed, on the CPU with gloo, 2 processes of one torch thread.

- `nll` on 2 processes gives the per-image terms of one process bit for bit (through
  `bench.distributed_speed`, which runs both and is smoke-tested here on tiny settings,
  untimed), with an image whose tiles land on both ranks;
- `encode` on 2 processes writes the same shard files as one process with ``--shards 2``,
  and the set decodes to the input pixels (a damaged shard is refused);
- a user error is one line, from rank 0, with a non-zero exit; an error on one rank only
  stops every rank with that rank's message; a rank that stops answering is a one-line
  error after the timeout, not a hang (two ranks spawned in-process);
- two DDP training steps equal one process's steps on the doubled batch.

Each torchrun launch costs a few seconds of Python and torch start-up per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import synthetic_images
from PIL import Image

from diffcodec.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def why(done: subprocess.CompletedProcess) -> str:
    """A failed launch's stderr: its start (each rank's own words) and its end (torchrun's)."""
    err = done.stderr
    return err if len(err) <= 4000 else err[:2000] + "\n[...]\n" + err[-2000:]


def torchrun(*argv: str, procs: int = 2, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "diffcodec", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env={**env(), **(extra_env or {})}, cwd=REPO,
                          timeout=240, check=False)


def write_pngs(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    folder.mkdir()
    images = synthetic_images(sizes, seed=seed)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"im{i}.png")
    return images


def test_nll_on_two_processes_gives_one_process_terms_bit_for_bit(tiny_checkpoint, tmp_path):
    """3 images -> 4 + 1 + 2 tiles; -b 3 makes 3 batches: rank 0 gets tiles 0-2, rank 1 tiles
    3-6, so image 0's tiles are evaluated on both ranks. --t-samples covers the pilot (rank 0's,
    broadcast) and the per-image timestep draws."""
    from bench import distributed_speed

    write_pngs(tmp_path / "imgs", [(40, 33), (32, 32), (20, 50)])
    out = tmp_path / "speed.json"
    keep = tmp_path / "terms"
    keep.mkdir()
    argv = ["--data", str(tmp_path / "imgs"), "-c", str(tiny_checkpoint), "-n", "3", "-k", "6", "--t-samples", "2",
            "-b", "3", "--procs", "1,2", "--out", str(out), "--keep-terms", str(keep)]
    assert distributed_speed.main(argv) == 0  # runs `nll` on 1 and on 2 processes (subprocesses)
    r = json.loads(out.read_text())
    assert [row["procs"] for row in r["rows"]] == [1, 2] and [row["world_size"] for row in r["rows"]] == [1, 2]
    assert all(row["identical"] for row in r["rows"]) and out.with_suffix(".md").is_file()
    one, two = np.load(keep / "terms_1.npz"), np.load(keep / "terms_2.npz")
    assert one["terms_bits"].shape == (3, 6) and np.all(np.isfinite(one["terms_bits"]))
    for key in ("prior_bits", "terms_bits", "num_dims", "names"):
        assert np.array_equal(one[key], two[key]), key
    assert np.array_equal(one["xstart_mse"], two["xstart_mse"], equal_nan=True)
    # the same run in this process (the CLI, not a subprocess): the same numbers again
    mine = tmp_path / "mine.npz"
    assert main(["nll", str(tmp_path / "imgs"), "-c", str(tiny_checkpoint), "-k", "6", "--t-samples", "2", "-b", "3",
                 "--device", "cpu", "-q", "--save-terms", str(mine)]) == 0
    assert np.array_equal(np.load(mine)["terms_bits"], one["terms_bits"])


def test_encode_on_two_processes_writes_the_shards_of_one_and_the_set_decodes(tiny_checkpoint, tmp_path):
    images = write_pngs(tmp_path / "imgs", [(32, 32)] * 3 + [(20, 40)], seed=5)
    common = ["-c", str(tiny_checkpoint), "-k", "2", "--lossless", "--no-bound", "--no-bootstrap", "--device", "cpu",
              "-q"]
    assert main(["encode", str(tmp_path / "imgs"), "-o", str(tmp_path / "one.dfcset"), "--shards", "2", *common]) == 0
    done = torchrun("encode", str(tmp_path / "imgs"), "-o", str(tmp_path / "two.dfcset"), "--json", *common)
    assert done.returncode == 0, why(done)
    report = json.loads(done.stdout)  # printed once, by rank 0
    assert report["num_shards"] == 2 and report["num_images"] == 4
    for i in range(2):
        a = (tmp_path / f"one-{i:05d}-of-00002.dfc").read_bytes()
        b = (tmp_path / f"two-{i:05d}-of-00002.dfc").read_bytes()
        assert a == b and len(a) == report["shards"][i]["file_bytes"]
    index = json.loads((tmp_path / "two.dfcset").read_text())
    assert [s["num_images"] for s in index["shards"]] == [2, 2]
    done = torchrun("decode", str(tmp_path / "two.dfcset"), "-o", str(tmp_path / "out"), "-c", str(tiny_checkpoint),
                    "-q")  # each rank decodes one shard
    assert done.returncode == 0, why(done)
    assert done.stdout.count("4 image(s) from 2 shard(s)") == 1  # reported once, by rank 0
    decoded = [np.asarray(Image.open(tmp_path / "out" / f"im{i}.png")) for i in range(4)]
    assert all(np.array_equal(d, im) for d, im in zip(decoded, images))
    # a damaged shard is refused before any decoding, and nothing is written
    shard = tmp_path / "two-00001-of-00002.dfc"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["decode", str(tmp_path / "two.dfcset"), "-o", str(tmp_path / "again"), "-c", str(tiny_checkpoint),
                 "-q"]) == 2
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------ failures, in-process ranks


def _failing_ranks(rank: int, port: int, npz: str, results) -> None:
    import contextlib
    import io

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DIFFCODEC_DIST_TIMEOUT_S="60")
    torch.set_num_threads(1)
    from diffcodec import distributed
    from diffcodec.errors import DiffcodecError

    out = {}
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # a bad input on every rank: one line, from rank 0
        out["cli"] = (main(["nll", npz, "-c", "missing.pt", "--device", "cpu", "-q"]), stderr.getvalue())
    world = distributed.current()
    try:  # an error on rank 1 only: both ranks stop with rank 1's message
        with distributed.stage(world):
            if rank == 1:
                raise DiffcodecError("shard 3 is unreadable")
    except distributed.SharedError as e:
        out["stage"] = (str(e), distributed.error_line(e))
    if rank == 1:  # rank 1 stops answering: rank 0's next collective must fail, not hang
        time.sleep(4)
    else:  # a 1 s timeout from here on (60 s above, so that a slow start under load is no failure)
        from datetime import timedelta

        import torch.distributed.distributed_c10d as c10d

        os.environ["DIFFCODEC_DIST_TIMEOUT_S"] = "1"
        c10d._set_pg_timeout(timedelta(seconds=1))
        start = time.monotonic()
        try:
            distributed.gather("x", world)
        except DiffcodecError as e:
            out["timeout"] = (str(e), time.monotonic() - start)
    results[rank] = out


def test_errors_under_distributed_are_one_line_from_rank_0_and_a_silent_rank_times_out(images_npz):
    """Two ranks (spawned here, gloo): a bad input met by every rank is one line, printed by
    rank 0, exit status 2 on both; an error on rank 1 alone stops both with rank 1's message;
    a rank that stops answering makes the next collective a one-line error after the timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_failing_ranks, args=(port, str(images_npz), results), nprocs=2, join=True)
    for rank in (0, 1):
        status, stderr = results[rank]["cli"]
        assert status == 2
        lines = stderr.splitlines()
        if rank == 0:
            assert len(lines) == 1 and lines[0].startswith("diffcodec: error: ") and "missing.pt" in lines[0]
        else:
            assert lines == []
        message, line = results[rank]["stage"]
        assert message == "rank 1 of 2: shard 3 is unreadable"
        assert (line is not None) == (rank == 0)  # printed by rank 0 only
    message, seconds = results[0]["timeout"]
    assert "rank 0 of 2" in message and "DIFFCODEC_DIST_TIMEOUT_S" in message and "\n" not in message
    assert seconds < 3.5  # the 1 s timeout, before rank 1 wakes up


def test_sharding_rule_is_contiguous_balanced_and_complete():
    from diffcodec.distributed import World, shard
    from diffcodec.shardset import shard_paths, shard_ranges

    for n in range(12):
        for size in range(1, 5):
            blocks = [shard(n, World(r, size)) for r in range(size)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert shard_ranges(5, 2) == [range(2), range(2, 5)]
    assert shard_paths("a/x.dfcset", 2) == ["a/x-00000-of-00002.dfc", "a/x-00001-of-00002.dfc"]


def test_two_ddp_steps_equal_one_process_steps_on_the_whole_batch(tmp_path):
    """`train` under torchrun: --batch-size 8 is the step's whole batch, 4 rows per rank, DDP
    averaging the gradients; one process trains on the same 8 rows (the same draws). Adam
    divides by sqrt(v), so a parameter whose gradient is ~1e-10 (float noise) moves by a
    visible fraction of a step: the gradients (Adam's first moment) are compared tightly,
    the weights to a tenth of one learning-rate step."""
    from test_train import write_shards

    from diffcodec.config import preset
    from diffcodec.trainer import _build_model, read_state

    data = write_shards(tmp_path / "train")
    common = ["--preset", "tiny", "--steps", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu"]
    assert main(["train", str(data), "--out", str(tmp_path / "one"), *common]) == 0
    done = torchrun("train", str(data), "--out", str(tmp_path / "two"), "--json", *common)
    assert done.returncode == 0, why(done)
    assert json.loads(done.stdout)["steps"] == 2  # printed once, by rank 0
    assert "2 processes (DDP), 4 images each per step" in done.stderr
    one, two = read_state(tmp_path / "one"), read_state(tmp_path / "two")
    assert one["step"] == two["step"] == 2 and one["images_seen"] == two["images_seen"] == 16
    assert torch.equal(one["generator"], two["generator"])  # the same draws: resumes alike
    assert one["history"][:, 1].tolist() == pytest.approx(two["history"][:, 1].tolist(), rel=1e-5)
    m1, m2 = one["optimizer"]["state"], two["optimizer"]["state"]
    grad1 = torch.cat([m1[i]["exp_avg"].flatten() for i in m1])
    grad2 = torch.cat([m2[i]["exp_avg"].flatten() for i in m2])
    assert torch.allclose(grad1, grad2, rtol=1e-4, atol=1e-6 * float(grad1.abs().max()))
    initial = _build_model(preset("tiny")[0], seed=0).state_dict()  # the run's seeded start (--seed 0)
    moved = 0.0
    for k in one["model"]:
        assert torch.allclose(one["model"][k], two["model"][k], rtol=0, atol=1e-4), k  # lr 1e-3: 0.1 step
        moved = max(moved, float((one["model"][k] - initial[k]).abs().max()))
    assert moved > 1e-3  # the weights moved by steps, far beyond the tolerance
