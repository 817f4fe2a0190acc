"""Training losses: the paper's L_simple, Improved DDPM's hybrid loss and L_vlb, per image.

Losses (per image [B]; the trainer averages them over the batch):

- ``simple``: L_simple = mean over dimensions of ||eps - eps_theta(x_t, t)||^2, t uniform.
- ``hybrid``: L_simple + lambda * T * L_t with lambda = 0.001 (Improved DDPM). L_t is the
  bound term ``likelihood.vb_term_bits`` of the sampled t in bits/dim (x^_0 unclipped),
  computed from the network output with the eps channels DETACHED, so it trains only the
  learned-range variance channels (the mean is trained by L_simple alone). t uniform.
- ``vlb``: L_t in bits/dim with importance-sampled t (``ImportanceSampler``, Improved DDPM):
  a history of the 10 most recent L_t per t; once every t has 10 entries, t is drawn with
  p_t proportional to sqrt(E[L_t^2]) (mixed with 0.1% uniform) and each sample is weighted
  by 1 / (T p_t), so the loss stays an unbiased estimate of L_vlb / T. Gradients reach mean
  and variance.

L_t is the bound's own function, so training and evaluation cannot drift apart; it makes no
host sync (both branches for every row), which keeps a GPU step asynchronous.
"""

from __future__ import annotations

import torch

from diffcodec.diffusion import split_model_output
from diffcodec.errors import DiffcodecError
from diffcodec.likelihood import vb_term_bits
from diffcodec.losses import flat_mean
from diffcodec.schedule import Schedule
from diffcodec.train_config import LOSSES


def vb_terms_bpd(
    s: Schedule, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, var_type: str
) -> torch.Tensor:
    """Paper L_t of each row in bits/dim [B] (float32, differentiable), x^_0 not clipped:
    ``likelihood.vb_term_bits`` divided by the C*H*W dimensions of an image."""
    bits, _ = vb_term_bits(s, output, x0, x_t, t, var_type=var_type, clip_denoised=False)
    return (bits / x0[0].numel()).float()


def training_losses(
    s: Schedule,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    loss: str,
    var_type: str,
    hybrid_lambda: float = 0.001,
) -> dict[str, torch.Tensor]:
    """Per-image losses [B] from the network output [B, C or 2C, H, W] at code steps t [B].

    Returns ``loss`` (what to minimise, before importance weights), ``mse`` (L_simple term,
    per dimension) and, for hybrid/vlb, ``vb_bpd`` (L_t in bits/dim).
    """
    output = output.float()
    eps, v = split_model_output(output, var_type, x0.shape[1])
    mse = flat_mean((noise - eps) ** 2)
    if loss == "simple":
        return {"loss": mse, "mse": mse}
    if loss == "hybrid":
        if v is None:
            raise DiffcodecError("the hybrid loss needs learned-range variances")
        frozen_mean = torch.cat([eps.detach(), v], dim=1)  # stop-gradient: L_vlb trains only v
        vb = vb_terms_bpd(s, frozen_mean, x0, x_t, t, var_type=var_type)
        return {"loss": mse + hybrid_lambda * s.num_steps * vb, "mse": mse, "vb_bpd": vb}
    if loss == "vlb":
        vb = vb_terms_bpd(s, output, x0, x_t, t, var_type=var_type)
        return {"loss": vb, "mse": mse.detach(), "vb_bpd": vb}
    raise DiffcodecError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")


class ImportanceSampler:
    """Improved DDPM's t sampler for L_vlb: p_t proportional to sqrt(E[L_t^2]) over the last
    ``history`` values of each L_t, mixed with ``uniform_prob`` of uniform; uniform until
    every t has a full history. ``sample`` returns t [B] and weights 1 / (T p_t) [B]."""

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        self.num_steps, self.history_len, self.uniform_prob = num_steps, history, uniform_prob
        self.history = torch.zeros(num_steps, history, dtype=torch.float64)
        self.count = torch.zeros(num_steps, dtype=torch.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self.count == self.history_len).all())

    def probs(self) -> torch.Tensor:
        """p_t [T] (float64)."""
        T = self.num_steps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.history.pow(2).mean(dim=1).sqrt()
        if not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = w / w.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / T

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probs()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * p[t])
        return t, weights.float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record L_t values (any unit, consistently) of the sampled steps t [B]."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.count[ti])
            if n == self.history_len:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = li
            else:
                self.history[ti, n] = li
                self.count[ti] = n + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["history"].shape != self.history.shape or state["count"].shape != self.count.shape:
            raise DiffcodecError("the saved importance-sampler history does not fit this schedule")
        self.history = state["history"].to(torch.float64).clone()
        self.count = state["count"].to(torch.int64).clone()
