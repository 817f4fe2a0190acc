import pytest
import torch

from diffcodec.config import ModelConfig, preset
from diffcodec.unet import UNet, num_parameters, timestep_embedding

from conftest import tiny_model


def test_paper_configuration_has_35_7m_parameters():
    assert num_parameters(UNet(ModelConfig())) == pytest.approx(35.7e6, rel=0.002)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 5]), 16)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb[0, :8], torch.zeros(8)) and torch.allclose(emb[0, 8:], torch.ones(8))
    assert torch.allclose(emb[1, 0], torch.sin(torch.tensor(5.0)))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape_and_dependence_on_t_and_x(learn_sigma):
    model, *_ = tiny_model(seed=0, learn_sigma=learn_sigma)  # zero-initialised layers perturbed
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
        assert out.shape == (2, 6 if learn_sigma else 3, 32, 32)
        assert not torch.allclose(out, model(x, torch.tensor([1, 500])))
        assert not torch.allclose(out, model(x + 0.1, torch.tensor([0, 999])))


def test_fresh_network_starts_at_zero_output():
    model = UNet(preset("tiny")[0]).eval()
    assert torch.count_nonzero(model(torch.randn(1, 3, 32, 32), torch.tensor([5]))) == 0


def test_fully_convolutional_on_other_sizes_and_refuses_odd_ones():
    model = UNet(preset("tiny")[0]).eval()
    assert model(torch.randn(1, 3, 64, 48), torch.tensor([3])).shape == (1, 3, 64, 48)
    with pytest.raises(ValueError, match="multiples"):
        model(torch.randn(1, 3, 31, 32), torch.tensor([3]))


def test_batch_composition_does_not_change_an_images_output_much():
    torch.manual_seed(1)
    model = UNet(preset("tiny")[0]).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    x = torch.randn(4, 3, 32, 32)
    t = torch.tensor([10, 20, 30, 40])
    with torch.no_grad():
        together = model(x, t)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)
