"""Per-sample loss weights as functions of the noise level's signal-to-noise ratio.

Each function maps a batch of noise levels to weights of shape ``(batch,)`` that multiply the per-sample MSE of
the model's prediction. SNR comes from the noise process (:mod:`diffusers_curriculum.noise`): ᾱ_t / (1 − ᾱ_t)
under DDPM (diffusers' ``compute_snr``), ((1 − σ) / σ)² under rectified flow.

A weighting defined on one parametrisation's error carries over to another through how the errors relate. Under
rectified flow x_σ = (1 − σ) x₀ + σ ε and the network predicts v = ε − x₀, so x₀ = x_σ − σ v and ε = x_σ + (1 − σ) v:

    x̂₀ − x₀ = −σ (v̂ − v),        ε̂ − ε = (1 − σ) (v̂ − v).

A weight w_x on the x₀-MSE is therefore w_x·σ² on the velocity MSE, and a weight w_ε on the ε-MSE is w_ε·(1 − σ)².
With √SNR = (1 − σ) / σ: σ = 1 / (1 + √SNR) and 1 − σ = √SNR / (1 + √SNR).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import nn

from .noise import SIGMA_EPS, as_process
from .weightings import PLUGINS

# The built-in weightings, then one per file in diffusers_curriculum/weightings/ (e.g. edm).
WEIGHTINGS = ("none", "min_snr", "p2", "learned", "sigma_sqrt", "cosmap", *PLUGINS)
# SD3's loss weights (diffusers' compute_loss_weighting_for_sd3): functions of the flow's σ, nothing under DDPM.
FLOW_WEIGHTINGS = ("sigma_sqrt", "cosmap")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023, arXiv 2303.09556), expressed for the model's target.

    The x0-loss weight is min(SNR, γ); for an ε target this becomes min(SNR, γ) / SNR, for a v target
    min(SNR, γ) / (SNR + 1) (same convention as diffusers' ``train_text_to_image.py --snr_gamma``), and for the
    flow velocity (``"flow"``) min(SNR, γ)·σ² = min(SNR, γ) / (1 + √SNR)² (module docstring).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "flow":
        return clipped / (1 + snr.sqrt()) ** 2
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def p2_weights(snr: torch.Tensor, gamma: float = 1.0, k: float = 1.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """P2 weights (Choi et al. 2022, arXiv 2204.00227) on the ε-MSE: 1 / (k + SNR)^γ; for the flow velocity
    (``"flow"``) that weight times (1 − σ)² = SNR / (1 + √SNR)² (module docstring). DDPM's v- and x₀-targets keep
    the ε form, as this project always trained them.

    Down-weights the clean, high-SNR timesteps whose details are perceptually unimportant.
    """
    weights = (k + snr) ** -gamma
    return weights * snr / (1 + snr.sqrt()) ** 2 if prediction_type == "flow" else weights


def loss_weights(
    noise_process,
    timesteps: torch.Tensor,
    weighting: str = "none",
    snr_gamma: Optional[float] = None,
    p2_gamma: float = 1.0,
    p2_k: float = 1.0,
    **settings,
) -> Optional[torch.Tensor]:
    """Weights of shape ``(batch,)`` for the noise levels ``timesteps`` of ``noise_process`` (a
    :class:`~diffusers_curriculum.noise.NoiseProcess` or a diffusers scheduler) under ``weighting``; ``None``
    means all ones (also for ``"learned"``, which is not a factor: see :class:`LearnedWeighting`). A plugin
    weighting (:mod:`diffusers_curriculum.weightings`) takes its ``settings``."""
    if weighting in ("none", "learned"):
        return None
    process = as_process(noise_process)
    if weighting in PLUGINS:
        return PLUGINS[weighting].weights(process, timesteps, **settings).float()
    if weighting in FLOW_WEIGHTINGS:
        if process.name != "flow":
            raise ValueError(f"weighting {weighting!r} is a rectified-flow loss weight (a function of σ); the process is {process.name}")
        return compute_loss_weighting_for_sd3(weighting, process.sigmas(timesteps).clamp_min(SIGMA_EPS)).float()
    snr = process.snr(timesteps)
    if weighting == "min_snr":
        return min_snr_weights(snr, snr_gamma, process.prediction_type)
    if weighting == "p2":
        return p2_weights(snr, p2_gamma, p2_k, process.prediction_type)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


# ---- learned weighting (EDM2) ------------------------------------------------------------------------------
def learned_weighting_loss(per_sample_loss: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """EDM2's uncertainty-weighted loss per sample: L / exp(u) + u (Karras et al., CVPR 2024, eq. 19).

    For a fixed noise level its minimum over u is at u = log E[L]: the weight exp(-u) learns to divide each
    noise level's loss by its own scale, the continuous form of Kendall et al.'s uncertainty weighting that
    ANT applies to clusters.
    """
    return per_sample_loss * torch.exp(-log_variance) + log_variance


class LearnedWeighting(nn.Module):
    """u(λ): the log-variance of the loss as a function of the log-SNR λ, learned with the model.

    As in EDM2, random Fourier features of the noise level (fixed frequencies and phases, seeded) feed one
    linear layer; it starts at zero, so training starts from unweighted losses. Its own Adam steps once per
    optimizer step with gradients averaged over ranks, so u is the same on every rank and it is checkpointed
    with the regime.

    Args:
        num_features: Fourier features (EDM2: 128).
        lr: learning rate of u's Adam.
        seed: seed of the Fourier frequencies and phases.
    """

    def __init__(self, num_features: int = 128, lr: float = 1e-2, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", 2 * math.pi * torch.randn(num_features, generator=generator))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_features, generator=generator))
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.lr = lr
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)

    def forward(self, log_snr: torch.Tensor) -> torch.Tensor:
        """u(λ), shape ``(B,)``. λ is scaled by 1/8 (EDM2 feeds ln σ / 4 = −λ / 8)."""
        x = log_snr.float()[:, None] / 8
        features = math.sqrt(2) * torch.cos(x * self.frequencies + self.phases)
        return self.linear(features).squeeze(1)

    def loss(self, per_sample_loss: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        """:func:`learned_weighting_loss` of each sample at its noise level."""
        self.to(per_sample_loss.device)
        return learned_weighting_loss(per_sample_loss.float(), self(log_snr.to(per_sample_loss.device)))

    def step(self, accelerator=None) -> Dict[str, float]:
        """One Adam step on u (gradients averaged over ranks first); returns u at a few noise levels to log."""
        if self.linear.weight.grad is not None:
            if accelerator is not None and accelerator.num_processes > 1:  # u is not part of the DDP model
                for p in self.parameters():
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            self.optimizer.step()
            self.optimizer.zero_grad()
        with torch.no_grad():
            levels = torch.tensor([-8.0, 0.0, 8.0], device=self.linear.weight.device)
            return {f"learned_u/lambda{int(l):+d}": float(u) for l, u in zip(levels.tolist(), self(levels))}

    def describe(self) -> Dict[str, Any]:
        return {"learned_weighting_lr": self.lr, "learned_weighting_features": int(self.frequencies.numel())}

    def training_state(self) -> Dict[str, Any]:
        return {"module": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
