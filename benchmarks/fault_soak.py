"""Fault-injection soak: SIGKILL the training scripts at random moments, resume with ``latest``, compare.

Each trial picks a configuration (the three scripts, a few regimes; short runs that checkpoint often, with
rotation), starts it in a fresh folder and SIGKILLs it 1-3 times at random moments, each time re-running the
same command with ``--resume_from_checkpoint latest`` until a run finishes. It records, per kill:

* the phase the kill landed in, read from the folder and log at that moment: ``start-up`` (no step yet),
  ``mid-step``, ``mid-checkpoint`` (a ``.checkpoint-N.tmp`` exists), ``rotation`` (a ``.checkpoint-N.deleting``
  exists), ``final save`` (past the last step);
* whether the resume picked the newest complete checkpoint at that moment (the log's "Resuming from
  checkpoint ..." line, or "No checkpoint" when there was none);

and per trial whether the finished pipeline equals the uninterrupted reference run bit for bit (every
``.safetensors`` and ``.json`` file outside the checkpoints) and whether anything was left behind (hidden
``.tmp`` / ``.old`` / ``.deleting`` / ``.write-test-*`` entries, a checkpoint folder missing its files).

Resumable and bounded: trials go to ``<output_dir>/trials.jsonl`` as they finish, a re-run skips the trials
already there, and no new trial starts after ``--time_budget_s``.

    python benchmarks/fault_soak.py --kills 50 --output_dir fault-soak
"""

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_curriculum.checkpointing import list_checkpoints  # noqa: E402

PIXEL = ["--resolution", "32", "--block_out_channels", "16,32", "--train_batch_size", "8", "--learning_rate", "1e-3",
         "--lr_warmup_steps", "0", "--lr_scheduler", "constant", "--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "2",
         "--eval_batch_size", "4", "--max_train_samples", "128", "--report_to", "none", "--seed", "0", "--use_ema",
         "--random_flip"]
SD = ["--dataset_name", "fashion_mnist", "--train_batch_size", "4", "--max_train_samples", "32", "--report_to", "none", "--seed", "0", "--lr_warmup_steps", "0",
      "--learning_rate", "1e-3", "--num_validation_inference_steps", "2"]
MAX_STEPS = 14
RUN = ["--max_train_steps", str(MAX_STEPS), "--checkpointing_steps", "3", "--checkpoints_total_limit", "2"]
CONFIGS = {
    "unconditional/uniform": ("train_unconditional.py", PIXEL + ["--snr_gamma", "5"]),
    "unconditional/curriculum": ("train_unconditional.py", PIXEL + ["--regime", "curriculum", "--curriculum_clusters", "4",
                                                                     "--curriculum_check_every", "1", "--curriculum_patience", "1"]),
    "unconditional/tdc": ("train_unconditional.py", PIXEL + ["--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "5"]),
    "unconditional/ant_uw": ("train_unconditional.py", PIXEL + ["--regime", "ant", "--ant_clusters", "3"]),
    "class_conditional/uniform": ("train_class_conditional.py", PIXEL + ["--class_dropout_prob", "0.2"]),
    "text_to_image/uniform": ("train_text_to_image.py", SD + ["--pretrained_model_name_or_path", "{tiny_sd}"]),
    "text_to_image/lora": ("train_text_to_image.py", SD + ["--pretrained_model_name_or_path", "{tiny_sd}", "--use_lora", "--rank", "2"]),
}
LEFTOVER = re.compile(r"^\.(.+)\.(tmp|old|deleting)$|^\.write-test-\d+$")
START_UP_SHARE = 0.15  # of the kills, drawn over start-up; the rest over training, checkpoints and the final save
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "run.json"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to land in all (stops early at --time_budget_s).")
    parser.add_argument("--time_budget_s", type=float, default=3600, help="No new trial starts after this many seconds.")
    parser.add_argument("--output_dir", type=str, default="fault-soak", help="Work folder; trials.jsonl there makes it resumable.")
    parser.add_argument("--configs", type=str, default=",".join(CONFIGS), help="Comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0, help="Seeds the kill moments.")
    parser.add_argument("--keep", action="store_true", help="Keep each trial's folder (default: delete it once checked).")
    return parser.parse_args()


def command(config, out, work, *extra):
    script, flags = CONFIGS[config]
    flags = [f.format(tiny_sd=work / "tiny-sd") for f in flags]
    return [sys.executable, str(ROOT / "train_scripts" / script), "--output_dir", str(out), *flags, *RUN, *extra]


def run_to_end(cmd, log_path, timeout=900):
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-8:])} exited {proc.returncode}: {Path(log_path).read_text()[-2000:]}")


def pipeline_digest(out):
    """sha256 of every weights / config file of the saved result (checkpoints, samples and logs aside)."""
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".json")
             and not any(part.startswith(("checkpoint-", "samples", "logs")) for part in p.relative_to(out).parts)]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def steps_done(log_path):
    """The progress bar's step counts in a log so far."""
    return [int(n) for n in re.findall(r"(\d+)/\d+ \[", Path(log_path).read_text(errors="replace"))]


def phase_now(out, log_path, max_steps):
    """Which phase a kill at this moment lands in, from the folder and the progress bar in the log."""
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    done = steps_done(log_path)
    if any(n.endswith(".deleting") for n in names):
        return "rotation"
    if any(re.match(r"^\.checkpoint-\d+\.tmp$", n) for n in names):
        return "mid-checkpoint"
    if ".pipeline.tmp" in names or ".lora.tmp" in names or (done and max(done) >= max_steps):
        return "final save"
    return "mid-step" if done else "start-up"


def leftovers(out):
    found = [p.name for p in out.iterdir() if LEFTOVER.match(p.name)]
    for checkpoint in list_checkpoints(out):
        missing = CHECKPOINT_FILES - {p.name for p in checkpoint.iterdir()}
        if missing:
            found.append(f"{checkpoint.name} lacks {sorted(missing)}")
    return found


def picked_checkpoint(log_path):
    """The checkpoint a resumed run said it picked ("none" for a fresh start), or None if it said nothing yet."""
    text = Path(log_path).read_text(errors="replace")
    match = re.search(r"Resuming from checkpoint \S*?(checkpoint-\d+)", text)
    return match.group(1) if match else ("none" if "No checkpoint in" in text else None)


def trial(index, config, work, reference, rng, timing):
    """One trial: up to 3 runs of the command, each SIGKILLed at a random moment (the first fresh, the others
    with ``--resume_from_checkpoint latest``), then one run to the end; returns its record."""
    out = work / f"trial-{index}"
    shutil.rmtree(out, ignore_errors=True)
    kills, extra = [], []
    for attempt in range(rng.randint(1, 3)):
        log = work / f"trial-{index}-{attempt}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(command(config, out, work, *extra), stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        if rng.random() < START_UP_SHARE:  # a kill while it loads (data, models, the checkpoint)
            deadline = time.time() + rng.uniform(0.0, timing["start_up"])
        else:  # a kill while it trains, checkpoints, rotates or saves: timed from its first step
            while proc.poll() is None and not steps_done(log):
                time.sleep(0.01)
            deadline = time.time() + rng.uniform(0.0, timing["training"] * 1.05)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        if kills and "picked" not in kills[-1]:
            kills[-1]["picked"] = picked_checkpoint(log)
        if proc.poll() is not None:  # it finished before the kill: no kill landed in this run
            if proc.returncode != 0:
                raise RuntimeError(f"{config} exited {proc.returncode}: {log.read_text()[-2000:]}")
            break
        phase = phase_now(out, log, MAX_STEPS)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if kills and kills[-1]["picked"] is None:
            kills[-1]["picked"] = picked_checkpoint(log)
        newest = list_checkpoints(out)
        kills.append({"phase": phase, "newest": newest[-1].name if newest else "none"})
        extra = ["--resume_from_checkpoint", "latest"]
    else:
        log = work / f"trial-{index}-final.log"
        run_to_end(command(config, out, work, *extra), log)
        if kills:
            kills[-1]["picked"] = picked_checkpoint(log)
    for kill in kills:  # a resume killed before it printed its choice is not counted either way
        kill["picked_newest"] = None if kill.get("picked") is None else kill["picked"] == kill["newest"]
    record = {"trial": index, "config": config, "kills": kills, "equal": pipeline_digest(out) == reference,
              "leftovers": leftovers(out)}
    if not record["equal"]:
        record["differs"] = sorted(k for k, v in pipeline_digest(out).items() if reference.get(k) != v)
    return record


def main():
    args = parse_args()
    work = Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    configs = args.configs.split(",")
    if any(c.startswith("text_to_image") for c in configs) and not (work / "tiny-sd" / "model_index.json").exists():
        from diffusers_curriculum.tiny_sd import tiny_stable_diffusion

        tiny_stable_diffusion(work / "tiny-sd-src").save_pretrained(work / "tiny-sd")
    references_path = work / "references.json"
    references = json.loads(references_path.read_text()) if references_path.exists() else {}
    for config in configs:  # the uninterrupted runs, and how long one takes (the kill moments are drawn below it)
        if config not in references:
            out = work / f"reference-{config.replace('/', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            log = work / "reference.log"
            start = time.time()
            with open(log, "w") as handle:
                proc = subprocess.Popen(command(config, out, work), stdout=handle, stderr=subprocess.STDOUT)
            while proc.poll() is None and not steps_done(log):
                time.sleep(0.01)
            first_step = time.time()
            if proc.wait(timeout=900) != 0:
                raise RuntimeError(f"reference {config} failed: {log.read_text()[-2000:]}")
            references[config] = {"digest": pipeline_digest(out), "start_up": first_step - start, "training": time.time() - first_step}
            references_path.write_text(json.dumps(references, indent=1))
            print(f"reference {config}: start-up {references[config]['start_up']:.1f} s, "
                  f"training + saving {references[config]['training']:.1f} s", flush=True)

    trials_path = work / "trials.jsonl"
    trials = [json.loads(line) for line in trials_path.read_text().splitlines()] if trials_path.exists() else []
    start, landed = time.time(), sum(len(t["kills"]) for t in trials)
    rng = random.Random(args.seed * 100003 + len(trials))
    while landed < args.kills and time.time() - start < args.time_budget_s:
        config = configs[len(trials) % len(configs)]
        record = trial(len(trials), config, work, references[config]["digest"], rng, references[config])
        trials.append(record)
        with open(trials_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        landed += len(record["kills"])
        print(f"trial {record['trial']} {config}: kills {[k['phase'] for k in record['kills']]}, equal {record['equal']}, "
              f"leftovers {record['leftovers']}", flush=True)
        if not args.keep:
            shutil.rmtree(work / f"trial-{record['trial']}", ignore_errors=True)
    summarize(trials, work)


def summarize(trials, work):
    kills = [k for t in trials for k in t["kills"]]
    summary = {
        "trials": len(trials), "kills": len(kills), "phases": dict(Counter(k["phase"] for k in kills)),
        "resumes_seen": sum(k["picked_newest"] is not None for k in kills),
        "resumes_picked_newest": sum(k["picked_newest"] is True for k in kills),
        "pipelines_equal": sum(t["equal"] for t in trials), "trials_with_leftovers": sum(bool(t["leftovers"]) for t in trials),
        "per_config": {c: sum(1 for t in trials if t["config"] == c) for c in sorted({t["config"] for t in trials})},
        "python": platform.python_version(), "machine": platform.machine(),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"{summary['kills']} kills in {summary['trials']} trials: {summary['resumes_picked_newest']} of {summary['resumes_seen']} "
          f"resumes seen picked the newest "
          f"complete checkpoint, {summary['pipelines_equal']}/{summary['trials']} final pipelines bit-equal to the uninterrupted "
          f"run, {summary['trials_with_leftovers']} trials left something behind")


if __name__ == "__main__":
    main()
