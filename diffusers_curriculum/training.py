"""Accelerate plumbing the training scripts share: the accelerator, resuming, per-step checkpoints and
pre-emption, the weights that ship. The scripts keep their own data, model and loss code."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration
from diffusers.training_utils import EMAModel
from packaging.version import Version

from .checkpointing import (
    check_resume, checkpoint_step, clean_leftovers, finished_at, list_checkpoints, load_checkpoint, resolve_resume_path,
    save_checkpoint, start_over,
)
from .config import OptimizerSettings, RunConfig
from .distributed import force_cpu_backend
from .errors import UsageError, describe_exception
from .hub import STAGING_DIR, publish_or_exit
from .hub_checkpoints import CheckpointUploader, download_checkpoint, is_hub_repo_id
from .preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from .regimes import RegimeSpec


# Devices whose fused AdamW kernel torch ships (CPU since torch 2.4).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def make_optimizer(settings: OptimizerSettings, parameters, learning_rate: Optional[float] = None,
                   device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """AdamW with the settings' learning rate (or ``learning_rate``, e.g. scaled by the batch), betas, weight decay
    and epsilon; bitsandbytes' ``AdamW8bit`` with ``use_8bit_adam``.

    On a CPU or CUDA ``device`` (torch >= 2.4) AdamW runs fused: one kernel over all parameters instead of a loop
    over them (on this CPU 5x faster for a tiny UNet; TDC's k experts make it k times the work)."""
    hyper = dict(lr=settings.learning_rate if learning_rate is None else learning_rate,
                 betas=(settings.adam_beta1, settings.adam_beta2), weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)
    if settings.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **hyper)
    fused = device is not None and torch.device(device).type in FUSED_ADAM_DEVICES and Version(torch.__version__).release[:2] >= (2, 4)
    return torch.optim.AdamW(parameters, fused=fused or None, **hyper)


def configure_logging(accelerator, logger) -> None:
    """Logging as diffusers' example scripts set it up: INFO records with time and source on stderr, the
    accelerate state from every rank; diffusers at INFO and datasets / transformers at WARNING on the local main
    process, errors only on the others."""
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def make_accelerator(run: RunConfig, spec: RegimeSpec) -> Accelerator:
    """The Accelerator of a run: accumulation, precision (``--mixed_precision``, else the accelerate config's:
    ``accelerator.mixed_precision`` is the one in effect), trackers, seedable data order, CPU DDP when asked,
    ``find_unused_parameters`` for regimes that leave parameters without gradient (TDC). What cannot run with
    the precision or the launch (fp16 on the CPU, self-formed gradients under fp16 or sharding) is refused here."""
    if run.mixed_precision == "fp16" and not gpu_available():  # before accelerate's state is set
        raise UsageError("--mixed_precision fp16 needs a GPU (this run is on the CPU); use --mixed_precision bf16 or no")
    if run.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    accelerator = Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=None if run.report_to in (None, "none") else run.report_to.split(","),
        project_config=ProjectConfiguration(project_dir=run.output_dir, logging_dir=os.path.join(run.output_dir, run.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=force_cpu_backend(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=spec.needs_unused_parameters)],
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 (from the accelerate config) needs a GPU; this run is on the CPU")
    spec.check_launch(accelerator.mixed_precision, accelerator.distributed_type)
    return accelerator


def gpu_available() -> bool:
    """Whether this run gets an accelerator device fp16 autocast works on (CUDA/ROCm, XPU, MPS)."""
    if force_cpu_backend():
        return False
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def run_record(run: RunConfig, regime, task: str) -> Dict[str, object]:
    """What a checkpoint is written with and a resume must match (``run.json``): the script's task, the
    adapter, the regime's axes."""
    return {"task": task, "adapter": "lora" if run.use_lora else None, "regime": regime.axes()}


def begin_run(accelerator, run: RunConfig, logger) -> Optional[Path]:
    """Readies ``--output_dir`` once every check has passed, and returns the checkpoint to resume from.

    On the main process: what an interrupted save left behind is cleaned up; a fresh start with
    ``--overwrite_output_dir`` removes the earlier run's checkpoints and finished-run markers (they would be
    rotated in as the newest or resumed by ``latest``). Every rank then resolves ``--resume_from_checkpoint``."""
    if accelerator.is_main_process:
        os.makedirs(run.output_dir, exist_ok=True)
        for name in clean_leftovers(run.output_dir):
            logger.info(f"Removed {name}, left by an interrupted save")
        if run.resume_from_checkpoint is None and run.overwrite_output_dir:
            removed = start_over(run.output_dir)
            if removed:
                logger.warning(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)}")
    resume_from = run.resume_from_checkpoint
    hub_repo = hub_resume_repo(run)
    if hub_repo is not None:  # the main process fetches the Hub's newest complete checkpoint; every rank takes it
        if accelerator.is_main_process:
            found = download_checkpoint(hub_repo, run.output_dir, run.hub_token)
            accelerator.print(f"Resuming from {hub_repo}: {found.name}" if found else f"No checkpoint in {hub_repo} on the Hub.")
        resume_from = "latest"
    accelerator.wait_for_everyone()
    path = resolve_resume_path(run.output_dir, resume_from)
    if path is None and resume_from == "latest":
        accelerator.print(f"No checkpoint in {run.output_dir}; starting a new run.")
    return path


def hub_resume_repo(run: RunConfig) -> Optional[str]:
    """The Hub repo a resume downloads from: ``--resume_from_checkpoint owner/name``, or with ``--push_checkpoints``,
    ``latest`` when ``--output_dir`` holds no checkpoint (the machine that wrote them is gone) looks in the repo
    the checkpoints were pushed to."""
    if is_hub_repo_id(run.resume_from_checkpoint):
        return run.resume_from_checkpoint
    if run.resume_from_checkpoint == "latest" and run.push_checkpoints and not list_checkpoints(run.output_dir):
        return checkpoint_repo_id(run)
    return None


def checkpoint_repo_id(run: RunConfig) -> str:
    """The repo checkpoints go to: ``--hub_model_id``, else ``<user>/<output_dir name>`` (the token's user)."""
    from huggingface_hub import HfApi

    repo_id = run.hub_model_id or Path(run.output_dir).resolve().name
    if "/" not in repo_id:
        try:
            repo_id = f"{HfApi().whoami(token=run.hub_token)['name']}/{repo_id}"
        except Exception as e:
            raise UsageError(f"--push_checkpoints: cannot ask the Hub who the token belongs to ({describe_exception(e)}); "
                             f"give --hub_model_id owner/name") from None
    return repo_id


def checkpoint_uploader(accelerator, run: RunConfig) -> Optional[CheckpointUploader]:
    """With ``--push_checkpoints``, on the main process: the background uploader of every checkpoint the run writes."""
    if not run.push_checkpoints or not accelerator.is_main_process:
        return None
    return CheckpointUploader(checkpoint_repo_id(run), run.hub_token, os.path.join(run.output_dir, STAGING_DIR),
                              run.checkpoints_total_limit, private=run.hub_private_repo)


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


def already_done(accelerator, run: RunConfig, resume_path: Optional[Path], done_file: str, regime) -> Optional[Dict[str, object]]:
    """For the re-run of a finished command (:func:`is_finished`): says so, retries the push with
    ``--push_to_hub`` (an earlier one may have failed), ends the run and returns the script's summary; else ``None``."""
    if not is_finished(resume_path, run.max_train_steps, run.output_dir, done_file):
        return None
    accelerator.print(f"{run.output_dir} already holds this run, trained to step {run.max_train_steps}; nothing to do.")
    if accelerator.is_main_process and run.push_to_hub:
        publish_run(run, write_card=None)  # the folder's own card goes as it is
    end_training(accelerator)
    return {"global_step": run.max_train_steps, "losses": [], "regime_state": regime.state_dict(), "finished_before": True}


def publish_run(run: RunConfig, write_card) -> str:
    """The run's last step: its card written and, with ``--push_to_hub``, the folder pushed
    (:func:`~diffusers_curriculum.hub.publish_or_exit`)."""
    return publish_or_exit(write_card, run.output_dir, run.push_to_hub, run.hub_model_id, run.hub_token, run.hub_private_repo)


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


def make_ema(model, use_ema: bool, foreach: bool = False, warmup: Optional[Dict[str, float]] = None) -> Optional[EMAModel]:
    """diffusers' ``EMAModel`` of ``model`` when ``use_ema`` (``foreach``: torch's foreach kernels), else ``None``.
    ``warmup``: diffusers' warm-up schedule (``decay``, ``inv_gamma``, ``power``), which the pixel-space scripts
    expose as ``--ema_max_decay --ema_inv_gamma --ema_power``; without it, ``EMAModel``'s defaults."""
    if not use_ema:
        return None
    kwargs = {} if warmup is None else dict(decay=warmup["decay"], use_ema_warmup=True, inv_gamma=warmup["inv_gamma"],
                                            power=warmup["power"])
    return EMAModel(model.parameters(), model_cls=type(model), model_config=model.config, foreach=foreach, **kwargs)


def place_ema(ema_model, accelerator, offload_ema: bool = False) -> None:
    """Moves the EMA weights where they live between updates: the training device, or pinned CPU memory
    with ``offload_ema``."""
    if ema_model is None:
        return
    if offload_ema:
        ema_model.to("cpu")
        if torch.cuda.is_available():
            ema_model.pin_memory()
    else:
        ema_model.to(accelerator.device)


def after_sync_step(accelerator, regime, model, ema_model, loss: float, lr_scheduler, global_step: int,
                    offload_ema: bool = False) -> Dict[str, float]:
    """After an optimizer step that synced gradients: the EMA update, then the step's logs (loss, learning
    rate, the regime's own values, e.g. its stage, and the EMA decay). The regime's step hook runs after the
    EMA update (TDC copies EMA weights when it branches)."""
    if ema_model is not None:
        if offload_ema:
            ema_model.to(accelerator.device, non_blocking=True)
        ema_model.step(model.parameters())
        if offload_ema:
            ema_model.to("cpu", non_blocking=True)
    logs = {"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}
    logs.update(regime.on_step_end(accelerator, global_step))
    if ema_model is not None:
        logs["ema_decay"] = ema_model.cur_decay_value
    return logs


def checkpoint_and_preempt(accelerator, run: RunConfig, global_step: int, preemption, logger, record=None, uploader=None) -> None:
    """Every ``--checkpointing_steps`` and at the last step (so the steps after the last periodic checkpoint
    are never lost to a crash while the result is saved): a checkpoint, handed to ``uploader`` (the Hub push of
    ``--push_checkpoints``) when there is one. On SIGTERM: a checkpoint now, its upload waited for, then exit 143."""
    stop = preemption.requested(accelerator) and global_step < run.max_train_steps  # at the last step: finish instead
    if stop or global_step % run.checkpointing_steps == 0 or global_step == run.max_train_steps:
        path = save_checkpoint(accelerator, run.output_dir, global_step, run.checkpoints_total_limit, record)
        logger.info(f"Saved state to {path}")
        if uploader is not None:
            uploader.submit(path)
    if stop:
        if uploader is not None:
            uploader.close(run.push_checkpoints_timeout)
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


@contextlib.contextmanager
def shipped_weights(accelerator, model, ema_model: Optional[EMAModel] = None, final: bool = False):
    """The model with the weights to ship: the EMA weights with ``--use_ema``, else the trained ones. Mid-run
    (validation) the training weights are stored aside and restored on exit, as diffusers' scripts do (no
    second copy of the model); ``final=True`` (training is over) just copies the EMA weights in."""
    model = accelerator.unwrap_model(model)
    if ema_model is None:
        yield model
        return
    if not final:
        ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield model
    finally:
        if not final:
            ema_model.restore(model.parameters())


def log_images(accelerator, tag: str, images, step: int) -> None:
    """Sends PIL images to every tracker of the run that takes images (TensorBoard, Weights & Biases)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)


def tracker_config(flags: Mapping[str, Any]) -> dict:
    """A script's flags (``vars`` of its namespace) for the trackers: plain values, nothing secret."""
    return {k: v for k, v in flags.items() if isinstance(v, (int, float, str, bool)) and "token" not in k}
