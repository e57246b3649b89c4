"""The denoising loss, once: the target a scheduler's ``prediction_type`` asks for, and the per-sample MSE.

Every place that trains or scores a denoiser calls :func:`denoising_loss` -- both training scripts, the pruning
proxy, the difficulty study and the gradient-affinity estimate -- so ε-, v- and x₀-prediction models are
scored against the same target everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict under ``noise_scheduler.config.prediction_type``: ε (``"epsilon"``),
    v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (``"v_prediction"``, Salimans & Ho 2022) or x₀ (``"sample"``)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {kind!r}")


def denoising_loss(model_output: torch.Tensor, noise_scheduler, clean: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE, shape ``(B,)``, of ``model_output`` (the model's prediction for
    ``noise_scheduler.add_noise(clean, noise, timesteps)``) against :func:`prediction_target`; computed in
    float32 whatever the model's precision, as diffusers' training scripts do."""
    target = prediction_target(noise_scheduler, clean, noise, timesteps)
    per_element = F.mse_loss(model_output.float(), target.float(), reduction="none")
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))
