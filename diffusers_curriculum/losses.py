"""The denoising loss, once: the per-sample MSE against the target the noise process asks for.

Every place that trains or scores a denoiser calls :func:`denoising_loss` -- both training scripts, the pruning
proxy, the difficulty study and the gradient-affinity estimate -- so ε-, v-, x₀- and flow-velocity models are
scored against the same target everywhere (:meth:`~diffusers_curriculum.noise.NoiseProcess.target`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .noise import as_process


def prediction_target(noise_process, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: ε, v or x₀ under a DDPM scheduler's ``prediction_type``, the velocity
    ε − x₀ under rectified flow. ``noise_process`` is a :class:`~diffusers_curriculum.noise.NoiseProcess` or a
    diffusers scheduler."""
    return as_process(noise_process).target(clean, noise, timesteps)


def denoising_loss(model_output: torch.Tensor, noise_process, clean: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE, shape ``(B,)``, of ``model_output`` (the model's prediction for
    ``add_noise(clean, noise, timesteps)``) against :func:`prediction_target`; computed in float32 whatever the
    model's precision, as diffusers' training scripts do."""
    target = prediction_target(noise_process, clean, noise, timesteps)
    per_element = F.mse_loss(model_output.float(), target.float(), reduction="none")
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))
