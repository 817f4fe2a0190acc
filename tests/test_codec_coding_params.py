"""diffcodec.codec.coding_params: snapping, and the pixel stage in level units under each format's rule."""

from __future__ import annotations

import numpy as np
import torch

from diffcodec.codec.bitsback.chain import PIXEL_RULE as BITSBACK_RULE
from diffcodec.codec.coding_params import HALF_LEVELS, levels_to_unit, pixel_params, snap
from diffcodec.codec.progressive.codec import PIXEL_RULE as PROGRESSIVE_RULE


def test_snap():
    values = np.array([0.1, -3.3, 2.0**-17, 1e6 + 0.49])
    snapped = snap(values, -16)
    assert np.all(np.abs(snapped - values) <= 2.0**-17)
    assert np.array_equal(snapped * 2.0**16, np.rint(snapped * 2.0**16))


def test_pixel_params_are_level_units_clipped_and_floored_by_the_format():
    mean = torch.tensor([-1.0, 0.0, 1.0, 1.5, -9.0], dtype=torch.float32).reshape(1, 1, 1, 5)
    log_var = torch.full_like(mean, -60.0)  # a std far below every floor
    m, s = pixel_params(mean, log_var, -16, BITSBACK_RULE)
    assert np.array_equal(m, [0.0, 127.5, 255.0, 256.0, -1.0]) and np.all(s == 2.0**-8)
    m, s = pixel_params(mean, log_var, -16, PROGRESSIVE_RULE)
    assert np.array_equal(m, [0.0, 127.5, 255.0, 318.75, -1020.0]) and np.all(s == 2.0**-16)
    m, s = pixel_params(mean, torch.zeros_like(mean), -16, BITSBACK_RULE)
    assert np.all(s == HALF_LEVELS)  # std 1 on [-1, 1] is 127.5 levels
    assert np.array_equal(levels_to_unit(np.array([0, 255])), [-1.0, 1.0])
