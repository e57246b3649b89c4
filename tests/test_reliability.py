"""No lost or silently wrong runs: overwriting, re-running a finished command, SIGTERM or a kill during the final
save, exact resume with random flips, a disk that fills up at checkpoint time. In-process runs of the real
scripts (the bad-input sweep in test_bad_input.py covers the one-line errors of bad resumes)."""

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from diffusers_curriculum import read_training_regime
from diffusers_curriculum.checkpointing import list_checkpoints
from diffusers_curriculum.errors import RunError, UsageError

from conftest import TINY_FLAGS, load_script

FLAGS = [*TINY_FLAGS, "--max_train_samples", "64", "--no_validation"]


def run(script, out, *extra):
    return script.main(script.parse_args(["--output_dir", str(out), *FLAGS, *extra]))


def names(out):
    return [p.name for p in list_checkpoints(out)]


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def unet_weights(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def class_conditional():
    return load_script("train_class_conditional")


# ---- 1. --overwrite_output_dir starts over; a new run never picks up an older run's checkpoints -----------
def test_overwrite_removes_the_earlier_runs_checkpoints(train_unconditional, tmp_path):
    out = tmp_path / "run"
    run(train_unconditional, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--timestep_sampling", "logit_normal")
    run(train_unconditional, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3",
        "--overwrite_output_dir")
    assert names(out) == ["checkpoint-2", "checkpoint-4"]  # rotation kept the new run's, the old 6 is gone
    assert json.loads((out / "checkpoint-4" / "run.json").read_text())["regime"]["timestep_sampling"] == "uniform"
    assert read_training_regime(out)["trained_steps"] == 4


def test_latest_resumes_the_new_run_not_an_older_one(train_unconditional, tmp_path):
    out = tmp_path / "run"
    run(train_unconditional, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--seed", "1")
    (out / "model_index.json").unlink()  # as if that run had been killed before it saved its pipeline
    with pytest.raises(UsageError, match=r"holds checkpoints of an earlier run \(checkpoint-6\); pass --resume_from_checkpoint latest"):
        run(train_unconditional, out, "--max_train_steps", "3")
    run(train_unconditional, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--overwrite_output_dir")
    resumed = run(train_unconditional, out, "--max_train_steps", "10", "--checkpointing_steps", "2",
                  "--resume_from_checkpoint", "latest")
    assert len(resumed["losses"]) == 7  # from the new run's checkpoint-3, not the old run's checkpoint-6


# ---- 2. the final save: a checkpoint of the last step first; SIGTERM does not cut it short ------------------
def test_sigterm_during_the_final_save_finishes_it(train_unconditional, tmp_path, monkeypatch):
    def outside_handler(signum, frame):  # what SIGTERM does once the run's own handler is gone
        raise AssertionError("SIGTERM reached the default handler during the final save")

    previous = signal.signal(signal.SIGTERM, outside_handler)
    real_save = train_unconditional.save_pipeline

    def terminated_while_saving(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_unconditional, "save_pipeline", terminated_while_saving)
    try:
        run(train_unconditional, tmp_path / "run", "--max_train_steps", "5", "--checkpointing_steps", "4")
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = tmp_path / "run"
    assert (out / "model_index.json").exists() and not (out / ".pipeline.tmp").exists()
    assert names(out) == ["checkpoint-4", "checkpoint-5"]


def test_killed_during_the_final_save_the_rerun_saves_without_retraining(train_unconditional, tmp_path, monkeypatch):
    flags = ["--max_train_steps", "5", "--checkpointing_steps", "4", "--use_ema"]
    run(train_unconditional, tmp_path / "straight", *flags)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving the pipeline")

    monkeypatch.setattr(train_unconditional, "save_pipeline", killed)
    with pytest.raises(KeyboardInterrupt):
        run(train_unconditional, tmp_path / "killed", *flags)
    monkeypatch.undo()
    resumed = run(train_unconditional, tmp_path / "killed", *flags, "--resume_from_checkpoint", "latest")
    assert resumed["losses"] == [] and resumed["global_step"] == 5  # restored from checkpoint-5, nothing retrained
    assert_same_weights(unet_weights(tmp_path / "killed"), unet_weights(tmp_path / "straight"))


# ---- 3. re-running a finished command is a no-op that says so -------------------------------------------
@pytest.mark.parametrize("script_name", ["train_unconditional", "class_conditional"])
def test_rerunning_a_finished_run_trains_no_more(train_unconditional, class_conditional, script_name, tmp_path, capsys):
    script = train_unconditional if script_name == "train_unconditional" else class_conditional
    out = tmp_path / "run"
    run(script, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    before = tree_digest(out)
    capsys.readouterr()
    again = run(script, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert again["global_step"] == 4 and again["losses"] == [] and again.get("finished_before")
    assert "already holds this run, trained to step 4; nothing to do" in capsys.readouterr().out
    assert tree_digest(out) == before and names(out) == ["checkpoint-2", "checkpoint-4"]


def test_killed_before_the_model_card_the_rerun_finishes_the_result(train_unconditional, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the model card")

    monkeypatch.setattr(train_unconditional, "write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        run(train_unconditional, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    monkeypatch.undo()
    assert (out / "model_index.json").exists() and not (out / "README.md").exists()
    again = run(train_unconditional, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert not again.get("finished_before") and again["losses"] == []  # from checkpoint-4: saved again, not retrained
    assert (out / "README.md").exists()


def test_rerunning_a_finished_run_with_push_to_hub_retries_the_push(train_unconditional, tmp_path, monkeypatch):
    from diffusers_curriculum import hub

    out = tmp_path / "run"
    run(train_unconditional, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    pushed = []
    monkeypatch.setattr(hub, "push_folder", lambda folder, repo_id, token, private=False, write_card=None:
                        pushed.append((folder, repo_id, token, write_card)) or f"me/{repo_id}")
    again = run(train_unconditional, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--push_to_hub",
                "--hub_token", "hf_test")
    assert again.get("finished_before") and pushed == [(str(out), "run", "hf_test", None)]  # the card pushed as it is


def test_a_longer_max_train_steps_continues_a_finished_run(train_unconditional, tmp_path):
    out = tmp_path / "run"
    run(train_unconditional, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    more = run(train_unconditional, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert len(more["losses"]) == 2 and read_training_regime(out)["trained_steps"] == 6


# ---- 5. --random_flip resumes exactly ------------------------------------------------------------------
def test_resume_with_random_flip_is_exact(train_unconditional, tmp_path):
    flags = ["--max_train_steps", "12", "--checkpointing_steps", "6", "--random_flip", "--max_train_samples", "40"]
    straight = run(train_unconditional, tmp_path / "straight", *flags)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resumed = run(train_unconditional, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert resumed["losses"] == straight["losses"][6:]
    assert_same_weights(unet_weights(tmp_path / "resumed"), unet_weights(tmp_path / "straight"))


# ---- 6. a checkpoint that cannot be written: one line, the previous one intact, no partial folder ----------
@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1088 vs 1024"),
                                     PermissionError(13, "Permission denied")], ids=["full_disk", "read_only"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(train_unconditional, tmp_path, monkeypatch, failure):
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = real_save_state(self, output_dir, **kwargs)
        if "checkpoint-4" in str(output_dir):
            raise failure
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(RunError, match=r"checkpoint-4 could not be written to .* checkpoint-2 is intact and the partial folder was removed"):
        run(train_unconditional, tmp_path / "run", "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2"]
