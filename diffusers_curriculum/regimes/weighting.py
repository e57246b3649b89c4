"""The loss-weighting axis (``--weighting``): none, Min-SNR-γ, P2, EDM2's learned u(λ), and under rectified flow
SD3's sigma_sqrt and cosmap. Every weighting reads the noise level through the noise process's (log-)SNR, so the
same names apply to DDPM and flow matching.

:class:`Weighting` turns per-sample losses into the per-sample terms whose mean is back-propagated. The
formulas are the pure functions of :mod:`diffusers_curriculum.weighting`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from ..noise import as_process
from ..weighting import WEIGHTINGS, LearnedWeighting, loss_weights
from ..weightings import PLUGINS


class Weighting:
    """Per-sample loss weighting ``name`` (one of :data:`WEIGHTINGS`).

    Args:
        snr_gamma: γ of Min-SNR-γ. p2_gamma, p2_k: P2's 1/(k+SNR)^γ.
        learned_lr, seed: Adam learning rate and Fourier-feature seed of the learned u(λ).
        settings: a plugin weighting's flag values (:mod:`diffusers_curriculum.weightings`).
    """

    def __init__(self, name: str = "none", snr_gamma: Optional[float] = None, p2_gamma: float = 1.0, p2_k: float = 1.0,
                 learned_lr: float = 1e-2, seed: int = 0, settings: Optional[Dict[str, Any]] = None):
        if name not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {name!r}; choose one of {WEIGHTINGS}")
        self.name, self.snr_gamma, self.p2_gamma, self.p2_k = name, snr_gamma, p2_gamma, p2_k
        self.settings = dict(settings or {})
        self.learned = LearnedWeighting(lr=learned_lr, seed=seed) if name == "learned" else None

    def __call__(self, noise_process, per_sample_loss: torch.Tensor, timesteps: torch.Tensor,
                 importance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weighted per-sample terms; ``importance`` (a sampler's 1/(T·p(t))) multiplies the losses first."""
        losses = per_sample_loss if importance is None else per_sample_loss * importance.to(per_sample_loss.dtype)
        if self.learned is not None:
            return self.learned.loss(losses, as_process(noise_process).log_snr(timesteps))
        weights = loss_weights(noise_process, timesteps, self.name, self.snr_gamma, self.p2_gamma, self.p2_k, **self.settings)
        return losses if weights is None else losses * weights.to(losses.dtype)

    def step(self, accelerator) -> Dict[str, float]:
        """Once per optimizer step: the learned weighting's update (and its values to log)."""
        return self.learned.step(accelerator) if self.learned is not None else {}

    def describe(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {"weighting": self.name}
        if self.name == "min_snr":
            info["snr_gamma"] = self.snr_gamma
        elif self.name == "p2":
            info.update(p2_gamma=self.p2_gamma, p2_k=self.p2_k)
        elif self.learned is not None:
            info.update(self.learned.describe())
        elif self.name in PLUGINS:
            info.update(self.settings)
        return info

    def state_dict(self) -> Dict[str, Any]:
        return self.learned.training_state() if self.learned is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.learned is not None:
            self.learned.load_training_state(state)
