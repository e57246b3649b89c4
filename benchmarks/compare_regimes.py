"""Regimes side by side on real Fashion-MNIST: feature-FID of EMA weights at several steps, several seeds.

Every arm trains the same tiny UNet with ``train_scripts/train_unconditional.py`` (same data, batch,
optimizer, steps); only the regime flags differ. Every ``--eval_every`` steps the EMA pipeline generates
``--num_fid_images`` images (DDIM, ``--num_inference_steps``) whose feature-FID against held-out test
images is recorded with the wall-clock time. Arms are single regimes or compositions named by their parts
(``ant_uw+p2``); ``--curriculum_share`` sets how much of the run the curriculum arms may spend in their stages. ``tdc_pruned`` prunes TDC's experts with
``train_scripts/prune_experts.py``: by default (``--prune_at branch``) right after the base stage, each pruned expert
then fine-tuned on its group at a quarter of the batch for as many samples as the rest of the run gives it, so the
arm ends at the same total training steps as the others; ``--prune_at end`` prunes the finished ``tdc`` run and
fine-tunes ``--prune_finetune_steps`` more steps per expert (rounds 1 and 2 of the README). Results are appended to
``results.jsonl`` as they come, so an interrupted run continues where it stopped (with ``--checkpointing_steps``
a half-done arm resumes from its last checkpoint, else it restarts); then a table
(mean ± std over seeds, steps to reach ``--target_fid``) and plots are written.

    python benchmarks/compare_regimes.py --workers 10 --output_dir <dir>     # the README's GPU run (the defaults)
    python benchmarks/compare_regimes.py --quick --output_dir /tmp/compare-quick     # minutes, for CI

``--class_conditional`` trains the arms with ``train_scripts/train_class_conditional.py`` instead; the images
are then requested class by class (label ``i % 10`` for image ``i``), and each evaluation also records the
share of them that the metric's classifier assigns to the requested class (per class and mean), so
conditioning is measured next to quality.

``--workers N`` trains N (seed, arm) jobs at once, each in its own process (e.g. several small runs sharing
one GPU); their step times then share the machine. The equal-wall-clock column compares each seed's arms
with that seed's uniform run on the jobs' own clocks, or, with ``--step_costs``, on clocks modelled from
``benchmarks/overhead.py --arms`` (per-step costs measured side by side on a quiet machine).
"""

import argparse
import fcntl
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared harness, however this file is loaded

from harness import (  # noqa: E402
    DEFAULT_BLOCK_OUT_CHANNELS, TDC_EXPERTS, arms, curriculum_flags, fid_images, load_script, mean_std, prune_experts,
    real_images, requested_classes, sampling_flops, sweep_arm,
)


def arms_of(args):
    """Every arm of this run: :func:`arms`, plus the curriculum arms of the ``--sweep_shares`` × ``--sweep_clusters`` grid."""
    table = arms(args.max_train_steps, args.curriculum_share, args.curriculum_clusters)
    for share in args.sweep_shares:
        for clusters in args.sweep_clusters:
            table[sweep_arm(share, clusters)] = ["--regime", "curriculum", "--curriculum_clusters", str(clusters),
                                                 *curriculum_flags(args.max_train_steps, share, clusters)]
    return table


def chosen_arms(args):
    """The arms this run trains: ``--regimes``, or every arm of :func:`arms_of` (a class-conditional run has no
    ``tdc_pruned``: ``prune_experts.py`` prunes unconditional experts only)."""
    all_arms = arms_of(args)
    chosen = args.regimes.split(",") if args.regimes else [a for a in all_arms if not (args.class_conditional and a == "tdc_pruned")]
    unknown = [a for a in chosen if a not in all_arms]
    if unknown:
        sys.exit(f"error: --regimes: unknown arms {unknown}; choose from {list(all_arms)}")
    return chosen


# Budgets of round 3 (README, "Which regime to use"): round 2's update-starved CPU protocol and a longer one with as
# many samples per run in 4x the updates. A protocol sets these flags' defaults; flags given explicitly win.
PROTOCOLS = {
    "cpu_round2": {"max_train_steps": 500, "train_batch_size": 32, "eval_every": 125, "num_fid_images": 250,
                   "num_inference_steps": 10, "curriculum_share": 0.2},
    "cpu_long": {"max_train_steps": 2000, "train_batch_size": 8, "eval_every": 250, "num_fid_images": 250,
                 "num_inference_steps": 10, "curriculum_share": 0.2},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", type=str, default=None, choices=sorted(PROTOCOLS),
                        help="A budget's settings as defaults (steps, batch, evaluation); explicit flags win.")
    parser.add_argument("--output_dir", type=str, default="benchmarks/results/compare")
    parser.add_argument("--regimes", type=str, default=None, help="Comma-separated arms (default: all).")
    parser.add_argument("--seeds", type=str, default="0,1,2")
    parser.add_argument("--max_train_steps", type=int, default=1500)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--block_out_channels", type=str, default=DEFAULT_BLOCK_OUT_CHANNELS)
    parser.add_argument("--num_fid_images", type=int, default=500)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--prune_ratio", type=float, default=0.5)
    parser.add_argument("--prune_at", type=str, default="branch", choices=["branch", "end"],
                        help="tdc_pruned: prune right after TDC's base stage and spend the rest of the run's samples on "
                             "fine-tuning the pruned experts (branch: same total steps as the other arms), or prune the "
                             "finished tdc run and fine-tune --prune_finetune_steps more (end).")
    parser.add_argument("--prune_finetune_steps", type=int, default=50, help="--prune_at end: fine-tuning steps per expert.")
    parser.add_argument("--curriculum_share", type=float, default=0.5,
                        help="Most of the run the curriculum arms spend in their stages (each stage capped at share/clusters).")
    parser.add_argument("--curriculum_clusters", type=int, default=5, help="Stages of the curriculum arms.")
    parser.add_argument("--sweep_shares", type=str, default="",
                        help="Adds a curriculum arm per share × --sweep_clusters value, named curriculum_s<percent>_c<clusters>.")
    parser.add_argument("--sweep_clusters", type=str, default="5", help="Stage counts of the --sweep_shares arms.")
    parser.add_argument("--prune_distill_weight", type=float, default=None,
                        help="tdc_pruned: prune_experts.py --distill_weight (output distillation from each unpruned expert; "
                             "default 0 with --prune_at branch, where it measured worse, 1 with --prune_at end).")
    parser.add_argument("--target_fid", type=float, default=None,
                        help="FID for 'steps to reach'; default: the uniform arm's mean final FID.")
    parser.add_argument("--inception_weights", type=str, default=None,
                        help="Local FID Inception weights: also report real-Inception FID at the last step.")
    parser.add_argument("--step_costs", type=str, default=None,
                        help="overhead.py's JSON: per-arm seconds per step, for the equal-wall-clock column.")
    parser.add_argument("--wall_clock_tolerance", type=float, default=WALL_CLOCK_TOLERANCE,
                        help="An arm counts as within uniform's wall-clock up to this fraction over it: the timing noise "
                             "floor (e.g. how far arms doing the same work differ in overhead.py --arms).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default for each worker: the CPU cores / --workers, so workers do not oversubscribe the cores).")
    parser.add_argument("--workers", type=int, default=1, help="(seed, arm) jobs trained at once, one process each.")
    parser.add_argument("--job", type=str, default=None, help=argparse.SUPPRESS)  # "seed:arm,arm" (a worker's share)
    parser.add_argument("--checkpointing_steps", type=int, default=None,
                        help="Checkpoint each arm every N steps (a multiple of --eval_every): a stopped run's half-done arms "
                             "resume from their last checkpoint instead of restarting (long runs, short GPU sessions).")
    parser.add_argument("--class_conditional", action="store_true",
                        help="Train with train_class_conditional.py and also report the classifier's agreement with the requested class.")
    parser.add_argument("--quick", action="store_true", help="Tiny settings that finish in minutes (CI).")
    parser.add_argument("--summarize_only", action="store_true",
                        help="Train nothing: write the table and plot from results.jsonl (e.g. one brought back from a GPU run).")
    protocol = parser.parse_known_args(argv)[0].protocol
    if protocol is not None:
        parser.set_defaults(**PROTOCOLS[protocol])
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        args.sweep_shares = [float(v) for v in args.sweep_shares.split(",") if v]
        args.sweep_clusters = [int(v) for v in args.sweep_clusters.split(",") if v]
    except ValueError as e:
        parser.error(f"--sweep_shares/--sweep_clusters: {e}")
    for share in [args.curriculum_share, *args.sweep_shares]:
        if not 0 < share <= 1:
            parser.error(f"--curriculum_share/--sweep_shares must be in (0, 1], got {share}")
    if any(c < 1 for c in args.sweep_clusters):
        parser.error(f"--sweep_clusters must be at least 1, got {args.sweep_clusters}")
    if args.curriculum_clusters < 1:
        parser.error(f"--curriculum_clusters must be at least 1, got {args.curriculum_clusters}")
    if args.quick:
        args.seeds, args.max_train_steps, args.eval_every = "0", 8, 4
        args.num_fid_images, args.num_inference_steps, args.prune_finetune_steps = 32, 2, 2
        args.regimes = args.regimes or ("uniform,p2,tdc" if args.class_conditional else "uniform,loss_aware,tdc,tdc_pruned")
    if not 0 <= args.wall_clock_tolerance < 1:
        parser.error(f"--wall_clock_tolerance must be in [0, 1), got {args.wall_clock_tolerance}")
    if args.checkpointing_steps is not None and (args.checkpointing_steps < 1 or args.checkpointing_steps % args.eval_every):
        parser.error(f"--checkpointing_steps must be a positive multiple of --eval_every {args.eval_every}, got {args.checkpointing_steps}")
    if args.prune_distill_weight is None:
        args.prune_distill_weight = 0.0 if args.prune_at == "branch" else 1.0
    if args.prune_at == "branch" and args.max_train_steps < 4:
        parser.error(f"--prune_at branch prunes one step past TDC's branch (--max_train_steps / 2) and fine-tunes for the "
                     f"steps left: --max_train_steps must be at least 4, got {args.max_train_steps}")
    if args.prune_at == "branch" and args.train_batch_size % TDC_EXPERTS:
        parser.error(f"--prune_at branch fine-tunes each of the {TDC_EXPERTS} pruned experts at a quarter of the batch: "
                     f"--train_batch_size must be a multiple of {TDC_EXPERTS}, got {args.train_batch_size}")
    if args.class_conditional and "tdc_pruned" in (args.regimes or "").split(","):
        parser.error("--class_conditional: the tdc_pruned arm cannot run (prune_experts.py prunes unconditional experts only); "
                     "leave it out of --regimes")
    return args


def run_dir(args, arm, seed):
    return Path(args.output_dir) / "runs" / f"{arm}-seed{seed}"


def resume_point(args, arm, seed, rows):
    """Where a half-done ``arm`` continues: ``(checkpoint, row)``, its newest checkpoint whose step has an evaluated
    ``row`` in ``rows`` (the evaluation runs just before the checkpoint, so a stop between the two leaves a row
    without its checkpoint), or None (restart) without ``--checkpointing_steps`` or such a checkpoint."""
    from diffusers_curriculum.checkpointing import checkpoint_step, list_checkpoints

    if args.checkpointing_steps is None:
        return None
    evaluated = {r["step"]: r for r in rows if r["arm"] == arm and r["seed"] == seed}
    usable = [(path, evaluated[checkpoint_step(path)]) for path in list_checkpoints(run_dir(args, arm, seed))
              if checkpoint_step(path) in evaluated]
    return usable[-1] if usable else None


def run_arm(args, arm, flags, seed, real, extractor, record, resume=None):
    """Trains ``arm`` (or continues it from ``resume``, a :func:`resume_point`), recording an evaluation every
    ``--eval_every`` steps."""
    from diffusers_curriculum.metrics import class_agreement, feature_fid, inception_fid

    out = run_dir(args, arm, seed)
    started = time.perf_counter() - (resume[1]["train_seconds"] if resume else 0.0)  # the training time before the stop
    eval_seconds = 0.0  # evaluation time is not training time
    flops = None  # counted once: training does not change the model's shape

    def evaluate(step, pipeline):
        nonlocal eval_seconds, flops
        begin = time.perf_counter()
        fake = fid_images(pipeline, args.num_fid_images, args.num_inference_steps, seed)
        flops = flops or sampling_flops(pipeline, args.num_inference_steps)
        row = {"arm": arm, "seed": seed, "step": step, "train_seconds": round(begin - started - eval_seconds, 1),
               "fid": feature_fid(real, fake, extractor), "flops_per_sample": flops}
        requested = requested_classes(pipeline, args.num_fid_images)
        if requested is not None:
            agreement = class_agreement(extractor, fake, requested)
            row["class_agreement"], row["class_agreement_per_class"] = agreement["mean"], agreement["per_class"]
        if args.inception_weights and step == args.max_train_steps:
            row["inception_fid"] = inception_fid(real, fake, args.inception_weights)
        record(row)
        eval_seconds += time.perf_counter() - begin

    train = load_script("train_class_conditional" if args.class_conditional else "train_unconditional")
    train.main(train.parse_args([*training_argv(args, out, seed, args.max_train_steps), *flags,
                                 *(["--resume_from_checkpoint", str(resume[0])] if resume else [])]), evaluate=evaluate)
    return out


def training_argv(args, out, seed, steps):
    """The training script's flags every arm shares (the regime's own flags go after them)."""
    return [
        "--output_dir", str(out), "--overwrite_output_dir", "--resolution", "32", "--block_out_channels", args.block_out_channels,
        "--train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
        "--use_ema", "--ema_max_decay", "0.999", "--validation_steps", str(args.eval_every), "--eval_batch_size", "4",
        "--ddpm_num_inference_steps", "2", "--checkpointing_steps", str(args.checkpointing_steps or 10 ** 9),
        "--checkpoints_total_limit", "1", "--report_to", "none", "--seed", str(seed), "--no_validation",
    ]


def prune_arm(args, seed, real, extractor, record):
    """The ``tdc_pruned`` row of ``seed`` (see ``--prune_at``). ``train_seconds`` counts the TDC training the
    pruning starts from, the pruning search and the fine-tuning."""
    from diffusers import DiffusionPipeline

    from diffusers_curriculum.metrics import feature_fid

    out = run_dir(args, "tdc_pruned", seed)
    tdc_flags = arms(args.max_train_steps)["tdc"]
    started = time.perf_counter()
    if args.prune_at == "branch":
        # one stage-2 step after the branch (the script wants one), then the rest of the run's samples per expert:
        # a stage-2 step gives each of the k experts B/k samples, so F steps of B/k samples replace F steps
        base = args.max_train_steps // 2
        source, finetune_steps, batch_size = run_dir(args, "tdc_branch", seed), args.max_train_steps - base - 1, args.train_batch_size // TDC_EXPERTS
        train = load_script("train_unconditional")
        train.main(train.parse_args([*training_argv(args, source, seed, base + 1), *tdc_flags]))
        recipe = ["--prune_at", "branch", "--total_train_steps", str(args.max_train_steps)]  # the run's lr, EMA 0.999
    else:
        source, finetune_steps, batch_size = run_dir(args, "tdc", seed), args.prune_finetune_steps, args.train_batch_size
        if not (source / "model_index.json").exists():
            train = load_script("train_unconditional")
            train.main(train.parse_args([*training_argv(args, source, seed, args.max_train_steps), *tdc_flags]))
        recipe = ["--finetune_steps", str(finetune_steps), "--learning_rate", str(args.learning_rate / 4)]
    prune_experts(source, out, seed, args.prune_ratio, finetune_steps, batch_size, distill_weight=args.prune_distill_weight,
                  num_inference_steps=args.num_inference_steps, recipe=recipe)
    seconds = round(time.perf_counter() - started, 1)
    pipeline = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    fake = fid_images(pipeline, args.num_fid_images, args.num_inference_steps, seed)
    record({"arm": "tdc_pruned", "seed": seed, "step": args.max_train_steps, "train_seconds": seconds,
            "fid": feature_fid(real, fake, extractor), "flops_per_sample": sampling_flops(pipeline, args.num_inference_steps),
            "prune_at": args.prune_at, "finetune_steps_per_expert": finetune_steps, "finetune_batch_size": batch_size,
            "extra_finetune_steps_per_expert": 0 if args.prune_at == "branch" else finetune_steps})


def load_step_costs(path):
    """Per-arm seconds per training step: the rows of ``benchmarks/overhead.py``'s JSON that name an ``arm``."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: --step_costs {path}: not benchmarks/overhead.py output ({type(e).__name__}: {e})")
    costs = {r["arm"]: r["median_s"] for r in rows if "arm" in r}
    if "uniform" not in costs and "flow_uniform" not in costs:
        sys.exit(f"error: --step_costs {path} times no 'uniform' arm (nor 'flow_uniform'); rerun benchmarks/overhead.py --arms")
    return costs


# The overhead.py row timing the stage-2 step of each TDC arm.
STAGE2_COSTS = {"tdc": "tdc_stage2", "tdc_round_robin": "tdc_round_robin_stage2", "flow_tdc": "flow_tdc_stage2"}


def modelled_seconds(arm, step, costs, args):
    """Training time of ``arm`` after ``step`` steps at the measured per-step costs; None when the arm was not
    timed. TDC arms (``tdc``, ``tdc+p2``, ``tdc_round_robin``) pay their own measured step in the base stage and
    their stage-2 step after it (:data:`STAGE2_COSTS`; ``overhead.py`` times stage 2 for plain TDC only; a
    weighting adds nothing measurable to it)."""
    if arm not in costs:
        return None
    tdc = next((part for part in arm.split("+") if part in STAGE2_COSTS), None)
    if tdc is None:
        return costs[arm] * step
    if STAGE2_COSTS[tdc] not in costs:
        return None
    base = args.max_train_steps // 2
    return costs[arm] * min(step, base) + costs[STAGE2_COSTS[tdc]] * max(0, step - base)


# Runs within 2 % of their seed's uniform time count as within it: identical steps timed side by side differ by
# about 1.5 % (overhead.py's two plain variants), and a run that much slower should not lose a whole evaluation.
WALL_CLOCK_TOLERANCE = 0.02


def reference_arm(arm):
    """The uniform arm ``arm`` is measured against: ``flow_uniform`` for a rectified-flow arm, ``uniform`` otherwise."""
    return "flow_uniform" if arm.startswith("flow_") else "uniform"


def summarize(rows, args, costs=None):
    """Table rows: per arm, FID mean ± std at each evaluated step, steps to reach the target, FLOPs, and the
    FID at its uniform arm's wall-clock budget (:func:`reference_arm`: each noise process has its own): per seed,
    the last evaluation within the training time of that seed's uniform run (+ ``--wall_clock_tolerance``), on the
    jobs' own clocks or, with per-step ``costs``, on modelled clocks. Returns the table and ``{reference: target
    FID}``: ``--target_fid``, else the reference arm's mean final FID (None where it has no final rows)."""
    by_arm = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    final = args.max_train_steps

    def seconds(row):
        return modelled_seconds(row["arm"], row["step"], costs, args) if costs else row["train_seconds"]

    finals = {ref: [r for r in by_arm.get(ref, []) if r["step"] == final] for ref in map(reference_arm, by_arm)}
    targets = {ref: args.target_fid if args.target_fid is not None else statistics.mean(r["fid"] for r in done) if done else None
               for ref, done in finals.items()}
    # Each seed's budget is its own uniform run's time: jobs of one seed run side by side (see plan), so on
    # shared machines they saw the same load.
    budgets = {ref: {r["seed"]: seconds(r) for r in done} for ref, done in finals.items()}
    table = []
    for arm, arm_rows in by_arm.items():
        target, budget = targets[reference_arm(arm)], budgets[reference_arm(arm)]
        steps = sorted({r["step"] for r in arm_rows})
        last = [r for r in arm_rows if r["step"] == steps[-1]]  # each seed's last evaluation
        # FLOPs: the mean over seeds (pruned experts' FLOPs differ by seed)
        entry = {"arm": arm, "reference": reference_arm(arm), "flops_per_sample": statistics.mean(r["flops_per_sample"] for r in last), "fid": {}}
        for step in steps:
            values = [r["fid"] for r in arm_rows if r["step"] == step]
            entry["fid"][step] = (*mean_std(values), len(values))
        seeds = sorted({r["seed"] for r in arm_rows})
        reach = []
        for seed in seeds:
            hits = [r["step"] for r in sorted(arm_rows, key=lambda r: r["step"]) if r["seed"] == seed and target is not None and r["fid"] <= target]
            reach.append(hits[0] if hits else math.inf)
        entry["steps_to_target"] = statistics.median(reach) if reach else math.inf
        agreeing = [r for r in last if "class_agreement" in r]
        if agreeing:  # class-conditional: how often the classifier sees the requested class, at the last evaluation
            entry["class_agreement"] = mean_std([r["class_agreement"] for r in agreeing])
            entry["class_agreement_per_class"] = [statistics.mean(shares) if None not in shares else None
                                                  for shares in zip(*(r["class_agreement_per_class"] for r in agreeing))]
        timed = [r for r in arm_rows if r["step"] == final and arm != "tdc_pruned"]
        entry["seconds_per_step"] = statistics.mean(r["train_seconds"] / r["step"] for r in timed) if timed else None
        entry["equal_wall_clock"] = None  # (median step reached within the budget, FID mean, FID std)
        if arm != "tdc_pruned" and set(seeds) <= set(budget) and all(seconds(r) is not None for r in arm_rows):
            within = [max((r for r in arm_rows if r["seed"] == seed and seconds(r) <= budget[seed] * (1 + args.wall_clock_tolerance)),
                          key=lambda r: r["step"], default=None) for seed in seeds]
            if None not in within:
                entry["equal_wall_clock"] = (statistics.median(r["step"] for r in within), *mean_std([r["fid"] for r in within]))
        table.append(entry)
    order = list(arms(final))
    table.sort(key=lambda e: order.index(e["arm"]) if e["arm"] in order else len(order))
    return table, targets


def print_table(table, targets, args):
    steps = sorted({s for e in table for s in e["fid"]})
    wall = any(e["equal_wall_clock"] for e in table)
    shared = f"; s / step from each job's clock while {args.workers} jobs shared the machine" if args.workers > 1 else ""
    clock = ("modelled from --step_costs" if args.step_costs else "the jobs' own clocks") + f", +{args.wall_clock_tolerance:.0%} tolerance"
    agreement = any("class_agreement" in e for e in table)
    target = ", ".join(f"{ref}: {t if t is None else round(t, 2)}" for ref, t in targets.items())
    lines = [f"feature-FID (mean ± std over seeds {args.seeds}; lower is better); target FID ({'--target_fid' if args.target_fid is not None else 'the mean final FID'} of each arm's uniform arm) {target}{shared}",
             "| arm | " + " | ".join(f"FID @ {s}" for s in steps) + " | steps to target | GFLOPs / image | s / step |"
             + (f" FID @ its uniform arm's wall-clock, {clock} (step) |" if wall else "") + (" class agreement (mean) |" if agreement else ""),
             "| --- | " + " | ".join("---" for _ in steps) + " | --- | --- | --- |" + (" --- |" if wall else "") + (" --- |" if agreement else "")]
    for e in table:
        cells = [f"{e['fid'][s][0]:.1f} ± {e['fid'][s][1]:.1f}" if s in e["fid"] else "" for s in steps]
        spt = "" if e["seconds_per_step"] is None else f"{e['seconds_per_step']:.3f}"
        line = f"| {e['arm']} | " + " | ".join(cells) + f" | {e['steps_to_target']} | {e['flops_per_sample'] / 1e9:.2f} | {spt} |"
        if wall:
            w = e["equal_wall_clock"]
            line += f" {w[1]:.1f} ± {w[2]:.1f} ({w[0]:g}) |" if w else " |"
        if agreement:
            a = e.get("class_agreement")
            line += f" {a[0]:.3f} ± {a[1]:.3f} |" if a else " |"
        lines.append(line)
    if agreement:
        classes = max(len(e.get("class_agreement_per_class", [])) for e in table)
        lines += ["", "Share of the images requested as class c that the classifier assigns to c (last evaluation, mean over seeds)",
                  "| arm | " + " | ".join(str(c) for c in range(classes)) + " |", "| --- |" + " --- |" * classes]
        for e in table:
            if "class_agreement_per_class" in e:
                lines.append(f"| {e['arm']} | " + " | ".join("" if v is None else f"{v:.2f}" for v in e["class_agreement_per_class"]) + " |")
    return "\n".join(lines)


def plot(table, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20))[: max(len(table), 1)])
    for entry in table:
        arm = entry["arm"]
        steps = sorted(entry["fid"])
        means = np.array([entry["fid"][s][0] for s in steps])
        stds = np.array([entry["fid"][s][1] for s in steps])
        marker = "*" if arm == "tdc_pruned" else "o"
        ax1.plot(steps, means, marker=marker, label=arm)
        ax1.fill_between(steps, means - stds, means + stds, alpha=0.15)
    ax1.set(xlabel="optimizer steps", ylabel="feature-FID (EMA)", title="FID vs steps (mean ± std)", yscale="log")
    ax1.legend(fontsize=7)
    timed = [e for e in table if e["seconds_per_step"] is not None]
    ax2.barh([e["arm"] for e in timed], [e["seconds_per_step"] for e in timed])
    shared = f", {args.workers} jobs sharing the machine" if args.workers > 1 else ""
    ax2.set(xlabel=f"seconds per training step (each job's own clock{shared})", title="step time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Flags that do not change the results (a resumed arm continues exactly where it stopped)
# Settings added since results were first written, with the value every run before them had.
SETTINGS_ADDED = {"prune_at": "end"}
SETTINGS_IGNORED = ("protocol", "threads", "output_dir", "inception_weights", "step_costs", "workers", "job", "summarize_only",
                    "checkpointing_steps", "wall_clock_tolerance")


def plan(chosen, seeds, done):
    """The jobs still to run, as ``(seed, arms)``; ``tdc_pruned`` joins its seed's ``tdc`` job (with ``--prune_at
    end`` it prunes that run)."""
    jobs = []
    for seed in seeds:
        todo = [arm for arm in chosen if (arm, seed) not in done]
        for arm in todo:
            if arm == "tdc_pruned" and "tdc" in todo:
                continue
            jobs.append((seed, [arm, "tdc_pruned"] if arm == "tdc" and "tdc_pruned" in todo else [arm]))
    # The longest jobs first, then seed by seed: parallel workers run one seed's arms side by side.
    return sorted(jobs, key=lambda job: not any(arm.startswith(("tdc", "flow_tdc")) for arm in job[1]))


def same_settings(saved, current, chosen):
    """Whether results written under the ``saved`` settings are what the ``current`` ones ask for: a setting added
    since counts at the value every run before it had (:data:`SETTINGS_ADDED`), the pruning settings count only
    when ``tdc_pruned`` is among the ``chosen`` arms, and ``--regimes`` / ``--seeds`` not at all (more arms or seeds
    may join a results folder)."""
    saved = {**SETTINGS_ADDED, **saved}
    # which arms and seeds a call trains is not a setting of the rows (each names its arm and seed): a later call may add some
    saved, current = ({k: v for k, v in d.items() if k not in ("regimes", "seeds")} for d in (saved, current))
    if "tdc_pruned" not in chosen:
        saved, current = ({k: v for k, v in d.items() if not k.startswith("prune_")} for d in (saved, current))
    return saved == current


def appender(results):
    """``record(row)``: appends one JSON line to ``results`` (locked: worker processes share the file)."""

    def record(row):
        with results.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(row) + "\n")
        print(f"{row['arm']:>14} seed {row['seed']} step {row['step']:>5}: FID {row['fid']:.2f}", flush=True)

    return record


def run_job(args, seed, job_arms, record, rows=()):
    """Trains one seed's ``job_arms``; an arm with rows in ``rows`` (the results so far) continues from its
    :func:`resume_point`."""
    from diffusers_curriculum.metrics import fashion_feature_extractor

    extractor, real, all_arms = fashion_feature_extractor(), real_images(args), arms_of(args)
    for arm in job_arms:
        if arm == "tdc_pruned":
            prune_arm(args, seed, real, extractor, record)
        else:
            run_arm(args, arm, all_arms[arm], seed, real, extractor, record, resume_point(args, arm, seed, rows))


def run_workers(args, jobs, argv, output):
    """Runs ``jobs`` ``args.workers`` at a time, each as ``compare_regimes.py <argv> --job seed:arms`` with its
    log in ``output/logs``; returns the names of the jobs that failed."""
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    pending, running, failed = list(jobs), [], []
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit("compare_regimes: terminated; stopping the workers"))
    try:
        _dispatch(args, argv, logs, pending, running, failed)
    finally:  # stopped early: no worker outlives the run (rows so far stay in results.jsonl; half-done jobs restart)
        for _, process, log in running:
            process.kill()
            process.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    return failed


def _dispatch(args, argv, logs, pending, running, failed):
    while pending or running:
        while pending and len(running) < args.workers:
            seed, job_arms = pending.pop(0)
            name = f"{'+'.join(job_arms)}-seed{seed}"
            log = (logs / f"{name}.log").open("w")
            threads = [] if args.threads else ["--threads", str(max(1, (os.cpu_count() or 1) // args.workers))]
            command = [sys.executable, str(Path(__file__).resolve()), *argv, *threads, "--job", f"{seed}:{','.join(job_arms)}"]
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for item in list(running):
            name, process, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            if process.returncode:
                failed.append(name)
            print(f"job {name}: {'FAILED, see ' + str(logs / (name + '.log')) if process.returncode else 'done'}", flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inception_weights and not Path(args.inception_weights).is_file():
        sys.exit(f"error: --inception_weights {args.inception_weights} does not exist (nothing is downloaded)")
    costs = load_step_costs(args.step_costs) if args.step_costs else None
    output = Path(args.output_dir)
    results = output / "results.jsonl"
    if args.job:  # a worker: train its share, append the rows, leave the table to the parent
        seed, job_arms = args.job.split(":")
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        run_job(args, int(seed), job_arms.split(","), appender(results), rows)
        return None

    from diffusers_curriculum.metrics import fashion_feature_extractor

    output.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in SETTINGS_IGNORED}
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    settings_file = output / "settings.json"
    chosen = chosen_arms(args)
    if rows and not same_settings(json.loads(settings_file.read_text()), settings, chosen):
        sys.exit(f"error: {results} holds results of other settings; use another --output_dir")
    settings_file.write_text(json.dumps(settings, indent=2))

    done = {(r["arm"], r["seed"]) for r in rows if r["step"] == args.max_train_steps}
    jobs = plan(chosen, [int(s) for s in args.seeds.split(",")], done)
    unfinished = sorted({(arm, seed) for seed, job_arms in jobs for arm in job_arms})
    # a half-done arm keeps its rows up to the checkpoint it continues from (without one it restarts: -1)
    resumed_step = {key: (point[1]["step"] if (point := resume_point(args, *key, rows)) else -1) for key in unfinished}
    failed = []
    if args.summarize_only:
        print(f"--summarize_only: {len(unfinished)} unfinished (arm, seed) runs count up to the step they reached: {unfinished}")
    else:
        rows = [r for r in rows if r["step"] <= resumed_step.get((r["arm"], r["seed"]), math.inf)]
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
        fashion_feature_extractor()  # trained and cached once, before any worker needs it
        if args.workers == 1:
            for seed, job_arms in jobs:
                run_job(args, seed, job_arms, appender(results), rows)
        else:
            failed = run_workers(args, jobs, argv, output)

    rows = [r for r in map(json.loads, results.read_text().splitlines()) if r["arm"] in chosen]
    table, targets = summarize(rows, args, costs)
    text = print_table(table, targets, args)
    print(text)
    verb = "Table written" if args.summarize_only else "Run"
    (output / "table.md").write_text(f"{text}\n\n{verb} {date.today().isoformat()}: python benchmarks/compare_regimes.py {' '.join(argv)}\n")
    (output / "summary.json").write_text(json.dumps({"settings": settings, "target_fid": targets, "table": table}, indent=2, default=str))
    plot(table, args, output / "fid_vs_steps.png")
    if failed:
        sys.exit(f"error: {len(failed)} jobs failed ({', '.join(failed)}); their logs are in {output / 'logs'}")
    return table


if __name__ == "__main__":
    main()
