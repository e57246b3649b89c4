"""``--regime tdc``: timestep-decomposed training of a multi-expert denoiser (arXiv 2312.13307).

One run, two stages. The model trained is a :class:`~diffusers_curriculum.experts.TimestepRoutedExperts`
from the start, holding one copy of the UNet per timestep group:

* stage 1 (steps 1 … ``--tdc_base_steps``): every sample goes through expert 0, the *base* model, on all
  timesteps (drawn by ``--timestep_sampling``); the other experts get no gradient and do not move;
* at the end of step ``--tdc_base_steps`` the base is *branched*: its weights, its optimizer state and its
  EMA weights are copied into every other expert;
* stage 2: batches are stratified over the groups and each sample is routed to its group's expert, so each
  copy is fine-tuned only on its own timesteps. Per-group losses are logged as ``loss/group_<i>``.

Keeping one model, one optimizer and one EMA across both stages means checkpoints of either stage have the
same layout: ``--resume_from_checkpoint`` works anywhere, and the stage is part of the regime state.
Groups: equal intervals or ANT's interval DP (``--tdc_group_cost timestep|snr|log_snr``).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch

from .ant import StratifiedSampler
from .clustering import cluster_intervals, interval_costs
from .errors import UsageError
from .experts import TimestepRoutedExperts
from .regimes import REGIMES, TrainingRegime

GROUP_COSTS = ("equal", "timestep", "snr", "log_snr")


def tdc_boundaries(cost: str, num_groups: int, noise_scheduler) -> List[int]:
    """Group boundaries ``[0, b_1, …, T]``: equal intervals, or the interval DP under ``cost``."""
    T = noise_scheduler.config.num_train_timesteps
    if cost == "equal":
        return [round(i * T / num_groups) for i in range(num_groups + 1)]
    costs = interval_costs(cost, T, alphas_cumprod=noise_scheduler.alphas_cumprod)
    return [int(b) for b in cluster_intervals(costs, num_groups)[0]]


class TDCRegime(TrainingRegime):
    """Base model for ``base_steps`` optimizer steps, then one routed expert per group (see module doc)."""

    name = "tdc"
    # Under DDP some experts see no sample in a step (all of them but the base in stage 1).
    has_unused_parameters = True

    def __init__(self, noise_scheduler, sampler, boundaries: List[int], base_steps: int, **kwargs):
        super().__init__(noise_scheduler, sampler, **kwargs)
        self.boundaries = list(boundaries)
        self.base_steps = base_steps
        seed = kwargs.get("seed", 0)
        self.group_sampler = StratifiedSampler(noise_scheduler.config.num_train_timesteps, boundaries, seed=seed + 1)
        self.stage = 1
        self.experts: Optional[TimestepRoutedExperts] = None
        self.optimizer = None
        self.ema_model = None
        self._expert_sizes = None
        self._group_loss = torch.zeros(len(boundaries) - 1)
        self._group_count = torch.zeros(len(boundaries) - 1)

    @property
    def num_groups(self) -> int:
        return len(self.boundaries) - 1

    # ---- flags ---------------------------------------------------------------------------------------
    @classmethod
    def add_regime_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("tdc regime (--regime tdc)")
        group.add_argument("--tdc_groups", type=int, default=4, help="Number of timestep groups (experts).")
        group.add_argument("--tdc_group_cost", type=str, default="log_snr", choices=GROUP_COSTS,
                           help="How groups are cut: equal intervals or ANT's interval DP under this cost.")
        group.add_argument("--tdc_base_steps", type=int, default=None,
                           help="Optimizer steps of stage 1 (one base model on all timesteps) before branching.")

    @classmethod
    def validate_regime_args(cls, args: argparse.Namespace, num_train_timesteps: Optional[int] = None) -> None:
        if args.regime != "tdc":
            return
        if args.tdc_base_steps is None or args.tdc_base_steps < 1:
            raise UsageError(f"--regime tdc needs --tdc_base_steps >= 1, got {args.tdc_base_steps}")
        if args.tdc_groups < 2 or (num_train_timesteps is not None and args.tdc_groups > num_train_timesteps):
            raise UsageError(f"--tdc_groups must be in [2, {num_train_timesteps or 'T'}] (the scheduler's number of timesteps), got {args.tdc_groups}")
        if getattr(args, "max_train_steps", None) is not None:
            cls.check_regime_schedule(args, args.max_train_steps)

    @classmethod
    def check_regime_schedule(cls, args: argparse.Namespace, max_train_steps: int) -> None:
        if args.tdc_base_steps >= max_train_steps:
            raise UsageError(
                f"--tdc_base_steps {args.tdc_base_steps} leaves no stage-2 steps: it must be below the "
                f"{max_train_steps} total training steps"
            )

    @classmethod
    def extra_kwargs_from_args(cls, args: argparse.Namespace, noise_scheduler) -> Dict[str, Any]:
        return {"boundaries": tdc_boundaries(args.tdc_group_cost, args.tdc_groups, noise_scheduler),
                "base_steps": args.tdc_base_steps}

    # ---- model plumbing ------------------------------------------------------------------------------
    def wrap_model(self, model):
        """The model to train: one copy of ``model`` per group, all routed to the base until branching."""
        self.experts = TimestepRoutedExperts.from_model(model, self.boundaries)
        self.experts.route_all_to = 0
        return self.experts

    def attach(self, optimizer=None, ema_model=None) -> None:
        """The optimizer and EMA whose per-expert state is copied when the base branches."""
        self.optimizer, self.ema_model = optimizer, ema_model

    def _branch(self) -> None:
        """Copies expert 0 (weights, optimizer state, EMA weights) into every other expert."""
        experts = self.experts.experts
        base_params = list(experts[0].parameters())
        per_expert = len(base_params)
        with torch.no_grad():
            for expert in experts[1:]:
                expert.load_state_dict(experts[0].state_dict())
            if self.optimizer is not None:
                state = self.optimizer.state
                for expert in experts[1:]:
                    for src, dst in zip(base_params, expert.parameters()):
                        if src in state:
                            state[dst] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state[src].items()}
            if self.ema_model is not None:
                shadow = self.ema_model.shadow_params
                for i in range(1, self.num_groups):
                    for j in range(per_expert):
                        shadow[i * per_expert + j].copy_(shadow[j])
        self.stage = 2
        self.experts.route_all_to = None

    # ---- the step ------------------------------------------------------------------------------------
    @property
    def active_sampler(self):
        return self.sampler if self.stage == 1 else self.group_sampler

    def backward(self, accelerator, per_sample_loss, timesteps, model=None):
        loss = super().backward(accelerator, per_sample_loss, timesteps, model)
        if self.stage == 2:
            groups = self.group_sampler.cluster_of(timesteps.cpu())
            losses = per_sample_loss.detach().float().cpu()
            self._group_loss.index_add_(0, groups, losses)
            self._group_count.index_add_(0, groups, torch.ones_like(losses))
        return loss

    def on_step_end(self, accelerator, global_step: int) -> Dict[str, Any]:
        logs: Dict[str, Any] = {**super().on_step_end(accelerator, global_step), "tdc_stage": self.stage}
        if self.stage == 2 and self._group_count.sum() > 0:
            for i, (total, count) in enumerate(zip(self._group_loss.tolist(), self._group_count.tolist())):
                if count:
                    logs[f"loss/group_{i}"] = total / count
            self._group_loss.zero_()
            self._group_count.zero_()
        if self.stage == 1 and global_step >= self.base_steps:
            self._branch()
            logs["tdc_stage"] = 2
        return logs

    # ---- records -------------------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        info.update(
            groups=[[a, b] for a, b in zip(self.boundaries, self.boundaries[1:])],
            base_steps=self.base_steps,
            stage=self.stage,
        )
        if self.experts is not None:
            if self._expert_sizes is None:  # widths do not change while training: count once
                from .pruning import count_flops, count_params

                self._expert_sizes = [{"params": count_params(e), "flops_per_forward": count_flops(e)}
                                      for e in self.experts.experts]
            info["experts"] = self._expert_sizes
        return info

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage, "boundaries": list(self.boundaries),
                "base_steps": self.base_steps, "group_sampler": self.group_sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "stage" not in state or "boundaries" not in state:
            raise UsageError("--resume_from_checkpoint: the checkpoint was not written by --regime tdc")
        if list(state["boundaries"]) != self.boundaries:
            raise UsageError(
                f"--resume_from_checkpoint: the checkpoint's TDC groups {state['boundaries']} differ from this "
                f"run's {self.boundaries} (--tdc_groups / --tdc_group_cost)"
            )
        if state["stage"] == 2 and state["base_steps"] != self.base_steps:
            raise UsageError(
                f"--resume_from_checkpoint: the checkpoint is in TDC stage 2 (branched after "
                f"{state['base_steps']} steps) but --tdc_base_steps is {self.base_steps}"
            )
        super().load_state_dict(state)
        self.group_sampler.load_state_dict(state["group_sampler"])
        self.stage = state["stage"]
        if self.experts is not None:
            self.experts.route_all_to = 0 if self.stage == 1 else None


REGIMES["tdc"] = TDCRegime
