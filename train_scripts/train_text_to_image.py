#!/usr/bin/env python
"""Stable Diffusion 1.x/2.x, SDXL and SD3/SD3.5 fine-tuning (full or LoRA) with a timestep-aware training regime.

Shaped like diffusers' ``examples/text_to_image/train_text_to_image.py``, ``train_text_to_image_lora.py``,
``train_text_to_image_sdxl.py`` and ``dreambooth/train_dreambooth_sd3.py`` (same flag names) plus ``--regime`` and
its flags. The family comes from the base's ``model_index.json`` (``diffusers_curriculum.families``). Frozen VAE and
text encoders; the denoiser (a UNet, or SD3's transformer) learns on latents: epsilon or v-prediction for DDPM bases,
the flow-matching velocity for SD3 (``--weighting_scheme`` as diffusers' SD3 scripts, default logit_normal).
``--use_lora --rank 4`` trains peft LoRA adapters and saves them the diffusers way (``pytorch_lora_weights.safetensors``,
read by ``pipe.load_lora_weights``). Data: ``--dataset_name`` (a Hub id,
or ``fashion_mnist``: Fashion-MNIST captioned from its labels, "a photo of a sneaker", offline) or
``--train_data_dir``; one of them is required, so a forgotten flag never fine-tunes a real model on toy data.

    python -m diffusers_curriculum.tiny_sd --output_dir tiny-sd
    accelerate launch train_scripts/train_text_to_image.py --pretrained_model_name_or_path tiny-sd \
        --dataset_name fashion_mnist --output_dir fmnist-sd --max_train_steps 200 --regime curriculum --validation_prompts "a photo of a bag"
"""

import argparse
import functools
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.utils.import_utils import is_xformers_available

from diffusers_curriculum.buckets import BucketBatchSampler, parse_buckets
from diffusers_curriculum.caching import LatentCache, TextEmbeddingCache
from diffusers_curriculum.checkpointing import check_fresh_start, check_writable, move_into_place, save_pipeline
from diffusers_curriculum.config import OptimizerSettings, RunConfig, from_flags
from diffusers_curriculum.data import HUB_DATASET_IDS, INTERPOLATION_MODES, build_caption_dataset, describe_data
from diffusers_curriculum.errors import ArgumentParser, UsageError, describe_exception, exits_on_usage_error
from diffusers_curriculum.families import FAMILY_CLASSES, family_of, load_text_conditioning
from diffusers_curriculum.export import write_training_regime
from diffusers_curriculum.hub import base_model_fields, training_facts, write_model_card
from diffusers_curriculum.lora import LORA_WEIGHTS, add_lora, register_lora_hooks, save_lora_weights
from diffusers_curriculum.losses import denoising_loss
from diffusers_curriculum.noise import process_from_config
from diffusers_curriculum.regimes import add_regime_args, build_regime, regime_spec
from diffusers_curriculum.regimes.words import regime_in_words
from diffusers_curriculum.loop import TrainingLoop
from diffusers_curriculum.training import (
    configure_logging, end_training, log_images, make_accelerator, make_ema, make_optimizer, publish_run, shipped_weights,
    tracker_config,
)
from diffusers_curriculum.weighting import FLOW_WEIGHTINGS

logger = get_logger(__name__, log_level="INFO")
FAMILY_TAGS = {"sdxl": ["stable-diffusion-xl"], "sd3": ["stable-diffusion-3", "sd3"]}

CARD_SETTINGS = (
    "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler",
    "lr_warmup_steps", "max_train_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    "use_ema", "use_lora", "rank", "lora_alpha", "lora_dropout", "proportion_empty_prompts", "mixed_precision", "seed", "prediction_type", "noise_offset",
    "max_sequence_length", "drop_t5", "aspect_ratio_buckets",
)


def build_parser() -> ArgumentParser:
    """The script's flags: diffusers' ``train_text_to_image.py`` / ``train_text_to_image_lora.py`` names and
    defaults, plus the regime's."""
    parser = ArgumentParser(description="Fine-tune Stable Diffusion (full or LoRA) with a training regime.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="A Stable Diffusion 1.x/2.x, SDXL or SD3/SD3.5 folder or Hub id (e.g. one written by "
                            "`python -m diffusers_curriculum.tiny_sd`).")
    model.add_argument("--revision", type=str, default=None, help="The Hub revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", type=str, default=None, help="The weights variant to load, e.g. fp16.")
    model.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                       help="What the UNet learns to predict (DDPM bases); default: the pretrained scheduler's.")
    model.add_argument("--max_sequence_length", type=int, default=None,
                       help="SD3: T5's prompt length in tokens, in training and validation (default 77, as diffusers' SD3 scripts).")
    model.add_argument("--drop_t5", action="store_true",
                       help="SD3: train and ship without the T5 text encoder (its context is zeros, as in diffusers' SD3 "
                            "pipeline with text_encoder_3=None): much less memory, weaker prompt following.")
    model.add_argument("--use_lora", action="store_true", help="Train LoRA adapters (peft) instead of the full denoiser.")
    model.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    model.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha: the adapters are scaled by alpha / rank (default: the rank).")
    model.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA adapters' input.")
    data = parser.add_argument_group("data (give --dataset_name or --train_data_dir)")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A datasets Hub id, or 'fashion_mnist' (embedded, offline, captioned from its labels).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub data set, if it has several.")
    data.add_argument("--train_data_dir", type=str, default=None, help="An image folder with a metadata.jsonl of captions.")
    data.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    data.add_argument("--caption_column", type=str, default="text", help="The column holding a caption or a list of captions.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N examples only (debugging, quick runs).")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and data sets are cached.")
    data.add_argument("--resolution", type=int, default=None, help="Training resolution; default: the denoiser's sample_size × the VAE's scale factor.")
    data.add_argument("--aspect_ratio_buckets", type=str, default=None,
                      help='Aspect-ratio buckets "h,w;h,w;..." (diffusers\' flag): each image is resized and cropped to the '
                           "bucket nearest its aspect ratio, and each batch holds one bucket (instead of --resolution squares).")
    data.add_argument("--center_crop", default=False, action="store_true", help="Crop the centre (else a random crop per image and epoch).")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random (per image and epoch).")
    data.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=INTERPOLATION_MODES,
                      help="The filter images are resized with.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading processes (0: in the main process).")
    data.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                      help="Share of captions replaced by the empty prompt, drawn per image and epoch (caption dropout, for "
                           "classifier-free guidance; diffusers' SDXL script's flag).")
    data.add_argument("--cache_latents", action="store_true",
                      help="Encode each image with the VAE once (and each caption with the text encoder once) and reuse "
                           "them every epoch; latents are still drawn from the cached posterior each step.")
    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="Prompts sampled every --validation_epochs and at the end.")
    validation.add_argument("--validation_prompt", type=str, default=None, help="One validation prompt (diffusers' LoRA script's flag).")
    validation.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    validation.add_argument("--validation_epochs", type=int, default=5, help="Sample the validation prompts every N epochs.")
    validation.add_argument("--num_validation_inference_steps", type=int, default=25, help="Sampling steps of the validation images.")
    validation.add_argument("--validation_negative_prompt", type=str, default=None, help="Negative prompt of the validation images.")
    validation.add_argument("--validation_guidance_scale", type=float, default=None,
                            help="Classifier-free guidance scale of the validation images (default: the pipeline's).")
    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="sd-model-finetuned", help="Where the pipeline (or LoRA weights), checkpoints and logs go.")
    training.add_argument("--overwrite_output_dir", action="store_true",
                          help="Start over in an --output_dir that holds another run (its checkpoints and result index are removed).")
    training.add_argument("--seed", type=int, default=None, help="Seed of the run: data order, noise, timesteps, latents, flips.")
    training.add_argument("--train_batch_size", type=int, default=16, help="Examples per batch per process.")
    training.add_argument("--num_train_epochs", type=int, default=100, help="Passes over the data (unless --max_train_steps).")
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps to train; overrides --num_train_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated into one optimizer step.")
    training.add_argument("--gradient_checkpointing", action="store_true", help="Recompute the denoiser's activations in the backward pass (less memory).")
    training.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    training.add_argument("--scale_lr", action="store_true", help="Scale the learning rate by the total batch size.")
    training.add_argument("--lr_scheduler", type=str, default="constant",
                          help="diffusers' get_scheduler name: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.")
    training.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning-rate schedule.")
    training.add_argument("--use_ema", action="store_true", help="Keep an EMA of the denoiser (diffusers' EMAModel) and ship it.")
    training.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in (pinned) CPU memory between updates.")
    training.add_argument("--foreach_ema", action="store_true", help="Update the EMA with torch's foreach kernels (faster, more memory).")
    training.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA only; pip install 'diffusers-curriculum[8bit]').")
    training.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    training.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    training.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    training.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    training.add_argument("--noise_offset", type=float, default=0.0, help="Offset noise (Guttenberg 2023); 0.1 is a common value.")
    training.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                          help="Precision of the forward passes (and of the frozen VAE and text encoder); default: the accelerate config's, else no.")
    training.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs (faster fp32 training).")
    training.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                          help="xformers attention (pip install 'diffusers-curriculum[xformers]').")
    output = parser.add_argument_group("checkpoints, logging, Hub")
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Write a resumable checkpoint every N optimizer steps (and at the last).")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    output.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='"latest" (the newest complete checkpoint in --output_dir; none yet: a fresh start) or a checkpoint folder.')
    output.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside --output_dir.")
    output.add_argument("--report_to", type=str, default="tensorboard",
                        help="Trackers: tensorboard, wandb, comet_ml, mlflow, ... (comma-separated), all, or none.")
    output.add_argument("--tracker_project_name", type=str, default="text2image-fine-tune", help="The trackers' project name.")
    output.add_argument("--local_rank", type=int, default=-1,
                        help="Set by torch.distributed.launch; the LOCAL_RANK environment variable wins (accelerate launch sets it).")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the result and its model card after the local save.")
    output.add_argument("--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    output.add_argument("--hub_model_id", type=str, default=None, help="The repo to push to (default: <user>/<output_dir name>).")
    output.add_argument("--hub_private_repo", action="store_true", help="Create the repo private.")
    output.add_argument("--push_checkpoints", action="store_true",
                        help="Upload each checkpoint to the repo (checkpoints/checkpoint-<step>/) in the background as it is "
                             "written, with --checkpoints_total_limit mirrored there; --resume_from_checkpoint latest then "
                             "finds them on the Hub when --output_dir has none.")
    output.add_argument("--push_checkpoints_timeout", type=float, default=600.0,
                        help="Seconds the end of a run (or a SIGTERM) waits for checkpoint uploads still pending.")
    add_regime_args(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args):
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "validation_epochs",
                 "checkpointing_steps", "rank", "num_validation_inference_steps", "num_validation_images"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UsageError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if (args.lora_alpha is not None or args.lora_dropout) and not args.use_lora:
        raise UsageError("--lora_alpha/--lora_dropout need --use_lora")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise UsageError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.validation_guidance_scale is not None and args.validation_guidance_scale < 0:
        raise UsageError(f"--validation_guidance_scale must be >= 0, got {args.validation_guidance_scale}")
    if args.cache_latents and args.random_flip:
        raise UsageError("--cache_latents encodes each image once, so it cannot flip it anew each epoch: drop --random_flip")
    if args.noise_offset < 0:
        raise UsageError(f"--noise_offset must be >= 0, got {args.noise_offset}")
    if args.use_lora and args.use_ema:
        raise UsageError("--use_ema keeps an EMA of the full denoiser and does not apply to --use_lora (LoRA trains adapters only)")
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise UsageError("--enable_xformers_memory_efficient_attention: xformers is not installed (pip install 'diffusers-curriculum[xformers]')")
    if args.train_data_dir is None and args.dataset_name is None:
        raise UsageError("give --dataset_name (a Hub id, or fashion_mnist offline) or --train_data_dir")
    if args.validation_prompt is not None:  # diffusers' LoRA script's single prompt joins the list
        args.validation_prompts = [*(args.validation_prompts or []), args.validation_prompt]
    args.run_config = from_flags(RunConfig, vars(args))  # trackers installed, Hub token resolved
    args.optimizer_settings = from_flags(OptimizerSettings, vars(args))
    family, num_train_timesteps, process = read_base(args)
    if family != "sd3":
        for flag in ("max_sequence_length", "drop_t5"):
            if getattr(args, flag) not in (None, False):
                raise UsageError(f"--{flag} applies to SD3 bases; {args.pretrained_model_name_or_path} is a {FAMILY_CLASSES[family].label} model")
    elif args.max_sequence_length is None:
        args.max_sequence_length = 77  # diffusers' SD3 training scripts' default
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise UsageError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}")
    if (process == "flow" and args.regime == "uniform" and args.timestep_sampling is None and args.weighting_scheme is None
            and args.weighting not in FLOW_WEIGHTINGS):  # diffusers' SD3 default density (its sigma_sqrt/cosmap draw uniformly)
        args.weighting_scheme = "logit_normal"
    if args.prediction_type is not None and process != "ddpm":
        raise UsageError(f"--prediction_type applies to DDPM bases; {args.pretrained_model_name_or_path} is a {process} model")
    args.regime_spec = regime_spec(args, num_train_timesteps=num_train_timesteps, noise_process=process)
    if args.use_lora and args.regime_spec.experts is not None:
        raise UsageError(f"{'--regime tdc' if args.regime == 'tdc' else '--experts'} trains full expert copies; it does not combine with --use_lora")
    check_fresh_start(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint, done_file(args))
    check_writable(args.output_dir)


def done_file(args) -> str:
    """The file whose presence marks a finished run in ``--output_dir``."""
    return LORA_WEIGHTS if args.use_lora else "model_index.json"


def read_base(args):
    """(family, T, noise process name) of the pretrained pipeline, read from its configs before any weights load; a
    local-looking path that does not exist is named as such, not reported as a failed Hub download."""
    path = args.pretrained_model_name_or_path
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"--pretrained_model_name_or_path {path}: no such folder (a Hub id has the form owner/name)")
    family = family_of(path, args.revision)  # a supported family, else a one-line error naming them
    try:
        config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=args.revision)
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load a Stable Diffusion pipeline ({describe_exception(e)})") from None
    return family, int(config["num_train_timesteps"]), process_from_config(config).name


def load_components(args):
    """The family's text side (tokenizers, text encoders), VAE, denoiser (UNet or transformer) and noise process
    (from its scheduler's config: DDPM, or rectified flow for SD3) of the pretrained pipeline (one-line error if not)."""
    path, kwargs = args.pretrained_model_name_or_path, {"revision": args.revision}
    options = {"max_sequence_length": args.max_sequence_length, "drop_t5": args.drop_t5} if args.max_sequence_length else {}
    text = load_text_conditioning(path, args.revision, args.variant, **options)
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **kwargs)
        denoiser = text.denoiser_class().from_pretrained(path, subfolder=text.denoiser_name, variant=args.variant, **kwargs)
        noise_process = process_from_config(DDPMScheduler.load_config(path, subfolder="scheduler", revision=args.revision))
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load a Stable Diffusion pipeline ({describe_exception(e)})") from None
    return text, vae, denoiser, noise_process


def check_resolution(args):
    """The training resolution and the aspect-ratio buckets or ``None``, read from the configs before any weights
    load: every side must give latents the denoiser can halve as often as it downsamples (a UNet) or cut into whole
    patches (SD3's transformer)."""
    path = args.pretrained_model_name_or_path
    family = FAMILY_CLASSES[family_of(path, args.revision)]
    try:
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", revision=args.revision)
        denoiser_config = family.denoiser_class().load_config(path, subfolder=family.denoiser_name, revision=args.revision)
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load a Stable Diffusion pipeline ({describe_exception(e)})") from None
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    resolution = args.resolution or denoiser_config["sample_size"] * vae_factor
    denoiser_factor = family.downsampling(denoiser_config)
    if resolution % (vae_factor * denoiser_factor):
        what = "the UNet by" if family.denoiser_name == "unet" else "the transformer's patches are"
        raise UsageError(
            f"--resolution {resolution} does not fit the model: the VAE downsamples by {vae_factor} and {what} "
            f"{denoiser_factor}, so it must be a multiple of {vae_factor * denoiser_factor}"
        )
    buckets = None if args.aspect_ratio_buckets is None else parse_buckets(args.aspect_ratio_buckets, vae_factor * denoiser_factor)
    return resolution, buckets


def collate(text):
    def fn(examples):
        captions = [e["caption"] for e in examples]
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(), "input_ids": text.tokenize(captions),
                "captions": captions, "index": torch.tensor([e["index"] for e in examples]),
                **{key: torch.stack([e[key] for e in examples]) for key in ("original_size", "crop_top_left")}}

    return fn


def main(args):
    accelerator = make_accelerator(args.run_config, args.regime_spec)
    configure_logging(accelerator, logger)
    if args.seed is not None:
        set_seed(args.seed)

    resolution, buckets = check_resolution(args)
    text, vae, denoiser, noise_process = load_components(args)
    if args.prediction_type is not None:  # a DDPM base (checked in validate_args)
        noise_process.scheduler.register_to_config(prediction_type=args.prediction_type)
    dataset = build_caption_dataset(
        args.dataset_name, args.train_data_dir, resolution, args.image_column, args.caption_column,
        center_crop=args.center_crop, random_flip=args.random_flip, dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir, max_train_samples=args.max_train_samples, seed=args.seed or 0,
        interpolation=args.image_interpolation_mode, empty_prompt_prob=args.proportion_empty_prompts, buckets=buckets,
    )
    if buckets is None:
        batching = {"batch_size": args.train_batch_size, "shuffle": True, "drop_last": True}
    else:  # one bucket per batch, shuffled per epoch from the seed
        batching = {"batch_sampler": BucketBatchSampler(dataset, dataset.bucket_of, args.train_batch_size, args.seed or 0)}
    train_dataloader = torch.utils.data.DataLoader(dataset, collate_fn=collate(text), num_workers=args.dataloader_num_workers,
                                                   **batching)
    if len(train_dataloader) == 0:
        where = "the data set" if buckets is None else "every aspect-ratio bucket"
        raise UsageError(f"--train_batch_size {args.train_batch_size} is larger than {where} ({len(dataset)} images)")
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    run = replace(args.run_config, max_train_steps=args.max_train_steps or args.num_train_epochs * steps_per_epoch,
                  mixed_precision=accelerator.mixed_precision)  # the run's length and precision, now known
    regime = build_regime(args.regime_spec, noise_process, accelerator, run.max_train_steps)  # the length sizes a curriculum

    vae.requires_grad_(False)
    for encoder in text.text_encoders:
        encoder.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if args.use_lora:  # the frozen denoiser in the weight dtype, its adapters in fp32; checkpoints hold the adapters only
        add_lora(denoiser, args.rank, args.lora_alpha or args.rank, args.lora_dropout, weight_dtype, accelerator.device,
                 target_modules=text.lora_target_modules)
        register_lora_hooks(accelerator, {text.denoiser_name: denoiser}, text.pipeline_class, text.lora_peft_format)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()
    denoiser = regime.wrap_model(denoiser)
    ema_denoiser = make_ema(denoiser, args.use_ema, args.foreach_ema)

    vae.to(accelerator.device, dtype=weight_dtype)
    for encoder in text.text_encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * total_batch_size if args.scale_lr else args.learning_rate
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optimizer_settings, trainable, learning_rate, accelerator.device)
    loop = TrainingLoop(accelerator, run, regime, logger, "text_to_image", done_file=done_file(args))
    done = loop.begin()  # every check passed: only now is --output_dir touched
    if done is not None:  # the re-run of a finished command: nothing to train
        return done
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=run.max_train_steps * accelerator.num_processes)
    denoiser, optimizer, train_dataloader, lr_scheduler = loop.prepare(denoiser, optimizer, train_dataloader, lr_scheduler,
                                                                       ema_denoiser)
    shift_factor = vae.config.get("shift_factor") or 0.0  # SD3's VAE centres its latents
    latent_cache = text_cache = None
    if args.cache_latents:  # every image through the VAE once, every caption through the text encoder once
        latent_cache = LatentCache(vae, dataset, args.train_batch_size, accelerator.device, weight_dtype,
                                   disable_progress=not accelerator.is_local_main_process, bucket_of=dataset.bucket_of)
        text_cache = TextEmbeddingCache(text.tokenize, text.encode, dataset.all_captions(), args.train_batch_size,
                                        disable_progress=not accelerator.is_local_main_process)

    def step(batch):
        """A batch's per-sample denoising losses (in latent space, conditioned on its captions) and noise levels."""
        with torch.no_grad():
            if latent_cache is not None:
                mean, std = latent_cache.posterior(batch["index"], accelerator.device)
                encoder_hidden_states, pooled = text_cache(batch["captions"])
            else:
                posterior = vae.encode(batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)).latent_dist
                mean, std = posterior.mean, posterior.std
                encoder_hidden_states, pooled = text.encode(batch["input_ids"])
            conditioning = text.conditioning(pooled, batch)  # SDXL/SD3: pooled text (SDXL: sizes, crop)
            # sample the posterior from the regime's checkpointed generator: resumes draw the same latents
            latents = (mean + std * regime.randn_like(mean) - shift_factor) * vae.config.scaling_factor
        noise, timesteps = regime.sample(latents, noise_offset=args.noise_offset)
        noisy_latents = noise_process.add_noise(latents, noise, timesteps)
        model_pred = text.predict(denoiser, noisy_latents, noise_process.model_timesteps(timesteps), encoder_hidden_states,
                                  conditioning)
        return denoising_loss(model_pred, noise_process, latents, noise, timesteps), timesteps

    def on_epoch_end(epoch, global_step):
        if accelerator.is_main_process and args.validation_prompts and (epoch + 1) % args.validation_epochs == 0:
            validate(args, accelerator, denoiser, ema_denoiser, text, vae, noise_process, f"epoch_{epoch}", global_step)

    def on_finish(global_step):
        finish(args, loop, resolution, accelerator, denoiser, ema_denoiser, text, vae, noise_process, regime, global_step,
               len(dataset), total_batch_size)

    shape = f"resolution {resolution}" if buckets is None else f"buckets {args.aspect_ratio_buckets}"
    trained = f"LoRA rank {args.rank}" if args.use_lora else f"full {text.denoiser_class_name}"
    summary = loop.train(step, max_grad_norm=args.max_grad_norm, parameters=trainable,
                         tracker=(args.tracker_project_name, tracker_config(vars(args))),
                         describe=[f"Num examples = {len(dataset)}; {shape}; {trained}",
                                   f"Total train batch size (w. parallel & accumulation) = {total_batch_size}"],
                         on_epoch_end=on_epoch_end, finish=on_finish)
    denoiser = optimizer = train_dataloader = lr_scheduler = None  # the DDP wrapper goes before its process group
    end_training(accelerator)
    return summary


def build_pipeline(denoiser, text, vae, noise_process):
    """The family's stock pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
    ``StableDiffusion3Pipeline``) with a DDIM scheduler (a flow-matching process ships its own)."""
    return text.pipeline(denoiser, vae, noise_process.pipeline_scheduler("ddim" if noise_process.name == "ddpm" else None))


def log_validation(args, accelerator, pipeline, name, global_step, sampling_kwargs=None):
    """``--num_validation_images`` images per validation prompt, saved to ``samples/<name>_<i>[_<j>].png`` and
    sent to the trackers; returns the relative path of each prompt's first image (for the model card).
    ``sampling_kwargs``: the family's extra pipeline arguments (SD3: the trained T5 length)."""
    sampling_kwargs = sampling_kwargs or {}
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    firsts, images = [], []
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    for i, prompt in enumerate(args.validation_prompts or []):
        for j in range(args.num_validation_images):
            guidance = {} if args.validation_guidance_scale is None else {"guidance_scale": args.validation_guidance_scale}
            images.append(pipeline(prompt, negative_prompt=args.validation_negative_prompt, generator=generator,
                                   num_inference_steps=args.num_validation_inference_steps, **guidance,
                                   **sampling_kwargs).images[0])
            path = f"samples/{name}_{i}.png" if j == 0 else f"samples/{name}_{i}_{j}.png"
            images[-1].save(os.path.join(args.output_dir, path))
            if j == 0:
                firsts.append(path)
    if images:
        log_images(accelerator, "validation", images, global_step)
    return firsts


def validate(args, accelerator, denoiser, ema_denoiser, text, vae, noise_process, name, global_step):
    """Validation images of the weights that would ship; the training weights are back in place afterwards."""
    with shipped_weights(accelerator, denoiser, ema_denoiser) as shipped:
        log_validation(args, accelerator, build_pipeline(shipped, text, vae, noise_process), name, global_step,
                       text.sampling_kwargs())


def save_lora(denoiser, output_dir, text):
    """Writes the LoRA weights the diffusers way (the family's ``save_lora_weights``), through a temp folder (never
    half-written)."""
    tmp = Path(output_dir) / ".lora.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora_weights(text.pipeline_class, str(tmp), {text.denoiser_name: denoiser}, text.lora_peft_format)
    move_into_place(tmp / LORA_WEIGHTS, Path(output_dir) / LORA_WEIGHTS)
    shutil.rmtree(tmp)


def finish(args, loop, resolution, accelerator, denoiser, ema_denoiser, text, vae, noise_process, regime, global_step, num_examples,
           total_batch_size):
    """Saves the pipeline (the EMA weights with --use_ema) or the LoRA weights, the validation images and the
    model card; then pushes when asked."""
    record = {**regime.describe(), "trained_steps": global_step, "optimizer": args.optimizer_settings.record()}
    with shipped_weights(accelerator, denoiser, ema_denoiser, final=True) as shipped:  # training is over: no restore
        pipeline = build_pipeline(shipped, text, vae, noise_process)
        if args.use_lora:
            save_lora(shipped, args.output_dir, text)
            write_training_regime(args.output_dir, record)  # last: the record's trained_steps marks the run finished
        else:
            save_pipeline(pipeline, args.output_dir, training_regime=record)
        images = log_validation(args, accelerator, pipeline, "final", global_step, text.sampling_kwargs()) if args.validation_prompts else []
    settings = {key: getattr(args, key) for key in CARD_SETTINGS}
    settings.update(trained_steps=global_step, prediction_type=noise_process.prediction_type, resolution=resolution,
                    max_train_steps=loop.run.max_train_steps, mixed_precision=loop.run.mixed_precision)
    if record.get("stage_history"):
        logger.info(regime_in_words(record, global_step)[-1])  # how far the curriculum got
    dataset = None if args.train_data_dir else HUB_DATASET_IDS.get(args.dataset_name, args.dataset_name)
    parameters = list(getattr(pipeline, text.denoiser_name).parameters())
    facts = training_facts(num_examples, describe_data(args.dataset_name, args.train_data_dir, num_examples, args.max_train_samples),
                           global_step, total_batch_size, sum(p.numel() for p in parameters),
                           sum(p.numel() for p in parameters if p.requires_grad) if args.use_lora else None)
    validation = list(zip(args.validation_prompts or [], images))
    base = base_model_fields(args.pretrained_model_name_or_path)
    write_card = functools.partial(
        write_model_card, args.output_dir, "text_to_image", regime=record, settings=settings, facts=facts,
        pipeline_class=text.pipeline_class_name, pipeline_tag="text-to-image", dataset=dataset, family=text.label,
        denoiser="UNet" if text.denoiser_name == "unet" else "transformer", denoiser_folder=text.denoiser_name,
        extra_call="".join(f", {k}={v!r}" for k, v in text.sampling_kwargs().items()),
        load_args="".join(f", {k}={v!r}" for k, v in text.loading_kwargs().items()),
        tags=["stable-diffusion", *FAMILY_TAGS.get(text.family, []), "text-to-image",
              *(["lora"] if args.use_lora else [])], **base,
        widget=[{"text": prompt, "output": {"url": image}} for prompt, image in validation],
        base_model_path=None if base["base_model"] else args.pretrained_model_name_or_path,
        use_lora=args.use_lora, validation=validation, num_inference_steps=args.num_validation_inference_steps,
    )
    logger.info(f"Saved {'LoRA weights' if args.use_lora else text.pipeline_class_name} to {args.output_dir}")
    loop.close_uploads()  # the checkpoints' commits first: one writer to the repo at a time
    publish_run(loop.run, write_card)


@exits_on_usage_error
def cli(argv=None):
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
