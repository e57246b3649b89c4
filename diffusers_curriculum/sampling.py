"""Timestep samplers: which denoising tasks a training batch holds.

A sampler draws noise levels t in ``[0, num_train_timesteps)``: integer DDPM timesteps, or, with
``continuous = True`` (set from the noise process, :mod:`diffusers_curriculum.noise`), real values whose grid cell
[i, i + 1) is level i of the clustering and of the per-level histories. Adaptive samplers learn from the
per-sample losses passed to :meth:`TimestepSampler.observe`. Every sampler owns its random generator, so
its draws are reproducible and survive checkpoint/resume through :meth:`state_dict`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from .clustering import bucketize, check_boundaries


def real_uniform(low, high, fraction: torch.Tensor) -> torch.Tensor:
    """low + fraction·(high − low) as float32, kept below ``high`` (fraction in [0, 1]): rounding to float32 must
    not carry a draw into the next cluster or onto T."""
    high = torch.as_tensor(high, dtype=torch.float32)
    values = (low + fraction * (torch.as_tensor(high, dtype=torch.float64) - low)).float()
    return torch.minimum(values, torch.nextafter(high, torch.full_like(high, -float("inf"))))


def uniform_levels(low, high, batch_size: int, generator: torch.Generator, continuous: bool) -> torch.Tensor:
    """Uniform noise levels on [low, high): integers (DDPM), or float32 reals (flow, :func:`real_uniform`)."""
    if continuous:
        return real_uniform(low, high, torch.rand(batch_size, generator=generator, dtype=torch.float64))
    return torch.randint(low, high, (batch_size,), generator=generator)


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

    # Real-valued noise levels (rectified flow) instead of integer timesteps (DDPM).
    continuous = False

    def sample(
        self, batch_size: int, device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Returns ``batch_size`` noise levels of shape ``(batch_size,)`` on ``device``: a LongTensor, or float32
        when :attr:`continuous`.

        Draws on the sampler's own generator unless a CPU ``generator`` is given.
        """
        draws = self._draw(batch_size, self.generator if generator is None else generator)
        return draws.to(device=device, dtype=torch.float32 if self.continuous else torch.long)

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _uniform(self, low, high, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform draws on [low, high): integers, or reals when :attr:`continuous`."""
        return uniform_levels(low, high, batch_size, generator, self.continuous)

    def _within_levels(self, levels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Grid levels drawn by index (weighted samplers) as noise levels: uniform inside each cell when
        :attr:`continuous`, the integer levels themselves otherwise."""
        if self.continuous:
            return real_uniform(levels, levels + 1, torch.rand(levels.shape[0], generator=generator, dtype=torch.float64))
        return levels

    # True for samplers that learn from losses: the regime then gathers every rank's losses for observe.
    observes_losses = False
    # True for samplers paced by each optimizer step's rank-averaged loss (the curriculum's ``advance``).
    needs_step_loss = False

    def observe(self, timesteps: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Receives the losses of the last batch; non-adaptive samplers ignore them."""

    def importance_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample loss factors that make the batch loss an unbiased estimate of the uniform-t objective
        under this sampler's distribution (importance sampling); None for samplers that change the objective
        on purpose (logit-normal, SpeeD, intervals, ...)."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class UniformSampler(TimestepSampler):
    """t ~ U{0, …, T-1} (DDPM, Ho et al. 2020)."""

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self._uniform(0, self.num_train_timesteps, batch_size, generator)


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
        return self._uniform(self.low, self.high, batch_size, generator)


class DensitySampler(TimestepSampler):
    """t = ⌊T · u⌋ with u ∈ [0, 1] drawn by diffusers' ``compute_density_for_timestep_sampling`` (SD3's
    densities) under ``scheme`` and ``density_kwargs``; the subclasses name a scheme and its parameters."""

    scheme: str

    def density_kwargs(self) -> Dict[str, float]:
        raise NotImplementedError

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = compute_density_for_timestep_sampling(self.scheme, batch_size, generator=generator, **self.density_kwargs())
        if self.continuous:  # t = T·u on [0, T): u = 1 (a float32 sigmoid can round to it) is kept just below T
            return real_uniform(0, self.num_train_timesteps, u.double().clamp(0, 1))
        return (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)


class LogitNormalSampler(DensitySampler):
    """t = ⌊T · sigmoid(u)⌋ with u ~ N(mean, std²) (Esser et al. 2024, SD3; diffusers'
    ``compute_density_for_timestep_sampling(weighting_scheme="logit_normal")``). Concentrates the
    batch on middle timesteps."""

    scheme = "logit_normal"

    def __init__(self, num_train_timesteps: int, mean: float = 0.0, std: float = 1.0, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        if not std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def density_kwargs(self) -> Dict[str, float]:
        return {"logit_mean": self.mean, "logit_std": self.std}


class ModeSampler(DensitySampler):
    """t = ⌊T · u'⌋ with u' = 1 − u − s·(cos²(πu/2) − 1 + u), u ~ U(0, 1): SD3's mode sampling (diffusers'
    ``compute_density_for_timestep_sampling(weighting_scheme="mode")``, ``--mode_scale`` s). s > 0 favours
    the middle of the range, s < 0 its ends."""

    scheme = "mode"

    def __init__(self, num_train_timesteps: int, mode_scale: float = 1.29, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        self.mode_scale = float(mode_scale)

    def density_kwargs(self) -> Dict[str, float]:
        return {"mode_scale": self.mode_scale}


class WeightedSampler(TimestepSampler):
    """t drawn from fixed per-timestep weights (normalised); the base of the biased samplers below."""

    def __init__(self, num_train_timesteps: int, weights: torch.Tensor, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_train_timesteps,) or bool((weights < 0).any()) or not weights.sum() > 0:
            raise ValueError(f"weights must be {num_train_timesteps} non-negative values with a positive sum")
        self.weights = weights / weights.sum()

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        levels = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        return self._within_levels(levels, generator)


def timestep_bias_weights(num_train_timesteps: int, strategy: str = "none", multiplier: float = 1.0,
                          portion: float = 0.25, begin: int = 0, end: int = 1000) -> torch.Tensor:
    """diffusers' SDXL ``--timestep_bias_strategy``: ``earlier`` / ``later`` multiply the weight of the first /
    last ``portion`` of the timesteps by ``multiplier``; ``range`` biases [``begin``, ``end``)."""
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    if strategy == "none":
        return weights
    count = int(num_train_timesteps * portion)
    if strategy == "later":
        weights[-count:] *= multiplier
    elif strategy == "earlier":
        weights[:count] *= multiplier
    elif strategy == "range":
        if not 0 <= begin < end <= num_train_timesteps:
            raise ValueError(f"timestep bias range [{begin}, {end}) is not inside [0, {num_train_timesteps})")
        weights[begin:end] *= multiplier
    else:
        raise ValueError(f"unknown timestep bias strategy {strategy!r}")
    return weights


def speed_weights(num_train_timesteps: int, tau: float = 0.7, suppression: float = 0.25) -> torch.Tensor:
    """SpeeD-style asymmetric sampling (Wang et al. 2024): timesteps above ``tau``·T, the convergence area
    where the loss is near zero, are drawn ``suppression`` times as often as the rest."""
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    weights[int(tau * num_train_timesteps):] *= suppression
    return weights


class LossAwareSampler(TimestepSampler):
    """IDDPM's loss-second-moment resampling (Nichol & Dhariwal 2021): p(t) ∝ sqrt(E[L_t²]) over the last
    ``history`` losses at t, mixed with ``uniform_prob`` of uniform; uniform until every t has a full history.
    As in IDDPM, every sample's loss is weighted by 1 / (T·p(t)) (:meth:`importance_weights`), so the
    objective stays the uniform-t one and only the variance of its estimate changes: without those weights
    the draws pile onto the high-loss (low-noise) timesteps and the others are neglected.
    Losses must be the same on every rank (the regime gathers them)."""

    observes_losses = True

    def __init__(self, num_train_timesteps: int, history: int = 10, uniform_prob: float = 0.001, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = torch.zeros(num_train_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_train_timesteps, dtype=torch.long)

    def weights(self) -> torch.Tensor:
        if bool((self.counts < self.history).any()):
            return torch.full((self.num_train_timesteps,), 1.0 / self.num_train_timesteps, dtype=torch.float64)
        weights = self.losses.pow(2).mean(dim=1).sqrt()
        weights = weights / weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / self.num_train_timesteps

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        levels = torch.multinomial(self.weights(), batch_size, replacement=True, generator=generator)
        return self._within_levels(levels, generator)

    def importance_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """1 / (T·p(t)) under the distribution the batch was drawn from (no loss is observed in between); p is
        per grid level, so for real-valued levels it is the density on the level's cell."""
        p = self.weights()[timesteps.cpu().long()]
        return (1.0 / (self.num_train_timesteps * p)).float().to(timesteps.device)

    def observe(self, timesteps: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        for t, loss in zip(timesteps.long().tolist(), per_sample_loss.double().cpu().tolist()):
            if self.counts[t] == self.history:
                self.losses[t, :-1] = self.losses[t, 1:].clone()
                self.losses[t, -1] = loss
            else:
                self.losses[t, self.counts[t]] = loss
                self.counts[t] += 1

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


class StratifiedSampler(TimestepSampler):
    """Each draw of B timesteps holds ⌊B/k⌋ from every cluster (uniform inside it) and one more from
    ``B mod k`` clusters picked at random; draws are grouped by cluster (ANT, Go et al. 2023)."""

    def __init__(self, num_train_timesteps: int, boundaries: Sequence[int], seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        self.boundaries = torch.tensor(check_boundaries(boundaries), dtype=torch.long)
        if int(self.boundaries[-1]) != num_train_timesteps:
            raise ValueError(f"boundaries {list(boundaries)} must end at T={num_train_timesteps}")

    @property
    def k(self) -> int:
        return len(self.boundaries) - 1

    def counts(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        counts = torch.full((self.k,), batch_size // self.k, dtype=torch.long)
        counts[torch.randperm(self.k, generator=generator)[: batch_size % self.k]] += 1
        return counts

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        cluster = torch.repeat_interleave(torch.arange(self.k), self.counts(batch_size, generator))
        low, high = self.boundaries[cluster], self.boundaries[cluster + 1]
        if self.continuous:
            return real_uniform(low, high, torch.rand(batch_size, generator=generator, dtype=torch.float64))
        return low + (torch.rand(batch_size, generator=generator) * (high - low)).long().clamp_max(high - low - 1)

    def cluster_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Cluster index of each timestep."""
        return bucketize(timesteps, self.boundaries)


class GroupCycleSampler(StratifiedSampler):
    """One cluster per optimizer step, in turn: every draw holds timesteps of cluster :attr:`current` only
    (uniform inside it) until :meth:`next_cluster` moves on to the next (TDC's round-robin stage 2: each step
    fine-tunes one expert on a full batch of its own timesteps)."""

    def __init__(self, num_train_timesteps: int, boundaries: Sequence[int], seed: int = 0):
        super().__init__(num_train_timesteps, boundaries, seed)
        self.current = 0

    def next_cluster(self) -> None:
        self.current = (self.current + 1) % self.k

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        low, high = int(self.boundaries[self.current]), int(self.boundaries[self.current + 1])
        return self._uniform(low, high, batch_size, generator)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "current": self.current}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.current = int(state["current"])
