"""diffusers DDPM folders as diffcodec models (`diffcodec.external.diffusers`).

Small random ``UNet2DModel``s are built with diffusers and written with ``save_pretrained``
(no download), then loaded by diffcodec: the network is diffusers' own forward to float
tolerance, the bound is the one computed with diffusers' network passed in directly, both
codecs round-trip exactly under the exact arithmetic, a file made with one model is refused
by another, and bad folders are one-line errors.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import synthetic_images

from diffcodec import likelihood
from diffcodec.checkpoint import load_checkpoint
from diffcodec.cli import main
from diffcodec.codec import api
from diffcodec.codec.progressive.params import ProgressiveParams
from diffcodec.errors import DiffcodecError
from diffcodec.evaluate import model_schedule
from diffcodec.images import to_model_input
from diffcodec.runtime import network

diffusers = pytest.importorskip("diffusers", reason="the diffusers tests need pip install -e '.[diffusers]'")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The paper's CIFAR-10 layout, shrunk: single-head attention at the second level, GroupNorm
# eps 1e-6, the stride-2 convolution padded at the end (downsample_padding=0), [sin, cos].
PAPER_LIKE = dict(sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_eps=1e-6,
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None)
PAPER_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large")
# Another mapping: four heads, symmetric padding, eps 1e-5, diffusers' default embedding ([cos,
# sin], freq_shift 0), learned variances, cosine schedule.
LEARNED = dict(PAPER_LIKE, attention_head_dim=16, downsample_padding=1, norm_eps=1e-5, out_channels=6,
               flip_sin_to_cos=True, freq_shift=0)
LEARNED_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range")


def random_unet(config: dict, seed: int, scale: float = 0.1):
    """A UNet2DModel with every parameter random (the zero-initialised ones too)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.eval()


def write_pipeline(folder, unet, scheduler: dict):
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(**scheduler).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def paper_like(tmp_path_factory):
    unet = random_unet(PAPER_LIKE, 0)
    return unet, write_pipeline(tmp_path_factory.mktemp("paper_like"), unet, PAPER_SCHEDULER)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    unet = random_unet(LEARNED, 1)
    return unet, write_pipeline(tmp_path_factory.mktemp("learned"), unet, LEARNED_SCHEDULER)


def diffusers_fn(unet):
    return lambda x, t: unet(x.float(), t).sample


@pytest.mark.parametrize("which", ["paper_like", "learned"])
def test_noise_predictions_equal_diffusers_own_forward(which, request):
    unet, folder = request.getfixturevalue(which)
    loaded = load_checkpoint(folder)
    mc, dc = loaded.model_config, loaded.diffusion_config
    if which == "paper_like":
        assert (mc.norm_eps, mc.downsample_padding, mc.num_heads, mc.learn_sigma) == (1e-6, "end", 1, False)
        assert mc.time_embedding == "ddpm"
        assert (dc.schedule, dc.num_timesteps, dc.var_type) == ("linear", 1000, "fixedlarge")
    else:
        assert (mc.norm_eps, mc.downsample_padding, mc.num_heads, mc.learn_sigma) == (1e-5, "symmetric", 4, True)
        assert mc.time_embedding == "improved"
        assert (dc.schedule, dc.num_timesteps, dc.var_type) == ("cosine", 1000, "learned_range")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        want, got = unet(x, t).sample, loaded.model(x, t)
    assert want.abs().max() > 0.1  # random weights (zero-initialised layers too): every layer shapes it
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_exact_network_of_a_diffusers_model_is_diffusers_forward_to_float_tolerance(paper_like):
    """The portable path covers diffusers models: `exact_network` swaps every layer of the
    loaded UNet (end-padded downsampling and eps 1e-6 included), and still computes diffusers'
    function."""
    from diffcodec.exact_net import exact_network

    unet, folder = paper_like
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)), torch.tensor([1, 850])
    with torch.no_grad():
        got, want = exact_network(load_checkpoint(folder).model)(x, t), unet(x, t).sample
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


def test_the_mapping_is_not_loose(paper_like, tmp_path):
    """The same weights read with the other downsampling padding give another function: the
    comparison above can fail."""
    unet, folder = paper_like
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "config.json").write_text(json.dumps(dict(cfg, downsample_padding=1)))
    (other / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    (other / "scheduler").mkdir()
    sched = "scheduler/scheduler_config.json"
    (other / sched).write_text((folder / sched).read_text())
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)), torch.tensor([3, 700])
    with torch.no_grad():
        assert (load_checkpoint(other).model(x, t) - unet(x, t).sample).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["paper_like", "learned"])
def test_bound_terms_equal_those_of_diffusers_network_passed_in(which, request):
    unet, folder = request.getfixturevalue(which)
    loaded = load_checkpoint(folder)
    schedule = model_schedule(loaded, 6)
    x0 = to_model_input(np.stack(synthetic_images([(16, 16)] * 3, seed=2)))
    kw = dict(var_type=loaded.diffusion_config.var_type)
    with torch.no_grad():
        ours = likelihood.bound_bits(network(loaded.model), schedule, x0, generator=torch.Generator().manual_seed(9),
                                     **kw)
        theirs = likelihood.bound_bits(diffusers_fn(unet), schedule, x0,
                                       generator=torch.Generator().manual_seed(9), **kw)
    assert ours.terms_bits.shape == (3, 6)
    np.testing.assert_allclose(ours.terms_bits, theirs.terms_bits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours.prior_bits, theirs.prior_bits, rtol=1e-12)


def test_lossless_and_progressive_round_trips_are_exact_and_other_models_refused(paper_like, learned):
    loaded, other = load_checkpoint(paper_like[1]), load_checkpoint(learned[1])
    assert loaded.fingerprint != other.fingerprint
    images = synthetic_images([(16, 16), (16, 32)], seed=4)
    lossless = api.encode(images, ["a", "b"], model=loaded, steps=3, bootstrap=False)
    assert lossless.header.contract > 0 and lossless.header.fingerprint == loaded.fingerprint  # the exact path
    back = api.decode(lossless.data, model=load_checkpoint(paper_like[1]), device="cpu")
    assert back.names == ["a", "b"] and all(np.array_equal(x, y) for x, y in zip(back.images, images))

    params = ProgressiveParams(num_steps=3, chunk_bits=6.0, log2_candidates=10)
    progressive = api.encode(images, model=loaded, mode="progressive", progressive_params=params, workers=1)
    assert progressive.header.contract > 0
    full = api.decode(progressive.data, model=loaded, device="cpu")
    assert full.verified and all(np.array_equal(x, y) for x, y in zip(full.images, images))
    for data in (lossless.data, progressive.data):
        with pytest.raises(DiffcodecError, match="encoded with model [0-9a-f]{8}, this checkpoint is [0-9a-f]{8} "):
            api.decode(data, model=other, device="cpu")


def test_fingerprint_names_the_weights_and_the_configs(paper_like, tmp_path):
    """Same weights, another scheduler (fixed_small): another model, another fingerprint."""
    _, folder = paper_like
    first = load_checkpoint(folder)
    assert load_checkpoint(folder).fingerprint == first.fingerprint
    copy = tmp_path / "copy"
    (copy / "unet").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (copy / "unet" / name).write_bytes((folder / "unet" / name).read_bytes())
    (copy / "unet" / "scheduler_config.json").write_text(
        json.dumps(dict(PAPER_SCHEDULER, variance_type="fixed_small")))
    bare = load_checkpoint(copy / "unet")  # a bare UNet folder with its scheduler config beside it
    assert bare.diffusion_config.var_type == "fixedsmall" and bare.fingerprint != first.fingerprint


def test_a_config_field_added_later_at_its_default_keeps_the_fingerprint(paper_like, monkeypatch):
    """Fields at their defaults are not hashed: files coded with an external model stay
    decodable when ModelConfig grows a field whose default is the old behaviour."""
    import dataclasses

    from diffcodec import external

    loaded = load_checkpoint(paper_like[1])
    real = external.config_to_dict

    def grown(config):
        d = real(config)
        return d | {"a_new_field": 7} if dataclasses.is_dataclass(config) else d

    monkeypatch.setattr(external, "config_to_dict", grown)
    assert load_checkpoint(paper_like[1]).fingerprint == loaded.fingerprint


def test_cli_nll_encode_decode_with_a_diffusers_folder(paper_like, tmp_path, capsys):
    from PIL import Image

    _, folder = paper_like
    images = synthetic_images([(16, 16)], seed=8)
    png = tmp_path / "a.png"
    Image.fromarray(images[0]).save(png)
    assert main(["nll", str(png), "--checkpoint", str(folder), "--steps", "4", "--device", "cpu", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fingerprint"] == load_checkpoint(folder).fingerprint and report["var_type"] == "fixedlarge"
    assert np.isfinite(report["bits_per_dim"]) and report["bits_per_dim"] > 0
    out = tmp_path / "a.dfc"
    assert main(["encode", str(png), "-o", str(out), "--checkpoint", str(folder), "--steps", "3", "--lossless",
                 "--no-bootstrap",
                 "--device", "cpu", "--quiet"]) == 0
    assert main(["decode", str(out), "-o", str(tmp_path / "b.png"), "--checkpoint", str(folder), "--device", "cpu",
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), images[0])


def test_bench_nll_and_figure_5_with_a_diffusers_folder(paper_like, tmp_path, images_npz):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives beside the package
    from bench import nll as bench_nll
    from bench import plot as bench_plot

    reports = tmp_path / "reports"
    reports.mkdir()
    assert bench_nll.main([str(images_npz), "-c", str(paper_like[1]), "-n", "2", "--steps", "4,2",
                           "--out", str(reports / "nll.json"), "-q"]) == 0
    report = json.loads((reports / "nll.json").read_text())
    assert json.dumps(report).count(load_checkpoint(paper_like[1]).fingerprint) >= 1
    assert bench_plot.main(["--reports", str(reports)]) == 0
    assert (reports / "figure5.png").stat().st_size > 0


# google/ddpm-cifar10-32's unet/config.json (the keys diffusers 0.24 writes for it).
GOOGLE_DDPM_CIFAR10_UNET = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "add_attention": True, "attention_head_dim": None,
    "attn_norm_num_groups": None, "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "class_embed_type": None, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "downsample_type": "conv", "dropout": 0.0, "flip_sin_to_cos": False, "freq_shift": 1,
    "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "num_class_embeds": None, "num_train_timesteps": None, "out_channels": 3, "resnet_time_scale_shift": "default",
    "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "upsample_type": "conv",
}


def test_the_papers_cifar10_model_as_diffusers_publishes_it_is_diffcodecs_paper_preset(tmp_path):
    """google/ddpm-cifar10-32 is `preset("ddpm-cifar10")` with GroupNorm eps 1e-6 and end-padded
    downsampling: 35,746,307 parameters, as diffusers' own UNet2DModel of that config (built on
    the meta device: no memory, no weights). The full-size forward was also compared once, with
    random weights through save_pretrained: max difference 3e-8 on outputs of 0.1."""
    import dataclasses

    from diffcodec.config import preset
    from diffcodec.external.diffusers import model_config_from_unet
    from diffcodec.unet import UNet, num_parameters

    config, attn = model_config_from_unet(GOOGLE_DDPM_CIFAR10_UNET, tmp_path / "config.json")
    paper = preset("ddpm-cifar10")[0]
    assert config == dataclasses.replace(paper, dropout=0.0, norm_eps=1e-6, downsample_padding="end")
    assert attn == [False, True, False, False]
    with torch.device("meta"):
        ours = num_parameters(UNet(config))
        theirs = num_parameters(diffusers.UNet2DModel(**{k: v for k, v in GOOGLE_DDPM_CIFAR10_UNET.items()
                                                          if not k.startswith("_")}))
    assert ours == theirs == 35_746_307


# ------------------------------------------------------------------ bad folders: one line each


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for k, v in list(data.items()):
        if v is _DELETE:
            del data[k]
    path.write_text(json.dumps(data))


_DELETE = object()


def _copy(folder, dest):
    for sub in ("unet", "scheduler"):
        (dest / sub).mkdir(parents=True)
        for f in (folder / sub).iterdir():
            (dest / sub / f.name).write_bytes(f.read_bytes())
    return dest


BAD = {
    "missing scheduler file": (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), "no scheduler config"),
    "unknown beta schedule": (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", beta_schedule="sigmoid"),
                              'unsupported beta_schedule="sigmoid" (diffcodec reads linear, squaredcos_cap_v2)'),
    "no variance type": (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", variance_type=_DELETE),
                         "no variance_type"),
    "other linear range": (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", beta_end=0.012),
                           "unsupported beta_start/beta_end"),
    "v prediction": (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"),
                     "unsupported prediction_type"),
    "no clipping": (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", clip_sample=False),
                    "unsupported clip_sample"),
    "learned variance, 3 channels": (
        lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", variance_type="learned_range"),
        "out_channels 3 does not fit the scheduler's variance type learned_range"),
    "wrong channel counts": (lambda d: _edit_json(d / "unet" / "config.json", block_out_channels=[64, 64]),
                             "weights do not fit the config"),
    "class-conditional": (lambda d: _edit_json(d / "unet" / "config.json", num_class_embeds=10),
                          "class-conditional model needs its label"),
    "other embedding": (lambda d: _edit_json(d / "unet" / "config.json", freq_shift=0),
                        "unsupported flip_sin_to_cos/freq_shift"),
    "scale-shift norm": (lambda d: _edit_json(d / "unet" / "config.json", resnet_time_scale_shift="scale_shift"),
                         "unsupported resnet_time_scale_shift"),
    "no attention_head_dim": (lambda d: _edit_json(d / "unet" / "config.json", attention_head_dim=_DELETE),
                               "no attention_head_dim"),
    "broken json": (lambda d: (d / "unet" / "config.json").write_text("{"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_one_line_errors(case, paper_like, tmp_path, images_npz, capsys):
    folder = _copy(paper_like[1], tmp_path / "m")
    edit, message = BAD[case]
    edit(folder)
    assert main(["nll", str(images_npz), "--checkpoint", str(folder), "-n", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and message in lines[0], err


def test_a_pickle_that_would_run_code_is_refused_without_running_it(paper_like, tmp_path):
    folder = _copy(paper_like[1], tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "the_pickle_ran"
    payload = pickle.dumps({"conv_in.weight": _RunsCode(marker)}, protocol=2)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)
    with pytest.raises(DiffcodecError, match="refused: the state dict holds Python objects") as e:
        load_checkpoint(folder)
    assert "\n" not in str(e.value) and not marker.exists()


def test_a_bin_state_dict_loads_like_the_safetensors_file(paper_like, tmp_path):
    unet, folder = paper_like
    copy = _copy(folder, tmp_path / "m")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), copy / "unet" / "diffusion_pytorch_model.bin")
    a, b = load_checkpoint(folder), load_checkpoint(copy)
    assert a.fingerprint == b.fingerprint


def test_a_truncated_safetensors_file_is_a_one_line_error(paper_like, tmp_path):
    folder = _copy(paper_like[1], tmp_path / "m")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DiffcodecError, match="not a valid safetensors file") as e:
        load_checkpoint(folder)
    assert "\n" not in str(e.value)


def test_the_hand_written_tiny_folder_is_what_diffusers_reads(tmp_path):
    """`tests.hostile` writes its valid folder without diffusers (so that the hostile-file and
    fuzz tests run in a process without it): diffusers' own classes read it, and its network
    computes what diffcodec loads."""
    from tests.hostile import write_tiny_diffusers_folder

    folder = write_tiny_diffusers_folder(tmp_path / "m")
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    assert (scheduler.config.num_train_timesteps, scheduler.config.variance_type) == (1000, "fixed_large")
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([5, 900])
    with torch.no_grad():
        want, got = unet(x, t).sample, load_checkpoint(folder).model(x, t)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
