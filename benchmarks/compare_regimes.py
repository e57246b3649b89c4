"""Regimes side by side on real Fashion-MNIST: feature-FID of EMA weights at several steps, several seeds.

Every arm trains the same tiny UNet with ``train_scripts/train_unconditional.py`` (same data, batch,
optimizer, steps); only the regime flags differ. Every ``--eval_every`` steps the EMA pipeline generates
``--num_fid_images`` images (DDIM, ``--num_inference_steps``) whose feature-FID against held-out test
images is recorded with the wall-clock time. ``tdc_pruned`` prunes the finished ``tdc`` run's experts
(``train_scripts/prune_experts.py``; its extra fine-tuning steps are reported). Results are appended to
``results.jsonl`` as they come, so an interrupted run continues where it stopped; then a table
(mean ± std over seeds, steps to reach ``--target_fid``) and plots are written.

    python benchmarks/compare_regimes.py --output_dir benchmarks/results/compare      # the README run
    python benchmarks/compare_regimes.py --quick --output_dir /tmp/compare-quick     # minutes, for CI
"""

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "train_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arms(total_steps):
    """Regime flags per arm, for a run of ``total_steps`` optimizer steps."""
    return {
        "uniform": [],
        "min_snr": ["--snr_gamma", "5"],
        "p2": ["--weighting", "p2"],
        "logit_normal": ["--timestep_sampling", "logit_normal"],
        "speed": ["--timestep_sampling", "speed"],
        "loss_aware": ["--timestep_sampling", "loss_aware"],
        "timestep_bias": ["--timestep_sampling", "timestep_bias", "--timestep_bias_strategy", "earlier"],
        # 5 stages, each at most a tenth of the run: the curriculum takes at most half the budget
        "curriculum": ["--regime", "curriculum", "--curriculum_clusters", "5", "--curriculum_check_every",
                       str(max(1, total_steps // 50)), "--curriculum_max_stage_steps", str(max(1, total_steps // 10))],
        "ant_uw": ["--regime", "ant", "--ant_method", "uw"],
        "tdc": ["--regime", "tdc", "--tdc_groups", "4", "--tdc_base_steps", str(total_steps // 2)],
        "tdc_pruned": None,  # prunes the tdc run
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=str, default="benchmarks/results/compare")
    parser.add_argument("--regimes", type=str, default=None, help="Comma-separated arms (default: all).")
    parser.add_argument("--seeds", type=str, default="0,1,2")
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--eval_every", type=int, default=200)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--block_out_channels", type=str, default="16,32,32")
    parser.add_argument("--num_fid_images", type=int, default=500)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--prune_ratio", type=float, default=0.5)
    parser.add_argument("--prune_finetune_steps", type=int, default=50)
    parser.add_argument("--target_fid", type=float, default=None,
                        help="FID for 'steps to reach'; default: the uniform arm's mean final FID.")
    parser.add_argument("--inception_weights", type=str, default=None,
                        help="Local FID Inception weights: also report real-Inception FID at the last step.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads.")
    parser.add_argument("--quick", action="store_true", help="Tiny settings that finish in minutes (CI).")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.max_train_steps, args.eval_every = "0", 8, 4
        args.num_fid_images, args.num_inference_steps, args.prune_finetune_steps = 32, 2, 2
        args.regimes = args.regimes or "uniform,loss_aware,tdc,tdc_pruned"
    return args


def fid_images(pipeline, n, steps, seed):
    """``n`` generated images in [0, 1], (n, C, H, W), sampled with DDIM."""
    from diffusers import DDIMScheduler, DDPMPipeline

    ddim = DDPMPipeline(unet=pipeline.unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for start in range(0, n, 250):
        images = ddim(batch_size=min(250, n - start), generator=generator, num_inference_steps=steps, output_type="np").images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
    return torch.cat(out)


def sampling_flops(pipeline, steps):
    from diffusers_curriculum.experts import TimestepRoutedExperts
    from diffusers_curriculum.pruning import count_flops, flops_report

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    if isinstance(pipeline.unet, TimestepRoutedExperts):
        return flops_report(pipeline.unet, scheduler.timesteps.tolist())["flops_per_sample"]
    return count_flops(pipeline.unet) * steps


def run_arm(args, arm, flags, seed, real, extractor, record):
    from diffusers_curriculum.metrics import feature_fid, inception_fid

    out = Path(args.output_dir) / "runs" / f"{arm}-seed{seed}"
    started = time.perf_counter()
    eval_seconds = [0.0]  # evaluation time is not training time

    def evaluate(step, pipeline):
        begin = time.perf_counter()
        fake = fid_images(pipeline, args.num_fid_images, args.num_inference_steps, seed)
        row = {"arm": arm, "seed": seed, "step": step, "train_seconds": round(begin - started - eval_seconds[0], 1),
               "fid": feature_fid(real, fake, extractor), "flops_per_sample": sampling_flops(pipeline, args.num_inference_steps)}
        if args.inception_weights and step == args.max_train_steps:
            row["inception_fid"] = inception_fid(real, fake, args.inception_weights)
        record(row)
        eval_seconds[0] += time.perf_counter() - begin

    train = load_script("train_unconditional")
    train_args = train.parse_args([
        "--output_dir", str(out), "--overwrite_output_dir", "--resolution", "32", "--block_out_channels", args.block_out_channels,
        "--train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(args.max_train_steps),
        "--use_ema", "--ema_max_decay", "0.999", "--validation_steps", str(args.eval_every), "--eval_batch_size", "4",
        "--ddpm_num_inference_steps", "2", "--checkpointing_steps", str(10 ** 9), "--report_to", "none",
        "--seed", str(seed), "--no_validation", *flags,
    ])
    train.main(train_args, evaluate=evaluate)
    return out


def prune_arm(args, tdc_dir, seed, real, extractor, record):
    from diffusers import DDPMPipeline

    from diffusers_curriculum.metrics import feature_fid

    prune = load_script("prune_experts")
    out = Path(args.output_dir) / "runs" / f"tdc_pruned-seed{seed}"
    started = time.perf_counter()
    prune.main(prune.parse_args([
        "--pretrained_model_name_or_path", str(tdc_dir), "--output_dir", str(out), "--overwrite_output_dir",
        "--prune_ratio", str(args.prune_ratio), "--search_rounds", "3", "--proxy_steps", str(max(1, args.prune_finetune_steps // 5)),
        "--finetune_steps", str(args.prune_finetune_steps), "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", str(args.learning_rate / 4), "--num_inference_steps", str(args.num_inference_steps),
        "--validation_size", "64", "--seed", str(seed),
    ]))
    pipeline = DDPMPipeline.from_pretrained(out)
    fake = fid_images(pipeline, args.num_fid_images, args.num_inference_steps, seed)
    record({"arm": "tdc_pruned", "seed": seed, "step": args.max_train_steps, "train_seconds": round(time.perf_counter() - started, 1),
            "fid": feature_fid(real, fake, extractor), "flops_per_sample": sampling_flops(pipeline, args.num_inference_steps),
            "extra_finetune_steps_per_expert": args.prune_finetune_steps})


def summarize(rows, args):
    """Table rows: per arm, FID mean ± std at each evaluated step, steps to reach the target, FLOPs."""
    by_arm = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    final = args.max_train_steps
    uniform_final = [r["fid"] for r in by_arm.get("uniform", []) if r["step"] == final]
    target = args.target_fid if args.target_fid is not None else (statistics.mean(uniform_final) if uniform_final else None)
    table = []
    for arm, arm_rows in by_arm.items():
        steps = sorted({r["step"] for r in arm_rows})
        entry = {"arm": arm, "flops_per_sample": arm_rows[-1]["flops_per_sample"], "fid": {}}
        for step in steps:
            values = [r["fid"] for r in arm_rows if r["step"] == step]
            entry["fid"][step] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
        reach = []
        for seed in sorted({r["seed"] for r in arm_rows}):
            hits = [r["step"] for r in sorted(arm_rows, key=lambda r: r["step"]) if r["seed"] == seed and target is not None and r["fid"] <= target]
            reach.append(hits[0] if hits else math.inf)
        entry["steps_to_target"] = statistics.median(reach) if reach else math.inf
        seconds = [r["train_seconds"] / r["step"] for r in arm_rows if r["step"] == final and r["arm"] != "tdc_pruned"]
        entry["seconds_per_step"] = statistics.mean(seconds) if seconds else None
        table.append(entry)
    return table, target


def print_table(table, target, args):
    steps = sorted({s for e in table for s in e["fid"]})
    lines = [f"feature-FID (mean ± std over seeds {args.seeds}; lower is better); target FID {target if target is None else round(target, 2)}",
             "| arm | " + " | ".join(f"FID @ {s}" for s in steps) + " | steps to target | GFLOPs / image | s / step |",
             "| --- | " + " | ".join("---" for _ in steps) + " | --- | --- | --- |"]
    for e in table:
        cells = [f"{e['fid'][s][0]:.1f} ± {e['fid'][s][1]:.1f}" if s in e["fid"] else "" for s in steps]
        spt = "" if e["seconds_per_step"] is None else f"{e['seconds_per_step']:.3f}"
        lines.append(f"| {e['arm']} | " + " | ".join(cells) + f" | {e['steps_to_target']} | {e['flops_per_sample'] / 1e9:.2f} | {spt} |")
    return "\n".join(lines)


def plot(rows, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
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
    ax2.set(xlabel="seconds per training step (this CPU)", title="step time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inception_weights and not Path(args.inception_weights).is_file():
        sys.exit(f"error: --inception_weights {args.inception_weights} does not exist (nothing is downloaded)")
    from diffusers_curriculum.metrics import fashion_feature_extractor, fashion_mnist_unit

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results = output / "results.jsonl"
    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "output_dir", "inception_weights")}
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    settings_file = output / "settings.json"
    if rows and json.loads(settings_file.read_text()) != settings:
        sys.exit(f"error: {results} holds results of other settings; use another --output_dir")
    settings_file.write_text(json.dumps(settings, indent=2))

    def record(row):
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['arm']:>14} seed {row['seed']} step {row['step']:>5}: FID {row['fid']:.2f}", flush=True)

    extractor = fashion_feature_extractor()
    test_images, _ = fashion_mnist_unit("test")
    real = test_images[: max(args.num_fid_images, 500) if not args.quick else args.num_fid_images]
    all_arms = arms(args.max_train_steps)
    chosen = args.regimes.split(",") if args.regimes else list(all_arms)
    unknown = [a for a in chosen if a not in all_arms]
    if unknown:
        sys.exit(f"error: --regimes: unknown arms {unknown}; choose from {list(all_arms)}")
    done = {(r["arm"], r["seed"]) for r in rows if r["step"] == args.max_train_steps}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in chosen:
            if (arm, seed) in done:
                continue
            if arm == "tdc_pruned":
                tdc_dir = output / "runs" / f"tdc-seed{seed}"
                if not (tdc_dir / "model_index.json").exists():
                    run_arm(args, "tdc", all_arms["tdc"], seed, real, extractor, lambda row: None)
                prune_arm(args, tdc_dir, seed, real, extractor, record)
            else:
                rows[:] = [r for r in rows if not (r["arm"] == arm and r["seed"] == seed)]  # a half-done arm restarts
                results.write_text("".join(json.dumps(r) + "\n" for r in rows))
                run_arm(args, arm, all_arms[arm], seed, real, extractor, record)

    table, target = summarize(rows, args)
    text = print_table(table, target, args)
    print(text)
    (output / "table.md").write_text(f"{text}\n\nRun {date.today().isoformat()}: python benchmarks/compare_regimes.py "
                                      f"{' '.join(argv if argv is not None else sys.argv[1:])}\n")
    (output / "summary.json").write_text(json.dumps({"settings": settings, "target_fid": target, "table": table}, indent=2, default=str))
    plot(rows, table, output / "fid_vs_steps.png")
    return table


if __name__ == "__main__":
    main()
