"""Hostile model files through ``diffcodec nll DATA --checkpoint X`` (issue #30): every case
ends in exit 2 with one line on stderr naming the file and the problem, nothing on stdout and
no file written, in under 5 s and 500 MB. Before, these gave tracebacks (deep JSON, a
5000-digit integer, a list where a name is looked up, widths of 2^40, overflowing safetensors
shapes, '²' as an integer), hung (1,000,000 blocks per level), took 1.4 GB before refusing
(T = 1.5e8) or were read as something else (overlapping or float offsets, a repeated tensor
name, random bytes called a pickle of Python objects, a flags folder ignored).

All cases run in one fresh process (`hostile.run_isolated`), which reports each case's seconds
and its peak resident memory after each case, with a valid folder first and last: it runs.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from diffcodec.checkpoint import read_checkpoint, save_checkpoint
from tests.conftest import tiny_model
from tests import hostile
from tests.hostile import SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS

UNET, SCHEDULER = hostile.TINY_UNET, hostile.TINY_SCHEDULER
MAX_SECONDS = 5.0
MAX_MB = 500.0
DEEP = "[" * 200_000 + "]" * 200_000
BIG_INT = "1" + "0" * 5000


def config_text(base: dict, key: str, raw: str) -> bytes:
    """``base`` as JSON with the value of ``key`` replaced by the raw JSON text ``raw``."""
    return json.dumps(dict(base, **{key: "@@"}), indent=2, sort_keys=True).replace('"@@"', raw).encode()


def header_edit(valid, edit) -> bytes:
    """The valid weights file with its header (a dict) changed by ``edit``."""
    header, body = hostile.safetensors_parts(valid / WEIGHTS)
    entries = json.loads(header)
    edit(entries)
    return hostile.safetensors_bytes(json.dumps(entries), body)


def same_size_pair(entries: dict) -> tuple[str, str]:
    """Two tensors of the header with the same shape (their data regions are the same size)."""
    names = sorted(k for k in entries if k != "__metadata__" and k.endswith(".bias"))
    by_shape: dict = {}
    for name in names:
        by_shape.setdefault(tuple(entries[name]["shape"]), []).append(name)
    return next(tuple(group[:2]) for group in by_shape.values() if len(group) > 1)


def overlap(entries: dict) -> None:
    a, b = same_size_pair(entries)
    entries[b]["data_offsets"] = entries[a]["data_offsets"]


def repeated_name(valid, same_entry: bool) -> bytes:
    """A header that names one tensor twice: with another tensor's entry (the library keeps
    the last; before, the last one won and the bound changed), or with its own entry."""
    header, body = hostile.safetensors_parts(valid / WEIGHTS)
    entries = json.loads(header)
    a, b = same_size_pair(entries)
    text = json.dumps(entries)
    first = json.dumps({a: entries[a]})[1:-1]
    second = json.dumps({a: entries[a] if same_entry else entries[b]})[1:-1]
    return hostile.safetensors_bytes(text.replace(first, f"{first}, {second}", 1), body)


def raw_header_edit(valid, pattern: str, replacement: str) -> bytes:
    header, body = hostile.safetensors_parts(valid / WEIGHTS)
    new, count = re.subn(pattern, replacement, header, count=1)
    assert count == 1, pattern
    return hostile.safetensors_bytes(new, body)


def first_tensor(entries: dict) -> dict:
    return entries[sorted(k for k in entries if k != "__metadata__")[0]]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    valid = hostile.write_tiny_diffusers_folder(tmp / "valid")
    rng = np.random.default_rng(0)
    data = tmp / "data.npz"
    np.savez_compressed(data, x=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), y=np.arange(2, dtype=np.uint8))

    diffusers = {  # name: (file -> new bytes, what the one line must say)
        "deep JSON as unet/config.json": ({UNET_CONFIG: DEEP.encode()}, "not valid JSON (nested too deeply to read)"),
        "deep JSON as scheduler_config.json": ({SCHEDULER_CONFIG: DEEP.encode()},
                                               "not valid JSON (nested too deeply to read)"),
        "deep JSON as the safetensors header": ({WEIGHTS: hostile.safetensors_bytes(DEEP, b"")},
                                                "not a valid safetensors file"),
        "5000-digit sample_size": ({UNET_CONFIG: config_text(UNET, "sample_size", BIG_INT)},
                                   "not valid JSON (Exceeds the limit (4300 digits)"),
        "5 MB config.json": ({UNET_CONFIG: b" " * (5 << 20) + b"{}"}, "more than 4,194,304 bytes of JSON"),
        "down_block_types of a list and an object": (
            {UNET_CONFIG: config_text(UNET, "down_block_types", '[["DownBlock2D"], {"x": 1}]')},
            "unsupported down_block_types="),
        "flip_sin_to_cos [true]": ({UNET_CONFIG: config_text(UNET, "flip_sin_to_cos", "[true]")},
                                   "unsupported flip_sin_to_cos/freq_shift=[[true], 1]"),
        "freq_shift an object": ({UNET_CONFIG: config_text(UNET, "freq_shift", '{"a": 0}')},
                                 "unsupported flip_sin_to_cos/freq_shift"),
        "variance_type a list": ({SCHEDULER_CONFIG: config_text(SCHEDULER, "variance_type", '["fixed_large"]')},
                                 'unsupported variance_type=["fixed_large"]'),
        "beta_schedule an object": ({SCHEDULER_CONFIG: config_text(SCHEDULER, "beta_schedule", '{"linear": 1}')},
                                    'unsupported beta_schedule={"linear": 1}'),
        "block_out_channels 2^40": (
            {UNET_CONFIG: config_text(UNET, "block_out_channels", json.dumps([2**40, 2**40]))},
            "block_out_channels must be a list of 1 to 8 integers in [1, 4096], got [1099511627776, 1099511627776]"),
        "layers_per_block 1,000,000": ({UNET_CONFIG: config_text(UNET, "layers_per_block", "1000000")},
                                       "layers_per_block must be an integer in [1, 8], got 1000000"),
        "num_train_timesteps 1.5e8, linear": (
            {SCHEDULER_CONFIG: config_text(SCHEDULER, "num_train_timesteps", "150000000")},
            "num_train_timesteps must be an integer in [1, 100000], got 150000000"),
        "num_train_timesteps 10^9": ({SCHEDULER_CONFIG: config_text(SCHEDULER, "num_train_timesteps", str(10**9))},
                                     "num_train_timesteps must be an integer in [1, 100000], got 1000000000"),
        "num_train_timesteps 10^12": (
            {SCHEDULER_CONFIG: config_text(SCHEDULER, "num_train_timesteps", str(10**12))},
            "num_train_timesteps must be an integer in [1, 100000], got 1000000000000"),
        "shape [2^62, 4], offsets [0, 0]": (
            {WEIGHTS: header_edit(valid, lambda e: first_tensor(e).update(shape=[2**62, 4], data_offsets=[0, 0]))},
            "not a valid safetensors file (overflow"),
        "shape [2^64, 1]": ({WEIGHTS: header_edit(valid, lambda e: first_tensor(e).update(shape=[2**64, 1]))},
                            "not a valid safetensors file"),
        "overlapping data_offsets": ({WEIGHTS: header_edit(valid, overlap)},
                                     "not a valid safetensors file (invalid offset"),
        "a tensor named twice, another entry": ({WEIGHTS: repeated_name(valid, same_entry=False)},
                                                "not a valid safetensors file"),
        "a tensor named twice, the same entry": ({WEIGHTS: repeated_name(valid, same_entry=True)},
                                                 "appears twice"),
        "float data_offsets": ({WEIGHTS: raw_header_edit(valid, r'"data_offsets": ?\[(\d+), ?(\d+)\]',
                                                         r'"data_offsets": [\1.9, \2.9]')},
                               "not a valid safetensors file (invalid JSON in header"),
        "float shape": ({WEIGHTS: raw_header_edit(valid, r'"shape": ?\[(\d+)\]', r'"shape": [\1.7]')},
                        "not a valid safetensors file (invalid JSON in header"),
        "header length 2^40": ({WEIGHTS: (1 << 40).to_bytes(8, "little") + b"{}"}, "a header of 1,099,511,627,776"),
        "I32 weights": ({WEIGHTS: raw_header_edit(valid, r'"dtype": ?"F32"', '"dtype": "I32"')},
                        "is not floating point"),
    }
    out = []
    for i, (name, (files, message)) in enumerate(diffusers.items()):
        folder = hostile.copy_folder(valid, tmp / f"d{i}", files)
        out.append((name, folder, message))
    random_bin = hostile.copy_folder(valid, tmp / "random_bin", {"unet/diffusion_pytorch_model.bin": bytes(
        rng.integers(0, 128, 4000, dtype=np.uint8))})
    (random_bin / WEIGHTS).unlink()
    out.append(("random bytes as the .bin", random_bin, "not a readable state dict ("))

    base = {"image_size": "32", "num_channels": "32", "learn_sigma": "False", "diffusion_steps": "1000",
            "noise_schedule": "linear"}
    flags = {  # name: (the flag written last, in place of the base's, what the one line must say)
        "--num_channels 2^40": ("--num_channels 1099511627776", "model.ch must be in [1, 4096], got 1099511627776"),
        "--num_res_blocks ²": ("--num_res_blocks ²", "--num_res_blocks must be an integer, got '\\xb2'"),
        "--num_res_blocks --1": ("--num_res_blocks --1", "--num_res_blocks must be an integer, got '--1'"),
        "--num_res_blocks 1,000,000": ("--num_res_blocks 1000000",
                                       "model.num_res_blocks must be in [0, 8], got 1000000"),
        "--diffusion_steps 10^12": ("--diffusion_steps 1000000000000",
                                    "diffusion.num_timesteps must be in [1, 100000]"),
        "a newline in a flag's name": ("'--a\nb' 1", "expected --flag value, got '--a\\nb'"),
    }
    for i, (name, (flag, message)) in enumerate(flags.items()):
        folder = tmp / f"f{i}"
        folder.mkdir()
        torch.save({"x": torch.zeros(1)}, folder / "model.pt")  # refused before the weights are read
        kept = " ".join(f"--{k} {v}" for k, v in base.items() if not flag.startswith(f"--{k} "))
        (folder / "model.pt.flags").write_text(f"{kept} {flag}")
        out.append((name, folder / "model.pt", message))
    folder = tmp / "flags_dir"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "model.pt")
    (folder / "model.pt.flags").mkdir()
    out.append(("MODEL.pt.flags a folder", folder / "model.pt", "model.pt.flags: not a file"))

    model, mc, dc = tiny_model()
    good = tmp / "good.pt"
    save_checkpoint(good, model, mc, dc)
    payload = read_checkpoint(good)
    payload["model_config"]["ch"] = 2**62
    torch.save(payload, tmp / "ch.pt")
    out.append(("model_config.ch 2^62 in a diffcodec checkpoint", tmp / "ch.pt",
                "corrupt checkpoint config: model.ch must be in [1, 4096], got 4611686018427387904"))
    return tmp, valid, data, out


def test_every_hostile_file_is_one_line_exit_2_in_bounded_time_and_memory(cases):
    tmp, valid, data, named = cases

    def argv(path):
        return ["nll", str(data), "--checkpoint", str(path), "--t-samples", "1", "-n", "1", "--device", "cpu"]

    files_before = sorted(p for p in tmp.rglob("*") if p.name != "cases.json")
    results = hostile.run_isolated([{"argv": argv(valid)}] + [{"argv": argv(path)} for _, path, _ in named]
                           + [{"argv": argv(valid)}], tmp)
    first, last = results[0], results[-1]
    bound = first["out"].splitlines()[0]  # "bits/dim  9.9144"
    assert first["code"] == last["code"] == 0 and bound.startswith("bits/dim") and last["out"].startswith(bound)
    for (name, path, message), r in zip(named, results[1:-1]):
        lines = r["err"].strip().splitlines()
        assert "crash" not in r, (name, r["crash"])
        assert r["code"] == 2 and r["out"] == "", (name, r)
        assert len(lines) == 1 and lines[0].startswith("diffcodec: error: "), (name, r["err"])
        assert message in lines[0], (name, lines[0])
        assert r["seconds"] < MAX_SECONDS, (name, r["seconds"])
        assert r["peak_mb"] < MAX_MB, (name, r["peak_mb"])
    assert sorted(p for p in tmp.rglob("*") if p.name != "cases.json") == files_before  # nothing written
