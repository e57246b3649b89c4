"""The noise process: the one owner of time.

A regime works on a *noise-level coordinate* t ∈ [0, T): samplers draw it, clusters and curriculum stages are
intervals of it, the weighting reads its log-SNR, and the exact interval DP runs on its grid of T levels (cell i
is [i, i + 1)). The process says what t means:

* :class:`DDPMProcess` -- discrete DDPM time (Ho et al. 2020): t is an integer timestep of a ``DDPMScheduler``,
  x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, SNR(t) = ᾱ_t / (1 − ᾱ_t), and the network is fed t itself. Every call goes to the
  scheduler exactly as the scripts always made it, so DDPM runs are unchanged bit for bit.
* :class:`FlowProcess` -- rectified flow (SD3, Flux, Wan; diffusers' ``FlowMatchEulerDiscreteScheduler``): t is
  continuous, the noise level σ = shift(t / T) with shift(s) = s·shift / (1 + (shift − 1)·s), x_σ = (1 − σ) x₀ + σ ε,
  the network predicts the velocity v = ε − x₀ and is fed σ·T (diffusers' ``timesteps = sigmas * 1000``).
  SNR(σ) = ((1 − σ) / σ)², log-SNR λ = 2·log((1 − σ) / σ).

Both give :meth:`~NoiseProcess.add_noise`, :meth:`~NoiseProcess.target`, :meth:`~NoiseProcess.snr` /
:meth:`~NoiseProcess.log_snr`, :meth:`~NoiseProcess.model_timesteps` (what the network is fed),
:meth:`~NoiseProcess.level_snr` (the grid the clustering DP runs on) and :meth:`~NoiseProcess.pipeline_scheduler`
(the stock scheduler a saved pipeline ships). :func:`as_process` turns a diffusers scheduler into its process, so
every consumer takes either.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

NOISE_PROCESSES = ("ddpm", "flow")
# log-SNR is ±inf at σ = 0 and σ = 1; σ is kept this far inside (0, 1) where a weight or a cost reads it.
SIGMA_EPS = 1e-6


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` of shape (B,) as (B, 1, …, 1) in ``like``'s dtype and device, to scale a batch."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


class NoiseProcess:
    """The interface (see the module docstring). ``scheduler`` is the diffusers scheduler of training."""

    name: str
    continuous: bool
    prediction_type: str

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict for ``add_noise(clean, noise, t)``."""
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.snr(t).log()

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is fed for noise level ``t``."""
        return t

    def x0_weight_factor(self, snr: torch.Tensor) -> torch.Tensor:
        """What a loss weight on the x₀ error is multiplied by to weigh this process's target error the same way."""
        raise NotImplementedError

    def model_boundaries(self, boundaries: Sequence[int]) -> List:
        """Cluster boundaries in the coordinate the network is fed (what timestep-routed experts route on)."""
        return [int(b) for b in boundaries]

    def level_of(self, model_timestep):
        """The noise level whose network timestep is ``model_timestep`` (the inverse of :meth:`model_timesteps`)."""
        return model_timestep

    def level_snr(self) -> np.ndarray:
        """SNR of each of the T grid levels (float64), the values the clustering costs are computed from."""
        raise NotImplementedError

    def pipeline_scheduler(self, sampler: Optional[str] = None):
        """The stock scheduler a saved pipeline samples with."""
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """The process for ``training_regime.json`` and the card."""
        return {"noise_process": self.name}


class DDPMProcess(NoiseProcess):
    """Discrete DDPM time from a ``DDPMScheduler`` (or any scheduler with ``alphas_cumprod`` and ``add_noise``)."""

    name, continuous = "ddpm", False
    SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def add_noise(self, clean, noise, t):
        return self.scheduler.add_noise(clean, noise, t)

    def target(self, clean, noise, t):
        """ε (``"epsilon"``), v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (``"v_prediction"``, Salimans & Ho 2022) or x₀ (``"sample"``)."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, t)
        if kind == "sample":
            return clean
        raise ValueError(f"unknown prediction_type {kind!r}")

    def snr(self, t):
        return compute_snr(self.scheduler, t)  # diffusers' own, as its scripts' --snr_gamma

    def x0_weight_factor(self, snr):
        """x̂₀ − x₀ = −(ε̂ − ε)/√SNR for an ε target (factor 1/SNR), −(v̂ − v)·√(1 − ᾱ) for a v target (1/(SNR + 1))."""
        kind = self.prediction_type
        if kind == "epsilon":
            return 1 / snr
        if kind == "v_prediction":
            return 1 / (snr + 1)
        if kind == "sample":
            return torch.ones_like(snr)
        raise ValueError(f"unknown prediction_type {kind!r}")

    def level_snr(self) -> np.ndarray:
        a = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float64).numpy()[: self.num_train_timesteps]
        return a / (1 - a)

    def pipeline_scheduler(self, sampler: Optional[str] = None):
        """The training scheduler's config as a stock ``DDPMScheduler`` (``sampler="ddpm"``) or ``DDIMScheduler``;
        a ``training_regime`` entry (left by a base pipeline of the old layout) is dropped."""
        sampler = sampler or "ddpm"
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(self.SAMPLERS)}, got {sampler!r}")
        config = {k: v for k, v in self.scheduler.config.items() if k != "training_regime"}
        return self.SAMPLERS[sampler].from_config(config)


class FlowProcess(NoiseProcess):
    """Rectified flow from a ``FlowMatchEulerDiscreteScheduler`` config (its ``num_train_timesteps`` is T and its
    static ``shift`` maps t / T to σ; dynamic shifting is a sampling-time option and stays in the saved config)."""

    name, continuous, prediction_type = "flow", True, "flow"

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.shift = float(scheduler.config.shift)

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """σ = shift(t / T), float64 (a float32 σ loses the low-noise end's log-SNR)."""
        s = torch.as_tensor(t).double() / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def add_noise(self, clean, noise, t):
        sigma = _expand(self.sigmas(t), clean)
        return (1 - sigma) * clean + sigma * noise

    def target(self, clean, noise, t):
        """The velocity ε − x₀ (SD3, Flux: d x_σ / dσ)."""
        return noise - clean

    def snr(self, t):
        return self.log_snr(t).exp()

    def x0_weight_factor(self, snr):
        """x̂₀ − x₀ = −σ (v̂ − v), and σ = 1 / (1 + √SNR): the factor is σ²."""
        return 1 / (1 + snr.sqrt()) ** 2

    def log_snr(self, t):
        sigma = self.sigmas(t).clamp(SIGMA_EPS, 1 - SIGMA_EPS)
        return (2 * torch.log((1 - sigma) / sigma)).float()

    def model_timesteps(self, t):
        return (self.sigmas(t) * self.num_train_timesteps).float()

    def model_boundaries(self, boundaries):
        if self.shift == 1.0:  # σ·T = t: the integer grid boundaries route as they are
            return [int(b) for b in boundaries]
        return [float(b) for b in self.model_timesteps(torch.tensor([float(b) for b in boundaries], dtype=torch.float64))]

    def level_of(self, model_timestep):
        """t = T·s with σ = model_timestep / T and s = σ / (shift − (shift − 1)·σ), the inverse of the shift."""
        if self.shift == 1.0:
            return model_timestep
        sigma = float(model_timestep) / self.num_train_timesteps
        return self.num_train_timesteps * sigma / (self.shift - (self.shift - 1) * sigma)

    def level_snr(self) -> np.ndarray:
        """At the centre of each grid cell [i, i + 1)."""
        sigma = self.sigmas(torch.arange(self.num_train_timesteps, dtype=torch.float64) + 0.5).numpy()
        return ((1 - sigma) / sigma) ** 2

    def pipeline_scheduler(self, sampler: Optional[str] = None):
        if sampler not in (None, "flow_match_euler"):
            raise ValueError(f"a flow-matching pipeline samples with FlowMatchEulerDiscreteScheduler, not {sampler!r}")
        return FlowMatchEulerDiscreteScheduler.from_config(dict(self.scheduler.config))

    def describe(self) -> Dict[str, Any]:
        return {"noise_process": self.name, "flow_shift": self.shift}


def as_process(scheduler_or_process) -> NoiseProcess:
    """The process of a diffusers training scheduler (``FlowMatchEulerDiscreteScheduler`` → :class:`FlowProcess`,
    anything with ``alphas_cumprod`` → :class:`DDPMProcess`); a process is returned as it is."""
    if isinstance(scheduler_or_process, NoiseProcess):
        return scheduler_or_process
    if isinstance(scheduler_or_process, FlowMatchEulerDiscreteScheduler):
        return FlowProcess(scheduler_or_process)
    if hasattr(scheduler_or_process, "alphas_cumprod"):
        return DDPMProcess(scheduler_or_process)
    raise TypeError(f"no noise process for {type(scheduler_or_process).__name__}: expected a DDPM-style scheduler "
                    "(alphas_cumprod) or FlowMatchEulerDiscreteScheduler")


def process_from_config(config: Dict[str, Any]) -> NoiseProcess:
    """The process of a pretrained pipeline's scheduler config (``scheduler/scheduler_config.json``): rectified flow
    for a ``FlowMatch*`` scheduler, else DDPM from the config's betas (as diffusers' scripts build their
    ``DDPMScheduler`` from any SD scheduler config)."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return FlowProcess(FlowMatchEulerDiscreteScheduler.from_config(config))
    return DDPMProcess(DDPMScheduler.from_config(config))


def make_process(name: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 prediction_type: str = "epsilon", shift: float = 1.0) -> NoiseProcess:
    """A fresh process for training from scratch: ``"ddpm"`` (a ``DDPMScheduler`` of ``beta_schedule`` and
    ``prediction_type``) or ``"flow"`` (a ``FlowMatchEulerDiscreteScheduler`` of ``shift``)."""
    if name == "ddpm":
        return DDPMProcess(DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                         prediction_type=prediction_type))
    if name == "flow":
        return FlowProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift))
    raise ValueError(f"unknown noise process {name!r}; choose one of {NOISE_PROCESSES}")
