"""The timestep axis: which denoising tasks a batch holds (``--timestep_sampling``).

Every source is a :class:`~diffusers_curriculum.sampling.TimestepSampler` built from plain values: uniform,
logit-normal (SD3), SpeeD, diffusers' SDXL timestep bias, IDDPM's loss-aware resampling, stratified over the
clusters (ANT), and the difficulty curriculum (Kim et al., arXiv 2403.10348) defined here: [0, T) cut into
N clusters ordered easy → hard (high t → low t); stage n trains on the union of the n easiest clusters,
[low_n, T); the last stage is the full range and training stays there. A pacing policy decides when to
advance: fixed steps per stage, or adaptive (the stage's smoothed loss stopped improving, or a step cap).

``two_phase`` is the Curriculum Sampling of Sun (arXiv 2603.12517, 2026), written for flow matching: a
middle-biased logit-normal density first (fast structure), uniform after a switch step (the boundary levels,
where the per-level loss is U-shaped and stays high).

Under rectified flow the same samplers draw real-valued levels (``continuous``); the clusters stay intervals of
the noise-level grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..clustering import boundaries_to_clusters, check_boundaries
from ..sampling import (
    LogitNormalSampler, LossAwareSampler, ModeSampler, StratifiedSampler, TimestepSampler, UniformSampler, WeightedSampler,
    speed_weights, timestep_bias_weights,
)

# Sources that need the clusters.
CLUSTERED = ("stratified", "curriculum")

Cluster = Tuple[int, int]  # [start, end)


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


def stage_step_cap(max_train_steps: int, share: float, num_stages: int) -> int:
    """Steps per stage that keep the curriculum within ``share`` of a ``max_train_steps`` run: ⌊share · steps / N⌋
    (at least 1), so the N − 1 stages before the full range end by step share · steps · (N − 1) / N.

    The default share, 0.2 with N = 5 stages, is the setting of the curriculum sweep that ended ahead of uniform
    (benchmarks/RESULTS.md, "How much warm-up the curriculum should get")."""
    return max(1, int(share * max_train_steps / num_stages))


def stage_steps_range(pacing) -> Tuple[int, Optional[int]]:
    """(fewest, most) optimizer steps a stage can last under ``pacing``; ``None`` when nothing bounds it.

    Fixed pacing lasts exactly its steps. Adaptive pacing checks every ``check_every`` steps: the first check sets the
    best loss, so ``patience`` failed checks after it end a stage at step (patience + 1) · check_every at the
    earliest; ``max_stage_steps`` ends it at the latest."""
    if isinstance(pacing, FixedPacing):
        return pacing.steps_per_stage, pacing.steps_per_stage
    fewest = (pacing.patience + 1) * pacing.check_every
    if pacing.max_stage_steps is None:
        return fewest, None
    return min(fewest, pacing.max_stage_steps), pacing.max_stage_steps


def steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


def curriculum_outlook(num_stages: int, pacing, max_train_steps: int) -> Optional[str]:
    """What a ``max_train_steps`` run can expect of an ``num_stages``-stage curriculum: ``None`` when it surely
    reaches its last stage (the full range) with steps to spare, else a sentence naming the numbers.

    Raises :class:`ValueError` when the run cannot even leave its first stage: it would train on the easiest
    cluster only."""
    if num_stages < 2:
        return None
    fewest, most = stage_steps_range(pacing)
    if fewest >= max_train_steps:
        raise ValueError(f"the curriculum's first stage lasts at least {steps(fewest)}, so a {max_train_steps}-step run never "
                         f"leaves it and trains only on its easiest cluster")
    transitions = num_stages - 1
    if fewest * transitions >= max_train_steps:
        reachable = 1 + (max_train_steps - 1) // fewest
        return (f"the curriculum cannot reach its last stage in {max_train_steps} steps: each of its {num_stages} stages "
                f"lasts at least {steps(fewest)}, so the run ends in stage {reachable} of {num_stages} at best and never "
                f"trains the full range")
    if most is None or most * transitions >= max_train_steps:
        length = f"{steps(fewest)} or more, with no cap" if most is None else f"{fewest} to {steps(most)}"
        return (f"the curriculum may not reach its last stage in {max_train_steps} steps: each of its {num_stages} stages "
                f"lasts {length}, and {transitions} stage changes come before the full range")
    return None


def describe_pacing(pacing) -> Dict[str, Any]:
    """The pacing's settings (not its running state), for the record."""
    return {"policy": type(pacing).__name__, **{k: v for k, v in asdict(pacing).items() if k not in pacing.STATE_FIELDS}}


# ---- the curriculum ---------------------------------------------------------------------------------------
class CurriculumSampler(TimestepSampler):
    """Uniform timesteps over the current stage's interval; :meth:`advance` feeds the pacing one step's loss.

    The loss must be the same on every rank (the regime all-reduces it), so every rank takes the same stage at
    the same step; stage, pacing state and stage history are part of :meth:`state_dict`.
    """

    needs_step_loss = True

    def __init__(self, num_train_timesteps: int, boundaries: Sequence[int], pacing, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        self.clusters = boundaries_to_clusters(check_boundaries(boundaries))
        if self.clusters[-1][1] != num_train_timesteps:
            raise ValueError(f"boundaries {list(boundaries)} must end at T={num_train_timesteps}")
        self.pacing = pacing
        self.stage = 1
        self.stage_history: List[Dict[str, int]] = [{"stage": 1, "start_step": 0, "t_min": self.t_min}]

    @property
    def num_stages(self) -> int:
        return len(self.clusters)

    @property
    def t_min(self) -> int:
        return stage_interval(self.clusters, self.stage)[0]

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self._uniform(self.t_min, self.num_train_timesteps, batch_size, generator)

    def advance(self, step_loss: float, global_step: int) -> Dict[str, Any]:
        """One optimizer step's (rank-averaged) loss; moves to the next stage when the pacing says so."""
        if self.stage < self.num_stages and self.pacing.update(step_loss):
            self.stage += 1
            self.stage_history.append({"stage": self.stage, "start_step": global_step, "t_min": self.t_min})
        return {"curriculum_stage": self.stage, "curriculum_t_min": self.t_min}

    def describe(self) -> Dict[str, Any]:
        return {"order": "easy_to_hard (high t first)", "pacing": describe_pacing(self.pacing),
                "stage_history": list(self.stage_history)}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage, "stage_history": list(self.stage_history),
                "pacing": {k: getattr(self.pacing, k) for k in self.pacing.STATE_FIELDS}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage, self.stage_history = state["stage"], list(state["stage_history"])
        for key, value in state["pacing"].items():
            setattr(self.pacing, key, value)


# ---- two-phase Curriculum Sampling --------------------------------------------------------------------------
class TwoPhaseSampler(TimestepSampler):
    """Logit-normal levels (``mean``, ``std``) until optimizer step ``switch_step``, uniform from then on
    (Curriculum Sampling, arXiv 2603.12517). The regime calls :meth:`advance` once per optimizer step; the phase
    is part of :meth:`state_dict`, so a resumed run switches at the same step."""

    needs_step_loss = True  # the regime's per-step call; the loss itself does not matter

    def __init__(self, num_train_timesteps: int, switch_step: int, mean: float = 0.0, std: float = 1.0, seed: int = 0):
        super().__init__(num_train_timesteps, seed)
        if switch_step < 0:
            raise ValueError(f"switch_step must be >= 0, got {switch_step}")
        self.switch_step = int(switch_step)
        self.first = LogitNormalSampler(num_train_timesteps, mean, std)
        self.second = UniformSampler(num_train_timesteps)
        self.phase = 1 if switch_step > 0 else 2
        self.switched_at: Optional[int] = None if switch_step > 0 else 0

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        source = self.first if self.phase == 1 else self.second
        source.continuous = self.continuous
        return source._draw(batch_size, generator)

    def advance(self, step_loss: float, global_step: int) -> Dict[str, Any]:
        if self.phase == 1 and global_step >= self.switch_step:
            self.phase, self.switched_at = 2, global_step
        return {"two_phase": self.phase}

    def describe(self) -> Dict[str, Any]:
        return {"two_phase": {"first": f"logit_normal(mean={self.first.mean:g}, std={self.first.std:g})", "then": "uniform",
                              "switch_step": self.switch_step, "switched_at": self.switched_at}}

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "phase": self.phase, "switched_at": self.switched_at}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.phase, self.switched_at = state["phase"], state["switched_at"]


def _timestep_bias(T, seed, settings, **_):
    bias = {key: settings[f"timestep_bias_{key}"] for key in ("strategy", "multiplier", "portion", "begin", "end")}
    bias["end"] = min(bias["end"], T)
    return WeightedSampler(T, timestep_bias_weights(T, **bias), seed=seed)


# The registry of ``--timestep_sampling``: name -> builder(T, seed, settings, boundaries=, pacing=, switch_step=). A
# builder reads its own settings (the regime spec's fields, e.g. ``logit_mean``) from ``settings``.
SAMPLERS: Dict[str, Callable[..., TimestepSampler]] = {
    "uniform": lambda T, seed, settings, **_: UniformSampler(T, seed=seed),
    "logit_normal": lambda T, seed, settings, **_: LogitNormalSampler(T, settings["logit_mean"], settings["logit_std"], seed=seed),
    "mode": lambda T, seed, settings, **_: ModeSampler(T, settings["mode_scale"], seed=seed),
    "speed": lambda T, seed, settings, **_: WeightedSampler(
        T, speed_weights(T, settings["speed_tau"], settings["speed_suppression"]), seed=seed),
    "timestep_bias": _timestep_bias,
    "loss_aware": lambda T, seed, settings, **_: LossAwareSampler(T, seed=seed),
    "stratified": lambda T, seed, settings, boundaries, **_: StratifiedSampler(T, boundaries, seed=seed),
    "curriculum": lambda T, seed, settings, boundaries, pacing, **_: CurriculumSampler(T, boundaries, pacing, seed=seed),
    "two_phase": lambda T, seed, settings, switch_step, **_: TwoPhaseSampler(
        T, switch_step, settings["logit_mean"], settings["logit_std"], seed=seed),
}
TIMESTEP_SAMPLING = tuple(SAMPLERS)


def make_timestep_sampler(kind: str, num_train_timesteps: int, seed: int = 0, *, settings: Optional[Mapping[str, Any]] = None,
                          boundaries: Optional[Sequence[int]] = None, pacing=None, switch_step: Optional[int] = None,
                          continuous: bool = False) -> TimestepSampler:
    """The sampler ``kind`` (one of :data:`SAMPLERS`) for T = ``num_train_timesteps``, drawing real-valued levels when
    ``continuous`` (rectified flow). ``settings``: the samplers' settings by name (a regime spec's fields:
    ``logit_mean``, ``speed_tau``, ``timestep_bias_strategy``, ...); ``boundaries`` are the clusters of ``stratified``
    and ``curriculum``; ``pacing`` the curriculum's; ``switch_step`` is ``two_phase``'s."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown timestep sampling {kind!r}; choose one of {TIMESTEP_SAMPLING}")
    sampler = SAMPLERS[kind](num_train_timesteps, seed, settings or {}, boundaries=boundaries, pacing=pacing,
                             switch_step=switch_step)
    sampler.continuous = continuous
    return sampler
