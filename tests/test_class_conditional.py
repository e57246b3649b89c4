"""train_scripts/train_class_conditional.py and ClassConditionalPipeline."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from PIL import Image

from diffusers_curriculum import ClassConditionalPipeline, read_training_regime
from diffusers_curriculum.errors import UsageError
from diffusers_curriculum.experts import is_routed_experts
from diffusers_curriculum.models import tiny_unet_config
from diffusers_curriculum.tasks import ClassConditional

from conftest import load_script

REGIME_FLAGS = {
    "uniform": [],
    "curriculum": ["--regime", "curriculum", "--curriculum_clusters", "3", "--curriculum_check_every", "1"],
    "ant": ["--regime", "ant", "--ant_clusters", "2"],
    "tdc": ["--regime", "tdc", "--tdc_groups", "2", "--tdc_base_steps", "2"],
}


@pytest.fixture(scope="module")
def script():
    return load_script("train_class_conditional")


def run(script, tmp_path, tiny_flags, *extra, name="run"):
    return script.main(script.parse_args(["--output_dir", str(tmp_path / name), *tiny_flags, "--max_train_samples", "64", *extra]))


@pytest.mark.parametrize("regime", sorted(REGIME_FLAGS))
def test_each_regime_trains_and_saves_a_pipeline_that_generates_requested_classes(script, tmp_path, tiny_flags, regime):
    run(script, tmp_path, tiny_flags, "--max_train_steps", "4", "--guidance_scale", "2", *REGIME_FLAGS[regime])
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "run", trust_remote_code=True)
    assert type(pipeline).__name__ == "ClassConditionalPipeline"
    assert pipeline.config.num_classes == 10 and pipeline.config.guidance_trained
    assert pipeline.unet.config.num_class_embeds == 11
    assert is_routed_experts(pipeline.unet) == (regime == "tdc")
    assert read_training_regime(tmp_path / "run")["name"] == regime
    images = pipeline(class_labels=[7, 9], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    assert (tmp_path / "run" / "samples" / "final.png").exists()
    assert 'DiffusionPipeline.from_pretrained("run", trust_remote_code=True)' in (tmp_path / "run" / "README.md").read_text()


def recording_unet(num_classes):
    """A real UNet2DModel whose prediction is the class label as a constant image; records its labels."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    unet = UNet2DModel.from_config({**tiny_unet_config(8, 1, (8, 16)), "num_class_embeds": num_classes + 1})
    unet.calls = []

    def forward(sample, t, class_labels=None, return_dict=True):
        unet.calls.append(class_labels.clone())
        return UNet2DOutput(sample=class_labels.float().view(-1, 1, 1, 1).expand_as(sample))

    unet.forward = forward
    return unet


def test_pipeline_passes_requested_labels_and_applies_guidance():
    unet = recording_unet(5)
    scheduler = DDPMScheduler(num_train_timesteps=10, clip_sample=False)
    pipeline = ClassConditionalPipeline(unet=unet, scheduler=scheduler, num_classes=5, guidance_trained=True)
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(class_labels=[1, 3], num_inference_steps=1, guidance_scale=3.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert unet.calls[0].tolist() == [1, 3, 5, 5]  # conditional rows, then the null class
    # guided prediction ε(∅) + s·(ε(y) − ε(∅)) = 5 + 3·(y − 5), stepped from the same initial noise
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 8, 8), generator=generator)
    guided = torch.tensor([5 + 3 * (1 - 5), 5 + 3 * (3 - 5)], dtype=torch.float32).view(2, 1, 1, 1).expand_as(x)
    expected = scheduler.step(guided, scheduler.timesteps[0], x, generator=generator).prev_sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)

    unet.calls.clear()
    pipeline(class_labels=2, num_inference_steps=1, output_type="np")
    assert unet.calls[0].tolist() == [2]
    with pytest.raises(ValueError, match=r"class_labels \[5\] must be in \[0, 5\)"):
        pipeline(class_labels=[5], num_inference_steps=1)
    unguided = ClassConditionalPipeline(unet=unet, scheduler=scheduler, num_classes=5)
    with pytest.raises(ValueError, match="guidance_scale != 1 needs"):
        unguided(class_labels=[1], guidance_scale=2.0)


def test_class_dropout_replaces_labels_by_the_null_class_at_the_given_rate():
    task = ClassConditional(num_classes=10, class_dropout_prob=0.3, seed=0)
    torch.manual_seed(0)
    labels = task.model_kwargs({"labels": torch.randint(0, 10, (20000,))}, "cpu")["class_labels"]
    assert (labels == 10).float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert int(labels.max()) == 10 and int(labels.min()) == 0


def test_image_folder_with_class_subfolders_infers_the_classes(script, tmp_path, tiny_flags):
    for name, value in (("cats", 40), ("dogs", 200)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((32, 32), value + i, np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    run(script, tmp_path, tiny_flags, "--train_data_dir", str(tmp_path / "data"), "--image_mode", "L",
        "--max_train_steps", "2", "--no_validation")
    assert DiffusionPipeline.from_pretrained(tmp_path / "run", trust_remote_code=True).config.num_classes == 2


@pytest.mark.parametrize("extra, message", [
    (["--num_classes", "5"], "class label 9 in the data set is >= --num_classes 5"),
    (["--class_dropout_prob", "0", "--guidance_scale", "3"], "--guidance_scale needs --class_dropout_prob > 0"),
    (["--class_dropout_prob", "1.5"], "--class_dropout_prob must be in [0, 1)"),
])
def test_bad_class_flags_are_clear_errors(script, tmp_path, tiny_flags, extra, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(")", r"\)")):
        run(script, tmp_path, tiny_flags, "--max_train_steps", "2", *extra)
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_resume_with_class_dropout_reproduces_the_uninterrupted_run(script, tmp_path, tiny_flags):
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--class_dropout_prob", "0.5", "--no_validation",
             "--regime", "curriculum", "--curriculum_clusters", "4", "--curriculum_check_every", "1", "--curriculum_patience", "1"]
    straight = run(script, tmp_path, tiny_flags, *flags, name="straight")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = run(script, tmp_path, tiny_flags, *flags, "--resume_from_checkpoint", "latest", name="resumed")
    assert resumed["losses"] == pytest.approx(straight["losses"][4:], rel=1e-5)
    assert resumed["regime_state"]["sampler"]["stage"] == straight["regime_state"]["sampler"]["stage"]


FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_card_states_the_facts_of_the_run(script, tmp_path, tiny_flags):
    """Each fact on the card, checked against the run: examples, steps, samples seen, model size, regime, classes."""
    run(script, tmp_path, tiny_flags, "--max_train_steps", "6", "--regime", "ant", "--ant_clusters", "3", "--snr_gamma", "2")
    out = tmp_path / "run"
    card, record = (out / "README.md").read_text(), read_training_regime(out)
    # data: 64 images (--max_train_samples), 6 steps of 8 = 48 images = 0.75 passes
    assert "on 64 images of **zalando-datasets/fashion_mnist**" in card
    assert "Trained on the first 64 images of Fashion-MNIST's training split" in card and "`--max_train_samples 64`" in card
    assert "6 optimizer steps at a total batch of 8 saw 48 examples, 0.75 passes over the data." in card
    assert "60,000" not in card and "all " not in card.split("## Training data")[1].split("##")[0]
    # model size: counted on the saved UNet
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert f"Model size: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters." in card
    # the regime in words, against the record
    clusters = ", ".join(f"[{a}, {b})" for a, b in record["clusters"])
    assert len(record["clusters"]) == 3
    assert f"- Clusters: 3 timestep intervals by ANT's exact interval DP on the log-SNR: {clusters}." in card
    assert "- Timesteps: every batch stratified over the clusters" in card
    assert "- Loss: Min-SNR-γ loss weighting, γ = 2." in card
    assert "- Balancer: Uncertainty Weighting of the clusters' losses (ANT; learning rate 0.025)." in card
    assert "{'" not in card and "[{" not in card  # no Python reprs
    # classes by name, and the snippet's labels named
    for label, name in enumerate(FASHION_MNIST_NAMES):
        assert f"| {label} | {name} |" in card
    assert "class_labels=[0, 1, 2, 3], guidance_scale=3.0" in card and "# T-shirt/top, Trouser, Pullover, Dress" in card
    # settings the optimizer ran with, and the Hub's gallery
    assert "| adam_beta1 | `0.95` |" in card and "| adam_weight_decay | `1e-06` |" in card
    assert "widget:\n- output:\n    url: samples/final.png" in card
    assert "## Evaluation" in card and "## Limitations" in card


def test_class_names_come_from_a_folder_of_class_subfolders(tmp_path):
    from diffusers_curriculum.data import build_dataset, class_names

    for label in ("cat", "dog"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    dataset = build_dataset(None, str(tmp_path / "data"), 8, label_column="label")
    assert class_names(None, dataset, 2) == ["cat", "dog"]
    assert class_names(None, dataset, 3) is None  # more classes than the data names: no names rather than wrong ones
