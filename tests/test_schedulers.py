"""What ships with a pipeline: stock schedulers, training_regime.json, the old layout and its converter."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from diffusers_curriculum import ClassConditionalPipeline, read_training_regime
from diffusers_curriculum.checkpointing import save_pipeline
from diffusers_curriculum.convert_pipeline import convert_pipeline
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.export import make_portable, needs_remote_code, stock_scheduler

from conftest import ROOT

REGIME = {"name": "uniform", "weighting": "min_snr", "snr_gamma": 5.0, "clusters": [[0, 50], [50, 100]]}
OLD_LAYOUT = ROOT / "tests" / "fixtures" / "old_layout"


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def samples(pipeline, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipeline(num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def test_stock_scheduler_keeps_the_config_and_drops_an_old_regime_entry():
    base = DDPMScheduler(num_train_timesteps=77, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    base.register_to_config(training_regime=REGIME)  # a base pipeline saved in the old layout
    for sampler, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)):
        shipped = stock_scheduler(base, sampler)
        assert type(shipped) is cls and "training_regime" not in shipped.config
        assert shipped.config.num_train_timesteps == 77 and shipped.config.prediction_type == "v_prediction"
        assert torch.equal(shipped.alphas_cumprod, base.alphas_cumprod)
    with pytest.raises(ValueError, match="sampler must be one of"):
        stock_scheduler(base, "euler")


def test_saved_pipeline_is_all_stock_and_holds_the_regime_file(tmp_path):
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=100))
    save_pipeline(pipeline, tmp_path / "out", training_regime=REGIME)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not needs_remote_code(tmp_path / "out") and not list((tmp_path / "out").rglob("*.py"))
    assert read_training_regime(tmp_path / "out") == REGIME
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert (samples(reloaded, batch_size=2) == samples(pipeline, batch_size=2)).all()


def test_custom_pipeline_class_ships_its_file_and_the_index_names_it(tmp_path):
    unet = UNet2DModel.from_config({**tiny_unet().config, "num_class_embeds": 4})
    pipeline = ClassConditionalPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100), num_classes=3)
    pipeline.save_pretrained(tmp_path / "raw")
    index = make_portable(tmp_path / "raw")
    assert index["_class_name"] == ["class_conditional_pipeline", "ClassConditionalPipeline"]
    shipped = (tmp_path / "raw" / "class_conditional_pipeline.py").read_text()
    assert "diffusers_curriculum" not in shipped.replace("``diffusers_curriculum``", "")  # self-contained
    assert needs_remote_code(tmp_path / "raw")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "raw")


def test_read_training_regime_errors_name_the_folder(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="plain holds no training_regime.json"):
        read_training_regime(tmp_path / "plain")


def test_a_hub_id_that_cannot_be_reached_is_an_error_not_an_empty_record():
    # conftest sets HF_HUB_OFFLINE=1: nothing is cached for this id
    with pytest.raises(Exception, match="offline|cannot find|Cannot find|not found"):
        read_training_regime("nobody-here/never-pushed")


# ---- the old layout (fixtures made by the code of e71fd58) ---------------------------------------------
OLD_KINDS = {"unconditional": dict(batch_size=2), "tdc_pruned": dict(batch_size=2), "class_conditional": dict(class_labels=[0, 2])}


@pytest.mark.parametrize("kind", sorted(OLD_KINDS))
def test_old_layout_still_loads_with_the_package_and_converts_to_identical_samples(tmp_path, kind):
    old = OLD_LAYOUT / kind
    before = sorted(p.name for p in old.rglob("*"))
    loader = ClassConditionalPipeline if kind == "class_conditional" else DiffusionPipeline
    legacy = loader.from_pretrained(old)
    assert type(legacy.scheduler).__name__ in ("RegimeDDPMScheduler", "RegimeDDIMScheduler")

    new = convert_pipeline(old, tmp_path / kind)
    index = json.loads((new / "model_index.json").read_text())
    assert index["scheduler"][0] == "diffusers" and "diffusers_curriculum" not in json.dumps(index)
    scheduler_config = json.loads((new / "scheduler" / "scheduler_config.json").read_text())
    assert "training_regime" not in scheduler_config
    assert read_training_regime(new) == read_training_regime(old) == legacy.scheduler.config.training_regime
    converted = DiffusionPipeline.from_pretrained(new, trust_remote_code=True)
    assert (samples(converted, **OLD_KINDS[kind]) == samples(legacy, **OLD_KINDS[kind])).all()
    assert sorted(p.name for p in old.rglob("*")) == before  # the old folder is left alone


def test_converter_cli_refuses_to_overwrite_and_names_a_non_pipeline(tmp_path, capsys):
    from diffusers_curriculum.convert_pipeline import main as convert_cli

    shutil.copytree(OLD_LAYOUT / "unconditional", tmp_path / "taken")
    for argv, message in (([str(OLD_LAYOUT / "unconditional"), str(tmp_path / "taken")], "already exists"),
                          ([str(tmp_path), str(tmp_path / "x")], "holds no model_index.json")):
        with pytest.raises(SystemExit) as exited:  # the module's entry point, in-process
            convert_cli(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UsageError):
        convert_pipeline(OLD_LAYOUT / "unconditional", tmp_path / "taken")
    proc = subprocess.run([sys.executable, "-m", "diffusers_curriculum.convert_pipeline", str(OLD_LAYOUT / "tdc_pruned"),
                           str(tmp_path / "new")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "trust_remote_code=True" in proc.stdout
    assert (tmp_path / "new" / "unet" / "timestep_routed_experts.py").is_file()
