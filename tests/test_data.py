import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_curriculum import data
from diffusers_curriculum.data import build_dataset, load_fashion_mnist, num_channels, read_idx
from diffusers_curriculum.errors import UsageError


def test_fashion_mnist_reads_the_debian_package():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    test_images, _ = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28)


def test_fashion_mnist_dataset_is_resized_and_scaled():
    dataset = build_dataset("fashion_mnist", resolution=32, max_train_samples=64)
    item = dataset[0]
    assert len(dataset) == 64 and item["pixel_values"].shape == (1, 32, 32)
    assert -1.0 <= item["pixel_values"].min() < 0 < item["pixel_values"].max() <= 1.0
    assert 0 <= int(item["labels"]) < 10 and num_channels(dataset) == 1


def test_missing_fashion_mnist_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist.*network"):
        load_fashion_mnist("train", root=tmp_path)


def test_truncated_idx_file_is_an_error(tmp_path):
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(UsageError, match="truncated"):
        read_idx(path)


def test_digits_fallback():
    dataset = build_dataset("digits", resolution=8)
    assert len(dataset) == 1797 and dataset[0]["pixel_values"].shape == (1, 8, 8)


def write_images(folder, n=6, size=(40, 30), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"img_{i}.png")


def test_image_folder_is_cropped_to_resolution(tmp_path):
    write_images(tmp_path / "images")
    dataset = build_dataset(None, train_data_dir=str(tmp_path / "images"), resolution=16)
    assert len(dataset) == 6
    assert dataset[0]["pixel_values"].shape == (3, 16, 16)
    grey = build_dataset(None, train_data_dir=str(tmp_path / "images"), resolution=16, image_mode="L")
    assert grey[0]["pixel_values"].shape == (1, 16, 16)


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UsageError, match="--train_data_dir .* holds no images"):
        build_dataset(None, train_data_dir=str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="is not a folder"):
        build_dataset(None, train_data_dir=str(tmp_path / "nowhere"))


def test_corrupt_image_is_found_before_training(tmp_path):
    write_images(tmp_path / "images", n=2)
    (tmp_path / "images" / "img_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UsageError, match="--train_data_dir: 1 unreadable image: .*img_0.png"):
        build_dataset(None, train_data_dir=str(tmp_path / "images"), resolution=8)


def test_unreadable_row_of_a_hub_dataset_is_a_usage_error(tmp_path):
    import datasets

    from diffusers_curriculum.data import HFImageDataset

    rows = datasets.Dataset.from_dict({"image": [b"not an image"]})
    dataset = HFImageDataset(rows, "image", None, 8, "RGB", True, False)
    with pytest.raises(UsageError, match="image 0 of the training data cannot be read"):
        dataset[0]


def test_random_flip_flips_some_images():
    torch.manual_seed(0)
    plain = build_dataset("fashion_mnist", resolution=28, max_train_samples=32)
    flipped = build_dataset("fashion_mnist", resolution=28, max_train_samples=32, random_flip=True)
    pairs = [(plain[i]["pixel_values"], flipped[i]["pixel_values"]) for i in range(32)]
    same = [torch.equal(a, b) for a, b in pairs]
    assert 0 < sum(same) < 32
    assert all(torch.equal(a.flip(-1), b) for (a, b), s in zip(pairs, same) if not s)


def test_unknown_hub_dataset_is_a_usage_error_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="--dataset_name"):
        build_dataset("someone/does-not-exist-anywhere")


def test_random_flips_come_from_seed_epoch_and_index_not_the_global_rng():
    images = np.random.default_rng(0).integers(0, 255, (16, 8, 8), dtype=np.uint8)
    dataset = data.TensorImageDataset(images, np.zeros(16), 8, random_flip=True, seed=3)
    torch.manual_seed(0)
    first = [dataset[i]["pixel_values"] for i in range(16)]
    torch.manual_seed(1)
    torch.rand(100)
    assert all(torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))  # the global RNG plays no part
    flipped = [not torch.equal(a, dataset.pixels[i]) for i, a in enumerate(first)]
    assert 0 < sum(flipped) < 16
    dataset.set_epoch(1)
    assert [not torch.equal(dataset[i]["pixel_values"], dataset.pixels[i]) for i in range(16)] != flipped


def test_images_are_decoded_once_then_remembered(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("DIFFUSERS_CURRICULUM_CACHE", str(tmp_path / "cache"))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(paths[-1])
    decoded = []
    real_open = data.Image.open
    monkeypatch.setattr(data.Image, "open", lambda path, *a, **k: decoded.append(path) or real_open(path, *a, **k))
    data.check_images(paths)
    data.check_images(paths)
    assert decoded == paths  # the second check paid nothing
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # changed: checked again
    data.check_images(paths)
    assert decoded == [*paths, paths[1]]
