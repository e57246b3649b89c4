"""Every regime flag, every check on them, and :func:`build_regime`.

Four axes, each a flag, all composing, sharing one partition of [0, T) into clusters:

    --timestep_sampling {uniform, logit_normal, mode, speed, timestep_bias, loss_aware, stratified, curriculum, two_phase}
    --weighting {none, min_snr, p2, learned, sigma_sqrt, cosmap}
    --balancer {none, uw, pcgrad, nash}                 over the clusters
    --experts K --experts_base_steps N                  TDC's routed experts, one per cluster
      [--experts_schedule {stratified, round_robin}]    how stage 2 feeds them
    --clusters K --cluster_cost {equal, timestep, snr, log_snr, affinity} [--affinity_path]

``--regime uniform|curriculum|ant|tdc`` are presets (:data:`PRESETS`) that set axes; explicit axis flags win.
Each preset keeps its own flags as aliases of the shared ones (:data:`ALIASES`: ``--ant_clusters`` is
``--clusters`` under ``--regime ant``), so every command of earlier versions still runs.

Every axis works on the noise process's levels (:mod:`diffusers_curriculum.noise`): DDPM's integer timesteps or a
rectified flow's continuous ones; the checks take the process's name, :func:`build_regime` the process itself.
"""

from __future__ import annotations

import argparse
import logging
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
# A preset's own flags, read as the shared axis flag under that preset only.
ALIASES: Dict[str, Dict[str, str]] = {
    "curriculum": {"clusters": "curriculum_clusters", "cluster_cost": "curriculum_cluster_cost"},
    "ant": {"clusters": "ant_clusters", "cluster_cost": "ant_cost", "balancer": "ant_method", "affinity_path": "ant_affinity_path"},
    "tdc": {"experts": "tdc_groups", "cluster_cost": "tdc_group_cost", "experts_base_steps": "tdc_base_steps"},
}
# diffusers' --weighting_scheme (SD3 scripts) -> this project's (--timestep_sampling, --weighting): logit_normal and
# mode are densities of t, sigma_sqrt and cosmap rectified-flow loss weights on uniform t.
WEIGHTING_SCHEMES = {"logit_normal": ("logit_normal", None), "mode": ("mode", None), "sigma_sqrt": ("uniform", "sigma_sqrt"),
                     "cosmap": ("uniform", "cosmap"), "none": ("uniform", None)}
DEFAULT_TWO_PHASE_SWITCH = 0.5  # --timestep_sampling two_phase: share of the run on the logit-normal phase
AXES = ("timestep_sampling", "balancer", "experts", "experts_base_steps", "clusters", "cluster_cost", "affinity_path")
DEFAULTS = {"timestep_sampling": "uniform", "balancer": "none"}
DEFAULT_CLUSTER_COST = "log_snr"  # --clusters without --cluster_cost: ANT's DP on log-SNR
DEFAULT_SNR_GAMMA = 5.0  # --weighting min_snr without --snr_gamma: the γ diffusers' scripts recommend
DEFAULT_CHECK_EVERY = 50  # adaptive pacing's check interval when the run's length is unknown


# ---- flags --------------------------------------------------------------------------------------------------
def add_regime_args(parser: argparse.ArgumentParser) -> None:
    """Adds every regime flag to a training script's parser."""
    group = parser.add_argument_group("training regime (axes compose; presets and their aliases below)")
    group.add_argument("--regime", type=str, default="uniform", help=f"Preset: one of {sorted(PRESETS)}; explicit axis flags win.")
    group.add_argument("--timestep_sampling", type=str, default=None, choices=TIMESTEP_SAMPLING,
                       help="Which timesteps a batch holds (default: the preset's, else uniform).")
    group.add_argument("--weighting", type=str, default=None, choices=WEIGHTINGS,
                       help="Per-sample loss weighting. Defaults to 'min_snr' when --snr_gamma is set, else 'none'.")
    group.add_argument("--balancer", type=str, default=None, choices=BALANCERS,
                       help="Multi-task balancer over the clusters' losses (default: the preset's, else none).")
    group.add_argument("--experts", type=int, default=None, help="TDC: one routed expert per cluster (K >= 2).")
    group.add_argument("--experts_base_steps", type=int, default=None,
                       help="TDC: optimizer steps of the base model on all timesteps before it branches into the experts.")
    group.add_argument("--experts_forward", type=str, default=None, choices=["batched", "per_group"],
                       help="TDC stage 2: run the experts as one wide model with grouped convolutions (batched, the "
                            "default with --experts; same results to float tolerance, falls back per batch) or one "
                            "forward per group.")
    group.add_argument("--experts_schedule", type=str, default=None, choices=list(EXPERT_SCHEDULES),
                       help="TDC stage 2: stratified (the default: every batch holds every group's timesteps, each routed "
                            "to its expert) or round_robin (each step fine-tunes one expert on a full batch of its "
                            "group's timesteps, the experts in turn: a step costs what a single-model step does).")
    group.add_argument("--clusters", type=int, default=None,
                       help="Number of timestep clusters shared by stratified sampling, the curriculum, the balancer and the experts.")
    group.add_argument("--cluster_cost", type=str, default=None, choices=PARTITIONS,
                       help=f"How clusters are cut: equal intervals or ANT's interval DP under this cost (default {DEFAULT_CLUSTER_COST}).")
    group.add_argument("--affinity_path", type=str, default=None,
                       help="affinity.npz from `python -m diffusers_curriculum.affinity` (for --cluster_cost affinity).")

    sampling = parser.add_argument_group("timestep sampling settings")
    sampling.add_argument("--weighting_scheme", type=str, default=None, choices=sorted(WEIGHTING_SCHEMES),
                          help="diffusers' SD3 scripts' flag: logit_normal and mode select that --timestep_sampling; "
                               "sigma_sqrt and cosmap select that --weighting (rectified flow only) on uniform t; none: uniform.")
    sampling.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal sampler.")
    sampling.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal sampler.")
    sampling.add_argument("--mode_scale", type=float, default=1.29, help="--timestep_sampling mode: the scale s of SD3's mode density.")
    sampling.add_argument("--two_phase_switch", type=float, default=DEFAULT_TWO_PHASE_SWITCH,
                          help="--timestep_sampling two_phase (Curriculum Sampling, arXiv 2603.12517): the share of "
                               "--max_train_steps drawn logit-normal (--logit_mean, --logit_std) before uniform.")
    sampling.add_argument("--speed_tau", type=float, default=0.7,
                          help="--timestep_sampling speed: timesteps above tau·T are the suppressed convergence area.")
    sampling.add_argument("--speed_suppression", type=float, default=0.25,
                          help="--timestep_sampling speed: relative probability of the convergence area.")
    sampling.add_argument("--timestep_bias_strategy", type=str, default="earlier", choices=["earlier", "later", "range"],
                          help="--timestep_sampling timestep_bias: which timesteps get the bias (diffusers SDXL flags).")
    sampling.add_argument("--timestep_bias_multiplier", type=float, default=2.0, help="Weight multiplier of the biased timesteps.")
    sampling.add_argument("--timestep_bias_portion", type=float, default=0.25, help="Share of timesteps biased (earlier/later).")
    sampling.add_argument("--timestep_bias_begin", type=int, default=0, help="First biased timestep (range).")
    sampling.add_argument("--timestep_bias_end", type=int, default=1000, help="End of the biased range (range).")
    sampling.add_argument("--curriculum_pacing", type=str, default="adaptive", choices=["adaptive", "fixed"],
                          help="--timestep_sampling curriculum: when to move to the next, harder stage.")
    sampling.add_argument("--curriculum_share", type=float, default=0.2,
                          help="Most of --max_train_steps the curriculum's stages may take before the full range: each stage "
                               "lasts at most share · max_train_steps / stages steps (the curriculum sweep's recommendation: "
                               "5 stages in 10-20%% of the run).")
    sampling.add_argument("--curriculum_patience", type=int, default=5, help="Adaptive: non-improving checks before advancing.")
    sampling.add_argument("--curriculum_check_every", type=int, default=None,
                          help="Adaptive: steps between checks (default: max_train_steps // 50, at most a stage's cap).")
    sampling.add_argument("--curriculum_max_stage_steps", type=int, default=None,
                          help="Adaptive: step cap per stage (default: from --curriculum_share).")
    sampling.add_argument("--curriculum_steps_per_stage", type=int, default=None,
                          help="Fixed pacing: steps per stage (default: from --curriculum_share).")

    weighting = parser.add_argument_group("loss weighting settings")
    weighting.add_argument("--snr_gamma", type=float, default=None,
                           help=f"γ of Min-SNR-γ loss weighting (arXiv 2303.09556); selects --weighting min_snr, which "
                                f"defaults to {DEFAULT_SNR_GAMMA:g} as diffusers recommends.")
    weighting.add_argument("--p2_gamma", type=float, default=1.0, help="γ of P2 weighting 1/(k+SNR)^γ.")
    weighting.add_argument("--p2_k", type=float, default=1.0, help="k of P2 weighting 1/(k+SNR)^γ.")
    weighting.add_argument("--learned_weighting_lr", type=float, default=1e-2,
                           help="--weighting learned: learning rate of the loss log-variance u(λ) (EDM2).")

    for plugin in PLUGINS.values():  # each plugin weighting's own flags
        group = parser.add_argument_group(f"--weighting {plugin.name} settings")
        for name, kwargs in plugin.flags.items():
            group.add_argument(f"--{name}", **kwargs)

    balancer = parser.add_argument_group("balancer settings")
    balancer.add_argument("--uw_lr", type=float, default=0.025, help="--balancer uw: learning rate of the log-variances.")
    balancer.add_argument("--nash_update_every", type=int, default=25, help="--balancer nash: steps between bargaining solves.")

    aliases = parser.add_argument_group("preset aliases (read under their --regime only)")
    aliases.add_argument("--curriculum_clusters", type=int, default=None, help="--regime curriculum: --clusters (default 5).")
    aliases.add_argument("--curriculum_cluster_cost", type=str, default=None, choices=["equal", "timestep", "snr", "log_snr"],
                         help="--regime curriculum: --cluster_cost (default equal).")
    aliases.add_argument("--ant_clusters", type=int, default=None, help="--regime ant: --clusters (default 5).")
    aliases.add_argument("--ant_cost", type=str, default=None, choices=PARTITIONS[1:], help="--regime ant: --cluster_cost (default log_snr).")
    aliases.add_argument("--ant_affinity_path", type=str, default=None, help="--regime ant: --affinity_path.")
    aliases.add_argument("--ant_method", type=str, default=None, choices=BALANCERS[1:], help="--regime ant: --balancer (default uw).")
    aliases.add_argument("--tdc_groups", type=int, default=None, help="--regime tdc: --experts (default 4).")
    aliases.add_argument("--tdc_group_cost", type=str, default=None, choices=["equal", "timestep", "snr", "log_snr"],
                         help="--regime tdc: --cluster_cost (default log_snr).")
    aliases.add_argument("--tdc_base_steps", type=int, default=None, help="--regime tdc: --experts_base_steps.")


# ---- resolving presets, aliases and axis flags ---------------------------------------------------------------
def resolve_axes(args: argparse.Namespace) -> Dict[str, Tuple[Any, Optional[str]]]:
    """``{axis: (value, flag)}``: each axis' value and the flag that set it (for a preset's default, the preset's
    own flag for that axis, or None)."""
    if args.regime not in PRESETS:
        raise UsageError(f"--regime {args.regime!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    for preset, mapping in ALIASES.items():
        for axis, alias in mapping.items():
            if preset != args.regime and getattr(args, alias) is not None:
                raise UsageError(f"--{alias} belongs to --regime {preset}; with --regime {args.regime} use --{axis}")
    preset, aliases = PRESETS[args.regime], ALIASES.get(args.regime, {})
    axes = {}
    scheme = getattr(args, "weighting_scheme", None)
    if scheme is not None and args.timestep_sampling is not None:
        raise UsageError("--weighting_scheme and --timestep_sampling both choose the timestep density; give one")
    for axis in AXES:
        if axis == "timestep_sampling" and scheme is not None:
            axes[axis] = (WEIGHTING_SCHEMES[scheme][0], "--weighting_scheme")
        elif getattr(args, axis) is not None:
            axes[axis] = (getattr(args, axis), f"--{axis}")
        elif axis in aliases and getattr(args, aliases[axis]) is not None:
            axes[axis] = (getattr(args, aliases[axis]), f"--{aliases[axis]}")
        else:  # the preset's default; messages name the preset's own flag for it
            axes[axis] = (preset.get(axis, DEFAULTS.get(axis)), f"--{aliases[axis]}" if axis in aliases else None)
    if axes["experts"][0] is not None and axes["clusters"][0] is None:
        axes["clusters"] = axes["experts"]  # one expert per cluster
    if axes["clusters"][0] is not None and axes["cluster_cost"][0] is None:
        axes["cluster_cost"] = (DEFAULT_CLUSTER_COST, None)
    return axes


def regime_name(args: argparse.Namespace, axes) -> str:
    """The preset's name when the axes are the preset's, else the composition (e.g. ``curriculum+uw``)."""
    shape = lambda ts, balancer, experts: (ts, balancer, experts is not None)  # noqa: E731
    preset = PRESETS[args.regime]
    if shape(axes["timestep_sampling"][0], axes["balancer"][0], axes["experts"][0]) == shape(
            preset.get("timestep_sampling", "uniform"), preset.get("balancer", "none"), preset.get("experts")):
        return args.regime
    parts = [axes["timestep_sampling"][0]] if axes["timestep_sampling"][0] != "uniform" else []
    parts += [axes["balancer"][0]] if axes["balancer"][0] != "none" else []
    parts += ["experts"] if axes["experts"][0] is not None else []
    return "+".join(parts) or "uniform"


def flag(axes, axis: str) -> str:
    """The flag that set ``axis``, or the preset's own flag for it (for messages)."""
    return axes[axis][1] or f"--{axis}"


# ---- checks -----------------------------------------------------------------------------------------------
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate DistributedType names that shard parameters


def check_launch(args: argparse.Namespace, mixed_precision: Optional[str], distributed_type=None) -> None:
    """What the launch (precision, sharding; from the flags or the accelerate config) rules out: PCGrad and Nash
    write each parameter's ``.grad`` themselves, which neither fp16's loss scaling nor sharded parameters
    (FSDP, DeepSpeed) allow."""
    balancer, source = resolve_axes(args)["balancer"]
    if balancer not in SELF_FORMED:
        return
    name = f"{source or '--balancer'} {balancer}"
    if mixed_precision == "fp16":
        raise UsageError(f"{name} forms gradients itself and does not support --mixed_precision fp16; use bf16 or no")
    kind = getattr(distributed_type, "name", distributed_type)
    if kind in SHARDED:
        raise UsageError(f"{name} writes each parameter's gradient itself and cannot run on sharded parameters "
                         f"({kind}); launch with plain DDP or use --balancer uw")


def validate_regime_args(args: argparse.Namespace, num_train_timesteps: Optional[int] = None, noise_process: str = "ddpm") -> None:
    """Checks every regime flag and their combination; raises a one-line :class:`UsageError` naming the flags.
    Checks against T (cluster counts, affinity coverage) run when ``num_train_timesteps`` is given
    (:func:`build_regime` gives the scheduler's); ``noise_process`` (``"ddpm"`` or ``"flow"``) rules out the
    weightings that make no sense for it."""
    scheme = WEIGHTING_SCHEMES.get(getattr(args, "weighting_scheme", None) or "none")[1]
    if scheme is not None:
        if args.weighting not in (None, scheme):
            raise UsageError(f"--weighting_scheme {scheme} is a loss weighting: it and --weighting {args.weighting} both set it; give one")
        args.weighting = scheme
    if args.weighting in FLOW_WEIGHTINGS and noise_process != "flow":
        source = "--weighting_scheme" if scheme is not None else "--weighting"
        raise UsageError(f"{source} {args.weighting} is a rectified-flow loss weight (a function of sigma): it needs "
                         f"--noise_process flow (this run's process is {noise_process})")
    if args.weighting in PLUGINS:
        plugin = PLUGINS[args.weighting]
        if noise_process not in plugin.processes:
            raise UsageError(f"--weighting {plugin.name} is defined for --noise_process {', '.join(plugin.processes)}, not {noise_process}")
        problem = plugin.check(plugin_settings(args)) if plugin.check is not None else None
        if problem:
            raise UsageError(problem)
    if args.weighting is None:
        args.weighting = "min_snr" if args.snr_gamma is not None else "none"
    if args.weighting == "min_snr" and args.snr_gamma is None:
        args.snr_gamma = DEFAULT_SNR_GAMMA
    if args.weighting == "min_snr" and not args.snr_gamma > 0:
        raise UsageError(f"--weighting min_snr needs --snr_gamma > 0, got {args.snr_gamma}")
    if args.snr_gamma is not None and args.weighting != "min_snr":
        raise UsageError(f"--snr_gamma is set but --weighting is {args.weighting!r}; drop one of them")
    for name, ok, rule in (("logit_std", args.logit_std > 0, "> 0"), ("speed_tau", 0 < args.speed_tau < 1, "in (0, 1)"),
                           ("speed_suppression", args.speed_suppression > 0, "> 0"), ("p2_k", args.p2_k > 0, "> 0"),
                           ("timestep_bias_multiplier", args.timestep_bias_multiplier > 0, "> 0"),
                           ("timestep_bias_portion", 0 < args.timestep_bias_portion <= 1, "in (0, 1]"),
                           ("learned_weighting_lr", args.learned_weighting_lr > 0, "> 0"),
                           ("uw_lr", args.uw_lr > 0, "> 0"), ("nash_update_every", args.nash_update_every >= 1, ">= 1")):
        if not ok:
            raise UsageError(f"--{name} must be {rule}, got {getattr(args, name)}")

    axes = resolve_axes(args)
    T = num_train_timesteps
    sampling, balancer, experts = axes["timestep_sampling"][0], axes["balancer"][0], axes["experts"][0]
    clusters, cost = axes["clusters"][0], axes["cluster_cost"][0]
    users = [f"--timestep_sampling {sampling}"] if sampling in CLUSTERED else []
    users += [f"{flag(axes, 'balancer')} {balancer}"] if balancer != "none" else []
    users += [flag(axes, "experts")] if experts is not None else []
    if users and clusters is None:
        raise UsageError(f"{users[0]} needs clusters: give --clusters K")
    if not users and (args.clusters is not None or args.cluster_cost is not None):
        given = "--clusters" if args.clusters is not None else "--cluster_cost"
        raise UsageError(f"{given} has no effect: nothing uses clusters (--timestep_sampling stratified/curriculum, --balancer or --experts)")
    if experts is not None and (experts < 2 or (T is not None and experts > T)):
        raise UsageError(f"{flag(axes, 'experts')} must be in [2, {T or 'T'}] (the scheduler's number of timesteps), got {experts}")
    if clusters is not None and (clusters < 1 or (T is not None and clusters > T)):
        raise UsageError(f"{flag(axes, 'clusters')} must be in [1, {T or 'T'}] (the scheduler's number of timesteps), got {clusters}")
    if experts is not None:
        if clusters != experts:
            raise UsageError(f"{flag(axes, 'clusters')} {clusters} differs from {flag(axes, 'experts')} {experts}: each expert serves one cluster")
        base_steps = axes["experts_base_steps"][0]
        if base_steps is None or base_steps < 1:
            name = "--regime tdc" if args.regime == "tdc" and args.experts is None else flag(axes, "experts")
            raise UsageError(f"{name} needs {flag(axes, 'experts_base_steps')} >= 1, got {base_steps}")
        if getattr(args, "max_train_steps", None) is not None:
            check_schedule(args, args.max_train_steps)
    elif axes["experts_base_steps"][0] is not None:
        raise UsageError(f"{flag(axes, 'experts_base_steps')} needs --experts K")
    schedule = getattr(args, "experts_schedule", None)
    for name in ("experts_forward", "experts_schedule"):
        if experts is None and getattr(args, name, None) is not None:
            raise UsageError(f"--{name} needs --experts K (or --regime tdc)")
    if schedule == "round_robin" and getattr(args, "experts_forward", None) is not None:
        raise UsageError("--experts_forward has no effect with --experts_schedule round_robin: each stage-2 step runs one expert")
    check_launch(args, getattr(args, "mixed_precision", None))
    affinity_path = axes["affinity_path"][0]
    if cost == "affinity":
        if affinity_path is None:
            raise UsageError(f"{flag(axes, 'cluster_cost')} affinity needs {flag(axes, 'affinity_path')} "
                             "(made by `python -m diffusers_curriculum.affinity`)")
        affinity, group_size = load_affinity(affinity_path, flag(axes, "affinity_path"))
        if T is not None and (affinity.shape[0] * group_size < T or (affinity.shape[0] - 1) * group_size >= T):
            raise UsageError(f"{flag(axes, 'affinity_path')}: {affinity.shape[0]} groups of {group_size} do not cover T={T} timesteps")
        if clusters > affinity.shape[0]:
            raise UsageError(f"{flag(axes, 'clusters')} {clusters} exceeds the {affinity.shape[0]} affinity groups")
    elif affinity_path is not None:
        raise UsageError(f"{flag(axes, 'affinity_path')} is only used with {flag(axes, 'cluster_cost')} affinity")
    if sampling == "two_phase" and not 0 <= args.two_phase_switch <= 1:
        raise UsageError(f"--two_phase_switch must be in [0, 1], got {args.two_phase_switch}")
    if sampling == "curriculum":
        check_pacing(args)
        if getattr(args, "max_train_steps", None) is not None:
            curriculum_warning(args, args.max_train_steps)  # a schedule that never leaves its first stage: an error now


def plugin_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The flag values of the plugin weighting ``--weighting`` names (empty for a built-in one)."""
    plugin = PLUGINS.get(args.weighting)
    return {} if plugin is None else {name: getattr(args, name) for name in plugin.flags}


def check_pacing(args: argparse.Namespace) -> None:
    if not 0 < args.curriculum_share <= 1:
        raise UsageError(f"--curriculum_share must be in (0, 1], got {args.curriculum_share}")
    if args.curriculum_pacing == "fixed":
        if args.curriculum_steps_per_stage is not None and args.curriculum_steps_per_stage < 1:
            raise UsageError(f"--curriculum_pacing fixed needs --curriculum_steps_per_stage >= 1, got {args.curriculum_steps_per_stage}")
        if args.curriculum_max_stage_steps is not None:
            raise UsageError("--curriculum_max_stage_steps applies to adaptive pacing; fixed pacing uses --curriculum_steps_per_stage")
        return
    if args.curriculum_steps_per_stage is not None:
        raise UsageError("--curriculum_steps_per_stage needs --curriculum_pacing fixed (adaptive pacing uses --curriculum_patience)")
    for name in ("curriculum_patience", "curriculum_check_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.curriculum_max_stage_steps is not None and args.curriculum_max_stage_steps < 1:
        raise UsageError(f"--curriculum_max_stage_steps must be >= 1, got {args.curriculum_max_stage_steps}")


def build_pacing(args: argparse.Namespace, num_stages: int, max_train_steps: Optional[int] = None):
    """The curriculum's pacing. Unset lengths come from ``--curriculum_share`` of ``max_train_steps``
    (:func:`~diffusers_curriculum.regimes.timesteps.stage_step_cap`): the fixed steps per stage, or adaptive pacing's
    step cap and its check interval (max_train_steps // 50, at most the cap). Without ``max_train_steps`` adaptive
    pacing checks every 50 steps and has no cap."""
    cap = stage_step_cap(max_train_steps, args.curriculum_share, num_stages) if max_train_steps else None
    if args.curriculum_pacing == "fixed":
        steps = args.curriculum_steps_per_stage or cap
        if steps is None:
            raise UsageError("--curriculum_pacing fixed needs --curriculum_steps_per_stage, or --max_train_steps to derive it "
                             "from --curriculum_share")
        return FixedPacing(steps)
    check_every = args.curriculum_check_every or (max(1, min(cap, max_train_steps // 50)) if cap else DEFAULT_CHECK_EVERY)
    return AdaptivePacing(args.curriculum_patience, check_every, args.curriculum_max_stage_steps or cap)


def curriculum_warning(args: argparse.Namespace, max_train_steps: int) -> Optional[str]:
    """For a curriculum run of ``max_train_steps``: ``None`` when it surely reaches its last stage, else a warning
    naming the numbers and the flags that set them. A schedule that never leaves its first stage is a
    :class:`UsageError`."""
    axes = resolve_axes(args)
    if axes["timestep_sampling"][0] != "curriculum" or axes["clusters"][0] is None:
        return None
    stages = axes["clusters"][0]
    names = (("curriculum_steps_per_stage",) if args.curriculum_pacing == "fixed"
             else ("curriculum_max_stage_steps", "curriculum_check_every"))
    given = [f"--{name} {getattr(args, name)}" for name in names if getattr(args, name) is not None]
    cause = (f"set by {', '.join(given)}; without {'it' if len(given) == 1 else 'them'} --curriculum_share sizes the stages "
             f"to the run" if given else f"the run is too short for {stages} stages: lower {flag(axes, 'clusters')}")
    try:
        outlook = curriculum_outlook(stages, build_pacing(args, stages, max_train_steps), max_train_steps)
    except ValueError as e:
        raise UsageError(f"{e} ({cause})") from None
    return None if outlook is None else f"{outlook} ({cause})"


def check_schedule(args: argparse.Namespace, max_train_steps: int) -> None:
    """Checks the regime against the run's total optimizer steps, once the script knows them."""
    axes = resolve_axes(args)
    base_steps = axes["experts_base_steps"][0]
    if axes["experts"][0] is not None and base_steps is not None and base_steps >= max_train_steps:
        raise UsageError(f"{flag(axes, 'experts_base_steps')} {base_steps} leaves no stage-2 steps: it must be below the "
                         f"{max_train_steps} total training steps")
    curriculum_warning(args, max_train_steps)  # raises when the curriculum would never leave its first stage


def needs_unused_parameters(args: argparse.Namespace) -> bool:
    """Whether the regime leaves parameters without gradient in some steps (experts): DDP's find_unused_parameters."""
    return resolve_axes(args)["experts"][0] is not None


# ---- building -----------------------------------------------------------------------------------------------
def build_regime(args: argparse.Namespace, noise_process, accelerator=None, max_train_steps: Optional[int] = None) -> Regime:
    """The regime the flags ask for, after checking them against the noise process (a
    :class:`~diffusers_curriculum.noise.NoiseProcess` or a diffusers training scheduler) and its T. ``accelerator``
    gives this rank and the world size (one process without it); ``max_train_steps`` (default:
    ``args.max_train_steps``) is the run's length, which sizes the curriculum's stages (``--curriculum_share``) and
    warns when its last stage may be out of reach."""
    process = as_process(noise_process)
    T = process.num_train_timesteps
    validate_regime_args(args, T, process.name)
    axes = resolve_axes(args)
    max_train_steps = max_train_steps or getattr(args, "max_train_steps", None)
    seed = 0 if args.seed is None else args.seed
    sampling, k, cost = axes["timestep_sampling"][0], axes["clusters"][0], axes["cluster_cost"][0]
    boundaries = None
    if k is not None:
        affinity, group_size = load_affinity(axes["affinity_path"][0]) if cost == "affinity" else (None, 1)
        boundaries = partition(cost, k, T, affinity=affinity, group_size=group_size, snr=process.level_snr())
    pacing = None
    if sampling == "curriculum":
        pacing = build_pacing(args, k, max_train_steps)
        warning = curriculum_warning(args, max_train_steps) if max_train_steps else None
        if warning and (accelerator is None or accelerator.is_main_process):
            logger.warning(warning[0].upper() + warning[1:])
    bias = {key: getattr(args, f"timestep_bias_{key}") for key in ("strategy", "multiplier", "portion", "begin", "end")}
    switch_step = None
    if sampling == "two_phase":
        if not max_train_steps:
            raise UsageError("--timestep_sampling two_phase needs the run's --max_train_steps to place --two_phase_switch")
        switch_step = round(args.two_phase_switch * max_train_steps)
    try:
        sampler = make_timestep_sampler(sampling, T, seed, boundaries, pacing, args.logit_mean, args.logit_std,
                                        args.mode_scale, args.speed_tau, args.speed_suppression, bias, switch_step,
                                        continuous=process.continuous)
    except ValueError as e:
        if sampling != "timestep_bias":
            raise
        raise UsageError(f"--timestep_bias_begin/--timestep_bias_end: {e}") from None
    experts = axes["experts"][0]
    return Regime(
        process, sampler,
        weighting=Weighting(args.weighting, args.snr_gamma, args.p2_gamma, args.p2_k, args.learned_weighting_lr, seed,
                            settings=plugin_settings(args)),
        balancer=build_balancer(axes["balancer"][0], k, args.uw_lr, args.nash_update_every, seed) if k else None,
        experts=(ExpertLayout(T, boundaries, axes["experts_base_steps"][0], seed, batched=getattr(args, "experts_forward", None) != "per_group",
                              schedule=getattr(args, "experts_schedule", None) or "stratified",
                              routing_boundaries=process.model_boundaries(boundaries), continuous=process.continuous)
                 if experts is not None else None),
        boundaries=boundaries, cluster_cost=cost, timestep_sampling=sampling, name=regime_name(args, axes), seed=seed,
        process_index=accelerator.process_index if accelerator is not None else 0,
        num_processes=accelerator.num_processes if accelerator is not None else 1,
    )
