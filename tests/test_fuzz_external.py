"""Fuzzing ``--checkpoint`` with others' model files: no mutation of a valid model gives a
traceback, takes more than a few seconds or 500 MB, or changes a result while loading.

Two valid tiny models: the diffusers folder of `tests.hostile` (unet/config.json,
scheduler/scheduler_config.json, a safetensors file) and the Improved DDPM state dict of
tests/golden with its MODEL.pt.flags. Each case changes one file deterministically (seed 30):

- config fields (both JSON files): a value replaced by one from a pool of wrong kinds, huge
  and deep values, and equal ones; a key deleted, repeated, or an unknown one added; the file
  reformatted, cut short, or a byte flipped;
- safetensors header fields: dtype, shape and data_offsets replaced from a pool; an entry
  removed, repeated, or overlapping another; metadata and padding added; the file cut short;
- flags: a value replaced, a flag deleted or repeated.

Every case runs ``load_checkpoint`` (what ``--checkpoint`` calls; the CLI turns its one-line
DiffcodecError into exit 2, tests/test_external_hostile.py) in one fresh process that measures
each case's seconds and its peak memory. Each case's expected outcome follows from the
mutation alone: *neutral* (an equal value, an ignored or unknown key, a deleted key whose
default is its value, reformatting: must load the valid model, same fingerprint), *refused*
(a value of another JSON kind, an unreadable one, a repeated key, a cut file, any header
corruption: must be a one-line error) or *any* (a value of the same kind, a flipped byte:
either, but never a traceback).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import hostile
from tests.hostile import SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS

MAX_SECONDS = 5.0
MAX_MB = 500.0
POOL = ["null", "true", "false", "0", "-1", "1", "3", "32", "1000", "1099511627776", "4611686018427387904",
        "18446744073709551616", "1" + "0" * 5000, "0.5", "1e-06", "-0.0", "1e400", "NaN", '""', '"x"', '"linear"',
        '"fixed_large"', '"DownBlock2D"', "[]", "[1]", "[32, 64]", '[["DownBlock2D"], {"x": 1}]', "{}", '{"a": 0}',
        "[" * 50_000 + "]" * 50_000, '"' + "a" * 100_000 + '"']
# Keys diffcodec's bound does not depend on (diffusers: version, sampling-only settings).
IGNORED = {UNET_CONFIG: {"_diffusers_version", "num_train_timesteps"},
           SCHEDULER_CONFIG: {"_class_name", "_diffusers_version", "dynamic_thresholding_ratio", "sample_max_value",
                              "steps_offset", "timestep_spacing"}}
# diffusers' defaults for a key left out (UNet2DModel / DDPMScheduler); keys not here have none
# that diffcodec takes (the block layout; the schedule, T and variance type it never guesses).
DEFAULTS = {UNET_CONFIG: {"_class_name": "UNet2DModel", "in_channels": 3, "out_channels": 3,
                          "center_input_sample": False, "time_embedding_type": "positional",
                          "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
                          "mid_block_type": "UNetMidBlock2D", "layers_per_block": 2, "mid_block_scale_factor": 1,
                          "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
                          "act_fn": "silu", "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
                          "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
                          "num_class_embeds": None},
            SCHEDULER_CONFIG: {"beta_start": 0.0001, "beta_end": 0.02, "trained_betas": None, "clip_sample": True,
                               "clip_sample_range": 1.0, "prediction_type": "epsilon", "thresholding": False,
                               "rescale_betas_zero_snr": False}}
CONFIGS = {UNET_CONFIG: hostile.TINY_UNET, SCHEDULER_CONFIG: hostile.TINY_SCHEDULER}


def kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)[:4]
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def same(a, b) -> bool:
    """Equal JSON values of the same kind (1.0 is 1, true is not)."""
    return kind(a) == kind(b) and a == b


def parsed(raw: str):
    """The JSON value of ``raw``, or None when no strict reader takes it (also for null: the
    callers tell the two apart with ``raw == "null"``)."""
    try:
        return json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, RecursionError):
        return None


def expected_for_value(file: str, key: str, raw: str) -> str:
    value, original = parsed(raw), CONFIGS[file][key]
    if value is None and raw != "null":
        return "refused"
    if key in IGNORED[file] or same(value, original):
        return "neutral"
    return "refused" if original is not None and kind(value) != kind(original) else "any"


def object_text(pairs: list[tuple[str, str]], indent: str = "  ") -> bytes:
    """A JSON object written from (key, raw value text) pairs, in that order, repeats kept."""
    return ("{\n" + ",\n".join(f"{indent}{json.dumps(k)}: {v}" for k, v in pairs) + "\n}\n").encode()


def config_cases(file: str, rng: np.random.Generator) -> list[tuple[str, bytes, str]]:
    config = CONFIGS[file]
    pairs = [(k, json.dumps(v)) for k, v in sorted(config.items())]
    cases = []
    for key in sorted(config):
        for raw in rng.choice(POOL, size=4, replace=False):
            text = object_text([(k, raw if k == key else v) for k, v in pairs])
            cases.append((f"{file}: {key} = {raw[:30]}", text, expected_for_value(file, key, raw)))
        default = DEFAULTS[file].get(key, KeyError)
        if key in IGNORED[file] or (default is not KeyError and same(default, config[key])):
            deleted = "neutral"
        else:
            deleted = "refused" if default is KeyError else "any"
        cases.append((f"{file}: {key} deleted", object_text([p for p in pairs if p[0] != key]), deleted))
    for key in rng.choice(sorted(config), size=4, replace=False):
        text = object_text([p for k, v in pairs for p in ([(k, v), (k, v)] if k == key else [(k, v)])])
        cases.append((f"{file}: {key} repeated", text, "refused"))
    for raw in ['"x"', "[1, {}]", "[" * 50_000 + "]" * 50_000, "NaN"]:
        cases.append((f"{file}: unknown key = {raw[:20]}", object_text(pairs + [("zz_fuzz", raw)]),
                      "neutral" if parsed(raw) is not None else "refused"))
    valid = object_text(pairs)
    cases += [(f"{file}: compact", json.dumps(config, separators=(",", ":")).encode(), "neutral"),
              (f"{file}: keys reversed, indent 4", object_text(pairs[::-1], " " * 4), "neutral")]
    for cut in np.unique(np.linspace(0, len(valid.rstrip()) - 1, 6).astype(int)):
        cases.append((f"{file}: cut to {cut} bytes", valid[:cut], "refused"))
    for pos in rng.choice(len(valid), size=8, replace=False):
        flipped = bytearray(valid)
        flipped[pos] ^= 1 << int(rng.integers(8))
        cases.append((f"{file}: byte {pos} flipped", bytes(flipped), "any"))
    return cases


HEADER_POOL = {"dtype": ['"F16"', '"I32"', '"F64"', '"BOOL"', '"F32 "', "1", "null", "[]"],
               "shape": ["[]", "[1]", "[32.7]", "[-1]", "[4611686018427387904, 4]", "[18446744073709551616, 1]",
                         '"32"', "[1, 32]"],
               "data_offsets": ["[0, 0]", "[0.9, 128.9]", "[128, 0]", "[0, 18446744073709551616]", "null", "[0]",
                                "[-4, 124]", "[1, 129]"]}


def header_cases(valid: Path, rng: np.random.Generator) -> list[tuple[str, bytes, str]]:
    header, body = hostile.safetensors_parts(valid / WEIGHTS)
    entries = json.loads(header)
    names = sorted(k for k in entries if k != "__metadata__")

    def size(name: str) -> int:
        begin, end = entries[name]["data_offsets"]
        return end - begin

    def written(e: dict, field_raw: tuple[str, str, str] | None = None, extra: str = "") -> bytes:
        pairs = []
        for k, v in e.items():
            text = json.dumps(v)
            if field_raw is not None and k == field_raw[0]:
                text = json.dumps(dict(v, **{field_raw[1]: "@@"})).replace('"@@"', field_raw[2])
            pairs.append((k, text))
        return hostile.safetensors_bytes(object_text(pairs).decode().strip() + extra, body)

    cases = []
    paired = [n for n in names if any(size(m) == size(n) for m in names if m != n)]
    for name in rng.choice(paired, size=3, replace=False):
        for field, pool in HEADER_POOL.items():
            for raw in rng.choice(pool, size=4, replace=False):
                cases.append((f"header: {name}.{field} = {raw}", written(entries, (name, field, raw)), "refused"))
        cases.append((f"header: {name} removed", written({k: v for k, v in entries.items() if k != name}),
                      "refused"))
        other = next(n for n in names if n != name and size(n) == size(name))
        overlapping = dict(entries, **{name: dict(entries[name], data_offsets=entries[other]["data_offsets"])})
        cases.append((f"header: {name} over {other}'s data", written(overlapping), "refused"))
        text = json.dumps(entries)
        one = json.dumps({name: entries[name]})[1:-1]
        repeated = hostile.safetensors_bytes(text.replace(one, f"{one}, {one}", 1), body)
        cases.append((f"header: {name} repeated", repeated, "refused"))
        cases.append((f"header: {name} with an extra field",
                      written(dict(entries, **{name: dict(entries[name], zz_fuzz=[1, {"a": None}])})), "neutral"))
    metadata = dict(entries, __metadata__={"format": "pt", "zz": "x" * 1000})
    cases += [("header: metadata added", written(metadata), "neutral"),
              ("header: no metadata", written({k: v for k, v in entries.items() if k != "__metadata__"}), "neutral"),
              ("header: entries reversed", written(dict(reversed(list(entries.items())))), "neutral"),
              ("header: 64 spaces of padding", written(entries, extra=" " * 64), "neutral")]
    data = (valid / WEIGHTS).read_bytes()
    for cut in np.unique(np.linspace(0, len(data) - 1, 8).astype(int)):
        cases.append((f"weights cut to {cut} bytes", data[:cut], "refused"))
    return cases


GOLDEN_FLAGS = {"image_size": "8", "channel_mult": "1,2", "num_channels": "32", "num_res_blocks": "1",
                "attention_resolutions": "4", "num_heads": "2", "learn_sigma": "True", "diffusion_steps": "4000",
                "noise_schedule": "cosine"}
FLAG_POOL = ["0", "-1", "1", "2", "²", "--1", "1e3", "nan", "True", "x", "''", "99999999999999999999", "1,2", "32",
             "8", "4"]
INTEGER_FLAGS = {"image_size", "num_channels", "num_res_blocks", "num_heads", "diffusion_steps"}


def flags_text(pairs: list[tuple[str, str]]) -> str:
    return " ".join(f"--{k} {v}" for k, v in pairs)


def flag_cases(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    pairs = list(GOLDEN_FLAGS.items())
    cases = []
    for flag, original in pairs:
        for raw in rng.choice(FLAG_POOL, size=4, replace=False):
            if raw == original:
                expect = "neutral"
            else:  # not an integer written in ASCII digits, where one is needed
                expect = "refused" if flag in INTEGER_FLAGS and not re.fullmatch(r"-?[0-9]{1,18}", raw) else "any"
            cases.append((f"flags: --{flag} {raw}", flags_text([(k, raw if k == flag else v) for k, v in pairs]),
                          expect))
        cases.append((f"flags: --{flag} deleted", flags_text([p for p in pairs if p[0] != flag]), "any"))
        cases.append((f"flags: --{flag} repeated", flags_text(pairs + [(flag, original)]), "refused"))
    cases.append(("flags: reordered, one per line", "\n".join(f"--{k} {v}" for k, v in pairs[::-1]), "neutral"))
    cases.append(("flags: --name=value", " ".join(f"--{k}={v}" for k, v in pairs), "neutral"))
    return cases


@pytest.fixture(scope="module")
def fuzz_cases(tmp_path_factory):
    """(work folder, [(name, path to load, expected outcome)], fingerprints of the valid models)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    from make_improved_diffusion_tiny import seeded_state

    tmp = tmp_path_factory.mktemp("fuzz_external")
    valid = hostile.write_tiny_diffusers_folder(tmp / "valid")
    rng = np.random.default_rng(30)
    cases = []
    for file in (UNET_CONFIG, SCHEDULER_CONFIG):
        for name, data, expect in config_cases(file, rng):
            cases.append((name, hostile.copy_folder(valid, tmp / f"c{len(cases)}", {file: data}), expect))
    for name, data, expect in header_cases(valid, rng):
        cases.append((name, hostile.copy_folder(valid, tmp / f"c{len(cases)}", {WEIGHTS: data}), expect))

    golden = np.load(Path(__file__).parent / "golden" / "improved_diffusion_tiny.npz")
    names_shapes = [(str(n), tuple(int(d) for d in s.split(","))) for n, s in zip(golden["names"], golden["shapes"])]
    improved = tmp / "improved"
    improved.mkdir()
    torch.save(seeded_state(names_shapes), improved / "model.pt")
    (improved / "model.pt.flags").write_text(flags_text(list(GOLDEN_FLAGS.items())))
    for name, text, expect in flag_cases(rng):
        folder = tmp / f"c{len(cases)}"
        folder.mkdir()
        (folder / "model.pt").hardlink_to(improved / "model.pt")
        (folder / "model.pt.flags").write_text(text)
        cases.append((name, folder / "model.pt", expect))
    return tmp, valid, improved / "model.pt", cases


def test_no_mutation_gives_a_traceback_a_cost_or_a_changed_result(fuzz_cases):
    tmp, valid, improved, cases = fuzz_cases
    results = hostile.run_isolated([{"load": str(valid)}, {"load": str(improved)}]
                           + [{"load": str(path)} for _, path, _ in cases], tmp, timeout=240)
    reference = {"diffusers": results[0]["fingerprint"], "improved": results[1]["fingerprint"]}
    outcomes: dict[str, int] = {}
    for (name, path, expect), r in zip(cases, results[2:]):
        assert "crash" not in r, (name, r["crash"])
        assert r["seconds"] < MAX_SECONDS and r["peak_mb"] < MAX_MB, (name, r["seconds"], r["peak_mb"])
        if "error" in r:
            assert expect != "neutral", (name, r["error"])
            folder = path.parent if path.suffix == ".pt" else path
            assert "\n" not in r["error"] and r["error"].startswith(f"{folder}/"), (name, r["error"])
            outcome = "refused"
        else:
            assert expect != "refused", (name, "loaded")
            outcome = "same" if r["fingerprint"] == reference[
                "improved" if path.suffix == ".pt" else "diffusers"] else "other"
            assert outcome == "same" or expect == "any", (name, "loaded another model")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the cases reach every outcome: refusals, neutral loads, and other valid models
    assert len(cases) >= 300 and outcomes["refused"] >= 200 and outcomes["same"] >= 40 and outcomes["other"] >= 3, (
        outcomes)
