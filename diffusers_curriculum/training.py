"""Accelerate plumbing the training scripts share: the accelerator, resuming, per-step checkpoints and
pre-emption, the weights that ship. The scripts keep their own data, model and loss code."""

from __future__ import annotations

import copy
import gc
import os
import sys
from typing import Dict, Optional, Tuple

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

from .checkpointing import load_checkpoint, save_checkpoint
from .distributed import force_cpu_backend
from .preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from .regimes import needs_unused_parameters


def make_accelerator(args) -> Accelerator:
    """The Accelerator of a run: accumulation, precision, trackers, seedable data order, CPU DDP when asked,
    ``find_unused_parameters`` for regimes that leave parameters without gradient (TDC)."""
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=force_cpu_backend(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=needs_unused_parameters(args))],
    )


def resume(accelerator, resume_path, steps_per_epoch: int, gradient_accumulation_steps: int) -> Tuple[int, int, int]:
    """Loads ``resume_path`` (when given); returns ``(global_step, first_epoch, batches to skip in it)``."""
    if resume_path is None:
        return 0, 0, 0
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    global_step = load_checkpoint(accelerator, resume_path)
    return global_step, global_step // steps_per_epoch, (global_step % steps_per_epoch) * gradient_accumulation_steps


def epoch_batches(accelerator, dataloader, epoch: int, first_epoch: int, resume_step: int):
    """The epoch's batches; the first epoch of a resumed run skips what the checkpoint already saw."""
    dataloader.set_epoch(epoch)
    if epoch == first_epoch and resume_step > 0:
        return accelerator.skip_first_batches(dataloader, resume_step)
    return dataloader


def optimizer_step(accelerator, parameters, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """The optimizer half of a diffusers training step: clip the gradients on sync steps, step, schedule, clear."""
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


def after_sync_step(accelerator, regime, model, ema_model, loss: float, lr_scheduler, global_step: int) -> Dict[str, float]:
    """After an optimizer step that synced gradients: the EMA update, then the step's logs (loss, learning
    rate, the regime's own values, e.g. its stage, and the EMA decay). The regime's step hook runs after the
    EMA update (TDC copies EMA weights when it branches)."""
    if ema_model is not None:
        ema_model.step(model.parameters())
    logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}
    logs.update(regime.on_step_end(accelerator, global_step))
    if ema_model is not None:
        logs["ema_decay"] = ema_model.cur_decay_value
    return logs


def checkpoint_and_preempt(accelerator, args, global_step: int, preemption, logger) -> None:
    """Every ``--checkpointing_steps``: a checkpoint. On SIGTERM: a checkpoint now, then exit 143."""
    if global_step % args.checkpointing_steps == 0:
        path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        logger.info(f"Saved state to {path}")
    if preemption.requested(accelerator):
        if global_step % args.checkpointing_steps != 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        logger.warning(f"SIGTERM: saved checkpoint-{global_step}; resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        sys.exit(PREEMPTED_EXIT_CODE)


def end_training(accelerator) -> None:
    """The last call of a run, on every rank: all ranks wait for each other (one still saving must not see the
    group go), accelerate drops its references to the prepared objects (the caller drops its own first), and only
    then is the process group destroyed. Destroying the group under a live ``DistributedDataParallel`` left
    rank 0 hanging in the wrapper's destructor after ``main()`` returned, now and then (2-process gloo)."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def shipped_model(accelerator, model, ema_model: Optional[object] = None):
    """The weights to ship: the EMA weights (in a copy) with ``--use_ema``, else the trained model."""
    model = accelerator.unwrap_model(model)
    if ema_model is None:
        return model
    shipped = copy.deepcopy(model)
    ema_model.copy_to(shipped.parameters())
    return shipped


def run_config(args) -> dict:
    """Flags for the trackers: plain values, nothing secret."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and "token" not in k}
