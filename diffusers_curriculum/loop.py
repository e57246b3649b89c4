"""The one training loop every training script runs: resuming, epochs, gradient accumulation, the regime's
backward, the optimizer step, the EMA, logging, checkpoints and pre-emption. A script hands it its step, the
function from a batch to the per-sample losses and their noise levels, and keeps that step on screen as diffusers'
examples keep theirs::

    loop = TrainingLoop(accelerator, run, regime, logger, task="unconditional", done_file="model_index.json")
    if (done := loop.begin()) is not None:  # the re-run of a finished command: nothing to train
        return done
    model, optimizer, dataloader, lr_scheduler = loop.prepare(model, optimizer, dataloader, lr_scheduler, ema_model)

    def step(batch):
        clean = batch["pixel_values"]
        noise, t = regime.sample(clean)
        prediction = model(noise_process.add_noise(clean, noise, t), noise_process.model_timesteps(t)).sample
        return denoising_loss(prediction, noise_process, clean, noise, t), t

    summary = loop.train(step, finish=save_everything)
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .preemption import Preemption
from .training import (
    after_sync_step, already_done, begin_run, checkpoint_and_preempt, checkpoint_uploader, epoch_batches, optimizer_step,
    place_ema, resume, run_record,
)

Step = Callable[[Dict[str, Any]], Tuple[torch.Tensor, torch.Tensor]]


class TrainingLoop:
    """The loop of one run. Call :meth:`begin` (every check has passed: ``--output_dir`` is readied and a finished
    run is recognised), :meth:`prepare` (accelerate's wrappers, what is checkpointed), then :meth:`train`.

    Args:
        accelerator: the run's :class:`~accelerate.Accelerator` (:func:`~diffusers_curriculum.training.make_accelerator`).
        run: the run's settings; ``max_train_steps`` known.
        regime: the :class:`~diffusers_curriculum.regimes.Regime`.
        logger: the script's logger.
        task: the script's task (``unconditional``, ``text_to_image``, ...); a resume must match it.
        done_file: the file whose presence with a matching record means the run finished (``model_index.json``, or
            the LoRA weights).
    """

    def __init__(self, accelerator, run: RunConfig, regime, logger, task: str, done_file: str):
        self.accelerator, self.run, self.regime, self.logger, self.done_file = accelerator, run, regime, logger, done_file
        self.record = run_record(run, regime, task)
        self.resume_path = self.uploader = None
        self.model = self.optimizer = self.dataloader = self.lr_scheduler = self.ema_model = None

    def begin(self) -> Optional[Dict[str, object]]:
        """Readies ``--output_dir`` and finds the checkpoint to resume from. For the re-run of a finished command:
        ends the run and returns its summary (the script returns it); else ``None``, and with
        ``--push_checkpoints`` the background uploader starts."""
        self.resume_path = begin_run(self.accelerator, self.run, self.logger)  # only now is --output_dir touched
        done = already_done(self.accelerator, self.run, self.resume_path, self.done_file, self.regime)
        if done is None:
            self.uploader = checkpoint_uploader(self.accelerator, self.run)  # each checkpoint to the Hub, in the background
        return done

    def prepare(self, model, optimizer, dataloader, lr_scheduler, ema_model=None, checkpointed: Iterable[Any] = ()):
        """accelerate's ``prepare`` of the four, returned; the EMA placed and, with the regime and ``checkpointed``
        (objects with state, e.g. a task's generator), registered for checkpointing, in that order."""
        accelerator = self.accelerator
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
        if ema_model is not None:
            place_ema(ema_model, accelerator, self.run.offload_ema)
            accelerator.register_for_checkpointing(ema_model)
        accelerator.register_for_checkpointing(self.regime)
        for obj in checkpointed:
            accelerator.register_for_checkpointing(obj)
        self.regime.attach(optimizer=optimizer, ema_model=ema_model)
        self.model, self.optimizer, self.dataloader, self.lr_scheduler, self.ema_model = (
            model, optimizer, dataloader, lr_scheduler, ema_model)
        return model, optimizer, dataloader, lr_scheduler

    def train(self, step: Step, *, max_grad_norm: float, parameters: Optional[Sequence[torch.nn.Parameter]] = None,
              tracker: Tuple[str, Dict[str, Any]] = ("train", {}), describe: Sequence[str] = (),
              on_step_end: Optional[Callable[[int], None]] = None, on_epoch_end: Optional[Callable[[int, int], None]] = None,
              finish: Optional[Callable[[int], None]] = None) -> Dict[str, object]:
        """Trains to ``max_train_steps`` from the checkpoint :meth:`begin` found.

        ``step(batch)`` returns the batch's per-sample losses and noise levels; it runs inside
        ``accelerator.accumulate`` and the regime's forward context, then the regime back-propagates its loss and
        the optimizer steps (gradients of ``parameters``, default the model's, clipped to ``max_grad_norm``).
        After each optimizer step: the EMA, logs, ``on_step_end(global_step)`` (every rank), a checkpoint when due;
        after each epoch the run has not finished in: ``on_epoch_end(epoch, global_step)`` (every rank); at the end,
        on the main process, ``finish(global_step)``. ``tracker``: the trackers' project name and config;
        ``describe``: lines for the run's log header. Returns ``{global_step, losses, regime_state}``; the loop
        drops its references to the prepared objects (the caller drops its own, then calls
        :func:`~diffusers_curriculum.training.end_training`)."""
        accelerator, run, regime, model = self.accelerator, self.run, self.regime, self.model
        steps_per_epoch = -(-len(self.dataloader) // run.gradient_accumulation_steps)
        num_epochs = -(-run.max_train_steps // steps_per_epoch)
        global_step, first_epoch, resume_step = resume(accelerator, self.resume_path, steps_per_epoch,
                                                       run.gradient_accumulation_steps, self.record, regime)
        if self.resume_path is not None:  # load_state hands the EMA its weights on the CPU
            place_ema(self.ema_model, accelerator, run.offload_ema)
        if accelerator.is_main_process:
            accelerator.init_trackers(tracker[0], config=tracker[1])
        self.logger.info("***** Running training *****")
        for line in describe:
            self.logger.info(f"  {line}")
        self.logger.info(f"  Regime = {json.dumps(regime.describe())}")
        self.logger.info(f"  Total optimization steps = {run.max_train_steps}")

        losses = []
        progress_bar = tqdm(total=run.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                            desc="Steps")
        # SIGTERM: checkpoint after the current step, then exit; during the final save: finish it first.
        with Preemption() as preemption:
            for epoch in range(first_epoch, num_epochs):
                model.train()
                for batch in epoch_batches(accelerator, self.dataloader, epoch, first_epoch, resume_step):
                    if global_step >= run.max_train_steps:  # before the step: a resumed finished run trains no more
                        break
                    with accelerator.accumulate(model), regime.forward_context(accelerator, model):
                        per_sample_loss, levels = step(batch)
                        loss = regime.backward(accelerator, per_sample_loss, levels, model)
                        optimizer_step(accelerator, model.parameters() if parameters is None else parameters,
                                       self.optimizer, self.lr_scheduler, max_grad_norm)
                    if accelerator.sync_gradients:
                        global_step += 1
                        progress_bar.update(1)
                        losses.append(loss.item())
                        logs = after_sync_step(accelerator, regime, model, self.ema_model, losses[-1], self.lr_scheduler,
                                               global_step, run.offload_ema)
                        progress_bar.set_postfix(**logs)
                        accelerator.log(logs, step=global_step)
                        if on_step_end is not None:
                            on_step_end(global_step)
                        checkpoint_and_preempt(accelerator, run, global_step, preemption, self.logger, self.record, self.uploader)
                    if global_step >= run.max_train_steps:
                        break
                if global_step >= run.max_train_steps:
                    break
                if on_epoch_end is not None:
                    on_epoch_end(epoch, global_step)
            progress_bar.close()

            accelerator.wait_for_everyone()
            if accelerator.is_main_process and finish is not None:
                finish(global_step)
            if preemption.signalled:
                self.logger.warning("SIGTERM arrived during the final save; the save was finished first")
        self.model = self.optimizer = self.dataloader = self.lr_scheduler = None  # the DDP wrapper goes before its group
        return {"global_step": global_step, "losses": losses, "regime_state": regime.state_dict()}

    def close_uploads(self) -> None:
        """Waits (at most ``--push_checkpoints_timeout``) for the checkpoint uploads still pending: before the final
        push, so that one writer at a time commits to the repo."""
        if self.uploader is not None:
            self.uploader.close(self.run.push_checkpoints_timeout)
