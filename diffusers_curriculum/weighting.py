"""Per-sample loss weights as functions of the timestep's signal-to-noise ratio.

Each function maps a batch of timesteps to weights of shape ``(batch,)`` that multiply the per-sample
MSE of the model's prediction. SNR(t) = ᾱ_t / (1 − ᾱ_t), computed by diffusers' ``compute_snr``.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.training_utils import compute_snr

WEIGHTINGS = ("none", "min_snr", "p2")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023, arXiv 2303.09556), expressed for the model's target.

    The x0-loss weight is min(SNR, γ); for an ε target this becomes min(SNR, γ) / SNR, for a v target
    min(SNR, γ) / (SNR + 1). Same convention as diffusers' ``train_text_to_image.py --snr_gamma``.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def p2_weights(snr: torch.Tensor, gamma: float = 1.0, k: float = 1.0) -> torch.Tensor:
    """P2 weights (Choi et al. 2022, arXiv 2204.00227) for an ε target: 1 / (k + SNR)^γ.

    Down-weights the clean, high-SNR timesteps whose details are perceptually unimportant.
    """
    return (k + snr) ** -gamma


def loss_weights(
    noise_scheduler,
    timesteps: torch.Tensor,
    weighting: str = "none",
    snr_gamma: Optional[float] = None,
    p2_gamma: float = 1.0,
    p2_k: float = 1.0,
) -> Optional[torch.Tensor]:
    """Weights of shape ``(batch,)`` for ``timesteps`` under ``weighting``; ``None`` means all ones."""
    if weighting == "none":
        return None
    snr = compute_snr(noise_scheduler, timesteps)
    if weighting == "min_snr":
        return min_snr_weights(snr, snr_gamma, noise_scheduler.config.prediction_type)
    if weighting == "p2":
        return p2_weights(snr, p2_gamma, p2_k)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
