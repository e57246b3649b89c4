#!/usr/bin/env python
"""Prunes the experts of a TDC pipeline (``--regime tdc``) with the proxy-scored search of
``diffusers_curriculum.pruning`` and saves the smaller pipeline.

    python train_scripts/prune_experts.py --pretrained_model_name_or_path fmnist-tdc \
        --output_dir fmnist-tdc-pruned --prune_ratio 0.5

Every expert gets a FLOPs budget (easy high-noise groups the smallest), ``--search_rounds`` proposals scored
by ``--proxy_steps`` of fine-tuning plus a validation loss, then ``--finetune_steps`` on its group, on the
device accelerate picks (a GPU when there is one; ``CUDA_VISIBLE_DEVICES=""`` keeps it on the CPU). The
``training_regime.json`` and the model card record each expert's size and FLOPs and the FLOPs per generated sample.

``--prune_at branch`` prunes right after TDC's branch instead of after the run (the recipe the README's pruned-TDC
result uses): train the TDC run to ``--experts_base_steps + 1`` steps, then

    python train_scripts/prune_experts.py --pretrained_model_name_or_path fmnist-tdc-branch \
        --output_dir fmnist-tdc-pruned --prune_at branch --total_train_steps 1400 --train_batch_size 2

and each pruned expert is fine-tuned for the rest of the run (``--total_train_steps`` minus the steps trained) at the
run's learning rate, shipping the EMA of its fine-tuning (decay 0.999); with ``--train_batch_size`` the run's batch
divided by the number of experts, each expert sees the samples the run's stage 2 would have given it.
"""

import argparse
import functools
import json
import math
import os
from dataclasses import asdict

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline

from diffusers_curriculum.checkpointing import save_pipeline
from diffusers_curriculum.data import BUILTIN_DATASETS, HUB_DATASET_IDS, build_dataset
from diffusers_curriculum.errors import ArgumentParser, UsageError, describe_exception, exits_on_usage_error
from diffusers_curriculum.experts import TimestepRoutedExperts, is_routed_experts
from diffusers_curriculum.export import read_training_regime, stock_scheduler
from diffusers_curriculum.hub import (
    base_model_fields, publish_or_exit, resolve_hub_token, write_model_card,
)
from diffusers_curriculum.experts.pruning import FinetuneObjective, flops_report, prune_experts

REPORT_FILE = "pruning_report.json"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Structured pruning of a TDC pipeline's experts.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="A TDC pipeline (folder or Hub id).")
    parser.add_argument("--output_dir", type=str, required=True, help="Where the pruned pipeline and its report go.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace a pipeline already in --output_dir.")
    parser.add_argument("--prune_ratio", type=float, default=0.5,
                        help="FLOPs fraction removed from the easiest (highest-noise) expert; harder experts lose less.")
    parser.add_argument("--search_rounds", type=int, default=4, help="Proposals scored per expert.")
    parser.add_argument("--proxy_steps", type=int, default=20, help="Fine-tuning steps of the proxy score.")
    parser.add_argument("--prune_at", type=str, default="end", choices=["end", "branch"],
                        help="end: prune a finished TDC run, fine-tune --finetune_steps at --learning_rate. branch: prune a run "
                             "stopped right after its branch; fine-tune for the rest of --total_train_steps at the run's "
                             "learning rate and ship each expert's EMA (decay 0.999).")
    parser.add_argument("--total_train_steps", type=int, default=None,
                        help="--prune_at branch: the run's planned length; each expert fine-tunes for it minus the steps trained.")
    parser.add_argument("--finetune_steps", type=int, default=None, help="Fine-tuning steps of each chosen pruned expert (default 200).")
    parser.add_argument("--distill_weight", type=float, default=0.0,
                        help="Weight of output distillation from each expert's unpruned self, added to the denoising loss "
                             "in the proxy's and the final fine-tuning (0: off; on the tiny CPU benchmark it made no measurable "
                             "difference, see the README).")
    parser.add_argument("--max_loss_increase", type=float, default=0.1,
                        help="Largest accepted rise of a pruned expert's validation denoising loss over the unpruned "
                             "expert's (0.1 = 10%%); above it the search retries under a budget half-way to the unpruned "
                             "FLOPs (--relaxations times), then keeps the expert unpruned. inf: ship whatever the budgets give.")
    parser.add_argument("--relaxations", type=int, default=2, help="Budget relaxations per expert under --max_loss_increase.")
    parser.add_argument("--use_ema", action="store_true",
                        help="Ship each pruned expert's EMA of its fine-tuning (warm-up schedule as the training scripts').")
    parser.add_argument("--ema_max_decay", type=float, default=None, help="The EMA's decay cap with --use_ema (default 0.9999; "
                                                                         "0.999 with --prune_at branch).")
    parser.add_argument("--validation_size", type=int, default=64, help="Images in each expert's validation batch.")
    parser.add_argument("--dataset_name", type=str, default="fashion_mnist", help=f"Hub id or one of {BUILTIN_DATASETS}.")
    parser.add_argument("--train_data_dir", type=str, default=None, help="A folder of training images (overrides --dataset_name).")
    parser.add_argument("--image_column", type=str, default="image", help="The image column of a Hub data set.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use the first N images only.")
    parser.add_argument("--resolution", type=int, default=None, help="Defaults to the experts' sample_size.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Images per fine-tuning batch.")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="AdamW learning rate of the fine-tuning (default 1e-4; the run's with --prune_at branch).")
    parser.add_argument("--num_inference_steps", type=int, default=1000, help="Sampling steps the FLOPs per sample are counted for.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the search, the fine-tuning and the validation batches.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the pruned pipeline and its model card.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    parser.add_argument("--hub_model_id", type=str, default=None, help="The repo to push to (default: <user>/<output_dir name>).")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args):
    if not 0 < args.prune_ratio < 1:
        raise UsageError(f"--prune_ratio must be in (0, 1), got {args.prune_ratio}")
    for flag in ("search_rounds", "train_batch_size", "validation_size", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("proxy_steps", "finetune_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.prune_at == "branch":
        if args.total_train_steps is None:
            raise UsageError("--prune_at branch needs --total_train_steps (the run's planned length)")
        if args.finetune_steps is not None:
            raise UsageError("--finetune_steps is set by --prune_at branch (--total_train_steps minus the steps trained); give one")
    elif args.total_train_steps is not None:
        raise UsageError("--total_train_steps applies to --prune_at branch")
    if args.distill_weight < 0:
        raise UsageError(f"--distill_weight must be >= 0, got {args.distill_weight}")
    if not args.max_loss_increase >= 0:
        raise UsageError(f"--max_loss_increase must be >= 0 (inf: no limit), got {args.max_loss_increase}")
    if args.relaxations < 0:
        raise UsageError(f"--relaxations must be >= 0, got {args.relaxations}")
    if args.ema_max_decay is not None and not 0 < args.ema_max_decay < 1:
        raise UsageError(f"--ema_max_decay must be in (0, 1), got {args.ema_max_decay}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if os.path.abspath(args.output_dir) == os.path.abspath(args.pretrained_model_name_or_path):
        raise UsageError("--output_dir must differ from --pretrained_model_name_or_path (the unpruned pipeline is kept)")
    if os.path.exists(os.path.join(args.output_dir, "model_index.json")) and not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {args.output_dir} already holds a saved pipeline; pass --overwrite_output_dir")
    args.hub_token_resolved = resolve_hub_token(args.hub_token) if args.push_to_hub else None


def load_tdc_pipeline(path):
    """The TDC pipeline at ``path`` (folder or Hub id) with this package's experts class and a stock scheduler.

    The folder loads the way its users load it (its own copy of the experts' code, ``trust_remote_code``);
    the loaded experts are then wrapped in the package's class, which the pruning code works on.
    """
    try:
        index = DiffusionPipeline.load_config(path)
        if "text_encoder" in index:  # text-to-image: the proxy and the fine-tune have no captions
            raise UsageError(f"--pretrained_model_name_or_path {path}: pruning text-to-image experts ({index['_class_name']}) is "
                             "not supported; prune_experts.py prunes the unconditional pixel-space TDC experts")
        pipeline = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--pretrained_model_name_or_path {path}: cannot load a pipeline ({describe_exception(e)})") from None
    unet = pipeline.unet
    if not is_routed_experts(unet):
        raise UsageError(
            f"--pretrained_model_name_or_path {path}: its unet is a {type(unet).__name__}, not the "
            "TimestepRoutedExperts a --regime tdc run saves"
        )
    if unet.config.get("num_class_embeds"):
        raise UsageError(f"--pretrained_model_name_or_path {path}: pruning class-conditional experts is not supported (the proxy has no labels)")
    experts = TimestepRoutedExperts(boundaries=unet.boundaries, expert_class=unet.config.expert_class, experts=list(unet.experts))
    sampler = "ddim" if isinstance(pipeline.scheduler, DDIMScheduler) else "ddpm"
    return DDPMPipeline(unet=experts, scheduler=stock_scheduler(pipeline.scheduler, sampler))


def finetune_recipe(args, record):
    """The fine-tuning of each pruned expert: ``finetune_steps``, ``learning_rate`` and ``ema_decay`` (None: no EMA).
    At the end of a run: the flags (200 steps, 1e-4). At the branch: the rest of the run at its learning rate, and the
    EMA of the fine-tuning (decay 0.999)."""
    if args.prune_at == "end":
        return {"finetune_steps": 200 if args.finetune_steps is None else args.finetune_steps,
                "learning_rate": args.learning_rate or 1e-4,
                "ema_decay": (args.ema_max_decay or 0.9999) if args.use_ema else None}
    trained = record.get("trained_steps")
    if trained is None or trained >= args.total_train_steps:
        raise UsageError(f"--total_train_steps {args.total_train_steps} leaves no fine-tuning: the run trained {trained} steps")
    learning_rate = args.learning_rate or (record.get("optimizer") or {}).get("learning_rate")
    if learning_rate is None:
        raise UsageError("--prune_at branch: the run's record has no learning rate; give --learning_rate")
    return {"finetune_steps": args.total_train_steps - trained, "learning_rate": learning_rate,
            "ema_decay": args.ema_max_decay or 0.999}


def main(args):
    torch.manual_seed(args.seed)
    pipeline = load_tdc_pipeline(args.pretrained_model_name_or_path)
    regime = read_training_regime(args.pretrained_model_name_or_path)
    pipeline.to(Accelerator().device)  # the search and the fine-tuning run where the training scripts would
    experts = pipeline.unet
    resolution = args.resolution or experts.config.sample_size
    if resolution != experts.config.sample_size:
        raise UsageError(f"--resolution {resolution} differs from the experts' sample_size {experts.config.sample_size}")
    dataset = build_dataset(args.dataset_name, args.train_data_dir, resolution, args.image_column,
                            image_mode="L" if experts.config.in_channels == 1 else "RGB",
                            max_train_samples=args.max_train_samples)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(args.num_inference_steps)
    before = flops_report(experts, scheduler.timesteps.tolist())

    objective = FinetuneObjective.from_record(regime)  # fine-tune as the run trained: its AdamW settings and weighting
    if objective.note:
        print(f"warning: {objective.note}")
    recipe = finetune_recipe(args, regime)
    reports = prune_experts(
        experts, dataset, scheduler, args.prune_ratio, rounds=args.search_rounds, proxy_steps=args.proxy_steps,
        batch_size=args.train_batch_size, validation_size=args.validation_size, seed=args.seed, distill_weight=args.distill_weight,
        max_loss_increase=None if math.isinf(args.max_loss_increase) else args.max_loss_increase, relaxations=args.relaxations,
        objective=objective, **recipe,
    )
    after = flops_report(experts, scheduler.timesteps.tolist())
    summary = {
        "prune_ratio": args.prune_ratio,
        "flops_per_sample_before": before["flops_per_sample"],
        "flops_per_sample": after["flops_per_sample"],
        "flops_saved_fraction": 1 - after["flops_per_sample"] / before["flops_per_sample"],
        "num_inference_steps": args.num_inference_steps,
        "experts": after["experts"],
        "finetune_objective": asdict(objective),
        "prune_at": args.prune_at, **recipe,
    }
    regime["pruning"] = summary
    save_pipeline(pipeline, args.output_dir, training_regime=regime)
    with open(os.path.join(args.output_dir, REPORT_FILE), "w") as f:
        json.dump({**summary, "search": reports}, f, indent=2)
    settings = {**{k: getattr(args, k) for k in ("prune_at", "prune_ratio", "search_rounds", "proxy_steps", "distill_weight",
                                                 "max_loss_increase", "relaxations", "seed")}, **recipe}
    write_card = functools.partial(
        write_model_card, args.output_dir, "unconditional", regime=regime, settings=settings,
        pipeline_class=type(pipeline).__name__, pipeline_tag="unconditional-image-generation",
        dataset=None if args.train_data_dir else HUB_DATASET_IDS.get(args.dataset_name, args.dataset_name),
        tags=["pruned"], num_inference_steps=args.num_inference_steps, **base_model_fields(args.pretrained_model_name_or_path),
    )
    print(f"FLOPs per sample ({args.num_inference_steps} steps): {before['flops_per_sample']:.3e} -> "
          f"{after['flops_per_sample']:.3e} ({summary['flops_saved_fraction']:.1%} fewer); saved to {args.output_dir}")
    publish_or_exit(write_card, args.output_dir, args.push_to_hub, args.hub_model_id, args.hub_token_resolved)
    return summary


@exits_on_usage_error
def cli(argv=None):
    return main(parse_args(argv))


if __name__ == "__main__":
    cli()
