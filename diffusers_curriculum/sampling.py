"""Timestep samplers: which denoising tasks a training batch holds.

A sampler draws integer DDPM timesteps in ``[0, num_train_timesteps)``. Adaptive samplers learn from the
per-sample losses passed to :meth:`TimestepSampler.observe`. Every sampler owns its random generator, so
its draws are reproducible and survive checkpoint/resume through :meth:`state_dict`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


class TimestepSampler:
    """Base class. Subclasses implement :meth:`_draw` on the sampler's own CPU generator.

    Args:
        num_train_timesteps: T, the number of discrete training timesteps.
        seed: seed of the sampler's generator. Give each data-parallel rank its own seed.
    """

    def __init__(self, num_train_timesteps: int, seed: int = 0):
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.generator = torch.Generator().manual_seed(seed)

    def sample(
        self, batch_size: int, device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None
    ) -> torch.LongTensor:
        """Returns ``batch_size`` timesteps, a LongTensor of shape ``(batch_size,)`` on ``device``.

        Draws on the sampler's own generator unless a CPU ``generator`` is given.
        """
        draws = self._draw(batch_size, self.generator if generator is None else generator)
        return draws.to(device=device, dtype=torch.long)

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, timesteps: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Receives the losses of the last batch; non-adaptive samplers ignore them."""

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class UniformSampler(TimestepSampler):
    """t ~ U{0, …, T-1} (DDPM, Ho et al. 2020)."""

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)


class IntervalSampler(TimestepSampler):
    """t ~ U{low, …, high-1}: uniform over one contiguous interval of timesteps."""

    def __init__(self, num_train_timesteps: int, low: int = 0, high: Optional[int] = None, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        self.set_interval(low, num_train_timesteps if high is None else high)

    def set_interval(self, low: int, high: int) -> None:
        if not 0 <= low < high <= self.num_train_timesteps:
            raise ValueError(f"interval [{low}, {high}) is not a non-empty part of [0, {self.num_train_timesteps})")
        self.low, self.high = int(low), int(high)

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.low, self.high, (batch_size,), generator=generator)


class LogitNormalSampler(TimestepSampler):
    """t = ⌊T · sigmoid(u)⌋ with u ~ N(mean, std²) (Esser et al. 2024, SD3; diffusers'
    ``compute_density_for_timestep_sampling(weighting_scheme="logit_normal")``). Concentrates the
    batch on middle timesteps."""

    def __init__(self, num_train_timesteps: int, mean: float = 0.0, std: float = 1.0, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        if not std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(batch_size, generator=generator) * self.std + self.mean
        t = (torch.sigmoid(u) * self.num_train_timesteps).long()
        return t.clamp_(0, self.num_train_timesteps - 1)


SAMPLERS = {"uniform": UniformSampler, "logit_normal": LogitNormalSampler}
