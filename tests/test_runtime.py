"""diffcodec.runtime: device names refused in one line, the decoder's device, thread bounds,
the one network wrapper."""

from __future__ import annotations

import pytest
import torch

from diffcodec.errors import DiffcodecError
from diffcodec.runtime import (
    MAX_THREADS,
    decode_device,
    deterministic_kernels,
    device_kind,
    in_batches,
    network,
    pick_device,
    recorded_threads,
    use_threads,
)


def test_device_names_are_checked():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, phrase in (("bogus", "unknown device"), ("mps", "not supported"), ("", "unknown device")):
        with pytest.raises(DiffcodecError, match=phrase):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DiffcodecError, match="no CUDA"):
            pick_device("cuda:0")
        assert decode_device("auto", "cuda:NVIDIA H100") == torch.device("cpu")
    assert decode_device("auto", "cpu") == torch.device("cpu")
    with pytest.raises(DiffcodecError, match="unknown device"):
        decode_device("bogus", "cpu")
    assert device_kind("cpu") == "cpu"


def test_thread_counts_from_files_are_bounded():
    before = torch.get_num_threads()
    try:
        use_threads(0)
        assert torch.get_num_threads() == before
        with pytest.raises(DiffcodecError, match="corrupt header"):
            use_threads(17666)
        use_threads(1)
        assert torch.get_num_threads() == 1
        assert recorded_threads("cpu", float64=False) == 1 and recorded_threads("cpu", float64=True) == 0
        assert recorded_threads("cpu", False) <= MAX_THREADS
    finally:
        torch.set_num_threads(before)


def test_network_runs_without_autograd_and_float64_is_a_copy():
    model = torch.nn.Conv2d(3, 3, 1)
    x, t = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = model

        def forward(self, x, t):
            return self.conv(x)

    m = Wrapped()
    out = network(m)(x, t)
    assert not out.requires_grad and torch.allclose(out, m(x, t))
    out64 = network(m, float64=True)(x.double(), t)
    assert out64.dtype == torch.float64 and m.conv.weight.dtype == torch.float32
    with pytest.raises(ValueError):
        network(m, float64=True, bf16=True)


def test_deterministic_kernels_run_numpy_blas_on_one_thread_and_restore_it():
    """Inside the codecs' context numpy's BLAS has one thread (its spinning threads slowed the
    next network call; a threaded sum's rounding depends on the thread count); after it, as before."""
    import threadpoolctl

    def numpy_blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas" and "torch" not in i["filepath"]]

    before = numpy_blas_threads()
    if not before:
        pytest.skip("numpy reports no BLAS library that threadpoolctl controls here")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        two = numpy_blas_threads()
        with deterministic_kernels():
            assert set(numpy_blas_threads()) == {1}
        assert numpy_blas_threads() == two
    assert numpy_blas_threads() == before


def test_the_exact_network_is_made_once_per_model_and_remade_when_its_weights_change(monkeypatch):
    """A lossless job asks for the exact network twice and a program coding many files once per
    file: it is made once while the model and its weights stay the same, and again after an
    in-place change to a weight (an optimizer step), whose outputs then follow the new weights."""
    import diffcodec.runtime as runtime
    from tests.conftest import seeded_model

    model, _, _ = seeded_model(2, image_size=8)
    made = []
    real = runtime.exact_network_of
    monkeypatch.setattr(runtime, "exact_network_of", lambda *a, **k: made.append(1) or real(*a, **k))
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    first = runtime.network(model, exact=True)(x, t)
    again = runtime.network(model, exact=True)(x, t)
    assert len(made) == 1 and torch.equal(first, again)
    with torch.no_grad():
        model.conv_out.weight.mul_(2.0)  # in place: the version counter moves
    changed = runtime.network(model, exact=True)(x, t)
    assert len(made) == 2 and not torch.equal(changed, first)
    runtime.network(model, exact=True, device="cpu")  # another device string: made for it
    assert len(made) == 3


def test_a_model_made_under_inference_mode_gets_a_fresh_exact_network_each_time(monkeypatch):
    """Inference tensors keep no version counter, so nothing tells a changed weight: no cache."""
    import diffcodec.runtime as runtime
    from tests.conftest import seeded_model

    with torch.inference_mode():
        model, _, _ = seeded_model(3, image_size=8)
    assert runtime._weights_state(model) is None  # its parameters were made as inference tensors
    made = []
    real = runtime.exact_network_of
    monkeypatch.setattr(runtime, "exact_network_of", lambda *a, **k: made.append(1) or real(*a, **k))
    x, t = torch.zeros(1, 3, 8, 8), torch.tensor([10])
    assert torch.equal(runtime.network(model, exact=True)(x, t), runtime.network(model, exact=True)(x, t))
    assert len(made) == 2


def test_network_batch_is_the_measured_cpu_default_and_the_old_one_elsewhere():
    """`runtime.network_batch`: 32 tiles per call on a CPU (the fastest measured there), 64 on
    another device (not measured yet: the batch it had)."""
    from diffcodec.runtime import CPU_NETWORK_BATCH, GPU_NETWORK_BATCH, network_batch

    assert network_batch("cpu") == network_batch(torch.device("cpu")) == CPU_NETWORK_BATCH == 32
    assert network_batch("cuda") == network_batch("cuda:1") == GPU_NETWORK_BATCH == 64


def test_in_batches_slices_and_concatenates():
    calls = []

    def fn(x, t):
        calls.append(x.shape[0])
        return x * 2 + t[:, None, None, None]

    x, t = torch.arange(10 * 3 * 2 * 2, dtype=torch.float64).reshape(10, 3, 2, 2), torch.arange(10)
    assert torch.equal(in_batches(fn, 4)(x, t), fn(x, t)) and calls == [4, 4, 2, 10]
    with pytest.raises(ValueError, match="max_batch"):
        in_batches(fn, 0)
