"""Training: losses, the importance sampler, time box, exact resume, --init, test-data refusal.

Everything runs on the CPU with the "tiny" presets and synthetic images written to tmp.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcodec.checkpoint import load_checkpoint, read_checkpoint
from diffcodec.cli import main
from diffcodec.config import DiffusionConfig, ModelConfig, preset
from diffcodec.diffusion import q_sample
from diffcodec.errors import DiffcodecError
from diffcodec.schedule import make_schedule
from diffcodec.train import train, training_source
from diffcodec.train_config import lr_at, make_train_config
from diffcodec.train_losses import ImportanceSampler, training_losses
from diffcodec.trainer import Trainer, read_state


def write_shards(folder: Path, n: int = 32, name: str = "train_00000.npz", seed: int = 0) -> Path:
    """n smooth-ish synthetic 32x32 RGB images in one .npz shard."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    x = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
    np.savez(folder / name, x=x, y=np.zeros(n, dtype=np.int64))
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("cifar") / "train")


def images_tensor(n: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return torch.from_numpy(np.repeat(np.repeat(base, 8, axis=1), 8, axis=2))


def quiet(_line: str) -> None:
    pass


# ------------------------------------------------------------------------------ losses


def learned_output(batch: int, seed: int = 0) -> tuple:
    s = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (batch, 3, 8, 8), generator=g).float() / 127.5 - 1.0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 500, 999, 0, 3, 250][:batch])
    x_t = q_sample(s, x0, t, noise)
    output = torch.cat([noise + 0.3 * torch.randn(x0.shape, generator=g),
                        torch.rand(x0.shape, generator=g) * 2 - 1], dim=1).requires_grad_(True)
    return s, x0, x_t, t, noise, output


def test_hybrid_vlb_term_reaches_only_the_variance_channels():
    s, x0, x_t, t, noise, output = learned_output(8)
    losses = training_losses(s, output, x0, x_t, t, noise, loss="hybrid", var_type="learned_range")
    assert torch.isfinite(losses["loss"]).all() and torch.isfinite(losses["vb_bpd"]).all()
    assert (losses["vb_bpd"] > 0).all()
    # the L_vlb part alone: no gradient to eps (stop-gradient on the mean), some to v
    (losses["loss"] - losses["mse"]).sum().backward()
    assert torch.isfinite(output.grad).all()
    assert output.grad[:, :3].abs().max() == 0
    assert output.grad[:, 3:].abs().max() > 0
    # and it is the lambda * T-weighted L_t in bits/dim
    assert torch.allclose(losses["loss"] - losses["mse"], 0.001 * 1000 * losses["vb_bpd"])


def test_training_lt_equals_the_bound_term_row_by_row():
    """train_losses.vb_terms_bpd (both branches for every row, masked) is likelihood.vb_term_bits
    (x^_0 unclipped) per dimension, for decoder rows (t = 0) and KL rows in one batch, and
    its gradient stays finite when one row is pushed to an extreme."""
    from diffcodec.likelihood import vb_term_bits
    from diffcodec.train_losses import vb_terms_bpd

    s, x0, x_t, t, noise, output = learned_output(8)
    got = vb_terms_bpd(s, output, x0, x_t, t, var_type="learned_range")
    want, _ = vb_term_bits(s, output.detach(), x0, x_t, t, var_type="learned_range", clip_denoised=False)
    assert torch.allclose(got.double(), want / x0[0].numel(), rtol=1e-5)
    extreme = output.detach().clone()
    extreme[1, :3] = 1e4  # a wild eps on a KL row: its decoder branch must not poison the gradient
    extreme.requires_grad_(True)
    vb_terms_bpd(s, extreme, x0, x_t, t, var_type="learned_range").sum().backward()
    assert torch.isfinite(extreme.grad).all()


def test_vlb_loss_trains_the_mean_too():
    s, x0, x_t, t, noise, output = learned_output(8)
    losses = training_losses(s, output, x0, x_t, t, noise, loss="vlb", var_type="learned_range")
    losses["loss"].sum().backward()
    assert torch.isfinite(output.grad).all()
    assert output.grad[:, :3].abs().max() > 0 and output.grad[:, 3:].abs().max() > 0


def test_simple_loss_is_the_eps_mse():
    s, x0, x_t, t, noise, output = learned_output(4)
    eps = output[:, :3].detach()
    losses = training_losses(s, eps, x0, x_t, t, noise, loss="simple", var_type="fixedlarge")
    assert torch.allclose(losses["loss"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))


def test_hybrid_refused_for_fixed_variances():
    with pytest.raises(DiffcodecError, match="hybrid"):
        make_train_config("tiny", loss="hybrid")


def test_warmup_is_linear_then_constant():
    c = make_train_config("tiny", lr=1e-3, warmup_steps=10)
    assert lr_at(c, 0) == pytest.approx(1e-4) and lr_at(c, 4) == pytest.approx(5e-4)
    assert lr_at(c, 9) == pytest.approx(1e-3) and lr_at(c, 500) == pytest.approx(1e-3)
    paper = make_train_config("ddpm-cifar10")
    assert (paper.lr, paper.warmup_steps, paper.batch_size, paper.grad_clip, paper.ema_decay, paper.loss) == (
        2e-4, 5000, 128, 1.0, 0.9999, "simple")


# --------------------------------------------------------------------- importance sampler


def test_importance_sampler_weights_are_inverse_probabilities():
    T, g = 50, torch.Generator().manual_seed(0)
    sampler = ImportanceSampler(T, history=3, uniform_prob=0.01)
    t, w = sampler.sample(64, g)
    assert torch.all(w == 1.0)  # uniform until every t has a full history
    values = torch.linspace(0.1, 5.0, T, dtype=torch.float64)
    for k in range(3):
        sampler.update(torch.arange(T), values * (1 + 0.1 * k))
    assert not sampler.warmed_up or sampler.count.min() == 3
    sampler.update(torch.arange(T), values * 1.2)  # a fourth value pushes out the first
    assert sampler.warmed_up
    kept = torch.stack([values * 1.1, values * 1.2, values * 1.2], dim=1)
    expected = kept.pow(2).mean(1).sqrt()
    expected = expected / expected.sum() * 0.99 + 0.01 / T
    p = sampler.probs()
    assert torch.allclose(p, expected) and p.sum().item() == pytest.approx(1.0)
    t, w = sampler.sample(4096, g)
    assert torch.allclose(w.double(), 1.0 / (T * p[t]), rtol=1e-6)
    # large L_t are sampled more often; the weighted mean stays unbiased for mean_t L_t
    assert (t >= T // 2).float().mean() > 0.6
    assert float((w.double() * values[t]).mean()) == pytest.approx(float(values.mean()), rel=0.05)


# --------------------------------------------------------------------------- trainer


def fixed_loss(trainer: Trainer, x0_u8: torch.Tensor, seed: int = 123) -> float:
    """L_simple of the model on a fixed batch, fixed t and noise (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    x0 = x0_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = q_sample(trainer.schedule, x0, t, noise)
    with torch.no_grad():
        out = trainer.model.eval()(x_t, t)
    trainer.model.train()
    return float(((out - noise) ** 2).mean())


def test_loss_decreases_when_overfitting_a_tiny_batch():
    images = images_tensor(4)
    trainer = Trainer(make_train_config("tiny", lr=3e-3, flip=False), *preset("tiny"))
    before = fixed_loss(trainer, images)
    for _ in range(50):
        trainer.step(images)
    after = fixed_loss(trainer, images)
    assert before == pytest.approx(1.0, abs=0.1)  # the zero-initialised output layer predicts eps = 0
    assert after < 0.7 * before
    trainer.record(1.0)
    assert trainer.history[-1][0] == 50 and trainer.images_seen == 50 * 8


def test_step_leaves_global_random_state_alone():
    images = images_tensor(8)
    before = torch.get_rng_state()
    trainer = Trainer(make_train_config("tiny"), *preset("tiny"))
    trainer.step(images)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("loss", ["vlb", "hybrid"])
def test_resume_from_saved_state_takes_identical_steps(tmp_path, loss):
    """Save after 3 steps, reload (weights_only) into a new trainer: steps 4..6 match bit for bit."""
    mc = ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1, learn_sigma=True)
    dc = DiffusionConfig(var_type="learned_range", num_timesteps=100)
    config = make_train_config("tiny-learned", loss=loss, vlb_history=2)
    images = images_tensor(16)
    a = Trainer(config, mc, dc)
    if loss == "vlb":  # warm the sampler up, so that its history decides t
        a.sampler.update(torch.arange(100).repeat(2), torch.linspace(0.01, 3.0, 200))
        assert a.sampler.warmed_up
    for _ in range(3):
        a.step(images)
    a.save(tmp_path)
    b = Trainer(config, mc, dc)
    b.load_state_dict(read_state(tmp_path))
    assert b.step_count == 3
    losses_a = [float(a.step(images)) for _ in range(3)]
    losses_b = [float(b.step(images)) for _ in range(3)]
    assert losses_a == losses_b and all(math.isfinite(v) for v in losses_a)
    for pa, pb in zip(list(a.model.parameters()) + list(a.ema.parameters()),
                      list(b.model.parameters()) + list(b.ema.parameters())):
        assert torch.equal(pa, pb)
    if loss == "vlb":
        assert torch.equal(a.sampler.history, b.sampler.history)


# ------------------------------------------------------------------------ the train job


def test_time_box_stops_and_saves(tmp_path, data_dir):
    run = tmp_path / "run"
    result = train(data_dir, run_dir=run, preset_name="tiny", minutes=0.03, log=quiet)
    assert result.stopped == "time box" and result.steps >= 1
    assert result.piece_seconds < 0.03 * 60 + 10
    state = read_state(run)
    assert int(state["step"]) == result.steps
    loaded = load_checkpoint(run / "ema.pt")
    assert loaded.meta["weights"] == "ema" and loaded.meta["steps"] == result.steps
    history = json.loads((run / "loss_history.json").read_text())
    assert history["columns"] == ["step", "loss", "images_seen", "seconds"]
    assert history["rows"][-1][0] == result.steps


def test_resume_continues_like_an_uninterrupted_run(tmp_path, data_dir):
    whole = train(data_dir, run_dir=tmp_path / "whole", preset_name="tiny", max_steps=6, log=quiet)
    train(data_dir, run_dir=tmp_path / "cut", preset_name="tiny", max_steps=3, log=quiet)
    with pytest.raises(DiffcodecError, match="--resume"):
        train(data_dir, run_dir=tmp_path / "cut", preset_name="tiny", max_steps=6, log=quiet)
    cut = train(data_dir, run_dir=tmp_path / "cut", resume=tmp_path / "cut", max_steps=6, log=quiet)
    assert (whole.steps, cut.steps, cut.steps_this_piece) == (6, 6, 3)
    a, b = read_state(tmp_path / "whole"), read_state(tmp_path / "cut")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert torch.equal(a["generator"], b["generator"])


def test_init_from_exported_ema_weights(tmp_path, data_dir):
    export = tmp_path / "ema16.pt"
    first = train(data_dir, run_dir=tmp_path / "a", preset_name="tiny-learned", max_steps=4, export=export,
                  log=quiet)
    payload = read_checkpoint(export)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    meta = payload["meta"]
    assert (meta["weights"], meta["preset"], meta["loss"], meta["steps"], meta["train_images_seen"]) == (
        "ema", "tiny-learned", "hybrid", 4, 32)
    assert meta["train_seconds"] > 0
    # the trainer starts with model = EMA = the checkpoint's weights and the step count carried on
    loaded = load_checkpoint(export)
    trainer = Trainer(make_train_config("tiny-learned"), loaded.model_config, loaded.diffusion_config)
    trainer.init_from_weights(loaded.model, loaded.meta)
    for p, e, w in zip(trainer.model.parameters(), trainer.ema.parameters(), loaded.model.parameters()):
        assert torch.equal(p, w) and torch.equal(e, w)
    assert trainer.step_count == 4 and len(trainer.optimizer.state) == 0
    second = train(data_dir, run_dir=tmp_path / "b", init=export, max_steps=6, log=quiet)
    assert (second.steps, second.steps_this_piece, second.images_seen) == (6, 2, 48)
    assert read_state(tmp_path / "b")["train_config"]["loss"] == "hybrid"
    with pytest.raises(DiffcodecError, match="not preset"):
        train(data_dir, run_dir=tmp_path / "c", init=export, preset_name="tiny", max_steps=6, log=quiet)
    assert first.export_fingerprint == loaded.fingerprint


def test_test_set_data_is_refused(tmp_path):
    named_test = write_shards(tmp_path / "test")
    shard_named_test = write_shards(tmp_path / "mixed", name="cifar10_test_00000-04999.npz")
    for path in (named_test, shard_named_test, f"{write_shards(tmp_path / 'cifar')}:test"):
        with pytest.raises(DiffcodecError, match="TEST data"):
            training_source(path)
    assert training_source(named_test, allow_test_data=True) == str(named_test)
    batches = tmp_path / "py" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch"):
        (batches / name).write_bytes(b"\x80")
    assert training_source(batches).endswith(":train")  # the official folder: train batches only


def test_cli_train_export_and_errors(tmp_path, data_dir, capsys):
    out, export = tmp_path / "run", tmp_path / "model.pt"
    argv = ["train", str(data_dir), "--preset", "tiny", "--steps", "2", "--out", str(out), "--export", str(export),
            "--device", "cpu", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and export.is_file()
    assert main(argv) == 2  # export exists
    assert "--force" in capsys.readouterr().err
    assert main(["train", str(write_shards(tmp_path / "test")), "--preset", "tiny", "--steps", "1",
                 "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffcodec: error:") and "TEST data" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--preset", "tiny", "--steps", "1", "--out",
                 str(tmp_path / "r3")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()  # a refused run leaves no folder
    assert main(["train", str(data_dir), "--steps", "4", "--out", str(out), "--resume", "--device", "cpu"]) == 0
    assert read_state(out)["step"] == 4
