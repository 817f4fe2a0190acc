"""Models diffcodec did not train, loaded into diffcodec's own `unet.UNet`.

An external model is read (configs as JSON, weights from safetensors or torch's
``weights_only`` loading: nothing in the files runs), translated into a `ModelConfig`, a
`DiffusionConfig` and a state dict in diffcodec's parameter names, and returned as the same
`checkpoint.LoadedModel` as a diffcodec checkpoint, so the bound, both codecs, the exact
network and the benchmarks run on it through the same functions. Anything the translation
cannot express exactly is a one-line `DiffcodecError`, never an approximation.

- `diffusers`: a diffusers DDPM folder (``UNet2DModel`` + ``DDPMScheduler`` configs).
- `improved_diffusion`: an Improved DDPM state dict with its flags in ``MODEL.pt.flags``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffcodec.config import DiffusionConfig, ModelConfig, config_to_dict
from diffcodec.errors import DiffcodecError
from diffcodec.torch_files import load_plain


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict read with torch's ``weights_only`` loading: plain containers and
    tensors only, so a pickle that would run code (or build any other object) is refused."""
    state = load_plain(path, "state dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DiffcodecError(f"{path}: not a state dict of named tensors")
    return state


def identity_tensors(model_config: ModelConfig, diffusion_config: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The two configs as byte tensors under a name no parameter has: hashed with the weights,
    so an external model's fingerprint names its architecture and diffusion too. Fields at
    their defaults are left out, so a field added later (default = the old behaviour) does not
    change the fingerprint of models, or the files coded with them."""

    def non_default(config: ModelConfig | DiffusionConfig) -> dict:
        defaults = config_to_dict(type(config)())
        return {k: v for k, v in config_to_dict(config).items() if v != defaults[k]}

    text = json.dumps({"model": non_default(model_config), "diffusion": non_default(diffusion_config)},
                      sort_keys=True)
    return {"@configs": torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)}
