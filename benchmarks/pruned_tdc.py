"""Pruned TDC against unpruned TDC at the same total training steps, feature-FID over several seeds.

Per seed: train TDC (4 experts, base stage ``--tdc_base_steps``, default half the steps) for ``--max_train_steps``
N; prune its pipeline with ``train_scripts/prune_experts.py`` once per ``--distill_weights`` value
(``--finetune_steps`` F per expert, at ``--finetune_batch_size`` b); then continue the same TDC run to N + 4·F·b/B
steps (B the training batch), so the unpruned model gets as many training samples per expert as the pruned experts
got in fine-tuning (a stage-2 step trains each of the 4 experts on a quarter of the batch); that reference is
trained before the pruning, so a run cut short still holds what the pruned rows are judged by. Every
model is scored with the feature-FID of ``compare_regimes.py`` (same images, sampler and extractor) and its
sampling FLOPs. Rows go to ``results.jsonl`` as they come (a rerun skips what is there); ``summary.json`` holds
mean ± std per model and the verdict of the target: at least 20 % fewer FLOPs at an FID no worse than the
unpruned model's mean by more than its seed spread (std).

    python benchmarks/pruned_tdc.py --output_dir benchmarks/results/pruned_tdc
    # prune 4 steps after the branch point and spend stage 2 on the pruned experts at stage 2's per-expert batch:
    # TDC 500 + 900 steps vs 504 + 4 x 896 steps of 8 samples (the run in benchmarks/RESULTS.md that met the target)
    python benchmarks/pruned_tdc.py --max_train_steps 504 --tdc_base_steps 500 --finetune_steps 896 \
        --finetune_batch_size 8 --prune_learning_rate 2e-3 --prune_ema --distill_weights 0 \
        --output_dir benchmarks/results/pruned_tdc_at_branch
"""

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from harness import fid_images, load_script, prune_experts, real_images, sampling_flops

NUM_EXPERTS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=str, default="benchmarks/results/pruned_tdc")
    parser.add_argument("--seeds", type=str, default="0,1,2")
    parser.add_argument("--max_train_steps", type=int, default=300, help="N: TDC steps before pruning.")
    parser.add_argument("--tdc_base_steps", type=int, default=None,
                        help="The TDC run's base stage (default N/2), below N (the training script wants a stage 2). Just "
                             "below N prunes right after the branch point: the experts are still nearly copies of the "
                             "base, and the pruned experts get in fine-tuning as many samples of their groups as the "
                             "unpruned ones get in the reference's stage 2.")
    parser.add_argument("--finetune_steps", type=int, default=50, help="F: fine-tuning steps per pruned expert.")
    parser.add_argument("--distill_weights", type=str, default="0,1", help="One pruned model per weight.")
    parser.add_argument("--prune_ratio", type=float, default=0.5)
    parser.add_argument("--prune_learning_rate", type=float, default=None,
                        help="Learning rate of the pruned experts' fine-tuning (default: --learning_rate / 4).")
    parser.add_argument("--max_loss_increase", type=str, default="0.1")
    parser.add_argument("--prune_ema", action="store_true", help="prune_experts.py --use_ema --ema_max_decay 0.999.")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--finetune_batch_size", type=int, default=None,
                        help="Batch of the pruned experts' fine-tuning (default --train_batch_size). A quarter of it gives "
                             "each pruned expert as many updates of as many samples as a stage-2 step gives each unpruned "
                             "one; F steps then count as F/4 training steps per expert.")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--block_out_channels", type=str, default="16,32,32")
    parser.add_argument("--num_fid_images", type=int, default=500)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.set_defaults(quick=False)  # compare_regimes.real_images reads it
    args = parser.parse_args(argv)
    args.prune_learning_rate = args.prune_learning_rate or args.learning_rate / 4
    if args.finetune_batch_size is not None and args.finetune_batch_size < 1:
        parser.error(f"--finetune_batch_size must be >= 1, got {args.finetune_batch_size}")
    args.finetune_batch_size = args.finetune_batch_size or args.train_batch_size
    if (args.finetune_steps * args.finetune_batch_size) % args.train_batch_size:
        parser.error(f"--finetune_steps × --finetune_batch_size ({args.finetune_steps} × {args.finetune_batch_size}) must be "
                     f"a multiple of --train_batch_size {args.train_batch_size}: the reference trains whole steps")
    args.tdc_base_steps = args.tdc_base_steps or args.max_train_steps // 2
    if not 1 <= args.tdc_base_steps < args.max_train_steps:
        parser.error(f"--tdc_base_steps must be in [1, --max_train_steps {args.max_train_steps}), got {args.tdc_base_steps}")
    return args


def train_tdc(args, out, seed, steps, resume):
    train = load_script("train_unconditional")
    train.main(train.parse_args([
        "--output_dir", str(out), "--resolution", "32", "--block_out_channels", args.block_out_channels,
        "--train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
        "--use_ema", "--ema_max_decay", "0.999", "--checkpointing_steps", str(10 ** 9), "--report_to", "none",
        "--seed", str(seed), "--no_validation", "--regime", "tdc", "--tdc_groups", str(NUM_EXPERTS),
        "--tdc_base_steps", str(args.tdc_base_steps),
        *(["--resume_from_checkpoint", "latest"] if resume else ["--overwrite_output_dir"]),
    ]))


def score(args, folder, seed, real, extractor):
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

    from diffusers_curriculum.metrics import feature_fid

    # sampled where the training and prune_experts.py run: accelerate's device
    pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).to(Accelerator().device)
    fake = fid_images(pipeline, args.num_fid_images, args.num_inference_steps, seed)
    return {"fid": feature_fid(real, fake, extractor), "flops_per_sample": sampling_flops(pipeline, args.num_inference_steps)}


def extra_steps(args) -> int:
    """The training steps the pruned experts' fine-tuning counts as: 4·F at the training batch, fewer at a smaller one."""
    return NUM_EXPERTS * args.finetune_steps * args.finetune_batch_size // args.train_batch_size


def summarize(rows, args):
    n, extra = args.max_train_steps, extra_steps(args)
    models = {}
    for row in rows:
        models.setdefault(row["model"], []).append(row)
    table = {}
    for model, group in models.items():
        fids = [r["fid"] for r in group]
        table[model] = {"seeds": len(group), "fid_mean": statistics.mean(fids),
                        "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                        "flops_per_sample": statistics.mean(r["flops_per_sample"] for r in group),
                        "steps": group[0]["steps"], "seconds": statistics.mean(r["seconds"] for r in group)}
    reference = table.get(f"tdc@{n + extra}")
    for model, entry in table.items():
        if model.startswith("pruned") and reference is not None:
            entry["flops_saved"] = 1 - entry["flops_per_sample"] / reference["flops_per_sample"]
            entry["fid_gap"] = entry["fid_mean"] - reference["fid_mean"]
            entry["goal_met"] = entry["flops_saved"] >= 0.2 and entry["fid_gap"] <= reference["fid_std"]
    return table


def main(argv=None):
    args = parse_args(argv)
    from diffusers_curriculum.metrics import fashion_feature_extractor

    out = Path(args.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["seed"], r["model"]) for r in rows}

    def record(row):
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    extractor, real = fashion_feature_extractor(), real_images(args)
    n, extra = args.max_train_steps, extra_steps(args)
    weights = [float(w) for w in args.distill_weights.split(",")]
    for seed in [int(s) for s in args.seeds.split(",")]:
        run, snapshot = out / "runs" / f"tdc-seed{seed}", out / "runs" / f"tdc@{n}-seed{seed}"
        if not (snapshot / "model_index.json").exists():
            started = time.perf_counter()
            train_tdc(args, run, seed, n, resume=False)
            shutil.copytree(run, snapshot, ignore=shutil.ignore_patterns("checkpoint-*"), dirs_exist_ok=True)
            (snapshot / "seconds").write_text(str(time.perf_counter() - started))
        base_seconds = float((snapshot / "seconds").read_text())
        if (seed, f"tdc@{n}") not in done:
            record({"seed": seed, "model": f"tdc@{n}", "steps": n, "seconds": round(base_seconds, 1), **score(args, snapshot, seed, real, extractor)})
        if (seed, f"tdc@{n + extra}") not in done:
            started = time.perf_counter()
            train_tdc(args, run, seed, n + extra, resume=True)
            record({"seed": seed, "model": f"tdc@{n + extra}", "steps": n + extra,
                    "seconds": round(base_seconds + time.perf_counter() - started, 1), **score(args, run, seed, real, extractor)})
        for weight in weights:
            # rows of the default ratio and batch keep their names
            ratio = "" if args.prune_ratio == 0.5 else f",ratio={args.prune_ratio:g}"
            batch = "" if args.finetune_batch_size == args.train_batch_size else f",batch={args.finetune_batch_size}"
            label = f"distill={weight:g},lr={args.prune_learning_rate:g}{',ema' if args.prune_ema else ''}{ratio}{batch}"
            name = f"pruned({label})"
            if (seed, name) not in done:
                started = time.perf_counter()
                target = out / "runs" / f"pruned-{label.replace(',', '-').replace('=', '')}-seed{seed}"
                recipe = ["--finetune_steps", str(args.finetune_steps), "--learning_rate", str(args.prune_learning_rate),
                          *(["--use_ema", "--ema_max_decay", "0.999"] if args.prune_ema else [])]
                prune_experts(snapshot, target, seed, args.prune_ratio, args.finetune_steps, args.finetune_batch_size, weight,
                              args.num_inference_steps, recipe, args.max_loss_increase)
                seconds = base_seconds + time.perf_counter() - started
                report = json.loads((target / "pruning_report.json").read_text())
                record({"seed": seed, "model": name, "steps": n + extra, "seconds": round(seconds, 1),
                        "kept_unpruned": [e["kept_unpruned"] for e in report["search"]],
                        "expert_flops_fraction": [round(e["flops"] / e["flops_before"], 3) for e in report["search"]],
                        **score(args, target, seed, real, extractor)})
    table = summarize(rows, args)
    (out / "settings.json").write_text(json.dumps(vars(args), indent=2))
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    width = max([30, *map(len, table)])
    print(f"{'model':{width}s} {'FID mean ± std':>18s} {'MFLOPs/sample':>14s} {'FLOPs saved':>12s} {'goal':>5s}")
    for model, e in table.items():
        saved = f"{e['flops_saved']:.1%}" if "flops_saved" in e else ""
        goal = {True: "met", False: "no"}.get(e.get("goal_met"), "")
        print(f"{model:{width}s} {e['fid_mean']:9.1f} ± {e['fid_std']:6.1f} {e['flops_per_sample'] / 1e6:14.1f} {saved:>12s} {goal:>5s}")
    return table


if __name__ == "__main__":
    main()
