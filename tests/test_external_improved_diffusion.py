"""Improved DDPM checkpoints (`diffcodec.external.improved_diffusion`): a state dict of their
``UNetModel`` plus its flags in ``MODEL.pt.flags``, loaded into diffcodec's UNet.

Checked against their reference implementation (openai/improved-diffusion at 1bc7bbb, run
beside the project, never copied in): `tests/golden/improved_diffusion_tiny.npz` holds the
parameter names and shapes of a tiny ``UNetModel`` (8x8, channels 32/64, 2-head attention at
4x4, scale-shift norm, learned sigmas, T = 4000 with rescaled timesteps) and THEIR outputs
with weights set from seeded words, written by

    PYTHONPATH=/tmp/idref:. python tests/golden/make_improved_diffusion_tiny.py

The test rebuilds the same state dict from the stored names and shapes, loads it through
``--checkpoint``, and must reproduce their outputs. Also compared once at full size (the
released CIFAR-10 flags, ``--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma
True --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine``, random weights): their
``create_model`` and diffcodec both have 52,546,438 parameters, outputs equal to 2e-8 on a
scale of 0.1.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_images

from diffcodec.checkpoint import load_checkpoint
from diffcodec.cli import main
from diffcodec.codec import api
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_improved_diffusion_tiny import TIMESTEPS, inputs, seeded_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN = np.load(Path(__file__).parent / "golden" / "improved_diffusion_tiny.npz")
FLAGS = str(GOLDEN["flags"])


def write_model(folder: Path, flags: str = FLAGS, state: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names_shapes = [(str(n), tuple(int(d) for d in s.split(","))) for n, s in zip(GOLDEN["names"], GOLDEN["shapes"])]
    path = folder / "model.pt"
    torch.save(state if state is not None else seeded_state(names_shapes), path)
    (folder / "model.pt.flags").write_text(flags)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("improved"))


def test_their_state_dict_loads_and_gives_their_outputs(tiny):
    loaded = load_checkpoint(tiny)
    mc, dc = loaded.model_config, loaded.diffusion_config
    assert (mc.time_embedding, mc.timestep_scale, mc.scale_shift_norm, mc.num_heads) == ("improved", 0.25, True, 2)
    assert (dc.schedule, dc.num_timesteps, dc.var_type) == ("cosine", 4000, "learned_range")
    x, t = inputs()
    assert t.tolist() == list(TIMESTEPS)
    with torch.no_grad():
        got = loaded.model(x, t)  # original timesteps: the model scales them by 1000 / T itself
    want = torch.from_numpy(GOLDEN["output"])
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_the_exact_network_covers_it(tiny):
    from diffcodec.exact_net import exact_network

    x, t = inputs()
    with torch.no_grad():
        got = exact_network(load_checkpoint(tiny).model)(x, t)
    torch.testing.assert_close(got.float(), torch.from_numpy(GOLDEN["output"]), rtol=1e-4, atol=1e-4)


def test_the_exact_network_gives_the_same_bits_alone_in_any_batch_order(tiny):
    """Scale-shift norm, the [cos, sin] embedding and the timestep scale keep the exact
    network's promise: an image's output bits do not depend on the batch around it."""
    from diffcodec.exact_net import exact_network

    net = exact_network(load_checkpoint(tiny).model)
    x = torch.from_numpy(np.linspace(-1, 1, 6 * 3 * 8 * 8, dtype=np.float32).reshape(6, 3, 8, 8) ** 3)
    t = torch.tensor([0, 1, 999, 2000, 3998, 3999])
    with torch.no_grad():
        batch = net(x, t).numpy()
        reversed_ = net(x.flip(0), t.flip(0)).numpy()[::-1]
        alone = np.concatenate([net(x[i:i + 1], t[i:i + 1]).numpy() for i in range(6)])
    assert batch.tobytes() == np.ascontiguousarray(reversed_).tobytes() == alone.tobytes()


@pytest.mark.parametrize("change", ["--num_heads 1", "--use_scale_shift_norm False --num_heads 2",
                                    "--rescale_timesteps False"])
def test_the_comparison_can_fail(tmp_path, change):
    """One flag wrong (head layout, scale-shift, timestep scaling): their outputs are not
    reproduced, or the weights do not fit."""
    path = write_model(tmp_path, FLAGS.replace("--num_heads 2", "") + " " + change)
    x, t = inputs()
    try:
        model = load_checkpoint(path).model
    except DiffcodecError as e:
        assert "weights do not fit the flags" in str(e)
        return
    with torch.no_grad():
        assert (model(x, t) - torch.from_numpy(GOLDEN["output"])).abs().max() > 1e-3


def test_round_trips_are_exact_and_other_models_refused(tiny, tmp_path):
    loaded = load_checkpoint(tiny)
    images = synthetic_images([(8, 8), (8, 16)], seed=5)
    lossless = api.encode(images, model=loaded, steps=3, bootstrap=False)
    assert lossless.header.contract > 0
    back = api.decode(lossless.data, model=load_checkpoint(tiny), device="cpu")
    assert all(np.array_equal(x, y) for x, y in zip(back.images, images))
    params = ProgressiveParams(num_steps=3, chunk_bits=6.0, log2_candidates=10)
    progressive = api.encode(images, model=loaded, mode="progressive", progressive_params=params, workers=1)
    full = api.decode(progressive.data, model=loaded, device="cpu")
    assert full.verified and all(np.array_equal(x, y) for x, y in zip(full.images, images))
    other = load_checkpoint(write_model(tmp_path, FLAGS.replace("--noise_schedule cosine", "--noise_schedule linear")))
    assert other.fingerprint != loaded.fingerprint  # same weights, another schedule: another model
    with pytest.raises(DiffcodecError, match="encoded with model [0-9a-f]{8}, this checkpoint is [0-9a-f]{8} "):
        api.decode(lossless.data, model=other, device="cpu")


def test_cli_nll_with_an_improved_diffusion_checkpoint(tiny, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "a.png"
    Image.fromarray(synthetic_images([(8, 8)], seed=1)[0]).save(png)
    assert main(["nll", str(png), "--checkpoint", str(tiny), "--steps", "4", "--device", "cpu", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_timesteps"] == 4000 and report["var_type"] == "learned_range"
    assert report["fingerprint"] == load_checkpoint(tiny).fingerprint and np.isfinite(report["bits_per_dim"])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


BAD = {
    "no diffusion_steps": (FLAGS.replace("--diffusion_steps 4000", ""), "no --diffusion_steps"),
    "unknown flag": (FLAGS + " --use_fp16 True", "unknown flag --use_fp16"),
    "bad bool": (FLAGS.replace("--learn_sigma True", "--learn_sigma maybe"),
                 "--learn_sigma must be true or false, got 'maybe'"),
    "class-conditional": (FLAGS + " --class_cond True", "class-conditional model needs its label"),
    "x0 prediction": (FLAGS + " --predict_xstart True", "unsupported --predict_xstart"),
    "unknown schedule": (FLAGS.replace("cosine", "sqrt"), "unsupported --noise_schedule 'sqrt'"),
    "wrong channel counts": (FLAGS.replace("--num_channels 32", "--num_channels 64"), "weights do not fit the flags"),
    "no learned sigmas": (FLAGS.replace("--learn_sigma True", "--learn_sigma False"), "weights do not fit the flags"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_flags_are_one_line_errors(case, tmp_path, images_npz, capsys):
    flags, message = BAD[case]
    path = write_model(tmp_path, flags)
    assert main(["nll", str(images_npz), "--checkpoint", str(path), "-n", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and message in lines[0], err


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "the_pickle_ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"time_embed.0.weight": _RunsCode(marker)}, protocol=2))
    (tmp_path / "model.pt.flags").write_text(FLAGS)
    with pytest.raises(DiffcodecError, match="refused: the state dict holds Python objects") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and not marker.exists()
