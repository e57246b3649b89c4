"""Table-driven bad-input sweep through the real command line: each case ends with exactly one
`error:` line naming the problem, a non-zero exit, and leaves the finished run in --output_dir untouched."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_FLAGS

SCRIPT = str(ROOT / "train_scripts" / "train_unconditional.py")


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out = root / "run"
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), *TINY_FLAGS, "--max_train_steps", "2",
                           "--checkpointing_steps", "2", "--no_validation"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # inputs for the cases
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "corrupt" / "ok.png")
    (root / "corrupt" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "a_file").write_text("not a folder")
    bad_ckpt = root / "bad" / "checkpoint-2"
    bad_ckpt.mkdir(parents=True)
    for p in (out / "checkpoint-2").iterdir():
        bad_ckpt.joinpath(p.name).write_bytes(p.read_bytes())
    weights = bad_ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    return root, out


CASES = [
    # (extra flags, expected fragment of the error line)
    (["--regime", "warp"], "--regime 'warp' is unknown"),
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (["--max_train_steps", "-5"], "--max_train_steps must be >= 1"),
    (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    (["--learning_rate", "-1"], "--learning_rate must be > 0"),
    (["--regime", "ant", "--ant_clusters", "2000"], "--ant_clusters must be in [1, 100]"),
    (["--regime", "curriculum", "--curriculum_clusters", "101"], "--curriculum_clusters must be in [1, 100]"),
    (["--regime", "curriculum", "--curriculum_patience", "0"], "--curriculum_patience must be >= 1"),
    (["--regime", "tdc"], "--regime tdc needs --tdc_base_steps >= 1"),
    (["--regime", "tdc", "--tdc_base_steps", "4"], "--tdc_base_steps 4 leaves no stage-2 steps"),
    (["--regime", "tdc", "--tdc_base_steps", "1", "--tdc_groups", "1"], "--tdc_groups must be in [2, 100]"),
    (["--train_data_dir", "{root}/empty"], "holds no images"),
    (["--train_data_dir", "{root}/corrupt"], "bad.jpg is not a readable image"),
    (["--image_mode", "CMYK"], "argument --image_mode: invalid choice"),
    (["--resolution", "33"], "--resolution 33 is not divisible by 2"),
    (["--resume_from_checkpoint", "{root}/nowhere/checkpoint-9"], "no checkpoint folder there"),
    (["--resume_from_checkpoint", "{root}/bad/checkpoint-2"], "cannot load it"),
    (["--model_config_name_or_path", "{root}/a_file"], "--model_config_name_or_path"),
    (["--push_to_hub"], "--push_to_hub needs a token"),
    (["--enable_xformers_memory_efficient_attention"], "xformers is not installed"),
    (["--unknown_flag", "1"], "unrecognized arguments: --unknown_flag"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_input_is_one_line_and_leaves_outputs_intact(finished_run, extra, message):
    root, out = finished_run
    before = tree_digest(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    env.pop("HF_TOKEN", None)
    argv = [a.format(root=root) for a in extra]
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), *TINY_FLAGS, "--max_train_steps", "4",
                           "--overwrite_output_dir", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert tree_digest(out) == before


@pytest.mark.slow
def test_unwritable_output_dir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "a_file" / "run"), *TINY_FLAGS],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --output_dir") and "not writable" in proc.stderr
