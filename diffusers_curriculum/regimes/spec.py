"""The regime as plain values: :class:`RegimeSpec`, checked once when it is made, and :func:`build_regime`.

A spec is what ``--regime`` and the axis flags resolve to (:func:`diffusers_curriculum.regimes.cli.regime_spec`
does that, presets and aliases included), or what a library user writes directly::

    spec = RegimeSpec(timestep_sampling="curriculum", clusters=5, cluster_cost="equal", weighting="min_snr", snr_gamma=5.0)
    regime = build_regime(spec, DDPMScheduler(), max_train_steps=10_000)

Everything here takes the spec and plain values; no function reads an argparse namespace.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from ..affinity import load_affinity
from ..clustering import PARTITIONS, partition
from ..errors import UsageError
from ..noise import as_process
from ..weighting import FLOW_WEIGHTINGS, WEIGHTINGS
from ..weightings import PLUGINS
from .balancers import BALANCERS, SELF_FORMED, build_balancer
from .experts import EXPERT_SCHEDULES, ExpertLayout
from .regime import Regime
from .timesteps import (
    CLUSTERED, TIMESTEP_SAMPLING, AdaptivePacing, FixedPacing, curriculum_outlook, make_timestep_sampler, stage_step_cap,
)
from .weighting import Weighting

logger = logging.getLogger(__name__)

# The registry: presets name the axes they set; nothing is added to it by importing a module.
PRESETS: Dict[str, Dict[str, Any]] = {
    "uniform": {},
    "curriculum": {"timestep_sampling": "curriculum", "clusters": 5, "cluster_cost": "equal"},
    "ant": {"timestep_sampling": "stratified", "balancer": "uw", "clusters": 5, "cluster_cost": "log_snr"},
    "tdc": {"experts": 4, "cluster_cost": "log_snr"},
}
DEFAULT_CLUSTER_COST = "log_snr"  # clusters without a cost: ANT's DP on log-SNR
DEFAULT_SNR_GAMMA = 5.0  # --weighting min_snr without --snr_gamma: the γ diffusers' scripts recommend
DEFAULT_TWO_PHASE_SWITCH = 0.5  # --timestep_sampling two_phase: share of the run on the logit-normal phase
DEFAULT_CHECK_EVERY = 50  # adaptive pacing's check interval when the run's length is unknown
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate DistributedType names that shard parameters


@dataclass(frozen=True)
class RegimeSpec:
    """One training regime: four composing axes over one partition of the noise levels into clusters, and each
    axis' settings. Made, it is checked (one-line :class:`UsageError` naming the flag); checks against the noise
    process and its T run in :meth:`check_process`.

    ``flags`` maps an axis to the flag that set it (``--ant_clusters`` for ``clusters`` under ``--regime ant``), for
    messages; a spec written by hand has none and messages name the axis' own flag."""

    preset: str = "uniform"
    timestep_sampling: str = "uniform"
    weighting: str = "none"
    balancer: str = "none"
    experts: Optional[int] = None
    experts_base_steps: Optional[int] = None
    experts_forward: Optional[str] = None
    experts_schedule: Optional[str] = None
    clusters: Optional[int] = None
    cluster_cost: Optional[str] = None
    affinity_path: Optional[str] = None
    seed: int = 0
    # timestep sampling
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    two_phase_switch: float = DEFAULT_TWO_PHASE_SWITCH
    speed_tau: float = 0.7
    speed_suppression: float = 0.25
    timestep_bias_strategy: str = "earlier"
    timestep_bias_multiplier: float = 2.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    curriculum_pacing: str = "adaptive"
    curriculum_share: float = 0.2
    curriculum_patience: int = 5
    curriculum_check_every: Optional[int] = None
    curriculum_max_stage_steps: Optional[int] = None
    curriculum_steps_per_stage: Optional[int] = None
    # loss weighting
    snr_gamma: Optional[float] = None
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    learned_weighting_lr: float = 1e-2
    weighting_settings: Tuple[Tuple[str, Any], ...] = ()  # a plugin weighting's own flag values
    # balancer
    uw_lr: float = 0.025
    nash_update_every: int = 25
    flags: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.weighting == "min_snr" and self.snr_gamma is None:  # diffusers' recommended γ
            object.__setattr__(self, "snr_gamma", DEFAULT_SNR_GAMMA)
        self._check()

    # ---- reading ----------------------------------------------------------------------------------------------
    def flag(self, axis: str) -> str:
        """The flag that set ``axis`` (for messages)."""
        return dict(self.flags).get(axis) or f"--{axis}"

    @property
    def name(self) -> str:
        """The preset's name when the axes are the preset's, else the composition (e.g. ``curriculum+uw``)."""
        preset = PRESETS[self.preset]
        if (self.timestep_sampling, self.balancer, self.experts is not None) == (
                preset.get("timestep_sampling", "uniform"), preset.get("balancer", "none"), preset.get("experts") is not None):
            return self.preset
        parts = [self.timestep_sampling] if self.timestep_sampling != "uniform" else []
        parts += [self.balancer] if self.balancer != "none" else []
        parts += ["experts"] if self.experts is not None else []
        return "+".join(parts) or "uniform"

    @property
    def cluster_users(self) -> Tuple[str, ...]:
        """The axes that use the clusters, as the flags that chose them."""
        users = (f"{self.flag('timestep_sampling')} {self.timestep_sampling}",) if self.timestep_sampling in CLUSTERED else ()
        users += (f"{self.flag('balancer')} {self.balancer}",) if self.balancer != "none" else ()
        return users + ((self.flag("experts"),) if self.experts is not None else ())

    @property
    def needs_unused_parameters(self) -> bool:
        """Whether some steps leave parameters without gradient (experts): DDP's ``find_unused_parameters``."""
        return self.experts is not None

    # ---- checks -----------------------------------------------------------------------------------------------
    def _check(self) -> None:
        """The checks that need neither the noise process nor the run's length."""
        for name, choices in (("preset", PRESETS), ("timestep_sampling", TIMESTEP_SAMPLING), ("weighting", WEIGHTINGS),
                              ("balancer", BALANCERS), ("cluster_cost", (None, *PARTITIONS)),
                              ("experts_schedule", (None, *EXPERT_SCHEDULES)), ("experts_forward", (None, "batched", "per_group")),
                              ("curriculum_pacing", ("adaptive", "fixed"))):
            if getattr(self, name) not in choices:
                shown = "--regime" if name == "preset" else self.flag(name)
                raise UsageError(f"{shown} {getattr(self, name)!r} is unknown; choose one of "
                                 f"{', '.join(str(c) for c in choices if c is not None)}")
        if self.weighting == "min_snr" and not (self.snr_gamma is not None and self.snr_gamma > 0):
            raise UsageError(f"--weighting min_snr needs --snr_gamma > 0, got {self.snr_gamma}")
        if self.snr_gamma is not None and self.weighting != "min_snr":
            raise UsageError(f"--snr_gamma is set but --weighting is {self.weighting!r}; drop one of them")
        plugin = PLUGINS.get(self.weighting)
        problem = plugin.check(dict(self.weighting_settings)) if plugin is not None and plugin.check is not None else None
        if problem:
            raise UsageError(problem)
        for name, ok, rule in (("logit_std", self.logit_std > 0, "> 0"), ("speed_tau", 0 < self.speed_tau < 1, "in (0, 1)"),
                               ("speed_suppression", self.speed_suppression > 0, "> 0"), ("p2_k", self.p2_k > 0, "> 0"),
                               ("timestep_bias_multiplier", self.timestep_bias_multiplier > 0, "> 0"),
                               ("timestep_bias_portion", 0 < self.timestep_bias_portion <= 1, "in (0, 1]"),
                               ("learned_weighting_lr", self.learned_weighting_lr > 0, "> 0"),
                               ("uw_lr", self.uw_lr > 0, "> 0"), ("nash_update_every", self.nash_update_every >= 1, ">= 1")):
            if not ok:
                raise UsageError(f"--{name} must be {rule}, got {getattr(self, name)}")
        users = self.cluster_users
        if users and self.clusters is None:
            raise UsageError(f"{users[0]} needs clusters: give --clusters K")
        if not users and (self.clusters is not None or self.cluster_cost is not None):
            given = "--clusters" if self.clusters is not None else "--cluster_cost"
            raise UsageError(f"{given} has no effect: nothing uses clusters (--timestep_sampling stratified/curriculum, "
                             "--balancer or --experts)")
        if self.clusters is not None and self.cluster_cost is None:
            raise UsageError(f"{self.flag('clusters')} needs a cluster cost (--cluster_cost)")
        if self.experts is not None:
            if self.clusters != self.experts:
                raise UsageError(f"{self.flag('clusters')} {self.clusters} differs from {self.flag('experts')} {self.experts}: "
                                 "each expert serves one cluster")
            if self.experts_base_steps is None or self.experts_base_steps < 1:
                name = "--regime tdc" if self.preset == "tdc" and self.flag("experts") != "--experts" else self.flag("experts")
                raise UsageError(f"{name} needs {self.flag('experts_base_steps')} >= 1, got {self.experts_base_steps}")
        elif self.experts_base_steps is not None:
            raise UsageError(f"{self.flag('experts_base_steps')} needs --experts K")
        for name in ("experts_forward", "experts_schedule"):
            if self.experts is None and getattr(self, name) is not None:
                raise UsageError(f"--{name} needs --experts K (or --regime tdc)")
        if self.experts_schedule == "round_robin" and self.experts_forward is not None:
            raise UsageError("--experts_forward has no effect with --experts_schedule round_robin: each stage-2 step runs one expert")
        if self.cluster_cost == "affinity" and self.affinity_path is None:
            raise UsageError(f"{self.flag('cluster_cost')} affinity needs {self.flag('affinity_path')} "
                             "(made by `python -m diffusers_curriculum.affinity`)")
        if self.cluster_cost != "affinity" and self.affinity_path is not None:
            raise UsageError(f"{self.flag('affinity_path')} is only used with {self.flag('cluster_cost')} affinity")
        if self.timestep_sampling == "two_phase" and not 0 <= self.two_phase_switch <= 1:
            raise UsageError(f"--two_phase_switch must be in [0, 1], got {self.two_phase_switch}")
        if self.timestep_sampling == "curriculum":
            self._check_pacing()

    def _check_pacing(self) -> None:
        if not 0 < self.curriculum_share <= 1:
            raise UsageError(f"--curriculum_share must be in (0, 1], got {self.curriculum_share}")
        if self.curriculum_pacing == "fixed":
            if self.curriculum_steps_per_stage is not None and self.curriculum_steps_per_stage < 1:
                raise UsageError(f"--curriculum_pacing fixed needs --curriculum_steps_per_stage >= 1, got {self.curriculum_steps_per_stage}")
            if self.curriculum_max_stage_steps is not None:
                raise UsageError("--curriculum_max_stage_steps applies to adaptive pacing; fixed pacing uses --curriculum_steps_per_stage")
            return
        if self.curriculum_steps_per_stage is not None:
            raise UsageError("--curriculum_steps_per_stage needs --curriculum_pacing fixed (adaptive pacing uses --curriculum_patience)")
        for name in ("curriculum_patience", "curriculum_check_every", "curriculum_max_stage_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")

    def check_process(self, num_train_timesteps: Optional[int] = None, noise_process: Optional[str] = None):
        """The checks against the noise process (``"ddpm"`` or ``"flow"``) and its T, each where it is given: the
        weightings defined for the process, cluster and expert counts, the affinity matrix's coverage (read here: an
        unreadable file fails before any work). Returns ``(affinity, group_size)`` under the affinity cost, else
        ``(None, 1)``."""
        if self.weighting in FLOW_WEIGHTINGS and noise_process not in (None, "flow"):
            raise UsageError(f"{self.flag('weighting')} {self.weighting} is a rectified-flow loss weight (a function of sigma): "
                             f"it needs --noise_process flow (this run's process is {noise_process})")
        plugin = PLUGINS.get(self.weighting)
        if plugin is not None and noise_process is not None and noise_process not in plugin.processes:
            raise UsageError(f"--weighting {plugin.name} is defined for --noise_process {', '.join(plugin.processes)}, not {noise_process}")
        T = num_train_timesteps
        if T is not None and self.experts is not None and not 2 <= self.experts <= T:
            raise UsageError(f"{self.flag('experts')} must be in [2, {T}] (the scheduler's number of timesteps), got {self.experts}")
        if T is not None and self.clusters is not None and not 1 <= self.clusters <= T:
            raise UsageError(f"{self.flag('clusters')} must be in [1, {T}] (the scheduler's number of timesteps), got {self.clusters}")
        if self.cluster_cost == "affinity":
            affinity, group_size = load_affinity(self.affinity_path, self.flag("affinity_path"))
            if T is not None and (affinity.shape[0] * group_size < T or (affinity.shape[0] - 1) * group_size >= T):
                raise UsageError(f"{self.flag('affinity_path')}: {affinity.shape[0]} groups of {group_size} do not cover T={T} timesteps")
            if self.clusters > affinity.shape[0]:
                raise UsageError(f"{self.flag('clusters')} {self.clusters} exceeds the {affinity.shape[0]} affinity groups")
            return affinity, group_size
        return None, 1

    def check_launch(self, mixed_precision: Optional[str], distributed_type=None) -> None:
        """What the launch (precision, sharding; from the flags or the accelerate config) rules out: PCGrad and Nash
        write each parameter's ``.grad`` themselves, which neither fp16's loss scaling nor sharded parameters
        (FSDP, DeepSpeed) allow."""
        if self.balancer not in SELF_FORMED:
            return
        name = f"{self.flag('balancer')} {self.balancer}"
        if mixed_precision == "fp16":
            raise UsageError(f"{name} forms gradients itself and does not support --mixed_precision fp16; use bf16 or no")
        kind = getattr(distributed_type, "name", distributed_type)
        if kind in SHARDED:
            raise UsageError(f"{name} writes each parameter's gradient itself and cannot run on sharded parameters "
                             f"({kind}); launch with plain DDP or use --balancer uw")

    def check_schedule(self, max_train_steps: int) -> Optional[str]:
        """Checks against the run's total optimizer steps, once the script knows them; returns the curriculum's
        warning when its last stage may be out of reach (:func:`curriculum_warning`), else None."""
        if self.experts is not None and self.experts_base_steps >= max_train_steps:
            raise UsageError(f"{self.flag('experts_base_steps')} {self.experts_base_steps} leaves no stage-2 steps: it must be "
                             f"below the {max_train_steps} total training steps")
        return curriculum_warning(self, max_train_steps)  # raises when the curriculum would never leave its first stage


# ---- curriculum pacing ----------------------------------------------------------------------------------------
def build_pacing(spec: RegimeSpec, num_stages: int, max_train_steps: Optional[int] = None):
    """The curriculum's pacing. Unset lengths come from ``curriculum_share`` of ``max_train_steps``
    (:func:`~diffusers_curriculum.regimes.timesteps.stage_step_cap`): the fixed steps per stage, or adaptive pacing's
    step cap and its check interval (max_train_steps // 50, at most the cap). Without ``max_train_steps`` adaptive
    pacing checks every 50 steps and has no cap."""
    cap = stage_step_cap(max_train_steps, spec.curriculum_share, num_stages) if max_train_steps else None
    if spec.curriculum_pacing == "fixed":
        steps = spec.curriculum_steps_per_stage or cap
        if steps is None:
            raise UsageError("--curriculum_pacing fixed needs --curriculum_steps_per_stage, or --max_train_steps to derive it "
                             "from --curriculum_share")
        return FixedPacing(steps)
    check_every = spec.curriculum_check_every or (max(1, min(cap, max_train_steps // 50)) if cap else DEFAULT_CHECK_EVERY)
    return AdaptivePacing(spec.curriculum_patience, check_every, spec.curriculum_max_stage_steps or cap)


def curriculum_warning(spec: RegimeSpec, max_train_steps: int) -> Optional[str]:
    """For a curriculum run of ``max_train_steps``: ``None`` when it surely reaches its last stage, else a warning
    naming the numbers and the flags that set them. A schedule that never leaves its first stage is a
    :class:`UsageError`."""
    if spec.timestep_sampling != "curriculum" or spec.clusters is None:
        return None
    stages = spec.clusters
    names = (("curriculum_steps_per_stage",) if spec.curriculum_pacing == "fixed"
             else ("curriculum_max_stage_steps", "curriculum_check_every"))
    given = [f"--{name} {getattr(spec, name)}" for name in names if getattr(spec, name) is not None]
    cause = (f"set by {', '.join(given)}; without {'it' if len(given) == 1 else 'them'} --curriculum_share sizes the stages "
             f"to the run" if given else f"the run is too short for {stages} stages: lower {spec.flag('clusters')}")
    try:
        outlook = curriculum_outlook(stages, build_pacing(spec, stages, max_train_steps), max_train_steps)
    except ValueError as e:
        raise UsageError(f"{e} ({cause})") from None
    return None if outlook is None else f"{outlook} ({cause})"


# ---- building -----------------------------------------------------------------------------------------------
def build_regime(spec: RegimeSpec, noise_process, accelerator=None, max_train_steps: Optional[int] = None) -> Regime:
    """The regime ``spec`` describes, after checking it against the noise process (a
    :class:`~diffusers_curriculum.noise.NoiseProcess` or a diffusers training scheduler) and its T. ``accelerator``
    gives this rank and the world size (one process without it); ``max_train_steps`` is the run's length, which
    sizes the curriculum's stages (``curriculum_share``), places two-phase's switch and warns when the curriculum's
    last stage may be out of reach."""
    if not isinstance(spec, RegimeSpec):
        raise TypeError(f"build_regime takes a RegimeSpec, got {type(spec).__name__} (regimes.cli.regime_spec makes one from flags)")
    process = as_process(noise_process)
    T = process.num_train_timesteps
    affinity, group_size = spec.check_process(T, process.name)
    warning = spec.check_schedule(max_train_steps) if max_train_steps else None
    sampling, k, cost = spec.timestep_sampling, spec.clusters, spec.cluster_cost
    boundaries = None
    if k is not None:
        boundaries = partition(cost, k, T, affinity=affinity, group_size=group_size, snr=process.level_snr())
    pacing = None
    if sampling == "curriculum":
        pacing = build_pacing(spec, k, max_train_steps)
        if warning and (accelerator is None or accelerator.is_main_process):
            logger.warning(warning[0].upper() + warning[1:])
    switch_step = None
    if sampling == "two_phase":
        if not max_train_steps:
            raise UsageError("--timestep_sampling two_phase needs the run's --max_train_steps to place --two_phase_switch")
        switch_step = round(spec.two_phase_switch * max_train_steps)
    try:
        sampler = make_timestep_sampler(sampling, T, spec.seed, settings=asdict(spec), boundaries=boundaries, pacing=pacing,
                                        switch_step=switch_step, continuous=process.continuous)
    except ValueError as e:
        if sampling != "timestep_bias":
            raise
        raise UsageError(f"--timestep_bias_begin/--timestep_bias_end: {e}") from None
    return Regime(
        process, sampler,
        weighting=Weighting(spec.weighting, spec.snr_gamma, spec.p2_gamma, spec.p2_k, spec.learned_weighting_lr, spec.seed,
                            settings=dict(spec.weighting_settings)),
        balancer=build_balancer(spec.balancer, k, spec.uw_lr, spec.nash_update_every, spec.seed) if k else None,
        experts=(ExpertLayout(T, boundaries, spec.experts_base_steps, spec.seed, batched=spec.experts_forward != "per_group",
                              schedule=spec.experts_schedule or "stratified",
                              routing_boundaries=process.model_boundaries(boundaries), continuous=process.continuous)
                 if spec.experts is not None else None),
        boundaries=boundaries, cluster_cost=cost, timestep_sampling=sampling, name=spec.name, seed=spec.seed,
        process_index=accelerator.process_index if accelerator is not None else 0,
        num_processes=accelerator.num_processes if accelerator is not None else 1,
    )
