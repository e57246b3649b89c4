#!/usr/bin/env python
"""Unconditional image generation with a timestep-aware training regime.

Shaped like diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (same flag
names) plus ``--regime`` and its flags, ``--seed`` and ``--max_train_steps``. Every regime decision is a call
into ``diffusers_curriculum.regimes``. Default data: Fashion-MNIST, offline, resized to 32×32.

    accelerate launch train_scripts/train_unconditional.py --output_dir fmnist-ddpm --max_train_steps 1000
"""

import argparse
import functools
import math
import os
from dataclasses import replace

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image

from diffusers_curriculum.checkpointing import check_fresh_start, check_writable, save_pipeline
from diffusers_curriculum.config import OptimizerSettings, RunConfig, from_flags
from diffusers_curriculum.data import (
    BUILTIN_DATASETS, HUB_DATASET_IDS, INTERPOLATION_MODES, build_dataset, describe_data, num_channels,
)
from diffusers_curriculum.errors import ArgumentParser, UsageError, exits_on_usage_error
from diffusers_curriculum.hub import training_facts, write_model_card
from diffusers_curriculum.losses import denoising_loss
from diffusers_curriculum.models import unet_config_from_args
from diffusers_curriculum.noise import NOISE_PROCESSES, make_process
from diffusers_curriculum.regimes import add_regime_args, build_regime, regime_spec
from diffusers_curriculum.regimes.words import regime_in_words
from diffusers_curriculum.loop import TrainingLoop
from diffusers_curriculum.training import (
    configure_logging, end_training, log_images, make_accelerator, make_ema, make_optimizer, publish_run, shipped_weights,
    tracker_config,
)
from diffusers_curriculum.tasks import TASKS, Unconditional

logger = get_logger(__name__, log_level="INFO")

# Flags that describe the run in the model card; nothing secret, no local paths.
CARD_SETTINGS = (
    "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
    "lr_warmup_steps", "max_train_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    "use_ema", "ema_max_decay", "mixed_precision", "seed", "noise_process", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule",
)
FLOW_CARD_SETTINGS = ("noise_process", "flow_shift", "ddpm_num_steps")  # under flow: no beta schedule, no ε/v/x₀ choice
DDPM_ONLY_FLAGS = {"prediction_type": "epsilon", "ddpm_beta_schedule": "linear", "use_ddim": False}
CARD_TILE = 64  # sample grids show each image at least this many pixels wide


def build_parser(task_cls=Unconditional) -> ArgumentParser:
    """The script's flags: diffusers' ``train_unconditional.py`` names and defaults, plus the regime's."""
    article = "n" if task_cls.name[0] in "aeiou" else ""
    parser = ArgumentParser(description=f"Train a{article} {task_cls.name.replace('_', '-')} diffusion model with a training regime.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default="fashion_mnist",
                      help=f"A datasets Hub id, or one of the embedded offline sets {BUILTIN_DATASETS}.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub data set, if it has several.")
    data.add_argument("--train_data_dir", type=str, default=None, help="A folder of training images (overrides --dataset_name).")
    data.add_argument("--image_column", type=str, default="image", help="The image column of a Hub data set.")
    data.add_argument("--image_mode", type=str, default=None, choices=["L", "RGB"],
                      help="Colour mode for image folders / Hub sets (default RGB; the embedded sets are grey).")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N images only (debugging, quick runs).")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets caches downloaded data.")
    data.add_argument("--resolution", type=int, default=32, help="Training images are resized and cropped to this size.")
    data.add_argument("--center_crop", default=False, action=argparse.BooleanOptionalAction,
                      help="Crop the centre (else a random crop, drawn per image and epoch).")
    data.add_argument("--random_flip", default=False, action="store_true", help="Flip images horizontally at random (per image and epoch).")
    data.add_argument("--image_interpolation_mode", type=str, default="bilinear", choices=INTERPOLATION_MODES,
                      help="The filter images are resized with.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes (0: in the main process).")
    model = parser.add_argument_group("model and diffusion process")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="UNet2DModel config (folder or JSON); default: a tiny CPU-sized UNet.")
    model.add_argument("--block_out_channels", type=str, default="32,64,64", help="Channels of the default UNet's blocks.")
    model.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per block of the default UNet.")
    model.add_argument("--noise_process", type=str, default="ddpm", choices=NOISE_PROCESSES,
                       help="ddpm: discrete DDPM time (DDPMScheduler); flow: rectified flow over a continuous noise level, "
                            "velocity target, shipped with FlowMatchEulerDiscreteScheduler (as SD3, Flux).")
    model.add_argument("--flow_shift", type=float, default=1.0,
                       help="--noise_process flow: the scheduler's shift s, sigma -> s·sigma / (1 + (s - 1)·sigma) (SD3 uses 3).")
    model.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "sample", "v_prediction"],
                       help="What the UNet predicts (ddpm; a flow model predicts the velocity).")
    model.add_argument("--ddpm_num_steps", type=int, default=1000,
                       help="T, the number of diffusion timesteps (flow: the grid of noise levels the clusters are cut on).")
    model.add_argument("--ddpm_num_inference_steps", type=int, default=1000, help="Sampling steps of validation grids and the saved pipeline's default.")
    model.add_argument("--ddpm_beta_schedule", type=str, default="linear", help="The noise schedule (a DDPMScheduler beta_schedule).")
    model.add_argument("--use_ddim", action="store_true", help="Sample (validation and the saved pipeline) with a DDIM scheduler.")
    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="ddpm-model", help="Where the pipeline, checkpoints, samples and logs go.")
    training.add_argument("--overwrite_output_dir", action="store_true",
                          help="Start over in an --output_dir that holds another run (its checkpoints and pipeline index are removed).")
    training.add_argument("--seed", type=int, default=None, help="Seed of the run: weights, data order, noise, timesteps, flips.")
    training.add_argument("--train_batch_size", type=int, default=16, help="Images per batch per process.")
    training.add_argument("--num_epochs", type=int, default=100, help="Passes over the data (unless --max_train_steps).")
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps to train; overrides --num_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated into one optimizer step.")
    training.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    training.add_argument("--lr_scheduler", type=str, default="cosine",
                          help="diffusers' get_scheduler name: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.")
    training.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning-rate schedule.")
    training.add_argument("--adam_beta1", type=float, default=0.95, help="AdamW beta1.")
    training.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    training.add_argument("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay.")
    training.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    training.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA only; pip install 'diffusers-curriculum[8bit]').")
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    training.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (diffusers' EMAModel) and ship it.")
    training.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up: inverse multiplicative factor.")
    training.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up: exponential factor.")
    training.add_argument("--ema_max_decay", type=float, default=0.9999, help="The EMA decay it warms up to.")
    training.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in (pinned) CPU memory between updates.")
    training.add_argument("--foreach_ema", action="store_true", help="Update the EMA with torch's foreach kernels (faster, more memory).")
    training.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                          help="Precision of the forward passes; default: the accelerate config's (`accelerate config`), else no.")
    training.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs (faster fp32 training).")
    training.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                          help="xformers attention (pip install 'diffusers-curriculum[xformers]').")
    output = parser.add_argument_group("validation, checkpoints, logging")
    output.add_argument("--eval_batch_size", type=int, default=16, help="Images in a validation grid.")
    output.add_argument("--validation_steps", type=int, default=None, help="Save a sample grid every N steps (and always at the end).")
    output.add_argument("--save_images_epochs", type=int, default=10, help="Save a sample grid every N epochs.")
    output.add_argument("--save_model_epochs", type=int, default=10, help="Save the pipeline to --output_dir every N epochs (and at the end).")
    output.add_argument("--no_validation", action="store_true", help="Skip the final sample grid.")
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Write a resumable checkpoint every N optimizer steps (and at the last).")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    output.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='"latest" (the newest complete checkpoint in --output_dir; none yet: a fresh start) or a checkpoint folder.')
    output.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside --output_dir.")
    output.add_argument("--report_to", "--logger", dest="report_to", type=str, default="tensorboard",
                        help="Trackers: tensorboard, wandb, comet_ml, mlflow, ... (comma-separated), all, or none. --logger is diffusers' name.")
    output.add_argument("--local_rank", type=int, default=-1,
                        help="Set by torch.distributed.launch; the LOCAL_RANK environment variable wins (accelerate launch sets it).")
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline and its model card after the local save.")
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    hub.add_argument("--hub_model_id", type=str, default=None, help="The repo to push to (default: <user>/<output_dir name>).")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repo private.")
    hub.add_argument("--push_checkpoints", action="store_true",
                     help="Upload each checkpoint to the repo (checkpoints/checkpoint-<step>/) in the background as it is "
                          "written, with --checkpoints_total_limit mirrored there; --resume_from_checkpoint latest then "
                          "finds them on the Hub when --output_dir has none.")
    hub.add_argument("--push_checkpoints_timeout", type=float, default=600.0,
                     help="Seconds the end of a run (or a SIGTERM) waits for checkpoint uploads still pending.")
    add_regime_args(parser)
    task_cls.add_args(parser)
    return parser


def parse_args(argv=None, task_cls=Unconditional):
    """The flags, checked; the parser's products ride along: ``args.regime_spec`` (the regime), ``args.run_config``
    (output, checkpoints, Hub) and ``args.optimizer_settings``, each made once here."""
    parser = build_parser(task_cls)
    args = parser.parse_args(argv)
    args.task = task_cls.name
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    validate_args(args)
    return args


def validate_args(args):
    """Every check that can fail before work starts; each error names its flag."""
    for flag in ("train_batch_size", "gradient_accumulation_steps", "resolution", "ddpm_num_steps", "ddpm_num_inference_steps",
                 "eval_batch_size", "checkpointing_steps", "num_epochs", "layers_per_block", "save_images_epochs", "save_model_epochs"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_train_steps", "validation_steps", "checkpoints_total_limit", "max_train_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    try:
        args.block_out_channels = [int(c) for c in str(args.block_out_channels).split(",")]
    except ValueError:
        raise UsageError(f"--block_out_channels {args.block_out_channels!r}: expected comma-separated integers") from None
    if not args.block_out_channels or min(args.block_out_channels) < 1:
        raise UsageError(f"--block_out_channels {args.block_out_channels}: channels must be positive")
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise UsageError("--enable_xformers_memory_efficient_attention: xformers is not installed (pip install 'diffusers-curriculum[xformers]')")
    args.run_config = from_flags(RunConfig, vars(args))  # trackers installed, Hub token resolved
    args.optimizer_settings = from_flags(OptimizerSettings, vars(args))
    if args.train_data_dir is None and args.dataset_name is None:
        raise UsageError("give --dataset_name or --train_data_dir")
    if args.noise_process == "flow":
        for name, default in DDPM_ONLY_FLAGS.items():
            if getattr(args, name) != default:
                raise UsageError(f"--{name} applies to --noise_process ddpm; a flow model predicts the velocity and samples "
                                 "with FlowMatchEulerDiscreteScheduler")
        if not args.flow_shift > 0:
            raise UsageError(f"--flow_shift must be > 0, got {args.flow_shift}")
    elif args.flow_shift != 1.0:
        raise UsageError("--flow_shift applies to --noise_process flow")
    args.regime_spec = regime_spec(args, num_train_timesteps=args.ddpm_num_steps, noise_process=args.noise_process)
    from_flags(TASKS[args.task], vars(args))  # the task's flags, checked
    # Never train on top of another run by accident; --resume_from_checkpoint continues one.
    check_fresh_start(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint, "model_index.json")
    check_writable(args.output_dir)


def build_pipeline(args, task, unet, noise_process):
    """The pipeline to ship: stock DDPM/DDIM schedulers, or the flow's FlowMatchEulerDiscreteScheduler."""
    sampler = ("ddim" if args.use_ddim else "ddpm") if noise_process.name == "ddpm" else None
    return task.build_pipeline(unet, noise_process.pipeline_scheduler(sampler))


def saved_record(args, regime, global_step):
    """``training_regime.json``: the regime, the steps trained and the optimizer settings (pruning fine-tunes with them)."""
    return {**regime.describe(), "trained_steps": global_step, "optimizer": args.optimizer_settings.record()}


def save_sample_grid(args, task, pipeline, path, seed):
    """Generates ``--eval_batch_size`` images and saves them as one PNG grid at ``path``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = task.generate(pipeline, args.eval_batch_size, args.ddpm_num_inference_steps, generator)
    scale = math.ceil(CARD_TILE / images[0].width)  # small images are enlarged (nearest) to be seen
    if scale > 1:
        images = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in images]
    rows = int(math.sqrt(len(images)))
    while len(images) % rows:
        rows -= 1
    grid = make_image_grid(images, rows=rows, cols=len(images) // rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    return grid


def main(args, evaluate=None):
    """Trains; ``evaluate(global_step, pipeline)``, when given, is called on the main process every
    ``--validation_steps`` and at the end with the pipeline that would be shipped (EMA weights with --use_ema)."""
    accelerator = make_accelerator(args.run_config, args.regime_spec)
    configure_logging(accelerator, logger)
    if args.seed is not None:
        set_seed(args.seed)
    task = from_flags(TASKS[args.task], vars(args), process_index=accelerator.process_index, num_processes=accelerator.num_processes)

    # Data and model: everything that can be wrong with them fails here, before any training.
    dataset = build_dataset(
        args.dataset_name, args.train_data_dir, args.resolution, args.image_column,
        image_mode=args.image_mode, center_crop=args.center_crop, random_flip=args.random_flip,
        dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples, label_column=getattr(args, "label_column", None), seed=args.seed or 0,
        interpolation=args.image_interpolation_mode,
    )
    task.check_dataset(dataset)
    unet_config = task.unet_config(unet_config_from_args(
        args.model_config_name_or_path, args.resolution, num_channels(dataset), args.block_out_channels, args.layers_per_block
    ))
    noise_process = make_process(args.noise_process, args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type,
                                 args.flow_shift)  # owns time: noising, target, the network's timestep, the shipped scheduler
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers, drop_last=True
    )
    if len(train_dataloader) == 0:
        raise UsageError(f"--train_batch_size {args.train_batch_size} is larger than the data set ({len(dataset)} images)")
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    run = replace(args.run_config, max_train_steps=args.max_train_steps or args.num_epochs * num_update_steps_per_epoch,
                  mixed_precision=accelerator.mixed_precision)  # the run's length and precision, now known
    regime = build_regime(args.regime_spec, noise_process, accelerator, run.max_train_steps)  # the length sizes a curriculum

    model = UNet2DModel.from_config(unet_config)
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    model = regime.wrap_model(model)  # e.g. TDC trains a timestep-routed copy per group
    ema_model = make_ema(model, args.use_ema, args.foreach_ema,
                         warmup={"decay": args.ema_max_decay, "inv_gamma": args.ema_inv_gamma, "power": args.ema_power})
    optimizer = make_optimizer(args.optimizer_settings, model.parameters(), device=accelerator.device)
    loop = TrainingLoop(accelerator, run, regime, logger, task.name, done_file="model_index.json")
    done = loop.begin()  # every check passed: only now is --output_dir touched
    if done is not None:  # the re-run of a finished command: nothing to train
        return done
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=run.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = loop.prepare(
        model, optimizer, train_dataloader, lr_scheduler, ema_model,
        checkpointed=[task] if hasattr(task, "state_dict") else [],  # e.g. the class-dropout generator
    )

    def step(batch):
        """A batch's per-sample denoising losses and their noise levels."""
        clean_images = batch["pixel_values"].to(accelerator.device)
        noise, timesteps = regime.sample(clean_images)  # noise levels: DDPM's integer t or the flow's real t
        noisy_images = noise_process.add_noise(clean_images, noise, timesteps)
        model_output = model(noisy_images, noise_process.model_timesteps(timesteps),
                             **task.model_kwargs(batch, accelerator.device)).sample
        return denoising_loss(model_output, noise_process, clean_images, noise, timesteps), timesteps

    def on_step_end(global_step):
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            validate(args, task, accelerator, model, ema_model, noise_process, global_step, f"step_{global_step}", evaluate)

    def on_epoch_end(epoch, global_step):  # diffusers' per-epoch grid and pipeline (the last epoch's: finish)
        if not accelerator.is_main_process:
            return
        if (epoch + 1) % args.save_images_epochs == 0:
            validate(args, task, accelerator, model, ema_model, noise_process, global_step, f"epoch_{epoch}")
        if (epoch + 1) % args.save_model_epochs == 0:
            with shipped_weights(accelerator, model, ema_model) as shipped:
                save_pipeline(build_pipeline(args, task, shipped, noise_process), args.output_dir,
                              training_regime=saved_record(args, regime, global_step))
            logger.info(f"Saved the pipeline of epoch {epoch} (step {global_step}) to {args.output_dir}")

    def on_finish(global_step):
        validated = bool(args.validation_steps) and global_step % args.validation_steps == 0  # this step's grid is out
        finish(args, loop, task, accelerator, model, ema_model, noise_process, regime, global_step, dataset, total_batch_size,
               evaluate, validated)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    summary = loop.train(step, max_grad_norm=args.max_grad_norm, tracker=(f"train_{task.name}", tracker_config(vars(args))),
                         describe=[f"Num examples = {len(dataset)}", f"Total train batch size (w. parallel & accumulation) = {total_batch_size}"],
                         on_step_end=on_step_end, on_epoch_end=on_epoch_end, finish=on_finish)
    model = optimizer = train_dataloader = lr_scheduler = None  # the DDP wrapper goes before its process group
    end_training(accelerator)
    return summary


def validate(args, task, accelerator, model, ema_model, noise_process, global_step, name, evaluate=None):
    """A sample grid of the weights that would ship (``samples/<name>.png``, and to the trackers); then
    ``evaluate(global_step, pipeline)`` when given. The training weights are back in place afterwards."""
    with shipped_weights(accelerator, model, ema_model) as shipped:
        pipeline = build_pipeline(args, task, shipped, noise_process)
        grid = save_sample_grid(args, task, pipeline, os.path.join(args.output_dir, "samples", f"{name}.png"), args.seed or 0)
        log_images(accelerator, "samples", [grid], global_step)
        if evaluate is not None:
            evaluate(global_step, pipeline)


def finish(args, loop, task, accelerator, model, ema_model, noise_process, regime, global_step, dataset, total_batch_size,
           evaluate=None, validated=False):
    """Saves the pipeline (the EMA weights with --use_ema), a sample grid and the model card; unless the last
    step was ``validated`` already, sends the grid to the trackers and calls ``evaluate``; then pushes when asked."""
    with shipped_weights(accelerator, model, ema_model, final=True) as shipped:  # training is over: no restore
        pipeline = build_pipeline(args, task, shipped, noise_process)
        save_pipeline(pipeline, args.output_dir, training_regime=saved_record(args, regime, global_step))
    validation_image = None
    if not args.no_validation:
        grid = save_sample_grid(args, task, pipeline, os.path.join(args.output_dir, "samples", "final.png"), args.seed or 0)
        if not validated:
            log_images(accelerator, "samples", [grid], global_step)
        validation_image = "samples/final.png"
    if evaluate is not None and not validated:
        evaluate(global_step, pipeline)
    settings = {**{key: getattr(args, key) for key in CARD_SETTINGS}, "max_train_steps": loop.run.max_train_steps,
                "mixed_precision": loop.run.mixed_precision}
    if args.noise_process == "flow":
        settings = {**{k: v for k, v in settings.items() if k not in ("prediction_type", "ddpm_beta_schedule")},
                    **{key: getattr(args, key) for key in FLOW_CARD_SETTINGS}}
    settings["trained_steps"] = global_step
    settings.update(task.card_settings())
    record = regime.describe()
    progress = regime_in_words(record, global_step)[-1] if record.get("stage_history") else None
    if progress:
        logger.info(progress)
    num_examples = len(dataset)
    facts = training_facts(num_examples, describe_data(args.dataset_name, args.train_data_dir, num_examples, args.max_train_samples),
                           global_step, total_batch_size, sum(p.numel() for p in pipeline.unet.parameters()))
    write_card = functools.partial(
        write_model_card, args.output_dir, task.card_template, regime=record, settings=settings, facts=facts,
        pipeline_class=type(pipeline).__name__, pipeline_tag=task.pipeline_tag,
        dataset=None if args.train_data_dir is not None else HUB_DATASET_IDS.get(args.dataset_name, args.dataset_name),
        validation_image=validation_image, use_ema=args.use_ema, num_inference_steps=args.ddpm_num_inference_steps,
        **task.card_kwargs(dataset),
    )
    logger.info(f"Saved {type(pipeline).__name__} to {args.output_dir}")
    loop.close_uploads()  # the checkpoints' commits first: one writer to the repo at a time
    publish_run(loop.run, write_card)
    return pipeline


@exits_on_usage_error
def cli(argv=None):
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
