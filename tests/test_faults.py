"""Faults a long run meets: pre-emption (SIGTERM) and a hard kill (SIGKILL) in the middle of writing."""

import re
import signal
import subprocess
import sys
import time

import pytest

from diffusers_curriculum.checkpointing import list_checkpoints

from conftest import ROOT, TINY_FLAGS

SCRIPT = str(ROOT / "train_scripts" / "train_unconditional.py")


def start(output_dir, log_path, *extra):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, SCRIPT, "--output_dir", str(output_dir), *TINY_FLAGS, "--no_validation", *extra],
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for_steps(log_path, steps, proc, timeout=120):
    """Blocks until the progress bar in ``log_path`` reports at least ``steps`` finished steps."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(n) for n in re.findall(r"(\d+)/\d+ \[", open(log_path).read())]
        if done and max(done) >= steps:
            return max(done)
        assert proc.poll() is None, open(log_path).read()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"no progress in {timeout}s")


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_then_resume_finishes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(out, log, "--max_train_steps", "100000", "--checkpointing_steps", "100000")
    wait_for_steps(log, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, open(log).read()[-2000:]
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and not (out / "model_index.json").exists()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 3 and "SIGTERM: saved checkpoint" in open(log).read()

    resumed = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), *TINY_FLAGS, "--no_validation",
                              "--max_train_steps", str(step + 2), "--resume_from_checkpoint", "latest"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "model_index.json").exists()


@pytest.mark.slow
def test_sigkill_while_checkpointing_never_leaves_a_bad_latest(tmp_path):
    """Kill -9 a run that checkpoints every step, at several moments; every time the newest complete
    checkpoint loads and training resumes from it."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    for attempt, delay in enumerate((0.0, 0.13, 0.37)):
        proc = start(out, log, "--max_train_steps", "100000", "--checkpointing_steps", "1",
                     "--checkpoints_total_limit", "2", *(["--resume_from_checkpoint", "latest"] if attempt else []))
        wait_for_steps(log, 2 if attempt == 0 else 1, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        checkpoints = list_checkpoints(out)
        assert 1 <= len(checkpoints) <= 3  # rotation never removed the only good one
        for checkpoint in checkpoints:
            assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    latest = int(list_checkpoints(out)[-1].name.split("-")[1])
    finish = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), *TINY_FLAGS, "--no_validation",
                             "--max_train_steps", str(latest + 1), "--resume_from_checkpoint", "latest"],
                            capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert (out / "model_index.json").exists()


def test_the_suite_has_a_per_test_timeout(pytestconfig):
    # pytest-timeout is installed with [dev] and pytest.ini sets the limit: a hung test fails alone.
    assert float(pytestconfig.getini("timeout")) > 0
