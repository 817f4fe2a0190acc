"""bench.exact_bits: contract 1's network re-quantized to other operand widths, paired against float32."""

from __future__ import annotations

import json

import pytest
import torch

from bench import exact_bits
from diffcodec.checkpoint import load_checkpoint
from diffcodec.exact_net import ExactConv2d, exact_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_requantized_layers_use_the_widths_and_keep_the_function(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint).model
    net = exact_bits.requantized_network(model, 9, 6)
    convs = [m for m in net.modules() if isinstance(m, ExactConv2d)]
    assert convs and all((c.act_bits, c.weight_bits) == (9, 6) for c in convs)
    assert all(int(c.w_int.abs().max()) <= 2**5 for c in convs)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        wide, narrow = exact_network(model)(x, t), net(x, t)
    err = (narrow - wide).abs().max() / wide.abs().max()
    assert 1e-6 < err < 0.2  # coarser, and still the same network


def test_widths_are_parsed_and_checked():
    assert exact_bits.parse_widths("13/13, 10/8") == [(13, 13), (10, 8)]
    for bad in ("13", "13/x", "1/8", "30/8", ""):
        with pytest.raises(Exception):
            exact_bits.parse_widths(bad)


def test_two_widths_on_a_few_images(tiny_checkpoint, images_npz, tmp_path):
    out = tmp_path / "bits.json"
    assert exact_bits.main(["--data", str(images_npz), "-c", str(tiny_checkpoint), "-n", "2", "--t-samples", "1",
                            "--widths", "12/12,6/6", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["activation_bits"], r["weight_bits"]) for r in rows] == [(12, 12), (6, 6)]
    assert abs(rows[1]["difference_bpd"]) > abs(rows[0]["difference_bpd"])  # fewer bits, further from float32
    assert "| 6 | 6 |" in out.with_suffix(".md").read_text()
