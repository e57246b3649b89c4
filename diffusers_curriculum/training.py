"""Accelerate plumbing the training scripts share: the accelerator, resuming, per-step checkpoints and
pre-emption, the weights that ship. The scripts keep their own data, model and loss code."""

from __future__ import annotations

import copy
import gc
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

from .checkpointing import (
    check_resume, checkpoint_step, clean_leftovers, finished_at, load_checkpoint, resolve_resume_path, save_checkpoint,
    start_over,
)
from .errors import UsageError
from .distributed import force_cpu_backend
from .preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from .regimes import needs_unused_parameters


def make_accelerator(args) -> Accelerator:
    """The Accelerator of a run: accumulation, precision, trackers, seedable data order, CPU DDP when asked,
    ``find_unused_parameters`` for regimes that leave parameters without gradient (TDC)."""
    if getattr(args, "mixed_precision", None) == "fp16" and not gpu_available():  # before accelerate's state is set
        raise UsageError("--mixed_precision fp16 needs a GPU (this run is on the CPU); use --mixed_precision bf16 or no")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=force_cpu_backend(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=needs_unused_parameters(args))],
    )
    return accelerator


def gpu_available() -> bool:
    """Whether this run gets an accelerator device fp16 autocast works on (CUDA/ROCm, XPU, MPS)."""
    if force_cpu_backend():
        return False
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def run_record(args, regime, task: str) -> Dict[str, object]:
    """What a checkpoint is written with and a resume must match (``run.json``): the script's task, the
    adapter, the regime's axes."""
    return {"task": task, "adapter": "lora" if getattr(args, "use_lora", False) else None, "regime": regime.axes()}


def begin_run(accelerator, args, logger) -> Optional[Path]:
    """Readies ``--output_dir`` once every check has passed, and returns the checkpoint to resume from.

    On the main process: what an interrupted save left behind is cleaned up; a fresh start with
    ``--overwrite_output_dir`` removes the earlier run's checkpoints and finished-run markers (they would be
    rotated in as the newest or resumed by ``latest``). Every rank then resolves ``--resume_from_checkpoint``."""
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for name in clean_leftovers(args.output_dir):
            logger.info(f"Removed {name}, left by an interrupted save")
        if args.resume_from_checkpoint is None and args.overwrite_output_dir:
            removed = start_over(args.output_dir)
            if removed:
                logger.warning(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}")
    accelerator.wait_for_everyone()
    path = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if path is None and args.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")
    return path


def is_finished(resume_path: Optional[Path], max_train_steps: int, output_dir: str, done_file: str) -> bool:
    """True when the run to resume already trained ``max_train_steps`` and saved its result: re-running the
    finished command is then a no-op. A checkpoint past ``max_train_steps`` is an error (lower
    ``--max_train_steps`` than the run had)."""
    if resume_path is None:
        return False
    step = checkpoint_step(resume_path)
    if step > max_train_steps:
        raise UsageError(f"--resume_from_checkpoint {resume_path} is at step {step}, past --max_train_steps {max_train_steps}")
    return step == max_train_steps and finished_at(output_dir, done_file) == max_train_steps


def resume(accelerator, resume_path, steps_per_epoch: int, gradient_accumulation_steps: int,
           record: Optional[Dict[str, object]] = None, regime=None) -> Tuple[int, int, int]:
    """Loads ``resume_path`` (when given) after checking that its run record matches ``record`` / ``regime``;
    returns ``(global_step, first_epoch, batches to skip in it)``."""
    if resume_path is None:
        return 0, 0, 0
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    if record is not None:
        check_resume(resume_path, record, regime)
    global_step = load_checkpoint(accelerator, resume_path)
    return global_step, global_step // steps_per_epoch, (global_step % steps_per_epoch) * gradient_accumulation_steps


def epoch_batches(accelerator, dataloader, epoch: int, first_epoch: int, resume_step: int):
    """The epoch's batches; the first epoch of a resumed run skips what the checkpoint already saw. The data
    set learns the epoch too: its per-item randomness (flips, crops) is drawn from (seed, epoch, index)."""
    dataloader.set_epoch(epoch)
    if hasattr(dataloader.dataset, "set_epoch"):
        dataloader.dataset.set_epoch(epoch)
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


def checkpoint_and_preempt(accelerator, args, global_step: int, preemption, logger, record=None) -> None:
    """Every ``--checkpointing_steps`` and at the last step (so the steps after the last periodic checkpoint
    are never lost to a crash while the result is saved): a checkpoint. On SIGTERM: a checkpoint now, then
    exit 143."""
    due = global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps
    if due:
        path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, record)
        logger.info(f"Saved state to {path}")
    if preemption.requested(accelerator) and global_step < args.max_train_steps:
        if not due:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, record)
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
