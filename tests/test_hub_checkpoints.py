"""--push_checkpoints and resuming from the Hub, through huggingface_hub's real client against a local stand-in
for the Hub (tests/hub_standin.py): checkpoints appear as they are written, uploads that fail are retried without
touching training, a half-uploaded checkpoint is never resumed from, a killed run resumes from the Hub into an
empty folder bit-identically, and no token lands in any file or stream."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_curriculum import hub_checkpoints, training
from diffusers_curriculum.config import RunConfig
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.hub_checkpoints import CheckpointUploader, download_checkpoint, hub_checkpoint_steps

from conftest import ROOT, TINY_FLAGS
from hub_standin import USER, HubStandIn

TOKEN = "hf_StandInSecret0123456789"
FLAGS = [*TINY_FLAGS, "--max_train_samples", "64", "--no_validation", "--checkpointing_steps", "2"]


@pytest.fixture
def hub(monkeypatch):
    """The stand-in, and this process's huggingface_hub pointed at it (online, with a token)."""
    import huggingface_hub.constants as constants

    with HubStandIn(token=TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)  # what HF_ENDPOINT sets when huggingface_hub loads
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(hub_checkpoints, "RETRY_BACKOFF", 0.05)
        yield server


def checkpoint_files(hub, repo_id, step):
    return [f for f in hub.files(repo_id) if f.startswith(f"checkpoints/checkpoint-{step}/")]


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_checkpoints_appear_on_the_hub_while_the_run_goes_on_and_rotation_is_mirrored(train_unconditional, hub, tmp_path,
                                                                                       monkeypatch):
    from huggingface_hub import HfApi

    seen = {}
    save = training.save_checkpoint

    def save_and_look(accelerator, output_dir, step, *args, **kwargs):
        if step == 8:  # the run is mid-way: read the repo's file list as a user would
            wait_for(lambda: checkpoint_files(hub, f"{USER}/run", 6))
            seen["files"] = HfApi(endpoint=hub.endpoint).list_repo_files(f"{USER}/run")
            seen["finished"] = (Path(output_dir) / "model_index.json").exists()
        return save(accelerator, output_dir, step, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", save_and_look)
    train_unconditional.main(train_unconditional.parse_args([
        "--output_dir", str(tmp_path / "run"), *FLAGS, "--max_train_steps", "10", "--push_checkpoints",
        "--checkpoints_total_limit", "3"]))
    assert not seen["finished"]
    assert {f"checkpoints/checkpoint-{s}/model.safetensors" for s in (2, 4, 6)} <= set(seen["files"])
    assert "checkpoints/checkpoint-6/checkpoint_complete.json" in seen["files"]
    # rotation mirrored: the Hub keeps the newest three, as the local folder does, byte for byte
    assert hub_checkpoint_steps(HfApi(endpoint=hub.endpoint), f"{USER}/run") == [6, 8, 10]
    local = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert local == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]
    files = hub.repos[f"{USER}/run"].files
    for path in (tmp_path / "run" / "checkpoint-10").rglob("*"):
        if path.is_file():
            assert files[f"checkpoints/checkpoint-10/{path.relative_to(tmp_path / 'run' / 'checkpoint-10')}"] == path.read_bytes()
    assert not (tmp_path / "run" / ".hub-staging").exists() or not any((tmp_path / "run" / ".hub-staging").iterdir())


def test_failed_uploads_are_retried_and_never_touch_training(train_unconditional, hub, tmp_path, caplog):
    flags = [*FLAGS, "--max_train_steps", "6"]
    plain = train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "plain"), *flags]))
    hub.fail_commits += [("500", "checkpoint-2"), ("drop", "checkpoint-4"), ("429", "checkpoint-4")]
    with caplog.at_level("WARNING"):
        pushed = train_unconditional.main(train_unconditional.parse_args(
            ["--output_dir", str(tmp_path / "run"), *flags, "--push_checkpoints"]))
    assert pushed["losses"] == plain["losses"]  # the failures reached neither the loop nor its numbers
    for name in ("model.safetensors", "optimizer.bin"):
        assert (tmp_path / "run" / "checkpoint-6" / name).read_bytes() == (tmp_path / "plain" / "checkpoint-6" / name).read_bytes()
    assert hub.fail_commits == []  # every injected fault was met
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and all(len(m.splitlines()) == 1 for m in retries)
    assert any("500" in m for m in retries) and any("429" in m for m in retries)
    from huggingface_hub import HfApi

    assert hub_checkpoint_steps(HfApi(endpoint=hub.endpoint), f"{USER}/run") == [2, 4, 6]
    assert TOKEN not in caplog.text


def test_an_upload_that_never_succeeds_is_named_at_the_end(hub, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hub_checkpoints, "RETRIES", 2)
    folder = make_checkpoint(tmp_path / "out", 3)
    uploader = CheckpointUploader("run", TOKEN, str(tmp_path / "staging"))
    hub.fail_commits += [("500", "checkpoint-3")] * 3
    with caplog.at_level("WARNING"):
        uploader.submit(folder)
        assert uploader.close(timeout=30) == [3]
    assert "checkpoint-3 did not reach testuser/run: the upload failed" in caplog.text
    assert "giving up" in caplog.text and checkpoint_files(hub, f"{USER}/run", 3) == []


def make_checkpoint(root: Path, step: int, size: int = 1000) -> Path:
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "sub" / "state.pkl").write_bytes(os.urandom(size // 2))
    (folder / "run.json").write_text(f'{{"global_step": {step}}}')
    return folder


def test_a_half_uploaded_checkpoint_is_never_resumed_from(hub, tmp_path):
    from huggingface_hub import HfApi

    uploader = CheckpointUploader("run", TOKEN, str(tmp_path / "staging"))
    for step in (2, 4, 6):
        make_checkpoint(tmp_path / "out", step)
    hub.fail_commits.append(("torn", "checkpoint-6"))  # half the files arrive, the marker does not
    for step in (2, 4, 6):
        uploader.submit(tmp_path / "out" / f"checkpoint-{step}")
    assert uploader.close(timeout=30) == []
    api = HfApi(endpoint=hub.endpoint)
    torn = checkpoint_files(hub, f"{USER}/run", 6)
    assert torn and not any(f.endswith("checkpoint_complete.json") for f in torn)
    # checkpoint-4 has its marker but loses a file afterwards: not complete either
    del hub.repos[f"{USER}/run"].files["checkpoints/checkpoint-4/sub/state.pkl"]
    assert hub_checkpoint_steps(api, f"{USER}/run") == [2]
    assert hub_checkpoint_steps(api, f"{USER}/run", complete_only=False) == [2, 4, 6]
    found = download_checkpoint(f"{USER}/run", str(tmp_path / "fresh"), TOKEN)
    assert found == tmp_path / "fresh" / "checkpoint-2"
    for path in (tmp_path / "out" / "checkpoint-2").rglob("*"):
        if path.is_file():
            assert (found / path.relative_to(tmp_path / "out" / "checkpoint-2")).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["checkpoint-2"]  # no temp folder left
    api.create_repo("empty", token=TOKEN)
    assert download_checkpoint(f"{USER}/empty", str(tmp_path / "none"), TOKEN) is None


def test_push_checkpoints_flags_are_checked_before_work(train_unconditional, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    from diffusers_curriculum import hub

    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(UsageError, match="--push_checkpoints needs a token"):
        train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), "--push_checkpoints"])
    with pytest.raises(UsageError, match="--push_checkpoints_timeout must be > 0"):
        train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), "--push_checkpoints", "--hub_token", "x",
                                        "--push_checkpoints_timeout", "0"])
    assert not (tmp_path / "run").exists()


def test_resume_looks_at_the_hub_only_when_asked_or_when_the_folder_is_empty(tmp_path):
    run = RunConfig(output_dir=str(tmp_path / "run"), report_to="none", hub_model_id="someone/run", hub_token="x", push_checkpoints=True,
                    resume_from_checkpoint="latest")
    assert training.hub_resume_repo(run) == "someone/run"  # empty folder, checkpoints pushed: the Hub has them
    make_checkpoint(tmp_path / "run", 4)
    assert training.hub_resume_repo(run) is None  # the local checkpoint wins
    assert training.hub_resume_repo(replace(run, resume_from_checkpoint="other/repo")) == "other/repo"
    # a local path is never a repo id, nor a checkpoint folder's name, there or not
    assert training.hub_resume_repo(replace(run, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))) is None
    assert training.hub_resume_repo(replace(run, resume_from_checkpoint="out/checkpoint-9")) is None
    (tmp_path / "empty").mkdir()
    assert training.hub_resume_repo(replace(run, push_checkpoints=False, output_dir=str(tmp_path / "empty"))) is None


# A composed regime: curriculum stages over 4 clusters, their losses balanced by UW, EDM2's learned weighting.
COMPOSED = ["--timestep_sampling", "curriculum", "--balancer", "uw", "--clusters", "4", "--weighting", "learned",
            "--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "6"]


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_hub_into_an_empty_folder_bit_identically(train_unconditional, tmp_path):
    flags = [*FLAGS, "--max_train_steps", "48", "--use_ema", *COMPOSED]
    straight = tmp_path / "straight"
    train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(straight), *flags]))

    script = str(ROOT / "train_scripts" / "train_unconditional.py")
    with HubStandIn(token=TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        # the token as a flag (machine 1) and from HF_TOKEN (machine 2); TensorBoard records the run's config
        first = subprocess.Popen([sys.executable, script, "--output_dir", str(tmp_path / "machine1"), *flags,
                                  "--push_checkpoints", "--hub_model_id", f"{USER}/run", "--hub_token", TOKEN,
                                  "--report_to", "tensorboard"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert wait_for(lambda: any(f.startswith("checkpoints/checkpoint-10/checkpoint_complete")
                                    for f in hub.files(f"{USER}/run")), timeout=120)
        first.send_signal(signal.SIGKILL)  # the machine goes away, its disk with it
        first_output = first.communicate()[0]
        assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert not any(f.startswith("checkpoints/checkpoint-48/") for f in hub.files(f"{USER}/run"))

        second = subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / "machine2"), *flags,
                                 "--resume_from_checkpoint", f"{USER}/run"], env=env, capture_output=True, timeout=600)
        assert second.returncode == 0, second.stderr.decode()[-3000:]
        assert b"Resuming from testuser/run: checkpoint-" in second.stdout + second.stderr
        stored = dict(hub.repos[f"{USER}/run"].files)
        assert TOKEN in hub.seen_tokens  # the token was used, so the scan below can find it if it leaked

    expected = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "machine2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert (straight / "training_regime.json").read_text() == (tmp_path / "machine2" / "training_regime.json").read_text()

    # no token in any stream, any file of either machine, or anything stored on the Hub
    secret = TOKEN.encode()
    assert secret not in first_output and secret not in second.stdout + second.stderr
    assert list((tmp_path / "machine1" / "logs").rglob("events.out.tfevents.*"))  # the tracker's files were scanned too
    for machine in ("machine1", "machine2"):
        for path in (tmp_path / machine).rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), path
    assert all(secret not in data for data in stored.values())


def test_sigterm_checkpoints_then_waits_for_the_upload_before_exiting(tmp_path, monkeypatch):
    import logging
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(training, "save_checkpoint", lambda accelerator, output_dir, step, *a, **k: calls.append(
        ("save", step)) or Path(output_dir) / f"checkpoint-{step}")
    uploader = SimpleNamespace(submit=lambda path: calls.append(("submit", path.name)),
                               close=lambda timeout: calls.append(("close", timeout)) or [])
    accelerator = SimpleNamespace(end_training=lambda: calls.append(("end",)))
    preemption = SimpleNamespace(requested=lambda accelerator: True)
    run = RunConfig(output_dir=str(tmp_path), max_train_steps=10, checkpointing_steps=5, push_checkpoints_timeout=7.0,
                    report_to="none")
    with pytest.raises(SystemExit) as exit_info:
        training.checkpoint_and_preempt(accelerator, run, 3, preemption, logging.getLogger("test"), None, uploader)
    assert exit_info.value.code == 143
    assert calls == [("save", 3), ("submit", "checkpoint-3"), ("close", 7.0), ("end",)]


def test_the_wait_for_pending_uploads_is_bounded(hub, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hub_checkpoints, "RETRY_BACKOFF", 30.0)  # the first retry is far beyond the timeout below
    uploader = CheckpointUploader("run", TOKEN, str(tmp_path / "staging"))
    hub.fail_commits.append(("500", "checkpoint-5"))
    uploader.submit(make_checkpoint(tmp_path / "out", 5))
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        assert uploader.close(timeout=1.0) == [5]
    assert time.monotonic() - start < 10
    assert "checkpoint-5 did not reach testuser/run: still uploading after 1 s" in caplog.text
