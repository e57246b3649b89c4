#!/usr/bin/env python
"""Step time of text-to-image fine-tuning with and without ``--cache_latents``, side by side in one process.

Per family (``--families sd sdxl sd3``), each setting trains the same tiny random base (``diffusers_curriculum.tiny_sd``,
built offline) twice, for
``--short`` and ``--long`` steps; the difference of the two wall-clock times over the difference of steps is the
per-step cost without the fixed costs (loading, the cache's one encoding pass, saving). The rounds alternate the
settings so neither always runs second. Prints a table and writes ``--output`` (JSON).

    python benchmarks/cache_latents.py --families sd sdxl sd3 --output benchmarks/results/cache_latents.json
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train_scripts"))


def timed_run(script, base: Path, out: Path, steps: int, resolution: int, cache: bool) -> float:
    argv = ["--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--dataset_name", "fashion_mnist",
            "--max_train_samples", "64", "--train_batch_size", "8", "--resolution", str(resolution), "--report_to", "none",
            "--seed", "0", "--lr_warmup_steps", "0", "--max_train_steps", str(steps), "--checkpointing_steps", "100000",
            "--overwrite_output_dir", *(["--cache_latents"] if cache else [])]
    start = time.perf_counter()
    script.main(script.parse_args(argv))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=8, help="Steps of the short run.")
    parser.add_argument("--long", type=int, default=40, help="Steps of the long run.")
    parser.add_argument("--resolution", type=int, default=64, help="Training resolution (the VAE's cost grows with it).")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds; the median per-step time is reported.")
    parser.add_argument("--families", nargs="+", default=["sd"], choices=["sd", "sdxl", "sd3"], help="Tiny bases to time.")
    parser.add_argument("--output", type=str, default=None, help="Where to write the JSON results.")
    args = parser.parse_args()
    if not 1 <= args.short < args.long:
        parser.error(f"--short must be in [1, --long), got {args.short} and {args.long}")

    import train_text_to_image as script
    from diffusers_curriculum.tiny_sd import FAMILIES

    tmp = Path(tempfile.mkdtemp(prefix="cache-latents-"))
    result = {"families": {}, "settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine()}
    print("| family | plain s / step | --cache_latents s / step | ratio |\n| --- | --- | --- | --- |")
    for family in args.families:
        FAMILIES[family](tmp / f"build-{family}").save_pretrained(tmp / family)
        per_step = {False: [], True: []}
        for r in range(args.rounds):
            for cache in ((False, True) if r % 2 == 0 else (True, False)):
                short = timed_run(script, tmp / family, tmp / "out", args.short, args.resolution, cache)
                long = timed_run(script, tmp / family, tmp / "out", args.long, args.resolution, cache)
                per_step[cache].append((long - short) / (args.long - args.short))
        median = {cache: sorted(times)[len(times) // 2] for cache, times in per_step.items()}
        result["families"][family] = {
            "per_step_seconds": {"plain": median[False], "cache_latents": median[True]},
            "ratio_cached_over_plain": median[True] / median[False],
            "all_rounds": {"plain": per_step[False], "cache_latents": per_step[True]}}
        print(f"| {family} | {median[False]:.4f} | {median[True]:.4f} | {median[True] / median[False]:.3f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
