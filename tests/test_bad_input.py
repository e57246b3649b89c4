"""Table-driven bad-input sweep through each script's command-line entry point (``cli``, in-process): every case
ends with exactly one ``error:`` line naming the problem, exit status 2, no traceback, and leaves the finished
run in --output_dir untouched (every byte)."""

import hashlib
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_curriculum.tiny_sd import tiny_stable_diffusion

from conftest import ROOT, TINY_FLAGS, load_script

SCRIPT = str(ROOT / "train_scripts" / "train_unconditional.py")
T2I_FLAGS = ["--dataset_name", "fashion_mnist", "--train_batch_size", "4", "--max_train_samples", "32", "--report_to", "none", "--seed", "0",
             "--lr_warmup_steps", "0"]
SD_TIMESTEPS = 50  # the sweep's tiny SD has T = 50, so a cluster check against a fixed 1000 would show


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def corrupt_png(path: Path) -> None:
    """A PNG whose header (and so ``Image.verify``'s structure check) is fine but whose pixel data is not."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    data[start + 20:start + 60] = bytes(40)  # zero part of the compressed stream
    crc = zlib.crc32(bytes(data[start - 4:start + length])).to_bytes(4, "big")  # keep the chunk CRC valid
    data[start + length:start + length + 4] = crc
    path.write_bytes(bytes(data))


def captioned_folder(root: Path, broken_metadata: bool = False) -> Path:
    root.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"thing {i}"}) for i in range(4)]
    if broken_metadata:
        lines[1] = lines[1][:-3]  # a line cut short
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Inputs for the cases, and a finished 2-step run (checkpoint-2 + pipeline) of each script."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "corrupt" / "ok.png")
    (root / "corrupt" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "corrupt_data" / "a").mkdir(parents=True)  # class sub-folder, so the class-conditional script reads it too
    corrupt_png(root / "corrupt_data" / "a" / "broken.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "corrupt_data" / "a" / "fine.png")
    captioned_folder(root / "bad_metadata", broken_metadata=True)
    (root / "a_file").write_text("not a folder")
    sd = root / "tiny-sd"
    tiny_stable_diffusion(root).save_pretrained(sd)
    config = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": SD_TIMESTEPS}))

    flags = {"unconditional": TINY_FLAGS, "class_conditional": TINY_FLAGS,
             "text_to_image": ["--pretrained_model_name_or_path", str(sd), *T2I_FLAGS]}
    modules = {"unconditional": load_script("train_unconditional"), "class_conditional": load_script("train_class_conditional"),
               "text_to_image": load_script("train_text_to_image")}
    for name, module in modules.items():
        out = root / name
        module.main(module.parse_args(["--output_dir", str(out), *flags[name], "--max_train_steps", "2",
                                       "--checkpointing_steps", "2", *(["--no_validation"] if name != "text_to_image" else [])]))
        damaged = root / f"{name}-damaged" / "checkpoint-2"  # the same checkpoint, with a truncated RNG state
        shutil.copytree(out / "checkpoint-2", damaged)
        rng = damaged / "random_states_0.pkl"
        rng.write_bytes(rng.read_bytes()[: len(rng.read_bytes()) // 2])
    bad_weights = root / "bad" / "checkpoint-2"
    shutil.copytree(root / "unconditional" / "checkpoint-2", bad_weights)
    weights = bad_weights / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    return root, modules, flags


ALL = ("unconditional", "class_conditional", "text_to_image")
PIXEL = ("unconditional", "class_conditional")
CASES = [
    # (scripts, extra flags, expected fragment of the error line)
    (ALL, ["--learning_rate", "-1e-4"], "--learning_rate must be > 0, got -0.0001"),
    (ALL, ["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU"),
    (ALL, ["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    (ALL, ["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (ALL, ["--regime", "warp"], "--regime 'warp' is unknown"),
    (ALL, ["--unknown_flag", "1"], "unrecognized arguments: --unknown_flag"),
    (ALL, ["--train_data_dir", "{root}/empty"], "holds no images"),
    (ALL, ["--train_data_dir", "{root}/corrupt"], "1 unreadable image: {root}/corrupt/bad.jpg"),
    (ALL, ["--train_data_dir", "{root}/corrupt_data"], "1 unreadable image: {root}/corrupt_data/a/broken.png"),
    (ALL, ["--train_data_dir", "{root}/bad_metadata"], "{root}/bad_metadata/metadata.jsonl line 2 is not valid JSON"),
    (ALL, ["--resume_from_checkpoint", "{root}/nowhere/checkpoint-9"], "no checkpoint folder there"),
    (ALL, ["--resume_from_checkpoint", "{root}/{script}-damaged/checkpoint-2"], "random_states_0.pkl is damaged"),
    (ALL, ["--resume_from_checkpoint", "latest", "--max_train_steps", "1"], "is at step 2, past --max_train_steps 1"),
    (ALL, ["--resume_from_checkpoint", "latest", "--timestep_sampling", "logit_normal"],
     "the checkpoint's timestep_sampling is uniform, this run's is logit_normal (--timestep_sampling)"),
    (ALL, ["--resume_from_checkpoint", "latest", "--snr_gamma", "5"], "the checkpoint's weighting is"),
    (ALL, ["--push_to_hub"], "--push_to_hub needs a token"),
    (PIXEL, ["--resume_from_checkpoint", "latest", "--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "1",
             "--max_train_steps", "4"], "the checkpoint's experts is None, this run's is {{'num_experts': 2"),
    (PIXEL, ["--regime", "ant", "--ant_clusters", "2000"], "--ant_clusters must be in [1, 100]"),
    (("text_to_image",), ["--regime", "ant", "--ant_clusters", str(SD_TIMESTEPS + 1)], f"--ant_clusters must be in [1, {SD_TIMESTEPS}]"),
    (("text_to_image",), ["--resume_from_checkpoint", "latest", "--use_lora"],
     "written by a run with adapter = None, this run has lora"),
    (("class_conditional",), ["--resume_from_checkpoint", "{root}/unconditional/checkpoint-2"],
     "written by a run with task = unconditional, this run has class_conditional"),
    (("unconditional",), ["--regime", "curriculum", "--curriculum_clusters", "101"], "--curriculum_clusters must be in [1, 100]"),
    (("unconditional",), ["--regime", "curriculum", "--curriculum_patience", "0"], "--curriculum_patience must be >= 1"),
    (("unconditional",), ["--regime", "tdc"], "--regime tdc needs --tdc_base_steps >= 1"),
    (("unconditional",), ["--regime", "tdc", "--tdc_base_steps", "4"], "--tdc_base_steps 4 leaves no stage-2 steps"),
    (("unconditional",), ["--regime", "tdc", "--tdc_base_steps", "1", "--tdc_groups", "1"], "--tdc_groups must be in [2, 100]"),
    (("unconditional",), ["--experts_forward", "per_group"], "--experts_forward needs --experts K"),
    (("unconditional",), ["--experts_schedule", "round_robin"], "--experts_schedule needs --experts K"),
    (("unconditional",), ["--regime", "tdc", "--tdc_base_steps", "1", "--experts_schedule", "round_robin", "--experts_forward",
                          "batched"], "--experts_forward has no effect with --experts_schedule round_robin"),
    (("unconditional",), ["--image_mode", "CMYK"], "argument --image_mode: invalid choice"),
    (("unconditional",), ["--resolution", "33"], "--resolution 33 is not divisible by 2"),
    (("unconditional",), ["--resume_from_checkpoint", "{root}/bad/checkpoint-2"], "cannot load it"),
    (("unconditional",), ["--model_config_name_or_path", "{root}/a_file"], "--model_config_name_or_path"),
    (("unconditional",), ["--enable_xformers_memory_efficient_attention"], "xformers is not installed"),
    (("text_to_image",), ["--pretrained_model_name_or_path", "{root}/no-such-model"], "no-such-model: no such folder"),
]
PARAMS = [(script, extra, message) for scripts, extra, message in CASES for script in scripts]


@pytest.mark.slow
@pytest.mark.parametrize("script, extra, message", PARAMS, ids=[f"{s}:{' '.join(e)[:40]}" for s, e, _ in PARAMS])
def test_bad_input_is_one_line_and_leaves_outputs_intact(sweep, script, extra, message, capsys, monkeypatch):
    root, modules, flags = sweep
    out = root / script
    before = tree_digest(out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("diffusers_curriculum.hub.get_token", lambda: None)
    argv = [a.format(root=root, script=script) for a in extra]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        modules[script].cli(["--output_dir", str(out), *flags[script], "--max_train_steps", "4", "--overwrite_output_dir", *argv])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message.format(root=root) in errors[0], stderr[-2000:]
    assert tree_digest(out) == before


@pytest.mark.slow
def test_unwritable_output_dir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "a_file" / "run"), *TINY_FLAGS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --output_dir") and "not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
