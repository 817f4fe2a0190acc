"""diffusers DDPM folders (``google/ddpm-cifar10-32`` and the like) as diffcodec models.

A pipeline folder (``unet/config.json``, ``unet/diffusion_pytorch_model.safetensors`` or
``.bin``, ``scheduler/scheduler_config.json``) or a bare ``UNet2DModel`` folder with its
scheduler config (``scheduler_config.json`` in the folder, or ``../scheduler/``) is read
without the diffusers package and without running code from the files (JSON; safetensors,
or a ``.bin`` through torch's ``weights_only`` loading).

The paper's CIFAR-10 network as diffusers publishes it is diffcodec's own `unet.UNet`
layer for layer (ResNet blocks with a projected timestep embedding, single-head attention at
16x16, nearest upsampling, [sin, cos] embedding with frequencies 10000^(-i/(d/2 - 1))), with
two settings `ModelConfig` carries: GroupNorm epsilon 1e-6 (``norm_eps``) and the stride-2
convolution padded after the end only (``downsample_padding="end"``, diffusers'
``downsample_padding=0``, TensorFlow's 'SAME'). So the weights are loaded INTO a `UNet`
(query/key/value projections stacked into its 1x1 ``qkv`` convolution): the bound, both
codecs and the exact network (portable files) work on it unchanged. A config this mapping
cannot express exactly (an embedding other than the paper's or diffusers' default [cos, sin]
with ``freq_shift=0``, which is ``time_embedding="improved"``; scale-shift norm, whose
diffusers middle block drops the attention's GroupNorm; class labels; another prediction
target; ...) is a one-line error naming the field.

Note on ``fixed_large``: diffcodec's ``fixedlarge`` is the paper code's (beta_t, with the
posterior variance at the first step); diffusers' scheduler uses beta_1 there when sampling.
The bound follows the paper.

The schedule, T, the variance type and the clipping of x^_0 come from the scheduler config:
``linear`` (betas 1e-4..0.02 scaled by 1000/T, computed in float64 as the paper's code; any
other range is refused) or ``squaredcos_cap_v2`` (Improved DDPM's cosine schedule);
``fixed_large`` / ``fixed_small`` (and their ``_log`` forms) / ``learned_range``;
``prediction_type="epsilon"``; ``clip_sample`` true with range 1 (diffcodec clips x^_0 to
[-1, 1] always; a model that does not is refused rather than evaluated differently).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from diffcodec.config import (
    DiffusionConfig,
    ModelConfig,
    diffusion_config_problem,
    model_config_problem,
)
from diffcodec.errors import DiffcodecError
from diffcodec.external import load_state_dict
from diffcodec.schedule import linear_betas

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel's defaults for keys an older config.json leaves out (diffusers' own behaviour).
UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}
# DDPMScheduler's defaults for the keys that do not decide the bound's meaning. The schedule,
# T and the variance type must be written in the file: they are never taken from a default.
SCHEDULER_REQUIRED = ("beta_schedule", "num_train_timesteps", "variance_type")
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0,
    "prediction_type": "epsilon", "thresholding": False, "rescale_betas_zero_snr": False,
}
VAR_TYPES = {"fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge", "fixed_small": "fixedsmall",
             "fixed_small_log": "fixedsmall", "learned_range": "learned_range"}
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "unet" / "config.json").is_file() or (path / "config.json").is_file())


def find_files(folder: Path) -> tuple[Path, Path, Path]:
    """(unet config, weights, scheduler config) of a pipeline or a bare UNet folder."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise DiffcodecError(f"{folder}: not a diffusers model folder (no unet/config.json or config.json)")
    weights = next((unet_dir / w for w in WEIGHT_FILES if (unet_dir / w).is_file()), None)
    if weights is None:
        raise DiffcodecError(f"{unet_dir}: no weights ({' or '.join(WEIGHT_FILES)})")
    candidates = [unet_dir.parent / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"]
    if unet_dir == folder:
        candidates = [folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"]
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise DiffcodecError(f"{folder}: no scheduler config (looked for {' and '.join(map(str, candidates))}); "
                             "it gives the noise schedule, T and the variance type, which diffcodec does not guess")
    return unet_dir / "config.json", weights, scheduler


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DiffcodecError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffcodecError(f"{path}: not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(data, dict):
        raise DiffcodecError(f"{path}: not a JSON object")
    return data


def _unsupported(where: Path, key: str, value: Any, why: str) -> DiffcodecError:
    return DiffcodecError(f"{where}: unsupported {key}={json.dumps(value)} ({why})")


def model_config_from_unet(cfg: dict[str, Any], where: Path) -> tuple[ModelConfig, list[bool]]:
    """The `ModelConfig` that is this UNet2DModel config, and which levels have attention."""
    c = {**UNET_DEFAULTS, **cfg}
    cls = c.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise _unsupported(where, "_class_name", cls, "diffcodec reads UNet2DModel (DDPM) networks")
    if c["num_class_embeds"] is not None or c["class_embed_type"] is not None:
        raise _unsupported(where, "num_class_embeds", c["num_class_embeds"] or c["class_embed_type"],
                           "a class-conditional model needs its label; diffcodec evaluates unconditional models")
    fixed = {
        "time_embedding_type": ("positional", "diffcodec's UNet has the sinusoidal embedding"),
        "center_input_sample": (False, "inputs are already in [-1, 1]"),
        "act_fn": ("silu", "diffcodec's UNet uses SiLU"),
        "mid_block_type": ("UNetMidBlock2D", "diffcodec's UNet has a ResNet-attention-ResNet middle"),
        "add_attention": (True, "diffcodec's UNet has attention in the middle"),
        "mid_block_scale_factor": (1, "no output scaling in diffcodec's UNet"),
        "downsample_type": ("conv", "diffcodec's UNet downsamples by a stride-2 convolution"),
        "upsample_type": ("conv", "diffcodec's UNet upsamples by nearest + convolution"),
        "resnet_time_scale_shift": ("default", "diffcodec's UNet adds the timestep projection"),
        "norm_num_groups": (32, "diffcodec's UNet uses 32 groups"),
    }
    for key, (want, why) in fixed.items():
        if c[key] != want:
            raise _unsupported(where, key, c[key], why)
    embeddings = {(False, 1): "ddpm", (True, 0): "improved"}  # [sin, cos] / (half - 1); [cos, sin] / half
    embedding = embeddings.get((c["flip_sin_to_cos"], c["freq_shift"]))
    if embedding is None:
        raise _unsupported(where, "flip_sin_to_cos/freq_shift", [c["flip_sin_to_cos"], c["freq_shift"]],
                           "diffcodec reads [false, 1] (the paper's embedding) and [true, 0]")
    if c["attn_norm_num_groups"] not in (None, 32):
        raise _unsupported(where, "attn_norm_num_groups", c["attn_norm_num_groups"], "diffcodec's UNet uses 32 groups")
    chans = c.get("block_out_channels")
    if not isinstance(chans, list) or not chans or not all(isinstance(x, int) and x > 0 for x in chans):
        raise DiffcodecError(f"{where}: block_out_channels must be a list of positive integers, got {chans!r}")
    ch = chans[0]
    if any(x % ch for x in chans) or any(x % 32 for x in chans):
        raise _unsupported(where, "block_out_channels", chans,
                           "diffcodec's UNet needs multiples of the first width, and of 32 for its GroupNorm")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _unsupported(where, "time_embedding_dim", c["time_embedding_dim"], f"diffcodec's UNet uses 4 x {ch}")
    down, up = c.get("down_block_types"), c.get("up_block_types")
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if not isinstance(down, list) or len(down) != len(chans) or any(d not in kinds for d in down):
        raise _unsupported(where, "down_block_types", down, f"diffcodec reads {len(chans)} of {', '.join(kinds)}")
    attn = [kinds[d] for d in down]
    mirror = [{False: "UpBlock2D", True: "AttnUpBlock2D"}[a] for a in reversed(attn)]
    if up != mirror:
        raise _unsupported(where, "up_block_types", up, f"diffcodec's UNet mirrors the down blocks: {mirror}")
    size = c.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        raise _unsupported(where, "sample_size", size, "diffcodec needs square tiles of a given size")
    if "attention_head_dim" not in cfg:  # diffusers would take 8, which early exports did not mean
        raise DiffcodecError(f'{where}: no attention_head_dim (diffusers would assume 8-wide heads; write '
                             f'"attention_head_dim": null for one head per block, as the paper\'s model, or the '
                             'head width)')
    head_dim = c["attention_head_dim"]
    widths = [w for w, a in zip(chans, attn) if a] + [chans[-1]]
    if head_dim is None:  # diffusers: one head as wide as the block
        num_heads = 1
    elif not isinstance(head_dim, int) or head_dim < 1 or any(w % head_dim for w in widths) or len(
            {w // head_dim for w in widths}) > 1:
        raise _unsupported(where, "attention_head_dim", head_dim,
                           f"diffcodec's UNet needs one head count for attention widths {sorted(set(widths))}")
    else:
        num_heads = widths[0] // head_dim
    if c["downsample_padding"] not in (0, 1):
        raise _unsupported(where, "downsample_padding", c["downsample_padding"], "diffcodec reads 0 or 1")
    eps, dropout = c["norm_eps"], c["dropout"]
    if not isinstance(eps, (int, float)) or not isinstance(dropout, (int, float)):
        raise DiffcodecError(f"{where}: norm_eps and dropout must be numbers")
    in_ch, out_ch = c["in_channels"], c["out_channels"]
    if in_ch != 3:
        raise _unsupported(where, "in_channels", in_ch, "diffcodec codes RGB images: 3 channels")
    if out_ch not in (3, 6):
        raise _unsupported(where, "out_channels", out_ch, "3 (eps) or 6 (eps and learned variance)")
    layers = c["layers_per_block"]
    if not isinstance(layers, int) or layers < 1:
        raise _unsupported(where, "layers_per_block", layers, "a positive integer")
    config = ModelConfig(
        image_size=size, in_channels=3, ch=ch, ch_mult=tuple(x // ch for x in chans), num_res_blocks=layers,
        attn_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a), dropout=float(dropout),
        learn_sigma=out_ch == 6, num_heads=num_heads, norm_eps=float(eps), time_embedding=embedding,
        downsample_padding="end" if c["downsample_padding"] == 0 else "symmetric")
    problem = model_config_problem(config)
    if problem is not None:
        raise DiffcodecError(f"{where}: this UNet has no diffcodec equivalent ({problem})")
    return config, attn


def diffusion_config_from_scheduler(cfg: dict[str, Any], where: Path) -> DiffusionConfig:
    """The `DiffusionConfig` of a DDPMScheduler config (see the module docstring)."""
    missing = [k for k in SCHEDULER_REQUIRED if k not in cfg]
    if missing:
        raise DiffcodecError(f"{where}: no {', '.join(missing)} (diffcodec takes them from the file, never a default)")
    c = {**SCHEDULER_DEFAULTS, **cfg}
    t = c["num_train_timesteps"]
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise DiffcodecError(f"{where}: num_train_timesteps must be a positive integer, got {t!r}")
    if c["trained_betas"] is not None:
        raise _unsupported(where, "trained_betas", "[...]", "diffcodec reads named schedules only")
    name = c["beta_schedule"]
    if name not in SCHEDULES:
        raise DiffcodecError(f"{where}: unknown beta_schedule {json.dumps(name)} "
                             f"(diffcodec reads {' and '.join(SCHEDULES)})")
    if name == "linear":
        betas = linear_betas(t)
        start, end = c["beta_start"], c["beta_end"]
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float))
                and math.isclose(start, betas[0], rel_tol=1e-9) and math.isclose(end, betas[-1], rel_tol=1e-9)):
            raise _unsupported(where, "beta_start/beta_end", [start, end],
                               f"diffcodec's linear schedule at T = {t} is {betas[0]:.6g}..{betas[-1]:.6g}")
    var = c["variance_type"]
    if var not in VAR_TYPES:
        raise _unsupported(where, "variance_type", var, f"diffcodec reads {', '.join(VAR_TYPES)}")
    if c["prediction_type"] != "epsilon":
        raise _unsupported(where, "prediction_type", c["prediction_type"], "diffcodec's networks predict epsilon")
    if c["clip_sample"] is not True or c["clip_sample_range"] != 1.0 or c["thresholding"] is not False:
        raise _unsupported(where, "clip_sample", [c["clip_sample"], c["clip_sample_range"], c["thresholding"]],
                           "diffcodec clips x^_0 to [-1, 1]: clip_sample true, clip_sample_range 1, no thresholding")
    if c["rescale_betas_zero_snr"]:
        raise _unsupported(where, "rescale_betas_zero_snr", True, "diffcodec reads the plain schedules")
    config = DiffusionConfig(schedule=SCHEDULES[name], num_timesteps=t, var_type=VAR_TYPES[var])
    problem = diffusion_config_problem(config)
    if problem is not None:
        raise DiffcodecError(f"{where}: {problem}")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from diffcodec.external.safetensors_io import read_safetensors

        return read_safetensors(path)
    return load_state_dict(path)


def _resnet(src: str, dst: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
             "conv_shortcut": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def key_map(config: ModelConfig, attn: list[bool]) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers name -> diffcodec name for plain copies, diffusers attention prefix -> diffcodec
    attention prefix). The second kind are joined: q, k, v into ``qkv``, ``to_out.0`` into ``proj``."""
    plain = {f"{a}.{p}": f"{b}.{p}" for a, b in [("conv_in", "conv_in"), ("time_embedding.linear_1", "temb.0"),
                                                    ("time_embedding.linear_2", "temb.2"),
                                                    ("conv_norm_out", "norm_out"), ("conv_out", "conv_out")]
             for p in ("weight", "bias")}
    attns: dict[str, str] = {}
    levels, n, k = len(config.ch_mult), config.num_res_blocks, 0
    for level in range(levels):
        for j in range(n):
            plain |= _resnet(f"down_blocks.{level}.resnets.{j}", f"down.{k}.0")
            if attn[level]:
                attns[f"down_blocks.{level}.attentions.{j}"] = f"down.{k}.1"
            k += 1
        if level != levels - 1:
            plain |= {f"down_blocks.{level}.downsamplers.0.conv.{p}": f"down.{k}.0.conv.{p}"
                      for p in ("weight", "bias")}
            k += 1
    plain |= _resnet("mid_block.resnets.0", "mid.0") | _resnet("mid_block.resnets.1", "mid.2")
    attns["mid_block.attentions.0"] = "mid.1"
    k = 0
    for block, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            plain |= _resnet(f"up_blocks.{block}.resnets.{j}", f"up.{k}.0")
            if attn[level]:
                attns[f"up_blocks.{block}.attentions.{j}"] = f"up.{k}.1"
            k += 1
        if level != 0:
            plain |= {f"up_blocks.{block}.upsamplers.0.conv.{p}": f"up.{k}.0.conv.{p}" for p in ("weight", "bias")}
            k += 1
    return plain, attns


def to_diffcodec_state(state: dict[str, torch.Tensor], config: ModelConfig, attn: list[bool],
                       expected: dict[str, tuple[int, ...]], where: Path) -> dict[str, torch.Tensor]:
    """diffusers' tensors renamed (and attention projections joined) into `UNet`'s state dict,
    float32. Every tensor of the file is used and every tensor of the UNet given, at its shape."""
    plain, attns = key_map(config, attn)
    src = {k: v.float() for k, v in state.items()}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise DiffcodecError(f"{where}: weights do not fit the config (missing {name})")
        used.add(name)
        return src[name]

    for a, b in plain.items():
        if b in expected:  # conv_shortcut exists only where a block changes width
            out[b] = take(a)
    for a, b in attns.items():
        out[f"{b}.norm.weight"], out[f"{b}.norm.bias"] = take(f"{a}.group_norm.weight"), take(f"{a}.group_norm.bias")
        q, k, v = (take(f"{a}.{p}.weight") for p in ("to_q", "to_k", "to_v"))
        if not q.ndim == k.ndim == v.ndim == 2:
            raise DiffcodecError(f"{where}: weights do not fit the config ({a}.to_q.weight is {list(q.shape)})")
        out[f"{b}.qkv.weight"] = torch.cat([q, k, v])[:, :, None, None]
        out[f"{b}.qkv.bias"] = torch.cat([take(f"{a}.{p}.bias") for p in ("to_q", "to_k", "to_v")])
        proj = take(f"{a}.to_out.0.weight")
        out[f"{b}.proj.weight"], out[f"{b}.proj.bias"] = proj.reshape(*proj.shape, 1, 1), take(f"{a}.to_out.0.bias")
    unused = sorted(set(src) - used)
    if unused:
        raise DiffcodecError(f"{where}: weights do not fit the config (unexpected {unused[0]}"
                             + (f" and {len(unused) - 1} more)" if len(unused) > 1 else ")"))
    source = {b: a for a, b in plain.items()}
    for name, shape in expected.items():
        if name not in out:
            raise DiffcodecError(f"{where}: weights do not fit the config (missing {source.get(name, name)})")
        if tuple(out[name].shape) != shape:
            raise DiffcodecError(f"{where}: weights do not fit the config ({source.get(name, name)} gives "
                                 f"{list(out[name].shape)} for {name}, which needs {list(shape)})")
    return out


def read_diffusers_folder(folder: Path) -> tuple[ModelConfig, DiffusionConfig, dict[str, torch.Tensor], dict]:
    """(model config, diffusion config, state dict in diffcodec's names, meta) of a folder."""
    from diffcodec.unet import UNet

    unet_cfg_path, weights_path, sched_path = find_files(folder)
    model_config, attn = model_config_from_unet(read_json(unet_cfg_path), unet_cfg_path)
    diffusion_config = diffusion_config_from_scheduler(read_json(sched_path), sched_path)
    if model_config.learn_sigma != (diffusion_config.var_type == "learned_range"):
        raise DiffcodecError(f"{unet_cfg_path}: out_channels {model_config.out_channels} does not fit the scheduler's "
                             f"variance type {diffusion_config.var_type} (which needs "
                             f"{6 if diffusion_config.var_type == 'learned_range' else 3})")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(model_config).state_dict().items()}
    state = to_diffcodec_state(read_weights(weights_path), model_config, attn, expected, weights_path)
    meta = {"source": "diffusers", "weights": f"diffusers UNet2DModel ({weights_path.name})",
            "unet_config": str(unet_cfg_path), "scheduler_config": str(sched_path)}
    return model_config, diffusion_config, state, meta
