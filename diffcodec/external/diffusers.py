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

Hostile files: the JSON is read by `json_io` (size, nesting, repeated keys), every field is
checked for its JSON kind (true is not 1, a list is never looked up as a name) and range
(`config`'s limits table) before it is used, and the weights' names, shapes and dtypes are
compared with what the config needs from the safetensors header, before any tensor is read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from diffcodec.checkpoint import shapes_misfit
from diffcodec.config import (
    MAX_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_LEVELS,
    MAX_RES_BLOCKS,
    MAX_TIMESTEPS,
    DiffusionConfig,
    ModelConfig,
    diffusion_config_problem,
    model_config_problem,
)
from diffcodec.errors import DiffcodecError
from diffcodec.external import load_state_dict
from diffcodec.external.json_io import read_json_object, show_json
from diffcodec.external.safetensors_io import read_header, read_safetensors
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


def _unsupported(where: Path, key: str, value: Any, why: str) -> DiffcodecError:
    return DiffcodecError(f"{where}: unsupported {key}={show_json(value)} ({why})")


def _int(c: dict[str, Any], key: str, where: Path, low: int, high: int) -> int:
    """``c[key]``, an integer in [low, high] (true and false are not integers here)."""
    value = c[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DiffcodecError(f"{where}: {key} must be an integer in [{low}, {high}], got {show_json(value)}")
    return value


def _kind(value: Any) -> str:
    """A JSON value's kind: null, bool, number, str, list or dict (true is not the number 1)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return "null" if value is None else type(value).__name__


def _same(value: Any, want: Any) -> bool:
    """``value == want`` for a JSON value, of the same kind (1.0 is 1; true is not)."""
    if isinstance(want, tuple):
        return isinstance(value, tuple) and len(value) == len(want) and all(map(_same, value, want))
    return _kind(value) == _kind(want) and value == want


def _lookup(table: dict, value: Any) -> Any:
    """The entry of ``table`` whose key is `_same` as ``value`` (a JSON value, or a tuple of
    them), or None; never a lookup by hash, which a list or an object would fail."""
    return next((entry for key, entry in table.items() if _same(value, key)), None)


def _number(c: dict[str, Any], key: str, where: Path) -> float:
    """``c[key]``, a finite number of at most 1e300 in size."""
    value = c[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) <= 1e300:
        raise DiffcodecError(f"{where}: {key} must be a number, got {show_json(value)}")
    return float(value) + 0.0  # -0.0 is 0.0 (the configs are hashed into the fingerprint)


def _name(c: dict[str, Any], key: str, where: Path, names: dict[str, str]) -> str:
    """``names[c[key]]``: diffcodec's name for the file's."""
    value = _lookup(names, c[key])
    if value is None:
        raise _unsupported(where, key, c[key], f"diffcodec reads {', '.join(names)}")
    return value


def model_config_from_unet(cfg: dict[str, Any], where: Path) -> tuple[ModelConfig, list[bool]]:
    """The `ModelConfig` that is this UNet2DModel config, and which levels have attention.
    Every field's type and range is checked before it is used (the limits: `config`)."""
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
        if not _same(c[key], want):
            raise _unsupported(where, key, c[key], why)
    embeddings = {(False, 1): "ddpm", (True, 0): "improved"}  # [sin, cos] / (half - 1); [cos, sin] / half
    embedding = _lookup(embeddings, (c["flip_sin_to_cos"], c["freq_shift"]))
    if embedding is None:
        raise _unsupported(where, "flip_sin_to_cos/freq_shift", [c["flip_sin_to_cos"], c["freq_shift"]],
                           "diffcodec reads [false, 1] (the paper's embedding) and [true, 0]")
    if not (c["attn_norm_num_groups"] is None or _same(c["attn_norm_num_groups"], 32)):
        raise _unsupported(where, "attn_norm_num_groups", c["attn_norm_num_groups"], "diffcodec's UNet uses 32 groups")
    chans = c.get("block_out_channels")
    if not isinstance(chans, list) or not 1 <= len(chans) <= MAX_LEVELS or not all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_CHANNELS for x in chans):
        raise DiffcodecError(f"{where}: block_out_channels must be a list of 1 to {MAX_LEVELS} integers in "
                             f"[1, {MAX_CHANNELS}], got {show_json(chans)}")
    ch = chans[0]
    if any(x % ch for x in chans) or any(x % 32 for x in chans):
        raise _unsupported(where, "block_out_channels", chans,
                           "diffcodec's UNet needs multiples of the first width, and of 32 for its GroupNorm")
    if not (c["time_embedding_dim"] is None or _same(c["time_embedding_dim"], 4 * ch)):
        raise _unsupported(where, "time_embedding_dim", c["time_embedding_dim"], f"diffcodec's UNet uses 4 x {ch}")
    down, up = c.get("down_block_types"), c.get("up_block_types")
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if not isinstance(down, list) or len(down) != len(chans) or any(_lookup(kinds, d) is None for d in down):
        raise _unsupported(where, "down_block_types", down, f"diffcodec reads {len(chans)} of {', '.join(kinds)}")
    attn = [kinds[d] for d in down]
    mirror = [{False: "UpBlock2D", True: "AttnUpBlock2D"}[a] for a in reversed(attn)]
    if up != mirror:
        raise _unsupported(where, "up_block_types", up, f"diffcodec's UNet mirrors the down blocks: {mirror}")
    size = c.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and _kind(size[0]) == "number" and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise _unsupported(where, "sample_size", c.get("sample_size"),
                           f"diffcodec needs square tiles of 1 to {MAX_IMAGE_SIZE} pixels")
    if "attention_head_dim" not in cfg:  # diffusers would take 8, which early exports did not mean
        raise DiffcodecError(f'{where}: no attention_head_dim (diffusers would assume 8-wide heads; write '
                             f'"attention_head_dim": null for one head per block, as the paper\'s model, or the '
                             'head width)')
    widths = [w for w, a in zip(chans, attn) if a] + [chans[-1]]
    if c["attention_head_dim"] is None:  # diffusers: one head as wide as the block
        num_heads = 1
    else:
        head_dim = _int(c, "attention_head_dim", where, 1, MAX_CHANNELS)
        if any(w % head_dim for w in widths) or len({w // head_dim for w in widths}) > 1:
            raise _unsupported(where, "attention_head_dim", head_dim,
                               f"diffcodec's UNet needs one head count for attention widths {sorted(set(widths))}")
        num_heads = widths[0] // head_dim
    padding = _lookup({0: "end", 1: "symmetric"}, c["downsample_padding"])
    if padding is None:
        raise _unsupported(where, "downsample_padding", c["downsample_padding"], "diffcodec reads 0 or 1")
    if not _same(c["in_channels"], 3):
        raise _unsupported(where, "in_channels", c["in_channels"], "diffcodec codes RGB images: 3 channels")
    learn_sigma = _lookup({3: False, 6: True}, c["out_channels"])
    if learn_sigma is None:
        raise _unsupported(where, "out_channels", c["out_channels"], "3 (eps) or 6 (eps and learned variance)")
    config = ModelConfig(
        image_size=size, in_channels=3, ch=ch, ch_mult=tuple(x // ch for x in chans),
        num_res_blocks=_int(c, "layers_per_block", where, 1, MAX_RES_BLOCKS),
        attn_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a), dropout=_number(c, "dropout", where),
        learn_sigma=learn_sigma, num_heads=num_heads, norm_eps=_number(c, "norm_eps", where),
        time_embedding=embedding, downsample_padding=padding)
    problem = model_config_problem(config)
    if problem is not None:
        raise DiffcodecError(f"{where}: this UNet has no diffcodec equivalent ({problem})")
    return config, attn


def diffusion_config_from_scheduler(cfg: dict[str, Any], where: Path) -> DiffusionConfig:
    """The `DiffusionConfig` of a DDPMScheduler config (see the module docstring). T is
    checked against `config.MAX_TIMESTEPS` before any schedule is computed."""
    missing = [k for k in SCHEDULER_REQUIRED if k not in cfg]
    if missing:
        raise DiffcodecError(f"{where}: no {', '.join(missing)} (diffcodec takes them from the file, never a default)")
    c = {**SCHEDULER_DEFAULTS, **cfg}
    t = _int(c, "num_train_timesteps", where, 1, MAX_TIMESTEPS)
    if c["trained_betas"] is not None:
        raise _unsupported(where, "trained_betas", "[...]", "diffcodec reads named schedules only")
    name = _name(c, "beta_schedule", where, SCHEDULES)
    var = _name(c, "variance_type", where, VAR_TYPES)
    if c["prediction_type"] != "epsilon":
        raise _unsupported(where, "prediction_type", c["prediction_type"], "diffcodec's networks predict epsilon")
    clipping = (c["clip_sample"], c["clip_sample_range"], c["thresholding"])
    if not _same(clipping, (True, 1.0, False)):
        raise _unsupported(where, "clip_sample", clipping,
                           "diffcodec clips x^_0 to [-1, 1]: clip_sample true, clip_sample_range 1, no thresholding")
    if not _same(c["rescale_betas_zero_snr"], False):
        raise _unsupported(where, "rescale_betas_zero_snr", c["rescale_betas_zero_snr"],
                           "diffcodec reads the plain schedules")
    config = DiffusionConfig(schedule=name, num_timesteps=t, var_type=var)
    problem = diffusion_config_problem(config)
    if problem is not None:
        raise DiffcodecError(f"{where}: {problem}")
    if name == "linear":
        betas = linear_betas(t)  # T <= MAX_TIMESTEPS: at most 800 kB
        start, end = _number(c, "beta_start", where), _number(c, "beta_end", where)
        if not (math.isclose(start, betas[0], rel_tol=1e-9) and math.isclose(end, betas[-1], rel_tol=1e-9)):
            raise _unsupported(where, "beta_start/beta_end", [start, end],
                               f"diffcodec's linear schedule at T = {t} is {betas[0]:.6g}..{betas[-1]:.6g}")
    return config


def source_shapes(config: ModelConfig, attn: list[bool], expected: dict[str, tuple[int, ...]]
                  ) -> dict[str, tuple[int, ...]]:
    """The diffusers tensors (names, shapes) whose renaming (`key_map`) gives the tensors
    ``expected`` of diffcodec's UNet: what the weights file must hold, exactly."""
    plain, attns = key_map(config, attn)
    shapes = {a: expected[b] for a, b in plain.items() if b in expected}  # conv_shortcut: only where widths change
    for a, b in attns.items():
        c = expected[f"{b}.norm.weight"][0]
        shapes |= {f"{a}.{p}.weight": (c, c) for p in ("to_q", "to_k", "to_v", "to_out.0")}
        shapes |= {f"{a}.{p}.bias": (c,) for p in ("group_norm", "to_q", "to_k", "to_v", "to_out.0")}
        shapes[f"{a}.group_norm.weight"] = (c,)
    return shapes


def read_weights(path: Path, needed: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The weights file's tensors, once their names, shapes and (floating-point) dtypes are
    those ``needed``; a safetensors file is compared from its header, before any tensor is read."""
    if path.suffix == ".safetensors":
        header = read_header(path)
        shapes = {name: shape for name, (_, shape) in header.items()}
        floating = {name: dtype.startswith(("F", "BF")) for name, (dtype, _) in header.items()}
    else:
        state = load_state_dict(path)
        shapes = {name: tuple(v.shape) for name, v in state.items()}
        floating = {name: v.is_floating_point() for name, v in state.items()}
    misfit = shapes_misfit(shapes, needed)
    not_floating = sorted(name for name, f in floating.items() if not f)
    if misfit is None and not_floating:
        misfit = f"{not_floating[0]} is not floating point"
    if misfit is not None:
        raise DiffcodecError(f"{path}: weights do not fit the config ({misfit})")
    return read_safetensors(path) if path.suffix == ".safetensors" else state


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
                       expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """diffusers' tensors (exactly `source_shapes`, as `read_weights` gives them) renamed, and
    attention projections joined, into `UNet`'s state dict, float32."""
    plain, attns = key_map(config, attn)
    src = {k: v.float() for k, v in state.items()}
    out = {b: src[a] for a, b in plain.items() if b in expected}
    for a, b in attns.items():
        out[f"{b}.norm.weight"], out[f"{b}.norm.bias"] = src[f"{a}.group_norm.weight"], src[f"{a}.group_norm.bias"]
        out[f"{b}.qkv.weight"] = torch.cat([src[f"{a}.{p}.weight"] for p in ("to_q", "to_k", "to_v")])[:, :, None, None]
        out[f"{b}.qkv.bias"] = torch.cat([src[f"{a}.{p}.bias"] for p in ("to_q", "to_k", "to_v")])
        out[f"{b}.proj.weight"] = src[f"{a}.to_out.0.weight"][:, :, None, None]
        out[f"{b}.proj.bias"] = src[f"{a}.to_out.0.bias"]
    return out


def read_diffusers_folder(folder: Path) -> tuple[ModelConfig, DiffusionConfig, dict[str, torch.Tensor], dict]:
    """(model config, diffusion config, state dict in diffcodec's names, meta) of a folder."""
    from diffcodec.unet import parameter_shapes

    unet_cfg_path, weights_path, sched_path = find_files(folder)
    model_config, attn = model_config_from_unet(read_json_object(unet_cfg_path), unet_cfg_path)
    diffusion_config = diffusion_config_from_scheduler(read_json_object(sched_path), sched_path)
    if model_config.learn_sigma != (diffusion_config.var_type == "learned_range"):
        raise DiffcodecError(f"{unet_cfg_path}: out_channels {model_config.out_channels} does not fit the scheduler's "
                             f"variance type {diffusion_config.var_type} (which needs "
                             f"{6 if diffusion_config.var_type == 'learned_range' else 3})")
    expected = parameter_shapes(model_config)
    state = read_weights(weights_path, source_shapes(model_config, attn, expected))
    state = to_diffcodec_state(state, model_config, attn, expected)
    meta = {"source": "diffusers", "weights": f"diffusers UNet2DModel ({weights_path.name})",
            "unet_config": str(unet_cfg_path), "scheduler_config": str(sched_path)}
    return model_config, diffusion_config, state, meta
