"""Every regime on a CUDA GPU under fp16 and bf16 mixed precision: train a few steps, reload, sample.

The test suite runs on CPU (CI has no GPU); this is the check to run where one is lent. Each case trains
with the real training script in its own process (accelerate's mixed precision is per process), then
reloads the saved pipeline with ``from_pretrained`` in half precision on the GPU and samples from it.
A case passes when the run exits cleanly, the pipeline reloads with its regime recorded, and its samples
are finite (NaN weights, e.g. from a bf16 overflow, would make them NaN; fp16's grad scaler skips such
steps); a combination the scripts refuse by design passes when it stops with that one-line error and writes
nothing. Prints one line per case and writes the results as JSON.

    python benchmarks/cuda_smoke.py --output cuda_smoke.json
    python benchmarks/cuda_smoke.py --cases "tdc,text-to-image"          # only cases whose name holds one of these
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
UNCONDITIONAL = [
    "--resolution", "32", "--block_out_channels", "16,32", "--train_batch_size", "16", "--max_train_samples", "512",
    "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--max_train_steps", "12", "--use_ema",
    "--ddpm_num_inference_steps", "4", "--eval_batch_size", "2", "--report_to", "none", "--seed", "0", "--no_validation",
]
REGIMES = {
    "uniform_min_snr": ["--snr_gamma", "5"],
    "p2_loss_aware": ["--weighting", "p2", "--timestep_sampling", "loss_aware"],
    "curriculum": ["--regime", "curriculum", "--curriculum_clusters", "4", "--curriculum_check_every", "2",
                   "--curriculum_max_stage_steps", "2"],
    "ant_uw": ["--regime", "ant", "--ant_method", "uw"],
    "ant_pcgrad": ["--regime", "ant", "--ant_method", "pcgrad"],
    "ant_nash": ["--regime", "ant", "--ant_method", "nash"],
    "tdc": ["--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "6"],
}
# Combinations the scripts refuse by design, with the start of the one-line error they must give.
REFUSED = {(method, "fp16"): f"error: --ant_method {method.split('_')[1]} forms gradients itself and does not support --mixed_precision fp16"
           for method in ("ant_pcgrad", "ant_nash")}


def cases(precisions, text_precision):
    for precision in precisions:
        for name, flags in REGIMES.items():
            refusal = REFUSED.get((name, precision))
            yield (f"unconditional {name} {precision}", "train_unconditional", [*UNCONDITIONAL, *flags, "--mixed_precision", precision],
                   refusal)
        yield (f"class-conditional ant_uw {precision}", "train_class_conditional",
               [*UNCONDITIONAL, "--regime", "ant", "--mixed_precision", precision], None)
    for flags, label in ((["--use_lora", "--rank", "4"], "LoRA"), (["--use_ema"], "full+EMA")):
        yield (f"text-to-image {label} curriculum {text_precision}", "train_text_to_image",
               ["--dataset_name", "fashion_mnist", "--train_batch_size", "4", "--max_train_samples", "32", "--max_train_steps", "6", "--report_to", "none",
                "--seed", "0", "--lr_warmup_steps", "0", "--mixed_precision", text_precision, "--regime", "curriculum",
                "--curriculum_clusters", "3", "--curriculum_max_stage_steps", "2", *flags], None)


def check_pipeline(out: Path, script: str, base_model: Path, device: str) -> str:
    """Reloads the saved pipeline (fp16 on a GPU) and samples from it; returns a short description."""
    from diffusers import DiffusionPipeline

    from diffusers_curriculum import read_training_regime

    dtype = torch.float16 if device == "cuda" else torch.float32
    lora = (out / "pytorch_lora_weights.safetensors").exists()
    if lora:
        pipeline = DiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype, safety_checker=None)
        pipeline.load_lora_weights(out)
    else:
        pipeline = DiffusionPipeline.from_pretrained(out, torch_dtype=dtype, trust_remote_code=True,
                                                     **({"safety_checker": None} if script == "train_text_to_image" else {}))
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    regime = read_training_regime(out)["name"]
    generator = torch.Generator(device).manual_seed(0)
    if script == "train_text_to_image":
        images = pipeline("a photo of a sneaker", num_inference_steps=4, generator=generator, output_type="np").images
    elif script == "train_class_conditional":
        images = pipeline(class_labels=[0, 1], num_inference_steps=4, generator=generator, output_type="np").images
    else:
        images = pipeline(batch_size=2, num_inference_steps=4, generator=generator, output_type="np").images
    if not np.isfinite(images).all():
        raise AssertionError("non-finite samples")
    if regime is None and not lora:
        raise AssertionError("the reloaded scheduler records no training regime")
    return f"{type(pipeline).__name__} regime={regime} samples {tuple(images.shape)}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=str, default="cuda_smoke.json")
    parser.add_argument("--precisions", type=str, default="fp16,bf16")
    parser.add_argument("--timeout", type=int, default=300, help="Seconds per training run.")
    parser.add_argument("--cases", type=str, default=None, help="Comma-separated parts of case names to run (default: all).")
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"],
                        help="cpu (with --precisions no) dry-runs the same cases where no GPU is lent.")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.precisions != "no":
        sys.exit(f"error: --device cpu runs without mixed precision: pass --precisions no, not {args.precisions}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; this check is for a machine with a GPU (--device cpu dry-runs it)")
    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_stable_diffusion(tmp / "build").save_pretrained(tmp / "tiny-sd")
        for i, (name, script, flags, refusal) in enumerate(cases(args.precisions.split(","), "fp16" if args.device == "cuda" else "no")):
            if args.cases and not any(part in name for part in args.cases.split(",")):
                continue
            out = tmp / f"case{i}"
            extra = ["--pretrained_model_name_or_path", str(tmp / "tiny-sd")] if script == "train_text_to_image" else []
            command = [sys.executable, str(ROOT / "train_scripts" / f"{script}.py"), "--output_dir", str(out), *extra, *flags]
            start = time.perf_counter()
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                last_line = (run.stderr or run.stdout).strip().splitlines()[-1] if run.returncode else ""
                if refusal is not None:  # must stop at once with the documented error, having written nothing
                    if not (run.returncode and last_line.startswith(refusal) and not out.exists()):
                        raise AssertionError(f"expected the refusal {refusal!r}, got exit {run.returncode}: {last_line}")
                    detail, ok = f"refused as documented: {last_line}", True
                elif run.returncode:
                    raise RuntimeError(last_line)
                else:
                    detail, ok = check_pipeline(out, script, tmp / "tiny-sd", args.device), True
            except Exception as e:  # one failing case must not hide the others
                detail, ok = f"{type(e).__name__}: {e}", False
            results.append({"case": name, "ok": ok, "detail": detail, "seconds": round(time.perf_counter() - start, 1)})
            print(f"{'PASS' if ok else 'FAIL'}  {name:42s} {results[-1]['seconds']:6.1f}s  {detail}", flush=True)
    Path(args.output).write_text(json.dumps({
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "results": results,
    }, indent=2))
    failed = [r["case"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
