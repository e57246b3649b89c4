"""train_scripts/train_text_to_image.py on a tiny random Stable Diffusion with captioned Fashion-MNIST."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_curriculum import read_training_regime
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.tiny_sd import tiny_stable_diffusion

from conftest import ROOT, load_script
from test_distributed import LAUNCH, run_launch

SCRIPT = ROOT / "train_scripts" / "train_text_to_image.py"
FLAGS = ["--dataset_name", "fashion_mnist", "--train_batch_size", "4", "--max_train_samples", "32", "--report_to", "none", "--seed", "0",
         "--lr_warmup_steps", "0", "--learning_rate", "1e-3"]
REGIME_FLAGS = {
    "uniform": ["--snr_gamma", "5"],
    "curriculum": ["--regime", "curriculum", "--curriculum_clusters", "4", "--curriculum_check_every", "1",
                   "--curriculum_patience", "1"],
    "ant": ["--regime", "ant", "--ant_clusters", "2"],
    "curriculum_fixed": ["--regime", "curriculum", "--curriculum_clusters", "4", "--curriculum_pacing", "fixed",
                         "--curriculum_steps_per_stage", "2"],
    "tdc": ["--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "2"],
}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_stable_diffusion(folder / "build").save_pretrained(folder / "sd")
    return folder / "sd"


@pytest.fixture(scope="module")
def script():
    return load_script("train_text_to_image")


def run(script, tiny_sd, out, *extra):
    return script.main(script.parse_args(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(out), *FLAGS, *extra]))


@pytest.mark.parametrize("regime", ["uniform", "curriculum", "ant", "tdc"])
def test_each_regime_fine_tunes_and_saves_a_pipeline_that_generates(script, tiny_sd, tmp_path, regime):
    summary = run(script, tiny_sd, tmp_path / "run", "--max_train_steps", "4", *REGIME_FLAGS[regime])
    assert summary["global_step"] == 4 and all(np.isfinite(summary["losses"]))
    # TDC experts ship their code in unet/: the README's call adds trust_remote_code for them only
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "run", safety_checker=None, trust_remote_code=regime == "tdc")
    assert read_training_regime(tmp_path / "run")["name"] == regime
    image = pipeline("a photo of a sneaker", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "No validation prompts were given" in card  # diffusers' script crashes here without prompts


def test_v_prediction_validation_prompts_and_card(script, tiny_sd, tmp_path):
    run(script, tiny_sd, tmp_path / "run", "--max_train_steps", "2", "--prediction_type", "v_prediction", "--use_ema",
        "--validation_prompts", "a photo of a bag", "a photo of a dress", "--num_validation_inference_steps", "2")
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "run", safety_checker=None)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert (tmp_path / "run" / "samples" / "final_1.png").exists()
    card = (tmp_path / "run" / "README.md").read_text()
    assert '"a photo of a dress"' in card and "samples/final_1.png" in card


def test_lora_trains_only_adapters_and_load_lora_weights_restores_them(script, tiny_sd, tmp_path):
    run(script, tiny_sd, tmp_path / "lora", "--max_train_steps", "4", "--use_lora", "--rank", "2",
        "--checkpointing_steps", "4", "--learning_rate", "1e-2")
    out = tmp_path / "lora"
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "model_index.json").exists()
    assert json.loads((out / "training_regime.json").read_text())["name"] == "uniform"
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    # the checkpoint holds the adapters only, as the stock LoRA file: one A and one B matrix per targeted projection
    checkpoint = out / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists()
    trained = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    targets = [n for n, _ in base.unet.named_modules() if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                                       "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))]
    assert len(trained) == 2 * len(targets) > 0 and all("lora" in k for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora.up" in k)  # B (up) starts at zero: the adapters trained
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)

    base.load_lora_weights(checkpoint)  # a checkpoint loads as a LoRA
    adapter = base.unet.active_adapters()[0]
    restored = {k.replace(f".{adapter}.", "."): v for k, v in base.unet.state_dict().items() if f".{adapter}." in k}
    assert len(restored) == len(trained)
    prompt = dict(prompt="a photo of a bag", num_inference_steps=2, output_type="np")
    with_lora = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    base.unload_lora_weights()
    without = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    assert not np.allclose(with_lora, without)
    # the card's snippet loads the base the adapters were trained on: a local folder of unknown origin, by its path
    card = (out / "README.md").read_text()
    assert f'StableDiffusionPipeline.from_pretrained("{tiny_sd}")' in card and "<base model>" not in card
    adapters = sum(v.numel() for k, v in trained.items() if "lora" in k)
    assert f"of which {adapters / 1e6:.3g}M trained" in card and "the first 32 images of Fashion-MNIST" in card


def test_resume_keeps_the_regime_state(script, tiny_sd, tmp_path):
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--noise_offset", "0.1", *REGIME_FLAGS["curriculum_fixed"]]
    straight = run(script, tiny_sd, tmp_path / "straight", *flags)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = run(script, tiny_sd, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert resumed["losses"] == pytest.approx(straight["losses"][4:], rel=1e-5)
    assert resumed["regime_state"]["sampler"]["stage"] == straight["regime_state"]["sampler"]["stage"] == 4
    assert resumed["regime_state"]["sampler"]["stage_history"] == straight["regime_state"]["sampler"]["stage_history"]


def captioned_folder(root, metadata):
    root.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(metadata):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", **row}) + "\n" for i, row in enumerate(metadata)))
    return root


def test_image_folder_with_captions_trains(script, tiny_sd, tmp_path):
    data = captioned_folder(tmp_path / "data", [{"text": f"a photo of thing {i}"} for i in range(4)])
    run(script, tiny_sd, tmp_path / "run", "--train_data_dir", str(data), "--max_train_steps", "1")
    assert (tmp_path / "run" / "model_index.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--caption_column", "caption"], "--caption_column 'caption' is not a column of the data set"),
    (["--image_column", "picture"], "--image_column 'picture' is not a column of the data set"),
    (["--caption_column", "n"], "--caption_column 'n' must hold strings or lists of strings"),
])
def test_bad_columns_are_clear_errors(script, tiny_sd, tmp_path, extra, message):
    data = captioned_folder(tmp_path / "data", [{"text": "a", "n": 1}, {"text": "b", "n": 2}])
    with pytest.raises(UsageError, match=message):
        run(script, tiny_sd, tmp_path / "run", "--train_data_dir", str(data), "--max_train_steps", "1", *extra)


@pytest.mark.parametrize("extra, message", [
    (["--use_lora", "--use_ema"], "--use_ema keeps an EMA of the full denoiser and does not apply to --use_lora (LoRA trains adapters only)"),
    (["--resolution", "10"], "--resolution 10 does not fit the model: the VAE downsamples by 2 and the UNet by 2, so it must be a multiple of 4"),
    (["--regime", "tdc", "--tdc_base_steps", "1", "--use_lora"], "--regime tdc trains full expert copies; it does not combine with --use_lora"),
    (["--noise_offset", "-1"], "--noise_offset must be >= 0, got -1.0"),
])
def test_bad_flags_are_one_line_errors_before_work(script, tiny_sd, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exited:  # the script's entry point, in-process
        script.cli(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(tmp_path / "run"), *FLAGS,
                    "--max_train_steps", "2", *extra])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {message}"]
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_a_bad_flag_is_one_line_from_the_command_line(tiny_sd, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(tiny_sd), "--output_dir",
                           str(tmp_path / "run"), *FLAGS, "--max_train_steps", "2", "--noise_offset", "-1"],
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: --noise_offset must be >= 0, got -1.0"] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_missing_pretrained_model_is_a_clear_error(script, tmp_path):
    # A local path is named as a missing folder, not reported as a failed Hub download.
    with pytest.raises(UsageError, match="--pretrained_model_name_or_path .*nowhere: no such folder"):
        script.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "run"), *FLAGS])
    # A Hub id that cannot be fetched (offline here) says it cannot load, before any work.
    with pytest.raises(UsageError, match="--pretrained_model_name_or_path nobody/missing-model: cannot load a Stable Diffusion pipeline"):
        script.parse_args(["--pretrained_model_name_or_path", "nobody/missing-model", "--output_dir", str(tmp_path / "run"), *FLAGS])
    assert not (tmp_path / "run").exists()


def test_failed_push_keeps_the_local_pipeline(tiny_sd, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(tiny_sd), "--output_dir",
                           str(tmp_path / "run"), *FLAGS, "--max_train_steps", "1", "--push_to_hub", "--hub_token", "hf_fake",
                           "--hub_model_id", "me/sd"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 1 and "push to me/sd failed" in proc.stderr and "hf_fake" not in proc.stderr
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "run", safety_checker=None).unet is not None


@pytest.mark.slow
def test_two_process_curriculum_run(tiny_sd, tmp_path):
    out = tmp_path / "ddp"
    proc = run_launch([*LAUNCH, str(SCRIPT), "--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(out), *FLAGS,
                       "--train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "6", *REGIME_FLAGS["curriculum_fixed"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoint-6").glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    record = read_training_regime(out)
    assert record["name"] == "curriculum" and [h["stage"] for h in record["stage_history"]][-1] == 4


def test_tiny_sd_cli_writes_a_loadable_pipeline(tmp_path):
    from diffusers_curriculum import tiny_sd

    tiny_sd.main(["--output_dir", str(tmp_path / "tiny")])
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", safety_checker=None)
    assert pipeline.unet.config.sample_size == 8 and not (tmp_path / "tiny" / ".build").exists()
    image = pipeline("a photo of a bag", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("extra, message", [
    (["--regime", "ant", "--ant_clusters", "500"], r"--ant_clusters must be in \[1, 100\]"),
    (["--regime", "curriculum", "--curriculum_clusters", "101"], r"--curriculum_clusters must be in \[1, 100\]"),
    (["--regime", "tdc", "--tdc_groups", "200", "--tdc_base_steps", "1"], r"--tdc_groups must be in \[2, 100\]"),
])
def test_cluster_counts_are_checked_against_the_schedulers_timesteps(script, tiny_sd, tmp_path, extra, message):
    """The script has no --ddpm_num_steps: T is the pretrained scheduler's (here 100, not the default 1000)."""
    base = tmp_path / "sd-100"
    shutil.copytree(tiny_sd, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_train_timesteps": 100}))
    with pytest.raises(UsageError, match=message):
        run(script, base, tmp_path / "run", "--max_train_steps", "2", *extra)
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_lora_resume_from_an_adapter_only_checkpoint_is_exact(script, tiny_sd, tmp_path):
    flags = ["--use_lora", "--rank", "2", "--lora_alpha", "4", "--max_train_steps", "4", "--checkpointing_steps", "2",
             "--regime", "ant", "--ant_clusters", "2", "--weighting", "learned"]
    straight = run(script, tiny_sd, tmp_path / "straight", *flags)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(script, tiny_sd, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert resumed["losses"] == straight["losses"][2:]
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_lora_under_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(script, request, tmp_path, monkeypatch, family):
    from diffusers_curriculum import lora

    trained = {}
    register = lora.register_lora_hooks
    monkeypatch.setattr(script, "register_lora_hooks", lambda accelerator, models, *rest: (
        trained.update(unet=next(iter(models.values()))), register(accelerator, models, *rest)))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process's accelerate state is fp32 from earlier tests; bf16 for this run
    try:
        run(script, request.getfixturevalue(f"tiny_{family}"), tmp_path / "run", "--use_lora", "--rank", "2", "--max_train_steps", "2",
            "--mixed_precision", "bf16")
    finally:
        AcceleratorState._reset_state(True)
    unet = trained["unet"]
    frozen = {n: p.dtype for n, p in unet.named_parameters() if not p.requires_grad}
    trainable = {n: p.dtype for n, p in unet.named_parameters() if p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert trainable and set(trainable.values()) == {torch.float32} and all("lora" in n for n in trainable)
    assert load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")  # and it trained and saved


def test_cache_latents_runs_the_vae_encoder_once_per_image_and_trains_as_without(script, tiny_sd, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    flags = ["--max_train_steps", "24", "--regime", "curriculum", "--weighting", "p2"]  # 32 images, batch 4: 3 epochs
    plain = run(script, tiny_sd, tmp_path / "plain", *flags)
    encoded = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (encoded.append(x.shape[0]), encode(self, x, *a, **k))[1])
    cached = run(script, tiny_sd, tmp_path / "cached", *flags, "--cache_latents")
    assert sum(encoded) == 32  # each of the 32 images once, over three epochs
    # the cached posterior is sampled with the same generator: the run's losses are the uncached run's
    np.testing.assert_allclose(cached["losses"], plain["losses"], rtol=1e-4, atol=1e-6)
    with pytest.raises(UsageError, match="--cache_latents encodes each image once"):
        script.parse_args(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(tmp_path / "x"), *FLAGS,
                           "--cache_latents", "--random_flip"])


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion_xl

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_stable_diffusion_xl(folder / "build").save_pretrained(folder / "sdxl")
    return folder / "sdxl"


COMPOSED = ["--timestep_sampling", "curriculum", "--balancer", "uw", "--clusters", "2", "--weighting", "learned",
            "--curriculum_pacing", "fixed", "--curriculum_steps_per_stage", "2"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion_3

    folder = tmp_path_factory.mktemp("tiny-sd3")
    tiny_stable_diffusion_3(folder / "build").save_pretrained(folder / "sd3")
    return folder / "sd3"


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_family_trains_with_a_composed_regime_and_resumes_exactly(script, request, tmp_path, family, lora):
    base = request.getfixturevalue(f"tiny_{family}")
    flags = [*COMPOSED, "--max_train_steps", "4", "--checkpointing_steps", "2", *(["--use_lora", "--rank", "2"] if lora else [])]
    straight = run(script, base, tmp_path / "straight", *flags)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(script, base, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert resumed["losses"] == straight["losses"][2:]
    denoiser = "transformer" if family == "sd3" else "unet"
    weights = "pytorch_lora_weights.safetensors" if lora else f"{denoiser}/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = read_training_regime(tmp_path / "straight")
    assert record["name"] == "curriculum+uw" and record["weighting"] == "learned"
    if lora:
        assert all("lora" in k for k in load_file(tmp_path / "straight" / "checkpoint-4" / "pytorch_lora_weights.safetensors"))


def test_sdxl_conditions_the_unet_on_pooled_text_and_each_images_size_and_crop(script, tiny_sdxl, tmp_path, monkeypatch):
    """The UNet gets both encoders' penultimate hidden states, the second's pooled projection, and per image
    (original height, width, crop top, left, target height, width), as diffusers' SDXL script builds them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    calls = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        calls.append((encoder_hidden_states.detach().clone(), {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()}))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    run(script, tiny_sdxl, tmp_path / "run", "--max_train_steps", "1", "--max_train_samples", "4", "--seed", "3")
    hidden, added = calls[0]
    assert hidden.shape == (4, 16, 24) and added["text_embeds"].shape == (4, 12)
    # Fashion-MNIST images are 28×28, resized whole to the 16-pixel target: no crop
    assert added["time_ids"].tolist() == [[28, 28, 0, 0, 16, 16]] * 4
    # the text side computed independently: the same captions through both encoders, penultimate layers, pooled
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer")
    one = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")
    two = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    captions = [f"a photo of a {name}" for name in ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                                     "sneaker", "bag")] + ["a photo of an ankle boot"]
    expected = {}
    for caption in captions:
        ids = tokenizer([caption], max_length=16, padding="max_length", truncation=True, return_tensors="pt").input_ids
        out1, out2 = one(ids, output_hidden_states=True), two(ids, output_hidden_states=True)
        expected[caption] = (torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1)[0], out2.text_embeds[0])
    for row in range(4):  # each row is one of the captions' conditioning
        assert any(torch.allclose(hidden[row], h, atol=1e-5) and torch.allclose(added["text_embeds"][row], p, atol=1e-5)
                   for h, p in expected.values())


def test_a_crop_is_recorded_in_the_resized_image_and_mirrored_by_a_flip():
    from PIL import Image

    from diffusers_curriculum.data import pil_to_tensor

    image = Image.fromarray(np.zeros((40, 80, 3), np.uint8))  # height 40, width 80 -> resized to 16 × 32
    geometry = {}
    pil_to_tensor(image, 16, "RGB", center_crop=True, geometry=geometry)
    assert geometry["original_size"].tolist() == [40, 80] and geometry["crop_top_left"].tolist() == [0, 8]

    class Heads:  # a generator whose first draw crops at the left edge and whose flip coin says "flip"
        def integers(self, low, high):
            return 0

        def random(self):
            return 0.0

    pil_to_tensor(image, 16, "RGB", center_crop=False, random_flip=True, rng=Heads(), geometry=geometry)
    assert geometry["crop_top_left"].tolist() == [0, 16]  # the left-edge crop is the right edge of the flipped image


def test_families_not_supported_yet_are_refused_naming_what_is(tmp_path):
    from diffusers_curriculum.families import family_of

    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UsageError, match=r"FluxPipeline: Flux is not supported yet \(its transformer takes packed.*supported: "
                                         r"Stable Diffusion 1.x/2.x .*, SDXL .* and SD3/SD3.5 \(StableDiffusion3Pipeline\)"):
        family_of(str(tmp_path / "flux"))


def test_caption_dropout_is_drawn_per_image_and_epoch_and_resumes_the_same():
    from diffusers_curriculum.data import build_caption_dataset

    dataset = build_caption_dataset("fashion_mnist", resolution=16, max_train_samples=400, seed=0, empty_prompt_prob=0.3)
    first = [dataset[i]["caption"] for i in range(400)]
    assert 0.2 < first.count("") / 400 < 0.4 and all(c.startswith("a photo of") for c in first if c)
    assert [dataset[i]["caption"] for i in range(400)] == first  # the same epoch draws the same
    dataset.set_epoch(1)
    assert [dataset[i]["caption"] for i in range(400)] != first  # a new epoch draws anew
    plain = build_caption_dataset("fashion_mnist", resolution=16, max_train_samples=400, seed=0)
    assert all(c == "" or c == plain[i]["caption"] for i, c in enumerate(first))  # only ever dropped, never changed


def test_validation_takes_the_negative_prompt_and_guidance_scale(script, tiny_sd, tmp_path, monkeypatch):
    calls = []
    call = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda self, *a, **k: (calls.append(k), call(self, *a, **k))[1])
    run(script, tiny_sd, tmp_path / "run", "--max_train_steps", "1", "--validation_prompts", "a photo of a bag",
        "--num_validation_images", "1", "--num_validation_inference_steps", "2", "--validation_negative_prompt", "blurry",
        "--validation_guidance_scale", "3.5", "--proportion_empty_prompts", "0.5")
    assert calls and all(k["negative_prompt"] == "blurry" and k["guidance_scale"] == 3.5 for k in calls)
    assert "| proportion_empty_prompts | `0.5` |" in (tmp_path / "run" / "README.md").read_text()


# ---- SD3 / SD3.5: a transformer trained by flow matching, three text encoders -----------------------------------
def test_sd3_conditions_the_transformer_as_diffusers_sd3_pipeline_and_noises_the_shifted_latents(script, tiny_sd3, tmp_path, monkeypatch):
    """Per batch: the joint context and pooled projections are what diffusers' own ``StableDiffusion3Pipeline.
    encode_prompt`` gives for the captions (with T5, and zeros in its place under --drop_t5); the latents are the
    VAE posterior shifted and scaled; the transformer sees (1 − σ) x₀ + σ ε at timestep 1000 σ, σ = shift(t / T)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffusers_curriculum.noise import FlowProcess

    calls, noised = [], []
    forward, add_noise = SD3Transformer2DModel.forward, FlowProcess.add_noise
    monkeypatch.setattr(SD3Transformer2DModel, "forward", lambda self, *a, **k: (
        calls.append({n: v.detach().clone() for n, v in k.items() if torch.is_tensor(v)}), forward(self, *a, **k))[1])
    monkeypatch.setattr(FlowProcess, "add_noise", lambda self, x, n, t: (noised.append((x.clone(), n.clone(), t.clone())),
                                                                         add_noise(self, x, n, t))[1])
    # a posterior of known mean and no spread: the latents are then fixed by the VAE's shift and scale factors
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: SimpleNamespace(latent_dist=SimpleNamespace(
        mean=torch.full((x.shape[0], 4, 8, 8), 0.5), std=torch.zeros(x.shape[0], 4, 8, 8))))
    captions = [f"a photo of a {name}" for name in ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                                     "sneaker", "bag")] + ["a photo of an ankle boot"]
    for drop_t5 in (False, True):
        calls.clear(), noised.clear()
        run(script, tiny_sd3, tmp_path / f"run{drop_t5}", "--max_train_steps", "1", "--max_train_samples", "4", "--seed", "3",
            *(["--drop_t5"] if drop_t5 else []))
        latents, noise, t = noised[0]
        assert torch.equal(latents, torch.full_like(latents, (0.5 - 0.0609) * 1.5035))
        sigma = 3 * (t.double() / 1000) / (1 + 2 * t.double() / 1000)  # the base's shift 3
        inputs = calls[0]
        torch.testing.assert_close(inputs["timestep"].double(), 1000 * sigma, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(inputs["hidden_states"].double(), (1 - sigma.view(-1, 1, 1, 1)) * latents.double()
                                   + sigma.view(-1, 1, 1, 1) * noise.double(), rtol=1e-5, atol=1e-5)
        # diffusers' own prompt encoding, at the training T5 length (77, diffusers' SD3 scripts' default)
        pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **({"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}))
        context, _, pooled, _ = pipeline.encode_prompt(captions, None, None, do_classifier_free_guidance=False, max_sequence_length=77)
        assert inputs["encoder_hidden_states"].shape == (4, 16 + 77, 32) and inputs["pooled_projections"].shape == (4, 24)
        for row in range(4):  # each row is one of the captions' conditioning
            assert any(torch.allclose(inputs["encoder_hidden_states"][row], c, atol=1e-5) and torch.allclose(inputs["pooled_projections"][row], p, atol=1e-5)
                       for c, p in zip(context, pooled))
        assert bool((inputs["encoder_hidden_states"][:, 16:] == 0).all()) == drop_t5  # T5's part: zeros without it


def test_sd3_lora_checkpoint_holds_only_adapters_and_loads_with_load_lora_weights(script, tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "lora"
    run(script, tiny_sd3, out, "--max_train_steps", "4", "--use_lora", "--rank", "2", "--checkpointing_steps", "4", "--learning_rate", "1e-2")
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "model_index.json").exists()
    checkpoint = out / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists()
    trained = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    # one A and one B per targeted projection: image and context streams of the joint attention (diffusers' SD3 LoRA targets)
    targets = [n for n, _ in base.transformer.named_modules()
               if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                              "attn.add_v_proj", "attn.to_add_out"))]
    assert len(trained) == 2 * len(targets) > 0 and all(k.startswith("transformer.") and ".lora_" in k for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at zero: the adapters trained
    prompt = dict(prompt="a photo of a bag", num_inference_steps=2, output_type="np", max_sequence_length=77)
    without = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    base.load_lora_weights(checkpoint)  # a checkpoint loads as a LoRA, every tensor of it
    adapter = base.transformer.active_adapters()[0]
    restored = {"transformer." + k.replace(f".{adapter}.", "."): v for k, v in base.transformer.state_dict().items() if f".{adapter}." in k}
    assert restored.keys() == trained.keys() and all(torch.equal(restored[k], trained[k]) for k in trained)
    with_lora = base(**prompt, generator=torch.Generator().manual_seed(0)).images
    assert not np.allclose(with_lora, without)
    card = (out / "README.md").read_text()
    assert "LoRA adapters for the transformer of" in card and f'StableDiffusion3Pipeline.from_pretrained("{tiny_sd3}")' in card


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_gradient_checkpointing_trains_every_family_as_without_it(script, request, tmp_path, monkeypatch, family):
    from diffusers import ModelMixin

    enabled = []
    enable = ModelMixin.enable_gradient_checkpointing
    monkeypatch.setattr(ModelMixin, "enable_gradient_checkpointing", lambda self, *a, **k: (enabled.append(type(self).__name__),
                                                                                            enable(self, *a, **k))[1])
    base = request.getfixturevalue(f"tiny_{family}")
    plain = run(script, base, tmp_path / "plain", "--max_train_steps", "3")
    checkpointed = run(script, base, tmp_path / "checkpointed", "--max_train_steps", "3", "--gradient_checkpointing")
    assert enabled == ["SD3Transformer2DModel" if family == "sd3" else "UNet2DConditionModel"]
    np.testing.assert_allclose(checkpointed["losses"], plain["losses"], rtol=1e-5)


def test_sd3_defaults_to_diffusers_logit_normal_density_unless_a_regime_or_flag_chooses(script, tiny_sd3, tiny_sd, tmp_path):
    def parse(base, *extra):
        return script.parse_args(["--pretrained_model_name_or_path", str(base), "--output_dir", str(tmp_path / "x"), *FLAGS, *extra])

    assert parse(tiny_sd3).weighting_scheme == "logit_normal" and parse(tiny_sd3).max_sequence_length == 77
    assert parse(tiny_sd3, "--weighting_scheme", "none").weighting_scheme == "none"
    assert parse(tiny_sd3, "--timestep_sampling", "mode").weighting_scheme is None
    assert parse(tiny_sd3, "--regime", "curriculum").weighting_scheme is None  # the curriculum owns the density
    assert parse(tiny_sd3, "--weighting_scheme", "cosmap").regime_spec.weighting == "cosmap"  # a flow weighting on a flow base
    assert parse(tiny_sd3, "--weighting", "sigma_sqrt").weighting_scheme is None  # as diffusers: SD3's weights on uniform draws
    assert parse(tiny_sd).weighting_scheme is None and parse(tiny_sd).max_sequence_length is None  # DDPM bases: uniform


@pytest.mark.parametrize("family, extra, message", [
    ("sd", ["--drop_t5"], "--drop_t5 applies to SD3 bases; .* is a Stable Diffusion model"),
    ("sdxl", ["--max_sequence_length", "128"], "--max_sequence_length applies to SD3 bases; .* is a Stable Diffusion XL model"),
    ("sd3", ["--max_sequence_length", "0"], "--max_sequence_length must be >= 1, got 0"),
    ("sd3", ["--prediction_type", "v_prediction"], "--prediction_type applies to DDPM bases; .* is a flow model"),
    ("sd", ["--weighting_scheme", "sigma_sqrt"], "--weighting_scheme sigma_sqrt is a rectified-flow loss weight"),
])
def test_family_flags_are_checked_before_work(script, request, tmp_path, family, extra, message):
    with pytest.raises(UsageError, match=message):
        script.parse_args(["--pretrained_model_name_or_path", str(request.getfixturevalue(f"tiny_{family}")),
                           "--output_dir", str(tmp_path / "run"), *FLAGS, *extra])
    assert not (tmp_path / "run").exists()


def test_sd3_resolution_must_cut_into_whole_patches(script, tiny_sd3, tmp_path):
    with pytest.raises(UsageError, match="--resolution 10 does not fit the model: the VAE downsamples by 2 and the transformer's "
                                         "patches are 2, so it must be a multiple of 4"):
        run(script, tiny_sd3, tmp_path / "run", "--resolution", "10", "--max_train_steps", "1")
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_sd3_tdc_experts_without_t5_load_as_diffusers_documents_and_pruning_them_is_refused(script, tiny_sd3, tmp_path):
    from diffusers import DiffusionPipeline

    from conftest import load_script

    out = tmp_path / "tdc"
    run(script, tiny_sd3, out, "--max_train_steps", "3", "--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "1", "--drop_t5")
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["timestep_routed_experts", "TimestepRoutedExperts"] and index["text_encoder_3"] == [None, None]
    pipeline = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, text_encoder_3=None, tokenizer_3=None)
    assert len(pipeline.transformer.experts) == 2 and pipeline.text_encoder_3 is None
    image = pipeline("a photo of a bag", num_inference_steps=2, max_sequence_length=77, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    prune = load_script("prune_experts")
    with pytest.raises(UsageError, match="pruning text-to-image experts \\(StableDiffusion3Pipeline\\) is not supported"):
        prune.main(prune.parse_args(["--pretrained_model_name_or_path", str(out), "--output_dir", str(tmp_path / "pruned")]))
    assert not (tmp_path / "pruned").exists()

