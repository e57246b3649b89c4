"""Training regimes: the one object a training script talks to.

A regime decides which timesteps (tasks) a batch holds, turns per-sample losses into what is
back-propagated, performs the backward pass, keeps its own bookkeeping between steps and carries all of
that state through ``accelerator.register_for_checkpointing``. A script's step is::

    noise, timesteps = regime.sample(clean_images)
    noisy = noise_scheduler.add_noise(clean_images, noise, timesteps)
    with accelerator.accumulate(model):
        per_sample_loss = ...                       # (batch,) MSE of the model's prediction
        loss = regime.backward(accelerator, per_sample_loss, timesteps, model)
        optimizer.step(); ...
    if accelerator.sync_gradients:
        logs.update(regime.on_step_end(accelerator, global_step))

Randomness: a regime draws the timesteps and noise of the *global* batch (all data-parallel ranks) from
generators that are identical on every rank and keeps its rank's slice. Every rank therefore holds the
same regime state, rank 0's checkpoint restores all of them, and a resumed run redraws exactly what the
uninterrupted run would have drawn.

New regimes subclass :class:`TrainingRegime`, add their flags in ``add_args`` and register in
:data:`REGIMES`.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Dict, Optional, Tuple

import torch
from diffusers.training_utils import compute_snr

from .errors import UsageError
from .sampling import SAMPLERS, TimestepSampler, WeightedSampler, speed_weights, timestep_bias_weights
from .weighting import WEIGHTINGS, LearnedWeighting, loss_weights


NOISE_SEED_SALT = 0x9E3779B9


class TrainingRegime:
    """Uniform-task training: a timestep sampler plus an optional per-sample loss weighting.

    Args:
        noise_scheduler: the diffusers scheduler used for ``add_noise`` (gives T and ᾱ_t).
        sampler: draws the timesteps of the global batch.
        weighting: ``"none"``, ``"min_snr"``, ``"p2"`` or ``"learned"`` (see :mod:`diffusers_curriculum.weighting`).
        learned_lr: learning rate of the learned weighting u(λ) (``weighting="learned"``).
        seed: seed of the noise generator (the sampler has its own).
        process_index, num_processes: this rank and the data-parallel world size.
    """

    name = "uniform"
    # True when some parameters get no gradient in a step (DDP then needs find_unused_parameters).
    has_unused_parameters = False

    def __init__(
        self,
        noise_scheduler,
        sampler: TimestepSampler,
        weighting: str = "none",
        snr_gamma: Optional[float] = None,
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
        learned_lr: float = 1e-2,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.noise_scheduler = noise_scheduler
        self.sampler = sampler
        self.weighting = weighting
        self.snr_gamma, self.p2_gamma, self.p2_k = snr_gamma, p2_gamma, p2_k
        self.learned = LearnedWeighting(lr=learned_lr, seed=seed) if weighting == "learned" else None
        # Salted: the sampler is seeded with the same --seed, and two generators in the same state would
        # draw timesteps and noise from the same random stream.
        self.noise_generator = torch.Generator().manual_seed(seed + NOISE_SEED_SALT)
        self.process_index, self.num_processes = process_index, num_processes

    # ---- flags ---------------------------------------------------------------------------------------
    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        """Flags shared by every regime."""
        group = parser.add_argument_group("training regime")
        group.add_argument("--regime", type=str, default="uniform", help=f"One of {sorted(REGIMES)}.")
        group.add_argument(
            "--timestep_sampling", type=str, default="uniform", choices=sorted(SAMPLERS),
            help="How the uniform regime draws timesteps.",
        )
        group.add_argument("--speed_tau", type=float, default=0.7,
                           help="--timestep_sampling speed: timesteps above tau·T are the suppressed convergence area.")
        group.add_argument("--speed_suppression", type=float, default=0.25,
                           help="--timestep_sampling speed: relative probability of the convergence area.")
        group.add_argument("--timestep_bias_strategy", type=str, default="earlier", choices=["earlier", "later", "range"],
                           help="--timestep_sampling timestep_bias: which timesteps get the bias (diffusers SDXL flags).")
        group.add_argument("--timestep_bias_multiplier", type=float, default=2.0)
        group.add_argument("--timestep_bias_portion", type=float, default=0.25)
        group.add_argument("--timestep_bias_begin", type=int, default=0)
        group.add_argument("--timestep_bias_end", type=int, default=1000)
        group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal sampler.")
        group.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal sampler.")
        group.add_argument(
            "--weighting", type=str, default=None, choices=WEIGHTINGS,
            help="Per-sample loss weighting. Defaults to 'min_snr' when --snr_gamma is set, else 'none'.",
        )
        group.add_argument(
            "--snr_gamma", type=float, default=None,
            help="γ of Min-SNR-γ loss weighting (recommended 5.0, arXiv 2303.09556).",
        )
        group.add_argument("--p2_gamma", type=float, default=1.0, help="γ of P2 weighting 1/(k+SNR)^γ.")
        group.add_argument("--p2_k", type=float, default=1.0, help="k of P2 weighting 1/(k+SNR)^γ.")
        group.add_argument("--learned_weighting_lr", type=float, default=1e-2,
                           help="--weighting learned: learning rate of the loss log-variance u(λ) (EDM2).")
        for regime_cls in REGIMES.values():
            if "add_regime_args" in vars(regime_cls):
                regime_cls.add_regime_args(parser)

    @staticmethod
    def validate_args(args: argparse.Namespace, num_train_timesteps: Optional[int] = None) -> None:
        """Checks the shared flags; raises :class:`UsageError` naming the flag. Checks against T (cluster
        counts) run when ``num_train_timesteps`` is given; :meth:`from_args` gives the scheduler's."""
        if args.regime not in REGIMES:
            raise UsageError(f"--regime {args.regime!r} is unknown; choose one of {', '.join(sorted(REGIMES))}")
        if args.weighting is None:
            args.weighting = "min_snr" if args.snr_gamma is not None else "none"
        if args.weighting == "min_snr" and (args.snr_gamma is None or not args.snr_gamma > 0):
            raise UsageError(f"--weighting min_snr needs --snr_gamma > 0, got {args.snr_gamma}")
        if args.snr_gamma is not None and args.weighting != "min_snr":
            raise UsageError(f"--snr_gamma is set but --weighting is {args.weighting!r}; drop one of them")
        if not args.logit_std > 0:
            raise UsageError(f"--logit_std must be > 0, got {args.logit_std}")
        if not 0 < args.speed_tau < 1:
            raise UsageError(f"--speed_tau must be in (0, 1), got {args.speed_tau}")
        if not args.speed_suppression > 0:
            raise UsageError(f"--speed_suppression must be > 0, got {args.speed_suppression}")
        if not args.timestep_bias_multiplier > 0:
            raise UsageError(f"--timestep_bias_multiplier must be > 0, got {args.timestep_bias_multiplier}")
        if not 0 < args.timestep_bias_portion <= 1:
            raise UsageError(f"--timestep_bias_portion must be in (0, 1], got {args.timestep_bias_portion}")
        if not args.p2_k > 0:
            raise UsageError(f"--p2_k must be > 0, got {args.p2_k}")
        if not args.learned_weighting_lr > 0:
            raise UsageError(f"--learned_weighting_lr must be > 0, got {args.learned_weighting_lr}")
        REGIMES[args.regime].validate_regime_args(args, num_train_timesteps)

    @classmethod
    def add_regime_args(cls, parser: argparse.ArgumentParser) -> None:
        """Adds the flags of this regime only (subclasses override)."""

    @classmethod
    def validate_regime_args(cls, args: argparse.Namespace, num_train_timesteps: Optional[int] = None) -> None:
        """Checks the flags of this regime only (subclasses override); T-dependent checks need ``num_train_timesteps``."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, noise_scheduler, process_index: int = 0, num_processes: int = 1):
        """Builds the regime named by ``--regime``, after checking the flags against the scheduler's T."""
        cls.validate_args(args, noise_scheduler.config.num_train_timesteps)
        regime_cls = REGIMES[args.regime]
        return regime_cls(
            noise_scheduler,
            regime_cls.sampler_from_args(args, noise_scheduler),
            weighting=args.weighting,
            snr_gamma=args.snr_gamma,
            p2_gamma=args.p2_gamma,
            p2_k=args.p2_k,
            learned_lr=args.learned_weighting_lr,
            seed=0 if args.seed is None else args.seed,
            process_index=process_index,
            num_processes=num_processes,
            **regime_cls.extra_kwargs_from_args(args, noise_scheduler),
        )

    @staticmethod
    def uses_unused_parameters(args: argparse.Namespace) -> bool:
        """Whether the regime named by ``--regime`` leaves parameters without gradient in some steps."""
        return REGIMES[args.regime].has_unused_parameters

    @staticmethod
    def check_schedule(args: argparse.Namespace, max_train_steps: int) -> None:
        """Checks the regime's flags against the run's total optimizer steps, once the script knows them."""
        REGIMES[args.regime].check_regime_schedule(args, max_train_steps)

    @classmethod
    def check_regime_schedule(cls, args: argparse.Namespace, max_train_steps: int) -> None:
        """:meth:`check_schedule` for this regime only (subclasses override)."""

    @classmethod
    def sampler_from_args(cls, args: argparse.Namespace, noise_scheduler) -> TimestepSampler:
        seed = 0 if args.seed is None else args.seed
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        if args.timestep_sampling == "logit_normal":
            return SAMPLERS["logit_normal"](num_train_timesteps, args.logit_mean, args.logit_std, seed=seed)
        if args.timestep_sampling == "speed":
            return WeightedSampler(num_train_timesteps, speed_weights(num_train_timesteps, args.speed_tau, args.speed_suppression), seed=seed)
        if args.timestep_sampling == "timestep_bias":
            end = min(args.timestep_bias_end, num_train_timesteps)
            try:
                weights = timestep_bias_weights(num_train_timesteps, args.timestep_bias_strategy, args.timestep_bias_multiplier,
                                                args.timestep_bias_portion, args.timestep_bias_begin, end)
            except ValueError as e:
                raise UsageError(f"--timestep_bias_begin/--timestep_bias_end: {e}") from None
            return WeightedSampler(num_train_timesteps, weights, seed=seed)
        return SAMPLERS[args.timestep_sampling](num_train_timesteps, seed=seed)

    @classmethod
    def extra_kwargs_from_args(cls, args: argparse.Namespace, noise_scheduler) -> Dict[str, Any]:
        return {}

    # ---- model plumbing ------------------------------------------------------------------------------
    def wrap_model(self, model):
        """The module to train in place of ``model`` (called before the optimizer and EMA are built)."""
        return model

    def attach(self, optimizer=None, ema_model=None) -> None:
        """Hands the regime the run's optimizer and EMA (called once, after ``accelerator.prepare``)."""

    # ---- the training step ---------------------------------------------------------------------------
    def _local_slice(self, global_draw: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global draw: every ``num_processes``-th row, so structured draws
        (e.g. grouped by cluster) spread evenly over the ranks."""
        return global_draw[self.process_index :: self.num_processes]

    def sample(self, clean: torch.Tensor, noise_offset: float = 0.0) -> Tuple[torch.Tensor, torch.LongTensor]:
        """Draws ``(noise, timesteps)`` for this rank's batch ``clean`` of shape ``(B, C, H, W)``.

        ``noise_offset`` adds offset noise (one value per sample and channel), as diffusers' ``--noise_offset``.
        """
        timesteps = self._local_slice(self._draw_timesteps(clean.shape[0] * self.num_processes))
        return self._noise(clean, noise_offset), timesteps.to(clean.device)

    @property
    def active_sampler(self) -> TimestepSampler:
        """The sampler drawing this step's timesteps (TDC switches samplers between its stages)."""
        return self.sampler

    def _draw_timesteps(self, global_size: int) -> torch.Tensor:
        return self.active_sampler.sample(global_size)

    def _noise(self, clean: torch.Tensor, noise_offset: float) -> torch.Tensor:
        noise = self.randn_like(clean)
        if noise_offset:
            noise = noise + noise_offset * self.randn_like(clean[:, :, :1, :1])
        return noise

    def randn_like(self, local: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like this rank's ``local`` batch, drawn for the global batch from the
        regime's checkpointed generator (so it resumes exactly); e.g. for sampling VAE latents."""
        draw = torch.randn((local.shape[0] * self.num_processes, *local.shape[1:]), generator=self.noise_generator)
        return self._local_slice(draw).to(device=local.device, dtype=local.dtype)

    def weighted(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (shape ``(B,)``) times this regime's loss weights and the sampler's importance
        weights (loss-aware sampling)."""
        weights = loss_weights(
            self.noise_scheduler, timesteps, self.weighting, self.snr_gamma, self.p2_gamma, self.p2_k
        )
        importance = self.active_sampler.importance_weights(timesteps)
        if importance is not None:
            weights = importance if weights is None else weights * importance
        losses = per_sample_loss if weights is None else per_sample_loss * weights.to(per_sample_loss.dtype)
        if self.learned is not None:
            losses = self.learned.loss(losses, compute_snr(self.noise_scheduler, timesteps).log())
        return losses

    def compute_loss(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Weighted mean of the per-sample losses (shape ``(B,)``) → the scalar to back-propagate."""
        return self.weighted(per_sample_loss, timesteps).mean()

    def forward_context(self, accelerator, model):
        """Context for the forward pass inside ``accelerator.accumulate``. Regimes that form gradients
        themselves (several backward passes) return ``accelerator.no_sync(model)`` and sync on their own."""
        return contextlib.nullcontext()

    def backward(self, accelerator, per_sample_loss: torch.Tensor, timesteps: torch.Tensor, model=None) -> torch.Tensor:
        """Back-propagates this regime's loss through ``accelerator`` and returns it (detached)."""
        loss = self.compute_loss(per_sample_loss, timesteps)
        accelerator.backward(loss)
        if self.active_sampler.observes_losses:  # the same history on every rank keeps their draws identical
            self.active_sampler.observe(accelerator.gather(timesteps), accelerator.gather(per_sample_loss.detach()))
        return loss.detach()

    def on_step_end(self, accelerator, global_step: int) -> Dict[str, Any]:
        """Called once per optimizer step (after gradient sync); returns values to log. Subclasses merge
        theirs with this one (it steps the learned weighting)."""
        return self.learned.step(accelerator) if self.learned is not None else {}

    # ---- records -------------------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        """JSON-able summary for ``training_regime.json`` and the model card."""
        info: Dict[str, Any] = {"name": self.name, "timestep_sampler": type(self.sampler).__name__}
        info["weighting"] = self.weighting
        if self.weighting == "min_snr":
            info["snr_gamma"] = self.snr_gamma
        elif self.weighting == "p2":
            info.update(p2_gamma=self.p2_gamma, p2_k=self.p2_k)
        elif self.learned is not None:
            info.update(self.learned.describe())
        return info

    def state_dict(self) -> Dict[str, Any]:
        state = {"sampler": self.sampler.state_dict(), "noise_generator": self.noise_generator.get_state()}
        if self.learned is not None:
            state["learned_weighting"] = self.learned.training_state()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if ("learned_weighting" in state) != (self.learned is not None):
            raise UsageError(
                f"--resume_from_checkpoint: the checkpoint was written {'with' if 'learned_weighting' in state else 'without'} "
                f"--weighting learned, this run has --weighting {self.weighting}"
            )
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        if self.learned is not None:
            self.learned.load_training_state(state["learned_weighting"])


REGIMES: Dict[str, type] = {"uniform": TrainingRegime}
