"""Checkpoints: round trip, fingerprint, safe loading, and one-line errors for bad files and configs."""

import math

import pytest
import torch

from diffcodec.checkpoint import build_model, fingerprint, load_checkpoint, read_checkpoint, save_checkpoint
from diffcodec.cli import main
from diffcodec.config import ModelConfig, model_config_problem, show
from diffcodec.errors import DiffcodecError

from conftest import tiny_model


def test_round_trip_keeps_weights_config_and_fingerprint(tmp_path):
    model, mc, dc = tiny_model(seed=3)
    fp = save_checkpoint(tmp_path / "m.pt", model, mc, dc, meta={"weights": "ema", "steps": 7}, dtype=torch.float16)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.fingerprint == fp and len(fp) == 16
    assert loaded.model_config == mc and loaded.diffusion_config == dc
    assert loaded.meta == {"weights": "ema", "steps": 7}
    for name, p in loaded.model.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, model.state_dict()[name].half().float())
    assert not loaded.model.training


def test_a_model_is_built_on_its_weights_without_a_copy_or_an_initialisation():
    """`build_model` makes the UNet on the meta device and takes the state's float32 tensors
    themselves; every parameter is real, trainable, and the model computes as one built the
    usual way."""
    model, mc, _ = tiny_model(seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    built = build_model(mc, state, "<test>")
    params = dict(built.named_parameters())
    assert all(params[k].data_ptr() == state[k].data_ptr() for k in params)
    assert all(not t.is_meta and t.requires_grad for t in params.values()) and not built.training
    x, t = torch.randn(2, mc.in_channels, mc.image_size, mc.image_size), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(built(x, t), model(x, t))


def test_fingerprint_changes_with_any_weight():
    model, *_ = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = fingerprint(state)
    state["conv_in.bias"][0] += 1e-3
    assert fingerprint(state) != before


def test_loading_never_runs_code_from_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "flag"),))

    torch.save({"format": "diffcodec-checkpoint", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DiffcodecError, match="refused: the diffcodec checkpoint holds Python objects") as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "flag").exists()
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "(it names exec)" in str(e.value)


def test_bad_checkpoints_are_one_line_user_errors(tmp_path):
    model, mc, dc = tiny_model()
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, mc, dc)
    with pytest.raises(DiffcodecError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(DiffcodecError, match="not a readable"):
        load_checkpoint(tmp_path / "text.pt")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffcodecError, match="not a readable"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(DiffcodecError, match="not a diffcodec checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    payload = read_checkpoint(good)
    payload["state_dict"]["conv_in.bias"] += 1.0  # weights no longer match the fingerprint
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(DiffcodecError, match="fingerprint"):
        load_checkpoint(tmp_path / "tampered.pt")
    payload = read_checkpoint(good)
    payload["model_config"]["ch"] = 16  # config that does not fit the weights
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(DiffcodecError, match="do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")
    payload = read_checkpoint(good)
    payload["diffusion_config"]["var_type"] = "huge"
    torch.save(payload, tmp_path / "vartype.pt")
    with pytest.raises(DiffcodecError, match="diffusion.var_type must be one of"):
        load_checkpoint(tmp_path / "vartype.pt")
    payload = read_checkpoint(good)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(DiffcodecError, match="version 99"):
        load_checkpoint(tmp_path / "v99.pt")


# ------------------------------------------------------------------ the stored config records


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    model, mc, dc = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    save_checkpoint(path, model, mc, dc, dtype=torch.float16)
    return path


def tampered(good, path, section, field, value):
    """A copy of ``good`` whose stored ``section`` config has ``field`` = ``value`` (the weights,
    and so the fingerprint, untouched)."""
    payload = read_checkpoint(good)
    payload[f"{section}_config"][field] = value
    torch.save(payload, path)
    return path


BAD_FIELDS = [
    ("model", "ch", -8, "model.ch must be in [1, 4096], got -8"),
    ("model", "ch", 2**62, "model.ch must be in [1, 4096], got 4611686018427387904"),
    ("model", "ch", 4096, "model.ch x model.ch_mult must be at most 4096 channels per level, got 4096 x [1, 2]"),
    ("model", "ch", 3.5, "model.ch must be an integer, got 3.5"),
    ("model", "in_channels", -3, "model.in_channels must be 3 (RGB), got -3"),
    ("model", "dropout", 5.0, "model.dropout must be in [0, 1), got 5.0"),
    ("model", "dropout", math.nan, "model.dropout must be in [0, 1), got nan"),
    ("model", "dropout", "high", "model.dropout must be a number, got 'high'"),
    ("model", "image_size", 0, "model.image_size must be in [1, 4096], got 0"),
    ("model", "image_size", -32, "model.image_size must be in [1, 4096], got -32"),
    ("model", "image_size", 31, "model.image_size must be a multiple of 2 (len(ch_mult) = 2), got 31"),
    ("model", "ch_mult", [1, 0], "model.ch_mult must be a list of 1 to 8 integers >= 1, got [1, 0]"),
    ("model", "ch_mult", [], "model.ch_mult must be a list of 1 to 8 integers >= 1, got []"),
    ("model", "ch_mult", [1] * 9, "model.ch_mult must be a list of 1 to 8 integers >= 1, got [1, 1, 1, 1, 1, 1, 1, "),
    ("model", "ch_mult", [1, 2**40], "model.ch x model.ch_mult must be at most 4096 channels per level, got 8 x "),
    ("model", "ch_mult", [1, 2.5], "model.ch_mult must be a list of integers, got [1, 2.5]"),
    ("model", "attn_resolutions", [16, -8], "model.attn_resolutions must be integers >= 1, got [16, -8]"),
    ("model", "num_res_blocks", -1, "model.num_res_blocks must be in [0, 8], got -1"),
    ("model", "num_res_blocks", 10**6, "model.num_res_blocks must be in [0, 8], got 1000000"),
    ("model", "dropout", 10**400, "model.dropout must be a number, got 1000000000000000000000000000000000000..."),
    ("model", "num_heads", 0, "model.num_heads must be >= 1, got 0"),
    ("model", "num_heads", 3, "model.num_heads must divide the attention widths [16], got 3"),
    ("model", "learn_sigma", 1, "model.learn_sigma must be true or false, got 1"),
    ("model", "depth", 4, "unknown model fields ['depth']"),
    ("diffusion", "var_type", "huge", "diffusion.var_type must be one of fixedlarge, fixedsmall, learned_range, "
                                      "got 'huge'"),
    ("diffusion", "schedule", "sigmoid", "diffusion.schedule must be one of linear, cosine, got 'sigmoid'"),
    ("diffusion", "num_timesteps", 0, "diffusion.num_timesteps must be in [1, 100000], got 0"),
    ("diffusion", "num_timesteps", -5, "diffusion.num_timesteps must be in [1, 100000], got -5"),
    ("diffusion", "num_timesteps", 10**9, "diffusion.num_timesteps must be in [1, 100000], got 1000000000"),
    ("diffusion", "num_timesteps", 10, "diffusion.num_timesteps must give linear betas in (0, 1), got 10"),
]


@pytest.mark.parametrize("section,field,value,message", BAD_FIELDS,
                         ids=[f"{s}.{f}={show(v)}" for s, f, v, _ in BAD_FIELDS])
def test_a_malformed_config_field_is_a_one_line_error_naming_it(tmp_path, good_checkpoint, section, field, value,
                                                                message):
    bad = tampered(good_checkpoint, tmp_path / "bad.pt", section, field, value)
    with pytest.raises(DiffcodecError) as info:
        load_checkpoint(bad)
    text = str(info.value)
    assert text.startswith(f"{bad}: corrupt checkpoint config: {message}")
    assert "\n" not in text


def test_a_config_record_that_is_not_a_mapping_is_refused(tmp_path, good_checkpoint):
    payload = read_checkpoint(good_checkpoint)
    payload["model_config"] = [8, 16]
    torch.save(payload, tmp_path / "list.pt")
    with pytest.raises(DiffcodecError, match="corrupt checkpoint config: model is not a mapping, got list"):
        load_checkpoint(tmp_path / "list.pt")


def test_a_huge_config_is_refused_before_anything_is_allocated(tmp_path, good_checkpoint):
    """ch = 2^62 would overflow the shapes of a network built even on the meta device: the
    config's limits come first."""
    bad = tampered(good_checkpoint, tmp_path / "huge.pt", "model", "ch", 2**62)
    with pytest.raises(DiffcodecError, match=r"corrupt checkpoint config: model.ch must be in \[1, 4096\]"):
        load_checkpoint(bad)


def test_the_parameter_count_is_bounded_before_any_weight_is_compared():
    """Every width at its limit and 8 blocks per level: 58 billion parameters, counted on the
    meta device, refused in one line; the paper's model (35.7M) is well inside."""
    huge = ModelConfig(ch=512, ch_mult=(8,) * 8, num_res_blocks=8, image_size=128, attn_resolutions=())
    assert model_config_problem(huge) == ("model must have at most 2,000,000,000 parameters, this config has "
                                          "58,034,294,787")
    assert model_config_problem(ModelConfig()) is None


@pytest.mark.parametrize("section,field,value,named", [("model", "dropout", 5.0, "model.dropout"),
                                                       ("model", "ch_mult", [1, -2], "model.ch_mult"),
                                                       ("diffusion", "num_timesteps", 0, "diffusion.num_timesteps")])
def test_cli_reports_a_malformed_config_in_one_line(tmp_path, good_checkpoint, images_npz, capsys, section, field,
                                                    value, named):
    bad = tampered(good_checkpoint, tmp_path / "model.pt", section, field, value)
    assert main(["nll", str(images_npz), "--checkpoint", str(bad), "-n", "1", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith(f"diffcodec: error: {bad}: corrupt checkpoint config: {named} must ")
