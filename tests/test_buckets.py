"""Aspect-ratio buckets (--aspect_ratio_buckets): parsing, the per-bucket batch sampler, the crop to a bucket, and
text-to-image runs on images of several shapes."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_curriculum.buckets import BucketBatchSampler, nearest_bucket, parse_buckets
from diffusers_curriculum.data import pil_to_tensor
from diffusers_curriculum.errors import UsageError

from conftest import load_script


def test_buckets_parse_as_diffusers_and_must_fit_the_model():
    assert parse_buckets("16,32; 32,16;24,24", multiple=4) == [(16, 32), (32, 16), (24, 24)]
    with pytest.raises(UsageError, match="--aspect_ratio_buckets '16x32': Invalid bucket format"):
        parse_buckets("16x32")
    with pytest.raises(UsageError, match="--aspect_ratio_buckets: bucket 16,30 does not fit the model: both sides must be multiples of 4"):
        parse_buckets("16,32;16,30", multiple=4)
    with pytest.raises(UsageError, match="lists a bucket twice"):
        parse_buckets("16,32;16,32")


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    buckets = [(16, 32), (32, 16), (24, 24)]
    assert nearest_bucket(40, 80, buckets) == 0  # wide
    assert nearest_bucket(90, 40, buckets) == 1  # tall
    assert nearest_bucket(50, 55, buckets) == 2  # about square


def test_an_image_is_resized_to_cover_its_bucket_and_cropped_to_it():
    image = Image.fromarray(np.zeros((40, 100, 3), np.uint8))  # height 40, width 100
    geometry = {}
    tensor = pil_to_tensor(image, (16, 32), "RGB", center_crop=True, geometry=geometry)
    # scale max(16/40, 32/100) = 0.4 -> 16 × 40, centre-cropped to 16 × 32: 4 columns off the left
    assert tensor.shape == (3, 16, 32) and geometry["crop_top_left"].tolist() == [0, 4]
    tensor = pil_to_tensor(image, (32, 16), "RGB", center_crop=True, geometry=geometry)
    # scale max(32/40, 16/100) = 0.8 -> 32 × 80, cropped to 32 × 16: 32 columns off the left
    assert tensor.shape == (3, 32, 16) and geometry["crop_top_left"].tolist() == [0, 32]


class Epoch:
    epoch = 0


def test_bucket_batches_hold_one_bucket_cover_each_bucket_and_reshuffle_per_epoch():
    bucket_of = [0] * 7 + [1] * 5 + [2] * 1  # 7, 5 and 1 items
    data = Epoch()
    sampler = BucketBatchSampler(data, bucket_of, batch_size=2, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 3 + 2 + 0  # full batches only: ⌊7/2⌋ + ⌊5/2⌋ + ⌊1/2⌋
    assert all(len(batch) == 2 and len({bucket_of[i] for i in batch}) == 1 for batch in first)
    seen = [i for batch in first for i in batch]
    assert len(set(seen)) == len(seen)  # no item twice in an epoch
    assert sum(bucket_of[i] == 0 for i in seen) == 6 and sum(bucket_of[i] == 1 for i in seen) == 4
    assert list(sampler) == first  # the same epoch draws the same (a resume sees what the run saw)
    data.epoch = 1
    assert list(sampler) != first


@pytest.fixture(scope="module")
def shaped_folder(tmp_path_factory):
    """Eight captioned images: four wide (20 × 40), four tall (40 × 20)."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for i in range(8):
        height, width = (20, 40) if i < 4 else (40, 20)
        Image.fromarray(np.full((height, width, 3), 30 * i, np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {'wide' if i < 4 else 'tall'} thing {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion_xl

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_stable_diffusion_xl(folder / "build").save_pretrained(folder / "sdxl")
    return folder / "sdxl"


def run(base, data, out, *extra):
    script = load_script("train_text_to_image")
    return script.main(script.parse_args([
        "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--train_data_dir", str(data),
        "--train_batch_size", "2", "--report_to", "none", "--seed", "0", "--lr_warmup_steps", "0", "--learning_rate", "1e-3",
        "--aspect_ratio_buckets", "16,32;32,16;16,16", "--center_crop", *extra]))


def test_sdxl_trains_on_buckets_with_each_batchs_target_size_and_resumes_exactly(tiny_sdxl, shaped_folder, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    calls, encoded = [], []
    forward, encode = UNet2DConditionModel.forward, AutoencoderKL.encode
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, sample, t, *a, **k: (
        calls.append((tuple(sample.shape[-2:]), k["added_cond_kwargs"]["time_ids"].tolist())), forward(self, sample, t, *a, **k))[1])
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--regime", "curriculum", "--curriculum_clusters", "2",
             "--cache_latents"]
    straight = run(tiny_sdxl, shaped_folder, tmp_path / "straight", *flags)
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (encoded.append(tuple(x.shape)), encode(self, x, *a, **k))[1])
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = run(tiny_sdxl, shaped_folder, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    assert resumed["losses"] == straight["losses"][3:]
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # each batch is one bucket: wide images as 16 × 32 (latents 8 × 16), tall as 32 × 16; the time ids say so, per image:
    # (original height, width, crop top, left, target height, width), centre crops of the covering resize
    wide, tall = [20, 40, 0, 0, 16, 32], [40, 20, 0, 0, 32, 16]
    for latent_size, time_ids in calls[:6]:
        assert latent_size in ((8, 16), (16, 8))
        assert time_ids == [wide] * 2 if latent_size == (8, 16) else time_ids == [tall] * 2
    assert {size for size, _ in calls[:6]} == {(8, 16), (16, 8)}  # three steps = three batches of 2: both shapes came up
    # --cache_latents encoded each image once, a bucket at a time (the resumed run's cache)
    assert sorted(encoded) == [(2, 3, 16, 32), (2, 3, 16, 32), (2, 3, 32, 16), (2, 3, 32, 16)]


def test_a_bucket_smaller_than_a_batch_everywhere_is_a_clear_error(tiny_sdxl, shaped_folder, tmp_path):
    with pytest.raises(UsageError, match="--train_batch_size 8 is larger than every aspect-ratio bucket"):
        run(tiny_sdxl, shaped_folder, tmp_path / "run", "--max_train_steps", "1", "--train_batch_size", "8")
    with pytest.raises(UsageError, match="bucket 16,30 does not fit the model: both sides must be multiples of 4"):
        run(tiny_sdxl, shaped_folder, tmp_path / "run", "--max_train_steps", "1", "--aspect_ratio_buckets", "16,30")
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_sd3_transformer_trains_on_non_square_buckets(shaped_folder, tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel

    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion_3

    tiny_stable_diffusion_3(tmp_path / "build").save_pretrained(tmp_path / "sd3")
    shapes = []
    forward = SD3Transformer2DModel.forward
    monkeypatch.setattr(SD3Transformer2DModel, "forward", lambda self, *a, **k: (
        shapes.append(tuple(k["hidden_states"].shape[-2:])), forward(self, *a, **k))[1])
    summary = run(tmp_path / "sd3", shaped_folder, tmp_path / "run", "--max_train_steps", "4")
    assert np.isfinite(summary["losses"]).all() and set(shapes) == {(8, 16), (16, 8)}  # 2 × 2 patches of both shapes


@pytest.mark.slow
def test_two_process_sd3_lora_run_on_buckets(shaped_folder, tmp_path):
    """DDP (2 CPU processes, accelerate sharding the one-bucket batches between the ranks) with SD3, LoRA and an ANT
    regime: both ranks train and checkpoint, and the adapter-only result loads with stock diffusers and samples."""
    from diffusers import StableDiffusion3Pipeline

    from diffusers_curriculum.tiny_sd import tiny_stable_diffusion_3
    from test_distributed import LAUNCH, run_launch

    from conftest import ROOT

    tiny_stable_diffusion_3(tmp_path / "build").save_pretrained(tmp_path / "sd3")
    out = tmp_path / "ddp"
    proc = run_launch([*LAUNCH, str(ROOT / "train_scripts" / "train_text_to_image.py"), "--pretrained_model_name_or_path",
                       str(tmp_path / "sd3"), "--output_dir", str(out), "--train_data_dir", str(shaped_folder),
                       "--train_batch_size", "2", "--report_to", "none", "--seed", "0", "--lr_warmup_steps", "0",
                       "--learning_rate", "1e-2", "--aspect_ratio_buckets", "16,32;32,16", "--center_crop", "--use_lora",
                       "--rank", "2", "--max_train_steps", "4", "--checkpointing_steps", "4", "--regime", "ant", "--ant_clusters", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoint-4").glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    adapters = load_file(out / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") and ".lora_" in k for k in adapters)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    pipeline.load_lora_weights(out)
    image = pipeline("a wide thing", num_inference_steps=2, max_sequence_length=77, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
