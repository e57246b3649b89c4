"""End-to-end runs of train_scripts/train_unconditional.py on real Fashion-MNIST images."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from diffusers_curriculum import read_training_regime
from diffusers_curriculum import data
from diffusers_curriculum.errors import UsageError

from conftest import ROOT


def run(script, tmp_path, tiny_flags, *extra, name="run"):
    args = script.parse_args(["--output_dir", str(tmp_path / name), *tiny_flags, *extra])
    return script.main(args)


def test_loss_decreases_and_saved_pipeline_reloads_and_generates(train_unconditional, tmp_path, tiny_flags):
    summary = run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "100", "--snr_gamma", "5",
                  "--checkpointing_steps", "1000")
    losses = summary["losses"]
    assert summary["global_step"] == 100 and len(losses) == 100
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])

    out = tmp_path / "run"
    pipe = DDPMPipeline.from_pretrained(out)
    assert read_training_regime(out)["weighting"] == "min_snr"
    images = pipe(batch_size=3, num_inference_steps=5, output_type="np").images
    assert images.shape == (3, 32, 32, 1) and np.isfinite(images).all()
    assert (out / "samples" / "final.png").is_file()
    card = (out / "README.md").read_text()
    assert "samples/final.png" in card and "Min-SNR-γ loss weighting, γ = 5" in card and str(tmp_path) not in card


def test_no_validation_card_and_ddim_pipeline(train_unconditional, tmp_path, tiny_flags):
    run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "3", "--no_validation", "--use_ddim")
    out = tmp_path / "run"
    assert not (out / "samples").exists()
    assert "No validation samples" in (out / "README.md").read_text()
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and "training_regime" not in config
    assert read_training_regime(out)["name"] == "uniform"


def test_resume_reproduces_the_uninterrupted_run(train_unconditional, tmp_path, tiny_flags, monkeypatch):
    flags = [*tiny_flags, "--max_train_steps", "12", "--checkpointing_steps", "6", "--use_ema",
             "--gradient_accumulation_steps", "2", "--max_train_samples", "64", "--no_validation"]
    straight = run(train_unconditional, tmp_path, flags, name="straight")
    # The interrupted run: all it has left is the checkpoint at step 6.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    events = []  # accelerate's load_state gives the EMA CPU tensors: it must be moved to its device afterwards
    for method, event in (("load_state_dict", "load"), ("to", "to")):
        original = getattr(EMAModel, method)
        monkeypatch.setattr(EMAModel, method, lambda self, *a, _o=original, _e=event, **k: events.append(_e) or _o(self, *a, **k))
    resumed = run(train_unconditional, tmp_path, flags, "--resume_from_checkpoint", "latest", name="resumed")
    assert "load" in events and "to" in events[events.index("load"):]

    assert resumed["losses"] == pytest.approx(straight["losses"][6:], rel=1e-5)
    for key in ("sampler", "noise_generator"):
        a, b = straight["regime_state"], resumed["regime_state"]
        assert torch.equal(torch.as_tensor(a[key]["generator"] if key == "sampler" else a[key]),
                           torch.as_tensor(b[key]["generator"] if key == "sampler" else b[key]))
    for part in ("checkpoint-12/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / part), load_file(tmp_path / "resumed" / part)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_checkpoints_total_limit_keeps_newest(train_unconditional, tmp_path, tiny_flags):
    run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--no_validation")
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-4", "checkpoint-6"]


# ---- bad input: one-line errors naming the flag, before training starts ----------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--regime", "warp"], "--regime 'warp' is unknown"),
        (["--resolution", "33"], "--resolution 33 is not divisible by 2"),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
        (["--block_out_channels", "16,x"], "--block_out_channels"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "--resume_from_checkpoint .* no checkpoint"),
        (["--train_batch_size", "1000", "--max_train_samples", "10"], "--train_batch_size 1000 is larger"),
    ],
)
def test_bad_flags_fail_before_training(train_unconditional, tmp_path, tiny_flags, extra, message):
    with pytest.raises(UsageError, match=message):
        run(train_unconditional, tmp_path, tiny_flags, *extra)
    assert not list(tmp_path.glob("run/checkpoint-*"))


def test_empty_image_folder_and_missing_data_package(train_unconditional, tmp_path, tiny_flags, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="--train_data_dir .* holds no images"):
        run(train_unconditional, tmp_path, tiny_flags, "--train_data_dir", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "no-package")
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        run(train_unconditional, tmp_path, tiny_flags)


def test_corrupt_checkpoint_is_a_clear_error(train_unconditional, tmp_path, tiny_flags):
    run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "2", "--checkpointing_steps", "2", "--no_validation")
    weights = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UsageError, match="--resume_from_checkpoint .*checkpoint-2: cannot load it"):
        run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")


def test_existing_pipeline_is_not_overwritten_by_accident(train_unconditional, tmp_path, tiny_flags):
    run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "1", "--no_validation")
    with pytest.raises(UsageError, match="--output_dir .* already holds a finished run"):
        run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "1")


def test_push_without_token_fails_before_training(train_unconditional, tmp_path, tiny_flags, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
    monkeypatch.setattr("diffusers_curriculum.hub.get_token", lambda: None)
    with pytest.raises(UsageError, match="--push_to_hub needs a token"):
        run(train_unconditional, tmp_path, tiny_flags, "--push_to_hub")
    assert not (tmp_path / "run").exists()


def test_failed_push_exits_nonzero_and_keeps_local_pipeline(tmp_path, tiny_flags):
    """Offline push (HF_HUB_OFFLINE=1) as a user would run it: exit 1, one-line error, pipeline intact."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_scripts" / "train_unconditional.py"), "--output_dir", str(out), *tiny_flags,
         "--max_train_steps", "2", "--no_validation", "--push_to_hub", "--hub_token", "hf_fake", "--hub_model_id", "me/model"],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "push to me/model failed" in error_lines[0]
    assert "hf_fake" not in proc.stderr
    assert DDPMPipeline.from_pretrained(out).unet.config.sample_size == 32
    # What a push would upload holds neither the token nor a local absolute path.
    from huggingface_hub.utils import filter_repo_objects

    from diffusers_curriculum.hub import PUSH_IGNORE_PATTERNS

    files = [p for p in out.rglob("*") if p.is_file()]
    uploaded = list(filter_repo_objects(files, ignore_patterns=PUSH_IGNORE_PATTERNS, key=lambda p: str(p.relative_to(out))))
    assert uploaded and not any("checkpoint" in str(p) or "/logs/" in str(p) for p in uploaded)
    for path in uploaded:
        data = path.read_bytes()
        assert b"hf_fake" not in data and str(tmp_path).encode() not in data, path


def test_usage_error_is_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_scripts" / "train_unconditional.py"), "--output_dir", str(tmp_path / "x"),
         "--regime", "warp"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --regime 'warp' is unknown; choose one of ant, curriculum, tdc, uniform"]


def test_validation_steps_write_sample_grids(train_unconditional, tmp_path, tiny_flags):
    run(train_unconditional, tmp_path, tiny_flags, "--max_train_steps", "4", "--validation_steps", "2",
        "--report_to", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert "samples" in events.Tags()["images"] and "loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Images("samples")] == [2, 4]
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["final.png", "step_2.png", "step_4.png"]
    from PIL import Image

    assert Image.open(samples / "step_2.png").size == (128, 128)  # 4 images of 32×32, shown at 64×64, in a 2×2 grid


def test_card_templates_are_found_in_a_source_checkout_without_install(monkeypatch):
    from diffusers_curriculum import hub

    installed = hub.template_path("unconditional")
    assert installed.is_file()

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(hub.resources, "files", not_installed)  # PYTHONPATH=<checkout>: no model_cards package
    fallback = hub.template_path("unconditional")
    assert fallback == ROOT / "model_cards" / "unconditional.md" and fallback.read_text() == installed.read_text()
