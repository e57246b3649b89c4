"""The composed regime: timestep axis × loss weighting × cluster balancer × expert layout, one object.

A script's step is::

    noise, timesteps = regime.sample(clean_images)  # noise levels in the process's coordinate
    noisy = noise_process.add_noise(clean_images, noise, timesteps)
    with accelerator.accumulate(model), regime.forward_context(accelerator, model):
        model_output = model(noisy, noise_process.model_timesteps(timesteps)).sample
        per_sample_loss = denoising_loss(model_output, noise_process, clean_images, noise, timesteps)
        loss = regime.backward(accelerator, per_sample_loss, timesteps, model)
        optimizer.step(); ...
    if accelerator.sync_gradients:
        logs.update(regime.on_step_end(accelerator, global_step))

Randomness: the regime draws the timesteps and noise of the *global* batch (all data-parallel ranks) from
generators that are identical on every rank and keeps its rank's slice. Every rank therefore holds the same
regime state, rank 0's checkpoint restores all of them, and a resumed run redraws exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..clustering import boundaries_to_clusters, bucketize
from ..errors import UsageError
from ..noise import as_process
from ..sampling import TimestepSampler
from .balancers import Balancer
from .experts import ExpertLayout
from .timesteps import describe_pacing
from .weighting import Weighting

NOISE_SEED_SALT = 0x9E3779B9
# The flags behind each field of the record a checkpoint is checked against.
AXIS_FLAGS = {
    "noise_process": "--noise_process / --flow_shift",
    "timestep_sampling": "--timestep_sampling", "weighting": "--weighting and its flags", "balancer": "--balancer and its flags",
    "clusters": "--clusters / --cluster_cost", "experts": "--experts / --experts_base_steps / --experts_schedule", "pacing": "--curriculum_pacing and its flags",
}


class Regime:
    """One regime: a timestep ``sampler``, a :class:`Weighting`, optionally a :class:`Balancer` over the clusters
    ``boundaries`` and an :class:`ExpertLayout`.

    Args:
        noise_process: the :class:`~diffusers_curriculum.noise.NoiseProcess` (or the diffusers training scheduler it
            is made from): T, the noise levels' SNR, whether levels are integers or reals.
        sampler: the timestep axis (see :mod:`.timesteps`); ``timestep_sampling`` names it for the record.
        boundaries: the clusters ``[0, b_1, …, T]`` shared by the sampler, the balancer and the experts.
        name: the preset or composition the record shows.
        seed: seed of the noise generator (the sampler has its own).
        process_index, num_processes: this rank and the data-parallel world size.
    """

    def __init__(self, noise_process, sampler: TimestepSampler, weighting: Optional[Weighting] = None,
                 balancer: Optional[Balancer] = None, experts: Optional[ExpertLayout] = None,
                 boundaries: Optional[Sequence[int]] = None, cluster_cost: Optional[str] = None,
                 timestep_sampling: str = "uniform", name: str = "uniform", seed: int = 0,
                 process_index: int = 0, num_processes: int = 1):
        if balancer is not None and boundaries is None:
            raise ValueError("a balancer needs the clusters (boundaries)")
        self.noise_process, self.sampler = as_process(noise_process), sampler
        if self.noise_process.continuous and not sampler.continuous:
            raise ValueError(f"the {self.noise_process.name} process has real-valued noise levels: give a continuous sampler")
        self.weighting = weighting or Weighting()
        self.balancer, self.experts = balancer, experts
        self.boundaries = None if boundaries is None else [int(b) for b in boundaries]
        self.cluster_cost, self.timestep_sampling, self.name = cluster_cost, timestep_sampling, name
        # Salted: the sampler is seeded with the same --seed, and two generators in the same state would
        # draw timesteps and noise from the same random stream.
        self.noise_generator = torch.Generator().manual_seed(seed + NOISE_SEED_SALT)
        self.process_index, self.num_processes = process_index, num_processes
        self.optimizer_steps = 0
        self._loss_sum, self._loss_count = 0.0, 0

    # ---- model plumbing ------------------------------------------------------------------------------
    @property
    def has_unused_parameters(self) -> bool:
        """True when some parameters get no gradient in a step (DDP then needs find_unused_parameters)."""
        return self.experts is not None

    def wrap_model(self, model):
        """The module to train in place of ``model`` (called before the optimizer and EMA are built)."""
        return self.experts.wrap_model(model) if self.experts is not None else model

    def attach(self, optimizer=None, ema_model=None) -> None:
        """Hands the regime the run's optimizer and EMA (called once, after ``accelerator.prepare``)."""
        if self.experts is not None:
            self.experts.attach(optimizer, ema_model)

    # ---- drawing -------------------------------------------------------------------------------------
    @property
    def active_sampler(self) -> TimestepSampler:
        """The sampler drawing this step's timesteps: the timestep axis, or the experts' groups once branched."""
        if self.experts is not None and self.experts.branched:
            return self.experts.group_sampler
        return self.sampler

    def _local_slice(self, global_draw: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global draw: every ``num_processes``-th row, so structured draws
        (e.g. grouped by cluster) spread evenly over the ranks."""
        return global_draw[self.process_index :: self.num_processes]

    def sample(self, clean: torch.Tensor, noise_offset: float = 0.0) -> Tuple[torch.Tensor, torch.LongTensor]:
        """Draws ``(noise, timesteps)`` for this rank's batch ``clean`` of shape ``(B, C, H, W)``.

        ``noise_offset`` adds offset noise (one value per sample and channel), as diffusers' ``--noise_offset``.
        """
        timesteps = self._local_slice(self.active_sampler.sample(clean.shape[0] * self.num_processes))
        noise = self.randn_like(clean)
        if noise_offset:
            noise = noise + noise_offset * self.randn_like(clean[:, :, :1, :1])
        return noise, timesteps.to(clean.device)

    def randn_like(self, local: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like this rank's ``local`` batch, drawn for the global batch from the
        regime's checkpointed generator (so it resumes exactly); e.g. for sampling VAE latents."""
        draw = torch.randn((local.shape[0] * self.num_processes, *local.shape[1:]), generator=self.noise_generator)
        return self._local_slice(draw).to(device=local.device, dtype=local.dtype)

    # ---- the loss ------------------------------------------------------------------------------------
    def weighted(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample terms after the loss weighting and the sampler's importance weights (loss-aware)."""
        importance = self.active_sampler.importance_weights(timesteps)
        return self.weighting(self.noise_process, per_sample_loss, timesteps, importance)

    def compute_loss(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The weighted mean of the per-sample losses (shape ``(B,)``): the scalar of an unbalanced step."""
        return self.weighted(per_sample_loss, timesteps).mean()

    def cluster_losses(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor):
        """(k,) mean weighted loss per cluster over this rank's batch, and which clusters are present."""
        return self._cluster_means(self.weighted(per_sample_loss, timesteps), timesteps)

    def _cluster_means(self, terms: torch.Tensor, timesteps: torch.Tensor):
        """(k,) mean of the weighted per-sample ``terms`` per cluster, and which clusters are present."""
        index = bucketize(timesteps, self.boundaries)
        k = len(self.boundaries) - 1
        sums = torch.zeros(k, device=terms.device, dtype=terms.dtype).index_add(0, index, terms)
        counts = torch.bincount(index, minlength=k).to(terms.device)
        return sums / counts.clamp_min(1), counts > 0

    @property
    def per_expert_means(self) -> bool:
        """Whether this step trains several experts at once on one batch (TDC's stratified stage 2)."""
        return self.experts is not None and self.experts.trains_together

    def expert_objective(self, terms: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The objective of a stratified stage-2 step, from the weighted per-sample ``terms`` (:meth:`weighted`):
        the sum over the experts of each one's mean weighted loss on its own samples, so each expert's gradient is
        that mean's, as if it were fine-tuned alone on its group (the paper's fine-tuning). The batch mean would give each of the k experts 1/k of it; the experts start stage 2
        with the base's AdamW second moments, so they would then step at about 1/k of the learning rate until those
        decay (β2 = 0.999: most of a short stage 2). Measured on the CPU protocol (README, TDC round 3): 388.1 ±
        18.6 against 400.3 ± 15.9 with the batch mean, better in every seed. The logged loss stays the batch mean."""
        means, present = self._cluster_means(terms, timesteps)
        return means[present].sum()

    def forward_context(self, accelerator, model):
        """Context for the forward pass inside ``accelerator.accumulate``: ``accelerator.no_sync(model)`` on
        steps whose gradients the balancer forms itself (it averages them over ranks on its own)."""
        if self.balancer is not None and self.balancer.needs_manual_sync(self.optimizer_steps):
            return accelerator.no_sync(model)
        return contextlib.nullcontext()

    def backward(self, accelerator, per_sample_loss: torch.Tensor, timesteps: torch.Tensor, model=None) -> torch.Tensor:
        """Back-propagates this regime's loss through ``accelerator`` and returns it (detached)."""
        if self.balancer is None:
            terms = self.weighted(per_sample_loss, timesteps)  # once: the objective and the logged mean share them
            loss = terms.mean()
            accelerator.backward(self.expert_objective(terms, timesteps) if self.per_expert_means else loss)
        else:
            losses, present = self.cluster_losses(per_sample_loss, timesteps)
            loss = self.balancer.backward(accelerator, losses, present, model, self.optimizer_steps)
        # A loss-aware draw learns from the losses of what it drew (the sampler drawing now); the curriculum's pacing
        # follows the run's loss on every step, also once TDC's groups draw (its record says how far it got).
        sampler = self.active_sampler
        if sampler.observes_losses:  # the same history on every rank keeps their draws identical
            sampler.observe(accelerator.gather(timesteps), accelerator.gather(per_sample_loss.detach()))
        if self.sampler.needs_step_loss:
            self._loss_sum += float(per_sample_loss.detach().mean())
            self._loss_count += 1
        if self.experts is not None:
            self.experts.observe(per_sample_loss, timesteps)
        return loss.detach()

    def on_step_end(self, accelerator, global_step: int) -> Dict[str, Any]:
        """Called once per optimizer step (after gradient sync): each axis' update; returns values to log."""
        logs = dict(self.weighting.step(accelerator))
        if self.balancer is not None:
            logs.update(self.balancer.on_step_end(accelerator))
        self.optimizer_steps += 1
        if self.sampler.needs_step_loss:  # pacing: the loss averaged over every rank
            local = torch.tensor(self._loss_sum / max(self._loss_count, 1), device=accelerator.device)
            self._loss_sum, self._loss_count = 0.0, 0
            logs.update(self.sampler.advance(float(accelerator.reduce(local, reduction="mean")), global_step))
        if self.experts is not None:
            logs.update(self.experts.on_step_end(global_step))
        return logs

    # ---- records -------------------------------------------------------------------------------------
    def axes(self) -> Dict[str, Any]:
        """What shapes training, field by field: the record a resumed run must match."""
        pacing = getattr(self.sampler, "pacing", None)
        # A flow run's record names its process; DDPM's has no field, as checkpoints written before flow matching.
        process = {} if self.noise_process.name == "ddpm" else {"noise_process": self.noise_process.describe()}
        return {
            **process,
            "timestep_sampling": self.timestep_sampling,
            "weighting": self.weighting.describe(),
            "balancer": self.balancer.describe() if self.balancer is not None else {"method": "none"},
            "experts": None if self.experts is None else self.experts.record(),
            "pacing": None if pacing is None else describe_pacing(pacing),
            "clusters": {"boundaries": self.boundaries, "cost": self.cluster_cost},  # last: the axes above name the cause first
        }

    def describe(self) -> Dict[str, Any]:
        """JSON-able summary for ``training_regime.json`` and the model card: every axis."""
        info: Dict[str, Any] = {"name": self.name, **self.noise_process.describe(), "timestep_sampling": self.timestep_sampling,
                                "timestep_sampler": type(self.sampler).__name__, **self.weighting.describe()}
        info["balancer"] = self.balancer.name if self.balancer is not None else "none"
        if self.balancer is not None:
            info.update(self.balancer.describe())
        if self.boundaries is not None:
            info.update(clusters=[list(c) for c in boundaries_to_clusters(self.boundaries)], cluster_cost=self.cluster_cost)
        if self.sampler.needs_step_loss:  # the curriculum: its pacing and stage history
            info.update(self.sampler.describe())
        if self.experts is not None:
            info.update(self.experts.describe())
        return info

    def state_dict(self) -> Dict[str, Any]:
        state = {"axes": self.axes(), "sampler": self.sampler.state_dict(), "noise_generator": self.noise_generator.get_state(),
                 "weighting": self.weighting.state_dict(), "optimizer_steps": self.optimizer_steps}
        if self.balancer is not None:
            state["balancer"] = self.balancer.state_dict()
        if self.experts is not None:
            state["experts"] = self.experts.state_dict()
        return state

    def check_axes(self, saved: Optional[Dict[str, Any]]) -> None:
        """Raises a one-line :class:`UsageError` naming the first field (and its flags) where ``saved`` (a
        checkpoint's :meth:`axes` record) differs from this regime's."""
        if saved is None:
            raise UsageError("--resume_from_checkpoint: the checkpoint holds no regime record (written by an older "
                             "diffusers-curriculum); start a new run or resume it with that version")
        axes = self.axes()
        for field in [*axes, *(f for f in saved if f not in axes)]:  # a field only one side has differs too
            if saved.get(field) != axes.get(field):
                theirs = saved[field] if field in saved else "not set"
                mine = axes[field] if field in axes else "not set (the default)"
                raise UsageError(f"--resume_from_checkpoint: the checkpoint's {field} is {theirs}, this run's is {mine} "
                                 f"({AXIS_FLAGS.get(field, f'--{field}')}); resume with the flags the checkpoint was written with")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_axes(state.get("axes"))
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        self.weighting.load_state_dict(state["weighting"])
        self.optimizer_steps = state["optimizer_steps"]
        if self.balancer is not None:
            self.balancer.load_state_dict(state["balancer"])
        if self.experts is not None:
            self.experts.load_state_dict(state["experts"])
