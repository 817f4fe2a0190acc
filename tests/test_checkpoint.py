import pytest
import torch

from diffcodec.checkpoint import fingerprint, load_checkpoint, read_checkpoint, save_checkpoint
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
    with pytest.raises(DiffcodecError, match="not a readable diffcodec checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "flag").exists()


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
    with pytest.raises(DiffcodecError, match="unknown variance type"):
        load_checkpoint(tmp_path / "vartype.pt")
    payload = read_checkpoint(good)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(DiffcodecError, match="version 99"):
        load_checkpoint(tmp_path / "v99.pt")
