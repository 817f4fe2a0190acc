"""Improved DDPM's released checkpoints (openai/improved-diffusion) as diffcodec models.

A checkpoint there is a plain PyTorch state dict of their ``UNetModel``; what it is (size,
schedule, T, variances) lives only in the command-line flags of their README. So diffcodec
reads ``MODEL.pt`` together with a sidecar ``MODEL.pt.flags`` holding those flags as their
README writes them, e.g. for ``cifar10_uncond_50M_500K.pt``::

    --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3
    --diffusion_steps 4000 --noise_schedule cosine

Flags left out take the defaults of their ``model_and_diffusion_defaults()`` (as their
scripts do), except ``image_size``, ``learn_sigma``, ``diffusion_steps`` and
``noise_schedule``, which must be written (they decide what the bound means). One flag of
diffcodec's own, ``--channel_mult 1,2,2,2``, overrides the per-size channel multipliers
(their ``create_model`` fixes them by image size: 32 -> 1,2,2,2; 64 -> 1,2,3,4; 256 ->
1,1,2,2,4,4).

Their ``UNetModel`` is diffcodec's `unet.UNet` with three settings `ModelConfig` carries:
``scale_shift_norm`` (their ``use_scale_shift_norm``), ``time_embedding="improved"`` ([cos,
sin], frequencies 10000^(-i/half)) and ``timestep_scale`` = 1000 / T (their
``rescale_timesteps``: the network sees t 1000 / T). The state dict is renamed into UNet's
names (``input_blocks.3.0.in_layers.2`` -> ``down.2.0.conv1``, ...), and each attention
block's qkv rows, which they lay out head by head ([q_h, k_h, v_h] per head), are permuted
into UNet's [q, k, v] x heads. The weights file is read with torch's ``weights_only``
loading: a pickle that would run code is refused.

Diffusion: ``noise_schedule`` linear or cosine (diffcodec's schedules: their betas, computed
in float64), T = ``diffusion_steps``, variance ``learned_range`` with ``learn_sigma``, else
``fixedsmall`` with ``sigma_small``, else ``fixedlarge``; x^_0 clipped to [-1, 1], as their
``image_nll.py``. Refused in one line: ``class_cond`` (the bound needs a label),
``predict_xstart``, a ``timestep_respacing`` (respace with ``--steps``), different
``num_heads_upsample``, an unknown flag, a flag given twice, a value that is not its flag's
type written in ASCII (``--num_res_blocks ²``), and sizes beyond `config`'s limits (checked
before anything is built); the flags file is read up to 64 kB.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import torch

from diffcodec.config import DiffusionConfig, ModelConfig, diffusion_config_problem, model_config_problem, show
from diffcodec.checkpoint import tensor_name
from diffcodec.errors import DiffcodecError
from diffcodec.external import load_state_dict

SIDECAR_SUFFIX = ".flags"
MAX_FLAGS_BYTES = 64 << 10  # their README's flags for a model are ~200 bytes
FLAG_NAME = re.compile(r"[a-z_][a-z0-9_]*")
INTEGER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: str.isdigit() takes '²', which int() refuses
NUMBER = re.compile(r"[-+]?([0-9]{1,12}\.?[0-9]{0,12}|\.[0-9]{1,12})([eE][-+]?[0-9]{1,3})?")

# improved_diffusion.script_util.model_and_diffusion_defaults() (their repository, read once).
DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False, "sigma_small": False, "class_cond": False,
    "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False,
    "predict_xstart": False, "rescale_timesteps": True, "rescale_learned_sigmas": True, "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
REQUIRED = ("image_size", "learn_sigma", "diffusion_steps", "noise_schedule")
CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}  # their create_model
EXTRA = {"channel_mult": ""}  # diffcodec's own flag


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _str2bool(v: str) -> bool | None:
    low = v.lower()
    return True if low in ("yes", "true", "t", "y", "1") else False if low in ("no", "false", "f", "n", "0") else None


def parse_flags(text: str, where: Path) -> dict[str, Any]:
    """Their flags (``--name value`` pairs, typed as their argparse types them) over their defaults."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise DiffcodecError(f"{where}: cannot parse the flags ({e})") from None
    given: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        name, _, value = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        if not FLAG_NAME.fullmatch(name):
            raise DiffcodecError(f"{where}: expected --flag value, got {show(word)}")
        if not value:
            if i + 1 >= len(words):
                raise DiffcodecError(f"{where}: --{name} has no value")
            value, i = words[i + 1], i + 1
        i += 1
        default = {**DEFAULTS, **EXTRA}.get(name, KeyError)
        if default is KeyError:
            raise DiffcodecError(f"{where}: unknown flag --{name} (improved-diffusion's model and diffusion flags, "
                                 "and --channel_mult)")
        if isinstance(default, bool):
            parsed = _str2bool(value)
        elif isinstance(default, int):
            parsed = int(value) if INTEGER.fullmatch(value) else None
        elif isinstance(default, float):
            parsed = float(value) if NUMBER.fullmatch(value) else None
        else:
            parsed = value
        if parsed is None:
            kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
            raise DiffcodecError(f"{where}: --{name} must be {kind}, got {show(value)}")
        if name in given:  # argparse would keep the last: say it instead
            raise DiffcodecError(f"{where}: --{name} is given twice")
        given[name] = parsed
    missing = [f"--{k}" for k in REQUIRED if k not in given]
    if missing:
        raise DiffcodecError(f"{where}: no {', '.join(missing)} (diffcodec takes them from the flags, never a default)")
    return {**DEFAULTS, **EXTRA, **given}


def _integers(text: str, empty_ok: bool = False) -> tuple[int, ...] | None:
    """``"1,2,2"`` -> (1, 2, 2) (blank items skipped where ``empty_ok``), or None."""
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item] if empty_ok else items
    return tuple(int(item) for item in items) if all(INTEGER.fullmatch(item) for item in items) else None


def configs_from_flags(f: dict[str, Any], where: Path) -> tuple[ModelConfig, DiffusionConfig]:
    def unsupported(flag: str, why: str) -> DiffcodecError:
        return DiffcodecError(f"{where}: unsupported --{flag} {show(f[flag])} ({why})")

    if f["class_cond"]:
        raise unsupported("class_cond", "a class-conditional model needs its label; diffcodec evaluates "
                                        "unconditional models")
    if f["predict_xstart"]:
        raise unsupported("predict_xstart", "diffcodec's networks predict epsilon")
    if f["timestep_respacing"]:
        raise unsupported("timestep_respacing", "give the full T; diffcodec respaces with --steps")
    if f["num_heads_upsample"] not in (-1, f["num_heads"]):
        raise unsupported("num_heads_upsample", "diffcodec's UNet has one head count")
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise unsupported("noise_schedule", "linear or cosine")
    size = f["image_size"]
    if f["channel_mult"]:
        mult = _integers(f["channel_mult"])
        if mult is None:
            raise unsupported("channel_mult", "comma-separated integers")
    elif size in CHANNEL_MULT:
        mult = CHANNEL_MULT[size]
    else:
        raise unsupported("image_size", f"their create_model knows {', '.join(map(str, CHANNEL_MULT))}; "
                                        "give --channel_mult")
    attn = _integers(f["attention_resolutions"], empty_ok=True)
    if attn is None:
        raise unsupported("attention_resolutions", "comma-separated integers")
    ch = f["num_channels"]
    if ch < 1 or any((ch * m) % 32 for m in mult):
        raise unsupported("num_channels", "their GroupNorm needs multiples of 32 at every level")
    steps = f["diffusion_steps"]
    model = ModelConfig(
        image_size=size, in_channels=3, ch=ch, ch_mult=mult, num_res_blocks=f["num_res_blocks"],
        attn_resolutions=attn, dropout=float(f["dropout"]), learn_sigma=f["learn_sigma"], num_heads=f["num_heads"],
        norm_eps=1e-5, downsample_padding="symmetric", time_embedding="improved",
        timestep_scale=1000.0 / steps if f["rescale_timesteps"] and steps > 0 else 1.0,
        scale_shift_norm=f["use_scale_shift_norm"])
    var = "learned_range" if f["learn_sigma"] else "fixedsmall" if f["sigma_small"] else "fixedlarge"
    diffusion = DiffusionConfig(schedule=f["noise_schedule"], num_timesteps=steps, var_type=var)
    problem = model_config_problem(model) or diffusion_config_problem(diffusion)
    if problem is not None:
        raise DiffcodecError(f"{where}: these flags have no diffcodec equivalent ({problem})")
    return model, diffusion


def _resblock(src: str, dst: str) -> dict[str, str]:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "temb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _attention(src: str, dst: str) -> dict[str, str]:
    names = {"norm": "norm", "qkv": "qkv", "proj_out": "proj"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def key_map(config: ModelConfig) -> dict[str, str]:
    """Their state dict's names -> UNet's names."""
    levels, n = len(config.ch_mult), config.num_res_blocks
    attn = {i for i in range(levels) if config.image_size // 2**i in config.attn_resolutions}
    m = {f"{a}.{p}": f"{b}.{p}" for a, b in [("time_embed.0", "temb.0"), ("time_embed.2", "temb.2"),
                                             ("input_blocks.0.0", "conv_in"), ("out.0", "norm_out"),
                                             ("out.2", "conv_out")] for p in ("weight", "bias")}
    k = 0
    for level in range(levels):
        for _ in range(n):
            m |= _resblock(f"input_blocks.{k + 1}.0", f"down.{k}.0")
            if level in attn:
                m |= _attention(f"input_blocks.{k + 1}.1", f"down.{k}.1")
            k += 1
        if level != levels - 1:
            m |= {f"input_blocks.{k + 1}.0.op.{p}": f"down.{k}.0.conv.{p}" for p in ("weight", "bias")}
            k += 1
    m |= _resblock("middle_block.0", "mid.0") | _attention("middle_block.1", "mid.1") | _resblock("middle_block.2",
                                                                                                   "mid.2")
    j = k = 0
    for level in reversed(range(levels)):
        for i in range(n + 1):
            m |= _resblock(f"output_blocks.{j}.0", f"up.{k}.0")
            if level in attn:
                m |= _attention(f"output_blocks.{j}.1", f"up.{k}.1")
            k += 1
            if level and i == n:
                up = 2 if level in attn else 1
                m |= {f"output_blocks.{j}.{up}.conv.{p}": f"up.{k}.0.conv.{p}" for p in ("weight", "bias")}
                k += 1
            j += 1
    return m


def qkv_rows(channels: int, heads: int) -> torch.Tensor:
    """Row order taking their per-head [q_h, k_h, v_h] layout to UNet's [q, k, v] x heads:
    UNet row part c + h d + i is their row h 3d + part d + i (d = channels / heads)."""
    d = channels // heads
    return torch.tensor([h * 3 * d + part * d + i for part in range(3) for h in range(heads) for i in range(d)])


def to_diffcodec_state(state: dict[str, torch.Tensor], config: ModelConfig, expected: dict[str, tuple[int, ...]],
                       where: Path) -> dict[str, torch.Tensor]:
    names = key_map(config)
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in names.items():
        if ours not in expected:  # a skip convolution exists only where a block changes width
            continue
        if theirs not in state:
            raise DiffcodecError(f"{where}: weights do not fit the flags (missing {theirs})")
        value = state[theirs].float()
        if ours.endswith((".qkv.weight", ".qkv.bias", ".proj.weight")):
            if ours.endswith(".proj.weight"):
                value = value.reshape(*value.shape[:2], 1, 1) if value.ndim == 3 else value
            else:
                c = value.shape[0] // 3
                if value.shape[0] % 3 or c % config.num_heads:
                    raise DiffcodecError(f"{where}: weights do not fit the flags ({theirs} is {list(value.shape)})")
                value = value[qkv_rows(c, config.num_heads)]
                value = value.reshape(*value.shape[:2], 1, 1) if value.ndim == 3 else value
        if tuple(value.shape) != expected[ours]:
            raise DiffcodecError(f"{where}: weights do not fit the flags ({theirs} is {list(state[theirs].shape)}, "
                                 f"the flags need {list(expected[ours])})")
        out[ours] = value
    used = {t for t, o in names.items() if o in expected}
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise DiffcodecError(f"{where}: weights do not fit the flags (unexpected {tensor_name(unexpected[0])}"
                             + (f" and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ")"))
    return out


def read_improved_diffusion(path: Path) -> tuple[ModelConfig, DiffusionConfig, dict[str, torch.Tensor], dict]:
    """(model config, diffusion config, state dict in UNet's names, meta) of MODEL.pt + MODEL.pt.flags."""
    from diffcodec.unet import parameter_shapes

    flags_path = sidecar_path(path)
    if not flags_path.is_file():
        raise DiffcodecError(f"{flags_path}: not a file (the flags of {path.name}, as improved-diffusion's README "
                             "writes them)")
    try:
        with open(flags_path, "rb") as f:
            data = f.read(MAX_FLAGS_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as e:
        raise DiffcodecError(f"{flags_path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DiffcodecError(f"{flags_path}: cannot read (not UTF-8 text)") from None
    if len(data) > MAX_FLAGS_BYTES:
        raise DiffcodecError(f"{flags_path}: more than {MAX_FLAGS_BYTES:,} bytes of flags (a model's are ~200)")
    model_config, diffusion_config = configs_from_flags(parse_flags(text, flags_path), flags_path)
    state = load_state_dict(path)
    expected = parameter_shapes(model_config)
    state = to_diffcodec_state(state, model_config, expected, path)
    meta = {"source": "improved-diffusion", "weights": "improved-diffusion UNetModel", "flags": str(flags_path)}
    return model_config, diffusion_config, state, meta
