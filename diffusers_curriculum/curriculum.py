"""Difficulty-based curriculum over timesteps (Kim, Go, Kwon, Kim — arXiv 2403.10348).

Low timesteps are the hard denoising tasks. [0, T) is cut into N contiguous clusters, ordered easy → hard
(high t → low t). Stage n (1..N) trains on the union of the n easiest clusters, which is the interval
[low_n, T); the last stage is the full range, and training stays there until the end. A pacing policy
decides when to advance: adaptive (the stage's smoothed loss stopped improving) or fixed steps per stage.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .clustering import boundaries_to_clusters, cluster_intervals, interval_costs
from .errors import UsageError
from .regimes import REGIMES, TrainingRegime
from .sampling import IntervalSampler

Cluster = Tuple[int, int]  # [start, end)


def equal_clusters(num_train_timesteps: int, num_clusters: int) -> List[Cluster]:
    """[0, T) cut into ``num_clusters`` contiguous intervals whose sizes differ by at most one."""
    if not 1 <= num_clusters <= num_train_timesteps:
        raise ValueError(f"num_clusters must be in [1, {num_train_timesteps}], got {num_clusters}")
    edges = [round(i * num_train_timesteps / num_clusters) for i in range(num_clusters + 1)]
    return [(edges[i], edges[i + 1]) for i in range(num_clusters)]


def check_clusters(clusters: Sequence[Cluster], num_train_timesteps: int) -> None:
    """Raises ValueError unless ``clusters`` are non-empty, sorted and cover [0, T) exactly."""
    expected_start = 0
    for start, end in clusters:
        if start != expected_start or not end > start:
            raise ValueError(f"clusters {list(clusters)} must be non-empty, contiguous and start at 0")
        expected_start = end
    if expected_start != num_train_timesteps:
        raise ValueError(f"clusters {list(clusters)} must end at T={num_train_timesteps}")


def stage_interval(clusters: Sequence[Cluster], stage: int) -> Cluster:
    """Timesteps of ``stage`` (1-based): the union of the ``stage`` easiest (highest-t) clusters."""
    if not 1 <= stage <= len(clusters):
        raise ValueError(f"stage must be in [1, {len(clusters)}], got {stage}")
    return clusters[len(clusters) - stage][0], clusters[-1][1]


# ---- pacing ---------------------------------------------------------------------------------------------
@dataclass
class FixedPacing:
    """Advance after exactly ``steps_per_stage`` optimizer steps in a stage."""

    steps_per_stage: int
    stage_steps: int = 0

    STATE_FIELDS = ("stage_steps",)

    def update(self, loss: float) -> bool:
        self.stage_steps += 1
        if self.stage_steps >= self.steps_per_stage:
            self.stage_steps = 0
            return True
        return False


@dataclass
class AdaptivePacing:
    """Advance when the stage's smoothed loss has not improved on its best for ``patience`` consecutive
    checks (one every ``check_every`` steps), or after ``max_stage_steps`` steps in the stage.

    The smoothed loss is an exponential moving average with factor ``smoothing``; an improvement must
    beat the best by the relative margin ``min_delta``.
    """

    patience: int
    check_every: int
    max_stage_steps: Optional[int] = None
    smoothing: float = 0.9
    min_delta: float = 0.0
    stage_steps: int = 0
    smoothed: Optional[float] = None
    best: Optional[float] = None
    bad_checks: int = 0

    STATE_FIELDS = ("stage_steps", "smoothed", "best", "bad_checks")

    def update(self, loss: float) -> bool:
        self.stage_steps += 1
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self.stage_steps % self.check_every == 0:
            if self.best is None or self.smoothed < self.best * (1 - self.min_delta):
                self.best, self.bad_checks = self.smoothed, 0
            else:
                self.bad_checks += 1
        if self.bad_checks >= self.patience or (self.max_stage_steps is not None and self.stage_steps >= self.max_stage_steps):
            self.stage_steps, self.smoothed, self.best, self.bad_checks = 0, None, None, 0
            return True
        return False


# ---- the regime -------------------------------------------------------------------------------------------
class CurriculumRegime(TrainingRegime):
    """``--regime curriculum``: stage-wise easy → hard timestep sampling with adaptive or fixed pacing.

    Pacing is decided from the loss averaged over all ranks (``accelerator.reduce``), so every rank takes
    the same stage at the same step; stage, pacing state and history are checkpointed with the regime.
    """

    name = "curriculum"

    def __init__(self, noise_scheduler, sampler: IntervalSampler, clusters: Sequence[Cluster], pacing, **kwargs):
        super().__init__(noise_scheduler, sampler, **kwargs)
        check_clusters(clusters, noise_scheduler.config.num_train_timesteps)
        self.clusters = [tuple(c) for c in clusters]
        self.pacing = pacing
        self.stage = 1
        self.stage_history: List[Dict[str, int]] = [{"stage": 1, "start_step": 0, "t_min": self._low()}]
        self._loss_sum, self._loss_count = 0.0, 0
        self.sampler.set_interval(*stage_interval(self.clusters, self.stage))

    def _low(self) -> int:
        return stage_interval(self.clusters, self.stage)[0]

    @property
    def num_stages(self) -> int:
        return len(self.clusters)

    # flags
    @classmethod
    def add_regime_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("curriculum regime (--regime curriculum)")
        group.add_argument("--curriculum_clusters", type=int, default=20, help="Number of equal timestep clusters N.")
        group.add_argument(
            "--curriculum_cluster_cost", type=str, default="equal", choices=["equal", "timestep", "snr", "log_snr"],
            help="Stage clusters: equal intervals, or ANT's interval DP under this cost.",
        )
        group.add_argument("--curriculum_pacing", type=str, default="adaptive", choices=["adaptive", "fixed"])
        group.add_argument("--curriculum_patience", type=int, default=5, help="Adaptive: non-improving checks before advancing.")
        group.add_argument("--curriculum_check_every", type=int, default=50, help="Adaptive: steps between checks.")
        group.add_argument("--curriculum_max_stage_steps", type=int, default=None, help="Adaptive: step cap per stage.")
        group.add_argument("--curriculum_steps_per_stage", type=int, default=None, help="Fixed pacing: steps per stage.")

    @classmethod
    def validate_regime_args(cls, args: argparse.Namespace, num_train_timesteps: Optional[int] = None) -> None:
        if args.curriculum_clusters < 1 or (num_train_timesteps is not None and args.curriculum_clusters > num_train_timesteps):
            raise UsageError(
                f"--curriculum_clusters must be in [1, {num_train_timesteps or 'T'}] (the scheduler's number of timesteps), "
                f"got {args.curriculum_clusters}"
            )
        if args.curriculum_pacing == "fixed":
            if args.curriculum_steps_per_stage is None or args.curriculum_steps_per_stage < 1:
                raise UsageError(f"--curriculum_pacing fixed needs --curriculum_steps_per_stage >= 1, got {args.curriculum_steps_per_stage}")
            if args.curriculum_max_stage_steps is not None:
                raise UsageError("--curriculum_max_stage_steps applies to adaptive pacing; fixed pacing uses --curriculum_steps_per_stage")
        else:
            if args.curriculum_steps_per_stage is not None:
                raise UsageError("--curriculum_steps_per_stage needs --curriculum_pacing fixed (adaptive pacing uses --curriculum_patience)")
            for flag in ("curriculum_patience", "curriculum_check_every"):
                if getattr(args, flag) < 1:
                    raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
            if args.curriculum_max_stage_steps is not None and args.curriculum_max_stage_steps < 1:
                raise UsageError(f"--curriculum_max_stage_steps must be >= 1, got {args.curriculum_max_stage_steps}")
        if args.timestep_sampling != "uniform":
            raise UsageError(f"--timestep_sampling {args.timestep_sampling} does not apply to --regime curriculum (stages sample uniformly)")

    @classmethod
    def sampler_from_args(cls, args: argparse.Namespace, noise_scheduler) -> IntervalSampler:
        return IntervalSampler(noise_scheduler.config.num_train_timesteps, seed=0 if args.seed is None else args.seed)

    @classmethod
    def extra_kwargs_from_args(cls, args: argparse.Namespace, noise_scheduler) -> Dict[str, Any]:
        if args.curriculum_pacing == "fixed":
            pacing = FixedPacing(args.curriculum_steps_per_stage)
        else:
            pacing = AdaptivePacing(args.curriculum_patience, args.curriculum_check_every, args.curriculum_max_stage_steps)
        T = noise_scheduler.config.num_train_timesteps
        if args.curriculum_cluster_cost == "equal":
            clusters = equal_clusters(T, args.curriculum_clusters)
        else:  # ANT's interval DP (timestep, SNR or log-SNR cost) decides the stage boundaries
            costs = interval_costs(args.curriculum_cluster_cost, T, alphas_cumprod=noise_scheduler.alphas_cumprod)
            clusters = boundaries_to_clusters(cluster_intervals(costs, args.curriculum_clusters)[0])
        return {"clusters": clusters, "pacing": pacing}

    # the step
    def backward(self, accelerator, per_sample_loss, timesteps, model=None):
        loss = super().backward(accelerator, per_sample_loss, timesteps, model)
        self._loss_sum += float(per_sample_loss.detach().mean())
        self._loss_count += 1
        return loss

    def on_step_end(self, accelerator, global_step: int) -> Dict[str, Any]:
        local = torch.tensor(self._loss_sum / max(self._loss_count, 1), device=accelerator.device)
        step_loss = float(accelerator.reduce(local, reduction="mean"))
        self._loss_sum, self._loss_count = 0.0, 0
        if self.stage < self.num_stages and self.pacing.update(step_loss):
            self.stage += 1
            self.sampler.set_interval(*stage_interval(self.clusters, self.stage))
            self.stage_history.append({"stage": self.stage, "start_step": global_step, "t_min": self._low()})
        return {**super().on_step_end(accelerator, global_step), "curriculum_stage": self.stage, "curriculum_t_min": self._low()}

    # records
    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        info.update(
            clusters=[list(c) for c in self.clusters],
            order="easy_to_hard (high t first)",
            pacing={"policy": type(self.pacing).__name__,
                    **{k: v for k, v in asdict(self.pacing).items() if k not in self.pacing.STATE_FIELDS}},
            stage_history=list(self.stage_history),
        )
        return info

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage, "stage_history": list(self.stage_history),
                "pacing": {k: getattr(self.pacing, k) for k in self.pacing.STATE_FIELDS}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage, self.stage_history = state["stage"], list(state["stage_history"])
        for key, value in state["pacing"].items():
            setattr(self.pacing, key, value)
        self.sampler.set_interval(*stage_interval(self.clusters, self.stage))


REGIMES["curriculum"] = CurriculumRegime
