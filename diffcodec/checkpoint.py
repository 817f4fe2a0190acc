"""Checkpoints: weights + the two config records + a fingerprint of the weights.

File layout (``torch.save`` of a dict of tensors and plain Python values, loaded with
``weights_only=True`` so that loading never runs code from the file):

    format            "diffcodec-checkpoint"
    version           1
    model_config      ModelConfig as a dict
    diffusion_config  DiffusionConfig as a dict
    state_dict        the network's tensors (the shipped model stores fp16 EMA weights)
    fingerprint       fingerprint(state_dict): 16 hex digits
    meta              a JSON-like dict: preset, training steps, which weights (EMA/raw), ...

The fingerprint is the first 16 hex digits of SHA-256 over the tensors in sorted name order
(name, dtype, shape, raw bytes). Coded files record it, so a decoder can refuse a file that
was written with other weights.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcodec.config import DiffusionConfig, ModelConfig, config_from_dict, config_to_dict, show
from diffcodec.errors import DiffcodecError
from diffcodec.torch_files import load_plain
from diffcodec.unet import UNet, parameter_shapes

FORMAT = "diffcodec-checkpoint"
VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "default.pt"


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LoadedModel:
    model: UNet  # float32, eval mode, on the requested device
    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    fingerprint: str
    meta: dict[str, Any]
    path: str


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    model_config: ModelConfig,
    diffusion_config: DiffusionConfig,
    *,
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write a checkpoint atomically; ``dtype=torch.float16`` stores half-precision weights.

    Returns the fingerprint of the stored weights.
    """
    state = {k: (v.detach().cpu().to(dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    fp = fingerprint(state)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": config_to_dict(model_config),
        "diffusion_config": config_to_dict(diffusion_config),
        "state_dict": state,
        "fingerprint": fp,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return fp


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """The user's checkpoint path, or the embedded default model."""
    if path is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise DiffcodecError(f"no default model is installed at {DEFAULT_CHECKPOINT}; pass --checkpoint")
        return DEFAULT_CHECKPOINT
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The validated payload dict of a checkpoint file (no network built)."""
    path = Path(path)
    if not path.exists():
        raise DiffcodecError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise DiffcodecError(f"{path}: checkpoint is not a file")
    payload = load_plain(path, "diffcodec checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DiffcodecError(f"{path}: not a diffcodec checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise DiffcodecError(f"{path}: checkpoint version {payload.get('version')!r}; this diffcodec reads {VERSION}")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiffcodecError(f"{path}: checkpoint has no valid state_dict")
    if fingerprint(state) != payload.get("fingerprint"):
        raise DiffcodecError(f"{path}: weights do not match the checkpoint's fingerprint (corrupt file?)")
    return payload


def tensor_name(name: str) -> str:
    """A tensor's name from a file, for a one-line message: as it is when it is short printable
    ASCII, else quoted and escaped (a name may hold a newline)."""
    return name if name.isascii() and name.isprintable() and len(name) <= 80 else show(name, 80)


def shapes_misfit(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> str | None:
    """How the tensor shapes ``have`` differ from ``want`` (a name missing, one unexpected, a
    shape), or None."""
    missing = sorted(set(want) - set(have))
    if missing:
        return f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    unexpected = sorted(set(have) - set(want))
    if unexpected:
        return (f"unexpected {tensor_name(unexpected[0])}"
                + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for name in sorted(want):
        if tuple(have[name]) != want[name]:
            return f"{name} is {list(have[name])}, the config needs {list(want[name])}"
    return None


def weights_misfit(model_config: ModelConfig, state: dict[str, torch.Tensor]) -> str | None:
    """How ``state`` differs from the tensors of ``UNet(model_config)`` (names and shapes), or None.

    The network is built on the meta device (shapes only, no memory), after
    `config.model_config_problem` has bounded its size.
    """
    return shapes_misfit({k: tuple(v.shape) for k, v in state.items()}, parameter_shapes(model_config))


def build_model(model_config: ModelConfig, state: dict[str, torch.Tensor], where: str,
                device: torch.device | str = "cpu") -> UNet:
    """``UNet(model_config)`` holding ``state`` (float32, eval mode, on ``device``); a misfit or
    non-finite weights are one-line errors. The UNet is made without weights (on torch's meta
    device) and takes the state's tensors themselves: no random initialisation to overwrite,
    no second copy of the weights (34 MiB less resident memory for the default model)."""
    state = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    misfit = weights_misfit(model_config, state)
    if misfit is not None:
        raise DiffcodecError(f"{where}: weights do not fit the model config ({misfit})")
    with torch.device("meta"):
        model = UNet(model_config)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor no state names
        raise DiffcodecError(f"{where}: the model holds tensors its weights do not give")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DiffcodecError(f"{where}: checkpoint holds non-finite weights")
    return model.to(device).eval()


def load_checkpoint(path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a checkpoint (the embedded default when path is None) as a float32 eval-mode UNet.

    ``path`` may also be a diffusers DDPM folder (`external.diffusers`), or an improved-diffusion
    state dict with its flags beside it in ``PATH.flags`` (`external.improved_diffusion`): their
    weights are loaded into the same UNet, and the fingerprint hashes them with both configs."""
    path = resolve_checkpoint(path)
    external = None
    if path.is_dir():
        from diffcodec.external.diffusers import is_diffusers_folder, read_diffusers_folder

        if not is_diffusers_folder(path):
            raise DiffcodecError(f"{path}: a folder, but not a diffusers model folder (no unet/config.json or "
                                 "config.json); --checkpoint takes a diffcodec checkpoint file or a diffusers folder")
        external = read_diffusers_folder(path)
    else:
        from diffcodec.external.improved_diffusion import read_improved_diffusion, sidecar_path

        flags = sidecar_path(path)
        if flags.exists() or flags.is_symlink():  # a folder or a broken link too: said in one line, no fallback
            external = read_improved_diffusion(path)
    if external is not None:
        from diffcodec.external import identity_tensors

        model_config, diffusion_config, state, meta = external
        model = build_model(model_config, state, str(path), device)
        fp = fingerprint(state | identity_tensors(model_config, diffusion_config))
        return LoadedModel(model, model_config, diffusion_config, fp, meta, str(path))
    payload = read_checkpoint(path)
    model_config = config_from_dict(ModelConfig, payload["model_config"], where=str(path))
    diffusion_config = config_from_dict(DiffusionConfig, payload["diffusion_config"], where=str(path))
    model = build_model(model_config, payload["state_dict"], str(path), device)
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    return LoadedModel(model, model_config, diffusion_config, payload["fingerprint"], meta, str(path))
