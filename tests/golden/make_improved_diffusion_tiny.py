"""Write tests/golden/improved_diffusion_tiny.npz: a seeded tiny Improved DDPM UNetModel's
parameter names and shapes and its outputs, computed by THEIR code (openai/improved-diffusion,
checked out beside this project and never copied into it):

    git clone https://github.com/openai/improved-diffusion /tmp/idref
    PYTHONPATH=/tmp/idref:. python tests/golden/make_improved_diffusion_tiny.py

Weights and inputs come from `seeded_words` (SplitMix64: the same on every machine), so the
test rebuilds the same state dict from the stored names and shapes alone. The model is their
``UNetModel`` as ``create_model`` would build it from FLAGS (with channel_mult 1,2 at 8x8).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffcodec.codec.entropy import seeded_words

FLAGS = ("--image_size 8 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 "
         "--num_heads 2 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine")
TIMESTEPS = (7, 3001)  # code steps of the T = 4000 chain; the network sees t 1000 / 4000 (rescale_timesteps)
OUT = Path(__file__).with_name("improved_diffusion_tiny.npz")


def uniform(n: int, seed: int) -> np.ndarray:
    """n values in [-1, 1) from seeded_words."""
    return seeded_words(n, seed).astype(np.float64) / 2.0**31 - 1.0


def seeded_state(names_shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Parameter i (in sorted name order): uniform(-1, 1) / sqrt(fan_in) for weights, 0.2 u
    for biases, 1 + 0.2 u for normalisation scales."""
    state = {}
    for i, (name, shape) in enumerate(sorted(names_shapes)):
        u = uniform(int(np.prod(shape)), 7000 + i).reshape(shape)
        if len(shape) > 1:
            u = u * 1.5 / math.sqrt(int(np.prod(shape[1:])))
        elif ".norm" in name or "layers.0." in name or name.startswith("out.0"):
            u = 1.0 + 0.2 * u if name.endswith("weight") else 0.2 * u
        else:
            u = 0.2 * u
        state[name] = torch.from_numpy(u.astype(np.float32))
    return state


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(uniform(2 * 3 * 8 * 8, 99).astype(np.float32).reshape(2, 3, 8, 8))
    return x, torch.tensor(TIMESTEPS)


def main() -> None:
    from improved_diffusion.unet import UNetModel  # their code, from PYTHONPATH

    model = UNetModel(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
                      dropout=0.0, channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True).eval()
    names_shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(seeded_state(names_shapes), strict=True)
    x, t = inputs()
    with torch.no_grad():
        out = model(x, t.float() * (1000.0 / 4000))  # their GaussianDiffusion._scale_timesteps
    np.savez_compressed(OUT, names=np.array([n for n, _ in names_shapes]),
                        shapes=np.array([",".join(map(str, s)) for _, s in names_shapes]),
                        output=out.numpy().astype(np.float32), flags=np.array(FLAGS))
    print(f"wrote {OUT}: {len(names_shapes)} tensors, output {tuple(out.shape)}, |max| {out.abs().max():.4f}")


if __name__ == "__main__":
    main()
