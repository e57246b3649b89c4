"""The expert axis (``--experts K``): TDC's timestep-routed experts (arXiv 2312.13307).

The model trained is a :class:`~diffusers_curriculum.experts.TimestepRoutedExperts` from the start, one copy of
the UNet per cluster:

* stage 1 (steps 1 … ``base_steps``): every sample goes through expert 0, the *base*, on the timesteps the
  timestep axis draws; the other experts get no gradient and do not move;
* at the end of step ``base_steps`` the base *branches*: its weights, optimizer state and EMA weights are
  copied into every other expert;
* stage 2, each copy is fine-tuned on its own timesteps (``loss/group_<i>`` in the logs), on one of two
  ``schedule`` s (``--experts_schedule``):

  - ``stratified`` (the default): batches are stratified over the experts' clusters and each sample is routed
    to its cluster's expert, so every step trains all k experts on B/k samples each. With ``batched``
    (``--experts_forward batched``, the default) the k experts run as one wide model
    (:mod:`diffusers_curriculum.experts.wide`) instead of one forward per group;
  - ``round_robin``: each step draws the whole batch from one cluster and trains that cluster's expert alone,
    the experts in turn (as the paper fine-tunes each copy on its group, interleaved): every expert gets as
    many samples as under ``stratified``, in k times fewer updates of k times the batch, and a step costs what
    a single-model step costs (one forward, one backward, the optimizer over one expert's parameters: AdamW
    skips parameters without a gradient).

One model, one optimizer and one EMA across both stages: checkpoints of either stage have the same layout.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..clustering import bucketize
from ..experts import TimestepRoutedExperts, count_flops, count_params
from ..sampling import GroupCycleSampler, StratifiedSampler
from ..experts.wide import BatchedExpertStep

# Salt of the stage-2 sampler's seed, away from the timestep axis' generator.
GROUP_SEED_SALT = 1
# Stage 2's schedules, and the sampler each draws its batches with.
EXPERT_SCHEDULES = {"stratified": StratifiedSampler, "round_robin": GroupCycleSampler}


class ExpertLayout:
    """``len(boundaries) - 1`` experts, a base stage of ``base_steps`` optimizer steps, then routed training on
    ``schedule`` (one of :data:`EXPERT_SCHEDULES`)."""

    def __init__(self, num_train_timesteps: int, boundaries: Sequence[int], base_steps: int, seed: int = 0,
                 batched: bool = True, schedule: str = "stratified", routing_boundaries: Optional[Sequence[float]] = None,
                 continuous: bool = False):
        if base_steps < 1:
            raise ValueError(f"base_steps must be >= 1, got {base_steps}")
        if schedule not in EXPERT_SCHEDULES:
            raise ValueError(f"schedule must be one of {list(EXPERT_SCHEDULES)}, got {schedule!r}")
        self.boundaries: List[int] = [int(b) for b in boundaries]
        # The same cuts in the timesteps the network is fed (a shifted flow's are not the grid's): what the model routes on.
        self.routing_boundaries = list(self.boundaries if routing_boundaries is None else routing_boundaries)
        self.base_steps = base_steps
        self.schedule = schedule
        self.batched = batched and schedule == "stratified"  # round robin runs one expert per step
        self.group_sampler = EXPERT_SCHEDULES[schedule](num_train_timesteps, self.boundaries, seed=seed + GROUP_SEED_SALT)
        self.group_sampler.continuous = continuous
        self.stage = 1
        self.experts: Optional[TimestepRoutedExperts] = None
        self.optimizer = self.ema_model = None
        self._sizes = None
        self._group_loss = torch.zeros(self.num_groups)
        self._group_count = torch.zeros(self.num_groups)

    @property
    def branched(self) -> bool:
        """Whether the base has branched into the experts (stage 2): the group sampler then draws the timesteps."""
        return self.stage == 2

    @property
    def trains_together(self) -> bool:
        """Whether a step trains several experts on one batch (stage 2, stratified): each then takes the mean of its
        own samples' losses."""
        return self.stage == 2 and self.schedule == "stratified"

    @property
    def num_groups(self) -> int:
        return len(self.boundaries) - 1

    def wrap_model(self, model):
        """One copy of ``model`` per group, all routed to the base until branching."""
        self.experts = TimestepRoutedExperts.from_model(model, self.routing_boundaries)
        self.experts.route_all_to = 0 if self.stage == 1 else None
        self.experts.batched = BatchedExpertStep() if self.batched else None
        return self.experts

    def attach(self, optimizer=None, ema_model=None) -> None:
        self.optimizer, self.ema_model = optimizer, ema_model

    def branch(self) -> None:
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

    def observe(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Accumulates this step's losses per group (stage 2), for the logs."""
        if self.stage == 2:
            groups = bucketize(timesteps.cpu(), self.boundaries)
            losses = per_sample_loss.detach().float().cpu()
            self._group_loss.index_add_(0, groups, losses)
            self._group_count.index_add_(0, groups, torch.ones_like(losses))

    def on_step_end(self, global_step: int) -> Dict[str, Any]:
        logs: Dict[str, Any] = {"tdc_stage": self.stage}
        if self.stage == 2 and self._group_count.sum() > 0:
            for i, (total, count) in enumerate(zip(self._group_loss.tolist(), self._group_count.tolist())):
                if count:
                    logs[f"loss/group_{i}"] = total / count
            self._group_loss.zero_()
            self._group_count.zero_()
        if self.stage == 1 and global_step >= self.base_steps:
            self.branch()
            logs["tdc_stage"] = 2
        elif self.stage == 2 and self.schedule == "round_robin":
            self.group_sampler.next_cluster()
        return logs

    def describe(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {"groups": [[a, b] for a, b in zip(self.boundaries, self.boundaries[1:])],
                                "base_steps": self.base_steps, "schedule": self.schedule, "stage": self.stage}
        if self.experts is not None:
            if self._sizes is None:  # widths do not change while training: count once
                self._sizes = [{"params": count_params(e), "flops_per_forward": count_flops(e)} for e in self.experts.experts]
            info["experts"] = self._sizes
        return info

    def record(self) -> Dict[str, Any]:
        """What a resumed run must match (the schedule only when not the default: checkpoints written before it
        existed hold the stratified record without it)."""
        record: Dict[str, Any] = {"num_experts": self.num_groups, "base_steps": self.base_steps}
        return record if self.schedule == "stratified" else {**record, "schedule": self.schedule}

    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "group_sampler": self.group_sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.group_sampler.load_state_dict(state["group_sampler"])
        self.stage = state["stage"]
        if self.experts is not None:
            self.experts.route_all_to = 0 if self.stage == 1 else None
