"""The scripts in a diffusers user's hands: visible logs, the accelerate config's precision, the same flags as
diffusers' example scripts (and a help line for every one), trackers that get the images, EMA shipping without a
second model, PCGrad / Nash refused on sharded launches, the package built from pyproject.toml."""

import argparse
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_curriculum import read_training_regime
from diffusers_curriculum.errors import UsageError

from conftest import ROOT, TINY_FLAGS, load_script
from test_distributed import run_launch

SCRIPTS = ("train_unconditional", "train_class_conditional", "train_text_to_image", "prune_experts")
FLAGS = [*TINY_FLAGS, "--max_train_samples", "32", "--no_validation"]

# diffusers' example scripts' flags (huggingface/diffusers main, 2026-11): every one is accepted here, or named in
# the README's "Not supported" row.
DIFFUSERS_FLAGS = {
    "train_unconditional": """--dataset_name --dataset_config_name --model_config_name_or_path --train_data_dir --output_dir
        --overwrite_output_dir --cache_dir --resolution --center_crop --random_flip --train_batch_size --eval_batch_size
        --dataloader_num_workers --num_epochs --save_images_epochs --save_model_epochs --gradient_accumulation_steps
        --learning_rate --lr_scheduler --lr_warmup_steps --adam_beta1 --adam_beta2 --adam_weight_decay --adam_epsilon
        --use_ema --ema_inv_gamma --ema_power --ema_max_decay --push_to_hub --hub_token --hub_model_id --hub_private_repo
        --logger --logging_dir --local_rank --mixed_precision --prediction_type --ddpm_num_steps --ddpm_num_inference_steps
        --ddpm_beta_schedule --checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint
        --enable_xformers_memory_efficient_attention --preserve_input_precision""".split(),
    "train_text_to_image": """--input_perturbation --pretrained_model_name_or_path --revision --variant --dataset_name
        --dataset_config_name --train_data_dir --image_column --caption_column --max_train_samples --validation_prompts
        --output_dir --cache_dir --seed --resolution --center_crop --random_flip --train_batch_size --num_train_epochs
        --max_train_steps --gradient_accumulation_steps --gradient_checkpointing --learning_rate --scale_lr --lr_scheduler
        --lr_warmup_steps --snr_gamma --dream_training --dream_detail_preservation --use_8bit_adam --allow_tf32 --use_ema
        --offload_ema --foreach_ema --non_ema_revision --dataloader_num_workers --adam_beta1 --adam_beta2
        --adam_weight_decay --adam_epsilon --max_grad_norm --push_to_hub --hub_token --prediction_type --hub_model_id
        --logging_dir --mixed_precision --report_to --local_rank --checkpointing_steps --checkpoints_total_limit
        --resume_from_checkpoint --enable_xformers_memory_efficient_attention --noise_offset --validation_epochs
        --tracker_project_name --image_interpolation_mode
        --validation_prompt --num_validation_images --rank""".split(),  # the last line: train_text_to_image_lora.py's own
}


# Their defaults (diffusers main, 2026-11: train_unconditional.py, train_text_to_image.py, and for the last two
# text-to-image flags train_text_to_image_lora.py). A flag whose default differs here must be named in the README's
# "Same name, other default" row, and a flag named there must differ.
DIFFUSERS_DEFAULTS = {
    "train_unconditional": {
        "dataset_name": None, "output_dir": "ddpm-model-64", "resolution": 64, "center_crop": False, "random_flip": False,
        "train_batch_size": 16, "eval_batch_size": 16, "dataloader_num_workers": 0, "num_epochs": 100,
        "save_images_epochs": 10, "save_model_epochs": 10, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
        "lr_scheduler": "cosine", "lr_warmup_steps": 500, "adam_beta1": 0.95, "adam_beta2": 0.999,
        "adam_weight_decay": 1e-6, "adam_epsilon": 1e-08, "use_ema": False, "ema_inv_gamma": 1.0, "ema_power": 0.75,
        "ema_max_decay": 0.9999, "report_to": "tensorboard", "logging_dir": "logs", "mixed_precision": "no",
        "prediction_type": "epsilon", "ddpm_num_steps": 1000, "ddpm_num_inference_steps": 1000,
        "ddpm_beta_schedule": "linear", "checkpointing_steps": 500, "checkpoints_total_limit": None,
    },
    "train_text_to_image": {
        "dataset_name": None, "image_column": "image", "caption_column": "text", "max_train_samples": None,
        "output_dir": "sd-model-finetuned", "seed": None, "resolution": 512, "center_crop": False, "random_flip": False,
        "train_batch_size": 16, "num_train_epochs": 100, "max_train_steps": None, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4, "scale_lr": False, "lr_scheduler": "constant", "lr_warmup_steps": 500, "snr_gamma": None,
        "use_ema": False, "dataloader_num_workers": 0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2,
        "adam_epsilon": 1e-08, "max_grad_norm": 1.0, "prediction_type": None, "logging_dir": "logs",
        "mixed_precision": None, "report_to": "tensorboard", "checkpointing_steps": 500, "checkpoints_total_limit": None,
        "noise_offset": 0.0, "validation_epochs": 5, "tracker_project_name": "text2image-fine-tune",
        "image_interpolation_mode": "lanczos", "num_validation_images": 4, "rank": 4,
    },
}


def readme_row_flags(title):
    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {title}"))
    return {word[2:] for word in row.replace("`", " ").replace(",", " ").replace(":", " ").split() if word.startswith("--")}


def test_defaults_are_diffusers_or_named_in_the_readme():
    named, differing = readme_row_flags("Same name, other default"), set()
    for name, theirs in DIFFUSERS_DEFAULTS.items():
        ours = vars(parser_of(name).parse_args(["--pretrained_model_name_or_path", "x"] if name == "train_text_to_image" else []))
        assert set(theirs) <= set(ours)
        here = {flag for flag, value in theirs.items() if ours[flag] != value}
        assert here <= named, f"{name}: defaults differ from diffusers' and the README does not say so: {here - named}"
        differing |= here
    assert named & set().union(*DIFFUSERS_DEFAULTS.values()) == differing  # the README names no difference that is not


def parser_of(name):
    module = load_script(name)
    return module.build_parser()


def option_strings(parser):
    return {option for action in parser._actions for option in action.option_strings}


def readme_unsupported():
    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Not supported"))
    return set(row.replace("`", " ").replace(",", " ").split())


# ---- 6. help ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_a_help_line_and_shows_its_default(name):
    parser = parser_of(name)
    missing = [action.option_strings[0] for action in parser._actions if action.option_strings and not (action.help or "").strip()]
    assert missing == []
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    assert "(default: " in parser.format_help()


# ---- 5. flag parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DIFFUSERS_FLAGS))
def test_diffusers_flags_are_accepted_or_named_as_unsupported(name):
    ours, unsupported = option_strings(parser_of(name)), readme_unsupported()
    assert [flag for flag in DIFFUSERS_FLAGS[name] if flag not in ours and flag not in unsupported] == []
    assert [flag for flag in DIFFUSERS_FLAGS[name] if flag in ours and flag in unsupported] == []  # the README is current


def test_logger_is_report_to_and_weighting_scheme_maps_onto_the_samplers(train_unconditional):
    args = train_unconditional.parse_args(["--logger", "none", "--weighting_scheme", "mode", "--mode_scale", "0.5",
                                           "--output_dir", "unused"])
    assert args.report_to == "none"
    from diffusers import DDPMScheduler

    from diffusers_curriculum.regimes import build_regime
    from diffusers_curriculum.sampling import ModeSampler

    regime = build_regime(args.regime_spec, DDPMScheduler(num_train_timesteps=100), None)
    assert isinstance(regime.sampler, ModeSampler) and regime.sampler.mode_scale == 0.5 and regime.name == "mode"
    with pytest.raises(UsageError, match="--weighting_scheme and --timestep_sampling both choose"):
        train_unconditional.parse_args(["--weighting_scheme", "logit_normal", "--timestep_sampling", "uniform", "--output_dir", "unused"])


def test_mode_sampler_draws_diffusers_density():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from diffusers_curriculum.sampling import ModeSampler

    t = ModeSampler(1000, mode_scale=1.29, seed=3).sample(4096)
    u = compute_density_for_timestep_sampling("mode", 4096, mode_scale=1.29, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, (u * 1000).long().clamp(0, 999))
    middle = ((t > 250) & (t < 750)).float().mean()
    assert middle > 0.6  # s = 1.29 concentrates draws in the middle of the range (uniform: 0.5)


def test_epoch_saves_validation_images_and_interpolation(train_unconditional, tmp_path):
    out = tmp_path / "run"
    # 32 images / batch 8 = 4 steps an epoch; 10 steps = epochs 0, 1 complete, then the end in epoch 2
    train_unconditional.main(train_unconditional.parse_args([
        "--output_dir", str(out), *TINY_FLAGS, "--max_train_samples", "32", "--max_train_steps", "10",
        "--save_images_epochs", "1", "--save_model_epochs", "2", "--use_ema", "--offload_ema", "--foreach_ema",
        "--image_interpolation_mode", "lanczos", "--allow_tf32"]))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0.png", "epoch_1.png", "final.png"]
    assert read_training_regime(out)["trained_steps"] == 10  # the epoch-1 pipeline was replaced by the final one


def test_interpolation_mode_changes_the_resize():
    from diffusers_curriculum.data import TensorImageDataset

    images = np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8)
    bilinear = TensorImageDataset(images, np.zeros(2), 32, interpolation="bilinear").pixels
    lanczos = TensorImageDataset(images, np.zeros(2), 32, interpolation="lanczos").pixels
    nearest = TensorImageDataset(images, np.zeros(2), 32, interpolation="nearest").pixels
    assert bilinear.shape == lanczos.shape == nearest.shape == (2, 1, 32, 32)
    assert not torch.equal(bilinear, lanczos) and not torch.equal(bilinear, nearest)


def test_validation_prompt_and_num_validation_images(tmp_path):
    script = load_script("train_text_to_image")
    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion

    tiny_stable_diffusion(tmp_path).save_pretrained(tmp_path / "tiny-sd")
    script.main(script.parse_args([
        "--pretrained_model_name_or_path", str(tmp_path / "tiny-sd"), "--dataset_name", "fashion_mnist", "--output_dir",
        str(tmp_path / "run"), "--train_batch_size", "4", "--max_train_samples", "8", "--report_to", "none", "--seed", "0",
        "--max_train_steps", "1", "--validation_prompt", "a photo of a bag", "--num_validation_images", "2",
        "--num_validation_inference_steps", "2"]))
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["final_0.png", "final_0_1.png"]


# ---- 3. text-to-image needs its data named ------------------------------------------------------------------
def test_text_to_image_without_data_flags_exits_2_with_one_line(tmp_path, capsys):
    script = load_script("train_text_to_image")
    with pytest.raises(SystemExit) as exit_info:
        script.cli(["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: give --dataset_name (a Hub id, or fashion_mnist offline) or --train_data_dir"


# ---- 4. trackers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train_unconditional", "train_text_to_image"])
def test_a_tracker_that_is_not_installed_exits_2_before_work(name, tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == "wandb" else real_find_spec(module, *a))
    script = load_script(name)
    extra = ["--pretrained_model_name_or_path", str(tmp_path), "--dataset_name", "fashion_mnist"] if name == "train_text_to_image" else []
    with pytest.raises(SystemExit) as exit_info:
        script.cli([*extra, "--output_dir", str(tmp_path / "run"), "--report_to", "wandb"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --report_to wandb: wandb is not installed (pip install wandb)"
    assert not (tmp_path / "run").exists()


def test_sample_grids_reach_tensorboard_including_the_final_one(train_unconditional, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_unconditional.main(train_unconditional.parse_args([
        "--output_dir", str(out), *["tensorboard" if f == "none" else f for f in TINY_FLAGS], "--max_train_samples", "32",
        "--max_train_steps", "3", "--validation_steps", "2"]))
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("samples")] == [2, 3]  # step 2's grid and the final one


def test_images_go_to_wandb_too(monkeypatch):
    from PIL import Image

    from diffusers_curriculum.training import log_images

    class FakeWandbImage:
        def __init__(self, image):
            self.image = image

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=FakeWandbImage))
    logged = []
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, step: logged.append((values, step)))
    image = Image.new("RGB", (4, 4))
    log_images(types.SimpleNamespace(trackers=[tracker]), "samples", [image], 7)
    (values, step), = logged
    assert step == 7 and [i.image for i in values["samples"]] == [image]


# ---- 1. logs ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_log_lines_are_visible_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_scripts" / "train_unconditional.py"), "--output_dir",
                           str(tmp_path / "run"), *FLAGS, "--max_train_steps", "2", "--checkpointing_steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = [line for line in proc.stderr.splitlines() if " - INFO - __main__ - " in line]
    for message in ("Distributed environment:", "***** Running training *****", "Saved state to", "Saved DDPMPipeline to"):
        assert any(message in line for line in info), message


# ---- 2. precision from the accelerate config ---------------------------------------------------------------
@pytest.mark.slow
def test_mixed_precision_comes_from_the_accelerate_config(tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\nnum_machines: 1\n"
                      "num_processes: 1\nuse_cpu: true\n")
    proc = run_launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                       str(ROOT / "train_scripts" / "train_unconditional.py"), "--output_dir", str(tmp_path / "run"), *FLAGS,
                       "--max_train_steps", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Mixed precision type: bf16" in proc.stderr
    assert "| mixed_precision | `bf16` |" in (tmp_path / "run" / "README.md").read_text()


def test_fp16_from_the_config_on_a_cpu_is_refused(train_unconditional, tmp_path, monkeypatch):
    from diffusers_curriculum import training

    class FakeAccelerator:
        def __init__(self, **kwargs):
            self.mixed_precision, self.device = "fp16", torch.device("cpu")
            self.distributed_type = "NO"

    monkeypatch.setattr(training, "Accelerator", FakeAccelerator)
    args = train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), *FLAGS])
    with pytest.raises(UsageError, match=r"--mixed_precision fp16 \(from the accelerate config\) needs a GPU"):
        training.make_accelerator(args.run_config, args.regime_spec)


# ---- 8. PCGrad / Nash on sharded parameters ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
@pytest.mark.parametrize("balancer", ["pcgrad", "nash"])
def test_self_formed_gradients_are_refused_on_sharded_launches(train_unconditional, tmp_path, monkeypatch, kind, balancer):
    from accelerate.utils import DistributedType

    from diffusers_curriculum import training

    class ShardedAccelerator:
        def __init__(self, **kwargs):
            self.mixed_precision, self.device = "no", torch.device("cpu")
            self.distributed_type = getattr(DistributedType, kind)

    monkeypatch.setattr(training, "Accelerator", ShardedAccelerator)
    args = train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), *FLAGS, "--regime", "ant", "--ant_method", balancer])
    with pytest.raises(UsageError, match=f"--ant_method {balancer} writes each parameter's gradient itself and cannot run on sharded parameters \\({kind}\\)"):
        training.make_accelerator(args.run_config, args.regime_spec)
    args = train_unconditional.parse_args(["--output_dir", str(tmp_path / "run"), *FLAGS, "--regime", "ant"])  # uw: fine
    training.make_accelerator(args.run_config, args.regime_spec)


# ---- 7. shipping the EMA weights does not copy the model ----------------------------------------------------
def test_validation_with_ema_restores_the_training_weights(train_unconditional, tmp_path, monkeypatch):
    import copy

    real_deepcopy = copy.deepcopy

    def no_copies(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("the model was deep-copied")
        return real_deepcopy(obj, *args, **kwargs)

    flags = [*TINY_FLAGS, "--max_train_samples", "32", "--max_train_steps", "4", "--checkpointing_steps", "4", "--use_ema"]
    train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "plain"), *flags, "--no_validation"]))
    monkeypatch.setattr(copy, "deepcopy", no_copies)
    train_unconditional.main(train_unconditional.parse_args(["--output_dir", str(tmp_path / "validated"), *flags, "--validation_steps", "1"]))
    for part in ("checkpoint-4/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):  # training weights, EMA weights
        a, b = load_file(tmp_path / "plain" / part), load_file(tmp_path / "validated" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


# ---- 9. packaging -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_wheel_carries_the_package_its_data_and_entry_points(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("diffusers_curriculum-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("diffusers_curriculum/portable/timestep_routed_experts.py", "diffusers_curriculum/model_cards/unconditional.md",
                     "diffusers_curriculum/regimes/cli.py"):
        assert expected in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: diffusers" in metadata and "Provides-Extra: dev" in metadata
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "diffusers-curriculum-difficulty" in entry_points
    assert os.path.basename(str(wheel)).startswith("diffusers_curriculum-0.1.0")


def test_the_ema_warmup_flags_reach_diffusers_ema_model(tmp_path, monkeypatch):
    """--ema_max_decay/--ema_inv_gamma/--ema_power set EMAModel's warm-up, decay_t = min(max, 1 − (1 + t/γ)^−p)
    (diffusers' formula, step t counted from 0 after the first update); without them (text-to-image) EMAModel's
    default (1 + t)/(10 + t) schedule applies."""
    from diffusers import UNet2DModel

    from diffusers_curriculum import training

    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=2,
                        layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    assert training.make_ema(model, use_ema=False) is None
    warm = training.make_ema(model, True, warmup={"decay": 0.9, "inv_gamma": 2.0, "power": 0.5})
    assert warm.get_decay(4) == pytest.approx(1 - (1 + 3 / 2.0) ** -0.5) and warm.get_decay(10_000) == pytest.approx(0.9)
    assert training.make_ema(model, True).get_decay(4) == pytest.approx((1 + 3) / (10 + 3))

    script, made = load_script("train_unconditional"), []
    monkeypatch.setattr(script, "make_ema", lambda *a, **k: made.append(k["warmup"]) or training.make_ema(*a, **k))
    script.main(script.parse_args(["--output_dir", str(tmp_path / "run"), *FLAGS, "--max_train_steps", "1", "--use_ema",
                                   "--ema_max_decay", "0.5", "--ema_inv_gamma", "3", "--ema_power", "0.25"]))
    assert made == [{"decay": 0.5, "inv_gamma": 3.0, "power": 0.25}]
