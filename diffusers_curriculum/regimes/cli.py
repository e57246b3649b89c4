"""Every regime flag, and :func:`regime_spec`: the flags resolved, once, into a checked :class:`RegimeSpec`.

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
rectified flow's continuous ones; the checks take the process's name, :func:`~.spec.build_regime` the process itself.
This is the one module of the package that reads an argparse namespace; everything after it takes the spec.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Dict, Optional, Tuple

from ..clustering import PARTITIONS
from ..errors import UsageError
from ..weighting import WEIGHTINGS
from ..weightings import PLUGINS
from .balancers import BALANCERS
from .experts import EXPERT_SCHEDULES
from .spec import DEFAULT_CLUSTER_COST, DEFAULT_SNR_GAMMA, DEFAULT_TWO_PHASE_SWITCH, PRESETS, RegimeSpec
from .timesteps import TIMESTEP_SAMPLING

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
AXES = ("timestep_sampling", "balancer", "experts", "experts_base_steps", "clusters", "cluster_cost", "affinity_path")
DEFAULTS = {"timestep_sampling": "uniform", "balancer": "none"}


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


# ---- flags -> RegimeSpec ---------------------------------------------------------------------------------------
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
    scheme_weighting = WEIGHTING_SCHEMES[scheme][1] if scheme is not None else None
    if scheme_weighting is not None:
        if args.weighting not in (None, scheme_weighting):
            raise UsageError(f"--weighting_scheme {scheme} is a loss weighting: it and --weighting {args.weighting} both set it; give one")
        axes["weighting"] = (scheme_weighting, "--weighting_scheme")
    elif args.weighting is not None:
        axes["weighting"] = (args.weighting, "--weighting")
    else:
        axes["weighting"] = ("min_snr" if args.snr_gamma is not None else "none", None)
    return axes


def regime_spec(args: argparse.Namespace, num_train_timesteps: Optional[int] = None, noise_process: Optional[str] = None) -> RegimeSpec:
    """The :class:`RegimeSpec` the flags ask for: presets, their aliases and ``--weighting_scheme`` resolved, every
    value checked (a one-line :class:`UsageError` naming the flag). With ``num_train_timesteps`` and
    ``noise_process`` (``"ddpm"`` or ``"flow"``) it is checked against them too; with ``args.max_train_steps``
    against the run's length; with ``args.mixed_precision`` against the launch. The namespace is not changed."""
    axes = resolve_axes(args)
    values = {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}
    plugin = PLUGINS.get(axes["weighting"][0])
    spec = RegimeSpec(
        preset=args.regime, **{axis: value for axis, (value, _) in axes.items()},
        experts_forward=getattr(args, "experts_forward", None), experts_schedule=getattr(args, "experts_schedule", None),
        seed=0 if getattr(args, "seed", None) is None else args.seed,
        weighting_settings=tuple((name, getattr(args, name)) for name in plugin.flags) if plugin is not None else (),
        flags=tuple((axis, source) for axis, (_, source) in axes.items() if source is not None), **values,
    )
    spec.check_process(num_train_timesteps, noise_process)
    spec.check_launch(getattr(args, "mixed_precision", None))
    if getattr(args, "max_train_steps", None) is not None:
        spec.check_schedule(args.max_train_steps)
    return spec


# The settings flags a spec takes as they are (the axes come from resolve_axes).
SETTINGS = tuple(f.name for f in fields(RegimeSpec) if f.name not in (
    *AXES, "preset", "weighting", "experts_forward", "experts_schedule", "seed", "weighting_settings", "flags"))
