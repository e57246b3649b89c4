"""``--regime ant``: clustered multi-task training (ANT, Go et al., NeurIPS 2023).

Timesteps are interval-clustered by the DP of :mod:`diffusers_curriculum.clustering` (timestep, SNR,
log-SNR or task-affinity cost). Every batch is stratified — ⌊B/k⌋ samples per cluster, the remainder spread
over clusters chosen at random — the per-cluster losses come from the one forward pass, and an MTL
balancer from :mod:`diffusers_curriculum.mtl` (UW, PCGrad, NashMTL) turns them into gradients.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .clustering import COSTS, boundaries_to_clusters, cluster_intervals, interval_costs
from .errors import UsageError, describe_exception
from .mtl import BALANCERS, Balancer, build_balancer
from .regimes import REGIMES, TrainingRegime
from .sampling import TimestepSampler


class StratifiedSampler(TimestepSampler):
    """Each draw of B timesteps holds ⌊B/k⌋ from every cluster (uniform inside it) and one more from
    ``B mod k`` clusters picked at random; draws are grouped by cluster."""

    def __init__(self, num_train_timesteps: int, boundaries: Sequence[int], seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        self.boundaries = torch.tensor(list(boundaries), dtype=torch.long)

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
        return low + (torch.rand(batch_size, generator=generator) * (high - low)).long().clamp_max(high - low - 1)

    def cluster_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Cluster index of each timestep."""
        return torch.bucketize(timesteps, self.boundaries[1:-1].to(timesteps.device), right=True)


def cluster_boundaries(cost: str, k: int, noise_scheduler, affinity: Optional[np.ndarray] = None,
                       group_size: int = 1) -> List[int]:
    """DP boundaries for ``cost``; with an affinity matrix over groups of ``group_size`` timesteps the DP runs
    on groups and the boundaries are scaled back to timesteps."""
    T = noise_scheduler.config.num_train_timesteps
    if cost == "affinity":
        n = affinity.shape[0]
        costs = interval_costs("affinity", n, affinity=affinity)
        boundaries, _ = cluster_intervals(costs, k)
        return [min(T, b * group_size) for b in boundaries[:-1]] + [T]
    costs = interval_costs(cost, T, alphas_cumprod=noise_scheduler.alphas_cumprod)
    return cluster_intervals(costs, k)[0]


class ANTRegime(TrainingRegime):
    name = "ant"

    def __init__(self, noise_scheduler, sampler: StratifiedSampler, balancer: Balancer, cost: str = "log_snr", **kwargs):
        super().__init__(noise_scheduler, sampler, **kwargs)
        self.balancer, self.cost = balancer, cost
        self.optimizer_steps = 0

    @property
    def clusters(self) -> List[Tuple[int, int]]:
        return boundaries_to_clusters(self.sampler.boundaries.tolist())

    # flags
    @classmethod
    def add_regime_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ANT regime (--regime ant)")
        group.add_argument("--ant_clusters", type=int, default=5, help="Number of timestep clusters k.")
        group.add_argument("--ant_cost", type=str, default="log_snr", choices=COSTS, help="Interval-clustering cost.")
        group.add_argument("--ant_affinity_path", type=str, default=None, help="affinity.npz from `python -m diffusers_curriculum.affinity` (for --ant_cost affinity).")
        group.add_argument("--ant_method", type=str, default="uw", choices=BALANCERS, help="MTL balancer.")
        group.add_argument("--uw_lr", type=float, default=0.025, help="Learning rate of the UW log-variances.")
        group.add_argument("--nash_update_every", type=int, default=25, help="Steps between Nash bargaining solves.")

    @classmethod
    def validate_regime_args(cls, args: argparse.Namespace, num_train_timesteps: Optional[int] = None) -> None:
        T = num_train_timesteps
        if args.ant_clusters < 1 or (T is not None and args.ant_clusters > T):
            raise UsageError(f"--ant_clusters must be in [1, {T or 'T'}] (the scheduler's number of timesteps), got {args.ant_clusters}")
        if args.ant_cost == "affinity":
            if args.ant_affinity_path is None:
                raise UsageError("--ant_cost affinity needs --ant_affinity_path (made by `python -m diffusers_curriculum.affinity`)")
            affinity, group_size = load_affinity(args.ant_affinity_path)
            if T is not None and (affinity.shape[0] * group_size < T or (affinity.shape[0] - 1) * group_size >= T):
                raise UsageError(f"--ant_affinity_path: {affinity.shape[0]} groups of {group_size} do not cover T={T} timesteps")
            if args.ant_clusters > affinity.shape[0]:
                raise UsageError(f"--ant_clusters {args.ant_clusters} exceeds the {affinity.shape[0]} affinity groups")
        elif args.ant_affinity_path is not None:
            raise UsageError("--ant_affinity_path is only used with --ant_cost affinity")
        if not args.uw_lr > 0:
            raise UsageError(f"--uw_lr must be > 0, got {args.uw_lr}")
        if args.nash_update_every < 1:
            raise UsageError(f"--nash_update_every must be >= 1, got {args.nash_update_every}")
        if args.ant_method in ("pcgrad", "nash") and getattr(args, "mixed_precision", "no") == "fp16":
            raise UsageError(f"--ant_method {args.ant_method} forms gradients itself and does not support --mixed_precision fp16; use bf16 or no")
        if args.timestep_sampling != "uniform":
            raise UsageError(f"--timestep_sampling {args.timestep_sampling} does not apply to --regime ant (batches are stratified)")

    @classmethod
    def sampler_from_args(cls, args: argparse.Namespace, noise_scheduler) -> StratifiedSampler:
        affinity, group_size = load_affinity(args.ant_affinity_path) if args.ant_cost == "affinity" else (None, 1)
        boundaries = cluster_boundaries(args.ant_cost, args.ant_clusters, noise_scheduler, affinity, group_size)
        seed = 0 if args.seed is None else args.seed
        return StratifiedSampler(noise_scheduler.config.num_train_timesteps, boundaries, seed=seed)

    @classmethod
    def extra_kwargs_from_args(cls, args: argparse.Namespace, noise_scheduler) -> Dict[str, Any]:
        seed = 0 if args.seed is None else args.seed
        balancer = build_balancer(args.ant_method, args.ant_clusters, args.uw_lr, args.nash_update_every, seed=seed)
        return {"balancer": balancer, "cost": args.ant_cost}

    # the step
    def forward_context(self, accelerator, model):
        if self.balancer.needs_manual_sync(self.optimizer_steps):
            return accelerator.no_sync(model)  # the balancer averages its per-cluster gradients itself
        return super().forward_context(accelerator, model)

    def cluster_losses(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor):
        """(k,) mean (weighted) loss per cluster over this rank's batch, and which clusters are present."""
        losses = self.weighted(per_sample_loss, timesteps)
        index = self.sampler.cluster_of(timesteps)
        k = self.sampler.k
        sums = torch.zeros(k, device=losses.device, dtype=losses.dtype).index_add(0, index, losses)
        counts = torch.bincount(index, minlength=k).to(losses.device)
        return sums / counts.clamp_min(1), counts > 0

    def backward(self, accelerator, per_sample_loss, timesteps, model=None):
        losses, present = self.cluster_losses(per_sample_loss, timesteps)
        return self.balancer.backward(accelerator, losses, present, model, self.optimizer_steps)

    def on_step_end(self, accelerator, global_step: int) -> Dict[str, Any]:
        logs = {**super().on_step_end(accelerator, global_step), **self.balancer.on_step_end(accelerator)}
        self.optimizer_steps += 1
        return logs

    # records
    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        info.update(cost=self.cost, clusters=[list(c) for c in self.clusters], **self.balancer.describe())
        return info

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "balancer": self.balancer.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.balancer.load_state_dict(state["balancer"])
        self.optimizer_steps = state["optimizer_steps"]


def load_affinity(path: str) -> Tuple[np.ndarray, int]:
    """(affinity matrix, group size) from an ``affinity.npz`` written by ``diffusers_curriculum.affinity``."""
    try:
        with np.load(path) as f:
            return f["affinity"], int(f["group_size"])
    except Exception as e:
        raise UsageError(f"--ant_affinity_path {path}: cannot read an affinity matrix ({describe_exception(e)})") from None


REGIMES["ant"] = ANTRegime
